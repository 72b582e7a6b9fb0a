"""The tracking backends behind ``tracking.Tracker``: MLflow and W&B (offline).

Each backend has the same small interface: ``load()`` imports its package (before training
starts); the rest is called from the tracker's background thread only:
``start(run_id, record, tags, run_name, resume)`` returns the tracked run's id and the highest
step it holds per kind of row; ``log_metrics(step, kind, values)``, ``log_artifact(path,
folder)``, ``set_tags(tags)`` and ``close(status)``. mlflow and wandb are imported here, when a
backend starts, never by training without tracking.
"""

import contextlib
import fcntl
import logging
import os
import time
import uuid

from jaxmm import paths
from jaxmm.experiments import tracking

# MLflow's limits: 250-character keys, 6000-character parameter values on current servers (500
# on old ones, which is what values are cut to), 100 parameters or tags per batch.
_MAX_KEY, _MAX_VALUE, _BATCH = 250, 500, 100
# How a run's end becomes an MLflow run status.
_MLFLOW_STATUS = {"finished": "FINISHED", "early_stopped": "FINISHED", "preempted": "KILLED",
                  "failed": "FAILED"}


def _sqlite_path(uri: str) -> str | None:
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialises the writers of one SQLite store between processes: array tasks starting at
    once would otherwise race to create the same tables, and a writer that waits longer than
    SQLite's busy timeout (5 s) for another would fail."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _quiet_libraries() -> None:
    """MLflow, its database migrations and urllib3's retries speak up only for errors: the
    tracker reports a failure itself, in one line."""
    for name in ("mlflow", "alembic", "urllib3", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.ERROR)


class MlflowBackend:
    """An MLflow run in ``uri``'s experiment ``experiment``, through ``MlflowClient``."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str):
        self.where, self.experiment = uri, experiment
        self._client = self._run_id = None

    def load(self) -> None:
        """Imports mlflow (seconds; called before training starts) with its usage telemetry
        off: compute nodes contact nothing but the tracking store."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow.tracking  # noqa: F401

    def start(self, run_id, record: dict, tags: dict, run_name: str, resume: bool):
        for key, value in tracking.MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        _quiet_libraries()  # After the import: mlflow sets its own logger's level on import.

        params = {k[:_MAX_KEY]: v[:_MAX_VALUE]
                  for k, v in tracking.flat_params(record.get("config") or {}).items()}
        with _store_lock(self.where):  # not re-entrant: set_tags below takes it again
            self._client = MlflowClient(self.where)
            if run_id is None:
                created = self._client.create_run(self._experiment_id(), run_name=run_name)
                run_id = created.info.run_id
            run = self._client.get_run(run_id)
            if resume and run.info.status != "RUNNING":
                self._client.update_run(run_id, status="RUNNING")
            new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
            for i in range(0, len(new), _BATCH):
                self._client.log_batch(run_id, params=new[i:i + _BATCH])
        self._run_id = run_id
        self.set_tags(tags)
        return run_id, self._logged_steps(run)

    def _experiment_id(self) -> str:
        """The experiment's id, created when missing (another process may create it first)."""
        found = self._client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        path = _sqlite_path(self.where)
        if path is not None:  # Artifacts beside the database, never in the current folder.
            location = "file://" + os.path.join(os.path.dirname(os.path.abspath(path)),
                                                paths.MLFLOW_ARTIFACTS_DIR)
        try:
            return self._client.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # noqa: BLE001 - created meanwhile by another process
            found = self._client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _logged_steps(self, run) -> dict:
        """The highest step per kind in the run's metric histories (one query per metric)."""
        last = {}
        for key in run.data.metrics:
            kind = key.split("/", 1)[0]
            steps = [m.step for m in self._client.get_metric_history(run.info.run_id, key)]
            if steps:
                last[kind] = max(last.get(kind, -1), max(steps))
        return last

    def log_metrics(self, step: int, kind: str, values: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{kind}/{k}"[:_MAX_KEY], v, now, step) for k, v in values.items()]
        with _store_lock(self.where):
            self._client.log_batch(self._run_id, metrics=metrics)

    def log_artifact(self, path: str, folder: str) -> None:
        self._client.log_artifact(self._run_id, path, folder or None)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k[:_MAX_KEY], str(v)[:_MAX_VALUE]) for k, v in tags.items()]
        with _store_lock(self.where):
            for i in range(0, len(items), _BATCH):
                self._client.log_batch(self._run_id, tags=items[i:i + _BATCH])

    def close(self, status: str | None) -> None:
        if status is not None and self._run_id is not None:
            with _store_lock(self.where):
                self._client.set_terminated(self._run_id,
                                            _MLFLOW_STATUS.get(status, "FINISHED"))


class WandbBackend:
    """A W&B run written offline into ``<workdir>/wandb/`` (``wandb sync`` uploads it later).

    Train and validation rows are history at their step; rows of other kinds (evaluation, at an
    earlier step than the run's last) go to the run summary, since W&B history only moves
    forward. Tags become config entries under ``tags.`` (W&B tags are bare labels).
    """

    name = "wandb"

    def __init__(self, workdir: str, experiment: str):
        self.where, self.experiment = os.path.abspath(workdir), experiment
        self._run = None

    def load(self) -> None:
        """Imports wandb (seconds; called before training starts)."""
        import wandb  # noqa: F401

    def start(self, run_id, record: dict, tags: dict, run_name: str, resume: bool):
        del resume
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run_id = run_id or uuid.uuid4().hex[:8]
        self._run = wandb.init(
            project=self.experiment, name=run_name, id=run_id, resume="allow", dir=self.where,
            config=tracking.flat_params(record.get("config") or {}),
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        self.set_tags(tags)
        return run_id, {}

    def log_metrics(self, step: int, kind: str, values: dict) -> None:
        values = {f"{kind}/{k}": v for k, v in values.items()}
        if kind in ("train", "val"):
            self._run.log(values, step=step)
        else:
            self._run.summary.update({**values, f"{kind}/step": step})

    def log_artifact(self, path: str, folder: str) -> None:
        # Copied, not linked: the workdir's file may change before `wandb sync` reads it.
        target = os.path.join(self._run.dir, folder, os.path.basename(path))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(path, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
        self._run.save(target, base_path=self._run.dir, policy="now")

    def set_tags(self, tags: dict) -> None:
        self._run.config.update({f"tags.{k}": v for k, v in tags.items()},
                                allow_val_change=True)

    def close(self, status: str | None) -> None:
        self._run.finish(exit_code=1 if status == "failed" else 0)
