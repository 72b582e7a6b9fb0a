"""The pieces a run is built from, as small public functions.

The training loop, evaluation, export and the benchmarks all build their config checks, data,
tokenizer, model, optimizer, state and class weights with these, so none of them can drift
from training.
"""

import dataclasses
import functools
import logging
import os

import jax
import ml_collections
import numpy as np

from jaxmm import models, paths
from jaxmm.data import exclusions as exclusions_lib
from jaxmm.data import pipeline, prepared, transforms
from jaxmm.data import tokenizer as tokenizer_lib
from jaxmm.errors import ConfigError
from jaxmm.evaluation import calibration, metrics
from jaxmm.experiments import tracking
from jaxmm.trained.model import Preprocessing
from jaxmm.training import checkpointing, losses, optim, parallel, steps, warm_start

# Config keys that must be whole numbers >= 1 (or >= 0), checked before anything runs.
POSITIVE_INTS = ("batch_size", "eval_batch_size", "num_epochs", "checkpoint_every_steps",
                 "log_every_steps", "keep_checkpoints", "max_text_length", "image_size",
                 "stored_image_size", "signal_check_every_steps")
NON_NEGATIVE_INTS = ("patience", "num_workers", "prefetch_batches")


def check_values(config: ml_collections.ConfigDict) -> None:
    """Checks the config values that need no devices and no data; one-line ConfigErrors."""
    if not config.data_dir:
        raise ConfigError("config.data_dir is not set: pass --config.data_dir=/path/to/dataset "
                          "(the folder holding CVPR_2024_dataset_Train, _Val and _Test)")
    for keys, low in ((POSITIVE_INTS, 1), (NON_NEGATIVE_INTS, 0)):
        for key in keys:
            value = config.get(key, low)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"config.{key}={value!r} must be a whole number >= {low}")
    if not config.tokenizer and config.tokenizer_vocab_size <= len(tokenizer_lib.SPECIAL_TOKENS):
        raise ConfigError(f"config.tokenizer_vocab_size={config.tokenizer_vocab_size} leaves no "
                          "room after the special tokens")
    weights = losses.parse_class_weights(config.class_weights)
    if isinstance(weights, tuple) and config.class_names and \
            len(weights) != len(config.class_names):
        raise ConfigError(f"config.class_weights has {len(weights)} numbers for the "
                          f"{len(config.class_names)} classes {list(config.class_names)}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks what can be checked before any data is prepared or any step runs; one-line
    ConfigErrors naming the key."""
    check_values(config)
    parallel.local_batch_size(config.batch_size, "batch_size")
    parallel.local_batch_size(config.eval_batch_size, "eval_batch_size")
    checkpointing.check_keep(config.keep_checkpoints)
    if not isinstance(config.resume_step, int) or config.resume_step < -1:
        raise ConfigError(f"config.resume_step={config.resume_step!r}: a kept step, or -1 for "
                         f"the newest readable one")
    if config.early_stopping_metric not in metrics.EARLY_STOPPING_METRICS:
        raise ConfigError(f"config.early_stopping_metric={config.early_stopping_metric!r}; "
                          f"choose one of {', '.join(metrics.EARLY_STOPPING_METRICS)}")
    accumulate = config.get("accumulate_steps", 1)
    per_device = config.batch_size // jax.device_count()
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1 \
            or per_device % accumulate:
        raise ConfigError(f"config.accumulate_steps={accumulate!r}: must be a whole number >= 1 "
                          f"that divides the {per_device} rows per device of "
                          f"batch_size={config.batch_size} on {jax.device_count()} device(s)")
    models.batchnorm_groups(config.get("batchnorm_sync", "global"), jax.device_count())
    if config.get("rng_scheme", "per_example") not in steps.RNG_SCHEMES:
        raise ConfigError(f"config.rng_scheme={config.rng_scheme!r}: choose one of "
                          f"{', '.join(steps.RNG_SCHEMES)}")
    if not 0.0 <= config.get("ema_decay", 0.0) < 1.0:
        raise ConfigError(f"config.ema_decay={config.ema_decay}: must be in [0, 1) (0 = off)")
    models.check_model_config(config.model)
    if config.model.get("stem", "conv") == "space_to_depth" and config.image_size % 2:
        raise ConfigError(f"config.model.stem='space_to_depth' works on 2x2 pixel blocks: "
                          f"config.image_size={config.image_size} must be even")
    if config.get("init_from"):
        source, _ = warm_start.parse_spec(config.init_from)
        if not os.path.isfile(os.path.join(source, paths.CONFIG_FILE)):
            raise ConfigError(f"config.init_from={config.init_from!r}: {source} is not a "
                              f"training workdir (no {paths.CONFIG_FILE})")
    if config.get("calibration", "trusted") not in calibration.POLICIES:
        raise ConfigError(f"config.calibration={config.calibration!r}: choose one of "
                          f"{', '.join(calibration.POLICIES)}")
    tracking.check_config(config)


@dataclasses.dataclass
class Data:
    """A prepared dataset: its folder, metadata and one TFDS source per split."""

    dataset_dir: str
    meta: dict
    sources: dict
    exclusions: exclusions_lib.Exclusions | None = None  # what config.exclude_file leaves out

    @property
    def class_names(self) -> list:
        return list(self.meta["class_names"])

    @property
    def num_examples(self) -> dict:
        return dict(self.meta["num_examples"])

    @property
    def train_counts(self) -> dict:
        """class -> Train examples the run trains on (what the exclusions keep)."""
        if self.exclusions is not None:
            return dict(self.exclusions.kept_counts)
        return dict(self.meta["counts"]["train"])

    def data_record(self) -> dict:
        """The run record's ``data``: the prepared dataset and the exclusions applied to it."""
        record = prepared.data_record(self.dataset_dir, self.meta)
        if self.exclusions is not None:
            record["exclusions"] = self.exclusions.record()
        return record


def prepared_data(config: ml_collections.ConfigDict, log=None) -> Data:
    """Prepares the configured dataset once (every process may call it) and opens it; with
    ``config.exclude_file``, Train is a view without the listed examples (``exclusions``),
    which ``log`` (default: the project's logger) reports in one line."""
    dataset_dir = prepared.ensure_prepared(config)
    data = Data(dataset_dir, prepared.dataset_meta(dataset_dir),
                pipeline.load_splits(dataset_dir))
    if config.get("exclude_file"):
        data.exclusions = exclusions_lib.load(config.exclude_file, data.sources, data.class_names)
        data.sources["train"] = exclusions_lib.Subset(data.sources["train"],
                                                  data.exclusions.keep_index)
        (log or logging.getLogger("jaxmm").info)(data.exclusions.summary_line())
    return data


def load_tokenizer(config: ml_collections.ConfigDict, dataset_dir: str, wd=None):
    """The run's tokenizer: the workdir's copy when the run has one (a resume), else the
    configured tokenizer or the WordPiece one trained on the dataset's Train texts."""
    if wd is not None and os.path.isdir(wd.file(paths.TOKENIZER_DIR)):
        return wd.tokenizer()
    return prepared.get_tokenizer(config, dataset_dir)


def preprocessing(config: ml_collections.ConfigDict, meta: dict) -> Preprocessing:
    """How a raw image and its text become model input, as training sees them: what prepare
    did to the training records (its options in ``meta``), then the evaluation centre crop of
    ``image_size`` and the tokenizer's ``max_text_length``."""
    options, encoding = meta["options"], transforms.EncodeOptions()
    return Preprocessing(
        stored_size=int(options["stored_image_size"]), crop_size=config.image_size,
        max_text_length=config.max_text_length,
        text_source=options.get("text_source", config.text_source),
        stored_format=options.get("image_format", encoding.fmt),
        jpeg_quality=encoding.quality, max_pixels=encoding.max_pixels,
        # Datasets prepared before the option existed were stored as decoded, never turned.
        exif_transpose=bool(options.get("exif_transpose", False)))


def make_model(config: ml_collections.ConfigDict, num_classes: int, vocab_size: int,
               axis_name: str | None = parallel.AXIS_NAME):
    """The fusion classifier of ``config.model``; its training BatchNorm statistics are shared
    over ``axis_name`` as ``config.batchnorm_sync`` says (inference reads running averages)."""
    return models.build_model(config.model, num_classes, vocab_size, axis_name=axis_name,
                              batchnorm_sync=config.get("batchnorm_sync", "global"))


def schedule_lengths(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run over ``num_train`` examples."""
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"config.batch_size={config.batch_size} exceeds the {num_train} "
                          f"training examples")
    return steps_per_epoch, steps_per_epoch * config.num_epochs


def abstract_variables(config: ml_collections.ConfigDict, model) -> dict:
    """Shapes and dtypes of the model's variables, computed without initialising anything."""
    return jax.eval_shape(lambda r: models.init_variables(
        model, r, config.image_size, config.max_text_length), jax.random.PRNGKey(0))


def make_optimizer(config: ml_collections.ConfigDict, model, steps_per_epoch: int,
                   total_steps: int):
    """The run's optimizer (per-tower rates, frozen towers) for ``model``'s parameters."""
    labels = models.param_labels(abstract_variables(config, model)["params"])
    return optim.make_optimizer(config, labels, total_steps, steps_per_epoch)


def init_variables(config: ml_collections.ConfigDict, model, log=print,
                   class_names=None) -> dict:
    """Fresh variables on the host: random init from the seed, then the pretrained towers; or,
    with ``config.init_from``, another run's weights and BatchNorm statistics (warm start).

    Args:
      config: the run's config.
      model: the model of ``make_model``.
      log: where to report what was loaded.
      class_names: this run's classes (a warm start checks the source run has the same).

    Returns:
      {"params", "batch_stats"} as NumPy arrays (one copy from the device, where the random
      init ran, so the pretrained weights can be grafted in on the host).
    """
    if config.get("init_from"):
        template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                abstract_variables(config, model))
        variables, step = warm_start.load(config.init_from, model, config, class_names,
                                          template)
        log(f"warm start: weights and BatchNorm statistics of {config.init_from} (step {step});"
            " fresh optimizer from step 0")
        return variables
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    variables = jax.device_get(models.init_variables(model, key, config.image_size,
                                                     config.max_text_length))
    return models.pretrained.load_pretrained(variables, config.model, log=log)


def replicated_state(model, tx, variables: dict, step: int = 0, opt_state=None,
                     ema: bool = False) -> steps.TrainState:
    """A train state with one full copy on every local device, from host variables, as the
    pmapped step takes it (``parallel.put_replicated``: no device axis).

    The optimizer state is the saved one when given, else ``tx.init`` run on the devices
    (no host round trip). With ``ema`` the weight average is ``variables["ema_params"]`` when
    given (a resume), else it starts at the parameters.
    """
    params = parallel.put_replicated(variables["params"])
    opt_state = (parallel.put_replicated(opt_state) if opt_state is not None
                 else parallel.init_replicated(tx.init)(params))
    ema_params = None
    if ema:  # A separate device copy: the state is donated, and no buffer may appear twice.
        ema_params = parallel.put_replicated(variables.get("ema_params", variables["params"]))
    return steps.TrainState(step=parallel.put_replicated(np.asarray(step, np.int32)),
                            params=params,
                            batch_stats=parallel.put_replicated(variables["batch_stats"]),
                            opt_state=opt_state, apply_fn=model.apply, tx=tx,
                            ema_params=ema_params)


def host_state_template(config: ml_collections.ConfigDict, model, tx) -> dict:
    """Zero host arrays shaped like a saved train state (the restore target); no compute."""
    abstract = abstract_variables(config, model)
    tree = {"step": jax.ShapeDtypeStruct((), np.int32), "params": abstract["params"],
            "batch_stats": abstract["batch_stats"],
            "opt_state": jax.eval_shape(tx.init, abstract["params"])}
    if uses_ema(config):
        tree["ema_params"] = abstract["params"]
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)


def class_weights(config: ml_collections.ConfigDict, class_names: list,
                  train_counts) -> np.ndarray:
    """Per-class loss weights from ``config.class_weights`` and the Train counts."""
    return losses.resolve_class_weights(config.class_weights, class_names, train_counts)


def uses_ema(config: ml_collections.ConfigDict) -> bool:
    """Whether the run keeps an exponential moving average of its weights."""
    return config.get("ema_decay", 0.0) > 0.0


def train_step_fn(config: ml_collections.ConfigDict, class_weights: np.ndarray):
    """The pmapped train step with the run's constants bound."""
    return parallel.pmap_train_step(functools.partial(
        steps.train_step, class_weights=class_weights,
        label_smoothing=config.optim.label_smoothing,
        accumulate_steps=config.get("accumulate_steps", 1),
        ema_decay=config.get("ema_decay", 0.0),
        rng_scheme=config.get("rng_scheme", "per_example")))
