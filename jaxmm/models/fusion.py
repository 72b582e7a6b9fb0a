"""The multimodal classifier: image and/or text towers, a fusion head, float32 logits.

Variables: params {'image', 'text', 'head'} (only the configured towers exist) and
batch_stats {'image'}. Each tower feature is projected and LayerNorm-ed; a masked tower
(``modality_mask`` at eval, modality dropout in training) is replaced by a learned null vector
of the same projected space, so training and evaluation treat a missing tower identically.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmm.errors import ConfigError
from jaxmm.models import per_example
from jaxmm.models.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet
from jaxmm.models.text import TextTower

MODALITIES = ("image", "text")


class FusionHead(nn.Module):
    """Projection + LayerNorm per tower, modality masking, concat or gated fusion, MLP."""

    modalities: tuple[str, ...]
    num_classes: int
    proj_dim: int = 256
    hidden_dim: int = 512
    fusion: str = "concat"
    dropout: float = 0.1
    modality_dropout: float = 0.0
    dtype: Any = jnp.float32

    def _keep(self, batch: int, modality_mask, train: bool, example_ids) -> jnp.ndarray:
        """bool [B, n]: which tower features each example keeps (random choices drawn per
        example from ``example_ids`` when given, else from one key for the whole batch)."""
        n = len(self.modalities)
        keep = jnp.ones((batch, n), bool)
        if modality_mask is not None:
            keep = keep & jnp.asarray(modality_mask, bool).reshape(batch, n)
        if train and self.modality_dropout > 0 and n > 1:
            # Drop exactly one (random) tower for a fraction of examples, never both.
            rng_drop, rng_which = jax.random.split(self.make_rng("dropout"))
            if example_ids is None:
                drop = jax.random.bernoulli(rng_drop, self.modality_dropout, (batch,))
                which = jax.random.randint(rng_which, (batch,), 0, n)
            else:
                drop = per_example.bernoulli(rng_drop, example_ids, self.modality_dropout)
                which = per_example.randint(rng_which, example_ids, n)
            keep = keep & ~(drop[:, None] & (jnp.arange(n)[None, :] == which[:, None]))
        return keep

    @nn.compact
    def __call__(self, feats: dict, modality_mask=None, *, train: bool,
                 example_ids=None) -> jnp.ndarray:
        """Args: feats {modality: [B,D]}; modality_mask bool [B,n] (True = keep); example_ids
        int [B] or None (see ``MultimodalClassifier``).

        Returns: float32 logits [B, num_classes].
        """
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        batch = feats[self.modalities[0]].shape[0]
        keep = self._keep(batch, modality_mask, train, example_ids)
        projected = []
        for i, m in enumerate(self.modalities):
            p = dense(self.proj_dim, f"proj_{m}")(feats[m].astype(self.dtype))
            p = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name=f"norm_{m}")(p)
            null = self.param(f"null_{m}", nn.initializers.zeros, (self.proj_dim,), jnp.float32)
            projected.append(jnp.where(keep[:, i, None], p, null.astype(p.dtype)))
        if self.fusion == "concat":
            fused = jnp.concatenate(projected, axis=-1)
        elif self.fusion == "gated":
            fused = self._gate(projected, dense)
        else:
            raise ConfigError(
                f"config.model.fusion must be 'concat' or 'gated', got {self.fusion!r}")
        x = nn.Dropout(self.dropout, deterministic=not train)(fused)
        x = nn.gelu(dense(self.hidden_dim, "fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                          name="out")(x.astype(jnp.float32))
        return logits

    def _gate(self, projected: list, dense) -> jnp.ndarray:
        """Gated multimodal unit: softmax-over-towers gates weight tanh tower transforms."""
        n = len(projected)
        gates = dense(n * self.proj_dim, "gate")(jnp.concatenate(projected, axis=-1))
        gates = jax.nn.softmax(gates.reshape(-1, n, self.proj_dim).astype(jnp.float32), axis=1)
        values = jnp.stack(
            [jnp.tanh(dense(self.proj_dim, f"gate_value_{m}")(p))
             for m, p in zip(self.modalities, projected, strict=True)], axis=1)
        return jnp.sum(gates.astype(values.dtype) * values, axis=1)


class MultimodalClassifier(nn.Module):
    """Image + text garbage classifier; see ``jaxmm.models.build_model`` for construction."""

    modalities: tuple[str, ...]
    num_classes: int
    image_arch: str = "resnet50"
    text_config: Any = None  # transformers DistilBertConfig; None when text is not used
    text_pooling: str = "cls"
    fusion: str = "concat"
    proj_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.1
    modality_dropout: float = 0.0
    freeze_image: bool = False
    axis_name: str | None = None
    dtype: Any = jnp.float32
    batchnorm_sync: str = "global"  # training only; see ResNet
    batchnorm: str = "flax"  # training-time BatchNorm implementation; see ResNet
    stem: str = "conv"  # training-time stem convolution; see ResNet
    attention: str = "transformers"  # training-time text self-attention; see TextTower
    # Normalisation of the uint8 image inside the model: (x / 255 - mean) / std per channel.
    image_mean: tuple = IMAGENET_MEAN
    image_std: tuple = IMAGENET_STD

    @nn.compact
    def __call__(self, image, input_ids, attention_mask, *, train: bool, modality_mask=None,
                 word_embeddings=None, example_ids=None):
        """Classifies a batch.

        Args:
          image: uint8 or float [B,H,W,3] in 0..255 (ignored without an image tower).
          input_ids, attention_mask: int [B,L] (ignored without a text tower).
          train: enables dropout, modality dropout and BatchNorm batch statistics.
          modality_mask: optional bool [B, len(modalities)], True = keep that tower.
          word_embeddings: optional float [B,L,dim] replacing the text tower's embedding-table
            lookup of ``input_ids`` (for attributions; see ``TextTower``).
          example_ids: optional int [B], each row's index in the global batch: every dropout
            mask and modality-dropout choice of a row is then drawn from its own key
            (``per_example``), so it does not depend on the device layout. None: one key per
            call for the whole batch.

        Returns:
          float32 logits [B, num_classes].
        """
        with (per_example.per_example_dropout(example_ids) if train and example_ids is not None
              else contextlib.nullcontext()):
            return self._classify(image, input_ids, attention_mask, train, modality_mask,
                                  word_embeddings, example_ids)

    def _classify(self, image, input_ids, attention_mask, train, modality_mask,
                  word_embeddings, example_ids):
        feats = {}
        if "image" in self.modalities:
            feats["image"] = ResNet(self.image_arch, self.dtype, self.axis_name,
                                    self.freeze_image, mean=tuple(self.image_mean),
                                    std=tuple(self.image_std),
                                    batchnorm_sync=self.batchnorm_sync,
                                    batchnorm=self.batchnorm, stem=self.stem,
                                    name="image")(image, train=train)
        if "text" in self.modalities:
            feats["text"] = TextTower(self.text_config, dtype=self.dtype,
                                      pooling=self.text_pooling, attention=self.attention,
                                      name="text")(
                input_ids, attention_mask, train=train, word_embeddings=word_embeddings)
        return FusionHead(
            self.modalities, self.num_classes, self.proj_dim, self.hidden_dim, self.fusion,
            self.dropout, self.modality_dropout, self.dtype, name="head",
        )(feats, modality_mask, train=train, example_ids=example_ids)
