"""Per-example randomness: every random choice of a training pass drawn from its example's key.

With one dropout key per device, the masks an example gets depend on which device holds it and
on its row there, so the same global batch trains a different model on 1 and on 4 devices. Here
each example ``i`` of the global batch gets ``fold_in(key, i)`` for every random call (``key`` is
the call's own ``make_rng`` key, the same on every device), so its masks are the same whatever
the layout. Parameter trees are unchanged: ``per_example_dropout`` intercepts the ``nn.Dropout``
calls of every submodule (DistilBERT's included) instead of replacing the modules.

The keys must be exact under ``vmap``: ``threefry`` keys are, ``rbg`` keys are not (JAX's
``jax.random`` documentation), so callers pass threefry keys (``threefry_key``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.module import merge_param


def threefry_key(key: jax.Array) -> jax.Array:
    """A typed threefry key drawn from ``key`` (any implementation), the same on every device."""
    return jax.random.wrap_key_data(jax.random.bits(key, (2,), jnp.uint32),
                                    impl="threefry2x32")


def example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
    """[B] keys: ``fold_in(key, id)`` for each example's index in the global batch."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids)


def bernoulli(key: jax.Array, example_ids: jax.Array, p: float, shape=()) -> jax.Array:
    """bool [B, *shape]: row b is ``bernoulli(fold_in(key, example_ids[b]), p, shape)``."""
    return jax.vmap(lambda k: jax.random.bernoulli(k, p, shape))(example_keys(key, example_ids))


def randint(key: jax.Array, example_ids: jax.Array, high: int) -> jax.Array:
    """int [B]: row b is ``randint(fold_in(key, example_ids[b]), (), 0, high)``."""
    return jax.vmap(lambda k: jax.random.randint(k, (), 0, high))(example_keys(key, example_ids))


def per_example_dropout(example_ids: jax.Array):
    """A context in which every ``nn.Dropout`` draws its mask row by row from example keys.

    Args:
      example_ids: int [B], the index in the global batch of each row the modules see (the
        leading axis of every dropout input).

    Returns:
      A ``flax.linen.intercept_methods`` context (use it inside the model's ``__call__``).
    """
    return nn.intercept_methods(functools.partial(_intercept, example_ids))


def _intercept(example_ids, next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Dropout) and context.method_name == "__call__":
        return _dropout(module, example_ids, *args, **kwargs)
    return next_fun(*args, **kwargs)


def _dropout(module: nn.Dropout, example_ids, inputs, deterministic=None, rng=None):
    """``nn.Dropout.__call__`` with one mask per example (same scaling and edge cases)."""
    deterministic = merge_param("deterministic", module.deterministic, deterministic)
    if module.rate == 0.0 or deterministic:
        return inputs
    if module.rate == 1.0:
        return jnp.zeros_like(inputs)
    dims = {d % inputs.ndim for d in module.broadcast_dims}
    if 0 in dims:
        raise ValueError("per-example dropout cannot broadcast a mask over the batch axis")
    keep = 1.0 - module.rate
    rng = module.make_rng(module.rng_collection) if rng is None else rng
    shape = tuple(1 if d in dims else n for d, n in enumerate(inputs.shape))[1:]
    mask = jnp.broadcast_to(bernoulli(rng, example_ids, keep, shape), inputs.shape)
    return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))
