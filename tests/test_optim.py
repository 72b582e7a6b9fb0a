"""Per-tower learning rates, frozen towers, no decay on biases and norm scales."""

import jax
import ml_collections
import numpy as np

from jaxmm.training import optim


def _config(freeze_image=False, freeze_text=False):
    c = ml_collections.ConfigDict()
    c.optim = dict(lr_image=1e-3, lr_text=2e-3, lr_head=1e-2, warmup_epochs=1.0,
                   final_lr_fraction=0.1, weight_decay=0.5, grad_clip_norm=1.0)
    c.model = dict(freeze_image=freeze_image, freeze_text=freeze_text)
    return c


def _params():
    return {"image": {"kernel": np.ones((2, 2), np.float32), "scale": np.ones(2, np.float32)},
            "text": {"embedding": np.ones((3, 2), np.float32)},
            "head": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}}


def _labels(params):
    return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}


def test_frozen_tower_gets_zero_updates():
    params = _params()
    config = _config(freeze_image=True)
    config.optim.warmup_epochs = 0.0
    tx = optim.make_optimizer(config, _labels(params), 100, 10)
    grads = jax.tree.map(lambda p: np.full_like(p, 100.0), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates["image"]))
    assert all(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates["text"]))


def test_no_weight_decay_on_one_dimensional_params():
    params = _params()
    tx = optim.make_optimizer(_config(), _labels(params), 100, 10)
    zeros = jax.tree.map(np.zeros_like, params)
    state = tx.init(params)
    for _ in range(12):  # Past warm-up, so the learning rate is non-zero.
        updates, state = tx.update(zeros, state, params)
    # With zero gradients only weight decay moves parameters: kernels shrink, biases do not.
    assert np.all(np.asarray(updates["head"]["kernel"]) < 0)
    assert np.all(np.asarray(updates["head"]["bias"]) == 0)
    assert np.all(np.asarray(updates["image"]["scale"]) == 0)


def test_learning_rates_warm_up_then_decay_per_tower():
    c = _config()
    start = optim.learning_rates(c, 0, 100, 10)
    peak = optim.learning_rates(c, 10, 100, 10)
    end = optim.learning_rates(c, 100, 100, 10)
    assert start["lr_head"] == 0.0
    np.testing.assert_allclose(peak["lr_head"], 1e-2, rtol=1e-6)
    np.testing.assert_allclose(peak["lr_text"], 2e-3, rtol=1e-6)
    np.testing.assert_allclose(end["lr_image"], 1e-4, rtol=1e-4)
    # Half-way through the warm-up (linear) and through the cosine decay (10 -> 100), by hand:
    # the peak times (1 - final) * (1 + cos(pi / 2)) / 2 + final.
    np.testing.assert_allclose(optim.learning_rates(c, 5, 100, 10)["lr_head"], 5e-3, rtol=1e-6)
    np.testing.assert_allclose(optim.learning_rates(c, 55, 100, 10)["lr_image"],
                               1e-3 * (0.9 * 0.5 + 0.1), rtol=1e-5)
