"""Tracked training runs with MLflow for real, on the tiny demo settings: a run killed with -9
and resumed is one MLflow run whose metric histories equal metrics.jsonl without a repeated
step, whose evaluation lands in the same run, and whose best validation value is the one
``jaxmm.compare`` shows; an ``mlflow server`` killed mid-run costs one warning line and no
training speed."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

import pytest

from jaxmm.experiments import run_table, tracking
from jaxmm.trained.workdir import Workdir
from tests.support import REPO as ROOT
from tests.support import env as _env
from tests.support import tiny_config
from tests.support import train_cmd as _train_cmd
from tests.support import wait_for_checkpoint as _wait_for_checkpoint

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from jaxmm.data import prepared

    path = str(tmp_path_factory.mktemp("demo_data"))
    prepared.ensure_prepared(tiny_config(path))
    return path


def _tracking_env(**extra):
    env = {k: v for k, v in _env().items() if not k.startswith(("MLFLOW_", "SLURM_"))}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def _metrics_rows(workdir):
    """metrics.jsonl as {(kind, step): row}; a repeated step keeps its first row, as the
    tracker does. (A train row averages the steps since the previous row, so the first train
    row after a resume covers fewer steps than the row the killed run wrote for that step.)"""
    rows = {}
    for r in Workdir(str(workdir)).metric_rows():
        rows.setdefault((r["kind"], r["step"]), r)
    return rows


def _wait_for_state(workdir, proc, at_least: int, timeout=300):
    """Until tracking.json says a train row at or after ``at_least`` reached the store."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if tracking.read_state(str(workdir))["last_step"].get("train", -1) >= at_least:
            return
        assert proc.poll() is None, "training exited before its rows were tracked"
        time.sleep(0.1)
    raise AssertionError("no tracked rows appeared")


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_killed_run_resumes_one_mlflow_run_equal_to_metrics_jsonl(data_dir, tmp_path):
    workdir = tmp_path / "runs" / "a"
    cmd = _train_cmd(workdir, data_dir, tracking="mlflow")
    proc = subprocess.Popen(cmd, env=_tracking_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(workdir, proc)
    _wait_for_state(workdir, proc, 6)  # logged beyond the checkpoint at step 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cmd, env=_tracking_env(), capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tracking (" not in out.stderr, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("jaxmm").experiment_id])
    run_id = run.info.run_id
    assert tracking.read_state(str(workdir))["run_id"] == run_id
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    rows = _metrics_rows(workdir)
    for kind, names in (("train", ("loss", "accuracy", "grad_norm")),
                        ("val", ("loss", "accuracy", "macro_f1"))):
        steps = sorted(s for (k, s) in rows if k == kind)
        for name in names:  # every step once, with the value metrics.jsonl holds
            history = _history(client, run_id, f"{kind}/{name}")
            assert sorted(s for s, _ in history) == steps, (kind, name)
            assert dict(history) == pytest.approx(
                {s: r[name] for (k, s), r in rows.items() if k == kind}, rel=1e-6)
    assert run.data.params["batch_size"] == "8" and run.data.params["model.image_arch"] == "tiny"
    assert run.data.params["tracking"] == "mlflow"
    summary = json.load(open(workdir / "train_summary.json"))
    assert run.data.tags["best_checkpoint.step"] == str(summary["best_step"])
    assert len(run.data.tags["best_checkpoint.sha256"]) == 64
    assert {a.path for a in client.list_artifacts(run_id)} >= {"learning_curves.png",
                                                               "train_summary.json"}
    _assert_cheap(workdir)
    _evaluate_and_compare(client, run_id, workdir, summary)


def _evaluate_and_compare(client, run_id, workdir, summary):
    """Evaluation metrics join the run; compare's numbers are the tracker's numbers."""
    out = subprocess.run([sys.executable, "-m", "jaxmm.evaluate", "--workdir", str(workdir)],
                         env=_tracking_env(), capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    evaluation = json.load(open(workdir / "eval" / "best" / "test" / "metrics.json"))
    step = evaluation["checkpoint_step"]
    assert _history(client, run_id, "test/macro_f1") == [(step, evaluation["macro_f1"])]
    assert {a.path for a in client.list_artifacts(run_id, "eval/best/test")} >= {
        "eval/best/test/confusion_matrix.png", "eval/best/test/reliability_diagram.png"}
    row = run_table.read_run({"name": "a", "workdir": str(workdir), "overrides": None})
    best = dict(_history(client, run_id, "val/macro_f1"))[summary["best_step"]]
    assert row["val_macro_f1"] == best
    assert row["test_macro_f1"] == dict(_history(client, run_id, "test/macro_f1"))[step]


def _assert_cheap(workdir):
    """Past its start (opening the store and the run, once per process), the tracker's thread
    used at most 5 % of the training process's CPU time: a measure that other jobs on the
    machine do not move, unlike step times."""
    cost = tracking.read_state(str(workdir))["cpu_seconds"]
    print(f"tracking thread {cost['tracking_thread']:.2f} s (start {cost['start']:.2f} s) of "
          f"{cost['process']:.1f} s CPU")
    assert 0 <= cost["tracking_thread"] - cost["start"] <= 0.05 * cost["process"], cost
    # The loop itself never waits for the tracker: a hand-off is a put into a bounded queue.
    assert cost["handoff_items"] > 0 and cost["handoff"] <= 0.01 * cost["process"], cost


def _start_server(tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server_artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=tmp_path, env=_tracking_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server, f"http://127.0.0.1:{port}"
        except OSError:
            assert server.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start")


def _step_speeds(workdir):
    """samples/s of the train rows that time train steps only: the first row of an epoch also
    holds the compile, or the previous epoch's validation and checkpoint."""
    spe = json.load(open(workdir / "config.json"))["steps_per_epoch"]
    return [r["samples_per_s"] for (k, s), r in _metrics_rows(workdir).items()
            if k == "train" and (s - 1) % spe]


def _side_by_side(tmp_path, data_dir, uri, suffix="", server=None):
    """Trains the same tiny run with and without tracking at the same time, so that both see
    the same load from the rest of the machine; kills ``server`` once rows reached it.

    Returns:
      (step speeds without tracking, step speeds tracked, the tracked run's stderr).
    """
    plain, tracked = tmp_path / f"plain{suffix}", tmp_path / f"tracked{suffix}"
    procs = []
    try:
        for workdir, extra in ((plain, {}), (tracked, {"tracking": "mlflow",
                                                       "tracking_uri": uri})):
            with open(f"{workdir}.err", "w") as err:
                procs.append(subprocess.Popen(
                    _train_cmd(workdir, data_dir, **_TIMED, **extra), env=_tracking_env(),
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err))
        if server is not None:
            _wait_for_state(tracked, procs[1], 2)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    errors = []
    for p, workdir in zip(procs, (plain, tracked), strict=True):
        p.wait(timeout=600)
        errors.append(open(f"{workdir}.err").read())
        assert p.returncode == 0, errors[-1][-3000:]
    return _step_speeds(plain), _step_speeds(tracked), errors[1]


# A row every step, checkpoints only at epoch ends: rows that time the steps alone.
_TIMED = {"num_epochs": 4, "log_every_steps": 1, "checkpoint_every_steps": 1000}


@pytest.mark.slow
def test_server_killed_mid_run_is_one_warning_and_costs_no_speed(data_dir, tmp_path):
    server, uri = _start_server(tmp_path)
    plain, tracked, err = _side_by_side(tmp_path, data_dir, uri, server=server)
    warnings = [line for line in err.splitlines() if "tracking (" in line]
    assert len(warnings) == 1 and uri in warnings[0], warnings
    tracked_dir = tmp_path / "tracked"
    assert json.load(open(tracked_dir / "train_summary.json"))["status"] == "finished"
    # Without tracking nothing is written for it.
    assert not (tmp_path / "plain" / "tracking.json").exists()
    assert not (tmp_path / "mlflow.db").exists()
    # What reached the server before it died is there, read from its own database.
    client = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    run_id = tracking.read_state(str(tracked_dir))["run_id"]
    assert client.get_run(run_id).data.params["tracking_uri"] == uri
    assert [s for s, _ in _history(client, run_id, "train/loss")][:2] == [1, 2]
    # Tracking's budget is 5 % of training's time: its thread's CPU share says so whatever else
    # runs on the machine.
    _assert_cheap(tracked_dir)
    # The loop's median step throughput with and without tracking, side by side, is reported,
    # not asserted: other jobs on 2 shared cores move one run against the other by -30 % to
    # +40 % here. What tracking could cost the loop is asserted above, in CPU and hand-off time.
    print(f"median samples/s: without tracking {statistics.median(plain):.1f}, "
          f"tracked {statistics.median(tracked):.1f} ({len(plain)} and {len(tracked)} steps)")
