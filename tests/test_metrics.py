"""Metrics from a confusion matrix equal scikit-learn's on the same predictions."""

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxmm.evaluation import metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_confusion_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, size=97)
    y_pred = np.where(rng.random(97) < 0.6, y_true, rng.integers(0, 4, size=97))
    if seed == 2:
        y_pred[y_pred == 3] = 0  # A class that is never predicted (zero division).
    cm = skm.confusion_matrix(y_true, y_pred, labels=range(4))
    m = metrics.from_confusion(cm, ["Black", "Blue", "Green", "TTR"])
    assert m["num_examples"] == 97
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=avg,
                                                         zero_division=0)
        assert m[f"{avg}_precision"] == pytest.approx(p)
        assert m[f"{avg}_recall"] == pytest.approx(r)
        assert m[f"{avg}_f1"] == pytest.approx(f)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=range(4),
                                                     zero_division=0)
    assert m["per_class"]["TTR"]["f1"] == pytest.approx(f[3])
    assert m["per_class"]["Blue"]["support"] == s[1]
    assert m["confusion_matrix"]["counts"] == cm.tolist()


def _sklearn_default(y_true, y_pred):
    """scikit-learn's macro averages with its default labels (present in truth or prediction)."""
    p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average="macro",
                                                     zero_division=0)
    return {"macro_precision": p, "macro_recall": r, "macro_f1": f}


def test_a_class_absent_from_the_split_is_left_out_of_every_average():
    # Class 2 of 4 neither occurs nor is predicted, as in a small split missing a rare class.
    rng = np.random.default_rng(3)
    y_true = rng.choice([0, 1, 3], size=60)
    y_pred = np.where(rng.random(60) < 0.7, y_true, rng.choice([0, 1, 3], size=60))
    cm = skm.confusion_matrix(y_true, y_pred, labels=range(4))
    m = metrics.from_confusion(cm, ["a", "b", "c", "d"])
    for key, value in _sklearn_default(y_true, y_pred).items():
        assert m[key] == pytest.approx(value), key
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(m["macro_recall"])
    assert m["macro_classes"] == ["a", "b", "d"]
    assert m["per_class"]["c"]["support"] == 0  # Per-class rows still list every class.
    report = skm.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    assert m["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])


def test_a_class_predicted_but_absent_counts_in_every_average():
    # Class 3 never occurs but is predicted: its recall is 0 in macro recall and, by the same
    # rule, in balanced accuracy (scikit-learn's balanced_accuracy_score alone would skip it).
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 3, 1, 1, 2, 0])
    m = metrics.from_confusion(skm.confusion_matrix(y_true, y_pred, labels=range(4)),
                               ["a", "b", "c", "d"])
    for key, value in _sklearn_default(y_true, y_pred).items():
        assert m[key] == pytest.approx(value), key
    assert m["balanced_accuracy"] == pytest.approx(m["macro_recall"]) == pytest.approx(0.5)
    assert m["macro_classes"] == ["a", "b", "c", "d"]


def test_an_empty_split_gives_zeros():
    m = metrics.from_confusion(np.zeros((3, 3)), ["a", "b", "c"])
    assert m["num_examples"] == 0 and m["macro_f1"] == 0.0 and m["balanced_accuracy"] == 0.0
