"""slurm/serve.sh on a running Slurm cluster: the job's log gives the ssh tunnel line and the
URL, the server answers on the node, and scancel stops it gracefully (SIGTERM, exit 0).

Needs `sbatch` and an idle node (`.ci/slurm_up.sh` starts a one-node cluster as root); skipped
otherwise.
"""

import socket
import time

import httpx
import pytest

from tests.support import JOB_TIMEOUT_S, Cluster
from tests.support import cluster_problem as _cluster_problem
from tests.support import run_quiet as _run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_log(cluster: Cluster, job: str, text: str) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        log = cluster.log(job)
        if text in log:
            return log
        state = _run(["squeue", "-h", "-j", job, "-o", "%T"]).strip()
        if not state:
            break
        time.sleep(1)
    pytest.fail(f"job {job}: no '{text}' in its log:\n{cluster.log(job)}")


def test_serve_job_prints_the_tunnel_and_stops_gracefully(bundle_dir, tmp_path):
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)
    cluster = Cluster(tmp_path)
    port = _free_port()
    try:
        job = cluster.submit("slurm/serve.sh", "serve", ["--gpus-per-node=0", "--ntasks=1",
                                                         "--cpus-per-task=1", "--time=15"],
                             ["--model", bundle_dir, "--max_batch", "2"], PORT=str(port))
        log = _wait_log(cluster, job, "ready: ")
        assert f"ssh -N -L 8000:127.0.0.1:{port} -J " in log
        assert f"ready: http://127.0.0.1:{port}/" in log
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 200
        _run(["scancel", "--signal=TERM", "--full", job])
        _wait_log(cluster, job, "stopped by SIGTERM")
    finally:
        cluster.cancel_all()
