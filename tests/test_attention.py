"""The fused text self-attention (config.model.attention="fused") is DistilBERT's attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import DistilBertConfig

from jaxmm import models
from jaxmm.errors import ConfigError
from jaxmm.models import text
from tests.support import model_config

# No dropout anywhere, so the two ways differ only by how they compute attention.
CONFIG = DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                          dropout=0.0, attention_dropout=0.0)


def _inputs(batch=6, length=9):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 50, (batch, length))
    lengths = np.array([length, 1, 4, length - 1, 2, 6])[:batch]  # [CLS] at least; pad right
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


def _apply(attention, variables, ids, mask, train=True):
    tower = text.TextTower(CONFIG, attention=attention, pooling="mean")
    return tower.apply(variables, ids, mask, train=train, rngs={"dropout": jax.random.key(1)})


def test_fused_attention_equals_transformers_attention_values_and_gradients(monkeypatch):
    ids, mask = _inputs()
    variables = text.TextTower(CONFIG).init(jax.random.key(0), ids, mask, train=False)
    calls = []
    monkeypatch.setattr(text, "fused_self_attention", lambda *a, f=text.fused_self_attention: (
        calls.append(1), f(*a))[1])
    want = _apply("transformers", variables, ids, mask)
    got = _apply("fused", variables, ids, mask)
    assert len(calls) == CONFIG.n_layers  # every layer took the fused path
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def loss(params, attention):
        return jnp.sum(_apply(attention, {"params": params}, ids, mask) ** 2)

    grads = [jax.grad(loss)(variables["params"], a) for a in ("transformers", "fused")]
    # Relative to the largest gradient: the key bias's is zero in exact arithmetic (softmax
    # ignores a shift shared by all keys), so both ways give round-off there.
    top = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads[0]))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(b / top, a / top, atol=1e-6)
    # Inference runs transformers' attention whatever the switch says: bit for bit.
    calls.clear()
    np.testing.assert_array_equal(_apply("fused", variables, ids, mask, train=False),
                                  _apply("transformers", variables, ids, mask, train=False))
    assert calls == []
    # Negative control: the padding matters, so a wrong length would be seen.
    wrong = mask.at[1, 3].set(1)
    assert not np.allclose(_apply("fused", variables, ids, wrong), want, atol=1e-3)


def test_bfloat16_stays_close():
    ids, mask = _inputs()
    variables = text.TextTower(CONFIG).init(jax.random.key(0), ids, mask, train=False)
    tower = functools.partial(text.TextTower, CONFIG, dtype=jnp.bfloat16, pooling="mean")
    want = tower(attention="transformers").apply(variables, ids, mask, train=True)
    got = tower(attention="fused").apply(variables, ids, mask, train=True)
    np.testing.assert_allclose(got, want, atol=0.05)  # bf16 round-off; softmax in float32 here


def test_switch_is_checked_and_is_no_part_of_the_architecture():
    from jaxmm.trained.model import architecture_of

    with pytest.raises(ConfigError, match=r"^config.model.attention must be one of "
                                          r"\('transformers', 'fused'\), got 'cudnn'$"):
        models.build_model(model_config(attention="cudnn"), 4, 64, axis_name=None)
    build = functools.partial(models.build_model, num_classes=4, vocab_size=64, axis_name=None)
    assert architecture_of(build(model_config(attention="fused"))) == architecture_of(
        build(model_config()))
