"""The training loop end to end on tiny demo settings: artefacts, exact resume after SIGKILL,
SIGTERM/SIGUSR1 save-and-exit, the non-finite guard, and a 2-process jax.distributed run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.support import REPO as ROOT
from tests.support import env, tiny_config
from tests.support import train_cmd as _train_cmd
from tests.support import wait_for_checkpoint as _wait_for_checkpoint


def _env(devices: int = 4) -> dict:
    # Every run here is the shipped command line, so it uses the shipped (threefry) keys.
    return env(devices, shipped_prng=True)


def _summary(workdir):
    with open(os.path.join(workdir, "train_summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One synthetic dataset, prepared once, shared by every run in this module."""
    from jaxmm.data import prepared

    path = str(tmp_path_factory.mktemp("demo_data"))
    prepared.ensure_prepared(tiny_config(path))
    return path


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """An uninterrupted subprocess run: the baseline for resume and multi-process checks."""
    workdir = tmp_path_factory.mktemp("reference")
    out = subprocess.run(_train_cmd(workdir, data_dir), env=_env(), capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def test_run_leaves_every_artefact(reference_run):
    summary = _summary(reference_run)
    assert summary["status"] == "finished" and summary["epochs_completed"] == 2
    for name in ("metrics.jsonl", "config.json", "learning_curves.png", "tensorboard",
                 "calibration.json"):
        assert os.path.exists(os.path.join(reference_run, name)), name
    config = json.load(open(os.path.join(reference_run, "config.json")))
    assert config["run"]["device_count"] == 4 and config["run"]["versions"]["jax"]
    rows = [json.loads(line) for line in open(os.path.join(reference_run, "metrics.jsonl"))]
    assert {r["kind"] for r in rows} == {"train", "val"}
    assert all(np.isfinite(r["loss"]) for r in rows)
    # Where the run's time went: every phase of a finished run, adding up to its total.
    seconds = summary["seconds"]
    assert list(seconds) == ["prepare", "startup", "compile", "train", "validation",
                             "checkpoints", "calibration", "other", "total"]
    assert all(v >= 0 for v in seconds.values())
    assert sum(seconds.values()) - seconds["total"] == pytest.approx(seconds["total"], abs=0.01)
    assert seconds["compile"] >= summary["compile_seconds"] - 0.01


def _wait_for_train_row(workdir, proc, step, timeout=300):
    """Returns once metrics.jsonl holds a train row at ``step`` or later."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.endswith("\n")]
            if any(r["kind"] == "train" and r["step"] >= step for r in rows):
                return
        assert proc.poll() is None, f"training exited before step {step}"
        time.sleep(0.05)
    raise AssertionError(f"no train row at step {step} within {timeout} s")


KILL_SEED = 0  # the kill step is drawn from it: every run of the test kills at the same step


def test_sigkill_then_resume_equals_uninterrupted(reference_run, data_dir, tmp_path):
    """Both halves draw their batches in a prefetch thread (config.prefetch_thread), the
    reference in line: the thread changes neither the batches nor the saved data position."""
    from jaxmm.training import checkpointing

    ref = _summary(reference_run)
    per_epoch = ref["step"] // ref["epochs_completed"]
    # A logged step of the first epoch past the first checkpoint (every 3 steps); the second
    # epoch (its evaluation and saves) is still ahead when the kill lands.
    kill_at = int(np.random.default_rng(KILL_SEED).integers(4, per_epoch + 1))
    cmd = _train_cmd(tmp_path, data_dir, prefetch_thread=True)
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_train_row(tmp_path, proc, kill_at)
    assert proc.poll() is None, "the run ended before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = checkpointing.available(str(tmp_path))["latest"]
    assert saved is not None and 0 < saved < ref["step"], saved
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    # It went on from the newest checkpoint, not from step 0 (training is deterministic, so
    # a restart from scratch would end with the same numbers).
    assert f"Resumed from step {saved} " in out.stderr, out.stderr[-3000:]
    got = _summary(tmp_path)
    assert got["step"] == ref["step"]
    assert got["params_abs_sum"] == pytest.approx(ref["params_abs_sum"], rel=1e-6)
    assert got["best_validation"] == pytest.approx(ref["best_validation"], rel=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_exits_75_and_resumes(data_dir, tmp_path, sig):
    # More epochs than the reference, so the signal surely lands mid-training; with SIGUSR1
    # the batches come from a prefetch thread, which must not keep the process from exiting.
    cmd = _train_cmd(tmp_path, data_dir, num_epochs=4,
                     prefetch_thread=sig == signal.SIGUSR1)
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "run the same command to resume" in err
    from jaxmm.training import checkpointing

    saved = checkpointing.available(str(tmp_path))["latest"]
    assert saved is not None
    if sig != signal.SIGTERM:
        return  # the resume does not depend on which signal stopped the run: checked once
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Resumed from step {saved}" in out.stderr
    summary = _summary(tmp_path)
    assert summary["status"] == "finished" and summary["epochs_completed"] == 4


def test_non_finite_loss_stops_with_clear_message(data_dir, tmp_path):
    out = subprocess.run(_train_cmd(tmp_path, data_dir, **{"optim.lr_head": "nan",
                                                          "optim.warmup_epochs": 0}),
                         env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 1
    assert "non-finite loss" in out.stderr
    assert "Traceback" not in out.stderr
    from jaxmm.training import checkpointing

    # Nothing non-finite was saved: no checkpoint at all, since the first save comes later.
    assert checkpointing.available(str(tmp_path))["latest"] is None


def test_unknown_config_key_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxmm.train", "--config",
                          os.path.join(ROOT, "configs/demo.py"), "--workdir", str(tmp_path),
                          "--config.batch_sise=8"], env=_env(), capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "batch_sise" in lines[0], out.stderr


@pytest.mark.slow
def test_two_processes_match_one_process(reference_run, data_dir, tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        _train_cmd(tmp_path, data_dir, f"--coordinator_address=localhost:{port}",
                   "--num_processes=2", f"--process_id={i}"),
        env=_env(devices=2), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    got, ref = _summary(tmp_path), _summary(reference_run)
    config = json.load(open(os.path.join(tmp_path, "config.json")))
    assert config["run"]["process_count"] == 2 and config["run"]["device_count"] == 4
    assert got["step"] == ref["step"]
    # Same global batches on the same 4 devices; only reduction order may differ.
    assert got["params_abs_sum"] == pytest.approx(ref["params_abs_sum"], rel=1e-4)
    assert got["best_validation"]["accuracy"] == pytest.approx(
        ref["best_validation"]["accuracy"], abs=1e-6)
