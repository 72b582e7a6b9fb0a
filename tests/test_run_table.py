"""Comparison rows from workdirs in every state: finished, stopped early, preempted, running,
failed, not started, damaged files; overrides, sorting, outputs and the compare command."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxmm import paths
from jaxmm.experiments import run_table
from jaxmm.training import lock

ROOT = Path(__file__).resolve().parents[1]


def _config(lr=1e-3, fusion="concat", metric="macro_f1"):
    return {"config": {"seed": 0, "early_stopping_metric": metric,
                       "optim": {"lr_head": lr, "lr_text": 1e-4},
                       "model": {"fusion": fusion, "modalities": ["image", "text"]}}}


def _run(path: Path, *, config=None, val=(), train_speed=(), summary=None, extra_lines=()):
    """A workdir with the files the trainer writes; val = [(epoch, macro_f1, loss), ...]."""
    path.mkdir(parents=True)
    if config is not None:
        (path / paths.CONFIG_FILE).write_text(json.dumps(config))
    lines = [json.dumps({"step": 10 * i + 5, "kind": "train", "loss": 1.0, "samples_per_s": s})
             for i, s in enumerate(train_speed)]
    lines += [json.dumps({"step": 10 * e, "kind": "val", "epoch": e, "macro_f1": f, "loss": lo,
                          "accuracy": f + 0.1, "balanced_accuracy": f}) for e, f, lo in val]
    if lines or extra_lines:
        (path / paths.METRICS_FILE).write_text("\n".join([*lines, *extra_lines]) + "\n")
    if summary is not None:
        (path / paths.SUMMARY_FILE).write_text(json.dumps({"status": summary}))
    return path


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old))


def _eval(workdir: Path, folder: str, **metrics):
    d = workdir / paths.EVAL_DIR / folder
    d.mkdir(parents=True)
    (d / paths.EVAL_METRICS_FILE).write_text(json.dumps(metrics))


@pytest.fixture
def runs(tmp_path):
    """A folder of six runs in six states."""
    r = tmp_path / "runs"
    _run(r / "a", config=_config(1e-3), val=[(1, .5, 1.0), (2, .7, .8), (3, .6, .7)],
         train_speed=[10.0, 100.0, 110.0, 120.0], summary="finished")
    _eval(r / "a", "best/test", split="test", modalities=["image", "text"], macro_f1=.65,
          accuracy=.7, loss=.9, checkpoint="best")
    _eval(r / "a", "best/test-text", split="test", modalities=["text"], macro_f1=.1)
    _eval(r / "a", "step_30/test", split="test", macro_f1=.3, checkpoint="latest")  # newer
    _run(r / "b", config=_config(3e-4), val=[(1, .8, .6)], summary="early_stopped")
    _eval(r / "b", "step_40/test", split="test", macro_f1=.75, checkpoint="40")
    _run(r / "c", config=_config(3e-4, "gated"), val=[(1, .4, 1.2)], summary="preempted")
    _run(r / "d", config=_config(1e-4), val=[(1, .3, 1.3)])  # Writing right now.
    _run(r / "e", config=_config(1e-4), val=[(1, .2, 1.4)])  # Died an hour ago.
    _age(r / "e", 3600)
    # No config.json, half a line at the end of metrics.jsonl.
    _run(r / "f", val=[(1, .9, .5)], extra_lines=['{"step": 20, "kind": "va'])
    # Recent files, but the process holding the workdir's lock has died: failed.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _lock(_run(r / "g", config=_config(1e-4), val=[(1, .1, 1.5)]), int(dead.stdout))
    # Nothing written for an hour, but a live process holds the lock (a long validation).
    _lock(_run(r / "h", config=_config(1e-4), val=[(1, .1, 1.5)]), os.getpid())
    _age(r / "h", 3600)
    return r


def _lock(workdir: Path, pid: int) -> None:
    holder = dataclasses.asdict(lock.this_process())
    holder.update(pid=pid, pid_start=None)
    (workdir / paths.LOCK_FILE).write_text(json.dumps(holder))


def _rows(dirs):
    found, notes = run_table.find_runs([str(d) for d in dirs])
    rows = [run_table.read_run(x, stale_s=600) for x in found]
    run_table.add_overrides(rows)
    return {r["run"]: r for r in rows}, notes


def test_status_best_epoch_and_test_metrics(runs):
    rows, notes = _rows([runs, runs / "missing"])
    assert notes == [f"{runs / 'missing'}: not a workdir or sweep folder, skipped"]
    assert {k: r["status"] for k, r in rows.items()} == {
        "a": "finished", "b": "early-stopped", "c": "preempted", "d": "running",
        "e": "failed", "f": "running", "g": "failed", "h": "running"}
    a = rows["a"]
    assert (a["epochs"], a["best_epoch"], a["val_macro_f1"], a["val_loss"]) == (3, 2, .7, .8)
    assert (a["test_macro_f1"], a["test_checkpoint"]) == (.65, "best")  # not the text-only one
    assert a["samples_per_s"] == pytest.approx(105.0)  # the median ignores the compile step
    assert rows["b"]["test_macro_f1"] == .75 and rows["b"]["test_checkpoint"] == "40"
    assert rows["c"]["test_macro_f1"] is None
    f = rows["f"]
    assert f["val_macro_f1"] == .9
    assert f["notes"] == ["no readable config.json",
                          "1 unreadable or damaged line(s) in metrics.jsonl, skipped"]


def test_a_run_that_resumed_after_its_summary_is_running(runs):
    c = runs / "c"
    _age(c, 60)
    with open(c / paths.METRICS_FILE, "a") as f:
        f.write(json.dumps({"step": 30, "kind": "train", "loss": 1.0}) + "\n")
    assert _rows([c])[0]["c"]["status"] == "running"


def test_overrides_show_only_keys_that_differ(runs):
    rows, _ = _rows([runs])
    assert rows["a"]["overrides"] == "fusion=concat lr_head=0.001"
    assert rows["c"]["overrides"] == "fusion=gated lr_head=0.0003"
    assert rows["f"]["overrides"] == ""


def test_sort_best_first_missing_last(runs):
    rows, _ = _rows([runs])
    rows = list(rows.values())
    rows[0]["val_macro_f1"] = None
    order = [r["run"] for r in run_table.sort_rows(rows, "val_macro_f1")]
    assert order == ["f", "b", "c", "d", "e", "g", "h", "a"]
    assert [r["run"] for r in run_table.sort_rows(rows, "val_loss")][:2] == ["f", "b"]
    with pytest.raises(ValueError, match="cannot sort by 'nope'"):
        run_table.sort_rows(rows, "nope")


def test_sweep_folder_lists_runs_not_started(tmp_path):
    sw = tmp_path / "sw"
    _run(sw / "0-lr_head=0.001", config=_config(1e-3), val=[(1, .5, 1.0)], summary="finished")
    manifest = {"runs": [{"index": 0, "name": "0-lr_head=0.001",
                          "overrides": {"optim.lr_head": 1e-3}},
                         {"index": 1, "name": "1-lr_head=0.0003",
                          "overrides": {"optim.lr_head": 3e-4}}]}
    (sw / paths.SWEEP_FILE).write_text(json.dumps(manifest))
    rows, _ = _rows([sw])
    assert rows["1-lr_head=0.0003"]["status"] == "pending"
    assert rows["1-lr_head=0.0003"]["overrides"] == "lr_head=0.0003"


def test_compare_command_writes_table_files(runs, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "jaxmm.compare", str(runs), str(runs / "nope"),
                          f"--out={out}", "--sort=val_loss"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "overrides", "status"]
    assert lines[1].startswith("f ")  # lowest validation loss first
    assert "note: f: no readable config.json" in res.stdout
    assert "not a workdir or sweep folder" in res.stdout
    with open(out / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["f", "b", "a", "c", "d", "e", "g", "h"]
    assert table[2]["test_macro_f1"] == "0.65" and table[2]["status"] == "finished"
    md = (out / "comparison.md").read_text().splitlines()
    assert md[0].startswith("| run | overrides | status |") and len(md) == 10
    assert (out / "comparison.png").stat().st_size > 1000


def test_compare_without_runs_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "jaxmm.compare", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1
    assert res.stderr.strip().startswith("jaxmm.compare: error: no runs found in")


def test_damaged_rows_and_summary_are_skipped_and_named(tmp_path):
    """A step written as a string, a boolean epoch and a numeric status: one note each, and the
    rest of the run still compares (sorting by step would otherwise raise); a training row's
    fractional epoch is fine."""
    r = _run(tmp_path / "x", config=_config(), val=[(1, .5, 1.0), (2, .6, .9)], summary=3,
             extra_lines=['{"step": "30", "kind": "val", "epoch": 3, "macro_f1": 0.9}',
                          '{"step": 40, "kind": "val", "epoch": true, "macro_f1": 0.9}',
                          '{"step": 50, "kind": 7}',
                          '{"step": 15, "kind": "train", "epoch": 1.5, "samples_per_s": 9.0}'])
    rows, _ = _rows([r])
    row = rows["x"]
    assert row["val_macro_f1"] == .6 and row["epochs"] == 2 and row["samples_per_s"] == 9.0
    assert "3 unreadable or damaged line(s) in metrics.jsonl, skipped" in row["notes"]
    assert "train_summary.json is damaged (status 3), ignored" in row["notes"]
    assert row["status"] in ("running", "failed")  # from the files' age, not the summary
