"""Warm start: a new run begins from another run's weights and BatchNorm statistics.

``config.init_from = "WORKDIR[:best|latest|STEP]"`` (default ``best``). Only the model variables
are taken: the new run has a fresh optimizer, starts at step 0 and draws its own data order. The
source must have the same class list and the same architecture; otherwise one line says what
differs.
"""

import os

import jax
import numpy as np

from jaxmm import checkpointing, files, paths
from jaxmm.errors import ConfigError, WorkdirError

# Model entries that change the parameters' structure or shapes.
_ARCH_KEYS = ("modalities", "image_arch", "text_arch", "fusion", "proj_dim", "hidden_dim")
_TEXT_KEYS = ("tokenizer", "tokenizer_vocab_size", "max_text_length")


def parse_spec(spec: str) -> tuple[str, str]:
    """``"runs/a:best"`` -> ("runs/a", "best"); without a suffix the checkpoint is "best"."""
    workdir, sep, which = spec.rpartition(":")
    if sep and (which in ("best", "latest") or which.isdigit()):
        return workdir, which
    return spec, "best"


def _paths_and_shapes(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.shape(x) for p, x in flat}


def _config_differences(source: dict, config) -> list[str]:
    model = source.get("model") or {}
    out = [f"model.{k}: {_norm(model.get(k))!r} vs {_norm(config.model.get(k))!r}"
           for k in _ARCH_KEYS if k in model and _norm(model.get(k)) != _norm(config.model.get(k))]
    out += [f"{k}: {source.get(k)!r} vs {config.get(k)!r}" for k in _TEXT_KEYS
            if k in source and source.get(k) != config.get(k)]
    return out


def _norm(value):
    return tuple(value) if isinstance(value, list) else value


def check_compatible(spec: str, loaded: dict, template: dict, source_config: dict,
                     config) -> None:
    """Raises a one-line ConfigError when ``loaded`` does not fit ``template`` exactly."""
    have, want = _paths_and_shapes(loaded), _paths_and_shapes(template)
    missing = [p for p in want if p not in have]
    extra = [p for p in have if p not in want]
    shapes = [f"{p} {have[p]} vs {want[p]}" for p in want if p in have and have[p] != want[p]]
    if not (missing or extra or shapes):
        return
    hints = _config_differences(source_config, config)
    detail = (f"{len(missing)} parameter(s) missing (e.g. {missing[0]})" if missing else
              f"{len(extra)} unexpected parameter(s) (e.g. {extra[0]})" if extra else
              f"{len(shapes)} shape(s) differ (e.g. {shapes[0]})")
    raise ConfigError(f"init_from {spec}: the architecture differs from this run's: "
                     + "; ".join(hints + [detail]))


def load(spec: str, config, class_names, template: dict) -> tuple[dict, int]:
    """Model variables of the source run, checked against this run.

    Args:
      spec: ``WORKDIR[:best|latest|STEP]``.
      config: this run's config.
      class_names: this run's class list, in label order.
      template: this run's freshly initialised {"params", "batch_stats"}.

    Returns:
      ({"params", "batch_stats"} as NumPy arrays, the source checkpoint's step).
    """
    workdir, which = parse_spec(spec)
    record = files.read_json(os.path.join(workdir, paths.CONFIG_FILE))
    if not isinstance(record, dict):
        raise WorkdirError(f"init_from {spec}: {workdir} has no readable {paths.CONFIG_FILE}; "
                         "is it a training workdir?")
    source_classes = list(record.get("class_names") or [])
    if source_classes != list(class_names):
        only_here = sorted(set(class_names) - set(source_classes))
        only_there = sorted(set(source_classes) - set(class_names))
        what = (f"only here {only_here}, only there {only_there}" if only_here or only_there
                else "same classes in another order")
        raise ConfigError(f"init_from {spec}: the class list differs ({what}): "
                         f"{source_classes} vs {list(class_names)}")
    variables, step = checkpointing.restore_model(workdir, which)
    loaded = {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}}
    template = {"params": template["params"], "batch_stats": template.get("batch_stats") or {}}
    check_compatible(spec, loaded, template, record.get("config") or {}, config)
    # The template's dtypes: a source saved in another precision still trains as configured.
    loaded = jax.tree.map(lambda x, t: np.asarray(x, dtype=np.asarray(t).dtype), loaded,
                          template)
    return loaded, step
