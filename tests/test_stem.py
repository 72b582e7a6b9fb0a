"""The space-to-depth stem (config.model.stem) computes the 7x7 stride-2 stem convolution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm import models
from jaxmm.errors import ConfigError
from jaxmm.models import resnet
from jaxmm.training import setup as setup_lib
from tests.support import model_config, tiny_config


def _strided(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (3, 16, 22, 3), (1, 8, 8, 5)])
def test_space_to_depth_equals_the_strided_convolution(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(7, 7, shape[-1], 16)), jnp.float32)
    want = _strided(x, kernel)
    got = resnet.space_to_depth_stem(x, kernel)
    assert got.shape == want.shape == (shape[0], shape[1] // 2, shape[2] // 2, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # and its gradients (the kernel's, which training uses, and the image's)
    cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    grads = [jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) * cot), argnums=(0, 1))(x, kernel)
             for f in (_strided, resnet.space_to_depth_stem)]
    for a, b in zip(grads[0], grads[1], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-3)
    # Negative control: a kernel tap off by one position is seen.
    moved = jnp.roll(kernel, 1, axis=0)
    assert not np.allclose(resnet.space_to_depth_stem(x, moved), want, atol=1e-2)


def test_odd_sizes_are_refused():
    with pytest.raises(ValueError, match="even image size"):
        resnet.space_to_depth_stem(jnp.zeros((1, 7, 8, 3)), jnp.zeros((7, 7, 3, 4)))
    config = tiny_config("/data")
    config.model.stem, config.image_size = "space_to_depth", 33
    with pytest.raises(ConfigError, match=r"^config.model.stem='space_to_depth' works on 2x2 "
                                          r"pixel blocks: config.image_size=33 must be even$"):
        setup_lib.validate_config(config)
    with pytest.raises(ConfigError, match=r"^config.model.stem must be one of \('conv', "
                                          r"'space_to_depth'\), got 's2d'$"):
        models.build_model(model_config(stem="s2d"), 4, 64, axis_name=None)


def _loss_and_grads(stem: str):
    config = model_config(modalities=("image",), dropout=0.0, stem=stem)
    model = models.build_model(config, 4, 64, axis_name=None)
    variables = models.init_variables(model, jax.random.PRNGKey(0), 32, 8)
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)),
              jnp.zeros((8, 8), jnp.int32), jnp.ones((8, 8), jnp.int32))
    labels = jnp.asarray(rng.integers(0, 4, 8))

    def loss(params):
        logits, updates = model.apply({"params": params,
                                       "batch_stats": variables["batch_stats"]},
                                      *inputs, train=True, mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels]), updates

    logits = jax.jit(functools.partial(model.apply, train=False))(variables, *inputs)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"]), logits, model


def test_tiny_classifier_trains_the_same_with_either_stem(monkeypatch):
    traced = []  # which stems were traced: the switch must reach the training step only
    monkeypatch.setattr(resnet, "space_to_depth_stem", lambda x, k, f=resnet.space_to_depth_stem: (
        traced.append(x.shape[-1]), f(x, k))[1])
    ((loss_a, stats_a), grads_a), logits_a, model_a = _loss_and_grads("conv")
    assert traced == []
    ((loss_b, stats_b), grads_b), logits_b, model_b = _loss_and_grads("space_to_depth")
    assert traced == [3]  # traced once: the training step's (not init, not inference)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)  # one parameter tree
    for a, b in zip(jax.tree.leaves((stats_a, grads_a)), jax.tree.leaves((stats_b, grads_b)),
                    strict=True):
        top = np.max(np.abs(a)) or 1.0
        np.testing.assert_allclose(b / top, a / top, atol=1e-4)
    np.testing.assert_array_equal(logits_a, logits_b)  # inference runs the stem as written
    from jaxmm.trained.model import architecture_of

    assert architecture_of(model_a) == architecture_of(model_b)
