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

from jaxmm.models.per_example import threefry_key
from jaxmm.training import losses
from jaxmm.training.parallel import AXIS_NAME

# How the dropout keys of a step are drawn (config.rng_scheme): "per_example" (each example's
# masks from its index in the global batch: the same run on any device count) or "per_device"
# (one key per device, as runs before per-example keys did; kept to resume those exactly).
RNG_SCHEMES = ("per_example", "per_device")


class TrainState(struct.PyTreeNode):
    """What a training run carries from step to step (and checkpoints).

    ``ema_params`` is None unless the run keeps an exponential moving average of the weights.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    ema_params: Any = None

    @classmethod
    def create(cls, *, apply_fn, params, batch_stats, tx, ema: bool = False):
        """A step-0 state; ``ema=True`` starts the weight average at ``params``."""
        # A copy, not an alias: the state is donated to the step, and a donated buffer may
        # appear only once.
        ema_params = jax.tree.map(jnp.copy, params) if ema else None
        return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                   opt_state=tx.init(params), apply_fn=apply_fn, tx=tx, ema_params=ema_params)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def eval_variables(self) -> dict:
        """The weights validation and the best checkpoint use: the EMA ones when kept."""
        params = self.params if self.ema_params is None else self.ema_params
        return {"params": params, "batch_stats": self.batch_stats}


def _inputs(batch):
    return batch["image"], batch["input_ids"], batch["attention_mask"]


def _micro_batches(batch: dict, accumulate_steps: int) -> dict:
    """[R, ...] rows -> [A, R / A, ...]: micro-batch m holds rows m*R/A ... (m+1)*R/A - 1."""
    rows = batch["label"].shape[0]
    if rows % accumulate_steps:
        raise ValueError(f"{rows} rows per device do not split into {accumulate_steps} "
                         "micro-batches")
    return jax.tree.map(lambda x: x.reshape((accumulate_steps, rows // accumulate_steps)
                                            + x.shape[1:]), batch)


def _grads_and_sums(state: TrainState, batch: dict, key, total_weight, *, class_weights,
                    label_smoothing: float, accumulate_steps: int, per_example: bool):
    """Gradient of sum(w * CE) / total_weight over this device's rows, one micro-batch at a time.

    Each micro-batch contributes its numerator over the SAME denominator (the weight of the
    whole effective batch), so the sum of the contributions is exactly the full-batch loss and
    gradient, not a mean of per-micro-batch means. BatchNorm statistics are chained through the
    micro-batches as sequential steps would. With ``per_example`` every micro-batch gets the
    same key and each row's masks come from its ``example_id``, so they do not depend on A.
    """
    def one(batch_stats, micro, micro_key):
        kwargs = {"example_ids": micro["example_id"]} if per_example else {}

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": batch_stats}, *_inputs(micro), train=True,
                rngs={"dropout": micro_key}, mutable=["batch_stats"], **kwargs)
            sums = losses.weighted_ce_sums(logits, micro["label"], class_weights,
                                           label_smoothing=label_smoothing)
            return sums["weighted_ce"] / total_weight, (updates, sums)

        grads, (updates, sums) = jax.grad(loss_fn, has_aux=True)(state.params)
        return grads, updates.get("batch_stats", batch_stats), sums

    if accumulate_steps == 1:  # The plain step, with the dropout key of earlier versions.
        return one(state.batch_stats, batch, key)

    def body(carry, xs):
        grads_acc, batch_stats, sums_acc = carry
        index, micro = xs
        micro_key = key if per_example else jax.random.fold_in(key, index)
        grads, batch_stats, sums = one(batch_stats, micro, micro_key)
        return (jax.tree.map(jnp.add, grads_acc, grads), batch_stats,
                jax.tree.map(jnp.add, sums_acc, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero_sums = {k: jnp.zeros((), jnp.float32)
                 for k in ("weighted_ce", "weight", "ce", "count", "correct")}
    micro = _micro_batches(batch, accumulate_steps)
    (grads, batch_stats, sums), _ = jax.lax.scan(
        body, (zeros, state.batch_stats, zero_sums), (jnp.arange(accumulate_steps), micro))
    return grads, batch_stats, sums


def dropout_key_and_ids(root_key: jax.Array, step: jax.Array, rows: int, rng_scheme: str,
                        axis_name: str = AXIS_NAME) -> tuple[jax.Array, jax.Array]:
    """The step's dropout key and each local row's index in the global batch.

    Device d holds rows [d * rows, (d + 1) * rows) of the global batch (``parallel.shard`` on
    each process, processes in order: ``data.pipeline.ProcessBlock``), so
    ``axis_index * rows + local row`` is the row's global index whatever the layout.

    Returns:
      "per_example": a threefry key of (root_key, step), the same on every device, and int32
      [rows] global row indices. "per_device": fold_in(fold_in(root_key, step), device) and
      the same indices (unused by the model).
    """
    device = jax.lax.axis_index(axis_name)
    ids = device * rows + jnp.arange(rows, dtype=jnp.int32)
    step_key = jax.random.fold_in(root_key, step)
    if rng_scheme == "per_example":
        return threefry_key(step_key), ids
    if rng_scheme == "per_device":
        return jax.random.fold_in(step_key, device), ids
    raise ValueError(f"rng_scheme={rng_scheme!r}: choose one of {RNG_SCHEMES}")


def train_step(state: TrainState, batch: dict, root_key: jax.Array, *, class_weights,
               label_smoothing: float = 0.0, accumulate_steps: int = 1,
               ema_decay: float = 0.0, rng_scheme: str = "per_example",
               axis_name: str = AXIS_NAME):
    """One optimizer step on this device's part of the global (effective) batch.

    The device computes sum(w * CE) / W over its rows, where W is the psummed weight of the whole
    global batch; the psum of these terms (and of their gradients) is the exact global loss.
    With ``accumulate_steps`` = A > 1 the device's rows are processed as A sequential
    micro-batches (A times less activation memory) and the result is the same loss over all rows.

    Args:
      state: the replicated train state (donated by the caller).
      batch: this device's rows: image, input_ids, attention_mask, label.
      root_key: the run's root PRNG key; the step is folded in, then each example's index in
        the global batch ("per_example") or the device index ("per_device"), so dropout is a
        pure function of (seed, step, example) or (seed, step, device) and a resumed run
        repeats it exactly.
      class_weights: [K] weights of the classes.
      label_smoothing: smoothing of the one-hot targets.
      accumulate_steps: micro-batches per optimizer step; must divide the rows per device.
      ema_decay: > 0 updates ``state.ema_params`` (which must exist) after the optimizer step:
        ema = decay * ema + (1 - decay) * params.
      rng_scheme: "per_example" (the model must take ``example_ids``) or "per_device"; see
        ``RNG_SCHEMES``.
      axis_name: the pmap axis.

    Returns:
      (new_state, metrics) where metrics are psummed sums (see ``losses.weighted_ce_sums``).
    """
    if ema_decay and state.ema_params is None:
        raise ValueError("ema_decay > 0 needs a state created with ema=True")
    key, ids = dropout_key_and_ids(root_key, state.step, batch["label"].shape[0], rng_scheme,
                                   axis_name)
    batch = {**batch, "example_id": ids}
    # The denominator depends on the labels only: known before any forward pass.
    local_weight = jnp.sum(jnp.asarray(class_weights, jnp.float32)[batch["label"]])
    total_weight = jax.lax.psum(local_weight, axis_name)
    grads, batch_stats, sums = _grads_and_sums(
        state, batch, key, total_weight, class_weights=class_weights,
        label_smoothing=label_smoothing, accumulate_steps=accumulate_steps,
        per_example=rng_scheme == "per_example")
    grads = jax.lax.psum(grads, axis_name)
    param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    ema_params = state.ema_params
    if ema_decay:
        ema_params = optax.incremental_update(params, ema_params, 1.0 - ema_decay)
    new_state = state.replace(
        step=state.step + 1, params=params, ema_params=ema_params,
        # One pmean per step (XLA combines its tensors into one all-reduce on GPUs): identical
        # running averages on every replica, whether the layers shared their statistics
        # (config.batchnorm_sync) or not. The state leaves pmap unmapped (out_axes=None),
        # which pmap takes on trust: everything in it must be equal on every device.
        batch_stats=jax.lax.pmean(batch_stats, axis_name), opt_state=opt_state)
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
