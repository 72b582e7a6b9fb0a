"""Calibration of predicted probabilities: ECE, NLL, Brier score and temperature scaling.

A confidence of 0.9 should be right 9 times in 10. The metrics here say how far a model is from
that; ``fit_temperature`` finds the one scalar T that, dividing the logits, minimises the
negative log-likelihood on validation data (Guo et al., 2017). Dividing by T > 0 never changes
the arg-max, so accuracy is untouched. Everything runs on the host in float64 NumPy.

Typical use::

    temperature = fit_temperature(val_logits, val_labels)
    record = calibration_record(val_logits, val_labels, temperature)  # + whether it is applied
    Workdir(path).write_calibration(record)
    probs = softmax(test_logits, Workdir(path).temperature())  # None when not applied
"""

import math

import numpy as np

NUM_BINS = 15  # equal-width confidence bins of the expected calibration error
# Search range of the fitted temperature (on a log scale).
_T_MIN, _T_MAX = 0.02, 50.0
# When a fitted temperature is trusted (``trust``): enough examples, not stuck at a search
# bound, and a lower NLL on held-out halves of the split than no temperature at all.
MIN_EXAMPLES = 50
# config.calibration: apply a fit only when trusted, apply any fit, or fit none.
POLICIES = ("trusted", "always", "off")
_BOUND_MARGIN = 1.01  # a temperature within 1 % of a search bound counts as at the bound
_EPS = 1e-300  # floor of a probability before its log (float64 underflows below ~1e-308)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of ``logits`` [N, K] divided by ``temperature`` (float64)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_probs_as_logits(probs) -> np.ndarray:
    """Logits that reproduce ``probs`` [N, K] under softmax (log-probabilities, floored).

    Softmax is invariant to a per-row shift, so log p is as good as the model's own logits
    for temperature scaling as long as no probability underflowed.
    """
    return np.log(np.maximum(np.asarray(probs, np.float64), _EPS))


def _checked(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or not len(labels):
        raise ValueError(f"expected probs [N, K] and labels [N] with N > 0, got shapes "
                         f"{probs.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got {labels.min()}.."
                         f"{labels.max()}")
    return probs, labels


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    probs, labels = _checked(probs, labels)
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], _EPS))))


def brier(probs, labels) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - [k == y])^2, in [0, 2]."""
    probs, labels = _checked(probs, labels)
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def calibration_bins(probs, labels, num_bins: int = NUM_BINS) -> dict:
    """Groups examples by confidence (max probability) into equal-width bins (lo, hi].

    Returns:
      dict of arrays with one entry per bin: edges [num_bins + 1], count, confidence (mean
      confidence of the bin, 0 when empty) and accuracy (fraction correct, 0 when empty).
    """
    probs, labels = _checked(probs, labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # Bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 goes to bin 0.
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins)
    safe = np.maximum(count, 1)
    return {
        "edges": np.linspace(0.0, 1.0, num_bins + 1),
        "count": count,
        "confidence": np.bincount(index, confidence, num_bins) / safe,
        "accuracy": np.bincount(index, correct, num_bins) / safe,
    }


def expected_calibration_error(probs, labels, num_bins: int = NUM_BINS) -> float:
    """ECE: sum over bins of (bin share of examples) * |accuracy - mean confidence|."""
    bins = calibration_bins(probs, labels, num_bins)
    share = bins["count"] / bins["count"].sum()
    return float(np.sum(share * np.abs(bins["accuracy"] - bins["confidence"])))


def calibration_metrics(probs, labels) -> dict:
    """{'ece', 'nll', 'brier'} of the given probabilities."""
    return {"ece": expected_calibration_error(probs, labels), "nll": nll(probs, labels),
            "brier": brier(probs, labels)}


def fit_temperature(logits, labels) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on (logits, labels).

    A bounded 1-D search on log T: the NLL is smooth in log T and the search cannot step to a
    non-positive temperature. Bounds are [0.02, 50]; a result at a bound means the logits carry
    (almost) no information or are perfectly separable, and is returned as is.

    Args:
      logits: [N, K] logits (or log-probabilities) of a validation split.
      labels: [N] true classes.

    Returns:
      The fitted temperature as a Python float.
    """
    from scipy import optimize  # imported here: prediction needs only softmax

    logits = np.asarray(logits, np.float64)
    _checked(logits, labels)
    labels = np.asarray(labels, np.int64)
    if not np.all(np.isfinite(logits)):
        raise ValueError("fit_temperature got non-finite logits")
    rows = np.arange(len(labels))

    def objective(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, labels]))

    result = optimize.minimize_scalar(
        objective, bounds=(math.log(_T_MIN), math.log(_T_MAX)), method="bounded",
        options={"xatol": 1e-6})
    return float(math.exp(result.x))


def held_out_gain(logits, labels) -> float | None:
    """Mean NLL gain of a fitted temperature on data it was not fitted on.

    The split is cut into two halves (a fixed permutation); T is fitted on each half and the
    NLL of the other half is compared with and without it. Positive: the temperature helps
    data it has not seen. None when a half would be empty.
    """
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    if len(labels) < 2:
        return None
    order = np.random.default_rng(0).permutation(len(labels))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    gains = []
    for fit_on, test_on in (halves, halves[::-1]):
        t = fit_temperature(logits[fit_on], labels[fit_on])
        gains.append(nll(softmax(logits[test_on]), labels[test_on])
                     - nll(softmax(logits[test_on], t), labels[test_on]))
    return float(np.mean(gains))


def trust(logits, labels, temperature: float, policy: str = "trusted") -> dict:
    """Whether a fitted temperature should be applied, and why (``calibration.json``'s
    ``applied``, ``reason`` and ``criterion``).

    A temperature is applied only when all hold: at least ``MIN_EXAMPLES`` examples (a
    handful fits noise); the fit is not at a search bound (a split the model gets entirely
    right drives T to the lower bound, which makes every answer certain); and fitting on one
    half of the split lowers the NLL of the other half, both ways round (``held_out_gain``).
    ``policy="always"`` applies the temperature whatever the criterion says (the reason then
    still says which criteria fail).
    """
    n = int(len(labels))
    at_bound = not _T_MIN * _BOUND_MARGIN < temperature < _T_MAX / _BOUND_MARGIN
    gain = held_out_gain(logits, labels) if n >= MIN_EXAMPLES and not at_bound else None
    reasons = []
    if n < MIN_EXAMPLES:
        reasons.append(f"{n} examples, fewer than {MIN_EXAMPLES}")
    if at_bound:
        reasons.append(f"the fit ended at a search bound ({temperature:.4g}; bounds "
                       f"[{_T_MIN}, {_T_MAX}])")
    if gain is not None and gain <= 0:
        reasons.append(f"no held-out NLL gain ({gain:+.4f} on halves of the split)")
    reason = "; ".join(reasons) if reasons else "all criteria hold"
    if policy == "always" and reasons:
        reason = f"applied as config.calibration='always' asks, although: {reason}"
    return {"applied": not reasons or policy == "always", "policy": policy, "reason": reason,
            "criterion": {"min_examples": MIN_EXAMPLES, "bounds": [_T_MIN, _T_MAX],
                          "held_out_nll_gain": gain}}


def calibration_record(logits, labels, temperature: float, split: str = "validation",
                       policy: str = "trusted") -> dict:
    """The content of ``calibration.json``: T, whether it is applied (``trust`` under
    ``policy``), and the metrics before and after it on ``split``."""
    return {
        "temperature": float(temperature),
        **trust(logits, labels, temperature, policy),
        "split": split,
        "num_examples": int(len(labels)),
        "before": calibration_metrics(softmax(logits), labels),
        "after": calibration_metrics(softmax(logits, temperature), labels),
    }


def fit_on_split(evaluator, variables, step: int, policy: str = "trusted") -> dict:
    """Fits the temperature on a split's predictions (every process must call it: the split
    is evaluated on all devices and processes).

    Args:
      evaluator: a ``scoring.SplitEvaluator`` of the validation split.
      variables: the replicated variables to calibrate.
      step: the checkpoint step of the variables.
      policy: ``config.calibration`` ("trusted" or "always"): when the fit is applied.

    Returns:
      The ``calibration_record`` (with the checkpoint step), for ``calibration.json``.
    """
    _, predictions = evaluator(variables, collect=True)
    labels = evaluator.labels(predictions["index"])
    # Log-probabilities are the logits up to a per-row shift, which softmax ignores.
    logits = log_probs_as_logits(predictions["probs"])
    record = calibration_record(logits, labels, fit_temperature(logits, labels),
                                evaluator.split, policy)
    record["checkpoint_step"] = int(step)
    return record


def reliability_diagram(probs, labels, path: str, title: str = "",
                        num_bins: int = NUM_BINS) -> str:
    """Draws accuracy against confidence per bin, with the number of examples in each bin.

    Args:
      probs: [N, K] class probabilities.
      labels: [N] true classes.
      path: PNG file to write.
      title: figure title (split, calibrated or not, ...).
      num_bins: equal-width confidence bins.

    Returns:
      path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bins = calibration_bins(probs, labels, num_bins)
    ece = expected_calibration_error(probs, labels, num_bins)
    lo, width = bins["edges"][:-1], 1.0 / num_bins
    filled = bins["count"] > 0
    fig = Figure(figsize=(5, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.bar(lo[filled], bins["accuracy"][filled], width, align="edge", color="tab:blue",
            edgecolor="black", label="accuracy")
    top.bar(lo[filled], bins["confidence"][filled] - bins["accuracy"][filled], width,
            bottom=bins["accuracy"][filled], align="edge", color="tab:red", alpha=0.3,
            edgecolor="tab:red", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
            title=f"{title + ': ' if title else ''}ECE {ece:.3f}")
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(lo, bins["count"], width, align="edge", color="grey", edgecolor="black")
    for x, n in zip(lo[filled], bins["count"][filled], strict=True):
        bottom.text(x + width / 2, n, str(n), ha="center", va="bottom", fontsize="x-small")
    bottom.set(xlabel="confidence (max probability)", ylabel="examples",
               ylim=(0, max(bins["count"].max(), 1) * 1.25))
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path
