"""Predicted step time and efficiency per GPU on 1 to 8 nodes of 8 GPUs, from the counts of
``comm_count.py`` and the one-GPU step measured in docs/benchmarks.md. A model, not a
measurement: docs/scaling.md explains every term and where each assumption comes from.

    python benchmarks/comm_count.py --devices 8 --out comm.json
    python benchmarks/scaling_model.py comm.json [--step_ms 45.8 --rows 256]

Per step and GPU: T = T_compute + T_grad + T_bn + T_small, where
  T_grad  = 2 (n - 1) / n x gradient bytes / bus bandwidth  (+ one latency per combined bucket)
  T_bn    = BatchNorm all-reduces x latency (tiny, one after another, on the critical path)
  T_small = the loss and running-average all-reduces (one combined latency each)
and the gradient all-reduce is either fully exposed (upper bound: it waits for the whole
backward pass) or hidden behind the backward pass but for its last bucket (lower bound).
"""

import argparse
import json
import math

GPUS_PER_NODE = 8
# Bus bandwidth (nccl-tests' busBw) of an all-reduce of large buffers, bytes/s. One node:
# NCCL's effective NVLink 4 bandwidth with the ring algorithm, ~20 % below the 450 GB/s line
# rate (NCCL maintainer, NVIDIA/nccl-tests issue 212); NVLink SHARP reaches ~480 GB/s. Several
# nodes: the ring crosses the nodes over one 400 Gb/s NIC per GPU, so the node's 8 NICs
# (400 GB/s) bound the bus bandwidth; 90 % of line rate, as measured multi-node runs reach
# (NVIDIA/nccl-tests issue 119: 85-96 GB/s of a theoretical 100).
BUSBW_NVLINK = 370e9
BUSBW_NETWORK = 0.9 * GPUS_PER_NODE * 400e9 / 8
# Latency of one small all-reduce (assumed, to be measured with nccl-tests
# `all_reduce_perf -b 8 -e 64K`): NVLink within a node, and across nodes (grows with the
# number of nodes, as NCCL's tree has log2(nodes) levels).
LATENCY_NODE_S = 15e-6
LATENCY_NETWORK_S = 30e-6
LATENCY_PER_TREE_LEVEL_S = 5e-6
COMBINE_BYTES = 30 * 1024 * 1024  # XLA's default --xla_gpu_all_reduce_combine_threshold_bytes


def latency(nodes: int) -> float:
    """One small all-reduce over ``nodes`` nodes of 8 GPUs (seconds)."""
    if nodes <= 1:
        return LATENCY_NODE_S
    return LATENCY_NETWORK_S + LATENCY_PER_TREE_LEVEL_S * math.log2(nodes)


def step_time(setting: dict, gpus: int, step_s: float, *, gradient_bytes: int,
              bn_groups_in_node: bool, overlap: bool) -> float:
    """Predicted seconds per step on ``gpus`` GPUs (8 per node)."""
    if gpus == 1:
        return step_s
    nodes = max(1, gpus // GPUS_PER_NODE)
    busbw = BUSBW_NVLINK if nodes == 1 else min(BUSBW_NVLINK, BUSBW_NETWORK)
    buckets = math.ceil(gradient_bytes / COMBINE_BYTES)
    t_grad = 2 * (gpus - 1) / gpus * gradient_bytes / busbw + buckets * latency(nodes)
    if overlap:  # only the last bucket waits after the backward pass
        t_grad = t_grad / buckets
    cats = setting["by_category"]
    bn = sum(cats.get(k, {}).get("all_reduces", 0)
             for k in ("batchnorm_forward", "batchnorm_backward"))
    t_bn = bn * latency(1 if bn_groups_in_node else nodes)
    t_small = 2 * latency(nodes)  # the combined loss psum and running-average pmean
    return step_s + t_grad + t_bn + t_small


def predict(counts: dict, step_ms: float, rows: int, gpus=(1, 8, 16, 32, 64)) -> list[dict]:
    """Rows of (setting, gradient dtype, GPUs) -> step time, samples/s, efficiency per GPU."""
    out = []
    cases = [("global", "global", False), ("group:8", "global", True),
             ("device", "device", True)]
    for name, source, in_node in cases:
        setting = counts["settings"][source]
        grads = setting["by_category"]["gradients"]["bytes"]
        for dtype, nbytes in (("float32", grads), ("bfloat16", setting["gradient_bytes_bf16"])):
            for n in gpus:
                times = [step_time(setting, n, step_ms / 1e3, gradient_bytes=nbytes,
                                   bn_groups_in_node=in_node, overlap=o) for o in (False, True)]
                out.append({"batchnorm_sync": name, "gradients": dtype, "gpus": n,
                            "step_ms": [round(t * 1e3, 2) for t in times],
                            "samples_per_s": [round(n * rows / t) for t in times],
                            "efficiency": [round(step_ms / 1e3 / t, 3) for t in times]})
    return out


def table(rows: list[dict]) -> str:
    """Markdown; each cell 'exposed / overlapped'."""
    lines = ["| batchnorm_sync | gradients | GPUs | step ms | samples/s | efficiency per GPU |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ms, sps, eff = r["step_ms"], r["samples_per_s"], r["efficiency"]
        lines.append(f"| {r['batchnorm_sync']} | {r['gradients']} | {r['gpus']} | "
                     f"{ms[0]:.1f} / {ms[1]:.1f} | {sps[0]:,} / {sps[1]:,} | "
                     f"{eff[0]:.1%} / {eff[1]:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("counts", help="JSON written by comm_count.py (full model, 8 devices)")
    p.add_argument("--step_ms", type=float, default=45.8, help="measured one-GPU step")
    p.add_argument("--rows", type=int, default=256, help="rows per GPU of that step")
    args = p.parse_args(argv)
    with open(args.counts, encoding="utf-8") as f:
        rows = predict(json.load(f), args.step_ms, args.rows)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
