"""Prediction on raw image files: same probabilities as evaluation, bad files reported and
skipped, folders searched recursively into a CSV."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.support import REPO
from tests.support import env as _env
from tests.support import read_csv as _read_csv


@pytest.fixture(scope="module")
def run(trained_run):
    """The shared run's best model without its temperature (raw probabilities)."""
    from jaxmm.trained.workdir import Workdir

    return Workdir(trained_run).load_model("best", calibrated=False)


@pytest.fixture(scope="module")
def data_dir(trained_run):
    from jaxmm.trained.workdir import Workdir

    return Workdir(trained_run).config().data_dir


def test_raw_files_get_the_evaluation_probabilities(run, test_split):
    from jaxmm.trained import classify

    files, _, probs = test_split
    rows, problems = classify.predict_files(classify.Predictor(run, batch_size=8), files)
    assert problems == []
    got = np.array([[r[f"p_{c}"] for c in run.class_names] for r in rows])
    np.testing.assert_allclose(got, probs, atol=1e-5)


def test_text_flag_and_unreadable_files(run, data_dir, tmp_path):
    from jaxmm.trained import classify

    good = tmp_path / "Plastic_Bottle_3.png"
    shutil.copy(_some_image(data_dir), good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    files, problems, any_folder = classify.find_images([str(good), str(bad),
                                                         str(tmp_path / "gone.png")])
    assert not any_folder and problems == [f"{tmp_path / 'gone.png'}: no such file or directory"]
    rows, unreadable = classify.predict_files(classify.Predictor(run), files)
    assert [r["file"] for r in rows] == [str(good)] and rows[0]["text"] == "plastic bottle"
    assert len(unreadable) == 1 and unreadable[0].startswith(str(bad))
    rows, _ = classify.predict_files(classify.Predictor(run), [str(good)], text="tin can")
    assert rows[0]["text"] == "tin can"
    assert sum(rows[0][f"p_{c}"] for c in run.class_names) == pytest.approx(1.0, abs=1e-5)


def _some_image(data_dir):
    for root, _, names in os.walk(os.path.join(data_dir, "CVPR_2024_dataset_Test")):
        if names:
            return os.path.join(root, sorted(names)[0])
    raise AssertionError("no test image")


def test_cli_folder_to_csv_with_a_corrupt_file(run, data_dir, trained_run, tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(_some_image(data_dir), folder / "a_cup.png")
    shutil.copy(_some_image(data_dir), folder / "nested" / "egg_shells_2.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "preds.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxmm.predict", "--workdir", trained_run, str(folder),
         str(tmp_path / "missing.png"), "--out", str(out)],
        env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2 and "corrupt.png" in skipped[0] + skipped[1]
    rows = _read_csv(out)
    assert sorted(os.path.basename(r["file"]) for r in rows) == ["a_cup.png", "egg_shells_2.png"]
    assert {r["predicted"] for r in rows} <= set(run.class_names)


def test_cli_writes_only_into_the_workdir_without_out(data_dir, trained_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(_some_image(data_dir), folder / "=cmd()_1.png")
    target = os.path.join(trained_run, "predictions.csv")
    if os.path.exists(target):
        os.remove(target)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxmm.predict", "--workdir", trained_run, str(folder)],
        env=_env(1), cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # nothing in the current folder
    rows = _read_csv(target)
    assert [os.path.basename(r["file"]) for r in rows] == ["=cmd()_1.png"]
