"""jaxmm's train step against the tuned PyTorch loop: interleaved repetitions with their spread.

    python3 benchmarks/step_ratio.py --reps 5 --batch_size 256 --dtype bfloat16 \
        [--variant NAME=ARGS ...] [--steps 30] [--out ratio.json]
    python3 benchmarks/step_ratio.py --dry_run --reps 2        (tiny sizes, any CPU)

Each repetition runs, one process each and one after another on the same device, jaxmm's train
step alone (``train_throughput.py --skip_e2e``, once per ``--variant``) and the tuned PyTorch
loop (``torch_reference.py --modes tuned``: bf16 autocast, channels_last, torch.compile, fused
AdamW; frozen as first measured). The order rotates from one repetition to the next, so a slow
drift of the machine (clocks, temperature, a neighbour) does not favour one side. Separate
processes, because JAX measured inside the PyTorch process ran 28 % slower than alone (JAX
preallocates no memory there), which is not what a training run gets. Compiles come from the
caches (``JAX_COMPILATION_CACHE_DIR``, default WORK/jax_cache, and inductor's own), so only the
first repetition pays them.

A variant is a name and extra ``train_throughput.py`` flags, e.g. ``--variant flax=`` (the
default step) and ``--variant fused="--batchnorm fused"``. Reported per side: samples/s of every
repetition, median, min and max; per variant the ratio of medians over PyTorch, and the ratio
of each repetition's pair (its min and max say whether the lead holds every time), checked
against ``--goal`` (1.2). The JSON result is rewritten after every process.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY = ["--image_arch", "tiny", "--text_arch", "tiny", "--image_size", "32",
        "--text_length", "8"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=256, help="global batch")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=30, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per process")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="a jaxmm variant: name and extra train_throughput.py flags")
    p.add_argument("--torch_args", default="",
                   help="extra torch_reference.py flags: the same change of the math as a "
                        "variant makes, e.g. '--attention_dropout 0' for attention='fused'")
    p.add_argument("--goal", type=float, default=1.2, help="jaxmm / tuned PyTorch, for the check")
    p.add_argument("--timeout", type=float, default=600.0, help="per process, seconds")
    p.add_argument("--work", default="", help="logs and the JAX cache (default: a temp folder)")
    p.add_argument("--dry_run", action="store_true", help="tiny towers, CPU, no torch.compile")
    p.add_argument("--out", default="", help="the JSON result (default WORK/step_ratio.json)")
    args = p.parse_args(argv)
    variants = {}
    for spec in args.variant or ["jaxmm="]:
        name, sep, extra = spec.partition("=")
        if not sep or not name or name == "torch" or name in variants:
            p.error(f"--variant {spec!r}: NAME=ARGS with a new name other than 'torch'")
        variants[name] = shlex.split(extra)
    args.variants = variants
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.dry_run:
        args.batch_size, args.steps, args.warmup = min(args.batch_size, 8), 2, 1
    args.work = args.work or tempfile.mkdtemp(prefix="step_ratio_")
    args.out = args.out or os.path.join(args.work, "step_ratio.json")
    return args


def commands(args) -> dict[str, list[str]]:
    """The command line of every side: each jaxmm variant and 'torch'."""
    sizes = ["--batch_size", str(args.batch_size), "--dtype", args.dtype, "--steps",
             str(args.steps), "--warmup", str(args.warmup)] + (TINY if args.dry_run else [])
    out = {name: [sys.executable, os.path.join(HERE, "train_throughput.py"), "--skip_e2e",
                  *sizes, *extra] for name, extra in args.variants.items()}
    out["torch"] = [sys.executable, os.path.join(HERE, "torch_reference.py"), "--modes",
                    "tuned", *sizes, *shlex.split(args.torch_args),
                    *(["--no_compile", "--device", "cpu"] if args.dry_run else [])]
    return out


def run_one(name: str, cmd: list[str], rep: int, args, env: dict) -> dict:
    """One process; returns its samples/s and step time (or its exit code and log)."""
    result_file = os.path.join(args.work, f"{name}_{rep}.json")
    log_file = os.path.join(args.work, f"{name}_{rep}.log")
    with open(log_file, "w") as log:
        try:
            rc = subprocess.run([*cmd, "--out", result_file], env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, timeout=args.timeout,
                                check=False).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    if rc != 0 or not os.path.exists(result_file):
        return {"exit": rc, "log": log_file}
    with open(result_file) as f:
        res = json.load(f)
    side = res.get("tuned", res)  # torch_reference nests its mode
    return {"samples_per_s": side["samples_per_s"], "step_time_ms": side["step_time_ms"],
            "device": res.get("device_kind") or res.get("device")}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def summarise(result: dict, goal: float) -> dict:
    """Medians, spreads and ratios of what has been measured so far."""
    reps = result["reps"]
    sides = list(result["commands"])  # the variants in their order, then torch
    rate = {name: [rep[name]["samples_per_s"] for rep in reps
                   if "samples_per_s" in rep.get(name, {})] for name in sides}
    out = {name: spread(v) for name, v in rate.items() if v}
    torch_ok = rate.get("torch")
    for name in sides[:-1]:
        pairs = [rep[name]["samples_per_s"] / rep["torch"]["samples_per_s"] for rep in reps
                 if "samples_per_s" in rep.get(name, {}) and "samples_per_s" in rep.get(
                     "torch", {})]
        if not (pairs and rate[name] and torch_ok):
            continue
        ratio = statistics.median(rate[name]) / statistics.median(torch_ok)
        out[f"{name}_vs_torch"] = {
            "ratio_of_medians": round(ratio, 3), "pair_ratios": spread(pairs),
            "goal": goal, "goal_met": ratio >= goal,
            "goal_met_in_every_pair": min(pairs) >= goal}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.work, "jax_cache"))
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    cmds = commands(args)
    order = list(cmds)
    result = {"batch_size": args.batch_size, "dtype": args.dtype, "steps": args.steps,
              "commands": {k: " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c
                                       for c in v[1:]) for k, v in cmds.items()},
              "dry_run": args.dry_run, "reps": []}

    def write():
        result["summary"] = summarise(result, args.goal)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for rep in range(args.reps):
        shift = rep % len(order)  # rotate who goes first
        result["reps"].append({})
        for name in order[shift:] + order[:shift]:
            result["reps"][-1][name] = run_one(name, cmds[name], rep, args, env)
            write()
    for name, s in result["summary"].items():
        if "median" in s:
            print(f"{name:<16} samples/s median {s['median']:.1f} "
                  f"(min {s['min']:.1f}, max {s['max']:.1f}, n={s['n']})")
        else:
            print(f"{name:<16} {s['ratio_of_medians']:.3f}x (pairs {s['pair_ratios']['min']:.3f}"
                  f"-{s['pair_ratios']['max']:.3f}); goal {s['goal']}x "
                  f"{'met' if s['goal_met'] else 'missed'}")
    print(f"result: {args.out}")
    return result


if __name__ == "__main__":
    main()
