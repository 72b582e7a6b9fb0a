"""Sweeps: runs of one config that differ in a few overrides, checked before anything is submitted.

A sweep file is a Python file whose ``get_sweep()`` returns a list of override dicts::

    from jaxmm.experiments.sweep import grid

    def get_sweep():
        return grid({"optim.lr_head": [1e-3, 3e-4], "model.fusion": ["concat", "gated"]})

``slurm/sweep.sh`` submits one Slurm job array for it; its two halves call this module:

    python -m jaxmm.experiments.sweep plan --config C --sweep S --sweep_dir D [--active 1,3]
        [-- --config.K=V]
        checks every entry against the loaded config, writes D/sweep.json and prints the
        comma-separated indices of the runs still to do (finished and active ones are skipped)
    python -m jaxmm.experiments.sweep task --sweep_dir D --index I
        prints, one per line: "run" or "finished", the run's workdir, the config file and the
        ``--config.KEY=VALUE`` arguments of run I

Run I lives in ``D/<I>-<short name of its overrides>``.
"""

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxmm import cli, files, paths
from jaxmm.errors import ConfigError
from jaxmm.training.progress import Status

# Summary statuses of a run that is over: a resubmitted sweep skips these runs.
DONE_STATUSES = (Status.FINISHED.value, Status.EARLY_STOPPED.value)
# Config entries that decide what `prepare` writes into the prepared-dataset folder.
_DATA_KEYS = ("data_dir", "class_names", "text_source", "stored_image_size", "tokenizer",
              "tokenizer_vocab_size", "demo")


def grid(axes: dict) -> list[dict]:
    """Every combination of the values of ``axes`` (the last key varies fastest).

    Args:
      axes: config key -> list of values, e.g. ``{"optim.lr_head": [1e-3, 3e-4]}``.

    Returns:
      One override dict per combination.
    """
    keys = list(axes)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(list(axes[k]) for k in keys))]


def load_sweep(path: str) -> list[dict]:
    """The override dicts of a sweep file; a malformed file raises a one-line ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file {path} not found")
    spec = importlib.util.spec_from_file_location("jaxmm_sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_sweep"):
            raise ConfigError("no get_sweep() function")
        entries = module.get_sweep()
    except Exception as e:  # Any error in the user's file becomes one line.
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError(f"{path}: get_sweep() must return a non-empty list of dicts")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise ConfigError(f"{path}: sweep entry {i} is not a dict of 'key': value: {entry!r}")
    return [dict(e) for e in entries]


def parse_config(config_file: str, args=()) -> ml_collections.ConfigDict:
    """Loads a config file with ``--config.KEY=VALUE`` arguments, exactly as the trainer does."""
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file} not found")
    argv = ["sweep", f"--config={config_file}", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    try:
        fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(" ".join(str(e).split())) from None
    return fv.config


def _cli_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return value if isinstance(value, str) else repr(value)


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _set(config, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise KeyError(f"'{part}' is not a group of config entries")
    node[leaf] = value


def check_override(config, key: str, value) -> str:
    """Sets ``key`` on a (locked) config; returns its ``--config.KEY=VALUE`` argument.

    Raises:
      ConfigError: unknown key, a value of the wrong type, or one the command line would change.
    """
    try:
        _set(config, key, value)
    except (KeyError, AttributeError) as e:
        hint = re.search(r'Did you mean "[^"]+"', str(e))
        raise ConfigError(f"unknown config key '{key}'" + (f" ({hint.group(0)}?)" if hint
                                                           else "")) from None
    except TypeError:
        raise ConfigError(f"'{key}' = {value!r} ({type(value).__name__}) does not fit the "
                         f"config's {_get(config, key)!r} ({type(_get(config, key)).__name__})"
                         ) from None
    text = _cli_value(value)
    if "\n" in text:
        raise ConfigError(f"'{key}': a value with a line break cannot be passed on")
    return f"--config.{key}={text}"


def _short_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_short_value(v) for v in value)
    return str(value)


def run_name(index: int, overrides: dict, width: int = 1) -> str:
    """``<index>-<key>=<value>_...``: the last part of each key unless two keys share it."""
    leaves = [k.rsplit(".", 1)[-1] for k in overrides]
    parts = [f"{leaf if leaves.count(leaf) == 1 else key}={_short_value(v)}"
             for (key, v), leaf in zip(overrides.items(), leaves, strict=True)]
    name = re.sub(r"[^A-Za-z0-9=._+-]", "-", "_".join(parts) or "base")[:80]
    return f"{index:0{width}d}-{name}"


@dataclasses.dataclass
class RunSpec:
    """One run of a sweep: where it lives and how it differs from the base config."""

    index: int
    name: str
    overrides: dict
    args: list

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _validated(config_file: str, common_args, index: int, overrides: dict, width: int):
    """Checks one sweep entry; returns (RunSpec, the run's config)."""
    config = parse_config(config_file, common_args)
    args = []
    for key, value in overrides.items():
        try:
            args.append(check_override(config, key, value))
        except ValueError as e:
            raise ConfigError(f"sweep entry {index} {overrides}: {e}") from None
    # What the job will see: the same arguments through the trainer's own flag parser.
    parsed = parse_config(config_file, [*common_args, *args])
    for key in overrides:
        if _get(parsed, key) != _get(config, key):
            raise ConfigError(f"sweep entry {index}: '{key}' = {_get(config, key)!r} becomes "
                             f"{_get(parsed, key)!r} on the command line")
    return RunSpec(index, run_name(index, overrides, width), overrides, args), parsed


def _prepared_dir(config) -> str:
    return config.prepared_dir or os.path.join(config.data_dir, paths.DEFAULT_PREPARED_SUBDIR)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_shared_data(configs: list) -> None:
    """Runs that prepare different data must not share a prepared-dataset folder (they would
    rewrite it under each other)."""
    first = {}
    for i, config in enumerate(configs):
        where = _prepared_dir(config)
        flat = _flatten(config.to_dict())
        data = {k: v for k, v in flat.items() if k.split(".")[0] in _DATA_KEYS}
        if where not in first:
            first[where] = (i, data)
            continue
        j, other = first[where]
        diff = [k for k in data if data[k] != other.get(k)]
        if diff:
            raise ConfigError(f"sweep entries {j} and {i} prepare different data ({diff[0]}: "
                             f"{other[diff[0]]!r} vs {data[diff[0]]!r}) into the same folder "
                             f"{where}: give them different prepared_dir values")


def plan_runs(config_file: str, sweep_file: str, common_args=()) -> list[RunSpec]:
    """Validates every entry of a sweep file; the first bad one raises a one-line ConfigError."""
    entries = load_sweep(sweep_file)
    seen = {}
    for i, entry in enumerate(entries):
        key = json.dumps(entry, sort_keys=True)
        if key in seen:
            raise ConfigError(f"sweep entries {seen[key]} and {i} are the same ({entry}): "
                             "each run would train the same model twice")
        seen[key] = i
    width = len(str(len(entries) - 1))
    checked = [_validated(config_file, list(common_args), i, e, width)
               for i, e in enumerate(entries)]
    check_shared_data([c for _, c in checked])
    # The trainer's own checks that need no data; imported late (it loads models and data
    # code), once the cheap checks have passed.
    from jaxmm.training import setup as setup_lib

    for spec, config in checked:
        try:
            setup_lib.validate_config(config)
        except ValueError as e:
            raise ConfigError(f"sweep entry {spec.index} {spec.overrides}: {e}") from None
    return [spec for spec, _ in checked]


# --- The sweep folder --------------------------------------------------------------------------

def is_done(workdir: str) -> bool:
    """Whether a run has ended for good (all epochs or early stopping), per its summary."""
    summary = files.read_json(os.path.join(workdir, paths.SUMMARY_FILE)) or {}
    return summary.get("status") in DONE_STATUSES


def read_manifest(sweep_dir: str) -> dict | None:
    """The sweep folder's record of its runs (None when it is not a sweep folder)."""
    manifest = files.read_json(os.path.join(sweep_dir, paths.SWEEP_FILE))
    return manifest if isinstance(manifest, dict) and "runs" in manifest else None


def write_manifest(sweep_dir: str, config_file: str, sweep_file: str, common_args,
                   runs: list[RunSpec]) -> str:
    """Writes ``sweep.json``; a later submission may only append entries to the same sweep."""
    new = {"config": os.path.abspath(config_file), "sweep_file": os.path.abspath(sweep_file),
           "common_args": list(common_args),
           "runs": [json.loads(json.dumps(r.to_json())) for r in runs]}  # as read back
    old = read_manifest(sweep_dir)
    if old is not None:
        where = os.path.join(sweep_dir, paths.SWEEP_FILE)
        for key in ("config", "common_args"):
            if old.get(key) != new[key]:
                raise ConfigError(f"{key} differs from the one in {where} ({old.get(key)!r}): "
                                 "use a new SWEEP_DIR for a different sweep")
        if len(new["runs"]) < len(old["runs"]):
            raise ConfigError(f"the sweep has {len(new['runs'])} entries, {where} has "
                             f"{len(old['runs'])}: use a new SWEEP_DIR for a different sweep")
        for before, now in zip(old["runs"], new["runs"], strict=False):
            if (before["name"], before["args"]) != (now["name"], now["args"]):
                raise ConfigError(f"sweep entry {now['index']} changed since {where} was "
                                 f"written ({before['args']} -> {now['args']}): use a new "
                                 "SWEEP_DIR for a different sweep")
    os.makedirs(sweep_dir, exist_ok=True)
    return files.write_json(os.path.join(sweep_dir, paths.SWEEP_FILE), new)


def to_submit(sweep_dir: str, runs: list[RunSpec], active=(), log=print) -> list[int]:
    """Indices of the runs to submit: not finished and not queued or running already."""
    todo = []
    for run in runs:
        workdir = os.path.join(sweep_dir, run.name)
        if is_done(workdir):
            log(f"  {run.name}: finished, skipped")
        elif run.index in active:
            log(f"  {run.name}: already queued or running, skipped")
        else:
            state = "resumes" if os.path.isdir(workdir) else "new"
            log(f"  {run.name}: {state}")
            todo.append(run.index)
    return todo


def task_lines(sweep_dir: str, index: int) -> list[str]:
    """What array task ``index`` runs: status, workdir, config file, then its arguments."""
    manifest = read_manifest(sweep_dir)
    if manifest is None:
        raise ConfigError(f"{sweep_dir} has no readable {paths.SWEEP_FILE}")
    runs = {r["index"]: r for r in manifest["runs"]}
    if index not in runs:
        raise ConfigError(f"{sweep_dir}/{paths.SWEEP_FILE} has no run {index}")
    workdir = os.path.join(sweep_dir, runs[index]["name"])
    return ["finished" if is_done(workdir) else "run", workdir, manifest["config"],
            *manifest["common_args"], *runs[index]["args"]]


def main(argv=None) -> int:
    """Command line of slurm/sweep.sh (``cli.run_argparse``'s exit codes)."""
    return cli.run_argparse(_main, "jaxmm.experiments.sweep", argv)


def _main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="jaxmm.experiments.sweep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="check a sweep, write sweep.json, print runs to submit")
    plan.add_argument("--config", required=True)
    plan.add_argument("--sweep", required=True)
    plan.add_argument("--sweep_dir", required=True)
    plan.add_argument("--active", default="", help="comma-separated indices queued or running")
    task = sub.add_parser("task", help="print what one array task runs")
    task.add_argument("--sweep_dir", required=True)
    task.add_argument("--index", type=int, required=True)
    args = p.parse_args(argv)
    if args.command == "task":
        print("\n".join(task_lines(args.sweep_dir, args.index)))
        return
    runs = plan_runs(args.config, args.sweep, common)
    write_manifest(args.sweep_dir, args.config, args.sweep, common, runs)
    active = {int(i) for i in args.active.split(",") if i.strip()}
    log = lambda line: print(line, file=sys.stderr)
    log(f"sweep {args.sweep}: {len(runs)} run(s) in {args.sweep_dir}")
    print(",".join(str(i) for i in to_submit(args.sweep_dir, runs, active, log)))


if __name__ == "__main__":
    sys.exit(main())
