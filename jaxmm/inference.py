"""A trained run rebuilt from its workdir, and the work behind ``jaxmm.evaluate`` and
``jaxmm.predict``.

A workdir holds ``config.json`` (written by the trainer) and orbax checkpoints. From these alone
the config, class names, prepared dataset, tokenizer, model and inference variables are rebuilt,
in a fresh process, on any device count and on every process of a multi-process job.
"""

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxmm import checkpointing, evaluation, figures, models, parallel, prepare, reporting
from jaxmm.data import builder, captions, pipeline, transforms
from jaxmm.data import tokenizer as tokenizer_lib

CONFIG_FILE = "config.json"
EVAL_DIR = "eval"


@dataclasses.dataclass
class Run:
    """What inference needs from a training run."""

    workdir: str
    config: ml_collections.ConfigDict
    class_names: list
    class_weights: np.ndarray
    dataset_dir: str
    tokenizer: Any
    model: Any
    variables: dict
    step: int

    @property
    def modalities(self) -> tuple:
        return tuple(self.config.model.modalities)


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
    path = os.path.join(workdir, CONFIG_FILE)
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
    recorded = prepare.dataset_path(prepare.prepared_dir(config))
    if os.path.isfile(os.path.join(recorded, pipeline.META_FILE)):
        return recorded
    try:
        return prepare.ensure_prepared(config)
    except builder.PrepareError as e:
        raise FileNotFoundError(f"no prepared dataset at {recorded}, and it cannot be prepared "
                                f"again: {e}") from None


def _check_variables(model, config, variables: dict) -> None:
    """Fails clearly when the checkpoint does not fit the model built from config.json."""
    expected = jax.eval_shape(lambda r: models.init_variables(
        model, r, config.image_size, config.max_text_length), jax.random.PRNGKey(0))
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(np.shape(x))
                           for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    want, got = shapes(expected), shapes(variables)
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(f"the checkpoint does not match the model of config.json (first "
                         f"differences: {diff})")


def load_run(workdir: str, checkpoint: str = "best", *,
             axis_name: str | None = parallel.AXIS_NAME) -> Run:
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
    dataset_dir = dataset_dir_of(config)
    class_names = list(record["class_names"])
    found = list(pipeline.dataset_meta(dataset_dir)["class_names"])
    if found != class_names:
        raise ValueError(f"{dataset_dir} has classes {found}, the run was trained on {class_names}")
    tokenizer = tokenizer_lib.get_tokenizer(config, dataset_dir)
    model = models.build_model(config.model, len(class_names), len(tokenizer),
                               axis_name=axis_name)
    _check_variables(model, config, variables)
    return Run(workdir, config, class_names, np.asarray(record["class_weights"], np.float32),
               dataset_dir, tokenizer, model, variables, step)


def selected_modalities(run: Run, modalities) -> tuple:
    """The requested towers in the model's order (None or empty = all of them)."""
    want = tuple(modalities or run.modalities)
    if set(want) - set(run.modalities):
        raise ValueError(f"modalities {','.join(want)} are not a subset of the model's "
                         f"{','.join(run.modalities)}")
    return tuple(m for m in run.modalities if m in want)


def modality_mask(run: Run, modalities) -> np.ndarray | None:
    """The eval-time tower mask for a subset of the model's modalities (None = all towers)."""
    want = selected_modalities(run, modalities)
    return None if want == run.modalities else np.array([m in want for m in run.modalities])


class SplitEvaluator:
    """Evaluates one split of a run, every example exactly once, on all devices and processes."""

    def __init__(self, run: Run, split: str):
        sources = pipeline.load_splits(run.dataset_dir)
        if split not in sources:
            raise ValueError(f"unknown split {split!r}; {run.dataset_dir} has {sorted(sources)}")
        self.run, self.split, self.source = run, split, sources[split]
        # The run's eval batch, rounded up so that any device count splits it evenly.
        n = jax.device_count()
        self.local_batch = -(-run.config.eval_batch_size // n) * n // jax.process_count()
        self._fn = evaluation.make_eval_fn(run.model.apply, run.class_weights,
                                           len(run.class_names))
        self._variables = parallel.replicate(run.variables)

    def _batches(self):
        return pipeline.make_eval_iter(
            self.run.config, self.source, self.run.tokenizer, local_batch_size=self.local_batch,
            process_index=jax.process_index(), process_count=jax.process_count())

    def __call__(self, modalities=None, collect: bool = False) -> tuple[dict, dict | None]:
        """Metrics (exact, from psummed counts) and, when collecting, every example's probs.

        Returns:
          (metrics, predictions): predictions is {"index": [N], "probs": [N, K]} sorted by
          index and identical on every process, or None.
        """
        mask = modality_mask(self.run, modalities)
        metrics, local = evaluation.evaluate_split(self._fn, self._variables, self._batches(),
                                                   self.run.class_names, mask, collect)
        if not collect:
            return metrics, None
        capacity = self.local_batch * pipeline.num_eval_batches(
            len(self.source), self.local_batch, jax.process_count())
        return metrics, gather_predictions(local, capacity, len(self.source))


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


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def example_rows(source, predictions: dict, class_names: list) -> list[dict]:
    """One row per example: file, text, true and predicted class, confidence, probabilities."""
    rows = []
    for i, p in zip(predictions["index"], predictions["probs"], strict=True):
        record = source[int(i)]
        k = int(np.argmax(p))
        rows.append({"index": int(i), "file": _text(record["file_name"]),
                     "text": _text(record["text"]), "true": class_names[int(record["label"])],
                     "predicted": class_names[k], "confidence": float(p[k]),
                     **{f"p_{c}": float(v) for c, v in zip(class_names, p, strict=True)}})
    return rows


# --- Evaluation of a split, with reports ---------------------------------------------------------

ABLATION = (("image", "text"), ("image",), ("text",))


def evaluate_run(workdir: str, split: str = "test", checkpoint: str = "best", modalities=None,
                 ablation: bool = False) -> dict:
    """Evaluates a split of a trained run and (on process 0) writes its reports.

    Args:
      workdir: the training workdir.
      split: "train", "validation" or "test".
      checkpoint: "best", "latest" or a step number.
      modalities: towers to keep (None = all of the model's); the others are masked.
      ablation: also evaluate every tower combination of ``ABLATION`` the model has.

    Returns:
      dict(metrics, report (classification report text), out_dir, ablation (rows or None),
      notes (warnings to show)).
    """
    run = load_run(workdir, checkpoint)
    evaluator = SplitEvaluator(run, split)
    mods = selected_modalities(run, modalities)
    metrics, predictions = evaluator(mods, collect=True)
    metrics.update(split=split, checkpoint=str(checkpoint), checkpoint_step=run.step,
                   modalities=list(mods))
    suffix = "" if mods == run.modalities else "-" + "+".join(mods)
    out_dir = os.path.join(workdir, EVAL_DIR, split + suffix)
    result = {"metrics": metrics, "out_dir": out_dir, "ablation": None, "notes": []}
    if ablation:
        result["ablation"], result["notes"] = run_ablation(evaluator)
    result["report"] = ""
    if reporting.is_writer():
        rows = example_rows(evaluator.source, predictions, run.class_names)
        result["report"] = figures.write_reports(
            out_dir, metrics, rows, lambda i: transforms.as_pil(evaluator.source[i]["image"]))
        if result["ablation"]:
            reporting.write_json(os.path.join(out_dir, "ablation.json"),
                                 {"rows": result["ablation"], "notes": result["notes"]})
    return result


def run_ablation(evaluator: SplitEvaluator) -> tuple[list | None, list]:
    """Evaluates image+text, image-only and text-only from one checkpoint.

    Returns:
      (rows, notes): rows is None when the model has a single tower.
    """
    run = evaluator.run
    if len(run.modalities) < 2:
        return None, [f"ablation is not applicable: the model has only the "
                      f"{run.modalities[0]} tower"]
    notes = [] if run.config.model.get("modality_dropout", 0.0) else [
        "WARNING: the model was trained with config.model.modality_dropout=0, so it never saw a "
        "missing tower; the single-tower rows are not meaningful"]
    keys = ("num_examples", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "loss")
    rows = [{"modalities": list(mods), **{k: m[k] for k in keys}}
            for mods in ABLATION for m in [evaluator(mods)[0]]]
    return rows, notes


# --- Prediction on raw files -------------------------------------------------------------------

def find_images(paths) -> tuple[list[str], list[str], bool]:
    """Expands the given paths: files as given, folders recursively by image extension.

    Returns:
      (files, problems, any_folder): problems are one line each (missing paths, empty folders).
    """
    files, problems, any_folder = [], [], False
    for path in paths:
        if os.path.isdir(path):
            any_folder = True
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                           for name in names if name.lower().endswith(builder.IMAGE_EXTENSIONS))
            files += found
            if not found:
                problems.append(f"{path}: no image files in this folder")
        elif os.path.isfile(path):
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory")
    return files, problems, any_folder


class Predictor:
    """Classifies raw image files (+ texts) on one device, preprocessed exactly like evaluation:
    prepare's decode + RGB + resize + re-encode, then the eval centre crop."""

    def __init__(self, run: Run, batch_size: int = 16):
        self.run, self.batch_size = run, batch_size
        self._encode = _stored_encoding(run)
        self._view = transforms.EvalTransform(run.config.image_size)
        self._tokenize = transforms.TokenizeBatch(run.tokenizer, run.config.max_text_length)
        self._apply = jax.jit(functools.partial(run.model.apply, train=False))
        self._variables = jax.device_put(run.variables)

    def load(self, path: str, text: str) -> dict:
        """The eval view of one file. Raises ValueError (one line) when it cannot be read."""
        o = self._encode
        data, reason = transforms.encode_file((os.path.abspath(path), o.size, o.fmt, o.quality,
                                               o.max_pixels))
        if data is None:
            raise ValueError(reason)
        return self._view({"image": data, "text": text, "label": 0})

    def __call__(self, examples: list[dict]) -> np.ndarray:
        """Class probabilities [n, K]; batches are padded to one shape (one compilation)."""
        out = []
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            chunk = chunk + [chunk[0]] * (self.batch_size - len(chunk))
            batch = self._tokenize({"image": np.stack([e["image"] for e in chunk]),
                                        "text": [e["text"] for e in chunk]})
            logits = self._apply(self._variables, batch["image"], batch["input_ids"],
                                 batch["attention_mask"])
            out.append(np.asarray(jax.nn.softmax(logits, -1))[:len(examples) - start])
        return np.concatenate(out)[:len(examples)] if out else np.zeros((0, 0))


def _stored_encoding(run: Run) -> builder.EncodeOptions:
    # The size and format prepare stored the records with, so raw files get the same treatment.
    options = pipeline.dataset_meta(run.dataset_dir)["options"]
    return builder.EncodeOptions(size=options.get("image_size", run.config.stored_image_size),
                                 fmt=options.get("image_format", "jpeg"))


def predict_files(predictor: Predictor, files: list[str], text: str | None = None,
                  ) -> tuple[list[dict], list[str]]:
    """Predicts image files in batches; unreadable files are reported, not fatal.

    Args:
      predictor: from ``Predictor(run)``.
      files: image paths.
      text: the text for every file, or None for the file-name rule of the dataset.

    Returns:
      (rows, problems): rows hold file, text, predicted, confidence and p_<class>; problems
      are one line per file that could not be read.
    """
    names = predictor.run.class_names
    rows, problems, pending = [], [], []

    def flush():
        probs = predictor([example for _, example in pending])
        for (path, example), p in zip(pending, probs, strict=True):
            k = int(np.argmax(p))
            rows.append({"file": path, "text": example["text"], "predicted": names[k],
                         "confidence": float(p[k]),
                         **{f"p_{c}": float(v) for c, v in zip(names, p, strict=True)}})
        pending.clear()

    for path in files:
        try:
            t = captions.text_from_filename(path) if text is None else text
            pending.append((path, predictor.load(path, t)))
        except ValueError as e:
            problems.append(f"{path}: {e}")
        if len(pending) == predictor.batch_size:
            flush()
    if pending:
        flush()
    return rows, problems
