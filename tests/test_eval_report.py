"""Evaluation of a trained run: exact counts on 1 and 4 devices and 2 processes, metrics equal to
scikit-learn's, figures, a fresh process reproducing the training run's validation numbers, the
modality ablation and one-line errors.

Uses the tiny demo run trained once per pytest run (conftest's ``trained_run``).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import support

TINY = support.TINY
REPO = support.REPO
_env = support.env
_read_csv = support.read_csv


def _evaluate_cmd(workdir, *args, devices=4, extra_env=None):
    env = {**_env(devices), **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "jaxmm.evaluate", "--workdir", workdir,
                             *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def test_eval(trained_run):
    """The test split evaluated in this process on 4 devices."""
    from jaxmm.evaluation import report as eval_report

    return eval_report.evaluate_run(trained_run, "test")


def test_counts_are_exact_on_four_devices(test_eval):
    metrics = test_eval["metrics"]
    assert metrics["num_examples"] == TINY["test_size"]
    assert np.sum(metrics["confusion_matrix"]["counts"]) == TINY["test_size"]
    rows = _read_csv(os.path.join(test_eval["out_dir"], "predictions.csv"))
    assert [int(r["index"]) for r in rows] == list(range(TINY["test_size"]))
    assert metrics["checkpoint"] == "best" and metrics["modalities"] == ["image", "text"]
    with open(os.path.join(test_eval["out_dir"], "metrics.json")) as f:
        assert json.load(f)["checkpoint_step"] == metrics["checkpoint_step"]


def test_metrics_equal_scikit_learn(test_eval):
    from sklearn import metrics as sk

    rows = _read_csv(os.path.join(test_eval["out_dir"], "predictions.csv"))
    names = test_eval["metrics"]["confusion_matrix"]["labels"]
    y_true = [names.index(r["true"]) for r in rows]
    y_pred = [int(np.argmax([float(r[f"p_{c}"]) for c in names])) for r in rows]
    assert [names[k] for k in y_pred] == [r["predicted"] for r in rows]
    m = test_eval["metrics"]
    labels = list(range(len(names)))
    assert m["confusion_matrix"]["counts"] == sk.confusion_matrix(y_true, y_pred,
                                                                  labels=labels).tolist()
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                        average=avg, zero_division=0)
        assert (m[f"{avg}_precision"], m[f"{avg}_recall"], m[f"{avg}_f1"]) == pytest.approx(
            (p, r, f))
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                    zero_division=0)
    for k, name in enumerate(names):
        assert m["per_class"][name] == pytest.approx(
            {"precision": p[k], "recall": r[k], "f1": f[k], "support": s[k]})
    with open(os.path.join(test_eval["out_dir"], "classification_report.txt")) as f:
        assert f.read() == sk.classification_report(
            [r["true"] for r in rows], [r["predicted"] for r in rows],
            labels=m["macro_classes"], digits=4, zero_division=0)
    errors = _read_csv(os.path.join(test_eval["out_dir"], "misclassified.csv"))
    assert len(errors) == sum(t != p for t, p in zip(y_true, y_pred, strict=True))
    assert [float(e["confidence"]) for e in errors] == sorted(
        (float(e["confidence"]) for e in errors), reverse=True)


@pytest.mark.parametrize("name", ["confusion_matrix.png", "misclassified.png",
                                  "reliability_diagram.png"])
def test_figures_are_png_images(test_eval, name):
    path = os.path.join(test_eval["out_dir"], name)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.width > 100 and img.height > 100
        assert np.asarray(img.convert("L")).std() > 0  # something is drawn


def test_misclassified_grid_without_errors(tmp_path):
    from jaxmm.evaluation import report as eval_report

    path = eval_report.misclassified_grid([], str(tmp_path / "none.png"))
    assert os.path.getsize(path) > 0


def test_fresh_process_on_one_device_reproduces_training_validation(trained_run):
    out = _finish(_evaluate_cmd(trained_run, "--split", "validation", devices=1))
    assert "validation: 10 examples" in out
    with open(os.path.join(trained_run, "train_summary.json")) as f:
        best_step = json.load(f)["best_step"]
    with open(os.path.join(trained_run, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    logged = next(r for r in logged if r["kind"] == "val" and r["step"] == best_step)
    with open(os.path.join(trained_run, "eval", "best", "validation", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["checkpoint_step"] == best_step
    assert metrics["num_examples"] == logged["num_examples"] == TINY["val_size"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"):
        assert metrics[key] == logged[key], key
    assert metrics["loss"] == pytest.approx(logged["loss"], rel=1e-5)


def test_ablation_rows_and_masked_modalities(trained_run):
    from jaxmm.evaluation import report as eval_report

    result = eval_report.evaluate_run(trained_run, "validation", ablation=True)
    rows = result["ablation"]
    assert [r["modalities"] for r in rows] == [["image", "text"], ["image"], ["text"]]
    assert all(r["num_examples"] == TINY["val_size"] for r in rows)
    assert rows[0]["accuracy"] == result["metrics"]["accuracy"]
    assert result["notes"] == []  # trained with modality dropout
    assert os.path.exists(os.path.join(result["out_dir"], "ablation.json"))
    text_only = eval_report.evaluate_run(trained_run, "validation", modalities=["text"])
    assert text_only["out_dir"].endswith(os.path.join("eval", "best", "validation-text"))
    assert text_only["metrics"]["accuracy"] == rows[2]["accuracy"]


def test_user_errors(trained_run, tmp_path):
    from jaxmm.evaluation import report as eval_report
    from jaxmm.trained.workdir import Workdir

    with pytest.raises(FileNotFoundError, match="no '999' checkpoint"):
        Workdir(trained_run).load_model("999")
    with pytest.raises(ValueError, match="--checkpoint must be"):
        Workdir(trained_run).load_model("newest")
    with pytest.raises(ValueError, match="not a subset"):
        eval_report.evaluate_run(trained_run, "validation", modalities=["audio"])
    proc = _evaluate_cmd(str(tmp_path / "missing"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("jaxmm.evaluate: error: workdir")
    assert "does not exist" in errors[0] and "Traceback" not in err
    proc = _evaluate_cmd(trained_run, "--split", "dev")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "split" in err


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(trained_run, test_eval, tmp_path):
    """Two processes x 2 devices: every example once, same numbers, process 0 writes."""
    port = _free_port()
    procs = [_evaluate_cmd(trained_run, "--split", "test", devices=2, extra_env={
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outs = [_finish(p) for p in procs]
    assert "test: 16 examples" in outs[0] and "examples" not in outs[1]  # one writer
    with open(os.path.join(trained_run, "eval", "best", "test", "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("num_examples", "accuracy", "macro_f1", "confusion_matrix"):
        assert metrics[key] == test_eval["metrics"][key], key
    rows = _read_csv(os.path.join(trained_run, "eval", "best", "test", "predictions.csv"))
    assert [int(r["index"]) for r in rows] == list(range(TINY["test_size"]))


def test_ablation_notes_without_modality_dropout_or_second_tower():
    from jaxmm.evaluation import report as eval_report

    metrics = {"num_examples": 3, "accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0,
               "weighted_f1": 1.0, "loss": 0.1}

    class Evaluator:
        def __init__(self, modalities):
            self.modalities = modalities

        def __call__(self, variables, modalities):
            return metrics, None

    rows, notes = eval_report.run_ablation(Evaluator(("text",)), None, 0.1)
    assert rows is None and "not applicable" in notes[0] and "text" in notes[0]
    rows, notes = eval_report.run_ablation(Evaluator(("image", "text")), None, 0.0)
    assert len(rows) == 3 and "modality_dropout=0" in notes[0]


def test_checkpoint_choices(trained_run):
    from jaxmm.trained.workdir import Workdir
    from jaxmm.training import checkpointing

    have = checkpointing.available(trained_run)
    assert Workdir(trained_run).load_model("latest").step == have["latest"]
    assert Workdir(trained_run).load_model(str(have["all"][0])).step == have["all"][0]


def test_each_checkpoint_keeps_its_own_reports(trained_run):
    from jaxmm.evaluation import report as eval_report
    from jaxmm.training import checkpointing

    have = checkpointing.available(trained_run)
    first, latest = have["all"][0], have["latest"]
    results = {which: eval_report.evaluate_run(trained_run, "validation", which)
               for which in ("best", "latest", str(first))}
    assert results["best"]["out_dir"].endswith(os.path.join("eval", "best", "validation"))
    assert results["latest"]["out_dir"].endswith(
        os.path.join("eval", f"step_{latest}", "validation"))
    assert results[str(first)]["out_dir"].endswith(
        os.path.join("eval", f"step_{first}", "validation"))
    assert first != latest and len({r["out_dir"] for r in results.values()}) == 3
    for which, result in results.items():
        with open(os.path.join(result["out_dir"], "metrics.json")) as f:
            assert json.load(f)["checkpoint"] == which


def test_exclude_test_duplicates_reports_test_without_copies(trained_run, test_eval,
                                                           monkeypatch):
    from sklearn import metrics as sk

    from jaxmm.data import dedup
    from jaxmm.evaluation import report as eval_report
    from jaxmm.trained.workdir import Workdir

    rows = _read_csv(os.path.join(test_eval["out_dir"], "predictions.csv"))
    planted = {rows[i]["file"] for i in (0, 3, 5)}
    monkeypatch.setattr(dedup, "files_with_copy_in", lambda duplicates, split, other: (
        planted if (split, other) == ("test", "train") else set()))
    result = eval_report.evaluate_run(trained_run, "test", exclude_test_duplicates=True)
    sub = result["metrics"]["without_train_copies"]
    assert result["metrics"]["accuracy"] == test_eval["metrics"]["accuracy"]  # full split kept
    assert sub["excluded_files"] == sorted(planted)
    kept = [r for r in rows if r["file"] not in planted]
    assert sub["num_examples"] == len(kept) == TINY["test_size"] - 3
    names = sub["confusion_matrix"]["labels"]
    y_true = [names.index(r["true"]) for r in kept]
    y_pred = [names.index(r["predicted"]) for r in kept]
    assert sub["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert sub["macro_f1"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro",
                                                        zero_division=0))
    weights = np.asarray(Workdir(trained_run).read_record()["class_weights"])
    # predictions.csv holds calibrated probabilities; the loss is of the raw ones, and
    # log p_cal = log p_raw / T + const, so p_raw is proportional to p_cal ** T.
    temperature = test_eval["metrics"]["calibration"]["temperature"] or 1.0
    p_raw = np.array([[float(r[f"p_{c}"]) for c in names] for r in kept]) ** temperature
    p_raw /= p_raw.sum(axis=1, keepdims=True)
    ce = [-np.log(p_raw[i, t]) for i, t in enumerate(y_true)]
    w = [weights[t] for t in y_true]
    assert sub["loss"] == pytest.approx(np.dot(w, ce) / np.sum(w), rel=1e-4)
    assert any("without the 3 images that have a copy in Train" in n for n in result["notes"])
    no_option = eval_report.evaluate_run(trained_run, "test")  # the run's config says False
    assert "without_train_copies" not in no_option["metrics"]


def test_missing_dataset_is_an_error_and_nothing_is_prepared(trained_run, tmp_path):
    import shutil

    from jaxmm import paths
    from jaxmm.errors import WorkdirError
    from jaxmm.evaluation import report as eval_report

    work = tmp_path / "run"
    shutil.copytree(trained_run, work, ignore=shutil.ignore_patterns(paths.EVAL_DIR))
    with open(work / paths.CONFIG_FILE, encoding="utf-8") as f:
        record = json.load(f)
    assert record["config"]["demo"]["enabled"]  # the old code generated demo data here
    record["config"].update(data_dir=str(tmp_path / "elsewhere" / "data"), prepared_dir="")
    with open(work / paths.CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(record, f)
    with pytest.raises(WorkdirError, match="no prepared dataset at .*elsewhere.*jaxmm.prepare"):
        eval_report.evaluate_run(str(work), "test")
    assert not os.path.exists(tmp_path / "elsewhere")


def test_data_prepared_again_is_checked_against_the_run_record(trained_run, tmp_path):
    """Evaluating an old run after its data was prepared again: other options are refused with
    what changed; other files with the same options are evaluated, and the notes say so."""
    from jaxmm import files, paths
    from jaxmm.data import prepared
    from jaxmm.errors import WorkdirError
    from jaxmm.evaluation.report import dataset_dir
    from jaxmm.trained.workdir import Workdir

    run = tmp_path / "run"
    shutil.copy2(os.path.join(trained_run, paths.CONFIG_FILE), tmp_path / "config.json")
    run.mkdir()
    record = json.load(open(tmp_path / "config.json"))
    out_dir = tmp_path / "prepared"
    shutil.copytree(prepared.prepared_dir(Workdir(trained_run).config()), out_dir)
    record["config"]["prepared_dir"] = str(out_dir)
    files.write_json(str(run / paths.CONFIG_FILE), record)
    wd = Workdir(str(run))
    notes = []
    assert dataset_dir(wd, "test", notes) and notes == []  # as recorded

    meta_path = os.path.join(paths.dataset_path(str(out_dir)), paths.META_FILE)
    meta = json.load(open(meta_path))
    n = meta["num_examples"]["test"]
    meta["num_examples"]["test"] += 3
    files.write_json(meta_path, meta)
    dataset_dir(wd, "validation", notes)
    assert notes == []  # the validation split did not change
    dataset_dir(wd, "test", notes)
    assert len(notes) == 1 and f"num_examples.test: {n} -> {n + 3}" in notes[0], notes

    meta["options"]["stored_image_size"] = 64
    meta["options"].pop("exif_transpose")
    files.write_json(meta_path, meta)
    with pytest.raises(WorkdirError, match=r"prepared with other options than the run was "
                       r"trained on \(options.exif_transpose: True -> None; "
                       r"options.stored_image_size: 40 -> 64\)"):
        dataset_dir(wd, "test", [])
