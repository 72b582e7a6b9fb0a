"""Class weights and the weighted cross-entropy against hand computations."""

import numpy as np
import pytest

from jaxmm.training import losses


def _hand_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


def test_balanced_weights_match_real_dataset_numbers():
    # Train counts of the real dataset (Black, Blue, Green, TTR) give 1.21, 0.59, 1.28, 1.46.
    w = losses.balanced_class_weights([2111, 4355, 1991, 1743])
    np.testing.assert_allclose(w, [1.208, 0.5855, 1.2807, 1.463], atol=1e-3)


def test_balanced_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 5 + [1] * 9 + [2] * 2)
    ours = losses.balanced_class_weights(np.bincount(y))
    np.testing.assert_allclose(ours, compute_class_weight("balanced", classes=np.arange(3), y=y),
                               rtol=1e-6)


def test_resolve_class_weights_variants():
    names, counts = ["a", "b"], {"a": 3, "b": 1}
    np.testing.assert_allclose(losses.resolve_class_weights("none", names, counts), [1, 1])
    np.testing.assert_allclose(losses.resolve_class_weights([2, 0.5], names, counts), [2, 0.5])
    np.testing.assert_allclose(losses.resolve_class_weights("balanced", names, counts),
                               [4 / 6, 4 / 2])
    with pytest.raises(ValueError, match="class_weights"):
        losses.resolve_class_weights([1, 2, 3], names, counts)
    with pytest.raises(ValueError, match="class_weights"):
        losses.resolve_class_weights("inverse", names, counts)
    with pytest.raises(ValueError, match="every class"):
        losses.resolve_class_weights("balanced", names, {"a": 3})


def test_weighted_ce_equals_hand_computation_with_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 1, 0])
    mask = np.array([1, 1, 1, 1, 0, 1], bool)
    w = np.array([0.5, 2.0, 1.5], np.float32)
    sums = losses.weighted_ce_sums(logits, labels, w, mask=mask)
    ce = _hand_ce(logits, labels)
    wy = w[labels] * mask
    assert float(sums["weighted_ce"] / sums["weight"]) == pytest.approx(
        (wy * ce).sum() / wy.sum(), rel=1e-5)
    assert float(sums["ce"] / sums["count"]) == pytest.approx(ce[mask].mean(), rel=1e-5)
    assert float(sums["count"]) == 5
    assert float(sums["correct"]) == ((logits.argmax(-1) == labels) & mask).sum()


def test_uneven_classes_across_devices_need_sums_not_mean_of_means():
    # Device 0 holds rare-class rows, device 1 frequent-class rows: the exact global loss
    # (sum of sums) differs from the mean of per-device means.
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 2)).astype(np.float32)
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    w = np.array([0.6, 3.0], np.float32)
    parts = [losses.weighted_ce_sums(logits[:4], labels[:4], w),
             losses.weighted_ce_sums(logits[4:], labels[4:], w)]
    exact = sum(float(p["weighted_ce"]) for p in parts) / sum(float(p["weight"]) for p in parts)
    ce = _hand_ce(logits, labels)
    assert exact == pytest.approx((w[labels] * ce).sum() / w[labels].sum(), rel=1e-5)
    mean_of_means = np.mean([float(p["weighted_ce"] / p["weight"]) for p in parts])
    assert abs(mean_of_means - exact) > 1e-3


def test_label_smoothing_changes_loss():
    logits = np.array([[4.0, 0.0], [0.0, 4.0]], np.float32)
    labels = np.array([0, 1])
    plain = losses.weighted_ce_sums(logits, labels, np.ones(2, np.float32))
    smooth = losses.weighted_ce_sums(logits, labels, np.ones(2, np.float32),
                                     label_smoothing=0.2)
    assert float(smooth["weighted_ce"]) > float(plain["weighted_ce"])
