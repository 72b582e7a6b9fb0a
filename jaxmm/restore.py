"""A trained run rebuilt from its workdir for ``jaxmm.evaluate``, ``jaxmm.predict`` and export.

A workdir holds ``config.json`` (the run record written by the training loop: config, class
names, class weights, preprocessing), the tokenizer the run trained with and orbax checkpoints.
From these alone the model and its inference variables are rebuilt, in a fresh process, on any
device count and on every process of a multi-process job; no dataset is needed to predict.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxmm import builders, checkpointing, paths, prepare
from jaxmm.data import builder, pipeline
from jaxmm.data import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Run:
    """What inference needs from a training run."""

    workdir: str
    config: ml_collections.ConfigDict
    class_names: list
    class_weights: np.ndarray
    preprocessing: dict  # stored_image_size, image_format, text_source (see builders)
    tokenizer: Any
    model: Any
    variables: dict
    step: int

    @property
    def modalities(self) -> tuple:
        return tuple(self.config.model.modalities)

    @property
    def dataset_dir(self) -> str:
        """The run's prepared dataset (needed only to evaluate a split), checked against the
        run's classes."""
        dataset_dir = dataset_dir_of(self.config)
        found = list(pipeline.dataset_meta(dataset_dir)["class_names"])
        if found != self.class_names:
            raise ValueError(f"{dataset_dir} has classes {found}, the run was trained on "
                             f"{self.class_names}")
        return dataset_dir


def _tuples(value):
    # JSON turned the config's tuples into lists; ConfigDict fields keep their first type.
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """The run's config (as a ConfigDict) and the whole ``config.json`` record.

    Raises:
      FileNotFoundError: the workdir or its config.json does not exist.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    path = paths.in_workdir(workdir, paths.CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return ml_collections.ConfigDict(_tuples(record["config"])), record


def _check_checkpoint(which: str) -> str:
    if which in ("best", "latest") or str(which).isdigit():
        return str(which)
    raise ValueError(f"--checkpoint must be 'best', 'latest' or a step number, got {which!r}")


def dataset_dir_of(config: ml_collections.ConfigDict) -> str:
    """The prepared dataset of a run: where prepare wrote it, else prepared again from raw data.

    Using the recorded location first means evaluation works where only the prepared data (not
    the raw folders) is present, and never rebuilds it behind the run's back.
    """
    recorded = paths.dataset_path(prepare.prepared_dir(config))
    if os.path.isfile(os.path.join(recorded, paths.META_FILE)):
        return recorded
    try:
        return prepare.ensure_prepared(config)
    except builder.PrepareError as e:
        raise FileNotFoundError(f"no prepared dataset at {recorded}, and it cannot be prepared "
                                f"again: {e}") from None


def _check_variables(model, config, variables: dict) -> None:
    """Fails clearly when the checkpoint does not fit the model built from config.json."""
    expected = builders.abstract_variables(config, model)
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(np.shape(x))
                           for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    want, got = shapes(expected), shapes(variables)
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(f"the checkpoint does not match the model of config.json (first "
                         f"differences: {diff})")


def load_run(workdir: str, checkpoint: str = "best", *,
             axis_name: str | None = None) -> Run:
    """Rebuilds a trained run for inference.

    Args:
      workdir: the training workdir.
      checkpoint: "best", "latest" or a step number of a kept training checkpoint.
      axis_name: the model's BatchNorm axis (pmapped evaluation) or None (jit on one device);
        either is exact at inference, where BatchNorm uses its running averages.

    Returns:
      The Run; its variables are NumPy arrays on the host.
    """
    config, record = read_run_config(workdir)
    variables, step = checkpointing.restore_model(workdir, _check_checkpoint(checkpoint))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}}
    class_names = list(record["class_names"])
    tokenizer, preprocessing = _tokenizer_and_preprocessing(workdir, config, record)
    model = builders.make_model(config, len(class_names), len(tokenizer), axis_name)
    _check_variables(model, config, variables)
    return Run(workdir, config, class_names, np.asarray(record["class_weights"], np.float32),
               preprocessing, tokenizer, model, variables, step)


def _tokenizer_and_preprocessing(workdir: str, config, record: dict) -> tuple[Any, dict]:
    # Runs record both; a workdir written before they did falls back to its prepared dataset.
    kept = paths.in_workdir(workdir, paths.TOKENIZER_DIR)
    if os.path.isdir(kept) and "preprocessing" in record:
        return tokenizer_lib.load_tokenizer(kept), dict(record["preprocessing"])
    dataset_dir = dataset_dir_of(config)
    return (tokenizer_lib.get_tokenizer(config, dataset_dir),
            builders.preprocessing(config, pipeline.dataset_meta(dataset_dir)))
