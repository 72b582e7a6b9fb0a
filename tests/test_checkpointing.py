"""Orbax checkpoints: latest-K plus a separate best copy, data-iterator position, restore for
evaluation without the optimizer state."""

import grain
import numpy as np
import optax
import pytest

from jaxmm.training import checkpointing


def _state(step, value):
    params = {"image": {"w": np.full((2, 3), value, np.float32)},
              "head": {"b": np.full(3, value, np.float32)}}
    return {"step": np.int32(step), "params": params,
            "batch_stats": {"image": {"mean": np.full(3, value, np.float32)}},
            "opt_state": optax.adam(1e-3).init(params)}


def _iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def test_save_restore_latest_and_iterator_position(tmp_path):
    it = _iterator()
    ckpts = checkpointing.Checkpoints(str(tmp_path), keep=2)
    assert ckpts.latest_step() is None
    for step in (10, 20, 30):
        for _ in range(10):
            next(it)
        ckpts.save(step, _state(step, step), it.get_state(), {"epoch": step // 10})
    ckpts.close()
    assert checkpointing.available(str(tmp_path))["all"] == [20, 30]  # Only the latest 2 kept.

    fresh = _iterator()
    restored, progress = checkpointing.Checkpoints(str(tmp_path), 2).restore(_state(0, 0), fresh)
    assert int(restored["step"]) == 30 and progress == {"epoch": 3}
    np.testing.assert_array_equal(restored["params"]["head"]["b"], 30)
    assert next(fresh) == 30  # The data resumes right after the last saved batch.


def test_best_is_kept_separately_and_restores_without_optimizer(tmp_path):
    ckpts = checkpointing.Checkpoints(str(tmp_path), keep=1)
    state = _state(5, 1.0)
    ckpts.save_best(5, {"params": state["params"], "batch_stats": state["batch_stats"]},
                    {"epoch": 1})
    for step in (5, 9, 12):
        ckpts.save(step, _state(step, step), {"next_index": step}, {"epoch": 1})
    ckpts.close()
    variables, step = checkpointing.restore_model(str(tmp_path), "best")
    assert step == 5 and set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(variables["params"]["image"]["w"], 1.0)
    variables, step = checkpointing.restore_model(str(tmp_path), "latest")
    assert step == 12
    np.testing.assert_array_equal(variables["batch_stats"]["image"]["mean"], 12.0)
    with pytest.raises(FileNotFoundError, match="no '7' checkpoint"):
        checkpointing.restore_model(str(tmp_path), "7")


def test_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        checkpointing.restore_model(str(tmp_path / "nothing"), "best")


def test_missing_best_is_an_error_listing_what_exists_never_the_latest_step(tmp_path):
    # A run stopped before its first validation has training steps but no best model.
    ckpts = checkpointing.Checkpoints(str(tmp_path), keep=2)
    for step in (3, 6):
        ckpts.save(step, _state(step, step), {"next_index": step}, {"epoch": 0})
    ckpts.close()
    with pytest.raises(FileNotFoundError, match=r"no best checkpoint .*\[3, 6\]") as err:
        checkpointing.restore_model(str(tmp_path), "best")
    assert "\n" not in str(err.value) and "--checkpoint latest" in str(err.value)


@pytest.mark.parametrize("keep", [0, -1])
def test_keeping_no_checkpoint_is_rejected(tmp_path, keep):
    with pytest.raises(ValueError, match=f"keep_checkpoints={keep}: keep at least 1"):
        checkpointing.Checkpoints(str(tmp_path), keep=keep)


def test_replicated_state_is_saved_from_one_replica_without_compiling(tmp_path, caplog):
    """A state replicated on the 4 devices, as the training loop saves it: orbax must not split
    each array among the replicas, which compiles a slicing program per shape and device while
    training waits."""
    import logging

    import jax

    from jaxmm.training import parallel

    # Shapes that split evenly over 4 replicas (orbax splits nothing else).
    state = {"step": np.int32(3), "params": {"w": np.full((8, 4), 2.0, np.float32),
                                             "b": np.full(16, 2.0, np.float32)}}
    ckpts = checkpointing.Checkpoints(str(tmp_path), keep=1)
    view = parallel.global_arrays(parallel.put_replicated(state))
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            ckpts.save(3, view, {"next_index": 3}, {"epoch": 1})
            ckpts.close()
    finally:
        jax.config.update("jax_log_compiles", False)
    slices = [r.getMessage() for r in caplog.records if "jit(slice)" in r.getMessage()]
    assert not slices, slices[:3]
    template = jax.tree.map(np.zeros_like, state)
    restored, _ = checkpointing.Checkpoints(str(tmp_path), 1).restore(template, _iterator())
    np.testing.assert_array_equal(restored["params"]["w"], 2.0)
