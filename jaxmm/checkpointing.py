"""Orbax checkpoints of a run: the latest K train states (with the data-iterator position) and,
separately, the best model by the validation metric.

Layout inside the workdir:

    checkpoints/<step>/{state, data_iter, progress}   latest K, for resuming training
    best/<step>/{model, progress}                      params + batch_stats only, for evaluation

Keeping "best" in its own manager avoids orbax's trap where ``max_to_keep`` with a ``best_fn``
can delete the newest checkpoint, and keeps the inference copy small (no optimizer state).
Every process calls every method here, as orbax requires; only process 0 writes shared files.
"""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint

from jaxmm.errors import WorkdirError

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


class _IteratorSnapshot:
    """Stands in for a grain iterator whose state was recorded when a batch was drawn."""

    def __init__(self, state):
        self._state = state

    def get_state(self) -> bytes:
        # Grain's handler decodes bytes from iterators that are not DatasetIterators.
        return json.dumps(self._state, indent=1).encode()


def _manager(path: epath.Path, items: tuple, keep: int) -> ocp.CheckpointManager:
    # Two managers may save the same step at once; distinct barrier names keep their
    # multi-process barriers from colliding.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=path.name))
    return ocp.CheckpointManager(path, options=options, item_names=items)


class Checkpoints:
    """The latest-K and best checkpoint managers of one workdir."""

    def __init__(self, workdir: str, keep: int):
        root = epath.Path(os.path.abspath(workdir))
        self._latest = _manager(root / LATEST_DIR, ("state", "data_iter", "progress"), keep)
        self._best = _manager(root / BEST_DIR, ("model", "progress"), 1)

    def latest_step(self) -> int | None:
        """Step of the newest complete training checkpoint, or None on a fresh start."""
        return self._latest.latest_step()

    def save(self, step: int, state: dict, iterator_state, progress: dict) -> None:
        """Saves a host-side train state asynchronously.

        Args:
          step: the train step the state is at.
          state: NumPy pytree {step, params, batch_stats, opt_state}.
          iterator_state: grain iterator state right after the last trained batch.
          progress: JSON-ready loop bookkeeping (epoch, best metric, history, ...).
        """
        if self._latest.latest_step() == step:
            return
        self._latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain_checkpoint.CheckpointSave(_IteratorSnapshot(iterator_state)),
            progress=ocp.args.JsonSave(progress)))

    def save_best(self, step: int, variables: dict, progress: dict) -> None:
        """Saves the inference variables {params, batch_stats} of a new best model."""
        self._best.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(variables), progress=ocp.args.JsonSave(progress)),
            force=True)

    def restore(self, state_template: dict, data_iter) -> tuple[dict, dict]:
        """Restores the newest train state into ``state_template``'s structure and moves
        ``data_iter`` to the saved position.

        Returns:
          (state, progress) with NumPy leaves.
        """
        step = self._latest.latest_step()
        abstract = _abstract(state_template)
        restored = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data_iter=grain_checkpoint.CheckpointRestore(data_iter),
            progress=ocp.args.JsonRestore()))
        return _to_numpy(restored.state), dict(restored.progress)

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._latest.close()
        self._best.close()


def _abstract(tree):
    return _to_numpy(tree)


def _to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def available(workdir: str) -> dict:
    """Steps available for evaluation: {"best": step|None, "latest": step|None, "all": [...]}."""
    root = epath.Path(os.path.abspath(workdir))
    out = {"best": None, "latest": None, "all": []}
    for name, sub in (("best", BEST_DIR), ("latest", LATEST_DIR)):
        if (root / sub).exists():
            steps = ocp.utils.checkpoint_steps(root / sub)
            if steps:
                out[name] = max(steps)
                if name == "latest":
                    out["all"] = sorted(steps)
    return out


def restore_model(workdir: str, which: str = "best") -> tuple[dict, int]:
    """Restores only what inference needs: {params, batch_stats} as NumPy arrays.

    Args:
      workdir: the training workdir.
      which: "best", "latest" or a step number (as a string or int) of a training checkpoint.

    Returns:
      (variables, step).

    Raises:
      FileNotFoundError: with a one-line message when the workdir has no such checkpoint.
    """
    root = epath.Path(os.path.abspath(workdir))
    have = available(workdir)
    if which == "best" and have["best"] is not None:
        path = root / BEST_DIR / str(have["best"]) / "model"
        return _restore_tree(path), have["best"]
    if which == "best" or which == "latest":
        step = have["latest"]
    else:
        step = int(which)
        if step not in have["all"]:
            step = None
    if step is None:
        raise WorkdirError(f"{workdir}: no '{which}' checkpoint (have: best={have['best']}, "
                           f"latest steps={have['all']})")
    tree = _restore_tree(root / LATEST_DIR / str(step) / "state",
                         keys=("params", "batch_stats"))
    return tree, step


def _restore_tree(path: epath.Path, keys: tuple | None = None) -> dict:
    # The handler reads one item folder directly (the checkpointer would look for the step's
    # metadata file inside the item folder and warn).
    handler = ocp.PyTreeCheckpointHandler()
    metadata = handler.metadata(path).tree
    if keys is not None:
        metadata = {k: metadata[k] for k in keys}
    targets = _numpy_targets(metadata)
    tree = handler.restore(path, args=ocp.args.PyTreeRestore(
        item=targets, restore_args=ocp.checkpoint_utils.construct_restore_args(targets),
        partial_restore=True))
    return _to_numpy(tree)


def _numpy_targets(metadata):
    import jax

    return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
