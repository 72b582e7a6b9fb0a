"""Calibration and explanations of a trained run: the temperature fitted at the end of training,
calibrated metrics in evaluation, ``--no_calibration``, and explanation figures of evaluate and
predict. Uses the tiny demo run shared by conftest.py."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.support import read_csv as _read_csv


def _tempered(p_raw, temperature):
    """softmax(log p / T) written out: each probability to the power 1/T, renormalised."""
    q = np.asarray(p_raw, np.float64) ** (1.0 / temperature)
    return q / q.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def validation(trained_run):
    from jaxmm.evaluation import report as eval_report

    calibrated = eval_report.evaluate_run(trained_run, "validation", explain_first=2)
    # Both write eval/validation/: keep the calibrated rows before the raw run replaces them.
    calibrated_rows = _read_csv(os.path.join(calibrated["out_dir"], "predictions.csv"))
    raw = eval_report.evaluate_run(trained_run, "validation", calibrated=False)
    return calibrated, raw, calibrated_rows


def test_training_fits_a_temperature_on_validation(trained_run):
    from jaxmm import paths
    from jaxmm.trained.workdir import Workdir

    with open(os.path.join(trained_run, paths.CALIBRATION_FILE)) as f:
        record = json.load(f)
    assert record["split"] == "validation" and record["num_examples"] == 10
    assert Workdir(trained_run).temperature() == record["temperature"] > 0
    # T = 1 is a candidate of the fit, so the fitted T cannot do worse on the data it saw.
    assert record["after"]["nll"] <= record["before"]["nll"] + 1e-9


def test_calibrated_nll_not_worse_and_accuracy_unchanged(validation):
    calibrated, raw, calibrated_rows = validation
    cal = calibrated["metrics"]["calibration"]
    assert cal["temperature"] > 0 and raw["metrics"]["calibration"]["calibrated"] is None
    assert cal["calibrated"]["nll"] <= cal["raw"]["nll"] + 1e-6
    assert cal["raw"] == pytest.approx(raw["metrics"]["calibration"]["raw"])
    for key in ("accuracy", "macro_f1", "loss", "confusion_matrix"):
        assert calibrated["metrics"][key] == raw["metrics"][key]
    raw_rows = _read_csv(os.path.join(raw["out_dir"], "predictions.csv"))
    assert [r["predicted"] for r in calibrated_rows] == [r["predicted"] for r in raw_rows]
    names = calibrated["metrics"]["confusion_matrix"]["labels"]
    # The CSV holds the calibrated probabilities: softmax(log p_raw / T).
    assert abs(cal["temperature"] - 1.0) > 1e-3  # else raw and calibrated would agree anyway
    p_raw = np.array([[float(r[f"p_{c}"]) for c in names] for r in raw_rows])
    p_cal = np.array([[float(r[f"p_{c}"]) for c in names] for r in calibrated_rows])
    np.testing.assert_allclose(p_cal, _tempered(p_raw, cal["temperature"]), atol=2e-5)


def test_evaluation_explains_errors_and_first_examples(validation):
    calibrated, _, rows = validation
    folder = os.path.join(calibrated["out_dir"], "explanations")
    wanted = {int(r["index"]) for r in rows if r["true"] != r["predicted"]} | {0, 1}
    pngs = sorted(os.listdir(folder))
    assert "gallery.png" in pngs and len(pngs) == len(wanted) + 1
    assert os.path.isfile(os.path.join(calibrated["out_dir"], "reliability_diagram.png"))


def test_predict_explains_files_with_calibrated_probabilities(trained_run, tmp_path):
    from jaxmm.trained import classify
    from jaxmm.trained.workdir import Workdir

    wd = Workdir(trained_run)
    raw_model, run = wd.load_model("best", calibrated=False), wd.load_model("best")
    source = os.path.join(wd.config().data_dir, "CVPR_2024_dataset_Test")
    images = sorted(os.path.join(root, n) for root, _, names in os.walk(source)
                    for n in names)[:3]
    files = []
    for k, path in enumerate(images):  # one folder each: two classes may share a file name
        os.makedirs(tmp_path / str(k))
        files.append(shutil.copy(path, tmp_path / str(k)))
    temperature = wd.temperature()
    assert run.spec.temperature == temperature
    raw, _ = classify.predict_files(classify.Predictor(raw_model, 4), files)
    cal, _ = classify.predict_files(classify.Predictor(run, 4), files)
    p = lambda rows: np.array([[r[f"p_{c}"] for c in run.class_names] for r in rows])
    assert abs(temperature - 1.0) > 1e-3
    np.testing.assert_allclose(p(cal), _tempered(p(raw), temperature), atol=2e-5)
    written = classify.explain_files(classify.Predictor(run, 4), cal,
                                     str(tmp_path / "why"))
    assert len(written) == 4 and written[-1].endswith("gallery.png")
    assert all(open(w, "rb").read(4) == b"\x89PNG" for w in written)
