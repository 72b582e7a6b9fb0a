"""Orbax checkpoints of a run: the latest K train states (with the data-iterator position) and,
separately, the best model by the validation metric.

Layout inside the workdir:

    checkpoints/<step>/{state, data_iter, progress, digest}   latest K, for resuming training
    best/<step>/{model, progress, digest}                      params + batch_stats only
    set_aside/<checkpoints|best>-<step>/                       steps moved out of the way

Keeping "best" in its own manager avoids orbax's trap where ``max_to_keep`` with a ``best_fn``
can delete the newest checkpoint, and keeps the inference copy small (no optimizer state).
``digest`` records a SHA-256 of every saved array; a restore recomputes it, so a flipped byte
is an error naming the step instead of other numbers. A restored step never has later steps
beside it: those (an unreadable newest step, or a best model from a future that is being
replayed) are set aside, so the replay saves its own.
Every process calls every method here, as orbax requires; only process 0 moves files.
"""

import json
import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxmm import paths
from jaxmm.errors import ConfigError, UserError, WorkdirError
from jaxmm.trained import digests
from jaxmm.trained.restoring import (  # noqa: F401 (the readers are part of this module's interface)
    _BEST_ITEMS,
    _DIGEST,
    _TRAIN_ITEMS,
    CheckpointError,
    _restore_tree,
    _to_numpy,
    _unreadable,
    _verify,
    available,
    restore_model,
)

log = logging.getLogger("jaxmm")


class DataPositionError(UserError, ValueError):
    """A checkpoint's data-iterator position lies outside the current training data."""


class _IteratorSnapshot:
    """Stands in for a grain iterator whose state was recorded when a batch was drawn."""

    def __init__(self, state):
        self._state = state

    def get_state(self) -> bytes:
        # Grain's handler decodes bytes from iterators that are not DatasetIterators.
        return json.dumps(self._state, indent=1).encode()


def _save_each_array_from_one_replica() -> None:
    """Makes orbax save a replicated array from one device instead of splitting it among its
    replicas ("replica-parallel" saving, on by default unless JAX_PLATFORMS names a GPU).

    Splitting compiles a slicing program for every (array shape, device) pair at the first save,
    while the training loop waits: on 4 devices the first save of the full-size train state
    blocked for 19-22 s instead of 7-10 s (docs/benchmarks.md). A train state of about a
    gigabyte gains nothing from several writers.
    Orbax keeps one handler per type for the whole process, so this applies process-wide.
    """
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def _manager(path: epath.Path, items: tuple, keep: int) -> ocp.CheckpointManager:
    # Two managers may save the same step at once; distinct barrier names keep their
    # multi-process barriers from colliding.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=path.name))
    return ocp.CheckpointManager(path, options=options, item_names=items)


def check_keep(keep: int) -> None:
    """Rejects a ``keep_checkpoints`` below 1 (nothing kept = nothing to resume from)."""
    if not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"config.keep_checkpoints={keep!r}: keep at least 1 training "
                         f"checkpoint, or a stopped or requeued run has nothing to resume from")


class Checkpoints:
    """The latest-K and best checkpoint managers of one workdir."""

    def __init__(self, workdir: str, keep: int):
        check_keep(keep)
        _save_each_array_from_one_replica()
        self.root = epath.Path(os.path.abspath(workdir))
        self._latest = _manager(self.root / paths.CHECKPOINTS_DIR, _TRAIN_ITEMS, keep)
        self._best = _manager(self.root / paths.BEST_DIR, _BEST_ITEMS, 1)

    def latest_step(self) -> int | None:
        """Step of the newest complete training checkpoint, or None on a fresh start."""
        return self._latest.latest_step()

    def steps(self) -> list[int]:
        """The kept training steps, oldest first."""
        return sorted(self._latest.all_steps())

    def save(self, step: int, state: dict, iterator_state, progress: dict) -> None:
        """Saves a train state asynchronously (a step already saved is kept); orbax copies the
        arrays to the host itself.

        Args:
          step: the train step the state is at.
          state: {step, params, batch_stats, opt_state[, ema_params]}: global replicated device
            arrays (``parallel.global_arrays``) or NumPy arrays.
          iterator_state: grain iterator state right after the last trained batch.
          progress: JSON-ready loop bookkeeping (epoch, best metric, history, ...).
        """
        if self._latest.latest_step() == step:
            return
        from grain import checkpoint as grain_checkpoint  # training only: inference never saves

        self._latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain_checkpoint.CheckpointSave(_IteratorSnapshot(iterator_state)),
            progress=ocp.args.JsonSave(progress),
            digest=ocp.args.JsonSave(digests.tree_digest(state))))

    def should_save(self, step: int, *, every: int, epoch_end: bool, stopping: bool) -> bool:
        """The save policy: every ``every`` steps, at every epoch end and when the run stops
        (a stop signal, early stopping, the last step); never twice for one step."""
        if self._latest.latest_step() == step:
            return False
        return stopping or epoch_end or step % every == 0

    def save_best(self, step: int, variables: dict, progress: dict) -> None:
        """Saves the inference variables {params, batch_stats} of a new best model.

        A best model already saved for this step or a later one (a replayed step, or a stale
        copy) is replaced.
        """
        self._best.wait_until_finished()
        for old in self._best.all_steps():
            if old >= step:
                self._best.delete(old)
        self._best.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(variables), progress=ocp.args.JsonSave(progress),
            digest=ocp.args.JsonSave(digests.tree_digest(variables))), force=True)

    def start_fresh(self) -> list[str]:
        """Before training from scratch: sets aside best models left by an earlier run.

        Returns:
          The folders that were moved (empty when there were none).
        """
        return self._set_aside_after(0)

    def restore(self, state_template: dict, data_iter, step: int | None = None
                ) -> tuple[dict, dict]:
        """Restores a train state into ``state_template``'s structure and moves ``data_iter``.

        Args:
          state_template: a NumPy pytree of the train state's structure, shapes and dtypes.
          data_iter: the grain iterator to move to the saved position.
          step: the kept step to restore; None = the newest readable one, falling back to
            older kept steps with a warning naming each unreadable step and file.

        Returns:
          (state, progress) with NumPy leaves. Kept steps (training and best) later than the
          restored one are set aside, so the replay saves its own.

        Raises:
          FileNotFoundError: ``step`` is not kept (the message lists the kept steps).
          CheckpointError: the chosen step, or every kept step, cannot be read or trusted.
          DataPositionError: the saved data position does not fit ``data_iter`` (no fallback:
            an older step was saved on the same data).
        """
        kept = self.steps()
        if step is not None and step not in kept:
            raise WorkdirError(f"{self.root / paths.CHECKPOINTS_DIR}: no checkpoint for "
                                    f"step {step} (kept steps: {kept})")
        errors = []
        for candidate in [step] if step is not None else kept[::-1]:
            try:
                out = self._restore_step(candidate, state_template, data_iter)
            except CheckpointError as e:
                errors.append(str(e))
                if step is None and candidate != kept[0]:
                    log.warning("%s; falling back to the previous kept step", e)
                continue
            for path in self._set_aside_after(candidate):
                log.warning("set aside %s (later than the restored step %d)", path,
                                candidate)
            return out
        start_over = f"move {self.root / paths.CHECKPOINTS_DIR} away to start over"
        others = [s for s in kept if s != step]
        if step is not None and others:
            raise CheckpointError(f"{errors[0]}; resume from another kept step with "
                                  f"--config.resume_step={others[-1]} (kept: {others})")
        raise CheckpointError(f"no kept checkpoint can be read ({'; '.join(errors)}); "
                              f"{start_over}")

    def _restore_step(self, step: int, state_template: dict, data_iter) -> tuple[dict, dict]:
        from grain import checkpoint as grain_checkpoint

        step_dir = self.root / paths.CHECKPOINTS_DIR / str(step)
        has_digest = (step_dir / _DIGEST).exists()
        items = dict(state=ocp.args.StandardRestore(_to_numpy(state_template)),
                     data_iter=grain_checkpoint.CheckpointRestore(data_iter),
                     progress=ocp.args.JsonRestore())
        if has_digest:
            items[_DIGEST] = ocp.args.JsonRestore()
        try:
            restored = self._latest.restore(step, args=ocp.args.Composite(**items))
        except IndexError as e:  # Grain: the saved position is past the end of the data.
            raise DataPositionError(
                f"checkpoint step {step}: its data position does not fit the current training "
                f"data ({e}); the prepared data, batch_size or num_epochs changed since it was "
                f"saved") from None
        except Exception as e:  # noqa: BLE001 - any other failure means "unreadable"
            raise _unreadable(step_dir, step, e) from e
        state = _to_numpy(restored.state)
        _verify(step_dir, step, state, restored[_DIGEST] if has_digest else None)
        return state, dict(restored.progress)

    def _set_aside_after(self, step: int) -> list[str]:
        later = [(sub, manager, s) for sub, manager in ((paths.CHECKPOINTS_DIR, self._latest),
                                                       (paths.BEST_DIR, self._best))
                 for s in manager.all_steps() if s > step]
        if not later:
            return []
        self.wait()
        moved = [_set_aside(self.root, sub, s) for sub, _, s in later]
        ocp.multihost.sync_global_processes("jaxmm_set_aside")
        self._latest.reload()
        self._best.reload()
        return moved

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._latest.close()
        self._best.close()


def _set_aside(root: epath.Path, sub: str, step: int) -> str:
    dest = os.path.join(root, paths.SET_ASIDE_DIR, f"{sub}-{step}")
    n = 1
    while os.path.exists(dest if n == 1 else f"{dest}.{n}"):
        n += 1
    dest = dest if n == 1 else f"{dest}.{n}"
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(os.path.join(root, sub, str(step)), dest)
    return dest


