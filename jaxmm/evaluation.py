"""Exact evaluation of a split: padded, masked batches through a pmapped eval step.

Shared by the training loop (validation after every epoch) and ``jaxmm.evaluate``.
"""

import functools

import jax
import numpy as np

from jaxmm import metrics as metrics_lib
from jaxmm import parallel, steps


def make_eval_fn(apply_fn, class_weights: np.ndarray, num_classes: int):
    """The pmapped eval step with its constants bound.

    Returns:
      fn(replicated_variables, device_batch, modality_mask) -> (sums, confusion, probs).
    """
    step = functools.partial(steps.eval_step, apply_fn=apply_fn,
                             class_weights=np.asarray(class_weights, np.float32),
                             num_classes=num_classes)
    return jax.pmap(step, axis_name=parallel.AXIS_NAME, in_axes=(0, 0, None))


def evaluate_split(eval_fn, variables, batches, class_names, modality_mask=None,
                   collect: bool = False) -> tuple[dict, dict | None]:
    """Runs ``eval_fn`` over every batch of a split.

    Args:
      eval_fn: from ``make_eval_fn``.
      variables: replicated {"params", "batch_stats"}.
      batches: iterable of host batches with a ``mask`` (and ``index`` when collecting).
      class_names: class names in label order.
      modality_mask: None, or a bool array with one entry per model modality.
      collect: also return this process's per-example probabilities.

    Returns:
      (metrics, predictions): metrics from the psummed confusion matrix and losses; predictions
      is {"index": [n], "probs": [n, K]} for this process's real (unpadded) rows, or None.
    """
    mask = None if modality_mask is None else np.asarray(modality_mask, bool)
    sums_total, confusion_total = None, None
    indices, probs_all = [], []
    for host_batch in batches:
        device_batch = parallel.shard(host_batch)
        sums, confusion, probs = eval_fn(variables, device_batch, mask)
        # Accumulate on the device; values are fetched once at the end.
        sums, confusion = parallel.first(sums), parallel.first(confusion)
        if sums_total is None:
            sums_total = sums
        else:
            sums_total = jax.tree.map(lambda a, b: a + b, sums_total, sums)
        confusion_total = confusion if confusion_total is None else confusion_total + confusion
        if collect:
            keep = np.asarray(host_batch["mask"], bool)
            indices.append(np.asarray(host_batch["index"])[keep])
            probs_all.append(np.asarray(probs).reshape(len(keep), -1)[keep])
    if sums_total is None:
        raise ValueError("evaluation got no batches: is the split empty?")
    sums_total = jax.tree.map(np.asarray, jax.device_get(sums_total))
    result = metrics_lib.from_confusion(np.asarray(confusion_total), class_names)
    result.update(metrics_lib.loss_metrics(sums_total))
    predictions = None
    if collect:
        predictions = {"index": np.concatenate(indices), "probs": np.concatenate(probs_all)}
    return result, predictions
