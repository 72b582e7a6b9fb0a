"""Warm start: a new run begins from another run's weights and BatchNorm statistics.

``config.init_from = "WORKDIR[:best|latest|STEP]"`` (default ``best``). Only the model variables
are taken: the new run has a fresh optimizer, starts at step 0 and draws its own data order. The
source must have the same class list and the same architecture; otherwise one line says what
differs.
"""

import jax
import numpy as np

from jaxmm import paths
from jaxmm.errors import ConfigError, WorkdirError
from jaxmm.trained.workdir import Workdir, model_architecture, shapes_of
from jaxmm.training import checkpointing


def parse_spec(spec: str) -> tuple[str, str]:
    """``"runs/a:best"`` -> ("runs/a", "best"); without a suffix the checkpoint is "best"."""
    workdir, sep, which = spec.rpartition(":")
    if sep and (which in ("best", "latest") or which.isdigit()):
        return workdir, which
    return spec, "best"


def _architecture_differences(source: dict, here: dict) -> list[str]:
    """"model.<field>: old vs new" for every architecture field that differs (for the text
    tower's config, the fields inside it)."""
    out = []
    for key in sorted(set(source) | set(here)):
        old, new = source.get(key), here.get(key)
        if key == "text_config" and isinstance(old, dict) and isinstance(new, dict):
            out += [f"model.text_config.{k}: {old.get(k)!r} vs {new.get(k)!r}"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
                    and k not in ("_name_or_path", "transformers_version")]
        elif old != new:
            out.append(f"model.{key}: {old!r} vs {new!r}")
    return out


def check_compatible(spec: str, loaded: dict, template: dict, source_arch: dict | None,
                     here_arch: dict) -> None:
    """Raises a one-line ConfigError when ``loaded`` does not fit ``template``'s structure and
    shapes (dtypes may differ: the template's are applied)."""
    have = {p: s for p, (s, _) in shapes_of(loaded).items()}
    want = {p: s for p, (s, _) in shapes_of(template).items()}
    missing = [p for p in want if p not in have]
    extra = [p for p in have if p not in want]
    shapes = [f"{p} {have[p]} vs {want[p]}" for p in want if p in have and have[p] != want[p]]
    if not (missing or extra or shapes):
        return
    hints = _architecture_differences(source_arch or {}, here_arch)
    detail = (f"{len(missing)} parameter(s) missing (e.g. {missing[0]})" if missing else
              f"{len(extra)} unexpected parameter(s) (e.g. {extra[0]})" if extra else
              f"{len(shapes)} shape(s) differ (e.g. {shapes[0]})")
    raise ConfigError(f"init_from {spec}: the architecture differs from this run's: "
                      + "; ".join(hints + [detail]))


def load(spec: str, model, config, class_names, template: dict) -> tuple[dict, int]:
    """Model variables of the source run, checked against this run.

    Args:
      spec: ``WORKDIR[:best|latest|STEP]``.
      model: this run's model.
      config: this run's config.
      class_names: this run's class list, in label order.
      template: this run's variables {"params", "batch_stats"} (shapes and dtypes).

    Returns:
      ({"params", "batch_stats"} as NumPy arrays, the source checkpoint's step).
    """
    workdir, which = parse_spec(spec)
    # Any format: the class list and, when recorded, the architecture (for the hints).
    record = Workdir(workdir).stored_record()
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
    source_arch = (record.get("model") or {}).get("architecture")
    check_compatible(spec, loaded, template, source_arch,
                     model_architecture(model, config))
    # The template's dtypes: a source saved in another precision still trains as configured.
    loaded = jax.tree.map(lambda x, t: np.asarray(x, dtype=np.asarray(t).dtype), loaded,
                          template)
    return loaded, step
