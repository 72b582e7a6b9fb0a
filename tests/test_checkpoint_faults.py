"""Damaged and half-finished checkpoints: a flipped byte, an unreadable newest step, a best
model committed without its training checkpoint, a stale best model before a fresh start."""

import json
import os

import grain
import numpy as np
import optax
import pytest

from jaxmm import paths
from jaxmm.training import checkpointing


def _weights(value):
    # Random and big enough that orbax stores the bytes as they are (a flip changes numbers).
    noise = np.random.default_rng(int(value * 10)).standard_normal((200, 200))
    return (value + noise).astype(np.float32)


def _state(step, value):
    params = {"w": _weights(value), "b": np.full(3, value, np.float32)}
    return {"step": np.int32(step), "params": params,
            "batch_stats": {"mean": np.full(3, value, np.float32)},
            "opt_state": optax.adam(1e-3).init(params)}


def _variables(value):
    state = _state(0, value)
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def _iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save_run(workdir, steps=(10, 20), best=None):
    """Training checkpoints at ``steps`` (iterator at the step), and a best model if given."""
    ckpts = checkpointing.Checkpoints(workdir, keep=len(steps))
    it = _iterator()
    for step in steps:
        while it.get_state()["next_index"] < step:
            next(it)
        ckpts.save(step, _state(step, step), it.get_state(), {"epoch": step})
    if best is not None:
        ckpts.save_best(best, _variables(best), {"epoch": best})
    ckpts.close()


def _largest_data_file(item_dir):
    # Array bytes live in the data folders ("d") of orbax's OCDBT store.
    files = [os.path.join(d, f) for d, _, fs in os.walk(item_dir) for f in fs
             if os.path.basename(d) == "d"]
    return max(files, key=os.path.getsize)


def _flip_byte(item_dir):
    """Flips one bit in the middle of the largest array data file of an orbax item folder."""
    path = _largest_data_file(item_dir)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)


def test_a_flipped_byte_in_the_best_model_is_a_one_line_error_naming_the_step(tmp_path):
    workdir = str(tmp_path)
    _save_run(workdir, steps=(10,), best=10)
    variables, step = checkpointing.restore_model(workdir, "best")
    np.testing.assert_array_equal(variables["params"]["w"], _weights(10))
    _flip_byte(tmp_path / paths.BEST_DIR / "10" / "model")
    with pytest.raises(checkpointing.CheckpointError, match="step 10 is corrupt") as err:
        checkpointing.restore_model(workdir, "best")
    assert "params" in str(err.value) and "\n" not in str(err.value)


def test_a_flipped_byte_in_a_training_step_is_detected_when_resuming(tmp_path):
    workdir = str(tmp_path)
    _save_run(workdir)
    _flip_byte(tmp_path / paths.CHECKPOINTS_DIR / "20" / "state")
    with pytest.raises(checkpointing.CheckpointError, match="step 20 is corrupt"):
        checkpointing.restore_model(workdir, "20")
    with pytest.raises(checkpointing.CheckpointError, match="step 20 is corrupt"):
        checkpointing.Checkpoints(workdir, 2).restore(_state(0, 0), _iterator(), step=20)


def _truncate_array_file(step_dir):
    path = _largest_data_file(step_dir / "state")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])
    return 'state/: ValueError: OUT_OF_RANGE: Error reading "params.w'  # The array named.


def _remove_metadata(step_dir):
    os.remove(step_dir / "state" / "_METADATA")
    return "state/_METADATA"


def _garbage_progress(step_dir):
    (step_dir / "progress" / "metadata").write_text("{not json")
    return "progress/metadata"


@pytest.mark.parametrize("damage", [_truncate_array_file, _remove_metadata, _garbage_progress])
def test_an_unreadable_newest_step_names_step_and_file_and_falls_back(tmp_path, damage, caplog):
    workdir = str(tmp_path)
    _save_run(workdir)
    broken = damage(tmp_path / paths.CHECKPOINTS_DIR / "20")

    ckpts = checkpointing.Checkpoints(workdir, 2)
    with pytest.raises(checkpointing.CheckpointError, match="step 20 cannot be read") as err:
        ckpts.restore(_state(0, 0), _iterator(), step=20)
    assert broken in str(err.value) and "\n" not in str(err.value)
    assert "--config.resume_step=10" in str(err.value)

    it = _iterator()
    state, progress = ckpts.restore(_state(0, 0), it)  # Newest first: 20 fails, 10 is used.
    assert int(state["step"]) == 10 and progress == {"epoch": 10} and next(it) == 10
    assert any("step 20 cannot be read" in r.getMessage() for r in caplog.records)
    # The unreadable step is moved out of the way, so the replay can save step 20 again.
    assert ckpts.steps() == [10]
    assert os.path.isdir(tmp_path / paths.SET_ASIDE_DIR / f"{paths.CHECKPOINTS_DIR}-20")
    ckpts.save(20, _state(20, 20), {"next_index": 20}, {"epoch": 20})
    ckpts.close()
    assert checkpointing.available(workdir)["all"] == [10, 20]
    variables, _ = checkpointing.restore_model(workdir, "20")
    np.testing.assert_array_equal(variables["params"]["w"], _weights(20))


def test_no_readable_step_is_one_error_listing_each(tmp_path):
    _save_run(str(tmp_path))
    for step in ("10", "20"):
        _garbage_progress(tmp_path / paths.CHECKPOINTS_DIR / step)
    with pytest.raises(checkpointing.CheckpointError, match="no kept checkpoint can be read"
                       ) as err:
        checkpointing.Checkpoints(str(tmp_path), 2).restore(_state(0, 0), _iterator())
    assert "step 20" in str(err.value) and "step 10" in str(err.value)


def test_a_replayed_step_replaces_its_own_best_model(tmp_path):
    # Killed after best/20 was committed but before checkpoints/20: the rerun resumes at 10,
    # replays to 20 and saves best/20 and checkpoints/20 again.
    workdir = str(tmp_path)
    _save_run(workdir, steps=(10,), best=20)
    ckpts = checkpointing.Checkpoints(workdir, 2)
    state, _ = ckpts.restore(_state(0, 0), _iterator())
    assert int(state["step"]) == 10
    ckpts.save_best(20, _variables(20.5), {"epoch": 2})
    ckpts.save_best(20, _variables(21), {"epoch": 2})  # Even twice in one process.
    ckpts.save(20, _state(20, 20), {"next_index": 20}, {"epoch": 2})
    ckpts.close()
    variables, step = checkpointing.restore_model(workdir, "best")
    assert step == 20
    np.testing.assert_array_equal(variables["params"]["w"], _weights(21))


def test_a_fresh_start_sets_aside_a_stale_best_model(tmp_path):
    # checkpoints/ was removed (e.g. to recover from damage) but best/30 is still there.
    workdir = str(tmp_path)
    _save_run(workdir, steps=(30,), best=30)
    os.rename(tmp_path / paths.CHECKPOINTS_DIR, tmp_path / "removed")
    ckpts = checkpointing.Checkpoints(workdir, 2)
    assert ckpts.latest_step() is None
    moved = ckpts.start_fresh()
    assert moved and moved[0].endswith(f"{paths.BEST_DIR}-30")
    assert checkpointing.available(workdir)["best"] is None  # Never the other run's model.
    ckpts.save_best(5, _variables(5), {"epoch": 1})
    ckpts.close()
    variables, step = checkpointing.restore_model(workdir, "best")
    assert step == 5
    np.testing.assert_array_equal(variables["params"]["w"], _weights(5))


def test_a_best_model_is_saved_even_when_a_later_stale_one_exists(tmp_path):
    workdir = str(tmp_path)
    _save_run(workdir, steps=(30,), best=30)
    ckpts = checkpointing.Checkpoints(workdir, 2)
    ckpts.save_best(5, _variables(5), {"epoch": 1})
    ckpts.close()
    assert checkpointing.restore_model(workdir, "best")[1] == 5


def test_a_data_position_past_the_end_of_the_data_is_one_line_without_fallback(tmp_path):
    _save_run(str(tmp_path))
    shorter = iter(grain.MapDataset.range(15).to_iter_dataset())  # The data shrank.
    with pytest.raises(checkpointing.DataPositionError, match="step 20: its data position") as e:
        checkpointing.Checkpoints(str(tmp_path), 2).restore(_state(0, 0), shorter)
    assert "\n" not in str(e.value)


def test_evaluate_and_predict_without_best_model_name_what_exists(tmp_path):
    # A run stopped before its first validation: config.json and training steps, no best/.
    import subprocess
    import sys

    from tests.support import REPO as ROOT
    from tests.support import env as _env

    workdir = str(tmp_path / "run")
    _save_run(workdir)
    model = {"class_names": ["a", "b"], "architecture": {"modalities": ["text"]},
             "preprocessing": {"stored_size": 8, "crop_size": 8, "max_text_length": 4}}
    with open(os.path.join(workdir, paths.CONFIG_FILE), "w") as f:
        json.dump({"record_version": 2, "config": {}, "class_names": ["a", "b"],
                   "model": model}, f)
    image = tmp_path / "x.png"
    image.write_bytes(b"never read: the checkpoint is looked up first")
    for command in (["jaxmm.evaluate", "--workdir", workdir],
                    ["jaxmm.predict", "--workdir", workdir, str(image)]):
        out = subprocess.run([sys.executable, "-m", *command], env=_env(1), capture_output=True,
                             text=True, timeout=300, cwd=ROOT)
        lines = [line for line in out.stderr.splitlines() if "error:" in line]
        assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
        assert "no best checkpoint" in lines[0] and "[10, 20]" in lines[0], lines[0]
        assert "--checkpoint latest" in lines[0] and "(best)" not in out.stdout
