"""The workdir lock: a live holder blocks with one line naming it, a gone one never blocks."""

import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from jaxmm import paths
from jaxmm.training import lock

_HOLD = textwrap.dedent("""
    import sys, time
    from jaxmm.training import lock
    with lock.WorkdirLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


def _write_lock(workdir, **fields):
    record = dataclasses.asdict(lock.this_process())
    record.update(fields)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, paths.LOCK_FILE), "w") as f:
        json.dump(record, f)


def _fake_slurm(tmp_path, monkeypatch, squeue_output, code=0):
    """Puts a fake ``squeue`` (and nothing else) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho '{squeue_output}'\nexit {code}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def _first_line(proc, timeout=120) -> str:
    """The first line ``proc`` prints; fails (and kills it) when none comes within timeout."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"no output from the lock holder within {timeout} s")
    return proc.stdout.readline()


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_run_refuses_at_once_naming_the_holder(tmp_path):
    env = {**os.environ, "SLURM_JOB_ID": "4242",
           "PYTHONPATH": os.path.dirname(os.path.dirname(lock.__file__))}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert _first_line(holder).strip() == "held"
        with pytest.raises(lock.WorkdirLockedError) as err:
            lock.WorkdirLock(str(tmp_path)).acquire()
        message = str(err.value)
        assert "\n" not in message
        for part in (socket.gethostname(), f"pid {holder.pid}", "Slurm job 4242",
                     paths.LOCK_FILE):
            assert part in message
        # kill -9 leaves the file behind; the holder is gone, so the lock no longer blocks.
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert os.path.exists(tmp_path / paths.LOCK_FILE)
        with lock.WorkdirLock(str(tmp_path)) as held:
            assert lock.read_holder(held.path).pid == os.getpid()
        assert not os.path.exists(tmp_path / paths.LOCK_FILE)  # Released on exit.
    finally:
        holder.kill()
        holder.wait()


def test_two_holders_in_one_process_and_release(tmp_path):
    first = lock.WorkdirLock(str(tmp_path))
    first.acquire()
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
        lock.WorkdirLock(str(tmp_path)).acquire()
    first.release()
    with lock.WorkdirLock(str(tmp_path)):
        pass


def test_a_dead_process_on_this_host_does_not_block(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), token="old")
    with lock.WorkdirLock(str(tmp_path)) as held:
        assert lock.read_holder(held.path).token == held.me.token


def test_a_reused_pid_does_not_block(tmp_path):
    _write_lock(tmp_path, pid=os.getpid(), pid_start="1", token="old")
    with lock.WorkdirLock(str(tmp_path)):
        pass


def test_another_host_blocks_when_nothing_can_tell(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # No squeue, no scontrol.
    _write_lock(tmp_path, host="node-7", pid=1, job_id="77", token="old")
    with pytest.raises(lock.WorkdirLockedError, match="host node-7, pid 1, Slurm job 77"):
        lock.WorkdirLock(str(tmp_path)).acquire()


@pytest.mark.parametrize("squeue,code,blocks", [
    ("RUNNING", 0, True),
    ("PENDING", 0, False),
    ("", 0, False),  # Finished long ago: squeue no longer lists it.
    ("slurm_load_jobs error: Invalid job id specified", 1, False),
])
def test_a_slurm_job_that_is_not_running_does_not_block(tmp_path, monkeypatch, squeue, code,
                                                        blocks):
    _fake_slurm(tmp_path, monkeypatch, squeue, code)
    workdir = tmp_path / "run"
    _write_lock(workdir, host="node-7", pid=1, job_id="77", token="old")
    held = lock.WorkdirLock(str(workdir))
    if blocks:
        with pytest.raises(lock.WorkdirLockedError, match="Slurm job 77"):
            held.acquire()
    else:
        held.acquire()
        assert lock.read_holder(held.path).token == held.me.token


def test_a_requeued_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _write_lock(tmp_path, host="node-7", pid=1, job_id="77", restart=0, token="old")
    with lock.WorkdirLock(str(tmp_path)):
        pass
    _write_lock(tmp_path, host="node-7", pid=1, job_id="77", restart=1, token="old")
    with pytest.raises(lock.WorkdirLockedError):  # Same job, same run: a second srun step.
        lock.WorkdirLock(str(tmp_path)).acquire()


def test_only_the_owner_process_takes_the_lock(tmp_path):
    with lock.WorkdirLock(str(tmp_path), owner=False):
        assert not os.path.exists(tmp_path / paths.LOCK_FILE)


@pytest.mark.parametrize("content", [
    "{half", '{"host": "h", "pid": "abc"}', '{"host": "h", "pid": true}',
    '{"host": "h", "pid": -5}', '{"host": "h", "pid": 1.5}', '{"host": 3, "pid": 7}',
    '{"host": "h", "pid": 7, "restart": "x"}', "[1, 2]"])
def test_an_unreadable_or_damaged_lock_blocks_with_the_file_named(tmp_path, content):
    (tmp_path / paths.LOCK_FILE).write_text(content)
    with pytest.raises(lock.WorkdirLockedError, match="cannot be read; delete it"):
        lock.WorkdirLock(str(tmp_path)).acquire()
