"""Classifying raw image files (with texts) with a rebuilt run: the work behind
``jaxmm.predict``.

Raw files are preprocessed exactly like the evaluation records: prepare's decode + RGB + resize
+ re-encode, then the eval centre crop; texts follow the dataset's file-name rule unless given.
"""

import functools
import os

import jax
import numpy as np

from jaxmm import restore, scoring
from jaxmm.data import builder, captions, transforms


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

    def __init__(self, run: restore.Run, batch_size: int = 16):
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


def _stored_encoding(run: restore.Run) -> builder.EncodeOptions:
    # The size and format prepare stored the records with, so raw files get the same treatment.
    return builder.EncodeOptions(size=run.preprocessing["stored_image_size"],
                                 fmt=run.preprocessing["image_format"])


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
            rows.append(scoring.prediction_row(p, names, file=path, text=example["text"]))
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
