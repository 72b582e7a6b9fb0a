"""Resuming the training loop when things went wrong: a kill between the best model and the
training checkpoint, a stale best model, more epochs on a finished run, an unreadable newest
step, changed data or classes, a busy workdir. Runs in-process on the tiny demo settings."""

import json
import os
import re
import shutil

import pytest

from jaxmm import errors, paths
from jaxmm.data import prepared
from jaxmm.trained.workdir import data_changes
from jaxmm.training import checkpointing, lock, loop
from tests.support import tiny_config


class _Killed(Exception):
    """Stands in for kill -9 at a chosen point of the loop."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):

    path = str(tmp_path_factory.mktemp("demo_data"))
    prepared.ensure_prepared(tiny_config(path))
    return path


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run (2 epochs): its workdir and summary."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    summary = loop.train_and_evaluate(tiny_config(data_dir), workdir)
    assert summary["status"] == "finished"
    return workdir, summary


def _copy(reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    return workdir


def _same_result(got, ref):
    assert got["status"] == ref["status"] and got["step"] == ref["step"]
    assert got["best_step"] == ref["best_step"]
    assert got["params_abs_sum"] == pytest.approx(ref["params_abs_sum"], rel=1e-6)
    assert got["best_validation"] == pytest.approx(ref["best_validation"], rel=1e-6)


def _record_restores(monkeypatch) -> list[int]:
    """The steps the loop restores from, in order (nothing for a fresh start): a rerun that
    retrained from step 0 would end with the same numbers, since training is deterministic."""
    restored = []
    original = checkpointing.Checkpoints.restore

    def restore(self, *args, **kwargs):
        host, saved = original(self, *args, **kwargs)
        restored.append(int(host["step"]))
        return host, saved

    monkeypatch.setattr(checkpointing.Checkpoints, "restore", restore)
    return restored


def _snapshot(workdir):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, fs in os.walk(workdir) for f in fs}


def test_killed_between_best_and_training_checkpoint_then_rerun_equals_uninterrupted(
        data_dir, reference, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    config = tiny_config(data_dir)
    original_save = checkpointing.Checkpoints.save
    best_dir = os.path.join(workdir, paths.BEST_DIR)

    def save_then_die(self, step, *args):
        if step == reference[1]["best_step"]:  # The epoch end that saved best/N.
            self.wait()
            assert os.path.isdir(os.path.join(best_dir, str(step)))
            raise _Killed  # best/N is committed; checkpoints/N never will be.
        return original_save(self, step, *args)

    monkeypatch.setattr(checkpointing.Checkpoints, "save", save_then_die)
    with pytest.raises(_Killed):
        loop.train_and_evaluate(config, workdir)
    monkeypatch.undo()
    assert checkpointing.available(workdir)["best"] == reference[1]["best_step"]
    kept = checkpointing.available(workdir)
    assert reference[1]["best_step"] not in kept["all"]
    assert 0 < kept["latest"] < reference[1]["best_step"]
    restored = _record_restores(monkeypatch)
    _same_result(loop.train_and_evaluate(config, workdir), reference[1])
    assert restored == [kept["latest"]]


def test_fresh_start_beside_a_stale_best_model(data_dir, reference, tmp_path, monkeypatch):
    workdir = _copy(reference, tmp_path)
    shutil.rmtree(os.path.join(workdir, paths.CHECKPOINTS_DIR))  # The usual recovery.
    # The fresh run reaches the same steps, so it saves best/N again where best/N exists.
    restored = _record_restores(monkeypatch)
    summary = loop.train_and_evaluate(tiny_config(data_dir), workdir)
    assert restored == []  # nothing to resume: the stale best model is not a starting point
    _same_result(summary, reference[1])
    assert checkpointing.available(workdir)["best"] == summary["best_step"]
    assert os.listdir(os.path.join(workdir, paths.SET_ASIDE_DIR)) == [
        f"{paths.BEST_DIR}-{reference[1]['best_step']}"]


def test_more_epochs_on_a_finished_run_trains_them(data_dir, reference, tmp_path,
                                                   monkeypatch):
    workdir = _copy(reference, tmp_path)
    restored = _record_restores(monkeypatch)
    summary = loop.train_and_evaluate(tiny_config(data_dir, num_epochs=3), workdir)
    assert summary["status"] == "finished" and summary["epochs_completed"] == 3
    assert summary["step"] == reference[1]["step"] * 3 // 2
    assert restored == [reference[1]["step"]]
    rows = [json.loads(line) for line in open(os.path.join(workdir, paths.METRICS_FILE))]
    assert [r["epoch"] for r in rows if r["kind"] == "val"] == [1, 2, 3]


def test_an_unreadable_newest_step_falls_back_and_ends_like_an_uninterrupted_run(
        data_dir, reference, tmp_path, monkeypatch):
    workdir = _copy(reference, tmp_path)
    kept = checkpointing.available(workdir)["all"]
    newest = kept[-1]
    progress = os.path.join(workdir, paths.CHECKPOINTS_DIR, str(newest), "progress", "metadata")
    with open(progress, "w") as f:
        f.write("{garbage")
    restored = _record_restores(monkeypatch)
    _same_result(loop.train_and_evaluate(tiny_config(data_dir), workdir), reference[1])
    assert restored == [kept[-2]]  # the newest readable step


def test_resume_step_must_be_a_kept_step(data_dir, reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    kept = checkpointing.available(workdir)["all"]
    with pytest.raises(FileNotFoundError, match=re.escape(f"no checkpoint for step 1 (kept "
                                                          f"steps: {kept})")):
        loop.train_and_evaluate(tiny_config(data_dir, resume_step=1), workdir)


def _edit_record(workdir, edit):
    path = os.path.join(workdir, paths.CONFIG_FILE)
    record = json.load(open(path))
    edit(record)
    json.dump(record, open(path, "w"))


def test_a_resume_against_another_class_list_is_refused_before_anything_is_written(
        data_dir, reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    _edit_record(workdir, lambda r: r.update(class_names=r["class_names"][:-1] + ["Other"]))
    before = _snapshot(workdir)
    with pytest.raises(errors.WorkdirError, match="a resume cannot change the class list"):
        loop.train_and_evaluate(tiny_config(data_dir), workdir)
    assert _snapshot(workdir) == before


def test_changed_data_is_refused_naming_the_change_unless_allowed(data_dir, reference,
                                                                  tmp_path):
    workdir = _copy(reference, tmp_path)
    data = json.load(open(os.path.join(workdir, paths.CONFIG_FILE)))["data"]
    assert data["fingerprint"] and data["counts"]["train"]  # What prepare computed.
    train = data["num_examples"]["train"]
    _edit_record(workdir, lambda r: r["data"]["num_examples"].update(train=train - 5))
    with pytest.raises(errors.WorkdirError, match=rf"num_examples.train: {train - 5} -> {train}.*"
                                         r"allow_data_change=True") as err:
        loop.train_and_evaluate(tiny_config(data_dir), workdir)
    assert "\n" not in str(err.value)
    record = json.load(open(os.path.join(workdir, paths.CONFIG_FILE)))
    summary = loop.train_and_evaluate(tiny_config(data_dir, allow_data_change=True), workdir)
    assert summary["status"] == "finished"
    # The run record keeps what the run started with.
    assert json.load(open(os.path.join(workdir, paths.CONFIG_FILE))) == record


def test_a_data_position_past_the_data_is_one_line(data_dir, reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    with pytest.raises(checkpointing.DataPositionError, match="data position does not fit"):
        loop.train_and_evaluate(tiny_config(data_dir, num_epochs=1), workdir)


def test_a_busy_workdir_is_refused_at_once(data_dir, reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    with lock.WorkdirLock(workdir):
        before = _snapshot(workdir)
        with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
            loop.train_and_evaluate(tiny_config(data_dir), workdir)
        assert _snapshot(workdir) == before


def test_keeping_no_checkpoint_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints=0"):
        loop.train_and_evaluate(tiny_config(data_dir, keep_checkpoints=0), str(tmp_path))


def test_the_data_record_names_what_changed():
    old = {"fingerprint": "a", "class_names": ["x", "y"], "num_examples": {"train": 10},
           "counts": {"train": {"x": 4, "y": 6}}, "options": {"stored_image_size": 80}}
    assert data_changes(old, old) == []
    new = json.loads(json.dumps(old))
    new["fingerprint"] = "b"
    assert "raw files" in data_changes(old, new)[0]
    new["counts"]["train"]["x"] = 5
    new["options"]["stored_image_size"] = 96
    assert data_changes(old, new) == ["counts.train.x: 4 -> 5",
                                                 "options.stored_image_size: 80 -> 96"]

