"""The run on disk: a training workdir and every file in it, read and written here only.

A workdir holds the run record (``config.json``: config, classes, class weights, the model spec,
the data it trained on; written once, when the run starts), a copy of the tokenizer, metrics,
the closing summary, the fitted calibration, evaluation folders, the lock and orbax checkpoints.
``Workdir.load_model`` rebuilds the trained model from these alone, in a fresh process on any
device count: no dataset, no pretrained weights, no optimizer.

Run records written by older jaxmm versions are read by ``jaxmm.trained.legacy`` and nowhere else.
"""

import json
import logging
import os

import ml_collections
import numpy as np

from jaxmm import files, paths
from jaxmm.errors import ConfigError, WorkdirError
from jaxmm.trained.model import ModelSpec, TrainedModel, architecture_of

RECORD_VERSION = 2
_MAX_NAMED = 6  # at most this many data changes are named in a message
log = logging.getLogger("jaxmm")
CHECKPOINTS = ("best", "latest")


def parse_checkpoint(which) -> str:
    """'best', 'latest' or a step number, as a string.

    Raises:
      ConfigError: anything else.
    """
    if which in CHECKPOINTS or str(which).isdigit():
        return str(which)
    raise ConfigError(f"--checkpoint must be 'best', 'latest' or a step number, got {which!r}")


def _tuples(value):
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_of(record: dict) -> ml_collections.ConfigDict:
    """A run record's config as a ConfigDict (JSON turned the config's tuples into lists, and
    ConfigDict fields keep their first type)."""
    return ml_collections.ConfigDict(_tuples(record["config"]))


class Workdir:
    """A training workdir (which may not exist yet).

    Args:
      path: the folder.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"Workdir({self.path!r})"

    def file(self, name: str) -> str:
        """A file or folder of the layout, e.g. ``wd.file(paths.METRICS_FILE)``."""
        return os.path.join(self.path, name)

    def is_run(self) -> bool:
        """Whether the folder looks like a training workdir."""
        return any(os.path.exists(self.file(n)) for n in (
            paths.CONFIG_FILE, paths.METRICS_FILE, paths.SUMMARY_FILE, paths.CHECKPOINTS_DIR))

    # --- the run record ------------------------------------------------------------------------
    def stored_record(self) -> dict | None:
        """The run record as stored, not upgraded (None when missing or unreadable): enough
        for the config and class names, and cheap for any format (``jaxmm.compare``)."""
        return files.read_json(self.file(paths.CONFIG_FILE))

    def record(self) -> dict | None:
        """The run record in the current format, or None for a fresh workdir."""
        record = self.stored_record()
        if isinstance(record, dict) and record.get("record_version", 1) < RECORD_VERSION:
            from jaxmm.trained import legacy

            record = legacy.upgrade_run_record(record, self)
        return record

    def read_record(self) -> dict:
        """The run record (current format).

        Raises:
          WorkdirError: no workdir, or no readable run record in it.
        """
        if not os.path.isdir(self.path):
            raise WorkdirError(f"workdir {self.path} does not exist")
        path = self.file(paths.CONFIG_FILE)
        if not os.path.isfile(path):
            raise WorkdirError(f"{path} not found: is {self.path} a training workdir?")
        record = self.record()
        if not isinstance(record, dict) or "config" not in record:
            raise WorkdirError(f"{path}: not a readable run record")
        return record

    def write_record(self, record: dict) -> str:
        """Writes the run record (once, when the run starts)."""
        return files.write_json(self.file(paths.CONFIG_FILE),
                                {"record_version": RECORD_VERSION, **record})

    def check_resume(self, data: dict, allow_data_change: bool) -> None:
        """Refuses a resume whose prepared data does not match the run record.

        Args:
          data: ``prepared.data_record`` of the data the resume would train on.
          allow_data_change: resume on changed data (same class list) with a warning.

        Raises:
          WorkdirError: one line; the class list differs, or the data changed and is not
            allowed to.
        """
        record = self.record()
        path = self.file(paths.CONFIG_FILE)
        if record is None:
            log.warning("%s has no run record; the data of this resume cannot be checked",
                        self.path)
            return
        if list(record.get("class_names", [])) != data["class_names"]:
            raise WorkdirError(f"{path}: the run was trained on classes "
                               f"{record.get('class_names')}, the prepared data has "
                               f"{data['class_names']}; a resume cannot change the class list: "
                               "train in a new workdir")
        if record.get("data") is None:
            log.warning("%s records no data fingerprint; the data of this resume is not "
                        "checked", path)
            return
        changes = data_changes(record["data"], data)
        if not changes:
            return
        named = "; ".join(changes[:_MAX_NAMED]) + (
            f"; and {len(changes) - _MAX_NAMED} more" if len(changes) > _MAX_NAMED else "")
        if not allow_data_change:
            raise WorkdirError(f"the prepared data changed since this run started ({named}); "
                               "resume anyway with --config.allow_data_change=True, or train "
                               "in a new workdir")
        log.warning("resuming on changed data (%s), as allowed by config.allow_data_change; "
                    "the run will not repeat an uninterrupted one", named)

    def config(self) -> ml_collections.ConfigDict:
        """The config the run was trained with."""
        return config_of(self.read_record())

    def spec(self, calibrated: bool = True) -> ModelSpec:
        """The trained model's spec, with the fitted temperature when ``calibrated``.

        Raises:
          WorkdirError: the record's model description or calibration.json is damaged.
        """
        record = self.read_record()
        try:
            spec = ModelSpec.from_json(record["model"], self.file(paths.CONFIG_FILE))
        except ValueError as e:
            raise WorkdirError(str(e)) from None
        return spec.with_temperature(self.temperature() if calibrated else None)

    # --- tokenizer -------------------------------------------------------------------------------
    def tokenizer(self):
        """The tokenizer the run trained with (its copy in the workdir)."""
        from jaxmm.data import tokenizer as tokenizer_lib

        kept = self.file(paths.TOKENIZER_DIR)
        if not os.path.isdir(kept):
            raise WorkdirError(f"{kept}: missing; the run's tokenizer copy is needed to use it")
        return tokenizer_lib.load_tokenizer(kept)

    def keep_tokenizer(self, tokenizer) -> None:
        """Copies the tokenizer into the workdir once, so the run owns the token ids it trained
        with (a re-prepared dataset may train another)."""
        kept = self.file(paths.TOKENIZER_DIR)
        if not os.path.isdir(kept):
            tmp = f"{kept}.tmp{os.getpid()}"
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, kept)

    # --- metrics and summary ---------------------------------------------------------------------
    def metric_rows(self, notes: list | None = None) -> list[dict]:
        """Rows of metrics.jsonl; unreadable lines (e.g. one being written) and damaged rows (a
        kind that is not a name, a step that is not a whole number, an epoch that is not a
        number) are skipped and counted in ``notes``."""
        try:
            with open(self.file(paths.METRICS_FILE), encoding="utf-8") as f:
                lines = [line for line in f if line.strip()]
        except OSError:
            return []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("kind"), str) and (
                    "step" not in row or _whole(row["step"])) and (
                    "epoch" not in row or _number(row["epoch"])):
                rows.append(row)
        if len(rows) < len(lines) and notes is not None:
            notes.append(f"{len(lines) - len(rows)} unreadable or damaged line(s) in "
                         f"{paths.METRICS_FILE}, skipped")
        return rows

    def append_metrics(self, row: dict) -> None:
        """Appends one row to metrics.jsonl."""
        with open(self.file(paths.METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=files.jsonable) + "\n")

    def summary(self, notes: list | None = None) -> dict | None:
        """The closing summary of the run (None while it runs, or when unreadable or damaged:
        not an object, or a status that is not a name; ``notes`` then says so)."""
        summary = files.read_json(self.file(paths.SUMMARY_FILE))
        if summary is None:
            return None
        if not isinstance(summary, dict) or not isinstance(summary.get("status", ""), str):
            if notes is not None:
                notes.append(f"{paths.SUMMARY_FILE} is damaged (status "
                             f"{summary.get('status') if isinstance(summary, dict) else summary!r}"
                             "), ignored")
            return None
        return summary

    def write_summary(self, summary: dict) -> str:
        return files.write_json(self.file(paths.SUMMARY_FILE), summary)

    # --- calibration -----------------------------------------------------------------------------
    def calibration(self) -> dict | None:
        """The fitted calibration record, or None when the run has none.

        Raises:
          WorkdirError: the file exists but is unreadable or its temperature is not a finite
            positive number.
        """
        from jaxmm.trained.model import temperature_of

        path = self.file(paths.CALIBRATION_FILE)
        if not os.path.exists(path):
            return None
        record = files.read_json(path)
        if not isinstance(record, dict):
            raise WorkdirError(f"{path}: not readable as a JSON object; fit it again with "
                               "python -m jaxmm.evaluate --calibrate")
        try:
            temperature_of(record, path)
        except ValueError as e:
            raise WorkdirError(str(e)) from None
        if not isinstance(record.get("applied", True), bool):
            raise WorkdirError(f"{path}: applied must be true or false, got "
                               f"{record['applied']!r}")
        return record

    def temperature(self) -> float | None:
        """The fitted temperature, or None when there is none or it failed the trust
        criterion (``calibration.trust``; records written before it have no ``applied``)."""
        record = self.calibration()
        if record is None or record.get("applied", True) is False:
            return None
        return float(record["temperature"])

    def write_calibration(self, record: dict) -> str:
        return files.write_json(self.file(paths.CALIBRATION_FILE), record)

    # --- evaluation folders ----------------------------------------------------------------------
    def eval_dir(self, split: str, checkpoint: str, step: int, suffix: str = "") -> str:
        """``eval/best/<split>`` or ``eval/step_<N>/<split>`` (for ``latest`` and step
        numbers), so evaluations of different checkpoints never replace each other's."""
        tag = "best" if str(checkpoint) == "best" else f"step_{step}"
        return os.path.join(self.path, paths.EVAL_DIR, tag, split + suffix)

    # --- the trained model -----------------------------------------------------------------------
    def load_model(self, checkpoint: str = "best", *, axis_name: str | None = None,
                   calibrated: bool = True) -> TrainedModel:
        """Rebuilds the trained model of a checkpoint.

        Args:
          checkpoint: "best", "latest" or a step number of a kept training checkpoint.
          axis_name: the model's BatchNorm axis (pmapped evaluation) or None (one device);
            either is exact at inference, where BatchNorm uses its running averages.
          calibrated: the spec carries the fitted temperature when there is one.

        Returns:
          The TrainedModel; its variables are NumPy arrays on the host.
        """
        from jaxmm.trained import restoring

        spec = self.spec(calibrated)
        variables, step = restoring.restore_model(self.path, parse_checkpoint(checkpoint))
        variables = {"params": variables["params"],
                     "batch_stats": variables.get("batch_stats") or {}}
        model = spec.build_model(axis_name)
        check_variables(variables, spec.abstract_variables(model),
                        f"the checkpoint in {self.path}", "the model of its run record",
                        WorkdirError)
        return TrainedModel(spec, model, variables, self.tokenizer(), step)


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: value}


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    """An epoch: whole at validation, a fraction of the way through in training rows."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def data_changes(saved: dict, current: dict) -> list[str]:
    """The differences between two data records, as "key: old -> new" lines (fingerprint last,
    and only when nothing else tells what changed). The exclusions of ``config.exclude_file``
    count as data: another list (SHA-256) is a change; the same list moved elsewhere is not."""
    changes = []
    for section in ("class_names", "num_examples", "counts", "options"):
        old, new = _flatten(section, saved.get(section)), _flatten(section, current.get(section))
        changes += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
    old, new = saved.get("exclusions") or {}, current.get("exclusions") or {}
    if old.get("sha256") != new.get("sha256"):  # what a list excludes follows from its bytes
        changes.append(f"exclusions.sha256 (config.exclude_file): {old.get('sha256')} "
                       f"({old.get('file') or 'no file'}) -> {new.get('sha256')} "
                       f"({new.get('file') or 'no file'})")
    if not changes and saved.get("fingerprint") != current.get("fingerprint"):
        changes.append("the raw files (names, sizes or modification times; same counts): "
                       f"fingerprint {saved.get('fingerprint')} -> {current.get('fingerprint')}")
    return changes


def shapes_of(tree) -> dict:
    """{path: (shape, dtype name)} of every leaf of a variable tree."""
    import jax

    return {jax.tree_util.keystr(p): (tuple(np.shape(x)), np.dtype(x.dtype).name)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def variable_differences(got, want) -> list[str]:
    """What differs between two variable trees: missing, unexpected, other shape or dtype."""
    have, need = shapes_of(got), shapes_of(want)
    out = [f"{p} is missing" for p in need if p not in have]
    out += [f"{p} is not in the model" for p in have if p not in need]
    out += [f"{p} has shape {have[p][0]} {have[p][1]}, the model needs {need[p][0]} "
            f"{need[p][1]}" for p in need if p in have and have[p] != need[p]]
    return out


def check_variables(got, want, what: str, against: str, error=WorkdirError) -> None:
    """Raises ``error`` (one line) when two variable trees differ in structure, shape or dtype."""
    differences = variable_differences(got, want)
    if differences:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise error(f"{what} does not fit {against}: {differences[0]}{more}")


def model_architecture(model, config) -> dict:
    """The run record's architecture of a training model: its fields, with the configured
    compute dtype ('auto' stays 'auto', resolved where the model is rebuilt)."""
    return {**architecture_of(model), "dtype": config.model.dtype}
