"""Training throughput of jaxmm: the pmapped train step alone, and end to end from prepared data.

    python benchmarks/train_throughput.py --dtype bfloat16 --batch_size 256 --out bf16.json
    python benchmarks/train_throughput.py --image_arch tiny --text_arch tiny --image_size 32 \
        --text_length 8 --batch_size 8 --steps 3 --warmup 1      # CPU smoke run
    python benchmarks/train_throughput.py --dtype bfloat16 --batch_size 256 \
        --batchnorm flax,fused --stem conv,space_to_depth --batchnorm_reps 10 --out ab.json

Default model: ResNet-50 at 224 px + DistilBERT (6 layers, 768 wide, vocabulary 30522) at text
length 32, random init (weights do not change the speed), concat fusion head, class-weighted
loss and the AdamW optimizer of training, built by the same ``jaxmm.training.setup`` functions.

Measured after warm-up, with one ``block_until_ready`` at the end of each timed window:
  (a) step: samples/s of the train step on device-resident synthetic batches;
  (b) e2e: samples/s from a prepared TFDS dataset through the real grain train pipeline and
      ``parallel.prefetch_to_device`` into the same compiled step (--prefetch_thread: with the
      prefetch in a background thread, or both ways one after the other). Without --dataset_dir
      a small synthetic dataset is generated (``jaxmm.data.synthetic``) and prepared
      (``jaxmm.data.prepared``).
Also: compile time (lower + compile), step time, peak device memory, the memory limit and the
train state's size (which ``gpu_suite_report.py largest`` turns into the largest batch), and MFU.
--compile_only stops after the compile: run with JAX_COMPILATION_CACHE_DIR set, it fills the
cache that a later measurement of the same step reads (benchmarks/gpu_suite.sh does so).
--batchnorm A,B (values of config.model.batchnorm), --stem C,D (config.model.stem) and/or
--attention E,F (config.model.attention) measure instead the step alone once per combination
(named like "fused+space_to_depth", only by the switches given more than one value), each
compiled with its own train state from the same initialisation, the windows interleaved (order
alternating) --batchnorm_reps times; it reports per combination the compile time, the first
step's metrics (the same model: they should agree), the median step time and the median of the
per-repetition ratios to the first.

FLOPs per sample: for the full model the analytic count, 3 x forward (forward + backward),
forward = 2 x 4.09 GMAC x (S/224)^2 (ResNet-50) + 2 x 42.5 M x L + 4 x L^2 x 768 x 6 (DistilBERT
matmuls + attention) = 32.8 GFLOP at S=224, L=32; otherwise XLA's count of the compiled step
(``cost_analysis()['flops']`` of one device's program / per-device batch). Both are reported:
on CPUs the two agree within 0.4 %, but on GPUs XLA leaves out the convolutions that run as cuDNN
custom calls (2.6 GFLOP per sample on one H200), so its count is no basis for an MFU there.
MFU = FLOPs/sample x samples/s / (devices x peak). Peaks (dense, per GPU, TFLOP/s): H100/H200 SXM
bf16 989, fp32 494.7 (TF32 tensor cores: XLA's default float32 precision on GPUs uses TF32;
strict fp32 without tensor cores is 67); H100 PCIe 756 / 378; A100 312 / 156. --peak_tflops
overrides; elsewhere (CPUs) MFU is "n/a".
"""

import argparse
import datetime
import functools
import gzip
import itertools
import json
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default as default_config  # noqa: E402
from jaxmm.data import builder, pipeline, prepared, synthetic  # noqa: E402
from jaxmm.models import batchnorm  # noqa: E402
from jaxmm.models import text as text_lib  # noqa: E402
from jaxmm.models.resnet import STEMS  # noqa: E402
from jaxmm.models.text import ATTENTIONS  # noqa: E402
from jaxmm.training import parallel  # noqa: E402
from jaxmm.training import setup as setup_lib

# Train counts of the real dataset (docs): the class weights have the real spread.
TRAIN_COUNTS = (2111, 4355, 1991, 1743)
FULL_VOCAB = 30522  # DistilBERT's (uncased) vocabulary
TINY_VOCAB = 1000
TRACE_STEPS = 5  # steady-state end-to-end steps traced after the timed window (--trace_dir)
# (device-kind substring, bf16 peak, fp32-as-TF32 peak) in TFLOP/s, dense; first match wins.
PEAK_TFLOPS = (("H200", 989.4, 494.7), ("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 417.5),
               ("H100", 989.4, 494.7), ("A100", 312.0, 156.0))


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image_arch", default="resnet50", choices=("resnet50", "tiny"))
    p.add_argument("--text_arch", default="distilbert", choices=("distilbert", "tiny"))
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--text_length", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch_size", type=int, default=128, help="global batch")
    p.add_argument("--num_devices", type=int, default=0, help="0 = all local devices")
    p.add_argument("--steps", type=int, default=30, help="timed steps per window")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each window")
    p.add_argument("--skip_e2e", action="store_true", help="only measure (a)")
    p.add_argument("--prefetch_thread", default="off", choices=("off", "on", "both"),
                   help="(b) with prefetch_to_device(thread=...): off, on, or both one after "
                        "the other (the second as e2e_thread_*)")
    p.add_argument("--dataset_dir", default="", help="prepared TFDS dataset dir for (b)")
    p.add_argument("--work_dir", default="", help="where (b) keeps its synthetic dataset")
    p.add_argument("--per_class", type=int, default=0, help="synthetic size; 0 = from batch")
    p.add_argument("--stored_image_size", type=int, default=0, help="0 = image_size * 8 / 7")
    p.add_argument("--raw_max_side", type=int, default=0,
                   help="longest side of the generated raw images; 0 = 2 x stored size")
    p.add_argument("--compile_only", action="store_true",
                   help="compile the step (filling JAX_COMPILATION_CACHE_DIR when set), then stop")
    p.add_argument("--hlo_out", default="",
                   help="write the compiled step's optimized HLO here (gzipped text), which "
                        "benchmarks/trace_summary.py --hlo uses to attribute kernels")
    p.add_argument("--prepare_only", action="store_true",
                   help="generate and prepare the dataset of (b) under --work_dir, then stop")
    p.add_argument("--num_workers", type=int, default=-1, help="grain workers; -1 = config's")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak for MFU")
    p.add_argument("--trace_dir", default="",
                   help=f"keep a jax.profiler trace of {TRACE_STEPS} end-to-end steps here")
    p.add_argument("--batchnorm", default="flax",
                   help="config.model.batchnorm; several, comma-separated: timed side by side")
    p.add_argument("--stem", default="conv",
                   help="config.model.stem; several, comma-separated: timed side by side")
    p.add_argument("--attention", default="transformers",
                   help="config.model.attention; several, comma-separated: timed side by side")
    p.add_argument("--batchnorm_reps", type=int, default=5,
                   help="interleaved repetitions of --steps steps per compared combination")
    p.add_argument("--out", default="", help="also write the JSON result here")
    args = p.parse_args(argv)
    for flag, allowed in (("batchnorm", batchnorm.IMPLEMENTATIONS), ("stem", STEMS),
                          ("attention", ATTENTIONS)):
        bad = [v for v in getattr(args, flag).split(",") if v not in allowed]
        if bad:  # one line (argparse's usage error), before any compile
            p.error(f"--{flag}: {bad[0]!r} is not one of {', '.join(allowed)}")
    return args


def model_variants(args) -> dict[str, dict]:
    """name -> config.model overrides, one per combination of the --batchnorm, --stem and
    --attention values; named by the switches given several values ("fused+space_to_depth")."""
    choices = {"batchnorm": args.batchnorm.split(","), "stem": args.stem.split(","),
               "attention": args.attention.split(",")}
    varied = [k for k, v in choices.items() if len(v) > 1]
    out = {}
    for combo in itertools.product(*choices.values()):
        values = dict(zip(choices, combo, strict=True))
        out["+".join(values[k] for k in varied) or values["batchnorm"]] = values
    return out


def select_devices(n: int) -> list:
    """Restricts JAX to its first ``n`` local devices (0 = all); works before JAX starts."""
    if n:
        try:
            jax.config.update("jax_cuda_visible_devices", ",".join(map(str, range(n))))
            if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
                jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:
            pass  # JAX is already running (in-process callers): check the count below
    devices = jax.local_devices()
    if n and len(devices) != n:
        raise ValueError(f"--num_devices={n} but JAX already runs on {len(devices)} devices; "
                         "pass it on the command line of a fresh process")
    return devices


def make_config(args):
    """The default config with the benchmark's sizes (random init, no pretrained)."""
    c = default_config.get_config()
    c.model.image_arch, c.model.text_arch = args.image_arch, args.text_arch
    c.model.image_pretrained = c.model.text_pretrained = ""
    c.model.dtype = args.dtype
    c.model.batchnorm = args.batchnorm.split(",")[0]
    c.model.stem = args.stem.split(",")[0]
    c.model.attention = args.attention.split(",")[0]
    c.image_size, c.max_text_length = args.image_size, args.text_length
    c.stored_image_size = args.stored_image_size or math.ceil(args.image_size * 8 / 7)
    c.batch_size = args.batch_size
    c.tokenizer = ""  # (b) trains a WordPiece tokenizer on the synthetic texts
    if args.num_workers >= 0:
        c.num_workers = args.num_workers
    return c


def vocab_size(config) -> int:
    return FULL_VOCAB if config.model.text_arch == "distilbert" else TINY_VOCAB


def build_state(config, num_classes: int = len(TRAIN_COUNTS)):
    """Replicated train state and pmapped train step, built exactly as the training loop builds
    them (``jaxmm.training.setup``), with the real dataset's class-weight spread."""
    model = setup_lib.make_model(config, num_classes, vocab_size(config))
    tx = setup_lib.make_optimizer(config, model, steps_per_epoch=100, total_steps=10_000)
    variables = setup_lib.init_variables(config, model, log=lambda line: None)
    weights = setup_lib.class_weights(config, list(synthetic.CLASSES),
                                     dict(zip(synthetic.CLASSES, TRAIN_COUNTS, strict=True)))
    state = setup_lib.replicated_state(model, tx, variables)
    return state, setup_lib.train_step_fn(config, weights)


def synthetic_batches(config, global_batch: int, count: int = 2, seed: int = 0) -> list:
    """``count`` random host batches with the pipeline's shapes and dtypes."""
    rng = np.random.default_rng(seed)
    s, n, length = config.image_size, global_batch, config.max_text_length
    out = []
    for _ in range(count):
        lengths = rng.integers(3, length + 1, n)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        out.append({"image": rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
                    "input_ids": (rng.integers(1, TINY_VOCAB, (n, length)) * mask).astype(
                        np.int32),
                    "attention_mask": mask,
                    "label": rng.integers(0, len(TRAIN_COUNTS), n).astype(np.int32)})
    return out


class _ListIterator:
    """A list as the iterator ``parallel.prefetch_to_device`` expects (with get_state)."""

    def __init__(self, items):
        self._it = iter(items)

    def __next__(self):
        return next(self._it)

    def get_state(self):
        return None


def to_devices(host_batches: list) -> list:
    """Places host batches exactly as the training loop does (sharded over the local devices)."""
    return [b for b, _ in parallel.prefetch_to_device(_ListIterator(host_batches))]


def run_steps(step, state, batches, key, n: int):
    """Runs ``n`` steps; one host sync at the end. Returns (state, seconds)."""
    start = time.perf_counter()
    metrics = None
    for i in range(n):
        state, metrics = step(state, next(batches) if hasattr(batches, "__next__")
                              else batches[i % len(batches)], key)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - start


def compile_step(train_fn, state, batch, key):
    """AOT-compiles the step; returns (compiled, seconds, XLA FLOPs of one device or None)."""
    start = time.perf_counter()
    compiled = train_fn.lower(state, batch, key).compile()
    seconds = time.perf_counter() - start
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost["flops"]) if cost and cost.get("flops", 0) > 0 else None
    except Exception:  # noqa: BLE001 - cost analysis is optional on some backends
        flops = None
    return compiled, seconds, flops


def analytic_flops_per_sample(config) -> float | None:
    """Train FLOPs per sample of the full model (module docstring); None for tiny towers."""
    if config.model.image_arch != "resnet50" or config.model.text_arch != "distilbert":
        return None
    length, dim, layers = config.max_text_length, 768, 6
    image = 2 * 4.09e9 * (config.image_size / 224) ** 2
    text = 2 * 42.5e6 * length + 4 * length**2 * dim * layers
    return 3 * (image + text)


def peak_tflops(device, dtype: str, override: float) -> tuple[float | None, str]:
    """Per-device dense peak for the MFU, and where the number comes from."""
    if override > 0:
        return override, "--peak_tflops"
    for name, bf16, tf32 in PEAK_TFLOPS:
        if device.platform == "gpu" and name.lower() in device.device_kind.lower():
            kind = "bf16 dense" if dtype == "bfloat16" else "TF32 dense (fp32 default precision)"
            return (bf16 if dtype == "bfloat16" else tf32), f"{name} {kind}"
    return None, "unknown for this device"


def memory_stat(devices, key: str = "peak_bytes_in_use") -> int | str:
    """Largest ``key`` of the devices' memory_stats() (peak_bytes_in_use, bytes_limit), or
    'n/a' where JAX does not track it (CPUs)."""
    values = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - not implemented on some backends
            stats = None
        if stats and key in stats:
            values.append(int(stats[key]))
    return max(values) if values else "n/a"


def state_bytes(state) -> int:
    """Bytes of one replica of the train state (params, batch stats, optimizer state)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(state) if hasattr(x, "nbytes")))


def measure_step(args, config, devices) -> tuple[dict, object]:
    """Part (a) plus compile time and FLOPs. Returns (results, context for part (b))."""
    state, train_fn = build_state(config)
    key = parallel.put_replicated(jax.random.PRNGKey(config.seed))
    batches = to_devices(synthetic_batches(config, args.batch_size))
    compiled, compile_s, flops = compile_step(train_fn, state, batches[0], key)
    if args.hlo_out:  # kernel names in a trace are those of this HLO's fusions
        with gzip.open(args.hlo_out, "wt", encoding="utf-8") as f:
            f.write(compiled.as_text())
    if args.compile_only:
        return {"compile_s": round(compile_s, 2), "state_bytes": state_bytes(state)}, None
    state, _ = run_steps(compiled, state, batches, key, max(args.warmup, 1))
    state, seconds = run_steps(compiled, state, batches, key, args.steps)
    per_device = args.batch_size // len(devices)
    res = {"compile_s": round(compile_s, 2),
           "step_time_ms": round(1000 * seconds / args.steps, 3),
           "samples_per_s": round(args.steps * args.batch_size / seconds, 2),
           "flops_per_sample_xla": flops / per_device if flops else None,
           "flops_per_sample_analytic": analytic_flops_per_sample(config),
           "state_bytes": state_bytes(state)}
    return res, (compiled, state, key)


def _median(values) -> float:
    return float(np.median(np.asarray(values)))


def attention_parity(config) -> dict | str:
    """Where the fused attention would run cuDNN's kernel: its output against XLA's for the
    same random bf16 query/key/value of the text tower's shape (global batch x length, 12
    heads of 64) and random row lengths, as max and mean absolute difference; else 'n/a'."""
    dtype = jnp.dtype(config.model.dtype)
    if text_lib.attention_implementation(dtype) != "cudnn":
        return f"n/a (XLA's attention on {jax.default_backend()} in {dtype})"
    rng = np.random.default_rng(0)
    b, length = config.batch_size, config.max_text_length
    q, k, v = (jnp.asarray(rng.normal(size=(b, length, 12, 64)), dtype) for _ in range(3))
    lengths = jnp.asarray(rng.integers(1, length + 1, b), jnp.int32)
    out = {impl: np.asarray(jax.jit(functools.partial(
        jax.nn.dot_product_attention, key_value_seq_lengths=lengths, implementation=impl))(
            q, k, v), np.float32) for impl in ("cudnn", "xla")}
    diff = np.abs(out["cudnn"] - out["xla"])
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_abs_value": float(np.abs(out["xla"]).max())}


def compare_variants(args, config, variants: dict[str, dict]) -> dict:
    """The step alone once per variant (``config.model`` overrides), timed in interleaved
    windows (order alternating per repetition), so that drift on the machine hits every
    variant alike."""
    key = parallel.put_replicated(jax.random.PRNGKey(config.seed))
    runs = {}
    for name, overrides in variants.items():
        c = config.copy_and_resolve_references()
        c.model.update(overrides)
        state, train_fn = build_state(c)
        batches = to_devices(synthetic_batches(c, args.batch_size))
        compiled, compile_s, _ = compile_step(train_fn, state, batches[0], key)
        state, metrics = compiled(state, batches[0], key)
        first = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        state, _ = run_steps(compiled, state, batches, key, max(args.warmup, 1))
        runs[name] = dict(step=functools.partial(run_steps, compiled), state=state,
                          batches=batches, compile_s=round(compile_s, 2), first=first, ms=[])
    variants = list(variants)
    for rep in range(args.batchnorm_reps):
        for name in variants if rep % 2 == 0 else variants[::-1]:
            r = runs[name]
            r["state"], seconds = r["step"](r["state"], r["batches"], key, args.steps)
            r["ms"].append(1000 * seconds / args.steps)
    base = runs[variants[0]]["ms"]
    out = {}
    for name in variants:
        ms = runs[name]["ms"]
        out[name] = {"compile_s": runs[name]["compile_s"],
                     "first_step_metrics": runs[name]["first"],
                     "step_time_ms_median": round(_median(ms), 3),
                     "step_time_ms": [round(t, 3) for t in ms],
                     "samples_per_s_median": round(args.batch_size * 1000 / _median(ms), 2),
                     f"ratio_to_{variants[0]}_median": round(_median(
                         [t / b for t, b in zip(ms, base, strict=True)]), 4)}
    return out


def prepared_dataset(args, config) -> str:
    """--dataset_dir, or a synthetic dataset generated and prepared once under --work_dir."""
    if args.dataset_dir:
        return args.dataset_dir
    root = args.work_dir or tempfile.mkdtemp(prefix="jaxmm_throughput_")
    raw = os.path.join(root, "raw")
    # Enough train examples for two global batches per epoch (train ~ 4 x per_class).
    per_class = args.per_class or max(8, args.batch_size // 2)
    if not builder.has_dataset(raw):
        synthetic.generate(raw, per_class, seed=0,
                           max_side=args.raw_max_side or 2 * config.stored_image_size)
    ds_dir, _ = prepared.prepare(raw, os.path.join(root, "prepared"),
                                 stored_image_size=config.stored_image_size, log=lambda s: None)
    return ds_dir


def measure_e2e(args, config, context, *, thread: bool = False,
                trace: bool = True) -> tuple[dict, tuple]:
    """Part (b): grain pipeline -> prefetch_to_device (in a thread with ``thread``) -> the
    compiled step; with ``trace`` and --trace_dir, a profile of TRACE_STEPS more steps.
    Returns (results, context with the new state: the step donates the one it is given)."""
    compiled, state, key = context
    trace = trace and bool(args.trace_dir)
    ds_dir = prepared_dataset(args, config)
    tokenizer = prepared.get_tokenizer(config, ds_dir)
    source = pipeline.load_splits(ds_dir)["train"]
    per_epoch = len(source) // args.batch_size
    total = args.warmup + args.steps + (TRACE_STEPS if trace else 0)
    it = pipeline.make_train_iter(
        config, source, tokenizer, local_batch_size=args.batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_epochs=math.ceil(total / max(per_epoch, 1)) + 1)
    prefetch = parallel.prefetch_to_device(it, config.prefetch_batches, thread=thread)
    try:
        batches = (b for b, _ in prefetch)
        state, _ = run_steps(compiled, state, batches, key, max(args.warmup, 1))
        state, seconds = run_steps(compiled, state, batches, key, args.steps)
        if trace:
            # The perfetto JSON (perfetto_trace.json.gz) is what benchmarks/trace_summary.py reads.
            # Python function tracing would slow the host (the input side) several times over.
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level, options.host_tracer_level = 0, 1
            with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True,
                                    profiler_options=options):
                state, _ = run_steps(compiled, state, batches, key, TRACE_STEPS)
    finally:
        prefetch.close()  # stops a prefetch thread before its iterator goes
        if hasattr(it, "close"):
            it.close()
    res = {"e2e_samples_per_s": round(args.steps * args.batch_size / seconds, 2),
           "e2e_step_time_ms": round(1000 * seconds / args.steps, 3),
           "e2e_num_workers": config.num_workers, "e2e_train_examples": len(source),
           "e2e_stored_image_size": config.stored_image_size}
    return res, (compiled, state, key)


def _mfu(res: dict, devices, args) -> dict:
    peak, source = peak_tflops(devices[0], args.dtype, args.peak_tflops)
    # The analytic count first: on GPUs XLA's cost analysis leaves out the convolutions that run
    # as cuDNN custom calls (2.6 of 32.8 GFLOP per sample counted on one H200).
    flops = res["flops_per_sample_analytic"] or res["flops_per_sample_xla"]
    out = {"peak_tflops_per_device": peak, "peak_source": source,
           "flops_per_sample_used": "analytic" if res["flops_per_sample_analytic"] else "xla",
           "mfu": "n/a", "mfu_xla_count": "n/a"}
    if peak and flops:
        total = peak * 1e12 * len(devices)
        out["mfu"] = round(flops * res["samples_per_s"] / total, 4)
        if res["flops_per_sample_xla"]:
            out["mfu_xla_count"] = round(
                res["flops_per_sample_xla"] * res["samples_per_s"] / total, 4)
    return out


def run(args) -> dict:
    """Runs the benchmark described by parsed ``args``; returns the result dict."""
    if args.prepare_only:
        return {"benchmark": "train_throughput", "dataset_dir":
                prepared_dataset(args, make_config(args))}
    parallel.configure_xla()  # the XLA flags of a training run (before JAX starts a backend)
    devices = select_devices(args.num_devices)
    if args.batch_size % len(devices):
        raise ValueError(f"--batch_size={args.batch_size} must be a multiple of the "
                         f"{len(devices)} devices")
    config = make_config(args)
    res = {"benchmark": "train_throughput", "framework": "jax", "jax_version": jax.__version__,
           "device_kind": devices[0].device_kind, "platform": devices[0].platform,
           "num_devices": len(devices), "image_arch": args.image_arch,
           "text_arch": args.text_arch, "image_size": args.image_size,
           "text_length": args.text_length, "dtype": args.dtype,
           "global_batch": args.batch_size, "steps": args.steps, "warmup": args.warmup,
           "batchnorm": args.batchnorm, "date": datetime.date.today().isoformat()}
    res["stem"], res["attention"] = args.stem, args.attention
    variants = model_variants(args)
    if len(variants) > 1:
        res.update(steps_per_rep=args.steps, reps=args.batchnorm_reps,
                   variant_compare=compare_variants(args, config, variants))
        if "fused" in args.attention.split(","):  # the GPU kernel against its fallback
            res["attention_cudnn_vs_xla"] = attention_parity(config)
        return res
    step_res, context = measure_step(args, config, devices)
    res.update(step_res)
    if args.compile_only:
        return res
    res["peak_memory_bytes"] = memory_stat(devices)
    res["memory_limit_bytes"] = memory_stat(devices, "bytes_limit")
    if not args.skip_e2e:
        if args.prefetch_thread in ("off", "both"):
            plain, context = measure_e2e(args, config, context)
            res.update(plain)
        if args.prefetch_thread in ("on", "both"):
            threaded, context = measure_e2e(args, config, context, thread=True,
                                            trace=args.prefetch_thread == "on")
            if args.prefetch_thread == "on":
                res.update(threaded)
            else:  # both: the threaded window next to the plain one
                res["e2e_thread_samples_per_s"] = threaded["e2e_samples_per_s"]
                res["e2e_thread_step_time_ms"] = threaded["e2e_step_time_ms"]
        res["e2e_prefetch_thread"] = args.prefetch_thread
    res.update(_mfu(res, devices, args))
    return res


def format_table(res: dict) -> str:
    """A readable two-column table of a result dict."""
    res = dict(res)
    for name, r in res.pop("variant_compare", {}).items():  # one row per variant and figure
        res.update({f"{name}.{k}": v for k, v in r.items()
                    if k not in ("step_time_ms", "first_step_metrics")})
        res[f"{name}.first_step_weighted_ce"] = r["first_step_metrics"].get("weighted_ce")
    width = max(len(k) for k in res)
    lines = []
    for k, v in res.items():
        if isinstance(v, float) and k.startswith("flops"):
            v = f"{v / 1e9:.2f} GFLOP"
        elif k.endswith("_bytes") and isinstance(v, int):
            v = f"{v / 2**30:.2f} GiB"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Parses flags, runs, prints one JSON line and a table, writes --out."""
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    args = parse_args(argv)
    res = run(args)
    emit(res, format_table(res), args.out)
    return res


def emit(res: dict, table: str, out: str) -> None:
    """Prints the JSON line and the table; writes the JSON to ``out`` when given."""
    print(json.dumps(res))
    print(table)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
