"""What a training run shows and leaves behind: metrics.jsonl, TensorBoard events, the run's
versions and devices, a learning-curve PNG, a progress bar and the closing summary. Everything
here is a no-op on processes other than 0."""

import contextlib
import datetime
import logging
import os
import subprocess
import sys
import time

import jax
import numpy as np

from jaxmm import paths, versions

logger = logging.getLogger("jaxmm")


def is_writer() -> bool:
    """Only process 0 writes logs, plots and reports."""
    return jax.process_index() == 0


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info() -> dict:
    """Package versions, devices, processes and the git commit of this run."""
    return {
        "versions": versions.package_versions(versions.TRAINING),
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "git_commit": _git_commit(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


class MetricWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard event files (process 0 only).

    Args:
      wd: the run's ``Workdir``.
    """

    def __init__(self, wd):
        self._enabled = is_writer()
        self._wd = wd
        self._tb = None
        self.tracker = None  # A tracking.Tracker that gets every row too (set by the loop).
        if self._enabled:
            from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.

            self._tb = SummaryWriter(wd.file(paths.TENSORBOARD_DIR))

    def write(self, step: int, kind: str, values: dict) -> None:
        """Records scalar ``values`` of ``kind`` ("train" or "val") at ``step``."""
        if not self._enabled:
            return
        self._wd.append_metrics({"step": int(step), "kind": kind, **values})
        for key, value in values.items():
            if isinstance(value, (int, float, np.number)):
                self._tb.add_scalar(f"{kind}/{key}", float(value), int(step))
        self._tb.flush()
        if self.tracker is not None:
            self.tracker.log_metrics(step, kind, values)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self.tracker is not None:
            self.tracker.close()


def plot_learning_curves(wd, metric: str) -> str | None:
    """Draws train/validation loss and the validation ``metric`` per step into a PNG of the
    ``Workdir`` ``wd``."""
    rows = wd.metric_rows()
    if not is_writer() or not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (weighted)")
    ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="class-weighted cross-entropy", title="Loss")
    ax_loss.legend()
    for key in dict.fromkeys(("accuracy", metric)):
        ax_metric.plot([r["step"] for r in val], [r.get(key) for r in val], "o-", label=key)
    ax_metric.set(xlabel="step", title="Validation", ylim=(0, 1))
    ax_metric.legend()
    fig.tight_layout()
    path = wd.file(paths.CURVES_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class ProgressBar:
    """Per-epoch progress with loss and samples/s (process 0 only).

    On a terminal it is a tqdm bar. When stderr is not a terminal (a Slurm ``.out`` file, a
    pipe) it writes one log line every ``log_every_seconds`` and one at the end of the epoch
    instead, so log files hold readable lines rather than thousands of carriage-return redraws.
    """

    def __init__(self, epoch: int, total: int, initial: int, log_every_seconds: float = 30.0,
                 interactive: bool | None = None, log=None):
        self._bar = None
        self._enabled = is_writer()
        if not self._enabled:
            return
        if interactive is None:
            interactive = sys.stderr.isatty()
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}",
                             unit="step", dynamic_ncols=True, leave=True)
            return
        self._epoch, self._total, self._done, self._first = epoch, total, initial, initial
        self._every, self._postfix = log_every_seconds, {}
        self._log = log or logger.info
        self._start = self._last = time.monotonic()
        self._logged_at = initial

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        if not self._enabled:
            return
        self._done += n
        self._postfix.update(postfix)
        now = time.monotonic()
        if self._every > 0 and now - self._last >= self._every:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = (self._done - self._first) / elapsed
        eta = (self._total - self._done) / rate if rate > 0 else float("nan")
        extra = "".join(f" {k}={v}" for k, v in self._postfix.items())
        self._log(f"epoch {self._epoch + 1}: step {self._done}/{self._total} "
                  f"({100 * self._done / max(self._total, 1):.0f}%), {rate:.2f} steps/s, "
                  f"{_clock(elapsed)} elapsed, {_clock(eta)} left{extra}")
        self._last, self._logged_at = now, self._done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled and self._done != self._logged_at:
            self._line(time.monotonic())


class PhaseClock:
    """Wall-clock seconds of a training process by phase: where the time to a result goes.

    Phases (each a sum over the run; absent when it did not happen): ``prepare`` (preparing or
    opening the dataset), ``startup`` (tokenizer, model, optimizer, initial or restored state,
    input pipeline), ``compile`` (the first train step: compile + run), ``train`` (every other
    step, input waits and logging included), ``validation`` (the epoch-end passes and the best
    checkpoint's save), ``checkpoints`` (the time the loop waited on saves), ``calibration``;
    ``other`` is the rest of ``total`` (locking, the summary and its plot). Train steps run
    asynchronously: a phase ends waiting on the devices (the epoch-end metrics fetch, a
    validation result), so the device work lands in the phase that issued it. Only this
    process's work is counted: a resumed run reports the time since it resumed.
    """

    ORDER = ("prepare", "startup", "compile", "train", "validation", "checkpoints",
             "calibration")

    def __init__(self):
        self._start = time.perf_counter()
        self._inner: list[float] = []  # per open phase: seconds of the phases opened inside it
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the time spent inside the block to phase ``name``, less the time of phases
        opened inside it (which count for themselves)."""
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            inner = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self._inner:
                self._inner[-1] += elapsed

    def record(self) -> dict[str, float]:
        """Seconds per phase (in ORDER), ``other`` and ``total``, rounded to milliseconds."""
        total = time.perf_counter() - self._start
        out = {k: round(self.seconds[k], 3) for k in self.ORDER if k in self.seconds}
        out["other"] = round(max(total - sum(self.seconds.values()), 0.0), 3)
        out["total"] = round(total, 3)
        return out


def format_seconds(record: dict) -> str:
    """One line of a PhaseClock record: 'prepare 12.3 s, startup 4.1 s, ..., total 95.0 s'."""
    return ", ".join(f"{k} {v:.1f} s" for k, v in record.items())


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet.
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def format_summary(summary: dict) -> str:
    """The closing lines a finished run prints: best epoch, its metrics, where things are."""
    w = summary["workdir"]
    best = summary.get("best_validation") or {}
    status = {"finished": "Training finished", "early_stopped": "Stopped early"}.get(
        summary["status"], summary["status"])
    lines = [f"{status} at step {summary['step']} ({summary['epochs_completed']} epochs)."]
    if best:
        lines.append(f"Best epoch {summary['best_epoch']} (step {summary['best_step']}): "
                     f"validation accuracy {best['accuracy']:.4f}, macro-F1 "
                     f"{best['macro_f1']:.4f}, loss {best['loss']:.4f}")
    at = lambda name: os.path.join(w, name)
    lines += [f"  checkpoints  {at(paths.BEST_DIR)} (best), {at(paths.CHECKPOINTS_DIR)} (latest)",
              f"  metrics      {at(paths.METRICS_FILE)}, {at(paths.TENSORBOARD_DIR)}",
              f"  curves       {at(paths.CURVES_FILE)}",
              f"  next         python -m jaxmm.evaluate --workdir {w} --split test"]
    return "\n".join(lines)
