"""The pmapped train step on 4 fake CPU devices equals the 1-device step on the same global batch,
and the eval step counts padded batches exactly."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmm import losses, parallel, steps

AXIS = parallel.AXIS_NAME


class _StandIn(nn.Module):
    """A small image+text model with synchronised BatchNorm, shaped like the real one."""

    axis_name: str | None = AXIS

    @nn.compact
    def __call__(self, image, input_ids, attention_mask, *, train, modality_mask=None):
        # No conv bias before BatchNorm (as in ResNet): its gradient is exactly zero in theory,
        # and Adam would turn float noise in it into full-size steps.
        x = nn.Conv(4, (3, 3), use_bias=False)(image.astype(jnp.float32) / 255.0)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name if train
                         else None, momentum=0.9)(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        t = nn.Embed(50, 4)(input_ids) * attention_mask[..., None]
        x = jnp.concatenate([x, t.sum(1)], -1)
        return nn.Dense(3)(x)


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
            "input_ids": rng.integers(0, 50, (n, 5)).astype(np.int32),
            "attention_mask": np.ones((n, 5), np.int32),
            # Uneven classes across devices: the first rows are all class 2.
            "label": np.concatenate([np.full(n // 2, 2), rng.integers(0, 2, n - n // 2)])
            .astype(np.int32)}


def _state():
    model = _StandIn()
    b = _batch(2)
    variables = model.init(jax.random.PRNGKey(0), b["image"], b["input_ids"],
                           b["attention_mask"], train=False)
    return steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                   batch_stats=variables["batch_stats"],
                                   tx=optax.adam(1e-2))


def _run(n_devices, num_steps=3):
    devices = jax.local_devices()[:n_devices]
    step = jax.pmap(functools.partial(steps.train_step, class_weights=np.array([1., 2., .5])),
                    axis_name=AXIS, devices=devices)
    state = jax.tree.map(lambda x: jnp.stack([x] * n_devices), _state())
    key = jnp.stack([jax.random.PRNGKey(1)] * n_devices)
    out = []
    for i in range(num_steps):
        batch = jax.tree.map(lambda x: x.reshape((n_devices, -1) + x.shape[1:]), _batch(16, i))
        state, m = step(state, batch, key)
        out.append(jax.tree.map(lambda x: np.asarray(x[0]), m))
    return jax.tree.map(lambda x: np.asarray(x[0]), state), out


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
