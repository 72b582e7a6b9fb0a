"""The train state with or without a device axis: the compiled pmapped step, the transfers of
its arguments, and the step time, side by side.

    python benchmarks/unmapped_state.py --devices 4 --reps 40 --out unmapped.json
    python benchmarks/unmapped_state.py --devices 4 --reps 0           # compiled programs only
    python benchmarks/unmapped_state.py --gpu --reps 40                # every local GPU

Two ways to hand the same train state to the same pmapped step (``steps.train_step`` of the
demo config, donated, on fake CPU devices):

  mapped    the state carries a leading device axis (one stacked copy per device), pmap's
            ``in_axes=0`` / ``out_axes=0``;
  unmapped  the state has its own shape and is placed once on every device (a replicated
            ``NamedSharding``), pmap's ``in_axes=None`` / ``out_axes=None`` for the state (and
            for the psummed metrics), as flax's ImageNet example does.

For each: the optimised HLO of the compiled step (entry parameters and their bytes, donated
parameters, and every copy, broadcast and collective, with the instructions that read an entry
parameter directly); whether steps run under ``jax.transfer_guard("disallow")`` (any host-to-
device or device-to-device copy of an argument raises), with the state as the step returned it
and, for contrast, as host arrays; whether the per-device copies of the returned state are equal
(pmap does not check an ``out_axes=None`` value); and the step time, the two variants
interleaved (alternating order) ``--reps`` times, ``--steps`` steps each.
Results: JSON (--out) and Markdown on stdout.
"""

import argparse
import os
import sys

if __name__ == "__main__" and "--gpu" not in sys.argv:  # fake devices, before JAX starts
    _n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), None)
    if _n is None and "--devices" in sys.argv:
        _n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_n or 4}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo as demo_config  # noqa: E402
from jaxmm.training import parallel, steps  # noqa: E402
from jaxmm.training import setup as setup_lib  # noqa: E402

NUM_CLASSES, VOCAB = 4, 400
VARIANTS = ("mapped", "unmapped")
# Instructions that copy or move data (async forms included).
KINDS = ("copy", "copy-start", "broadcast", "all-gather", "all-gather-start", "all-reduce",
         "all-reduce-start", "collective-permute", "collective-permute-start", "all-to-all",
         "reduce-scatter", "dynamic-slice", "dynamic-update-slice", "send", "recv")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(\S+|\(.*?\))\s+([\w\-]+)\((.*?)\)")
_PARAM = re.compile(r"^\s*(%?[\w.\-]+)\s*=\s*(\S+)\s+parameter\((\d+)\)")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "pred": 1,
          "u8": 1, "s8": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=4, help="fake CPU devices (one pmap axis)")
    p.add_argument("--gpu", action="store_true",
                   help="the machine's own devices (GPUs) instead of fake CPU devices")
    p.add_argument("--batch_size", type=int, default=16, help="global batch of the step")
    p.add_argument("--batchnorm_sync", default="global", help="config.batchnorm_sync")
    p.add_argument("--reps", type=int, default=40, help="interleaved timing repetitions")
    p.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    p.add_argument("--out", default="", help="write the JSON here")
    return p.parse_args(argv)


def build(args):
    """The demo model's host state, the unpmapped step function and host batches."""
    config = demo_config.get_config()
    config.batch_size, config.batchnorm_sync = args.batch_size, args.batchnorm_sync
    model = setup_lib.make_model(config, NUM_CLASSES, VOCAB)
    tx = setup_lib.make_optimizer(config, model, steps_per_epoch=100, total_steps=10_000)
    variables = setup_lib.init_variables(config, model, log=lambda line: None)
    host = steps.TrainState(
        step=np.zeros((), np.int32), params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=jax.device_get(jax.jit(tx.init)(variables["params"])),
        apply_fn=model.apply, tx=tx)
    fn = functools.partial(steps.train_step, class_weights=np.ones(NUM_CLASSES, np.float32),
                           rng_scheme=config.rng_scheme)
    rng = np.random.default_rng(0)
    n, s, length = args.batch_size, config.image_size, config.max_text_length
    batches = [{"image": rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
                "input_ids": rng.integers(1, VOCAB, (n, length)).astype(np.int32),
                "attention_mask": np.ones((n, length), np.int32),
                "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32)} for _ in range(2)]
    return host, fn, batches


def _mesh():
    return jax.sharding.Mesh(np.array(jax.local_devices()), (parallel.AXIS_NAME,))


def place(variant: str, tree):
    """Host pytree -> device arrays the variant's step takes (one host-to-device copy)."""
    n = jax.local_device_count()
    if variant == "mapped":
        spec = jax.sharding.PartitionSpec(parallel.AXIS_NAME)
        put = lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x))
    else:
        spec, put = jax.sharding.PartitionSpec(), np.asarray
    return jax.device_put(jax.tree.map(put, tree), jax.sharding.NamedSharding(_mesh(), spec))


@functools.cache
def pmapped(variant: str, fn):
    """The variant's pmapped step (one per variant, so its compiled program is reused)."""
    if variant == "mapped":
        return jax.pmap(fn, axis_name=parallel.AXIS_NAME, donate_argnums=(0,))
    return jax.pmap(fn, axis_name=parallel.AXIS_NAME, in_axes=(None, 0, None),
                    out_axes=(None, None), donate_argnums=(0,))


def _nbytes(shape_text: str) -> int:
    return int(sum(_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
                   for dt, dims in _SHAPE.findall(shape_text)))


def hlo_summary(text: str) -> dict:
    """Entry parameters, donation, and copy/broadcast/collective instructions of an optimised
    HLO module; ``reads_parameter`` lists those whose operand is an entry parameter."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    entry = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        entry.append(line)
    params = {}
    for line in entry:
        m = _PARAM.match(line)
        if m:
            params[m.group(1).lstrip("%")] = m.group(2)
    kinds = collections.Counter()
    direct = []
    for line in lines:
        m = _INSTR.match(line)
        if not m or m.group(3) not in KINDS:
            continue
        kinds[m.group(3)] += 1
        operands = {o.strip().lstrip("%").split(" ")[-1].lstrip("%")
                    for o in m.group(4).split(",")}
        if line in entry and operands & set(params):
            direct.append(line.strip()[:160])
    shapes = list(params.values())
    return {"entry_parameters": len(params),
            "entry_parameter_bytes": sum(_nbytes(s) for s in shapes),
            # input_output_alias={ {0}: (0, {}, may-alias), ... } in the module's first line
            "donated_parameters": len(re.findall(r"-alias\)", lines[0])),
            "instructions": dict(sorted(kinds.items())), "reads_parameter": direct,
            "reads_parameter_bytes": sum(_nbytes(line.split("=")[1].split(" copy(")[0]
                                                 .split(" broadcast(")[0]) for line in direct)}


def compiled_step(variant: str, host, fn, batch, key):
    state, k = place(variant, host), place(variant, key)
    device_batch = parallel.shard_to_devices(batch)
    compiled = pmapped(variant, fn).lower(state, device_batch, k).compile()
    return hlo_summary(compiled.as_text())


def transfers(variant: str, host, fn, batches, key) -> dict:
    """Steps under a transfer guard: the state as the step returns it, then as host arrays."""
    step, k = pmapped(variant, fn), place(variant, key)
    state = place(variant, host)
    device_batches = [parallel.shard_to_devices(b) for b in batches]
    state, _ = step(state, device_batches[0], k)  # the first call compiles
    out = {}
    try:
        with jax.transfer_guard("disallow"):
            for b in device_batches:
                state, m = step(state, b, k)
            jax.block_until_ready((state, m))
        out["returned_state"] = "no transfer"
    except Exception as e:  # noqa: BLE001 - the guard's message is the result
        out["returned_state"] = _first_line(e)
    shards = [jax.tree.leaves(jax.tree.map(lambda x, i=i: np.asarray(x.addressable_shards[i].data)
                                           .reshape(-1), state))
              for i in range(len(jax.local_devices()))]
    out["copies_equal_across_devices"] = all(
        np.array_equal(a, b) for other in shards[1:] for a, b in zip(shards[0], other,
                                                                      strict=True))
    host_state = jax.tree.map(np.asarray, jax.device_get(state))
    try:
        with jax.transfer_guard("disallow"):
            step(host_state, device_batches[0], k)
        out["host_state"] = "no transfer"
    except Exception as e:  # noqa: BLE001
        out["host_state"] = _first_line(e)
    return out


def _first_line(error: Exception) -> str:
    """"Disallowed host-to-device transfer: aval=..." without the long sharding."""
    return str(error).splitlines()[0].split(", dst_sharding")[0].replace("INVALID_ARGUMENT: ", "")


def timing(host, fn, batches, key, reps: int, n_steps: int) -> dict:
    """Milliseconds per step, the variants interleaved in alternating order."""
    run = {}
    for v in VARIANTS:
        step, k = pmapped(v, fn), place(v, key)
        state = place(v, host)
        device_batches = [parallel.shard_to_devices(b) for b in batches]
        state, m = step(state, device_batches[0], k)
        jax.block_until_ready((state, m))
        run[v] = [step, state, k, device_batches]
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    for r in range(reps):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            step, state, k, device_batches = run[v]
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(n_steps):
                state, m = step(state, device_batches[i % 2], k)
            jax.block_until_ready((state, m))
            times[v].append(1e3 * (time.perf_counter() - t0) / n_steps)
            cpu[v].append(1e3 * (time.process_time() - c0) / n_steps)
            run[v][1] = state
    out = {v: _spread(t) for v, t in times.items()}
    out["cpu_ms"] = {v: _spread(t) for v, t in cpu.items()}
    for name, values in (("unmapped_over_mapped", times), ("cpu_unmapped_over_mapped", cpu)):
        ratios = np.asarray(values["unmapped"]) / np.asarray(values["mapped"])
        out[name] = {**_spread(ratios, digits=3), "median_95ci": _median_ci(ratios)}
    out["raw_ms"] = {v: [round(x, 2) for x in t] for v, t in times.items()}
    out["raw_cpu_ms"] = {v: [round(x, 2) for x in t] for v, t in cpu.items()}
    return out


def _median_ci(values, resamples: int = 2000) -> list:
    """A bootstrap 95 % interval of the median."""
    rng = np.random.default_rng(0)
    v = np.asarray(values)
    medians = np.median(rng.choice(v, (resamples, len(v))), axis=1)
    return [round(float(x), 3) for x in np.percentile(medians, [2.5, 97.5])]


def _spread(values, digits: int = 2) -> dict:
    v = np.asarray(values)
    q = np.percentile(v, [0, 10, 25, 50, 75, 90, 100])
    return dict(zip(("min", "p10", "p25", "median", "p75", "p90", "max"),
                    (round(float(x), digits) for x in q), strict=True))


def markdown(results: dict) -> str:
    rows = ["| | mapped | unmapped |", "|---|---|---|"]
    hlo = results["hlo"]
    for key in ("entry_parameters", "entry_parameter_bytes", "donated_parameters"):
        rows.append(f"| {key} | {hlo['mapped'][key]} | {hlo['unmapped'][key]} |")
    for kind in sorted(set(hlo["mapped"]["instructions"]) | set(hlo["unmapped"]["instructions"])):
        rows.append(f"| {kind} | {hlo['mapped']['instructions'].get(kind, 0)} | "
                    f"{hlo['unmapped']['instructions'].get(kind, 0)} |")
    rows.append(f"| reads an entry parameter (copy/broadcast/collective) | "
                f"{len(hlo['mapped']['reads_parameter'])} | "
                f"{len(hlo['unmapped']['reads_parameter'])} |")
    rows.append(f"| bytes they write per step | {hlo['mapped']['reads_parameter_bytes']} | "
                f"{hlo['unmapped']['reads_parameter_bytes']} |")
    for key in ("returned_state", "copies_equal_across_devices", "host_state"):
        rows.append(f"| {key} | {results['transfers']['mapped'][key]} | "
                    f"{results['transfers']['unmapped'][key]} |")
    if results.get("timing"):
        t = results["timing"]
        rows.append("| ms/step median [p10, p90] (min-max) | " + " | ".join(
            f"{t[v]['median']} [{t[v]['p10']}, {t[v]['p90']}] ({t[v]['min']}-{t[v]['max']})"
            for v in VARIANTS) + " |")
        rows.append("| CPU ms/step (process time) median [p10, p90] | " + " | ".join(
            f"{t['cpu_ms'][v]['median']} [{t['cpu_ms'][v]['p10']}, {t['cpu_ms'][v]['p90']}]"
            for v in VARIANTS) + " |")
        for name in ("unmapped_over_mapped", "cpu_unmapped_over_mapped"):
            r = t[name]
            rows.append(f"| {name}, paired | median {r['median']} (95 % CI {r['median_95ci']}) "
                        f"[p10 {r['p10']}, p90 {r['p90']}] | |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    host, fn, batches = build(args)
    key = np.asarray(jax.random.PRNGKey(0))
    results = {"devices": jax.local_device_count(), "batch_size": args.batch_size,
               "batchnorm_sync": args.batchnorm_sync, "jax": jax.__version__,
               "hlo": {v: compiled_step(v, host, fn, batches[0], key) for v in VARIANTS},
               "transfers": {v: transfers(v, host, fn, batches, key) for v in VARIANTS}}
    if args.reps:
        results["timing"] = timing(host, fn, batches, key, args.reps, args.steps)
        results["timing"].update(reps=args.reps, steps=args.steps)
    print(markdown(results))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
