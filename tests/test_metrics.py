"""Metrics from a confusion matrix equal scikit-learn's on the same predictions."""

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxmm import metrics


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
