"""Exact evaluation of a split: padded, masked batches through a pmapped eval step.

Shared by the training loop (validation after every epoch) and ``jaxmm.evaluate``. Every
example counts exactly once on any number of devices and processes: the last batch is padded
and the padding masked, and the metrics come from psummed counts and sums.
"""

import functools

import jax
import numpy as np

from jaxmm import files
from jaxmm.data import pipeline
from jaxmm.errors import ConfigError
from jaxmm.evaluation import metrics as metrics_lib
from jaxmm.evaluation.metrics import prediction_row
from jaxmm.training import parallel, steps


def make_eval_fn(apply_fn, class_weights: np.ndarray, num_classes: int):
    """The pmapped eval step with its constants bound.

    Returns:
      fn(variables, device_batch, modality_mask) -> (sums, confusion, probs); the variables
      are device arrays (``parallel.put_replicated``), sums and confusion are unmapped.
    """
    step = functools.partial(steps.eval_step, apply_fn=apply_fn,
                             class_weights=np.asarray(class_weights, np.float32),
                             num_classes=num_classes)
    return parallel.pmap_eval_step(step)


def evaluate_split(eval_fn, variables, batches, class_names, modality_mask=None,
                   collect: bool = False) -> tuple[dict, dict | None]:
    """Runs ``eval_fn`` over every batch of a split.

    Args:
      eval_fn: from ``make_eval_fn``.
      variables: {"params", "batch_stats"} on the devices (``parallel.put_replicated``).
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


def selected_modalities(model_modalities: tuple, modalities) -> tuple:
    """The requested towers in the model's order (None or empty = all of them)."""
    want = tuple(modalities or model_modalities)
    if set(want) - set(model_modalities):
        raise ConfigError(f"modalities {','.join(want)} are not a subset of the model's "
                          f"{','.join(model_modalities)}")
    return tuple(m for m in model_modalities if m in want)


def modality_mask(model_modalities: tuple, modalities) -> np.ndarray | None:
    """The eval-time tower mask for a subset of the model's modalities (None = all towers)."""
    want = selected_modalities(model_modalities, modalities)
    return None if want == tuple(model_modalities) else np.array(
        [m in want for m in model_modalities])


class SplitEvaluator:
    """Evaluates one split, every example exactly once, on all devices and processes.

    Training's validation after every epoch and ``jaxmm.evaluate`` both use it, with the same
    batch rule: the run's ``eval_batch_size``, rounded up so any device count splits it evenly.

    Args:
      config: the run's config (eval_batch_size, image_size, max_text_length).
      model: the flax model (BatchNorm axis ``parallel.AXIS_NAME``).
      class_names: class names in label order.
      class_weights: [K] weights of the weighted loss.
      tokenizer: the run's tokenizer.
      source: the split's record source (``pipeline.load_splits``).
      split: the split's name (for messages and reports).
    """

    def __init__(self, config, model, class_names, class_weights, tokenizer, source,
                 split: str):
        self.config, self.model, self.split, self.source = config, model, split, source
        self.class_names, self.class_weights = list(class_names), class_weights
        self.tokenizer = tokenizer
        self.local_batch = parallel.local_batch_size(config.eval_batch_size, "eval_batch_size",
                                                     round_up=True)
        self._fn = make_eval_fn(model.apply, class_weights, len(self.class_names))

    @property
    def modalities(self) -> tuple:
        return tuple(self.model.modalities)

    def _batches(self):
        return pipeline.make_eval_iter(
            self.config, self.source, self.tokenizer, local_batch_size=self.local_batch,
            process_index=jax.process_index(), process_count=jax.process_count())

    def __call__(self, variables, modalities=None, collect: bool = False
                 ) -> tuple[dict, dict | None]:
        """Metrics (exact, from psummed counts) and, when collecting, every example's probs.

        Args:
          variables: {"params", "batch_stats"} on the devices (``parallel.put_replicated``).
          modalities: towers to keep (None = all of the model's).
          collect: also gather every example's probabilities.

        Returns:
          (metrics, predictions): predictions is {"index": [N], "probs": [N, K]} sorted by
          index and identical on every process, or None.
        """
        mask = modality_mask(self.modalities, modalities)
        metrics, local = evaluate_split(self._fn, variables, self._batches(), self.class_names,
                                        mask, collect)
        if not collect:
            return metrics, None
        capacity = self.local_batch * pipeline.num_eval_batches(
            len(self.source), self.local_batch, jax.process_count())
        return metrics, gather_predictions(local, capacity, len(self.source))

    def labels(self, index) -> np.ndarray:
        """The true classes of the records ``index``."""
        return np.array([int(self.source[int(i)]["label"]) for i in index], np.int64)


def gather_predictions(local: dict, capacity: int, num_examples: int) -> dict:
    """Joins the per-process predictions (a collective: every process calls it).

    Args:
      local: {"index": [n], "probs": [n, K]} of this process's real rows.
      capacity: rows a process can hold (its eval batches times the local batch); equal on all
        processes, so the padded arrays have one shape for the all-gather.
      num_examples: the split size; every index must appear exactly once.

    Returns:
      {"index": [N], "probs": [N, K]} sorted by index.
    """
    index, probs = np.asarray(local["index"]), np.asarray(local["probs"], np.float32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        pad = capacity - len(index)
        index = np.pad(index.astype(np.int32), (0, pad), constant_values=-1)
        probs = np.pad(probs, ((0, pad), (0, 0)))
        index = np.asarray(multihost_utils.process_allgather(index)).reshape(-1)
        probs = np.asarray(multihost_utils.process_allgather(probs)).reshape(len(index), -1)
        keep = index >= 0
        index, probs = index[keep], probs[keep]
    order = np.argsort(index, kind="stable")
    index, probs = index[order], probs[order]
    if not np.array_equal(index, np.arange(num_examples)):
        raise RuntimeError(f"evaluation saw {len(index)} rows ({len(np.unique(index))} distinct) "
                           f"for a split of {num_examples} examples")
    return {"index": index, "probs": probs}


def subset_metrics(source, predictions: dict, class_names: list, class_weights,
                   keep) -> dict:
    """Metrics of the examples with ``keep`` True, from the gathered predictions (host side).

    Counts are exact; the losses come from the float32 probabilities, so they match the
    device's to about 1e-6.

    Args:
      source: the split's record source (for the labels).
      predictions: {"index": [N], "probs": [N, K]} from ``SplitEvaluator(collect=True)``.
      class_names: class names in label order.
      class_weights: [K] weights of the weighted loss.
      keep: [N] bools, aligned with predictions["index"].
    """
    keep = np.asarray(keep, bool)
    k = len(class_names)
    labels = np.array([int(source[int(i)]["label"]) for i in predictions["index"][keep]],
                      np.int64)
    probs = np.asarray(predictions["probs"], np.float64)[keep]
    confusion = np.bincount(labels * k + probs.argmax(1), minlength=k * k).reshape(k, k)
    result = metrics_lib.from_confusion(confusion, class_names)
    ce = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-30, None))
    w = np.asarray(class_weights, np.float64)[labels]
    result.update(metrics_lib.loss_metrics({"weighted_ce": (w * ce).sum(), "weight": w.sum(),
                                            "ce": ce.sum(), "count": len(labels)}))
    return result


def example_rows(source, predictions: dict, class_names: list) -> list[dict]:
    """One row per example: file, text, true and predicted class, confidence, probabilities."""
    rows = []
    for i, p in zip(predictions["index"], predictions["probs"], strict=True):
        record = source[int(i)]
        rows.append(prediction_row(
            p, class_names, index=int(i), file=files.text(record["file_name"]),
            text=files.text(record["text"]), true=class_names[int(record["label"])]))
    return rows
