"""Where the time of a traced window goes: GPU busy and idle time, and the kernels that fill it.

    python benchmarks/trace_summary.py TRACE_DIR_OR_FILE [--steps N] [--top K] [--out OUT.json]
        [--hlo STEP_HLO.txt.gz]

Reads the ``perfetto_trace.json.gz`` that ``jax.profiler.trace(..., create_perfetto_trace=True)``
writes (``benchmarks/train_throughput.py --trace_dir``; the newest one under a folder). For each
device process (``/device:GPU:N``) it takes the kernels and copies of its stream threads and
reports:
  - the window (first to last event of the whole trace) and the device's busy time (the union of
    its kernel intervals), so busy / window says whether the device waited for the host;
  - the idle gaps between kernels longer than 0.1 ms, summed (the host, the input pipeline or a
    host-device copy kept the GPU waiting), and the longest one;
  - time by kind of kernel (convolution, matrix product, copy, collective, other fused XLA code)
    and the top kernels by total time.
With ``--steps`` the per-step figures are given too, and, when the device ran the same number of
kernels in every step (the same compiled program), its step structure: kernels per step, the
short ones (< 20 us) and those run as a single thread block, and the update tail: the kernels
after the step's last convolution or matrix product (the optimizer update of every parameter and
what comes after it), with their busy time. With ``--hlo`` (the optimized HLO of the
traced step, ``train_throughput.py --hlo_out``) XLA's own kernels, which are named after their
HLO fusions, are traced back to the JAX code they came from: time by part of the program
(forward or backward of each tower, or outside the model: loss, gradient norm, optimizer) and by
kind of layer (the innermost module: bn, conv, Dense, ...). Library kernels (cuDNN, cuBLAS) carry
no HLO name in the trace and are counted under "library kernel". A trace without device
processes (a CPU run) yields the window and an empty device list.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

GAP_US = 100.0  # idle stretches shorter than this are launch latency, not waiting
SHORT_US = 20.0  # kernels shorter than this are mostly launch and tail, little work
_SINGLE_BLOCK = re.compile(r"\bgrid:1,1,1\b")
# Kinds of kernel by name, first match wins (cuDNN, cuBLAS/cuBLASLt/CUTLASS and XLA's own names).
KINDS = (("copy", re.compile(r"memcpy|memset|copy", re.I)),
         ("collective", re.compile(r"nccl|all-reduce|allreduce|all-gather|reduce-scatter", re.I)),
         ("convolution", re.compile(r"conv|cudnn|xmma_fprop|xmma_dgrad|xmma_wgrad|implicit_gemm|"
                                    r"fprop|dgrad|wgrad", re.I)),
         ("matmul", re.compile(r"gemm|cublas|cutlass|nvjet|matmul|dot", re.I)),
         ("fused XLA (elementwise, reductions, norms)", re.compile(r".")))


def find_trace(path: str) -> str:
    """The perfetto JSON itself, or the newest one below a trace folder."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}")
    return max(found, key=os.path.getmtime)


def load_events(path: str) -> list[dict]:
    """The trace's events (a Chrome trace object or bare list, gzipped or not)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data.get("traceEvents", []) if isinstance(data, dict) else data


_HLO_FUSION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")
# Name-stack entries of control flow and calls, not of Flax modules.
_NOT_MODULES = {"while", "body", "cond", "closed_call", "remat", "checkpoint", "train_step",
                "branch_0_fun", "branch_1_fun"}
_WRAPPER = re.compile(r"^(?:jit|pmap|xla_pmap|shard_map)\([^)]*\)$")


def load_hlo_names(path: str) -> dict[str, str]:
    """{kernel name: JAX op_name} from an optimized HLO text (gzipped or not). GPU kernels of
    XLA fusions carry the instruction's name with '.' written as '_'."""
    opener = gzip.open if path.endswith(".gz") else open
    names = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            m = _HLO_FUSION.match(line)
            if m:
                names[m.group(1).replace(".", "_")] = m.group(2)
    return names


def source_of(op_name: str) -> tuple[str, str]:
    """(part of the program, kind of layer) of one op_name, e.g.
    'jit(_fun)/transpose(jvp(Model))/image/layer1_0/bn1/mul' -> ('backward image', 'bn')."""
    parts = [p for p in op_name.split("/") if p]
    while parts and _WRAPPER.match(parts[0]):
        parts = parts[1:]
    if not parts or not parts[0].startswith(("jvp(", "transpose(jvp(")) or len(parts) < 3:
        return "outside the model (loss, gradient norm, optimizer)", "outside the model"
    part = ("backward " if parts[0].startswith("transpose(") else "forward ") + parts[1]
    modules = [p for p in parts[1:-1] if "(" not in p and p not in _NOT_MODULES]
    layer = re.sub(r"[_\d]+$", "", modules[-1]) if modules else parts[1]
    return part, layer or parts[1]


def by_source(kernels: list[dict], names: dict[str, str], top: int) -> dict:
    """Kernel time by part of the program and by kind of layer (see the module docstring)."""
    part, layer = collections.Counter(), collections.Counter()
    for e in kernels:
        op = names.get(e["name"])
        p, k = source_of(op) if op else ("library kernel", "library kernel")
        part[p] += e["dur"]
        layer[k] += e["dur"]
    total = sum(part.values()) or 1.0

    def table(counter):
        return {k: {"ms": round(v / 1e3, 3), "share": round(v / total, 4)}
                for k, v in counter.most_common(top)}

    return {"time_by_part": table(part), "time_by_layer_kind": table(layer)}


def kind_of(name: str) -> str:
    return next(kind for kind, pattern in KINDS if pattern.search(name))


def union(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Total covered length of (start, end) intervals, and the gaps between covered stretches."""
    covered, gaps, end = 0.0, [], None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gaps.append(s - end)
            covered += e - s
            end = e
        elif e > end:
            covered += e - end
            end = e
    return covered, gaps


def device_summary(events: list[dict], threads: dict, window_us: float, top: int,
                   hlo_names: dict | None = None, steps: int = 0) -> dict:
    """Busy time, gaps and kernel kinds of one device process's stream events."""
    streams = [e for e in events if "stream" in threads.get(e.get("tid"), "").lower()]
    kernels = streams or events  # traces that name no stream threads: all of the process
    busy, gaps = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    long_gaps = [g for g in gaps if g > GAP_US]
    by_kind, by_name = {}, {}
    for e in kernels:
        kind = kind_of(e["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"]
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + e["dur"]
    total = sum(by_kind.values()) or 1.0
    sources = by_source(kernels, hlo_names, top) if hlo_names else {}
    structure = step_structure(kernels, steps)
    return {**sources, "kernels": len(kernels), "busy_ms": round(busy / 1e3, 3),
            "busy_fraction": round(busy / window_us, 4) if window_us else None,
            "idle_gaps_over_0.1ms": len(long_gaps),
            "idle_in_gaps_over_0.1ms_ms": round(sum(long_gaps) / 1e3, 3),
            "longest_gap_ms": round(max(gaps, default=0.0) / 1e3, 3),
            "time_by_kind": {k: {"ms": round(v / 1e3, 3), "share": round(v / total, 4)}
                             for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:120], "ms": round(v / 1e3, 3), "share": round(v / total, 4)}
                            for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]],
            **({"step_structure": structure} if structure else {})}


def step_structure(kernels: list[dict], steps: int) -> dict | None:
    """Per-step kernel counts and the update tail (module docstring), averaged over the steps;
    None unless the kernels split evenly into ``steps`` runs of the same program."""
    if steps < 1 or not kernels or len(kernels) % steps:
        return None
    kernels = sorted(kernels, key=lambda e: e["ts"])
    n = len(kernels) // steps
    tails, tail_ms, short, short_ms, single = [], 0.0, 0, 0.0, 0
    for i in range(steps):
        step = kernels[i * n:(i + 1) * n]
        products = [j for j, e in enumerate(step)
                    if kind_of(e["name"]) in ("convolution", "matmul")]
        tail = step[products[-1] + 1:] if products else []
        tails.append(len(tail))
        tail_ms += sum(e["dur"] for e in tail)
        for e in step:
            if e["dur"] < SHORT_US:
                short += 1
                short_ms += e["dur"]
            details = e.get("args", {}).get("kernel_details", "")
            single += bool(_SINGLE_BLOCK.search(details))
    return {"kernels_per_step": n,
            f"kernels_under_{SHORT_US:g}us_per_step": round(short / steps, 1),
            f"kernels_under_{SHORT_US:g}us_ms_per_step": round(short_ms / steps / 1e3, 3),
            "single_block_kernels_per_step": round(single / steps, 1),
            "update_tail_kernels_per_step": round(sum(tails) / steps, 1),
            "update_tail_busy_ms_per_step": round(tail_ms / steps / 1e3, 3)}


def summarize(events: list[dict], steps: int = 0, top: int = 10,
              hlo_names: dict | None = None) -> dict:
    """The whole summary (module docstring) of a list of trace events."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    start = min((e["ts"] for e in spans), default=0.0)
    window = max((e["ts"] + e["dur"] for e in spans), default=0.0) - start
    res = {"window_ms": round(window / 1e3, 3), "steps": steps or None, "devices": {}}
    for pid, name in sorted(processes.items()):
        if "/device:" not in name or "CPU" in name:
            continue
        own = [e for e in spans if e["pid"] == pid]
        own_threads = {tid: t for (p, tid), t in threads.items() if p == pid}
        if own:
            res["devices"][name] = device_summary(own, own_threads, window, top, hlo_names,
                                                  steps)
    if steps:
        res["window_ms_per_step"] = round(window / 1e3 / steps, 3)
        for dev in res["devices"].values():
            dev["busy_ms_per_step"] = round(dev["busy_ms"] / steps, 3)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="perfetto_trace.json.gz or a folder holding one")
    p.add_argument("--steps", type=int, default=0, help="train steps in the traced window")
    p.add_argument("--top", type=int, default=10, help="kernels listed by total time")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--hlo", default="", help="optimized HLO text of the traced step (.gz ok)")
    args = p.parse_args(argv)
    names = load_hlo_names(args.hlo) if args.hlo else None
    res = summarize(load_events(find_trace(args.trace)), args.steps, args.top, names)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"trace_summary: {e}")
