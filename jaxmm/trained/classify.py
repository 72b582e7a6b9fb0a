"""Classifying raw image files (with texts): the work behind ``jaxmm.predict``.

Two predictors share ``predict_files``: ``Predictor`` (a run rebuilt from its workdir) and
``jaxmm.trained.bundle.Classifier`` (an export bundle). Raw files are preprocessed exactly like the
evaluation records: prepare's decode + RGB + resize + re-encode, then the eval centre crop; texts
follow the dataset's file-name rule unless given (one text, or a captions CSV).

Importing this module is cheap (no jax, orbax, grain or TFDS): the bundle path uses it.
"""

import functools
import os

import numpy as np

from jaxmm.data import captions, transforms
from jaxmm.errors import ConfigError
from jaxmm.evaluation import calibration
from jaxmm.evaluation.metrics import prediction_row
from jaxmm.trained.model import TrainedModel, padded_batches


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
                           for name in names if name.lower().endswith(transforms.IMAGE_EXTENSIONS))
            files += found
            if not found:
                problems.append(f"{path}: no image files in this folder")
        elif os.path.isfile(path):
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory")
    return files, problems, any_folder


class Predictor:
    """Classifies raw image files (+ texts) with a trained model on one device, preprocessed by
    its recorded ``Preprocessing`` exactly like evaluation."""

    def __init__(self, trained: TrainedModel, batch_size: int = 16):
        import jax

        self.trained, self.batch_size, self.spec = trained, batch_size, trained.spec
        self.class_names = trained.class_names
        self.temperature = trained.spec.temperature or 1.0
        self._view = trained.preprocessing.image_view()
        self._tokenize = trained.tokenize_batch()
        self._apply = jax.jit(functools.partial(trained.model.apply, train=False))
        self._variables = jax.device_put(trained.variables)

    def read(self, path: str, text: str) -> dict:
        """The eval view of one file. Raises ValueError (one line) when it cannot be read."""
        return {"image": self._view(path), "text": text}

    def __call__(self, examples: list[dict]) -> np.ndarray:
        """Class probabilities [n, K] (logits divided by the temperature); batches are padded
        to one shape (one compilation)."""
        out = []
        for chunk, padded in padded_batches(examples, self.batch_size):
            batch = self._tokenize({"image": np.stack([e["image"] for e in padded]),
                                    "text": [e["text"] for e in padded]})
            logits = self._apply(self._variables, batch["image"], batch["input_ids"],
                                 batch["attention_mask"])
            out.append(calibration.softmax(np.asarray(logits), self.temperature)[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)))


def open_predictor(workdir: str | None, model: str | None, checkpoint: str = "best",
                   batch_size: int = 16, calibrated: bool = True):
    """A predictor for ``predict_files``: a bundle's Classifier or a trained run's Predictor.

    Args:
      workdir: a training workdir (None with a bundle).
      model: a bundle folder written by ``jaxmm.export`` (None with a workdir).
      checkpoint: "best", "latest" or a step number (workdir only).
      batch_size: images per forward pass.
      calibrated: divide the logits by the fitted temperature (the workdir's
        ``calibration.json`` or the bundle's), when there is one.

    Returns:
      A predictor; its ``spec`` says what the model was trained on.
    """
    if model:
        from jaxmm.trained.classifier import Classifier

        return Classifier.load(model, batch_size=batch_size, calibrated=calibrated)
    from jaxmm.trained.workdir import Workdir

    return Predictor(Workdir(workdir).load_model(checkpoint, calibrated=calibrated), batch_size)


def text_rule(text: str | None = None, captions_csv: str = "", spec=None, files=(),
              notes: list | None = None):
    """How a file gets its text: one text for all, its caption, or its file name.

    Args:
      text: the text of every file (wins over the rest).
      captions_csv: a captions CSV (``image,description``), joined to ``files`` by
        ``captions.match_captions``' rule; a file without a caption gets its file-name text.
      spec: the model's ``ModelSpec``: its file-name rule, and the text source it was
        trained on ("both" puts the file-name text first); None = the dataset's rule.
      files: the files that will be predicted (needed with ``captions_csv``).
      notes: when given, the join's report lines are appended (images matched, rows that
        match no image, repeated rows).

    Returns:
      A function from a path to its text.

    Raises:
      ConfigError: the CSV is missing, unreadable or lacks the two columns.
    """
    if text is not None:
        return lambda path: text
    from_name = spec.preprocessing.text_of if spec else captions.text_from_filename
    if not captions_csv:
        return from_name
    if not os.path.isfile(captions_csv):
        raise ConfigError(f"--captions {captions_csv}: no such file")
    try:
        table, found = captions.match_captions(captions_csv, list(files))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"--captions {captions_csv}: {str(e).splitlines()[0]}") from None
    if notes is not None:
        notes.extend(found)
    both = spec is not None and spec.preprocessing.text_source == "both"

    def text_of(path: str) -> str:
        caption, name_text = table.get(path), from_name(path)
        if caption is None:
            return name_text
        return f"{name_text}. {caption}" if both and name_text else caption

    return text_of


def predict_files(predictor, files: list[str], text=None) -> tuple[list[dict], list[str]]:
    """Predicts image files in batches; unreadable files are reported, not fatal.

    Args:
      predictor: a ``Predictor`` or a ``jaxmm.trained.bundle.Classifier`` (both have class_names,
        batch_size, ``read(path, text)`` and ``__call__(examples) -> probabilities``).
      files: image paths.
      text: one text for every file, a function from path to text (``text_rule``), or None for
        the file-name rule of the dataset.

    Returns:
      (rows, problems): rows hold file, text, predicted, confidence and p_<class>; problems
      are one line per file that could not be read.
    """
    text_of = text if callable(text) else text_rule(text)
    names = predictor.class_names
    rows, problems, pending = [], [], []

    def flush():
        probs = predictor([example for _, example in pending])
        for (path, example), p in zip(pending, probs, strict=True):
            rows.append(prediction_row(p, names, file=path, text=example["text"]))
        pending.clear()

    for path in files:
        try:
            pending.append((path, predictor.read(path, text_of(path))))
        except ValueError as e:
            problems.append(f"{path}: {e}")
        if len(pending) == predictor.batch_size:
            flush()
    if pending:
        flush()
    return rows, problems


def explain_files(predictor: Predictor, rows: list[dict], out_dir: str) -> list[str]:
    """Explanations (one PNG per predicted file, plus a gallery) of ``predict_files``' rows."""
    from jaxmm.evaluation import explain

    examples = [{**predictor.read(r["file"], r["text"]), "name": r["file"], "label": -1}
                for r in rows]
    return explain.write_explanations(predictor.trained, examples, out_dir,
                                      predictor.temperature, predictor.batch_size)
