"""What one train step communicates: the all-reduces of the pmapped step, counted from its HLO.

    python benchmarks/comm_count.py --devices 8 --out comm.json          # full model, bf16
    python benchmarks/comm_count.py --config demo --devices 8            # the demo's tiny towers

The step is lowered, not compiled or run, on fake CPU devices, and the PRE-optimisation HLO is
read: it holds every collective the program asks for, before a backend combines them (XLA's
GPU all-reduce combiner merges small all-reduces up to
``--xla_gpu_all_reduce_combine_threshold_bytes``; the CPU compiler does other things), so the
counts hold for any backend. The state is
abstract (``jax.eval_shape``): no weights are made or downloaded, and the full model lowers in
seconds.

Every all-reduce is sorted by where it comes from (the name stack of its HLO metadata):
``batchnorm_forward`` / ``batchnorm_backward`` (the synchronised BatchNorm statistics and their
gradient, one each per layer and micro-batch), ``gradients`` (the psum of the gradients),
``batch_stats`` (the pmean of the running averages after the step), ``loss`` (the psum of the
loss weight and the metrics). Each BatchNorm setting of ``config.batchnorm_sync`` is counted
("global" and "device" by default). Gradients are reduced in float32 (the parameters' dtype);
the bytes a bfloat16 reduction would move are given alongside (half), not implemented.
Results: JSON (--out) and a Markdown table on stdout; docs/scaling.md turns them into times.
"""

import argparse
import os
import re
import sys

if __name__ == "__main__":  # fake devices must be set before JAX starts
    _n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), None)
    if _n is None and "--devices" in sys.argv:
        _n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_n or 8}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import collections  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default as default_config  # noqa: E402
from configs import demo as demo_config  # noqa: E402
from jaxmm.training import setup as setup_lib  # noqa: E402
from jaxmm.training import steps  # noqa: E402

FULL_VOCAB = 30522  # DistilBERT's (uncased) vocabulary
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "pred": 1}
# "f32[2048]{0}" and tuples of them, before " all-reduce(".
_ALL_REDUCE = re.compile(r"=\s*(\(.*?\)|\S+)\s+all-reduce(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# {{0,1},{2,3}} (listed) or [2,2]<=[4] (iota form).
_GROUPS = re.compile(r"replica_groups=(\{(?:\{[^{}]*\},?)*\}|\[[^\]]*\]<=\[[^\]]*\])")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=("default", "demo"), default="default",
                   help="default: ResNet-50 + DistilBERT at 224 px / 32 tokens; demo: tiny")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (one pmap axis)")
    p.add_argument("--dtype", default="bfloat16", help="config.model.dtype (compute)")
    p.add_argument("--image_size", type=int, default=0, help="override (0 = the config's)")
    p.add_argument("--text_length", type=int, default=0, help="override (0 = the config's)")
    p.add_argument("--rows_per_device", type=int, default=2,
                   help="rows per device of the lowered step (the counts do not depend on it)")
    p.add_argument("--accumulate_steps", type=int, default=1)
    p.add_argument("--batchnorm_sync", nargs="+", default=["global", "device"])
    p.add_argument("--out", default="", help="write the JSON here")
    return p.parse_args(argv)


def make_config(args, batchnorm_sync: str):
    c = (demo_config if args.config == "demo" else default_config).get_config()
    c.model.image_pretrained = c.model.text_pretrained = ""
    c.model.dtype = args.dtype
    c.image_size = args.image_size or c.image_size
    c.max_text_length = args.text_length or c.max_text_length
    c.batch_size = args.rows_per_device * jax.device_count()
    c.accumulate_steps = args.accumulate_steps
    c.batchnorm_sync = batchnorm_sync
    return c


def lowered_hlo(config, num_classes: int = 4) -> tuple[str, dict]:
    """The pre-optimisation HLO text of the pmapped train step, and the model's sizes."""
    vocab = FULL_VOCAB if config.model.text_arch == "distilbert" else 1000
    model = setup_lib.make_model(config, num_classes, vocab)
    tx = setup_lib.make_optimizer(config, model, steps_per_epoch=100, total_steps=10_000)
    abstract = setup_lib.abstract_variables(config, model)
    state = jax.eval_shape(lambda v: steps.TrainState.create(
        apply_fn=model.apply, params=v["params"], batch_stats=v["batch_stats"], tx=tx), abstract)
    n = jax.local_device_count()
    rows = config.batch_size // n
    s, length = config.image_size, config.max_text_length
    batch = {"image": jax.ShapeDtypeStruct((n, rows, s, s, 3), jnp.uint8),
             "input_ids": jax.ShapeDtypeStruct((n, rows, length), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((n, rows, length), jnp.int32),
             "label": jax.ShapeDtypeStruct((n, rows), jnp.int32)}
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))  # unmapped, as the state
    step = setup_lib.train_step_fn(config, np.ones(num_classes, np.float32))
    hlo = step.lower(state, batch, key).as_text(dialect="hlo", debug_info=True)
    leaves = jax.tree.leaves(abstract["params"])
    sizes = {"params": int(sum(np.prod(x.shape) for x in leaves)), "param_arrays": len(leaves),
             "batch_stats": int(sum(np.prod(x.shape)
                                    for x in jax.tree.leaves(abstract["batch_stats"]))),
             "batchnorm_layers": len(jax.tree.leaves(abstract["batch_stats"])) // 2}
    return hlo, sizes


def _tensors(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _SHAPE.findall(shape_text)]


def category(op_name: str) -> str:
    """Where an all-reduce comes from, by the JAX name stack of its HLO metadata ("psum" for
    the step's own psums, told apart by ``classify``)."""
    if re.search(r"/(bn\d|downsample_bn)/", op_name):
        return "batchnorm_backward" if "transpose(" in op_name else "batchnorm_forward"
    return "psum"


def all_reduces(hlo: str) -> list[dict]:
    """One entry per all-reduce instruction: its tensors, bytes, groups and source."""
    out = []
    for line in hlo.splitlines():
        m = _ALL_REDUCE.search(line)
        if not m:
            continue
        tensors = _tensors(m.group(1))
        op_name = (_OP_NAME.search(line) or [None, ""])[1]
        groups = (_GROUPS.search(line) or [None, ""])[1]
        out.append({"tensors": tensors, "op_name": op_name, "replica_groups": groups,
                    "bytes": int(sum(DTYPE_BYTES.get(dt, 4) * int(np.prod(shape))
                                     for dt, shape in tensors))})
    return out


def classify(ops: list[dict], sizes: dict) -> list[dict]:
    """Names each all-reduce. The step's own psums come in program order: the loss weight, the
    gradients (one per parameter array), the running averages (one per BatchNorm statistic),
    the metrics (the scalars that are left)."""
    for op in ops:
        op["category"] = category(op["op_name"])
    plain = [op for op in ops if op["category"] == "psum"]
    n_grads, n_stats = sizes["param_arrays"], 2 * sizes["batchnorm_layers"]
    names = (["loss"] + ["gradients"] * n_grads + ["batch_stats"] * n_stats
             + ["loss"] * (len(plain) - 1 - n_grads - n_stats))
    if len(plain) < 1 + n_grads + n_stats:
        raise ValueError(f"{len(plain)} psums for {n_grads} gradients and {n_stats} statistics")
    for op, name in zip(plain, names, strict=True):
        op["category"] = name
    grad_elements = sum(int(np.prod(s)) for op in plain if op["category"] == "gradients"
                        for _, s in op["tensors"])
    if grad_elements != sizes["params"]:
        raise ValueError(f"the gradient psums hold {grad_elements} numbers, not the "
                         f"{sizes['params']} parameters")
    return ops


def summarise(ops: list[dict], sizes: dict, accumulate_steps: int = 1) -> dict:
    """Counts and bytes per step, per category and per (dtype, shape).

    The BatchNorm all-reduces of a micro-batch appear once in the program (the body of the
    accumulation loop) and run ``accumulate_steps`` times per step; they are counted so.
    """
    by_cat = collections.OrderedDict()
    for op in ops:
        runs = accumulate_steps if op["category"].startswith("batchnorm") else 1
        c = by_cat.setdefault(op["category"], {"all_reduces": 0, "tensors": 0, "bytes": 0,
                                              "shapes": collections.Counter()})
        c["all_reduces"] += runs
        c["tensors"] += runs * len(op["tensors"])
        c["bytes"] += runs * op["bytes"]
        for dt, shape in op["tensors"]:
            c["shapes"][f"{dt}[{','.join(map(str, shape))}]"] += runs
    for c in by_cat.values():
        c["shapes"] = dict(c["shapes"].most_common())
    grads = by_cat.get("gradients", {"bytes": 0})["bytes"]
    return {"all_reduces": sum(c["all_reduces"] for c in by_cat.values()),
            "tensors": sum(c["tensors"] for c in by_cat.values()),
            "bytes": sum(c["bytes"] for c in by_cat.values()), "by_category": by_cat,
            "gradient_bytes_bf16": grads // 2, "sizes": sizes,
            "replica_groups": sorted({op["replica_groups"] for op in ops})}


def count(args, batchnorm_sync: str) -> dict:
    hlo, sizes = lowered_hlo(make_config(args, batchnorm_sync))
    return summarise(classify(all_reduces(hlo), sizes), sizes, args.accumulate_steps)


def table(results: dict) -> str:
    """Markdown: one row per (setting, category)."""
    rows = ["| batchnorm_sync | source | all-reduces | tensors | bytes |", "|---|---|---|---|---|"]
    for sync, res in results["settings"].items():
        for cat, c in res["by_category"].items():
            rows.append(f"| {sync} | {cat} | {c['all_reduces']} | {c['tensors']} | "
                        f"{c['bytes']:,} |")
        rows.append(f"| {sync} | **total** | **{res['all_reduces']}** | {res['tensors']} | "
                    f"**{res['bytes']:,}** |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {"config": args.config, "devices": jax.device_count(), "dtype": args.dtype,
               "accumulate_steps": args.accumulate_steps,
               "settings": {s: count(args, s) for s in args.batchnorm_sync}}
    print(json.dumps(results))
    print(table(results))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
