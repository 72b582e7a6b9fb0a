"""Reading the checkpoints of a workdir for inference: which steps exist, and a step's model
variables restored and verified against the digest recorded when it was saved.

Only orbax and NumPy: evaluation, prediction and export restore through here and never import
the training side (optimizer, data pipeline). ``jaxmm.training.checkpointing`` writes what
this reads.
"""

import json
import logging
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxmm import paths
from jaxmm.errors import UserError, WorkdirError
from jaxmm.trained import digests

log = logging.getLogger("jaxmm")

_DIGEST = "digest"
_TRAIN_ITEMS = ("state", "data_iter", "progress", _DIGEST)
_BEST_ITEMS = ("model", "progress", _DIGEST)
# JSON files orbax parses when restoring; a broken one is named in the error.
_JSON_FILES = ("state/_METADATA", "model/_METADATA", "progress/metadata", "digest/metadata")



class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be read, or its arrays differ from the digest recorded at saving."""


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _unreadable(step_dir: epath.Path, step: int, error: Exception) -> CheckpointError:
    """A one-line error naming the step and, where it can be told, the broken file."""
    where, reason = _broken_file(step_dir)
    if where is None:
        text = " ".join(str(error).split()) or type(error).__name__
        files = re.findall(r'local file "([^"]+)"', text)
        where = files[-1] if files else str(step_dir)
        # Tensorstore repeats the path in every clause; the array key is what tells them apart.
        text = re.sub(r'( in OCDBT database)? (at|of) local file "[^"]+"', "", text)
        reason = f"{type(error).__name__}: {text[:240]}"
    return CheckpointError(f"checkpoint step {step} cannot be read: {where}: {reason}")


def _broken_file(step_dir: epath.Path) -> tuple[str | None, str | None]:
    """The first missing item folder or unparsable JSON file of a step, if any."""
    items = _BEST_ITEMS if (step_dir / "model").exists() else _TRAIN_ITEMS
    for item in items:
        if item != _DIGEST and not (step_dir / item).is_dir():
            return str(step_dir / item), "missing"
    for name in _JSON_FILES:
        path = step_dir / name
        if (step_dir / name.split("/")[0]).is_dir():
            if not path.exists():
                return str(path), "missing"
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                return str(path), f"not valid JSON ({e})"
    return None, None


def _verify(step_dir: epath.Path, step: int, tree: dict, recorded: dict | None) -> None:
    """Compares the restored arrays with the digest recorded when the step was saved."""
    if recorded is None:
        log.warning("checkpoint step %d (%s) has no recorded digest (saved by an older "
                        "version); its content is not verified", step, step_dir)
        return
    changed = digests.mismatches(tree, recorded)
    if changed:
        raise CheckpointError(
            f"checkpoint step {step} is corrupt: {step_dir}: the arrays under "
            f"{', '.join(changed)} differ from the digest recorded when it was saved")


def available(workdir: str) -> dict:
    """Steps available for evaluation: {"best": step|None, "latest": step|None, "all": [...]}."""
    root = epath.Path(os.path.abspath(workdir))
    out = {"best": None, "latest": None, "all": []}
    for name, sub in (("best", paths.BEST_DIR), ("latest", paths.CHECKPOINTS_DIR)):
        if (root / sub).exists():
            steps = ocp.utils.checkpoint_steps(root / sub)
            if steps:
                out[name] = max(steps)
                if name == "latest":
                    out["all"] = sorted(steps)
    return out


def recorded_digest(workdir: str) -> tuple[int, dict] | None:
    """The best checkpoint's step and the digest recorded when it was saved, or None."""
    step = available(workdir)["best"]
    path = epath.Path(os.path.abspath(workdir)) / paths.BEST_DIR / str(step) / _DIGEST
    if step is None or not path.exists():
        return None
    return step, ocp.JsonCheckpointHandler().restore(path)


def restore_model(workdir: str, which: str = "best") -> tuple[dict, int]:
    """Restores only what inference needs: {params, batch_stats} as NumPy arrays, verified.

    Args:
      workdir: the training workdir.
      which: "best", "latest" or a step number (as a string or int) of a training checkpoint.

    Returns:
      (variables, step).

    Raises:
      FileNotFoundError: one line listing what the workdir holds when it has no such
        checkpoint (also when ``best/`` is missing: the latest step is never used instead).
      CheckpointError: the checkpoint cannot be read or differs from its recorded digest.
    """
    root = epath.Path(os.path.abspath(workdir))
    have = available(workdir)
    if which == "best":
        step = have["best"]
        if step is None:
            raise WorkdirError(
                f"{workdir}: no best checkpoint ({paths.BEST_DIR}/ is missing or empty: the "
                f"run stopped before its first validation, or the folder was removed); kept "
                f"training steps: {have['all']}; choose one with --checkpoint latest or "
                f"--checkpoint STEP")
        return _restore_variables(root / paths.BEST_DIR / str(step), step, "model"), step
    step = have["latest"] if which == "latest" else int(which)
    if step is None or step not in have["all"]:
        raise WorkdirError(f"{workdir}: no '{which}' checkpoint (have: best={have['best']},"
                                f" latest steps={have['all']})")
    step_dir = root / paths.CHECKPOINTS_DIR / str(step)
    return _restore_variables(step_dir, step, "state", keys=("params", "batch_stats")), step


def _restore_variables(step_dir: epath.Path, step: int, item: str, keys=None) -> dict:
    try:
        tree = _restore_tree(step_dir / item, keys)
        recorded = None
        if (step_dir / _DIGEST).exists():
            recorded = ocp.JsonCheckpointHandler().restore(step_dir / _DIGEST)
    except Exception as e:  # noqa: BLE001 - any failure means "this step is unreadable"
        raise _unreadable(step_dir, step, e) from e
    _verify(step_dir, step, tree, recorded)
    return tree


def _restore_tree(path: epath.Path, keys: tuple | None = None) -> dict:
    # The handler reads one item folder directly (the checkpointer would look for the step's
    # metadata file inside the item folder and warn).
    handler = ocp.PyTreeCheckpointHandler()
    metadata = handler.metadata(path).tree
    if keys is not None:
        metadata = {k: metadata[k] for k in keys}
    targets = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    tree = handler.restore(path, args=ocp.args.PyTreeRestore(
        item=targets, restore_args=ocp.checkpoint_utils.construct_restore_args(targets),
        partial_restore=True))
    return _to_numpy(tree)
