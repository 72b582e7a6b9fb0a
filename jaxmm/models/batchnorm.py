"""BatchNorm with a hand-written backward pass (``config.model.batchnorm="fused"``).

``flax.linen.BatchNorm`` is differentiated by JAX: its statistics, normalisation and the ReLU and
residual add that follow it are separate operations, and their gradients are several reductions
and element-wise passes over the activations. ``BatchNorm`` here computes the same function with
a ``jax.custom_vjp`` whose backward pass is one two-output reduction per channel (the sum of the
incoming gradient and of the gradient times the normalised input) and one element-wise pass; its
forward pass keeps only the input, the per-channel mean and 1/sigma (and, with ``relu``, the
output, which the next layer keeps anyway) for the backward. Statistics are accumulated in float32
straight from the (bfloat16) input. ``relu=True`` applies ``relu(bn(x) [+ residual])`` inside the
same rule.

The variables are those of ``flax.linen.BatchNorm`` (params ``scale``, ``bias``; batch_stats
``mean``, ``var``; same shapes, dtypes and initial values) and so is the running-average update
(the biased batch variance, ``momentum * old + (1 - momentum) * batch``), so checkpoints and
weights move freely between the two. Features are on the last axis (NHWC).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax

# Values of config.model.batchnorm: flax's autodiffed module, or this one (training only).
IMPLEMENTATIONS = ("flax", "fused")


class _Static(NamedTuple):
    """The non-array arguments of the custom-VJP function (hashable)."""

    epsilon: float
    relu: bool
    dtype: Any  # of the normalised output before the residual add
    residual_dtype: Any  # None without a residual
    axis_name: str | None
    groups: tuple | None  # axis_index_groups as tuples


def _group_size(static: _Static) -> int:
    """Devices whose rows share the statistics."""
    if static.axis_name is None:
        return 1
    return len(static.groups[0]) if static.groups else lax.axis_size(static.axis_name)


def _psum(x, static: _Static):
    if static.axis_name is None:
        return x
    groups = [list(g) for g in static.groups] if static.groups else None
    return lax.psum(x, static.axis_name, axis_index_groups=groups)


def _count(x, static: _Static) -> int:
    """Rows behind each channel's statistics: local rows times the devices of the group."""
    return math.prod(x.shape[:-1]) * _group_size(static)


def _moments(x, static: _Static):
    """Float32 batch mean and biased variance per channel (one pass over ``x``, reduced over
    the group in one collective); the variance is E[x^2] - E[x]^2, clipped at 0 as flax does."""
    axes = tuple(range(x.ndim - 1))
    sums = jnp.stack([jnp.sum(x, axes, dtype=jnp.float32),
                      jnp.sum(jnp.square(x.astype(jnp.float32)), axes)])
    sums = _psum(sums, static) / _count(x, static)
    mean = sums[0]
    return mean, jnp.maximum(0.0, sums[1] - jnp.square(mean))


def _output(x, mean, inv, scale, bias, residual, static: _Static):
    """relu?(((x - mean) * inv * scale + bias) as dtype [+ residual]), in flax's order."""
    y = ((x - mean) * (inv * scale) + bias).astype(static.dtype)
    if residual is not None:
        y = y + residual
    return nn.relu(y) if static.relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm(x, scale, bias, residual, static: _Static):
    """Training BatchNorm over all axes but the last, statistics shared over ``static``'s axis.

    Args:
      x: [..., C] input (any float dtype).
      scale, bias: [C] parameters.
      residual: None, or an array added to the normalised output before the ReLU.
      static: epsilon, ReLU flag, output dtype, residual dtype, axis name and index groups.

    Returns:
      (y, mean, var): the output, and the float32 batch mean and biased variance.
    """
    mean, var = _moments(x, static)
    inv = lax.rsqrt(var + static.epsilon)
    return _output(x, mean, inv, scale, bias, residual, static), mean, var


def _forward(x, scale, bias, residual, static: _Static):
    mean, var = _moments(x, static)
    inv = lax.rsqrt(var + static.epsilon)
    y = _output(x, mean, inv, scale, bias, residual, static)
    # With a ReLU, the output gives its mask; the next layer keeps it anyway.
    return (y, mean, var), (x, y if static.relu else None, mean, inv, scale)


def _backward(static: _Static, saved, cotangents):
    x, y, mean, inv, scale = saved
    g, g_mean, g_var = cotangents
    if static.relu:
        g = jnp.where(y > 0, g, jnp.zeros_like(g))
    g_residual = None if static.residual_dtype is None else g.astype(static.residual_dtype)
    g = g.astype(static.dtype).astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    xhat = (x - mean) * inv
    local = jnp.stack([jnp.sum(g, axes), jnp.sum(g * xhat, axes)])  # one multi-output reduction
    # The gradient of every device's loss reaches x through the shared statistics, so the
    # sums (and the cotangents of the returned statistics) are added over the same group.
    total = _psum(jnp.concatenate([local, g_mean[None], g_var[None]]), static)
    count = _count(x, static)
    k = scale * inv
    shift = (total[2] - k * total[0]) / count
    slope = (2.0 * total[3] / inv - k * total[1]) / count
    gx = (k * g + shift + slope * xhat).astype(x.dtype)
    return gx, local[1].astype(scale.dtype), local[0].astype(scale.dtype), g_residual


batch_norm.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """Drop-in for ``flax.linen.BatchNorm`` (features on the last axis) with a hand-written
    backward; optionally ``relu(bn(x) + residual)`` in one rule (module docstring).

    Attributes:
      use_running_average: normalise with the running averages (inference, frozen towers).
      momentum, epsilon: as flax's.
      dtype: output dtype (None: the result type of the input and the parameters).
      param_dtype: dtype of scale and bias.
      axis_name, axis_index_groups: the pmap axis and its groups that share the statistics.
      relu: apply a ReLU to the output (after the residual add).
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    axis_index_groups: Any = None
    relu: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, residual=None):
        """Args: x [..., C]; residual: None or an array added before the ReLU. Returns y."""
        use_avg = nn.merge_param("use_running_average", self.use_running_average,
                                 use_running_average)
        shape = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
        scale = self.param("scale", nn.initializers.ones, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype)
        dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        if use_avg:
            static = self._static(dtype, residual, None)
            inv = lax.rsqrt(ra_var.value + self.epsilon)
            return _output(x, ra_mean.value, inv, scale, bias, residual, static)
        # At init the axis may be unbound and the running averages are not updated (as flax).
        axis_name = None if self.is_initializing() else self.axis_name
        y, mean, var = batch_norm(x, scale, bias, residual,
                                  self._static(dtype, residual, axis_name))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y

    def _static(self, dtype, residual, axis_name) -> _Static:
        groups = (tuple(tuple(int(i) for i in g) for g in self.axis_index_groups)
                  if axis_name is not None and self.axis_index_groups is not None else None)
        return _Static(float(self.epsilon), bool(self.relu), jnp.dtype(dtype),
                       None if residual is None else jnp.dtype(residual.dtype), axis_name, groups)
