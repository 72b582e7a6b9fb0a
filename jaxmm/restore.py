"""A trained run rebuilt from its workdir for ``jaxmm.evaluate``, ``jaxmm.predict`` and export.

A workdir holds ``config.json`` (the run record written by the training loop: config, class
names, class weights, preprocessing), the tokenizer the run trained with and orbax checkpoints.
From these alone the model and its inference variables are rebuilt, in a fresh process, on any
device count and on every process of a multi-process job; no dataset is needed to predict.
Nothing here prepares data, generates data or trains a tokenizer: evaluating a split needs the
run's prepared dataset where its config says, and a missing one is an error naming that path.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxmm import builders, checkpointing, paths
from jaxmm.data import pipeline, prepared
from jaxmm.data import tokenizer as tokenizer_lib
from jaxmm.errors import ConfigError, WorkdirError


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
            raise WorkdirError(f"{dataset_dir} has classes {found}, the run was trained on "
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
      WorkdirError: the workdir or its config.json does not exist.
    """
    if not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir} does not exist")
    path = paths.in_workdir(workdir, paths.CONFIG_FILE)
    if not os.path.isfile(path):
        raise WorkdirError(f"{path} not found: is {workdir} a training workdir?")
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return ml_collections.ConfigDict(_tuples(record["config"])), record


def _check_checkpoint(which: str) -> str:
    if which in ("best", "latest") or str(which).isdigit():
        return str(which)
    raise ConfigError(f"--checkpoint must be 'best', 'latest' or a step number, got {which!r}")


def dataset_dir_of(config: ml_collections.ConfigDict) -> str:
    """The prepared dataset of a run, where prepare wrote it for the run's config.

    It is never prepared or generated here: inference writes nothing outside the workdir (and
    predict's --out), wherever the run's config.json points.

    Raises:
      WorkdirError: no prepared dataset there; the message names the path and the command.
    """
    out_dir = prepared.prepared_dir(config)
    recorded = paths.dataset_path(out_dir)
    if os.path.isfile(os.path.join(recorded, paths.META_FILE)):
        return recorded
    command = (f"python -m jaxmm.prepare --data_dir {config.data_dir} --out_dir {out_dir} "
               f"--stored_image_size {config.stored_image_size} --text_source "
               f"{config.text_source}")
    if config.class_names:
        command += f" --class_names {','.join(config.class_names)}"
    raise WorkdirError(f"no prepared dataset at {recorded} (where the run's config.json points);"
                       f" evaluation never prepares data: run `{command}` first")


def _check_variables(model, config, variables: dict) -> None:
    """Fails clearly when the checkpoint does not fit the model built from config.json."""
    expected = builders.abstract_variables(config, model)
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(np.shape(x))
                           for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    want, got = shapes(expected), shapes(variables)
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise WorkdirError(f"the checkpoint does not match the model of config.json (first "
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
    name = config.tokenizer or os.path.join(dataset_dir, tokenizer_lib.TOKENIZER_SUBDIR)
    return (tokenizer_lib.load_tokenizer(name),  # never trains one
            builders.preprocessing(config, pipeline.dataset_meta(dataset_dir)))
