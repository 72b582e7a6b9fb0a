"""Prediction latency: a trained workdir against its export bundle, side by side in one run.

    python benchmarks/predict_latency.py --out predict_latency.json
    python benchmarks/predict_latency.py --image_arch tiny --text_arch tiny --photos 8  # smoke

Default model: ResNet-50 at 224 px + DistilBERT (vocabulary 30522) at text length 32, random
init (weights do not change the speed), stored at 256 px. The script writes, in --work_dir: a
small demo dataset, a workdir holding that model as its best checkpoint, its bundle
(``jaxmm.export``) and a folder of photos. Then, each in a fresh process:

- first prediction: process start -> the line of one photo's prediction on stdout, for
  ``python -m jaxmm.predict --workdir W PHOTO`` and ``... --model BUNDLE PHOTO``, with the
  compilation cache emptied first (cold) and then as the cold run left it (warm);
- throughput: photos/s over the photo folder (after a warm-up batch), in-process;
- peak resident memory of every process (ru_maxrss).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL_VOCAB = 30522  # DistilBERT's (uncased) vocabulary


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image_arch", default="resnet50", choices=("resnet50", "tiny"))
    p.add_argument("--text_arch", default="distilbert", choices=("distilbert", "tiny"))
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--stored_size", type=int, default=256)
    p.add_argument("--text_length", type=int, default=32)
    p.add_argument("--photos", type=int, default=200, help="photos in the throughput folder")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--work_dir", default="", help="default: a fresh temporary folder")
    p.add_argument("--out", default="", help="also write the result JSON here")
    # Internal: KIND PATH FOLDER, the throughput measurement in a fresh process.
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_config(args, data_dir: str, tokenizer_dir: str):
    """The run's config: the default one with the benchmark's sizes and demo data."""
    from configs import default

    c = default.get_config()
    c.data_dir, c.demo.enabled, c.demo.per_class, c.demo.max_side = data_dir, True, 4, 320
    c.stored_image_size, c.image_size, c.max_text_length = (args.stored_size, args.image_size,
                                                           args.text_length)
    c.tokenizer, c.num_workers = tokenizer_dir, 0
    c.model.image_arch, c.model.text_arch = args.image_arch, args.text_arch
    c.model.image_pretrained = c.model.text_pretrained = ""
    c.model.dtype = "float32"
    return c


def write_tokenizer(out_dir: str, vocab_size: int) -> None:
    """A DistilBERT-style WordPiece tokenizer with ``vocab_size`` entries (letters + fillers)."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + x for x in letters)]
    tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    transformers.DistilBertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]").save_pretrained(out_dir)


def random_variables(model, config, seed: int = 0) -> dict:
    """Random variables of the model's shapes without compiling its init (minutes on a CPU)."""
    import jax
    import numpy as np

    from jaxmm import models

    shapes = jax.eval_shape(lambda r: models.init_variables(
        model, r, config.image_size, config.max_text_length), jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "'var'" in name or "'scale'" in name:
            return np.ones(s.shape, np.float32)
        if "'mean'" in name or "'bias'" in name:
            return np.zeros(s.shape, np.float32)
        return rng.normal(0.0, 0.02, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_workdir(config, workdir: str) -> None:
    """A workdir as training leaves it: the run record, the tokenizer copy and a best checkpoint.

    The prepared dataset is deleted afterwards: prediction from a workdir must not need it.
    """
    from jaxmm.data import prepared
    from jaxmm.trained.model import ModelSpec
    from jaxmm.trained.workdir import Workdir, model_architecture
    from jaxmm.training import checkpointing, train_log
    from jaxmm.training import setup as setup_lib

    data = setup_lib.prepared_data(config)
    tokenizer = setup_lib.load_tokenizer(config, data.dataset_dir)
    model = setup_lib.make_model(config, len(data.class_names), len(tokenizer), axis_name=None)
    os.makedirs(workdir, exist_ok=True)
    wd = Workdir(workdir)
    spec = ModelSpec(tuple(data.class_names), model_architecture(model, config),
                     setup_lib.preprocessing(config, data.meta))
    wd.write_record({
        "config": config.to_dict(), "run": train_log.run_info(),
        "class_names": data.class_names, "class_weights": [1.0] * len(data.class_names),
        "model": spec.to_json(), "data": prepared.data_record(data.dataset_dir, data.meta)})
    wd.keep_tokenizer(tokenizer)
    ckpt = checkpointing.Checkpoints(workdir, 1)
    ckpt.save_best(1, random_variables(model, config), {"epoch": 1})
    ckpt.close()
    shutil.rmtree(prepared.prepared_dir(config))
    wd.load_model("best")  # complete without the dataset


def write_photos(folder: str, count: int) -> list[str]:
    """``count`` 640x480 JPEG photos named like the dataset's files."""
    from jaxmm.data import synthetic

    os.makedirs(folder, exist_ok=True)
    out = []
    for i in range(count):
        cls = synthetic.CLASSES[i % len(synthetic.CLASSES)]
        path = os.path.join(folder, f"plastic_bottle_{i:03d}.jpg")
        synthetic.render(cls, i, (640, 480)).convert("RGB").save(path, quality=90)
        out.append(path)
    return out


# Runs a module as ``python -m`` would and reports the process's own peak resident memory
# (VmHWM) at exit: ru_maxrss of a child would include the parent's size at the fork.
PEAK_WRAPPER = """import atexit, runpy, sys
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            print('PEAK_KB', line.split()[1], file=sys.stderr)
atexit.register(_peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        kb = next(int(x.split()[1]) for x in f if x.startswith("VmHWM"))
    return round(kb / 1024, 1)


def timed_process(cmd: list[str], marker: str, env: dict) -> dict:
    """Runs a command; seconds from start to the first stdout line starting with ``marker``.

    Returns:
      dict(first_s, total_s, cpu_s (user + system of the whole process), peak_rss_mb, line).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    first, line = None, ""
    for text in proc.stdout:
        if first is None and text.startswith(marker):
            first, line = time.perf_counter() - start, text.strip()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - start
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr[-2000:]}")
    peak = [int(x.split()[1]) for x in stderr.splitlines() if x.startswith("PEAK_KB")]
    return {"first_s": round(first, 2), "total_s": round(total, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(peak[-1] / 1024, 1) if peak else None, "line": line}


def predict_cmd(path: str, kind: str, photo: str) -> list[str]:
    """The command line that predicts one photo from a workdir or a bundle."""
    flag = "--workdir" if kind == "workdir" else "--model"
    return [sys.executable, "-c", PEAK_WRAPPER, "jaxmm.predict", flag, path, photo]


def throughput_child(kind: str, path: str, folder: str, batch_size: int) -> dict:
    """In a fresh process: photos/s over a folder after one warm-up batch (the --child mode)."""
    from jaxmm.trained import classifier, classify

    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    start = time.perf_counter()
    if kind == "workdir":
        from jaxmm import paths
        from jaxmm.trained.workdir import Workdir
        from jaxmm.training import parallel

        parallel.configure_xla(os.path.join(path, paths.JAX_CACHE_DIR))
        predictor = classify.Predictor(Workdir(path).load_model("best"), batch_size)
    else:
        predictor = classifier.Classifier.load(path, batch_size=batch_size)
    classify.predict_files(predictor, files[:batch_size])
    ready = time.perf_counter()
    rows, problems = classify.predict_files(predictor, files)
    assert len(rows) == len(files) and not problems, problems
    seconds = time.perf_counter() - ready
    return {"photos": len(files), "seconds": round(seconds, 2),
            "photos_per_s": round(len(files) / seconds, 2),
            "load_and_warmup_s": round(ready - start, 2), "peak_rss_mb": peak_rss_mb()}


def measure(kind: str, path: str, photo: str, folder: str, args, env: dict) -> dict:
    """Cold and warm first prediction, then throughput, for one of the two paths (a workdir
    keeps its compilation cache inside; a bundle's is the user's, here a folder beside it)."""
    cache = os.path.join(path, "jax_cache")
    if kind != "workdir":
        env = {**env, "XDG_CACHE_HOME": f"{path}.user_cache"}
        cache = os.path.join(f"{path}.user_cache", "jaxmm", "jax_cache")
    shutil.rmtree(cache, ignore_errors=True)
    out = {"cold": timed_process(predict_cmd(path, kind, photo), photo, env),
           "warm": timed_process(predict_cmd(path, kind, photo), photo, env)}
    child = [sys.executable, os.path.abspath(__file__), "--child", kind, path, folder,
             "--batch_size", str(args.batch_size)]
    timed = timed_process(child, "{", env)
    out["throughput"] = {**json.loads(timed["line"]), "cpu_s": timed["cpu_s"]}
    out["cache_mb"] = round(sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                                os.walk(cache) for f in fs) / 2**20, 1) if os.path.isdir(
                                    cache) else 0.0
    return out


def setup(args, work: str) -> dict:
    """Writes the demo data, the workdir, its bundle and the photos (not timed, but export)."""
    from jaxmm.trained import bundle

    tokenizer_dir = os.path.join(work, "tokenizer")
    full = args.text_arch == "distilbert"
    write_tokenizer(tokenizer_dir, FULL_VOCAB if full else 200)
    config = make_config(args, os.path.join(work, "data"), tokenizer_dir)
    workdir, bundle_dir = os.path.join(work, "workdir"), os.path.join(work, "bundle")
    make_workdir(config, workdir)
    start = time.perf_counter()
    spec = bundle.export_run(workdir, bundle_dir)
    export_s = time.perf_counter() - start
    photos = write_photos(os.path.join(work, "photos"), args.photos)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(bundle_dir)
               for f in fs)
    return {"workdir": workdir, "bundle": bundle_dir, "photo": photos[0],
            "folder": os.path.dirname(photos[0]), "export_s": round(export_s, 1),
            "bundle_mb": round(size / 2**20, 1), "weights": spec["weights"]["values"]}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> dict:
    """Runs the benchmark; prints a table and one JSON line; returns the result."""
    import tempfile

    args = parse_args(argv)
    if args.child:
        print(json.dumps(throughput_child(*args.child, args.batch_size)), flush=True)
        return {}
    work = args.work_dir or tempfile.mkdtemp(prefix="predict_latency_")
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(key, None)  # the measurement is of jaxmm's own cache placement
    load_before = _loadavg()
    made = setup(args, work)
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                          platform.machine(), "loadavg_before": load_before},
              "model": {"image_arch": args.image_arch, "text_arch": args.text_arch,
                        "image_size": args.image_size, "text_length": args.text_length,
                        "weights": made["weights"]},
              "export_s": made["export_s"], "bundle_mb": made["bundle_mb"]}
    for kind in ("workdir", "bundle"):
        result[kind] = measure(kind, made[kind], made["photo"], made["folder"], args, env)
    result["machine"]["loadavg_after"] = _loadavg()
    bundle_warm, workdir = result["bundle"]["warm"]["first_s"], result["workdir"]
    result["goals"] = {
        "bundle_warm_first_s_le_4": bundle_warm <= 4.0,
        "bundle_warm_le_third_of_workdir_cold": bundle_warm <= workdir["cold"]["first_s"] / 3,
        "bundle_warm_le_third_of_workdir_warm": bundle_warm <= workdir["warm"]["first_s"] / 3}
    print(table(result))
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def table(result: dict) -> str:
    """The side-by-side table of a result."""
    rows = [("first prediction, cold cache (s)", lambda r: r["cold"]["first_s"]),
            ("first prediction, warm cache (s)", lambda r: r["warm"]["first_s"]),
            ("CPU time of that process (s)", lambda r: r["warm"]["cpu_s"]),
            ("photos/s (in-process, after warm-up)", lambda r: r["throughput"]["photos_per_s"]),
            ("peak memory, warm first prediction (MB)", lambda r: r["warm"]["peak_rss_mb"]),
            ("peak memory, throughput (MB)", lambda r: r["throughput"]["peak_rss_mb"]),
            ("compilation cache (MB)", lambda r: r["cache_mb"])]
    lines = ["| | workdir | bundle |", "|---|---|---|"]
    lines += [f"| {name} | {get(result['workdir'])} | {get(result['bundle'])} |"
              for name, get in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
