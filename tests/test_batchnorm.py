"""Tests for jaxmm.models.batchnorm: the hand-written BatchNorm equals flax's autodiffed one."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm import models
from jaxmm.errors import ConfigError
from jaxmm.models import batchnorm
from tests.support import model_config

SHAPE = (4, 5, 5, 8)  # NHWC, 8 channels
# (rtol, atol) of the fused rule against flax's autodiff: float32 round-off, or one bf16 ulp.
TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2e-2, 2e-2)}


def _inputs(dtype, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = (jax.random.normal(k[0], SHAPE) * 3 + 1).astype(dtype)
    residual = jax.random.normal(k[1], SHAPE).astype(dtype)
    params = {"scale": jax.random.uniform(k[2], (8,), minval=0.5, maxval=2.0),
              "bias": jax.random.normal(k[3], (8,))}
    stats = {"mean": jnp.linspace(-1, 1, 8), "var": jnp.linspace(0.5, 3, 8)}
    return x, residual, params, stats


def _reference(x, residual=None, *, relu=False, **kw):
    """flax.linen.BatchNorm followed by the residual add and the ReLU, as ResNet applies them."""
    y = nn.BatchNorm(name="bn", **kw)(x)
    y = y if residual is None else y + residual
    return nn.relu(y) if relu else y


class Reference(nn.Module):
    kw: dict
    relu: bool = False

    @nn.compact
    def __call__(self, x, residual=None):
        return _reference(x, residual, relu=self.relu, **self.kw)


class Fused(nn.Module):
    kw: dict
    relu: bool = False

    @nn.compact
    def __call__(self, x, residual=None):
        return batchnorm.BatchNorm(name="bn", relu=self.relu, **self.kw)(x, residual=residual)


def _loss_and_grads(module, variables, x, residual, weights):
    """Loss, updated batch_stats and gradients w.r.t. (params, x, residual)."""
    def loss(params, x, residual):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, residual, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), (y, updates["batch_stats"])

    argnums = (0, 1) if residual is None else (0, 1, 2)
    (value, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(
        variables["params"], x, residual)
    return value, y, stats, grads


def _assert_close(a, b, dtype):
    rtol, atol = TOL[dtype]
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert leaf_a.dtype == leaf_b.dtype and leaf_a.shape == leaf_b.shape
        np.testing.assert_allclose(np.asarray(leaf_a, np.float32), np.asarray(leaf_b, np.float32),
                                   rtol=rtol, atol=atol)


def test_variables_are_flaxs():
    """Same names, shapes, dtypes and initial values: checkpoints load either way."""
    x = jnp.ones(SHAPE, jnp.bfloat16)
    kw = dict(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=jnp.bfloat16)
    ref = Reference(kw).init(jax.random.PRNGKey(0), x)
    fused = Fused(kw, relu=True).init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(ref) == jax.tree.structure(fused)
    _assert_close(ref, fused, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "running_average"])
@pytest.mark.parametrize("relu,with_residual", [(False, False), (True, False), (True, True)],
                         ids=["bn", "bn_relu", "bn_add_relu"])
def test_matches_flax_autodiff(dtype, train, relu, with_residual):
    """Output, updated running averages and the gradients w.r.t. input, scale, bias (and the
    residual) equal flax's BatchNorm (+ add + ReLU) differentiated by JAX."""
    x, residual, params, stats = _inputs(dtype)
    residual = residual if with_residual else None
    weights = jax.random.normal(jax.random.PRNGKey(9), SHAPE)
    kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    variables = {"params": {"bn": params}, "batch_stats": {"bn": stats}}
    ref = _loss_and_grads(Reference(kw, relu), variables, x, residual, weights)
    fused = _loss_and_grads(Fused(kw, relu), variables, x, residual, weights)
    _assert_close(ref, fused, dtype)
    if train:  # the running averages moved (biased batch variance, momentum 0.9)
        var = np.var(np.asarray(x, np.float32), axis=(0, 1, 2))
        np.testing.assert_allclose(fused[2]["bn"]["var"], 0.9 * stats["var"] + 0.1 * var,
                                   rtol=1e-5)
    # Negative control: the ReLU and the residual are really applied.
    assert (np.asarray(fused[1], np.float32) >= 0).all() == relu


def _pmapped(module, variables, x, groups):
    """Per-device output, running averages and input/parameter gradients under a 4-device
    pmap; the gradient is that of the sum of every device's loss (psum is transposed)."""
    weights = jax.random.normal(jax.random.PRNGKey(3), x.shape)

    def step(x, w):
        def loss(params, x):
            y, updates = module.apply({"params": params,
                                       "batch_stats": variables["batch_stats"]},
                                      x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * w), (y, updates["batch_stats"])
        (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
            variables["params"], x)
        return y, stats, grads

    shard = lambda a: a.reshape(4, -1, *a.shape[1:])
    return jax.pmap(step, axis_name="batch")(shard(x), shard(weights))


@pytest.mark.parametrize("sync", ["global", "device", "group:2"])
def test_sync_matches_flax_across_devices(sync):
    """Under a 4-device pmap, statistics and both backward sums are reduced over the devices
    that config.batchnorm_sync groups, exactly as flax's BatchNorm with the same axis."""
    assert jax.device_count() == 4  # tests/conftest.py
    x = (jax.random.normal(jax.random.PRNGKey(0), (16, 3, 3, 8)) * 2 + 0.5)
    x = x * jnp.repeat(jnp.arange(1.0, 5.0), 4)[:, None, None, None]  # devices differ
    groups = models.batchnorm_groups(sync, 4)
    axis_name = None if sync == "device" else "batch"
    kw = dict(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
              axis_name=axis_name, axis_index_groups=groups)
    variables = Reference(kw).init(jax.random.PRNGKey(0), x[:4])
    variables = {"params": {"bn": {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.ones(8)}},
                 "batch_stats": variables["batch_stats"]}
    ref = _pmapped(Reference(kw, relu=True), variables, x, groups)
    fused = _pmapped(Fused(kw, relu=True), variables, x, groups)
    _assert_close(ref, fused, jnp.float32)
    # Negative control: the devices' statistics differ unless they are all shared.
    means = np.asarray(fused[1]["bn"]["mean"])
    assert np.allclose(means, means[0], atol=1e-6) == (sync == "global")


def _tiny(implementation: str):
    """The tiny image classifier (float32) with ``config.model.batchnorm=implementation``, its
    initial variables and a batch."""
    config = model_config(modalities=("image",), dropout=0.0, batchnorm=implementation)
    model = models.build_model(config, 4, 64, axis_name=None)
    variables = models.init_variables(model, jax.random.PRNGKey(0), 32, 8)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    ids, mask = jnp.zeros((8, 8), jnp.int32), jnp.ones((8, 8), jnp.int32)
    return model, variables, (image, ids, mask), jnp.asarray(rng.integers(0, 4, 8))


def _train_loss_and_grads(implementation: str):
    model, variables, inputs, labels = _tiny(implementation)

    def loss(params):
        logits, updates = model.apply({"params": params,
                                       "batch_stats": variables["batch_stats"]},
                                      *inputs, train=True, mutable=["batch_stats"])
        value = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])
        return value, updates["batch_stats"]

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def test_tiny_resnet_same_loss_and_gradients_with_the_switch():
    """The whole tiny classifier trains to the same loss, gradients and running averages with
    config.model.batchnorm="fused"; its inference is flax's, bit for bit."""
    (loss_ref, stats_ref), grads_ref = _train_loss_and_grads("flax")
    (loss_fused, stats_fused), grads_fused = _train_loss_and_grads("fused")
    np.testing.assert_allclose(loss_fused, loss_ref, rtol=1e-5)
    leaves = zip(jax.tree.leaves((stats_ref, grads_ref)),
                 jax.tree.leaves((stats_fused, grads_fused)), strict=True)
    for a, b in leaves:  # relative to each leaf's largest value: gradients span magnitudes
        top = np.max(np.abs(a)) or 1.0  # (the unused null vector's gradient is 0)
        np.testing.assert_allclose(b / top, a / top, atol=1e-4)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads_fused["image"]))
    logits = []
    for implementation in ("flax", "fused"):
        model, variables, inputs, _ = _tiny(implementation)
        logits.append(jax.jit(functools.partial(model.apply, train=False))(variables, *inputs))
    np.testing.assert_array_equal(logits[0], logits[1])


def test_bad_switch_is_one_line():
    with pytest.raises(ConfigError, match=r"^config.model.batchnorm must be one of "
                                          r"\('flax', 'fused'\), got 'cudnn'$") as err:
        models.build_model(model_config(batchnorm="cudnn"), 4, 64, axis_name=None)
    assert "\n" not in str(err.value)
    models.check_model_config(model_config())  # records without the key: flax's BatchNorm


def test_switch_is_not_part_of_the_architecture():
    """A model trained with either BatchNorm exports the same architecture record."""
    from jaxmm.trained.model import architecture_of

    build = functools.partial(models.build_model, num_classes=4, vocab_size=64, axis_name=None)
    assert architecture_of(build(model_config(batchnorm="fused"))) == architecture_of(
        build(model_config()))
