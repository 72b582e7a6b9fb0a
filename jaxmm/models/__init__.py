"""Model construction for jaxmm: build, initialise, and label parameters per tower.

Typical use::

    model = build_model(config.model, num_classes, vocab_size, axis_name="batch")
    variables = init_variables(model, rng, config.image_size, config.max_text_length)
    variables = pretrained.load_pretrained(variables, config.model)
    labels = param_labels(variables["params"])  # for optax.multi_transform
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmm.errors import ConfigError
from jaxmm.models import batchnorm, pretrained
from jaxmm.models.fusion import MODALITIES, MultimodalClassifier
from jaxmm.models.resnet import ARCHS, STEMS, batchnorm_group_size, batchnorm_groups
from jaxmm.models.text import ATTENTIONS, distilbert_config

__all__ = ["batchnorm_groups", "build_model", "compute_dtype", "init_variables", "param_labels",
           "pretrained"]


def compute_dtype(name: str):
    """Maps config.model.dtype to a jnp dtype; 'auto' = bfloat16 on GPU/TPU, float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16"):
        raise ConfigError(
            f"config.model.dtype must be 'float32', 'bfloat16' or 'auto', got {name!r}")
    return jnp.dtype(name)


def build_model(model_config, num_classes: int, vocab_size: int,
                axis_name: str | None, batchnorm_sync: str = "global") -> nn.Module:
    """Builds the classifier described by ``config.model``; unused towers are not created.

    Args:
      model_config: ``config.model`` (modalities, image_arch, text_arch, text_pretrained,
        text_pooling, fusion, proj_dim, hidden_dim, dropout, modality_dropout, dtype,
        freeze_image, batchnorm, stem, attention).
      num_classes: number of output classes.
      vocab_size: tokenizer vocabulary size (embedding table size unless a pretrained
        'distilbert' checkpoint defines it).
      axis_name: pmap axis used to synchronise BatchNorm statistics in training, or None.
      batchnorm_sync: ``config.batchnorm_sync``: which devices of ``axis_name`` share training
        BatchNorm statistics ("global", "device", "group:N"); no effect at inference.

    Returns:
      A ``MultimodalClassifier``; call it as
      ``model.apply(variables, image, input_ids, attention_mask, train=..., modality_mask=...)``.
    """
    check_model_config(model_config)
    modalities = tuple(model_config.modalities)
    batchnorm_group_size(batchnorm_sync)  # a bad value fails here, not inside a pmapped step
    text_config = distilbert_config(model_config, vocab_size) if "text" in modalities else None
    return MultimodalClassifier(
        modalities=modalities, num_classes=num_classes, image_arch=model_config.image_arch,
        text_config=text_config, text_pooling=model_config.text_pooling,
        fusion=model_config.fusion, proj_dim=model_config.proj_dim,
        hidden_dim=model_config.hidden_dim, dropout=model_config.dropout,
        modality_dropout=model_config.modality_dropout,
        freeze_image=bool(model_config.freeze_image), axis_name=axis_name,
        dtype=compute_dtype(model_config.dtype), batchnorm_sync=batchnorm_sync,
        batchnorm=model_config.get("batchnorm", "flax"), stem=model_config.get("stem", "conv"),
        attention=model_config.get("attention", "transformers"),
    )


def check_model_config(model_config) -> None:
    """One-line ConfigErrors for the towers, the image architecture and the BatchNorm of
    ``config.model``."""
    modalities = tuple(model_config.modalities)
    if not modalities or set(modalities) - set(MODALITIES) or len(set(modalities)) != len(
            modalities):
        raise ConfigError(f"config.model.modalities must be a non-empty subset of {MODALITIES}, "
                          f"got {modalities!r}")
    if "image" in modalities and model_config.image_arch not in ARCHS:
        raise ConfigError(f"config.model.image_arch must be one of {tuple(ARCHS)}, "
                          f"got {model_config.image_arch!r}")
    # Run records written before the key existed lack it: flax's BatchNorm, as they used.
    if model_config.get("batchnorm", "flax") not in batchnorm.IMPLEMENTATIONS:
        raise ConfigError(f"config.model.batchnorm must be one of {batchnorm.IMPLEMENTATIONS}, "
                          f"got {model_config.batchnorm!r}")
    if model_config.get("stem", "conv") not in STEMS:
        raise ConfigError(f"config.model.stem must be one of {STEMS}, got {model_config.stem!r}")
    if model_config.get("attention", "transformers") not in ATTENTIONS:
        raise ConfigError(f"config.model.attention must be one of {ATTENTIONS}, "
                          f"got {model_config.attention!r}")


def init_variables(model: nn.Module, rng: jax.Array, image_size: int,
                   max_text_length: int) -> dict:
    """Initialises the model's variables (float32) from dummy inputs of the given sizes.

    Args:
      model: from ``build_model``.
      rng: PRNG key.
      image_size: side of the square images the model will see.
      max_text_length: token sequence length.

    Returns:
      dict(params=..., batch_stats=...) (batch_stats is {} without an image tower).
    """
    image = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    ids = jnp.zeros((1, max_text_length), jnp.int32)
    mask = jnp.ones((1, max_text_length), jnp.int32)
    init = jax.jit(lambda r: model.init({"params": r, "dropout": r}, image, ids, mask,
                                        train=False))
    variables = init(rng)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def param_labels(params: dict) -> dict:
    """Labels every leaf of ``params`` with its group: 'image', 'text' or 'head'.

    Use with ``optax.multi_transform`` for per-tower learning rates, and
    ``optax.set_to_zero()`` for frozen towers.
    """
    return {
        top: jax.tree.map(lambda _, t=top: t if t in MODALITIES else "head", subtree)
        for top, subtree in params.items()
    }
