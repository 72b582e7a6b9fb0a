"""slurm/sweep.sh and jaxmm.compare on a running Slurm cluster (skipped without one).

A two-point sweep of tiny demo runs (one epoch, one CPU task each) is submitted as one job array
and completes; submitting it again submits nothing; compare lists both runs with their metrics.
"""

import csv
import os
import re
import subprocess
import sys
import time

import pytest

from jaxmm import paths
from tests.support import JOB_TIMEOUT_S, Cluster
from tests.support import REPO as ROOT
from tests.support import SLURM_TINY as TINY
from tests.support import require_cluster as _require_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SWEEP = 'def get_sweep():\n    return [{"seed": 0}, {"seed": 1}]\n'
SBATCH = ["--gpus-per-node=0", "--ntasks=1", "--cpus-per-task=1", "--time=15"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _require_cluster()
    c = Cluster(tmp_path_factory.mktemp("slurm_sweep"))
    yield c
    c.cancel_all()


def _submit(cluster: Cluster, sweep_file, sweep_dir) -> subprocess.CompletedProcess:
    one_epoch = [a for a in TINY if not a.startswith("--config.num_epochs")]
    args = [*SBATCH, "--", f"--config.data_dir={cluster.tmp / 'demo_data'}", *one_epoch,
            "--config.num_epochs=1"]
    return subprocess.run(["slurm/sweep.sh", str(sweep_file), *args], cwd=ROOT,
                          # One run after the other: the second finds the first one's
                          # compiled programs in the shared cache (the runs differ in the seed,
                          # which is an input of the compiled step, not a constant).
                          env=dict(cluster.env, CONFIG="configs/demo.py",
                                   SWEEP_DIR=str(sweep_dir), SWEEP_PARALLEL="1"),
                          capture_output=True, text=True, timeout=180, check=False)


def _array_states(job: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         timeout=30, check=False).stdout
    return re.findall(r"JobState=(\S+)", out)


def _logs(sweep_dir) -> str:
    logs = sweep_dir / paths.SWEEP_LOGS_DIR
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.out")))


def test_two_point_sweep_completes_resubmits_nothing_and_compares(cluster):
    sweep_file = cluster.tmp / "two_lrs.py"
    sweep_file.write_text(SWEEP)
    sweep_dir = cluster.tmp / "sweep"
    out = _submit(cluster, sweep_file, sweep_dir)
    assert out.returncode == 0, out.stderr
    job = re.search(r"submitted job array (\d+)", out.stdout).group(1)
    cluster.jobs.append(job)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        states = _array_states(job)
        if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states):
            break
        time.sleep(2)
    assert states == ["COMPLETED", "COMPLETED"], _logs(sweep_dir)
    names = ["0-seed=0", "1-seed=1"]
    for name in names:
        assert (sweep_dir / name / paths.SUMMARY_FILE).exists(), _logs(sweep_dir)

    again = _submit(cluster, sweep_file, sweep_dir)
    assert again.returncode == 0, again.stderr
    assert "nothing to submit" in again.stdout
    assert again.stderr.count("finished, skipped") == 2

    res = subprocess.run([sys.executable, "-m", "jaxmm.compare", str(sweep_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    with open(sweep_dir / f"{paths.COMPARISON_BASENAME}.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == names
    for name in names:
        assert rows[name]["status"] == "finished"
        assert rows[name]["overrides"] == f"seed={name.split('=')[1]}"
        assert 0.0 <= float(rows[name]["val_macro_f1"]) <= 1.0
        assert float(rows[name]["samples_per_s"]) > 0
    assert os.path.getsize(sweep_dir / f"{paths.COMPARISON_BASENAME}.png") > 1000
