"""Time to a result: from raw image folders of the real size to test metrics, phase by phase.

    python3 benchmarks/time_to_result.py --work WORK [--runs cold,warm] [--out result.json]
        [--config configs/gpu_bf16.py] [--epochs 10] [--batch_size 256] [--set KEY=VALUE ...]
    python3 benchmarks/time_to_result.py --work WORK --dry_run     (tiny sizes, any CPU)

First, not timed: ``WORK/raw``, the synthetic look-alike of the real dataset at its real size
(``jaxmm.data.synthetic --real_size``: 15,431 files of up to 1024 px, ~1 MB each, in the real
layout), unless it is there already. Then, for each run, the two commands a user types, timed
from the first one's start to the second one's end:

    python -m jaxmm.train --config CONFIG --workdir WORK/<run> --config.data_dir=WORK/raw ...
    python -m jaxmm.evaluate --workdir WORK/<run> --split test

with the full model (ResNet-50 + DistilBERT, random init, the WordPiece tokenizer trained on
Train), ``--epochs`` epochs without early stopping, and the config's calibration.

- ``cold``: no prepared data (``WORK/prepared`` is removed) and an empty compilation cache (a new
  workdir holds the run's cache). The raw files were just written or read, so they are in the
  operating system's file cache unless ``--drop_caches`` can drop it (root only); the result
  says which.
- ``warm``: the prepared data of the run before and its compilation cache
  (``JAX_COMPILATION_CACHE_DIR`` pointing at the cold run's cache), as for a second run.

Reported per run: the wall time of each command, the training process's phases from its
``train_summary.json`` (prepare, start-up, compile, train, validation, checkpoints, calibration,
other) plus its process start (imports, JAX start-up: the command's wall time less the phases),
the evaluation command's wall time, test accuracy and macro-F1, and the total against the
``--goal`` (300 s). The JSON result is rewritten after every step, so a run cut short keeps
what it measured.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The full model from random init; early stopping off, so every run trains all its epochs.
FULL = ("--config.model.image_pretrained=", "--config.model.text_pretrained=",
        "--config.tokenizer=", "--config.patience=0")
# --dry_run: tiny towers and images, one epoch: checks the plumbing on a CPU in about a minute.
TINY = ("--config.model.image_arch=tiny", "--config.model.text_arch=tiny",
        "--config.model.proj_dim=64", "--config.model.hidden_dim=64",
        "--config.image_size=32", "--config.stored_image_size=40",
        "--config.max_text_length=16", "--config.tokenizer_vocab_size=400",
        "--config.model.dtype=float32", "--config.eval_batch_size=16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="raw data, prepared data and runs go here")
    p.add_argument("--runs", default="cold,warm", help="comma list of cold, warm")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "gpu_bf16.py"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=256, help="global batch")
    p.add_argument("--workers", type=int, default=-1, help="grain workers; -1 = cores - 2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides, e.g. model.batchnorm=fused")
    p.add_argument("--per_class", type=int, default=0,
                   help="raw data of this many Train files per class instead of the real size")
    p.add_argument("--max_side", type=int, default=1024, help="largest side of the raw images")
    p.add_argument("--goal", type=float, default=300.0, help="seconds, for the verdict")
    p.add_argument("--timeout", type=float, default=900.0, help="per command, seconds")
    p.add_argument("--drop_caches", action="store_true",
                   help="before the cold run, drop the OS file cache (needs root)")
    p.add_argument("--dry_run", action="store_true", help="tiny sizes: the plumbing only")
    p.add_argument("--out", default="", help="the JSON result (default WORK/time_to_result.json)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.epochs, args.batch_size = 1, 8
        args.per_class, args.max_side = args.per_class or 12, 96
        if args.workers < 0:
            args.workers = 0
    if args.workers < 0:
        args.workers = max((os.cpu_count() or 1) - 2, 1)
    args.runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(args.runs) - {"cold", "warm"})
    if unknown or not args.runs:
        p.error(f"--runs takes cold and/or warm, got {args.runs}")
    args.out = args.out or os.path.join(args.work, "time_to_result.json")
    return args


def raw_data(args, result: dict) -> str:
    """WORK/raw, generated (not timed against the goal) unless it holds a dataset already."""
    from jaxmm.data import builder, synthetic

    raw = os.path.join(args.work, "raw")
    if builder.has_dataset(raw):
        result["raw"] = {"generated_s": None, "note": "already there"}
    else:
        start = time.perf_counter()
        synthetic.generate(raw, per_class=args.per_class or 40, seed=0, max_side=args.max_side,
                           real_size=not args.per_class)
        result["raw"] = {"generated_s": round(time.perf_counter() - start, 1)}
    sizes = [os.path.getsize(os.path.join(d, f))
             for d, _, names in os.walk(raw) for f in names if not f.endswith(".csv")]
    result["raw"].update(files=len(sizes), gigabytes=round(sum(sizes) / 1e9, 2),
                         mean_megabytes=round(sum(sizes) / max(len(sizes), 1) / 1e6, 2))
    return raw


def drop_file_cache() -> str:
    """Asks the kernel to drop its file cache; says whether it did."""
    try:
        subprocess.run(["sync"], check=False, timeout=120)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "dropped"
    except OSError as e:
        return f"not dropped ({e.strerror or e})"


def _command(args, workdir: str, raw: str) -> list[str]:
    train = [sys.executable, "-m", "jaxmm.train", "--config", args.config, "--workdir", workdir,
             f"--config.data_dir={raw}",
             f"--config.prepared_dir={os.path.join(args.work, 'prepared')}",
             f"--config.num_epochs={args.epochs}", f"--config.batch_size={args.batch_size}",
             f"--config.num_workers={args.workers}", *FULL, *(TINY if args.dry_run else ())]
    return train + [f"--config.{kv}" for kv in args.set]


def timed(cmd: list[str], env: dict, log_path: str, timeout: float) -> tuple[int, float]:
    """Runs cmd with its output in log_path; returns (exit code, wall seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, round(time.perf_counter() - start, 2)


def test_metrics(workdir: str) -> dict:
    """Accuracy and macro-F1 from the evaluation's metrics.json (best checkpoint, test)."""
    for root, _, names in os.walk(os.path.join(workdir, "eval")):
        if "metrics.json" in names and os.path.basename(root) == "test":
            with open(os.path.join(root, "metrics.json")) as f:
                m = json.load(f)
            return {"accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1")}
    return {}


def one_run(args, kind: str, raw: str, result: dict, write) -> dict:
    """Trains and evaluates once (cold or warm), filling result['runs'][kind] as it goes."""
    workdir = os.path.join(args.work, kind)
    shutil.rmtree(workdir, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TF_CPP_MIN_LOG_LEVEL": "3",  # the repository first; wheels added by hand stay
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    run = result["runs"].setdefault(kind, {})
    if kind == "cold":
        shutil.rmtree(os.path.join(args.work, "prepared"), ignore_errors=True)
        run["file_cache"] = drop_file_cache() if args.drop_caches else "not dropped (not asked)"
    else:
        cache = os.path.join(args.work, "cold", "jax_cache")
        if not os.path.isdir(cache) or not os.path.isdir(os.path.join(args.work, "prepared")):
            run["error"] = "warm needs the cold run's prepared data and compilation cache"
            return run
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        run["cache_entries_before"] = len(os.listdir(cache))
    train_cmd = _command(args, workdir, raw)
    run["train_command"] = " ".join(train_cmd[1:])
    rc, wall = timed(train_cmd, env, os.path.join(args.work, f"{kind}_train.log"), args.timeout)
    run.update(train_exit=rc, train_wall_s=wall)
    summary_path = os.path.join(workdir, "train_summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        seconds = summary.get("seconds", {})
        run["phases_s"] = {"process_start": round(wall - seconds.get("total", 0.0), 2),
                           **{k: v for k, v in seconds.items() if k != "total"}}
        run["train_status"] = summary.get("status")
        run["epochs_completed"] = summary.get("epochs_completed")
    write()
    if rc != 0:
        return run
    eval_cmd = [sys.executable, "-m", "jaxmm.evaluate", "--workdir", workdir, "--split", "test"]
    rc, eval_wall = timed(eval_cmd, env, os.path.join(args.work, f"{kind}_evaluate.log"),
                          args.timeout)
    run.update(evaluate_exit=rc, evaluate_wall_s=eval_wall, test=test_metrics(workdir))
    run.setdefault("phases_s", {})["test_evaluation"] = eval_wall
    run["total_s"] = round(wall + eval_wall, 2)
    run["goal_met"] = rc == 0 and run["total_s"] <= args.goal
    if kind == "warm":
        run["cache_entries_added"] = len(os.listdir(env["JAX_COMPILATION_CACHE_DIR"])) - run[
            "cache_entries_before"]
    write()
    return run


def machine() -> dict:
    """CPU count and, when JAX sees one, the accelerator (asked in a child process, so this
    process never holds the device the runs need)."""
    out = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                          "print(d.platform, len(jax.devices()), d.device_kind, sep='|')"],
                         capture_output=True, text=True, timeout=300, check=False)
    platform_, count, kind = (out.stdout.strip().split("|") + ["?", "?", "?"])[:3]
    return {"cpus": os.cpu_count(), "platform": platform_, "devices": count, "device_kind": kind,
            "python": platform.python_version()}


def format_table(result: dict) -> str:
    """The runs side by side, one row per phase."""
    runs = result["runs"]
    names = sorted({k for r in runs.values() for k in r.get("phases_s", {})},
                   key=lambda k: list(PHASES).index(k) if k in PHASES else len(PHASES))
    lines = ["phase (s)      " + "".join(f"{k:>10}" for k in runs)]
    for name in names:
        lines.append(f"{name:<15}" + "".join(
            f"{r.get('phases_s', {}).get(name, float('nan')):>10.1f}" for r in runs.values()))
    lines.append(f"{'total':<15}" + "".join(
        f"{r.get('total_s', float('nan')):>10.1f}" for r in runs.values()))
    lines.append(f"{'test accuracy':<15}" + "".join(
        f"{(r.get('test') or {}).get('accuracy') or float('nan'):>10.3f}" for r in runs.values()))
    return "\n".join(lines)


PHASES = ("process_start", "prepare", "startup", "compile", "train", "validation", "checkpoints",
          "calibration", "other", "test_evaluation")


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    result = {"machine": machine(), "epochs": args.epochs, "batch_size": args.batch_size,
              "grain_workers": args.workers, "config": os.path.relpath(args.config, REPO),
              "overrides": args.set, "dry_run": args.dry_run, "goal_s": args.goal, "runs": {}}

    def write():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    raw = raw_data(args, result)
    write()
    for kind in args.runs:
        one_run(args, kind, raw, result, write)
    print(format_table(result))
    print(f"result: {args.out}")
    return result


if __name__ == "__main__":
    main()
