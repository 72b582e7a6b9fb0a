"""Explanation functions in a bundle (export --explain): the same Grad-CAM maps, token
attributions and per-tower probabilities as ``predict --explain``, digested like every content
file, and optional (a bundle without them loads and says how to get them)."""

import os
import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def loaded(explain_bundle_dir):
    from jaxmm.trained import bundle_explain
    from jaxmm.trained.classifier import Classifier

    clf = Classifier.load(explain_bundle_dir, cache_dir="")
    return clf, bundle_explain.load(explain_bundle_dir, clf.record)


def test_exported_explanations_equal_the_explainer(loaded, trained_run, test_split):
    from jaxmm.evaluation import explain
    from jaxmm.trained.classifier import softmax
    from jaxmm.trained.workdir import Workdir

    clf, fns = loaded
    files, texts, _ = test_split
    texts = [texts[0], "usb cable and a plastic bottle", "word " * 40]
    image = np.stack([clf.view(f) for f in files[:3]])
    ids, mask = clf.tokenize(texts)
    trained = Workdir(trained_run).load_model("best")
    explainer = explain.Explainer(trained.model, trained.variables, trained.tokenizer,
                                  trained.spec.temperature or 1.0)
    want = explainer.explain(image, ids, mask)
    towers = np.asarray(fns["towers"](clf.variables, image, ids, mask))
    assert towers.shape == (3, 3, len(clf.class_names))
    np.testing.assert_allclose(softmax(towers[:, 0], clf.temperature),
                               clf.probabilities(list(image), texts), atol=1e-5)
    for j, name in enumerate(clf.record["extensions"]["explain"]["tower_sets"]):
        got = softmax(towers[:, j], clf.temperature)
        np.testing.assert_allclose(got, [w.probs[name] for w in want], atol=1e-5)
    for i, w in enumerate(want):
        one = (image[i:i + 1], ids[i:i + 1], mask[i:i + 1])
        cam, _ = fns["grad_cam"](clf.variables, *one)
        np.testing.assert_allclose(np.asarray(cam)[0], w.heatmap, atol=1e-5)
        attr, at_input, at_base = fns["integrated_gradients"](clf.variables, *one,
                                                              np.int32(w.predicted))
        real = mask[i].astype(bool)
        np.testing.assert_allclose(np.asarray(attr)[real], w.attributions, atol=1e-5)
        assert clf.tokenize.token_strings(ids[i][real]) == w.tokens
    assert clf.tokenize.encode(texts[2])[2] and not clf.tokenize.encode(texts[1])[2]


def test_explain_files_are_digested(explain_bundle_dir, tmp_path):
    from jaxmm import paths
    from jaxmm.errors import BundleError
    from jaxmm.trained import bundle

    record = bundle.read_record(explain_bundle_dir)
    names = {f"{paths.BUNDLE_EXPLAIN_DIR}/{f}" for f in ("towers.jaxexport",
                                                         "grad_cam.jaxexport",
                                                         "integrated_gradients.jaxexport")}
    assert names <= set(record["digests"])
    copy = str(tmp_path / "copy")
    shutil.copytree(explain_bundle_dir, copy)
    with open(os.path.join(copy, paths.BUNDLE_EXPLAIN_DIR, "grad_cam.jaxexport"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="grad_cam.jaxexport changed after export"):
        bundle.read_record(copy)
    os.remove(os.path.join(copy, paths.BUNDLE_EXPLAIN_DIR, "grad_cam.jaxexport"))
    with pytest.raises(BundleError, match="grad_cam.jaxexport: missing"):
        bundle.read_record(copy)


def test_a_bundle_without_explanations_loads_and_says_how(bundle_dir):
    from jaxmm.errors import BundleError
    from jaxmm.trained import bundle, bundle_explain

    record = bundle.read_record(bundle_dir)
    assert bundle_explain.entry_of(record) is None
    with pytest.raises(BundleError, match="jaxmm.export --explain"):
        bundle_explain.load(bundle_dir, record)
