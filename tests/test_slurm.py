"""End-to-end checks of slurm/jax_train.sh and slurm/evaluate.sh on a running Slurm cluster.

Needs `sbatch` and an idle node (`.ci/slurm_up.sh` starts a one-node cluster as root); skipped
otherwise. The jobs train the demo config on a CPU-only allocation: 2 tasks (2 JAX processes,
each with 2 fake CPU devices), tiny images and 2 epochs. A second run is sent the time-limit
warning signal mid-training and must be requeued, resume from its checkpoint and end with the
same result as the uninterrupted run.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support import JOB_TIMEOUT_S, Cluster
from tests.support import REPO as _REPO
from tests.support import SLURM_TINY as TINY
from tests.support import require_cluster as _require_cluster
from tests.support import run_quiet as _run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(_REPO)
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
# 2 processes x 2 fake devices; --cpus-per-task=1 -> the script passes num_workers=0.
SBATCH_CPU = ["--gpus-per-node=0", "--ntasks=2", "--cpus-per-task=1", "--time=15"]


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge seconds)."""
    fields = {}
    for item in _run(["scontrol", "show", "job", "-o", job]).split():
        key, _, value = item.partition("=")
        fields[key] = value
    return fields


def wait_for(job: str, cluster: Cluster, until, what: str, timeout_s: float = JOB_TIMEOUT_S,
             poll_s: float = 1.0):
    """Polls the job until ``until(info)`` holds; fails with the job's log otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = job_info(job)
        if until(info):
            return info
        if info["JobState"] in DONE_STATES:
            break
        time.sleep(poll_s)
    pytest.fail(f"job {job} not {what} (state {info['JobState']}); log:\n{cluster.log(job)}")


def wait_done(job: str, cluster: Cluster) -> dict[str, str]:
    return wait_for(job, cluster, lambda i: i["JobState"] in DONE_STATES, "done")


def assert_completed(info: dict[str, str], cluster: Cluster) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.log(info["JobId"])


def read_json(path: Path):
    return json.loads(path.read_text())


def _training_pids(workdir: Path) -> list[int]:
    """Process ids of the Python training tasks of ``workdir`` on this machine (not srun's)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if (entry.isdigit() and os.path.basename(argv[0]).startswith(b"python")
                and b"jaxmm.train" in argv and str(workdir).encode() in argv):
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _require_cluster()
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    yield c
    c.cancel_all()


@pytest.fixture(scope="module")
def train_args(cluster):
    return [f"--config.data_dir={cluster.tmp / 'demo_data'}", *TINY]


@pytest.fixture(scope="module")
def baseline(cluster, train_args):
    """An uninterrupted 2-process training job; returns (job info, workdir)."""
    workdir = cluster.tmp / "run_plain"
    job = cluster.submit("slurm/jax_train.sh", "train_plain", SBATCH_CPU, train_args,
                         CONFIG="configs/demo.py", WORKDIR=str(workdir))
    return wait_done(job, cluster), workdir


def test_two_process_training_job(cluster, baseline):
    info, workdir = baseline
    assert_completed(info, cluster)
    assert info["Restarts"] == "0"
    log = cluster.log(info["JobId"])
    assert "2 task(s)" in log and "training finished" in log and "requeueing job" not in log
    assert read_json(workdir / "config.json")["run"]["process_count"] == 2
    assert (workdir / "metrics.jsonl").read_text().strip()
    assert any((workdir / "checkpoints").iterdir())
    assert read_json(workdir / "train_summary.json")["status"] == "finished"


def test_warning_signal_requeues_and_resumes(cluster, baseline, train_args):
    workdir = cluster.tmp / "run_requeued"
    job = cluster.submit("slurm/jax_train.sh", "train_requeued", SBATCH_CPU, train_args,
                         CONFIG="configs/demo.py", WORKDIR=str(workdir))
    metrics = workdir / "metrics.jsonl"
    # Both processes are in the training loop (signal handlers installed) once step 1 is logged.
    wait_for(job, cluster, lambda i: metrics.exists() and metrics.stat().st_size > 0,
             "training", poll_s=0.05)
    # The training processes are held still (SIGSTOP: the cluster is this machine) while the
    # signal is delivered, so that it lands mid-training however fast the machine is. What
    # Slurm does before the time limit with --signal=B:USR1@N reaches the batch shell, which
    # forwards it; here the tasks also get it directly, pending until they go on.
    pids = _training_pids(workdir)
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        complete = metrics.read_text().split("\n")[:-1]  # a stopped writer may leave half a row
        logged = [json.loads(line)["step"] for line in complete]
        total = read_json(baseline[1] / "train_summary.json")["step"]
        assert max(logged) < total - 1, f"the run was at step {max(logged)} of {total}"
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        _run(["scancel", "--signal=USR1", "--batch", job])
        deadline = time.monotonic() + 60
        while "received SIGUSR1" not in cluster.log(job) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    info = wait_for(job, cluster, lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING",
                    "requeued")
    from jaxmm.training import checkpointing

    saved = checkpointing.available(str(workdir))["latest"]
    assert saved is not None and 0 < saved < total, saved
    assert "received SIGUSR1" in cluster.log(job)
    # The requeued job becomes eligible again after the credential lifetime (AuthInfo
    # cred_expire: 30 s on the .ci/slurm_up.sh cluster, 120 s by default). Starting it earlier
    # (scontrol update StartTime=now) makes slurmd kill it: "Job credential revoked".
    # A second requeue would mean the resumed run stopped again without a signal.
    info = wait_for(job, cluster, lambda i: i["JobState"] in DONE_STATES or i["Restarts"] != "1",
                    "done")
    assert info["Restarts"] == "1", cluster.log(job)
    assert_completed(info, cluster)
    log = cluster.log(job)
    assert "requeueing job" in log and "(restart 1)" in log and "training finished" in log
    # The restart went on from the saved step: not from step 0 (training is deterministic, so
    # a restart from scratch would end with the same numbers).
    assert f"Resumed from step {saved} " in log, log

    resumed = read_json(workdir / "train_summary.json")
    plain = read_json(baseline[1] / "train_summary.json")
    assert resumed["status"] == plain["status"] == "finished"
    assert resumed["step"] == plain["step"]
    assert resumed["params_abs_sum"] == pytest.approx(plain["params_abs_sum"], rel=1e-6)
    assert resumed["best_validation"] == pytest.approx(plain["best_validation"], rel=1e-5)


def test_evaluate_job(cluster, baseline):
    workdir = baseline[1]
    assert_completed(baseline[0], cluster)
    job = cluster.submit("slurm/evaluate.sh", "evaluate",
                         ["--gpus-per-node=0", "--ntasks=1", "--cpus-per-task=1", "--time=10"],
                         [], WORKDIR=str(workdir), SPLIT="test", CHECKPOINT="best")
    assert_completed(wait_done(job, cluster), cluster)
    metrics = read_json(workdir / "eval" / "best" / "test" / "metrics.json")
    assert metrics["split"] == "test", cluster.log(job)
    assert 0.0 <= metrics["accuracy"] <= 1.0


# Stands in for Python in slurm/jax_train.sh: `-m jaxmm.train` waits for SIGUSR1, then does what
# the trainer does on a stop signal (task 0 writes the "preempted" summary; no task exits before
# it exists), except that task 0 is slow to exit, as a coordinator tearing down can be.
_STAND_IN = """#!/usr/bin/env bash
[ "$1 $2" = "-m jaxmm.train" ] || exec {python} "$@"
while [ "$1" != --workdir ]; do shift; done
workdir=$2
stop=0
trap 'stop=1' USR1
touch "$workdir/ready.$SLURM_PROCID"
while [ "$stop" = 0 ]; do sleep 0.1; done
if [ "$SLURM_PROCID" = 0 ]; then
  echo '{{"status": "preempted", "step": 3}}' > "$workdir/train_summary.json"
  sleep 120
else
  while [ ! -e "$workdir/train_summary.json" ]; do sleep 0.1; done
fi
exit 75
"""


def test_requeue_when_srun_ends_a_slower_task(cluster):
    """After a stop signal the first task to exit 75 makes srun (--kill-on-bad-exit) end the
    others, so srun's own exit is a signal's; the saved summary still leads to a requeue."""
    workdir = cluster.tmp / "run_stand_in"
    workdir.mkdir()
    stand_in = cluster.tmp / "stand_in_python"
    stand_in.write_text(_STAND_IN.format(python=cluster.env["JAXMM_PYTHON"]))
    stand_in.chmod(0o755)
    job = cluster.submit("slurm/jax_train.sh", "stand_in", SBATCH_CPU, [],
                         WORKDIR=str(workdir), JAXMM_PYTHON=str(stand_in), JAXMM_PREPARE="0")
    wait_for(job, cluster, lambda i: len(list(workdir.glob("ready.*"))) == 2, "started",
             poll_s=0.2)
    _run(["scancel", "--signal=USR1", "--batch", job])
    info = wait_for(job, cluster, lambda i: i["Restarts"] == "1", "requeued", timeout_s=120,
                    poll_s=0.5)
    _run(["scancel", job])
    log = cluster.log(job)
    assert "srun exited 143 after a task saved the checkpoint and exited 75" in log, log
    assert "requeueing job" in log and "training failed" not in log, log
    assert info["Restarts"] == "1"
