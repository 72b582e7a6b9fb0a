"""Files written by an older jaxmm keep working: a training workdir (run record format 1) and an
export bundle (format 1), both written by jaxmm before the model spec and bundle format 2, load
and give the probabilities that version computed (tests/fixtures/format1/expected.json), and the
old workdir exports to a verified format-2 bundle with the same predictions.
"""

import json
import os
import shutil

import numpy as np
import pytest

from tests.support import REPO

FIXTURE = os.path.join(REPO, "tests", "fixtures", "format1")


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """A copy of the fixture (tests never write into the repository)."""
    root = tmp_path_factory.mktemp("format1")
    shutil.copytree(FIXTURE, root, dirs_exist_ok=True)
    with open(root / "expected.json", encoding="utf-8") as f:
        expected = json.load(f)
    files = [str(root / "images" / name) for name in expected["images"]]
    return root, files, expected


@pytest.mark.parametrize("engine", ["exported", "model"])
def test_format1_bundle_loads_unverified_and_predicts_as_before(old, engine, caplog):
    import jaxmm

    root, files, expected = old
    clf = jaxmm.Classifier.load(str(root / "bundle"), engine=engine, cache_dir="")
    assert "format 1 records no content digests" in caplog.text
    np.testing.assert_allclose(clf.predict(files).probs, expected[f"bundle_{engine}"],
                               atol=1e-6)
    assert clf.model_id is None and clf.spec.preprocessing.stored_size == 40


def test_format1_workdir_loads_and_predicts_as_before(old):
    from jaxmm.trained import classify
    from jaxmm.trained.workdir import RECORD_VERSION, Workdir

    root, files, expected = old
    wd = Workdir(str(root / "run"))
    assert wd.record()["record_version"] == RECORD_VERSION
    assert "record_version" not in json.load(open(root / "run" / "config.json"))  # untouched
    predictor = classify.open_predictor(wd.path, None)
    rows, problems = classify.predict_files(predictor, files)
    assert problems == [] and [r["text"] for r in rows] == expected["texts"]
    got = [[r[f"p_{c}"] for c in predictor.class_names] for r in rows]
    np.testing.assert_allclose(got, expected["workdir_calibrated"], atol=1e-6)


def test_format1_workdir_exports_a_verified_format2_bundle(old, tmp_path):
    import jaxmm
    from jaxmm.trained import bundle

    root, files, expected = old
    out = str(tmp_path / "again")
    record = bundle.export_run(str(root / "run"), out)
    assert record["format_version"] == 2 and record["digests"]
    probs = jaxmm.Classifier.load(out, cache_dir="").predict(files).probs
    np.testing.assert_allclose(probs, expected["workdir_calibrated"], atol=1e-6)


def test_records_older_than_format1_are_refused_in_one_line(old, tmp_path):
    from jaxmm.errors import WorkdirError
    from jaxmm.trained.workdir import Workdir

    root, _, _ = old
    run = tmp_path / "older"
    shutil.copytree(root / "run", run)
    record = json.load(open(run / "config.json"))
    del record["preprocessing"]
    json.dump(record, open(run / "config.json", "w"))
    with pytest.raises(WorkdirError, match="older than its preprocessing record.*train again"):
        Workdir(str(run)).load_model()
