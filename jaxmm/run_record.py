"""The run record (``config.json``): written once when a run starts, checked when it resumes.

The record says what the run was trained on — config, class names and weights, preprocessing,
and a description of the prepared data (the fingerprint ``prepare`` computed from the raw
files and options, split sizes, per-class counts, options). Evaluation rebuilds the run from
it, so a resume never rewrites it: a resume against a different class list is refused, and one
against changed data is refused (naming what changed) unless ``config.allow_data_change``.
"""

import os

from absl import logging

from jaxmm import files, paths
from jaxmm.errors import WorkdirError

# At most this many differences are named in a message.
_MAX_NAMED = 6


def data_record(dataset_dir: str, meta: dict) -> dict:
    """What identifies a prepared dataset: fingerprint, class names, sizes, counts, options."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(dataset_dir)))
    stored = files.read_json(os.path.join(root, paths.FINGERPRINT_FILE)) or {}
    return {"fingerprint": stored.get("fingerprint"), "class_names": list(meta["class_names"]),
            "num_examples": dict(meta["num_examples"]), "counts": meta.get("counts", {}),
            "options": meta.get("options", {})}


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: value}


def data_changes(saved: dict, current: dict) -> list[str]:
    """The differences between two data records, as "key: old -> new" lines (fingerprint last,
    and only when nothing else tells what changed)."""
    changes = []
    for section in ("class_names", "num_examples", "counts", "options"):
        old, new = _flatten(section, saved.get(section)), _flatten(section, current.get(section))
        changes += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
    if not changes and saved.get("fingerprint") != current.get("fingerprint"):
        changes.append("the raw files (names, sizes or modification times; same counts): "
                       f"fingerprint {saved.get('fingerprint')} -> {current.get('fingerprint')}")
    return changes


def read(workdir: str) -> dict | None:
    """The workdir's run record, or None when there is none (a fresh workdir)."""
    return files.read_json(paths.in_workdir(workdir, paths.CONFIG_FILE))


def check_resume(workdir: str, data: dict, allow_data_change: bool) -> None:
    """Refuses a resume whose prepared data does not match the run record.

    Args:
      workdir: the run's workdir.
      data: ``data_record`` of the data the resume would train on.
      allow_data_change: resume on changed data (same class list) with a warning.

    Raises:
      ValueError: one line; the class list differs, or the data changed and is not allowed to.
    """
    record = read(workdir)
    if record is None:
        logging.warning("%s has no run record; the data of this resume cannot be checked",
                        workdir)
        return
    path = paths.in_workdir(workdir, paths.CONFIG_FILE)
    if list(record.get("class_names", [])) != data["class_names"]:
        raise WorkdirError(f"{path}: the run was trained on classes {record.get('class_names')}, "
                         f"the prepared data has {data['class_names']}; a resume cannot change "
                         f"the class list: train in a new workdir")
    if "data" not in record:
        logging.warning("%s records no data fingerprint (written by an older version); the "
                        "data of this resume is not checked", path)
        return
    changes = data_changes(record["data"], data)
    if not changes:
        return
    named = "; ".join(changes[:_MAX_NAMED]) + (
        f"; and {len(changes) - _MAX_NAMED} more" if len(changes) > _MAX_NAMED else "")
    if not allow_data_change:
        raise WorkdirError(f"the prepared data changed since this run started ({named}); resume "
                         f"anyway with --config.allow_data_change=True, or train in a new workdir")
    logging.warning("resuming on changed data (%s), as allowed by config.allow_data_change; "
                    "the run will not repeat an uninterrupted one", named)


def write(workdir: str, record: dict) -> str:
    """Writes the run record (the caller writes it once, when the run starts)."""
    return files.write_json(paths.in_workdir(workdir, paths.CONFIG_FILE), record)
