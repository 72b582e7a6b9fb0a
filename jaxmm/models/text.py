"""Text tower: transformers' ``FlaxDistilBertModule`` with [CLS] or masked-mean pooling.

``TextTower`` subclasses the module instead of wrapping it, so its parameter tree is exactly
``FlaxDistilBertModel.params`` ({embeddings, transformer}) and pretrained weights graft without
renaming.
"""

from __future__ import annotations

import contextlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import DistilBertConfig
from transformers.models.distilbert.modeling_flax_distilbert import (
    FlaxDistilBertModule,
    FlaxMultiHeadSelfAttention,
)

from jaxmm.errors import ConfigError

TINY = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}
# Values of config.model.attention: transformers' self-attention as written, or "fused" (one
# query/key/value projection and jax.nn.dot_product_attention; training only, see below).
ATTENTIONS = ("transformers", "fused")


def distilbert_config(model_config, vocab_size: int) -> DistilBertConfig:
    """Builds the DistilBERT configuration the text tower is created with.

    Args:
      model_config: ``config.model``; uses text_arch and text_pretrained.
      vocab_size: tokenizer vocabulary size (used for 'tiny' and random-init 'distilbert').

    Returns:
      For 'distilbert' with a pretrained path: the checkpoint's own config.json (so the tower
      matches the weights), after checking that ``vocab_size`` ids fit its embedding table.
      Otherwise a fresh config with ``vocab_size``.
    """
    arch = model_config.text_arch
    if arch == "tiny":
        return DistilBertConfig(vocab_size=vocab_size, **TINY)
    if arch != "distilbert":
        raise ConfigError(f"config.model.text_arch must be 'distilbert' or 'tiny', got {arch!r}")
    if not model_config.text_pretrained:
        return DistilBertConfig(vocab_size=vocab_size)
    from jaxmm.models.pretrained import resolve_pretrained  # a cycle at import time otherwise

    path = resolve_pretrained(model_config.text_pretrained, "text")
    config = DistilBertConfig.from_pretrained(
        path if os.path.isdir(path) else os.path.dirname(path))
    if vocab_size > config.vocab_size:
        raise ConfigError(
            f"tokenizer vocabulary ({vocab_size}) is larger than the embedding table of "
            f"{model_config.text_pretrained!r} ({config.vocab_size}); use the tokenizer saved "
            "with those weights"
        )
    return config


def pool(hidden: jnp.ndarray, attention_mask: jnp.ndarray, mode: str) -> jnp.ndarray:
    """Pools [B,L,D] token states to [B,D]: 'cls' (first token) or 'mean' over real tokens."""
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ConfigError(f"config.model.text_pooling must be 'cls' or 'mean', got {mode!r}")
    mask = attention_mask.astype(hidden.dtype)[..., None]
    total = jnp.sum(hidden * mask, axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def fused_self_attention(module: FlaxMultiHeadSelfAttention, hidden: jnp.ndarray,
                         mask: jnp.ndarray) -> jnp.ndarray:
    """DistilBERT self-attention from ``module``'s own parameters, without attention dropout:
    one projection for query, key and value (their kernels side by side), then
    ``jax.nn.dot_product_attention`` — cuDNN's fused kernel on a GPU in bfloat16 or float16,
    XLA's elsewhere (the same formula, the logits and softmax in float32).

    Padding is given as each row's length (``key_value_seq_lengths``), which is what cuDNN
    takes: the tokens of a row must come first and its padding last, as jaxmm's tokenizer pads.

    Args:
      module: a bound ``FlaxMultiHeadSelfAttention`` (q_lin, k_lin, v_lin, out_lin).
      hidden: [B, L, dim] (query = key = value in DistilBERT).
      mask: [B, L] attention mask, 1 for tokens.

    Returns:
      [B, L, dim], the output projection of the attention.
    """
    p = module.variables["params"]
    dtype = module.dtype
    kernel = jnp.concatenate([p[n]["kernel"] for n in ("q_lin", "k_lin", "v_lin")], axis=1)
    bias = jnp.concatenate([p[n]["bias"] for n in ("q_lin", "k_lin", "v_lin")])
    b, length, dim = hidden.shape
    heads = module.config.n_heads
    qkv = hidden.astype(dtype) @ kernel.astype(dtype) + bias.astype(dtype)
    q, k, v = (t.reshape(b, length, heads, dim // heads) for t in jnp.split(qkv, 3, axis=-1))
    context = jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=jnp.sum(mask, axis=-1).astype(jnp.int32),
        implementation=attention_implementation(dtype))
    return module.out_lin(context.reshape(b, length, dim))


def attention_implementation(dtype) -> str:
    """``jax.nn.dot_product_attention``'s implementation for the fused attention: cuDNN's
    fused kernel on a GPU in bfloat16 or float16 (it takes no other dtype), XLA's otherwise."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


class TextTower(FlaxDistilBertModule):
    """DistilBERT encoder returning pooled float32 features; dropout only when training."""

    pooling: str = "cls"
    # "transformers" or "fused" (``fused_self_attention``): in training only; inference runs
    # transformers' attention, so the switch is no part of the architecture.
    attention: str = "transformers"

    def __call__(self, input_ids, attention_mask, *, train: bool,
                 word_embeddings=None) -> jnp.ndarray:
        """Encodes and pools a batch of token sequences.

        Args:
          input_ids, attention_mask: int [B,L].
          train: enables dropout.
          word_embeddings: optional float [B,L,dim] used instead of the embedding-table lookup
            of ``input_ids`` (position embeddings, LayerNorm and the encoder are unchanged);
            integrated gradients interpolate these.

        Returns:
          float32 [B, dim].
        """
        fused = self.attention == "fused" and train

        def intercept(next_fun, args, kwargs, context):
            # The tower holds one nn.Embed of that name (DistilBERT's word-embedding table).
            if (word_embeddings is not None and isinstance(context.module, nn.Embed)
                    and context.method_name == "__call__"
                    and context.module.name == "word_embeddings"):
                return word_embeddings
            if (fused and isinstance(context.module, FlaxMultiHeadSelfAttention)
                    and context.method_name == "__call__" and "query" in kwargs
                    and not kwargs.get("output_attentions")):
                return (fused_self_attention(context.module, kwargs["query"],
                                             attention_mask),)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(intercept) if word_embeddings is not None or fused else (
                contextlib.nullcontext()):
            hidden = super().__call__(
                input_ids, attention_mask, deterministic=not train, return_dict=True
            ).last_hidden_state
        return pool(hidden.astype(jnp.float32), attention_mask, self.pooling)
