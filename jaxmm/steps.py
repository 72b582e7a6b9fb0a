"""Pure train and eval steps (no I/O), written for ``jax.pmap`` over ``parallel.AXIS_NAME``.

Constants (class weights, label smoothing) are bound with ``functools.partial`` by the caller.
Metrics leave the steps as psummed sums, so every ratio formed from them is exact for the global
batch whatever the device count.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxmm import losses
from jaxmm.parallel import AXIS_NAME


class TrainState(struct.PyTreeNode):
    """What a training run carries from step to step (and checkpoints)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, apply_fn, params, batch_stats, tx):
        return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                   opt_state=tx.init(params), apply_fn=apply_fn, tx=tx)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def _inputs(batch):
    return batch["image"], batch["input_ids"], batch["attention_mask"]


def train_step(state: TrainState, batch: dict, root_key: jax.Array, *, class_weights,
               label_smoothing: float = 0.0, axis_name: str = AXIS_NAME):
    """One optimizer step on this device's part of the global batch.

    The device computes sum(w * CE) / W over its rows, where W is the psummed weight of the whole
    global batch; the psum of these terms (and of their gradients) is the exact global loss.

    Args:
      state: the replicated train state (donated by the caller).
      batch: this device's rows: image, input_ids, attention_mask, label.
      root_key: the run's root PRNG key; the step and device index are folded in, so dropout is
        a pure function of (seed, step, device) and a resumed run repeats it exactly.
      class_weights: [K] weights of the classes.
      label_smoothing: smoothing of the one-hot targets.
      axis_name: the pmap axis.

    Returns:
      (new_state, metrics) where metrics are psummed sums (see ``losses.weighted_ce_sums``).
    """
    key = jax.random.fold_in(jax.random.fold_in(root_key, state.step),
                             jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, *_inputs(batch), train=True,
            rngs={"dropout": key}, mutable=["batch_stats"])
        sums = losses.weighted_ce_sums(logits, batch["label"], class_weights,
                                       label_smoothing=label_smoothing)
        total_weight = jax.lax.psum(sums["weight"], axis_name)
        return sums["weighted_ce"] / total_weight, (updates, sums)

    grads, (updates, sums) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.psum(grads, axis_name)
    param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
        # BatchNorm syncs its statistics over the axis; pmean keeps replicas bit-identical.
        batch_stats=jax.lax.pmean(updates.get("batch_stats", state.batch_stats), axis_name),
        opt_state=opt_state)
    metrics = jax.lax.psum(sums, axis_name)
    metrics["grad_norm"] = optax.global_norm(grads)
    return new_state, metrics


def eval_step(variables: dict, batch: dict, modality_mask, *, apply_fn, class_weights,
              num_classes: int, axis_name: str = AXIS_NAME):
    """Evaluates this device's rows; padding rows (mask False) count for nothing.

    Args:
      variables: {"params", "batch_stats"} (replicated).
      batch: image, input_ids, attention_mask, label, mask.
      modality_mask: None or [n_modalities] bool; False masks a tower for every row.
      apply_fn: the model's apply.
      class_weights: [K] weights for the weighted loss.
      num_classes: K.
      axis_name: the pmap axis.

    Returns:
      (sums, confusion, probs): psummed loss sums, the psummed [K, K] confusion matrix
      (rows = true class) and this device's [B, K] class probabilities.
    """
    mask = batch["mask"]
    kwargs = {}
    if modality_mask is not None:
        kwargs["modality_mask"] = jnp.broadcast_to(modality_mask, (mask.shape[0],) +
                                                   modality_mask.shape)
    logits = apply_fn(variables, *_inputs(batch), train=False, **kwargs)
    sums = losses.weighted_ce_sums(logits, batch["label"], class_weights, mask=mask)
    preds = jnp.argmax(logits, -1)
    onehot_true = jax.nn.one_hot(batch["label"], num_classes) * mask[:, None]
    confusion = onehot_true.T @ jax.nn.one_hot(preds, num_classes)
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    return jax.lax.psum(sums, axis_name), jax.lax.psum(confusion, axis_name), probs
