"""Tests for jaxmm.models: shapes per variant, freezing, modality masking, BatchNorm sync."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmm import models
from tests.support import model_config

VOCAB, CLASSES, SIZE, LENGTH = 64, 4, 32, 8


def key(seed):
    # The rbg PRNG compiles much faster on CPU than threefry; the tests only need randomness.
    return jax.random.key(seed, impl="rbg")


def batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    ids = rng.integers(1, VOCAB, (n, LENGTH), dtype=np.int32)
    mask = np.ones((n, LENGTH), np.int32)
    mask[:, LENGTH // 2:] = 0
    return jnp.asarray(image), jnp.asarray(ids), jnp.asarray(mask)


def build(axis_name=None, **overrides):
    model = models.build_model(model_config(**overrides), CLASSES, VOCAB, axis_name)
    return model, models.init_variables(model, key(0), SIZE, LENGTH)


def jit_apply(model, train):
    """One compiled call instead of op-by-op dispatch (much faster on CPU)."""
    if train:
        return jax.jit(lambda v, *xs, rng, modality_mask=None: model.apply(
            v, *xs, train=True, mutable=["batch_stats"], rngs={"dropout": rng},
            modality_mask=modality_mask))
    return jax.jit(lambda v, *xs, modality_mask=None: model.apply(
        v, *xs, train=False, modality_mask=modality_mask))


@pytest.fixture(scope="module")
def default_model():
    return build()


@pytest.mark.parametrize("modalities,fusion,dtype,pooling", [
    (("image", "text"), "concat", "float32", "cls"),
    (("image", "text"), "gated", "bfloat16", "mean"),
    (("image",), "concat", "bfloat16", "cls"),
    (("image",), "gated", "float32", "cls"),
    (("text",), "concat", "bfloat16", "mean"),
    (("text",), "gated", "float32", "cls"),
])
def test_variants_shapes_and_dtypes(modalities, fusion, dtype, pooling):
    model, variables = build(modalities=modalities, fusion=fusion, dtype=dtype,
                             text_pooling=pooling, modality_dropout=0.3)
    params = variables["params"]
    assert set(params) == {*modalities, "head"}  # an unused tower is not built at all
    assert set(variables["batch_stats"]) == ({"image"} if "image" in modalities else set())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    image, ids, mask = batch()

    @jax.jit
    def train_and_eval(variables, rng):  # one compilation for both modes
        train_out = model.apply(variables, image, ids, mask, train=True, rngs={"dropout": rng},
                                mutable=["batch_stats"])
        return train_out, model.apply(variables, image.astype(jnp.float32), ids, mask,
                                      train=False)

    (logits, updates), eval_logits = train_and_eval(variables, key(1))
    for out in (logits, eval_logits):
        assert out.shape == (4, CLASSES) and out.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(out)))
    assert set(updates.get("batch_stats", {})) == set(variables["batch_stats"])


def test_bad_config_raises():
    with pytest.raises(ValueError, match="modalities"):
        models.build_model(model_config(modalities=("audio",)), CLASSES, VOCAB, None)
    with pytest.raises(ValueError, match="image_arch"):
        models.build_model(model_config(image_arch="vit"), CLASSES, VOCAB, None)


def test_param_labels_cover_every_leaf(default_model):
    _, variables = default_model
    labels = models.param_labels(variables["params"])
    for top in ("image", "text", "head"):
        assert set(jax.tree.leaves(labels[top])) == {top}
    assert jax.tree.structure(labels) == jax.tree.structure(variables["params"])


def _one_step(model, variables, tx):
    image, ids, mask = batch()
    labels = jnp.arange(4) % CLASSES

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, image, ids, mask,
            train=True, mutable=["batch_stats"], rngs={"dropout": key(2)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    grads, updates = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"])
    opt_state = tx.init(variables["params"])
    step, _ = tx.update(grads, opt_state, variables["params"])
    return optax.apply_updates(variables["params"], step), updates["batch_stats"]


def _changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                        strict=True))


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_towers_unchanged_after_step(frozen):
    model, variables = build(freeze_image=frozen, freeze_text=frozen)
    adam = optax.adam(1e-2)
    tower_tx = optax.set_to_zero() if frozen else adam
    tx = optax.multi_transform({"image": tower_tx, "text": tower_tx, "head": adam},
                               models.param_labels(variables["params"]))
    params, stats = _one_step(model, variables, tx)
    assert _changed(params["head"], variables["params"]["head"])
    for tower in ("image", "text"):
        assert _changed(params[tower], variables["params"][tower]) != frozen
    # A frozen image tower normalises with (and keeps) its running averages.
    assert _changed(stats, variables["batch_stats"]) != frozen


def test_modality_mask_only_masks_intended_tower(default_model):
    model, variables = default_model
    image, ids, mask = batch()
    other_image, other_ids, _ = batch(seed=1)
    keep = jnp.array([[True, True], [False, True], [True, False], [True, True]])
    apply = jit_apply(model, False)
    run = lambda im, tok: np.asarray(apply(variables, im, tok, mask, modality_mask=keep))
    base = run(image, ids)
    new_image, new_ids = run(other_image, ids), run(image, other_ids)
    # Row 1 has no image: the image cannot matter; row 2 has no text: the text cannot matter.
    np.testing.assert_array_equal(base[1], new_image[1])
    np.testing.assert_array_equal(base[2], new_ids[2])
    assert not np.allclose(base[2], new_image[2]) and not np.allclose(base[1], new_ids[1])
    assert not np.allclose(base[0], new_image[0]) and not np.allclose(base[0], new_ids[0])
    unmasked = np.asarray(apply(variables, image, ids, mask))
    np.testing.assert_allclose(base[[0, 3]], unmasked[[0, 3]], rtol=1e-6, atol=1e-6)


def test_modality_dropout_drops_exactly_one_tower_like_eval_masking():
    # No other randomness: frozen BatchNorm, no dropout, so train and eval differ only in masking.
    model, variables = build(freeze_image=True, dropout=0.0, modality_dropout=1.0)
    model = model.clone(text_config=model.text_config.__class__(
        **{**model.text_config.to_dict(), "dropout": 0.0, "attention_dropout": 0.0}))
    image, ids, mask = batch(16)
    train = jit_apply(model, True)(variables, image, ids, mask, rng=key(3))[0]
    apply = jit_apply(model, False)
    masked = [apply(variables, image, ids, mask, modality_mask=jnp.tile(jnp.array(keep), (16, 1)))
              for keep in ([False, True], [True, False])]
    close = [np.all(np.isclose(train, m, atol=1e-5), axis=1) for m in masked]
    assert np.all(close[0] ^ close[1])  # each example lost exactly one tower
    assert close[0].any() and close[1].any()


def test_batchnorm_statistics_synchronised_under_pmap():
    n_dev = 4
    assert jax.local_device_count() == n_dev, "tests/conftest.py should fake 4 CPU devices"
    single, variables = build(modalities=("image",), dropout=0.0)
    synced = models.build_model(model_config(modalities=("image",), dropout=0.0), CLASSES,
                                VOCAB, axis_name="batch")
    image, ids, mask = batch(8)
    apply = functools.partial(synced.apply, train=True, mutable=["batch_stats"])
    shard = lambda x: x.reshape(n_dev, -1, *x.shape[1:])
    p_logits, p_updates = jax.pmap(apply, axis_name="batch", in_axes=(None, 0, 0, 0))(
        variables, shard(image), shard(ids), shard(mask))
    s_logits, s_updates = jit_apply(single, True)(variables, image, ids, mask,
                                                  rng=key(0))
    for p_leaf, s_leaf in zip(jax.tree.leaves(p_updates), jax.tree.leaves(s_updates),
                              strict=True):
        for device in range(n_dev):  # identical on every device, equal to the full batch
            np.testing.assert_allclose(p_leaf[device], s_leaf, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p_logits.reshape(8, -1), s_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sync,group", [("device", 1), ("group:2", 2)])
def test_unsynchronised_batchnorm_normalises_over_each_devices_group(sync, group):
    """With "device" (or "group:N") statistics, device d's training pass equals a one-device
    pass over the rows of its group alone, and differs from the pass over the global batch."""
    n_dev, rows = 4, 8
    single, variables = build(modalities=("image",), dropout=0.0)
    local = models.build_model(model_config(modalities=("image",), dropout=0.0), CLASSES,
                               VOCAB, axis_name="batch", batchnorm_sync=sync)
    image, ids, mask = batch(rows)
    apply = functools.partial(local.apply, train=True, mutable=["batch_stats"])
    shard = lambda x: x.reshape(n_dev, -1, *x.shape[1:])
    p_logits, p_updates = jax.pmap(apply, axis_name="batch", in_axes=(None, 0, 0, 0))(
        variables, shard(image), shard(ids), shard(mask))
    per_dev = rows // n_dev
    single_apply = jit_apply(single, True)
    for device in range(n_dev):
        g = device // group * group * per_dev  # first row of the device's group
        s_logits, s_updates = single_apply(variables, image[g:g + group * per_dev],
                                           ids[g:g + group * per_dev],
                                           mask[g:g + group * per_dev], rng=key(0))
        mine = slice(device * per_dev - g, (device + 1) * per_dev - g)
        np.testing.assert_allclose(p_logits[device], s_logits[mine], rtol=1e-4, atol=1e-4)
        for p_leaf, s_leaf in zip(jax.tree.leaves(p_updates), jax.tree.leaves(s_updates),
                                  strict=True):
            np.testing.assert_allclose(p_leaf[device], s_leaf, rtol=1e-4, atol=1e-5)
    # Negative control: the global-batch pass normalises differently.
    g_logits, _ = single_apply(variables, image, ids, mask, rng=key(0))
    assert not np.allclose(p_logits.reshape(rows, -1), g_logits, atol=1e-3)


def test_batchnorm_sync_values():
    assert models.batchnorm_groups("global", 8) is None
    assert models.batchnorm_groups("group:8", 8) is None  # one group = every device
    assert models.batchnorm_groups("group:2", 4) == [[0, 1], [2, 3]]
    assert models.batchnorm_groups("device", 4) == [[0], [1], [2], [3]]
    for bad in ("local", "group:", "group:0", "group:x", "group:-2", ""):
        with pytest.raises(ValueError, match="^config.batchnorm_sync="):
            models.build_model(model_config(), CLASSES, VOCAB, "batch", batchnorm_sync=bad)
    with pytest.raises(ValueError, match="^config.batchnorm_sync='group:3': 3 does not divide "
                                         "the 4 devices"):
        models.batchnorm_groups("group:3", 4)
