"""The pmapped train step on 4 fake CPU devices equals the 1-device step on the same global batch,
and the eval step counts padded batches exactly."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmm.training import losses, parallel, steps
from tests.support import StandIn as _StandIn
from tests.support import step_batch as _batch
from tests.support import step_state as _state

AXIS = parallel.AXIS_NAME


def _run(n_devices, num_steps=3):
    """Steps of the training loop's pmap (unmapped state and metrics) on ``n_devices``."""
    devices = jax.local_devices()[:n_devices]
    step = parallel.pmap_train_step(
        functools.partial(steps.train_step, class_weights=np.array([1., 2., .5])), devices)
    state = jax.device_get(_state())  # host arrays: the first step places them
    key = jax.random.PRNGKey(1)
    out = []
    for i in range(num_steps):
        batch = jax.tree.map(lambda x: x.reshape((n_devices, -1) + x.shape[1:]), _batch(16, i))
        state, m = step(state, batch, key)
        out.append(jax.tree.map(np.asarray, m))
    return jax.tree.map(np.asarray, state), out


def test_four_devices_equal_one_device():
    assert jax.local_device_count() >= 4, "conftest sets 4 fake CPU devices"
    s1, m1 = _run(1)
    s4, m4 = _run(4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s4.batch_stats),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for a, b in zip(m1, m4, strict=True):
        for k in ("weighted_ce", "weight", "ce", "count", "correct"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5)
    assert int(s4.step) == 3


def test_step_loss_is_the_global_weighted_loss():
    state = _state()
    batch = _batch(16, 0)
    w = np.array([1., 2., .5], np.float32)
    _, metrics = _run(4, num_steps=1)
    # Un-pmapped reference: the same model without the cross-device BatchNorm axis.
    logits = _StandIn(axis_name=None).apply(
        state.variables, batch["image"], batch["input_ids"], batch["attention_mask"],
        train=True, mutable=["batch_stats"])[0]
    ref = losses.weighted_ce_sums(logits, batch["label"], w)
    assert float(metrics[0]["weighted_ce"] / metrics[0]["weight"]) == pytest.approx(
        float(ref["weighted_ce"] / ref["weight"]), rel=1e-5)


def test_eval_step_masks_padding_and_psums_confusion():
    state = _state()
    batch = _batch(8, 3)
    batch["mask"] = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    fn = jax.pmap(functools.partial(steps.eval_step, apply_fn=state.apply_fn,
                                    class_weights=np.ones(3, np.float32), num_classes=3),
                  axis_name=AXIS, in_axes=(0, 0, None), devices=jax.local_devices()[:4])
    variables = jax.tree.map(lambda x: jnp.stack([x] * 4), state.variables)
    sharded = jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), batch)
    sums, confusion, probs = fn(variables, sharded, None)
    assert float(sums["count"][0]) == 5
    assert float(confusion[0].sum()) == 5
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


class _NoBatchNorm(nn.Module):
    """The stand-in without BatchNorm or dropout: micro-batching cannot change its loss."""

    @nn.compact
    def __call__(self, image, input_ids, attention_mask, *, train, modality_mask=None,
                 example_ids=None):
        del train, modality_mask, example_ids
        x = jnp.mean(nn.relu(nn.Conv(4, (3, 3))(image.astype(jnp.float32) / 255.0)), (1, 2))
        t = nn.Embed(50, 4)(input_ids) * attention_mask[..., None]
        return nn.Dense(3)(jnp.concatenate([x, t.sum(1)], -1))


def _plain_state(tx, ema=False):
    model = _NoBatchNorm()
    b = _batch(2)
    variables = model.init(jax.random.PRNGKey(0), b["image"], b["input_ids"],
                           b["attention_mask"], train=False)
    return steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                   batch_stats={}, tx=tx, ema=ema)


_WEIGHTS = np.array([1., 2., .5], np.float32)
# One optimizer object and one pmapped function per setting: the tests share compilations.
_SGD = optax.sgd(0.5)


@functools.cache
def _step_fn(n_devices, **step_kwargs):
    return parallel.pmap_train_step(
        functools.partial(steps.train_step, class_weights=_WEIGHTS, **step_kwargs),
        jax.local_devices()[:n_devices])


def _steps(state, n_devices, batches, **step_kwargs):
    step = _step_fn(n_devices, **step_kwargs)
    state = jax.device_get(state)  # host arrays (the step donates what it is given)
    key = jax.random.PRNGKey(1)
    metrics, params = [], []
    for b in batches:
        state, m = step(state, jax.tree.map(
            lambda x: x.reshape((n_devices, -1) + x.shape[1:]), b), key)
        metrics.append(jax.tree.map(np.asarray, m))
        params.append(jax.tree.map(np.asarray, state.params))
    return jax.tree.map(np.asarray, state), metrics, params


@pytest.mark.parametrize("n_devices", [1, 4])
def test_accumulated_micro_batches_equal_one_big_batch(n_devices):
    # Plain SGD: the update is linear in the gradient, so 1e-6 on the parameters is a test of
    # the gradient itself (Adam would normalise small differences away or blow them up).
    batches = [_batch(32, i) for i in range(2)]
    big, m_big, _ = _steps(_plain_state(_SGD), 1, batches)
    acc, m_acc, _ = _steps(_plain_state(_SGD), n_devices, batches, accumulate_steps=4)
    for a, b in zip(jax.tree.leaves(big.params), jax.tree.leaves(acc.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(m_big, m_acc, strict=True):
        for k in ("weighted_ce", "weight", "ce", "count", "correct"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    assert int(acc.step) == 2  # One optimizer step per effective batch.


def test_accumulation_is_not_a_mean_of_micro_batch_losses():
    """The check above can fail: these micro-batches carry unequal class weights, so averaging
    their losses (optax.MultiSteps) gives a different loss than the exact global one."""
    batch = _batch(32, 0)
    state = _plain_state(_SGD)
    logits = state.apply_fn(state.variables, batch["image"], batch["input_ids"],
                            batch["attention_mask"], train=True)
    parts = [losses.weighted_ce_sums(logits[i:i + 8], batch["label"][i:i + 8], _WEIGHTS)
             for i in range(0, 32, 8)]
    exact = sum(p["weighted_ce"] for p in parts) / sum(p["weight"] for p in parts)
    mean_of_means = np.mean([p["weighted_ce"] / p["weight"] for p in parts])
    assert abs(float(exact) - float(mean_of_means)) > 1e-3
    _, m, _ = _steps(state, 1, [batch], accumulate_steps=4)
    assert float(m[0]["weighted_ce"] / m[0]["weight"]) == pytest.approx(float(exact), rel=1e-6)


def test_accumulation_needs_divisible_rows():
    with pytest.raises(ValueError, match="do not split into 3 micro-batches"):
        _steps(_plain_state(_SGD), 1, [_batch(16)], accumulate_steps=3)


def test_ema_follows_every_optimizer_step():
    decay = 0.9
    state = _plain_state(optax.adam(1e-2), ema=True)
    start = jax.tree.map(np.asarray, state.params)
    final, _, params = _steps(state, 2, [_batch(16, i) for i in range(3)], ema_decay=decay)
    expected = start
    for p in params:
        expected = jax.tree.map(lambda e, q: decay * e + (1 - decay) * q, expected, p)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(final.ema_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Validation reads the average, training continues from the raw weights.
    assert final.eval_variables["params"] is final.ema_params
    assert not np.allclose(jax.tree.leaves(final.ema_params)[0], jax.tree.leaves(final.params)[0])


def test_no_ema_by_default():
    state = _plain_state(_SGD)
    assert state.ema_params is None and state.eval_variables["params"] is state.params
    final, _, _ = _steps(state, 1, [_batch(32)])
    assert final.ema_params is None
    with pytest.raises(ValueError, match="ema=True"):
        _steps(state, 1, [_batch(32)], ema_decay=0.99)
