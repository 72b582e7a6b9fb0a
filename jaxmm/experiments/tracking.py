"""Experiment tracking: a run's config, metrics, figures and tags mirrored to MLflow or W&B.

``config.tracking`` picks the backend ("" = off, "mlflow", "wandb" offline). Process 0 feeds a
``Tracker`` that hands everything to one background thread through a bounded queue, so the
training loop never waits on a tracking store: a full queue drops rows, and the first failure
(an unreachable server, a full disk) is one warning line after which tracking stays off for the
rest of the process. ``metrics.jsonl`` stays the record of truth; a resumed run first logs the
rows of it the tracker has not seen.

The workdir's ``tracking.json`` holds the tracker's run id and the highest step logged per kind
of row ("train", "val", "test", ...), so a resumed or requeued run continues the same tracked run
and never logs a step twice (a tracking store cannot delete points, and a run killed with -9
re-trains the steps since its last checkpoint). Nothing here imports mlflow or wandb; the
backends (``tracking_backends``) do, in the background thread.
"""

import atexit
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import queue
import threading
import time

from jaxmm import files, paths
from jaxmm.errors import ConfigError
from jaxmm.experiments import sweep
from jaxmm.trained.workdir import Workdir

log = logging.getLogger("jaxmm")

BACKENDS = ("", "mlflow", "wandb")
# Packages each backend needs (the `tracking` extra, requirements-tracking.txt).
_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
DEFAULT_EXPERIMENT = "jaxmm"
QUEUE_SIZE = 1000  # Rows, figures and tags waiting for the background thread.
CLOSE_TIMEOUT_S = 60.0  # The longest a run's end waits for the tracker to finish.
# Environment variables of a Slurm job kept as tags (name in the tracker: slurm.<lower case>).
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                   "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME")
# MLflow's HTTP client: few, short retries, so a dead server costs seconds, not minutes (an
# environment value set by the user wins).
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Row entries that say where a row belongs rather than measure anything.
_NOT_METRICS = ("step", "kind", "checkpoint_step")


def check_config(config) -> None:
    """A one-line ConfigError for an unknown backend or a backend whose package is missing."""
    backend = config.get("tracking", "")
    if backend not in BACKENDS:
        raise ConfigError(f"config.tracking={backend!r}; choose one of "
                          f"{', '.join(repr(b) for b in BACKENDS)}")
    if backend and importlib.util.find_spec(_PACKAGES[backend]) is None:
        raise ConfigError(f"config.tracking={backend!r} needs the {_PACKAGES[backend]} package: "
                          "pip install -r requirements-tracking.txt (or jaxmm[tracking])")


def sweep_name(workdir: str) -> str | None:
    """The sweep folder's name when ``workdir`` is one of its runs, else None."""
    parent = os.path.dirname(os.path.abspath(workdir))
    manifest = sweep.read_manifest(parent)
    if manifest is None:
        return None
    names = {r.get("name") for r in manifest["runs"]}
    return os.path.basename(parent) if os.path.basename(os.path.abspath(workdir)) in names \
        else None


def experiment_name(config, workdir: str) -> str:
    """A sweep's runs share the experiment named after the sweep folder; other runs use
    ``config.tracking_experiment``."""
    return sweep_name(workdir) or config.get("tracking_experiment") or DEFAULT_EXPERIMENT


def mlflow_uri(config, workdir: str) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``config.tracking_uri``, else a SQLite store next
    to the workdir (the sweep folder for a sweep's runs)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config.get("tracking_uri", "")
    if uri:
        return uri
    parent = os.path.dirname(os.path.abspath(workdir))
    return "sqlite:///" + os.path.join(parent, paths.MLFLOW_DB_FILE)


def run_tags(workdir: str, record: dict | None = None) -> dict:
    """Slurm job, sweep and workdir of this process, and the run record's environment."""
    tags = {f"slurm.{name[6:].lower()}": os.environ[name] for name in SLURM_VARIABLES
            if os.environ.get(name)}
    name = sweep_name(workdir)
    if name:
        tags["sweep"] = name
    tags["workdir"] = os.path.abspath(workdir)
    info = (record or {}).get("run") or {}
    for key in ("git_commit", "platform", "device_kind", "device_count", "process_count"):
        if info.get(key) is not None:
            tags[key] = str(info[key])
    return tags


def flat_params(config: dict) -> dict:
    """A nested config as ``{"a.b": "value"}`` strings (tuples as their repr)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat_params(value).items()})
        else:
            out[key] = repr(tuple(value)) if isinstance(value, (list, tuple)) else str(value)
    return out


def numeric(values: dict) -> dict:
    """The entries of a metrics row a tracker can plot (finite or not, never bools or text)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --- The workdir's record of the tracked run ---------------------------------------------------

def read_state(workdir: str) -> dict:
    """``tracking.json``: backend, run id, where, and the highest step logged per kind."""
    state = files.read_json(os.path.join(workdir, paths.TRACKING_FILE))
    state = state if isinstance(state, dict) else {}
    state.setdefault("last_step", {})
    return state


def write_state(workdir: str, state: dict) -> None:
    files.write_json(os.path.join(workdir, paths.TRACKING_FILE), state)


def make_backend(name: str, workdir: str, experiment: str, uri: str | None):
    """The backend object for ``name`` (imports nothing heavy until it starts)."""
    from jaxmm.experiments import tracking_backends

    if name == "mlflow":
        return tracking_backends.MlflowBackend(uri, experiment)
    if name == "wandb":
        return tracking_backends.WandbBackend(workdir, experiment)
    raise ConfigError(f"unknown tracking backend {name!r} in {paths.TRACKING_FILE}")


# --- The tracker: a bounded queue and one background thread ------------------------------------

class Tracker:
    """Forwards metrics rows, figures and tags to a tracking backend from a background thread.

    Every call returns at once. Rows whose step is not above the highest step already logged
    for their kind are skipped (a resumed run repeats steps); a training tracker first logs the
    rows of metrics.jsonl the tracked run lacks, and at ``close`` the learning curves, the
    summary and the best checkpoint's step and digest.
    """

    def __init__(self, backend, workdir: str, training: bool = True,
                 queue_size: int = QUEUE_SIZE):
        self.workdir, self._backend, self._training = workdir, backend, training
        self._queue = queue.Queue(queue_size)
        self._state = {"last_step": {}}
        self._failed = self._closed = self._full = False
        self._start_cpu = 0.0
        self._handoff = [0.0, 0]  # seconds the caller spent handing items over, and how many
        # The package is imported here, before the first step: imported by the thread, its
        # seconds of Python would hold the interpreter lock while the loop runs.
        self._guarded(backend.load)
        self._thread = threading.Thread(target=self._work, name="jaxmm-tracking", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    def log_metrics(self, step: int, kind: str, values: dict) -> None:
        """Queues one metrics row (``kind``: "train", "val", "test", ...)."""
        self._put(("metrics", int(step), kind,
                   numeric({k: v for k, v in values.items() if k not in _NOT_METRICS})))

    def log_artifact(self, path: str, folder: str = "") -> None:
        """Queues a file for upload into the run's ``folder``."""
        self._put(("artifact", path, folder))

    def set_tags(self, tags: dict) -> None:
        """Queues string tags of the run."""
        self._put(("tags", {k: str(v) for k, v in tags.items()}))

    def close(self, status: str | None = None, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Logs what is queued and ends the tracked run, waiting at most ``timeout`` seconds.

        Args:
          status: how the run ended ("finished", "early_stopped", "preempted", "failed"); None
            = a training run's summary says, an evaluation leaves the run's status alone.
          timeout: seconds to wait for the background thread.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(("close", status), timeout=timeout)
            self._thread.join(max(deadline - time.monotonic(), 0.0))
        except queue.Full:
            pass
        if self._thread.is_alive():
            log.warning("tracking (%s) still busy after %.0f s; not waiting for it",
                            self._backend.where, timeout)

    def _at_exit(self) -> None:
        self.close("failed", timeout=10.0)  # The process ends without the loop's close.

    def _put(self, item) -> None:
        if self._failed or self._closed:
            return
        start = time.perf_counter()
        try:
            self._queue.put_nowait(item)
            self._handoff[0] += time.perf_counter() - start
            self._handoff[1] += 1
        except queue.Full:
            if not self._full:
                self._full = True
                log.warning("tracking (%s) falls behind: dropping rows; metrics.jsonl keeps "
                                "every row", self._backend.where)

    def _work(self) -> None:
        self._guarded(self._start)
        self._start_cpu = time.thread_time()
        while True:
            item = self._queue.get()
            if item[0] == "close":
                self._guarded(self._finish, item[1])
                break
            self._guarded(self._handle, item)
        self._record_cost()

    def _record_cost(self) -> None:
        """Adds what tracking cost to tracking.json: this thread's CPU seconds (of which
        ``start``: opening the store and the run, once per process) next to the whole process's
        (training included), and the wall seconds the training loop spent handing rows over
        (``handoff``, for ``handoff_items`` items); read back from the file so nothing else
        changes."""
        with contextlib.suppress(OSError):
            state = read_state(self.workdir)
            state["cpu_seconds"] = {"tracking_thread": round(time.thread_time(), 3),
                                    "start": round(self._start_cpu, 3),
                                    "process": round(time.process_time(), 3),
                                    "handoff": round(self._handoff[0], 6),
                                    "handoff_items": self._handoff[1]}
            write_state(self.workdir, state)

    def _guarded(self, fn, *args) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._failed = True
            message = " ".join(str(e).split())[:300]
            log.warning("tracking (%s) failed and is off for this run; training goes on and "
                            "metrics.jsonl keeps every row: %s: %s", self._backend.where,
                            type(e).__name__, message)

    def _start(self) -> None:
        state = read_state(self.workdir)
        if (state.get("backend"), state.get("where")) != (self._backend.name,
                                                          self._backend.where):
            state = {"last_step": {}}  # Another store: a new tracked run.
        record = Workdir(self.workdir).stored_record() or {}
        run_id, logged = self._backend.start(
            state.get("run_id"), record, run_tags(self.workdir, record),
            os.path.basename(os.path.abspath(self.workdir)), resume=self._training)
        last = state["last_step"]
        for kind, step in logged.items():
            last[kind] = max(last.get(kind, -1), step)
        state.update(backend=self._backend.name, where=self._backend.where, run_id=run_id,
                     experiment=self._backend.experiment)
        self._state = state
        write_state(self.workdir, state)
        if self._training:
            self._backfill()

    def _backfill(self) -> None:
        """Logs the rows of metrics.jsonl the tracked run lacks (written while tracking was off
        or failing, or by a run killed before its tracker caught up)."""
        for row in Workdir(self.workdir).metric_rows():
            if isinstance(row.get("step"), int):
                self._handle(("metrics", row["step"], row["kind"],
                              numeric({k: v for k, v in row.items() if k not in _NOT_METRICS})))

    def _handle(self, item) -> None:
        if item[0] == "metrics":
            _, step, kind, values = item
            if step <= self._state["last_step"].get(kind, -1) or not values:
                return
            self._backend.log_metrics(step, kind, values)
            self._state["last_step"][kind] = step
            write_state(self.workdir, self._state)
        elif item[0] == "artifact":
            if os.path.exists(item[1]):
                self._backend.log_artifact(item[1], item[2])
        elif item[0] == "tags":
            self._backend.set_tags(item[1])

    def _finish(self, status: str | None) -> None:
        if self._training and status != "failed":
            summary = files.read_json(os.path.join(self.workdir, paths.SUMMARY_FILE)) or {}
            status = status or summary.get("status")
            self._backend.set_tags(run_end_tags(self.workdir, summary))
            for name in (paths.CURVES_FILE, paths.SUMMARY_FILE):
                self._handle(("artifact", os.path.join(self.workdir, name), ""))
        self._backend.close(status)


def run_end_tags(workdir: str, summary: dict) -> dict:
    """How the run ended, and the best checkpoint's step and digest (SHA-256 of its recorded
    per-array digest) when there is one."""
    from jaxmm.trained import restoring

    tags = {"status": summary.get("status", "unknown")}
    best = restoring.recorded_digest(workdir)
    if best is not None:
        step, digest = best
        tags["best_checkpoint.step"] = str(step)
        tags["best_checkpoint.sha256"] = hashlib.sha256(
            json.dumps(digest, sort_keys=True).encode()).hexdigest()
    return tags


# --- Entry points for the loop and evaluation --------------------------------------------------

def for_training(config, workdir: str) -> Tracker | None:
    """The tracker of a training run (process 0), or None when ``config.tracking`` is off."""
    name = config.get("tracking", "")
    if not name:
        return None
    experiment = experiment_name(config, workdir)
    uri = mlflow_uri(config, workdir) if name == "mlflow" else None
    return Tracker(make_backend(name, workdir, experiment, uri), workdir)


def log_evaluation(workdir: str, metrics: dict, out_dir: str) -> None:
    """Adds an evaluation (metrics at the checkpoint's step, as kind ``<split>[-<towers>]``,
    and its figures) to the run's tracked run, in the store training used, when the run was
    tracked; waits for it."""
    state = read_state(workdir)
    if not state.get("backend"):
        return
    backend = make_backend(state["backend"], workdir, state.get("experiment"), state["where"])
    tracker = Tracker(backend, workdir, training=False)
    tracker.log_metrics(metrics["checkpoint_step"], os.path.basename(out_dir), metrics)
    folder = os.path.relpath(out_dir, workdir)
    for name in ("confusion_matrix.png", paths.RELIABILITY_FILE, paths.EVAL_METRICS_FILE):
        tracker.log_artifact(os.path.join(out_dir, name), folder)
    tracker.close()
