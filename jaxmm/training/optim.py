"""The optimizer: AdamW with per-tower learning rates, warm-up + cosine decay, no weight decay on
biases and norm scales, global-norm clipping, and frozen towers that never move."""

import jax
import ml_collections
import optax

_TOWERS = ("image", "text", "head")


def _schedule(peak: float, warmup_steps: int, total_steps: int, final_fraction: float):
    warmup_steps = max(min(warmup_steps, total_steps - 1), 0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else peak, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, 1), end_value=peak * final_fraction)


def _decay_mask(params):
    # Kernels and embeddings decay; biases, LayerNorm/BatchNorm scales (1-D leaves) do not.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def schedules(config: ml_collections.ConfigDict, total_steps: int,
              steps_per_epoch: int) -> dict:
    """The learning-rate schedule of each tower: warm-up to its peak, then cosine decay.

    Args:
      config: the full config (reads ``optim``).
      total_steps: number of train steps of the whole run (for the cosine decay).
      steps_per_epoch: train steps per epoch (for the warm-up length).

    Returns:
      {"image" | "text" | "head": optax schedule}.
    """
    o = config.optim
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    peaks = {"image": o.lr_image, "text": o.lr_text, "head": o.lr_head}
    return {t: _schedule(peaks[t], warmup, total_steps, o.final_lr_fraction) for t in _TOWERS}


def make_optimizer(config: ml_collections.ConfigDict, labels, total_steps: int,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """Builds the optimizer for a parameter tree whose leaves are labelled by tower.

    Args:
      config: the full config (reads ``optim`` and ``model.freeze_*``).
      labels: pytree like the params with "image" | "text" | "head" leaves.
      total_steps: number of train steps of the whole run (for the cosine decay).
      steps_per_epoch: train steps per epoch (for the warm-up length).

    Returns:
      An optax transformation; frozen towers get exactly zero updates.
    """
    o = config.optim
    frozen = {"image": config.model.freeze_image, "text": config.model.freeze_text, "head": False}
    rates = schedules(config, total_steps, steps_per_epoch)
    inner = {t: optax.set_to_zero() if frozen[t] else
             optax.adamw(rates[t], weight_decay=o.weight_decay, mask=_decay_mask)
             for t in _TOWERS}
    # Zero frozen gradients before clipping so they do not shrink the trainable ones.
    keep = {t: optax.set_to_zero() if frozen[t] else optax.identity() for t in _TOWERS}
    chain = [optax.multi_transform(keep, labels)]
    if o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
    chain.append(optax.multi_transform(inner, labels))
    return optax.chain(*chain)


def learning_rates(config: ml_collections.ConfigDict, step: int, total_steps: int,
                   steps_per_epoch: int) -> dict:
    """The learning rate of each tower at ``step`` (for logging)."""
    return {f"lr_{t}": float(fn(step))
            for t, fn in schedules(config, total_steps, steps_per_epoch).items()}
