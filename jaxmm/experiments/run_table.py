"""Reads training workdirs into comparable rows, and writes them as a table, CSV, Markdown, PNG.

A row holds what a run's files say, read while the run may still be writing them: its status
(finished / early-stopped / preempted / failed / running, or pending for a sweep entry not started
yet), the best validation epoch and its metrics, test metrics where ``jaxmm.evaluate`` has run,
and the median training throughput. A missing or damaged file leaves a note on the row, never an
exception.
"""

import os
import statistics
import time

from jaxmm import files, paths
from jaxmm.errors import ConfigError
from jaxmm.evaluation import metrics
from jaxmm.experiments import sweep
from jaxmm.trained.workdir import Workdir
from jaxmm.training import lock
from jaxmm.training.progress import Status

# A run without a closing summary counts as running while it wrote something this recently.
DEFAULT_STALE_MINUTES = 30.0
VAL_KEYS = ("macro_f1", "accuracy", "balanced_accuracy", "weighted_f1", "loss")
TEST_KEYS = ("macro_f1", "accuracy", "balanced_accuracy", "loss")
# Summary statuses as the table shows them.
_STATUS_NAMES = {Status.FINISHED.value: "finished", Status.EARLY_STOPPED.value: "early-stopped",
                 Status.PREEMPTED.value: "preempted"}


def find_runs(dirs) -> tuple[list[dict], list[str]]:
    """Expands workdirs and sweep folders into runs ({"name", "workdir", "overrides"}).

    Returns:
      (runs, notes): notes name every argument that held no run.
    """
    runs, notes = [], []
    for d in dirs:
        manifest = sweep.read_manifest(d)
        if manifest is not None:
            runs += [{"name": r["name"], "workdir": os.path.join(d, r["name"]),
                      "overrides": r.get("overrides")} for r in manifest["runs"]]
        elif Workdir(d).is_run():
            runs.append({"name": os.path.basename(os.path.normpath(d)), "workdir": d,
                         "overrides": None})
        elif os.path.isdir(d) and (subs := [s for s in sorted(os.listdir(d))
                                            if Workdir(os.path.join(d, s)).is_run()]):
            runs += [{"name": s, "workdir": os.path.join(d, s), "overrides": None} for s in subs]
        else:
            notes.append(f"{d}: not a workdir or sweep folder, skipped")
    return runs, notes


def validation_history(rows: list[dict]) -> list[dict]:
    """Validation rows by step; a step validated twice (a resumed run) keeps its last row."""
    by_step = {r.get("step"): r for r in rows if r["kind"] == "val"}
    return [by_step[s] for s in sorted(by_step, key=lambda s: (s is None, s))]


def _last_write(workdir: str) -> float | None:
    times = []
    for name in (paths.METRICS_FILE, paths.SUMMARY_FILE, paths.CONFIG_FILE,
                 paths.CHECKPOINTS_DIR):
        try:
            times.append(os.path.getmtime(os.path.join(workdir, name)))
        except OSError:
            pass
    ckpts = os.path.join(workdir, paths.CHECKPOINTS_DIR)
    if os.path.isdir(ckpts):
        for entry in os.scandir(ckpts):
            times.append(entry.stat().st_mtime)
    return max(times) if times else None


def lock_state(workdir: str) -> str | None:
    """"live" while a training process holds the workdir's lock, "stale" when the holder is gone
    (it died without releasing it), None without a lock file."""
    holder = lock.read_holder(os.path.join(workdir, paths.LOCK_FILE))
    if holder is None:
        return None
    return "stale" if lock.stale_reason(holder, lock.this_process()) else "live"


def run_status(workdir: str, summary: dict | None, stale_s: float, now: float) -> str:
    """running while a live process holds the workdir's lock; else finished / early-stopped /
    preempted from the summary (unless the run went on after writing it); else failed when the
    lock's holder is gone, and otherwise running or failed by the age of the newest file."""
    if not os.path.isdir(workdir):
        return "pending"
    held = lock_state(workdir)
    if held == "live":
        return "running"
    if summary and summary.get("status"):
        summary_time = os.path.getmtime(os.path.join(workdir, paths.SUMMARY_FILE))
        metrics_file = os.path.join(workdir, paths.METRICS_FILE)
        resumed = (os.path.exists(metrics_file)
                   and os.path.getmtime(metrics_file) > summary_time + 1)
        if not resumed:
            return _STATUS_NAMES.get(summary["status"], summary["status"].replace("_", "-"))
    if held == "stale":
        return "failed"
    last = _last_write(workdir)
    if last is None:
        return "pending"
    return "running" if now - last < stale_s else "failed"


def best_validation(history: list[dict], metric: str) -> dict | None:
    """The validation row with the best ``metric`` (the first of equals, as the trainer)."""
    rows = [r for r in history if isinstance(r.get(metric), (int, float))]
    if not rows:
        return None
    best = rows[0]
    for r in rows[1:]:
        if metrics.improves(metric, r[metric], best[metric]):
            best = r
    return best


def test_metrics(workdir: str, modalities) -> dict | None:
    """The test metrics of the run's evaluation with all towers: those of the best checkpoint
    (eval/best/test/) when there, else the newest metrics file under eval/ whose split is test
    (another checkpoint's folder, or an older layout)."""
    found = []
    for folder, _, names in os.walk(os.path.join(workdir, paths.EVAL_DIR)):
        if paths.EVAL_METRICS_FILE not in names:
            continue
        path = os.path.join(folder, paths.EVAL_METRICS_FILE)
        m = files.read_json(path)
        if not isinstance(m, dict):
            continue
        split = m.get("split", os.path.basename(folder))
        mods = m.get("modalities")
        if split != "test" or (mods is not None and modalities and
                               list(mods) != list(modalities)):
            continue
        best = (m.get("checkpoint") == "best" or
                os.path.basename(os.path.dirname(os.path.normpath(folder))) == paths.BEST_DIR)
        found.append((best, os.path.getmtime(path), m))
    return max(found, key=lambda t: t[:2])[2] if found else None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return "+".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def read_run(run: dict, stale_s: float = DEFAULT_STALE_MINUTES * 60, now=None) -> dict:
    """One comparison row (plus private "_config", "_history" and "notes" entries)."""
    workdir, notes = run["workdir"], []
    wd = Workdir(workdir)
    record = wd.stored_record()
    summary = wd.summary(notes)
    config = record.get("config") if isinstance(record, dict) else None
    if os.path.isdir(workdir) and config is None:
        notes.append(f"no readable {paths.CONFIG_FILE}")
    rows = wd.metric_rows(notes)
    history = validation_history(rows)
    metric = (config or {}).get("early_stopping_metric", "macro_f1")
    best = best_validation(history, metric) or (summary or {}).get("best_validation")
    modalities = ((config or {}).get("model") or {}).get("modalities")
    test = test_metrics(workdir, modalities)
    speeds = [r["samples_per_s"] for r in rows if r["kind"] == "train"
              and isinstance(r.get("samples_per_s"), (int, float))]
    row = {"run": run["name"],
           "status": run_status(workdir, summary, stale_s, time.time() if now is None else now),
           "epochs": history[-1].get("epoch") if history else None,
           "best_epoch": (best or {}).get("epoch"),
           **{f"val_{k}": (best or {}).get(k) for k in VAL_KEYS},
           **{f"test_{k}": (test or {}).get(k) for k in TEST_KEYS},
           "test_checkpoint": (test or {}).get("checkpoint"),
           "samples_per_s": statistics.median(speeds) if speeds else None,
           "workdir": workdir, "notes": notes,
           "_config": _flatten(config) if config else None, "_history": history,
           "_overrides": run.get("overrides")}
    return row


def add_overrides(rows: list[dict]) -> None:
    """Sets each row's "overrides" to the config keys whose values differ between the runs."""
    configs = [r["_config"] for r in rows if r["_config"] is not None]
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    leaves = [k.rsplit(".", 1)[-1] for k in differing]
    for r in rows:
        if r["_config"] is None:  # A sweep entry that has not started: its own overrides.
            r["overrides"] = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}"
                                      for k, v in (r["_overrides"] or {}).items())
            continue
        r["overrides"] = " ".join(
            f"{leaf if leaves.count(leaf) == 1 else k}={_fmt(r['_config'].get(k))}"
            for k, leaf in zip(differing, leaves, strict=True))


def sort_rows(rows: list[dict], column: str) -> list[dict]:
    """Best first by ``column`` (ascending for losses); rows without a value go last."""
    if rows and column not in rows[0]:
        raise ConfigError(f"cannot sort by '{column}'; choose one of "
                         f"{', '.join(k for k in rows[0] if not k.startswith('_'))}")
    sign = 1.0 if column.rsplit("_", 1)[-1] in metrics.LOWER_IS_BETTER else -1.0
    have = [r for r in rows if isinstance(r.get(column), (int, float))]
    rest = [r for r in rows if not isinstance(r.get(column), (int, float))]
    return sorted(have, key=lambda r: sign * r[column]) + rest


# Every column goes to the CSV; the terminal and Markdown tables show the short list (plus the
# sort column).
COLUMNS = ("run", "overrides", "status", "epochs", "best_epoch",
           *(f"val_{k}" for k in VAL_KEYS), *(f"test_{k}" for k in TEST_KEYS),
           "test_checkpoint", "samples_per_s")
SHORT_COLUMNS = ("run", "overrides", "status", "epochs", "best_epoch", "val_macro_f1",
                 "val_accuracy", "val_loss", "test_macro_f1", "test_accuracy", "samples_per_s")


def short_columns(sort_column: str) -> tuple:
    """The columns of the printed table: the short list, with the sort column."""
    if sort_column in SHORT_COLUMNS or sort_column not in COLUMNS:
        return SHORT_COLUMNS
    return (*SHORT_COLUMNS[:5], sort_column, *SHORT_COLUMNS[5:])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def text_table(rows: list[dict], columns=SHORT_COLUMNS) -> str:
    """A fixed-width table for the terminal."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(rows: list[dict], columns=SHORT_COLUMNS) -> str:
    """The same table in Markdown."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], metric: str, path: str) -> str | None:
    """Overlays every run's validation ``metric`` and loss per epoch; None without any."""
    drawn = [r for r in rows if r["_history"]]
    if not drawn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, (metric, "loss"), strict=True):
        for r in drawn:
            h = [x for x in r["_history"] if isinstance(x.get(key), (int, float))]
            ax.plot([x.get("epoch", x.get("step")) for x in h], [x[key] for x in h], "o-",
                    label=r["run"])
        ax.set(xlabel="epoch", title=f"validation {key}")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(rows: list[dict], out_dir: str, metric: str,
                  columns=SHORT_COLUMNS) -> list[str]:
    """comparison.csv (every column), comparison.md (``columns``) and comparison.png (validation
    ``metric`` and loss curves) in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, paths.COMPARISON_BASENAME)
    out = [files.write_csv(base + ".csv", [{c: r.get(c) for c in (*COLUMNS, "workdir")}
                                           for r in rows], [*COLUMNS, "workdir"])]
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(markdown_table(rows, columns))
    out.append(base + ".md")
    png = plot_curves(rows, metric, base + ".png")
    return out + ([png] if png else [])
