"""The tracker without training: steps logged once across resumes, rows backfilled from
metrics.jsonl, one warning on a failing store, a full queue never blocks, config checks, three
processes writing one SQLite store at once (MLflow for real), and W&B offline files read back."""

import json
import os
import struct
import subprocess
import sys
import threading
import time

import pytest

from jaxmm import paths
from jaxmm.errors import ConfigError
from jaxmm.experiments import tracking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Backend:
    """Records every call; ``fail`` raises on the first metrics row, ``gate`` holds them."""

    name = "fake"

    def __init__(self, fail=False, gate=None):
        self.where, self.experiment = "memory", "e"
        self.calls, self.fail, self.gate = [], fail, gate

    def load(self):
        pass

    def start(self, run_id, record, tags, run_name, resume):
        self.calls.append(("start", run_id, run_name, resume))
        return run_id or "run-1", {}

    def log_metrics(self, step, kind, values):
        if self.gate is not None:
            self.gate.wait()
        if self.fail:
            raise OSError("[Errno 28] No space left on device")
        self.calls.append((kind, step, values))

    def log_artifact(self, path, folder):
        self.calls.append(("artifact", os.path.basename(path), folder))

    def set_tags(self, tags):
        self.calls.append(("tags", sorted(tags)))

    def close(self, status):
        self.calls.append(("close", status))


def _rows(workdir, rows):
    with open(os.path.join(workdir, paths.METRICS_FILE), "a") as f:
        for step, kind, loss in rows:
            f.write(json.dumps({"step": step, "kind": kind, "loss": loss, "note": "x"}) + "\n")


def test_resumed_tracker_backfills_and_never_logs_a_step_twice(tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    # A run killed after step 4: metrics.jsonl has rows the tracker never saw.
    _rows(workdir, [(2, "train", 1.0), (4, "train", 0.9), (4, "val", 0.8)])
    first = _Backend()
    t = tracking.Tracker(first, workdir)
    t.log_metrics(4, "train", {"loss": 0.9})  # repeated by the resume: skipped
    t.log_metrics(6, "train", {"loss": 0.7, "text": "not a metric", "flag": True})
    t.close("preempted")
    assert [c for c in first.calls if c[0] in ("train", "val")] == [
        ("train", 2, {"loss": 1.0}), ("train", 4, {"loss": 0.9}), ("val", 4, {"loss": 0.8}),
        ("train", 6, {"loss": 0.7})]
    assert first.calls[0] == ("start", None, "run", True)
    assert first.calls[-1] == ("close", "preempted")
    state = tracking.read_state(workdir)
    assert state["run_id"] == "run-1" and state["last_step"] == {"train": 6, "val": 4}

    _rows(workdir, [(6, "train", 0.7)])
    second = _Backend()
    t = tracking.Tracker(second, workdir)
    for step in (4, 6, 8):  # The resumed run re-trains 4 and 6.
        t.log_metrics(step, "train", {"loss": 1.0 / step})
    t.close()
    assert second.calls[0] == ("start", "run-1", "run", True)
    assert [c for c in second.calls if c[0] == "train"] == [("train", 8, {"loss": 0.125})]
    assert ("artifact", "learning_curves.png", "") not in second.calls  # no such file here
    assert second.calls[-1] == ("close", None)  # the summary decides; there is none


def test_failing_store_is_one_warning_and_the_run_goes_on(tmp_path, caplog):
    backend = _Backend(fail=True)
    t = tracking.Tracker(backend, str(tmp_path))
    for step in range(1, 200):
        t.log_metrics(step, "train", {"loss": 1.0})
    t.close()
    lines = [r.getMessage() for r in caplog.records if "tracking" in r.getMessage()]
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert "\n" not in lines[0]
    assert [c[0] for c in backend.calls] == ["start"]  # nothing after the failure


def test_a_full_queue_drops_rows_instead_of_blocking(tmp_path, caplog):
    gate = threading.Event()
    backend = _Backend(gate=gate)
    t = tracking.Tracker(backend, str(tmp_path), training=False, queue_size=5)
    for step in range(1, 50):  # The store is stuck: these calls must still return.
        t.log_metrics(step, "train", {"loss": 1.0})
    gate.set()
    t.close()
    logged = [c for c in backend.calls if c[0] == "train"]
    assert 1 <= len(logged) <= 7
    lines = [r.getMessage() for r in caplog.records if "falls behind" in r.getMessage()]
    assert len(lines) == 1


def test_config_checks_and_training_imports_no_tracker():
    for bad in ("neptune", "MLflow"):
        with pytest.raises(ConfigError, match="config.tracking=") as info:
            tracking.check_config({"tracking": bad})
        assert "\n" not in str(info.value)
    tracking.check_config({"tracking": ""})
    out = subprocess.run(
        [sys.executable, "-c", "import sys, jaxmm.train, jaxmm.training.loop, "
         "jaxmm.evaluation.report, jaxmm.training.setup; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'wandb'}))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_uri_and_experiment(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "lr_sweep"
    (sweep_dir / "0-lr=1").mkdir(parents=True)
    (sweep_dir / paths.SWEEP_FILE).write_text(json.dumps({"runs": [{"name": "0-lr=1"}]}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"tracking_uri": "", "tracking_experiment": "mine"}
    run = str(sweep_dir / "0-lr=1")
    assert tracking.mlflow_uri(config, run) == f"sqlite:///{sweep_dir}/mlflow.db"
    assert tracking.experiment_name(config, run) == "lr_sweep"
    assert tracking.experiment_name(config, str(tmp_path / "solo")) == "mine"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert tracking.run_tags(run)["sweep"] == "lr_sweep"
    assert tracking.run_tags(run)["slurm.array_task_id"] == "3"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.mlflow_uri(config, run) == "http://127.0.0.1:5000"


_WRITER = """
import os, sys, time
import mlflow.tracking
from jaxmm.experiments import tracking
from jaxmm.experiments import tracking_backends
uri, workdir, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(workdir)
open(workdir + ".ready", "w").close()
while not os.path.exists(os.path.join(os.path.dirname(workdir), "go")):
    time.sleep(0.01)
t = tracking.Tracker(tracking_backends.MlflowBackend(uri, "shared"), workdir)
for step in range(1, rows + 1):
    t.log_metrics(step, "train", {"loss": 1.0 / step, "accuracy": step / rows})
t.close("finished", timeout=600)
"""


def test_three_processes_share_one_sqlite_store(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri, rows = f"sqlite:///{tmp_path}/mlflow.db", 100
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, uri, str(tmp_path / f"r{i}"),
                               str(rows)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT)) for i in range(3)]
    # Each process imports mlflow first; then all start at once on an empty store.
    deadline = time.time() + 300
    while not all((tmp_path / f"r{i}.ready").exists() for i in range(3)):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    (tmp_path / "go").touch()
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert not any("tracking" in e and "failed" in e for e in errors), errors
    client = MlflowClient(uri)
    for i in range(3):
        run_id = tracking.read_state(str(tmp_path / f"r{i}"))["run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "train/accuracy"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(1, rows + 1)), (i, key)
    assert len({client.get_run(tracking.read_state(str(tmp_path / f"r{i}"))["run_id"])
                .info.experiment_id for i in range(3)}) == 1


def read_wandb_records(path: str) -> list:
    """Records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB
    whose chunks (7-byte header: CRC, length, type) hold ``wandb_internal_pb2.Record``s."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


_WANDB_SESSION = """
import sys
from jaxmm.experiments import tracking
from jaxmm.experiments import tracking_backends
workdir, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = tracking.Tracker(tracking_backends.WandbBackend(workdir, "proj"), workdir)
for step in range(first, last + 1):
    t.log_metrics(step, "train", {"loss": 1.0 / step})
t.log_metrics(last, "val", {"accuracy": last / 10})
t.close()
"""


def test_wandb_offline_files_hold_config_history_and_figures(tmp_path):
    pytest.importorskip("wandb")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / paths.CONFIG_FILE).write_text(json.dumps(
        {"config": {"optim": {"lr_head": 0.001}, "model": {"modalities": ["image", "text"]}}}))
    (workdir / paths.CURVES_FILE).write_bytes(b"\x89PNG curves")
    (workdir / paths.SUMMARY_FILE).write_text(json.dumps({"status": "finished"}))
    # The network stays off: offline mode writes files only (wandb sync uploads them later).
    env = dict(os.environ, PYTHONPATH=ROOT, WANDB_MODE="offline", WANDB_SILENT="true")
    for first, last in ((1, 4), (3, 6)):  # the second session resumes and repeats 3 and 4
        out = subprocess.run([sys.executable, "-c", _WANDB_SESSION, str(workdir), str(first),
                              str(last)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "tracking" not in out.stderr, out.stderr[-3000:]
    runs = sorted((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    history, config, saved, ids = [], {}, set(), set()
    for run in runs:
        for r in read_wandb_records(str(next(run.glob("run-*.wandb")))):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in r.history.item}
                history.append((items["_step"], {k: v for k, v in items.items()
                                                 if not k.startswith("_")}))
            elif kind == "run":
                ids.add(r.run.run_id)
                config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "files":
                saved.update(f.path for f in r.files.files)
    assert len(ids) == 1 and ids == {tracking.read_state(str(workdir))["run_id"]}
    assert [s for s, _ in history] == [1, 2, 3, 4, 5, 6]  # each step once, in order
    assert history[3][1] == {"train/loss": 0.25, "val/accuracy": 0.4}
    assert history[5][1] == {"train/loss": pytest.approx(1 / 6), "val/accuracy": 0.6}
    assert config["optim.lr_head"] == "0.001" and config["model.modalities"] == "('image', 'text')"
    assert {paths.CURVES_FILE, paths.SUMMARY_FILE} <= saved
