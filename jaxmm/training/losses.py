"""Class-weighted cross-entropy as exact (sum, weight) pairs, and class weights from counts.

The loss of a global batch is sum_i w[y_i] * CE_i / sum_i w[y_i]. Devices hold parts of the batch,
so the step psums the numerator and the denominator separately; a mean of per-device means would
be wrong whenever the classes are spread unevenly over the devices.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmm.errors import ConfigError


def balanced_class_weights(counts: Sequence[int]) -> np.ndarray:
    """Inverse-frequency weights N / (K * n_k), as scikit-learn's "balanced".

    Args:
      counts: number of training examples of each class, in class order.

    Returns:
      float32 array of K weights.

    Raises:
      ValueError: if a class has no training example.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if np.any(counts <= 0):
        raise ConfigError(f"class_weights='balanced' needs every class in Train; counts: {counts}")
    return (counts.sum() / (len(counts) * counts)).astype(np.float32)


def parse_class_weights(spec) -> str | tuple[float, ...]:
    """The ``class_weights`` entry as 'balanced', 'none' or a tuple of numbers.

    A list comes from a config file as a sequence and from the command line as a string:
    ``--config.class_weights=1.2,0.6,1.3,1.5`` (brackets and spaces allowed).

    Raises:
      ConfigError: anything else, or numbers that are not all positive.
    """
    if isinstance(spec, str) and spec in ("balanced", "none", ""):
        return spec or "none"
    items = spec.strip().strip("[]()").replace(",", " ").split() if isinstance(spec, str) \
        else list(spec)
    try:
        weights = tuple(float(x) for x in items)
    except (TypeError, ValueError):
        weights = ()
    if not weights or not all(w > 0 and np.isfinite(w) for w in weights):
        raise ConfigError("config.class_weights: expected 'balanced', 'none' or positive numbers "
                          f"(one per class, e.g. 1.2,0.6,1.3,1.5); got {spec!r}")
    return weights


def resolve_class_weights(spec, class_names: Sequence[str],
                          train_counts: Mapping[str, int]) -> np.ndarray:
    """Turns the ``class_weights`` config entry into one weight per class.

    Args:
      spec: "balanced", "none" (all ones) or K numbers in class order (a sequence, or a
        string of comma-separated numbers as given on the command line).
      class_names: the class names, in label order.
      train_counts: examples per class name in the Train split.

    Returns:
      float32 array of K weights.
    """
    num_classes = len(class_names)
    spec = parse_class_weights(spec)
    if spec == "balanced":
        return balanced_class_weights([train_counts.get(n, 0) for n in class_names])
    if spec == "none":
        return np.ones(num_classes, np.float32)
    weights = np.asarray(spec, dtype=np.float32)
    if weights.shape != (num_classes,):
        raise ConfigError(f"config.class_weights: need {num_classes} positive numbers "
                          f"(one per class of {list(class_names)}); got {list(spec)}")
    return weights


def weighted_ce_sums(logits: jax.Array, labels: jax.Array, class_weights: jax.Array,
                     mask: jax.Array | None = None, label_smoothing: float = 0.0) -> dict:
    """Per-batch sums from which exact global losses are formed.

    Args:
      logits: [B, K] float logits.
      labels: [B] integer labels.
      class_weights: [K] weight of each class.
      mask: optional [B] bool; False rows (padding) contribute nothing.
      label_smoothing: smoothing of the one-hot targets.

    Returns:
      dict of scalars: ``weighted_ce`` (sum w*CE), ``weight`` (sum w), ``ce`` (sum CE),
      ``count`` (number of rows), ``correct`` (number of correct argmax predictions).
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    if label_smoothing > 0:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        ce = optax.softmax_cross_entropy(logits, targets)
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    valid = jnp.ones_like(ce) if mask is None else mask.astype(jnp.float32)
    w = jnp.asarray(class_weights, jnp.float32)[labels] * valid
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
    return {
        "weighted_ce": jnp.sum(w * ce),
        "weight": jnp.sum(w),
        "ce": jnp.sum(ce * valid),
        "count": jnp.sum(valid),
        "correct": jnp.sum(correct),
    }
