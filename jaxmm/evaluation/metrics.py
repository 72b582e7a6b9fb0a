"""Classification metrics computed exactly from a confusion matrix of counts.

Devices psum their confusion matrices, so every metric here counts each example once, whatever
the batch size, device count or process count.

Macro averages and balanced accuracy follow one rule, scikit-learn's default: they average over
the classes present in the truth or in the predictions of the evaluated split. A class that
neither occurs nor is predicted (e.g. a rare class missing from a small split) is left out of
every average instead of counting as zero.
"""

from collections.abc import Sequence

import numpy as np


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # scikit-learn's zero_division=0 convention.
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def _mean(values: np.ndarray, used: np.ndarray) -> float:
    return float(values[used].mean()) if used.any() else 0.0


def from_confusion(confusion: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro/weighted precision-recall-F1 and per-class metrics.

    Args:
      confusion: [K, K] counts, rows = true class, columns = predicted class.
      class_names: the K class names in label order.

    Returns:
      A JSON-ready dict; values match scikit-learn's with ``zero_division=0``. Macro averages
      and balanced accuracy cover the classes present in truth or prediction (listed under
      ``macro_classes``), so balanced accuracy always equals macro recall; per-class rows cover
      all K classes.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum()
    used = (support > 0) | (predicted > 0)
    weights = _safe_div(support, np.full_like(support, total))
    return {
        "num_examples": int(round(total)),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "balanced_accuracy": _mean(recall, used),
        "macro_precision": _mean(precision, used),
        "macro_recall": _mean(recall, used),
        "macro_f1": _mean(f1, used),
        "macro_classes": [name for name, u in zip(class_names, used, strict=True) if u],
        "weighted_precision": float((precision * weights).sum()),
        "weighted_recall": float((recall * weights).sum()),
        "weighted_f1": float((f1 * weights).sum()),
        "per_class": {
            name: {"precision": float(precision[k]), "recall": float(recall[k]),
                   "f1": float(f1[k]), "support": int(round(support[k]))}
            for k, name in enumerate(class_names)
        },
        "confusion_matrix": {"labels": list(class_names),
                             "counts": cm.round().astype(int).tolist()},
    }


def loss_metrics(sums: dict) -> dict:
    """Turns psummed loss sums into the weighted loss and the plain cross-entropy."""
    weight = float(sums["weight"])
    count = float(sums["count"])
    return {
        "loss": float(sums["weighted_ce"]) / weight if weight else float("nan"),
        "ce": float(sums["ce"]) / count if count else float("nan"),
    }


def prediction_row(probs, class_names: list, **fields) -> dict:
    """One prediction as a report row: ``fields``, predicted class, confidence, p_<class>."""
    k = int(np.argmax(probs))
    return {**fields, "predicted": class_names[k], "confidence": float(probs[k]),
            **{f"p_{c}": float(v) for c, v in zip(class_names, probs, strict=True)}}


# Validation metrics that may pick the best checkpoint; lower is better for the losses.
EARLY_STOPPING_METRICS = ("macro_f1", "accuracy", "balanced_accuracy", "weighted_f1",
                          "macro_precision", "macro_recall", "loss", "ce")
LOWER_IS_BETTER = ("loss", "ce")


def improves(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (strictly: the first of equals stays best).

    The one best-epoch rule: the trainer's early stopping and ``jaxmm.compare`` both use it.
    """
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best
