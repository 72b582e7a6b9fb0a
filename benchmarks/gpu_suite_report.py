"""Helpers of benchmarks/gpu_suite.sh: the environment report first, the summary last.

    python benchmarks/gpu_suite_report.py versions OUT.json
    python benchmarks/gpu_suite_report.py cache CACHE_DIR > before.json
    python benchmarks/gpu_suite_report.py largest RESULT.json FRACTION
    python benchmarks/gpu_suite_report.py summary OUTDIR WORKDIR BATCH CPU_TEST_ACCURACY

``versions`` prints (and writes) the version of every package the suite uses, where each comes
from, the devices JAX sees and the CPU count; it exits 1 when a package does not import, so the
suite stops before any long step. ``largest`` predicts, from the peak memory of one measured batch,
the largest global batch (a multiple of 64) that fits when JAX may take FRACTION of the GPU's
memory, and prints it with 3/4 of it as a fallback. ``summary`` gathers the suite's JSON results
into one object: throughput at each batch, the PyTorch ratios, the demo runs' checks, the
pipeline alone, the trace summary and the goals met or not.
"""

import glob
import importlib
import json
import math
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxmm import paths  # noqa: E402

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "tensorflow_datasets",
            "array_record", "transformers", "tokenizers", "huggingface_hub", "ml_collections",
            "tensorboardX", "numpy", "PIL", "sklearn", "matplotlib", "torch")
GOALS = {"e2e_samples_per_s": 5000, "pipeline_samples_per_s": 6000, "vs_original": 3.0,
         "vs_tuned": 1.2}


def versions(out_path: str) -> int:
    """Writes versions.json; returns 1 when a package is missing."""
    res = {"python": platform.python_version(), "cpus": os.cpu_count(), "packages": {}}
    missing = []
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
            res["packages"][name] = f"MISSING ({type(e).__name__}: {e})"
            missing.append(name)
            continue
        res["packages"][name] = {"version": getattr(mod, "__version__", "?"),
                                 "from": os.path.dirname(getattr(mod, "__file__", "") or "")}
    if "jax" not in missing:
        import jax

        res["jax_backend"] = jax.default_backend()
        res["devices"] = [d.device_kind for d in jax.devices()]
    if "torch" not in missing:
        import torch

        res["torch_cuda"] = {"available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    res["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    for name, v in res["packages"].items():
        print(f"{name:<20} {v['version']:<14} {v['from']}" if isinstance(v, dict) else
              f"{name:<20} {v}")
    print(json.dumps({k: v for k, v in res.items() if k != "packages"}))
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    return 1 if missing else 0


def _load(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def throughput(out: str) -> dict:
    """Every jax_bf16_b<B>.json: step alone, end to end, memory, compile, MFU."""
    keys = ("samples_per_s", "step_time_ms", "e2e_samples_per_s", "e2e_thread_samples_per_s",
            "e2e_num_workers",
            "compile_s", "peak_memory_bytes", "mfu", "mfu_xla_count", "device_kind")
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "jax_bf16_b*.json"))):
        res = _load(path)
        if res:
            rows[res["global_batch"]] = {k: res.get(k) for k in keys}
    return rows


def demo_checks(work: str, name: str, cpu_accuracy: float) -> dict | None:
    """Status, finite losses and test accuracy (vs the CPU number) of one demo run."""
    workdir = os.path.join(work, name)
    summary = _load(os.path.join(workdir, paths.SUMMARY_FILE))
    if summary is None:
        return None
    from jaxmm.trained.workdir import Workdir

    wd = Workdir(workdir)
    losses = []
    try:
        with open(wd.file(paths.METRICS_FILE), encoding="utf-8") as f:
            losses = [json.loads(line).get("loss") for line in f if line.strip()]
    except OSError:
        pass
    finite = all(x is None or math.isfinite(x) for x in losses)
    test_dir = wd.eval_dir("test", "best", 0)  # what the suite's evaluate wrote
    test = _load(os.path.join(test_dir, paths.EVAL_METRICS_FILE)) or {}
    acc = test.get("accuracy")
    return {"status": summary.get("status"), "compile_seconds": summary.get("compile_seconds"),
            "losses_finite": finite, "test_accuracy": acc,
            "test_accuracy_ok": acc is not None and abs(acc - cpu_accuracy) <= 0.05}


def largest_batches(result: dict, fraction: float, margin: float = 0.08) -> list[int]:
    """[predicted largest batch, 3/4 of it] from one run's peak memory (train_throughput JSON).

    Memory ~ fixed + batch x per-sample. The fixed part is the train state (params and two AdamW
    moments) plus one more copy for the gradients; the rest of the peak scales with the batch.
    The limit is the run's bytes_limit rescaled from its fraction (XLA_PYTHON_CLIENT_MEM_FRACTION,
    0.75 by default) to ``fraction``, less ``margin`` for fragmentation and workspaces.
    """
    peak, limit = result.get("peak_memory_bytes"), result.get("memory_limit_bytes")
    state, batch = result.get("state_bytes") or 0, result["global_batch"]
    if not isinstance(peak, int) or not isinstance(limit, int):
        return []
    fixed = state * 4 / 3
    per_sample = max(peak - fixed, 1) / batch
    ran_at = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    usable = limit / ran_at * fraction * (1 - margin) - fixed
    best = int(usable / per_sample) // 64 * 64
    return [b for b in (best, best * 3 // 4 // 64 * 64) if b > batch]


def cache_entries(cache_dir: str) -> list[str]:
    """File names in a JAX compilation cache folder (empty when there is none)."""
    return sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []


def summary(out: str, work: str, batch: int, cpu_accuracy: float) -> dict:
    """The suite's results in one object (printed by the suite, written as summary.json)."""
    s = {"dry_run": os.environ.get("DRY_RUN") == "1",  # tiny sizes: the numbers mean nothing
         "goals": GOALS, "throughput_bf16": throughput(out)}
    torch_res = _load(os.path.join(out, f"torch_bf16_b{batch}.json")) or {}
    for mode in ("original", "tuned"):
        if mode in torch_res:
            s[f"torch_{mode}_samples_per_s"] = torch_res[mode]["samples_per_s"]
    # The goal ratios: jaxmm's step as training runs it (its own process, the suite's first
    # full-model measurement) over each PyTorch mode of the same suite run on the same GPU.
    main = s["throughput_bf16"].get(batch, {})
    s["ratios"] = {f"jaxmm_vs_{m}": round(main["samples_per_s"] / torch_res[m]["samples_per_s"], 3)
                   for m in ("original", "tuned") if m in torch_res and main.get("samples_per_s")}
    if "ratios" in torch_res:  # torch_reference --compare: jaxmm inside the PyTorch process too
        s["ratios_jaxmm_in_torch_process"] = torch_res["ratios"]
    fits = [b for b, r in s["throughput_bf16"].items() if r.get("samples_per_s")]
    s["largest_batch_run"] = max(fits) if fits else None
    s["demo"] = {n: demo_checks(work, n, cpu_accuracy)
                 for n in ("demo_bf16", "demo_fp32", "demo_bf16_again")}
    # The second start reads the first run's cache: every miss adds an entry to it.
    before = _load(os.path.join(out, "demo_cache_before.json")) or []
    after = cache_entries(os.path.join(work, "demo_bf16", paths.JAX_CACHE_DIR))
    s["demo"]["compile_cache"] = {"entries_before_second_start": len(before),
                                  "entries_added_by_second_start": len(set(after) - set(before))}
    pipe = _load(os.path.join(out, "pipeline.json")) or {}
    s["pipeline_alone_samples_per_s"] = {w: r.get("samples_per_s")
                                         for w, r in pipe.get("grain", {}).items()}
    s["trace"] = _load(os.path.join(out, "trace_summary.json"))
    demos = [s["demo"][n] or {} for n in ("demo_bf16", "demo_fp32")]
    again = s["demo"]["demo_bf16_again"] or {}
    workers = [w for w in s["pipeline_alone_samples_per_s"] if w != "0"]
    s["met"] = {"demos": all(d.get("status") == "finished" and d.get("losses_finite")
                             and d.get("test_accuracy_ok") for d in demos),
                "compile_cache": again.get("status") == "finished"
                and s["demo"]["compile_cache"]["entries_added_by_second_start"] == 0,
                "pipeline_alone": bool(workers) and max(
                    s["pipeline_alone_samples_per_s"][w] or 0 for w in workers)
                >= GOALS["pipeline_samples_per_s"],
                "e2e": (main.get("e2e_samples_per_s") or 0) >= GOALS["e2e_samples_per_s"],
                "vs_original": (s["ratios"].get("jaxmm_vs_original") or 0) >= GOALS["vs_original"],
                "vs_tuned": (s["ratios"].get("jaxmm_vs_tuned") or 0) >= GOALS["vs_tuned"]}
    return s


def main(argv: list[str]) -> int:
    """Dispatches the sub-commands of the module docstring."""
    if len(argv) == 2 and argv[0] == "cache":
        print(json.dumps(cache_entries(argv[1])))
        return 0
    if len(argv) == 3 and argv[0] == "largest":
        print(" ".join(map(str, largest_batches(_load(argv[1]) or {}, float(argv[2])))))
        return 0
    if len(argv) == 2 and argv[0] == "versions":
        return versions(argv[1])
    if len(argv) == 5 and argv[0] == "summary":
        print(json.dumps(summary(argv[1], argv[2], int(argv[3]), float(argv[4])), indent=1))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
