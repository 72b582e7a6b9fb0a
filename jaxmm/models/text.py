"""Text tower: transformers' ``FlaxDistilBertModule`` with [CLS] or masked-mean pooling.

``TextTower`` subclasses the module instead of wrapping it, so its parameter tree is exactly
``FlaxDistilBertModel.params`` ({embeddings, transformer}) and pretrained weights graft without
renaming.
"""

from __future__ import annotations

import contextlib
import os

import flax.linen as nn
import jax.numpy as jnp
from transformers import DistilBertConfig
from transformers.models.distilbert.modeling_flax_distilbert import FlaxDistilBertModule

from jaxmm.errors import ConfigError

TINY = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}


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


class TextTower(FlaxDistilBertModule):
    """DistilBERT encoder returning pooled float32 features; dropout only when training."""

    pooling: str = "cls"

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
        def lookup(next_fun, args, kwargs, context):
            # The tower holds one nn.Embed of that name (DistilBERT's word-embedding table).
            if (isinstance(context.module, nn.Embed) and context.method_name == "__call__"
                    and context.module.name == "word_embeddings"):
                return word_embeddings
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(lookup) if word_embeddings is not None else (
                contextlib.nullcontext()):
            hidden = super().__call__(
                input_ids, attention_mask, deterministic=not train, return_dict=True
            ).last_hidden_state
        return pool(hidden.astype(jnp.float32), attention_mask, self.pooling)
