"""TFDS builder that writes the prepared dataset as ArrayRecord (no TensorFlow needed).

Records: ``image`` (encoded, shorter side = stored size), ``text`` (str), ``label`` (ClassLabel
with the configured class names) and ``file_name`` (path relative to the raw data dir). Decoding
and resizing run in a multiprocessing pool; results are consumed in order as they arrive, so
memory stays flat whatever the dataset size. Files that fail to decode are reported, not written.
"""

import dataclasses
import os

import tensorflow_datasets as tfds
from tqdm import tqdm

from jaxmm.data import captions as captions_lib
from jaxmm.data import transforms

DATASET_NAME = "jaxmm_garbage"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One raw file to prepare."""

    rel_path: str
    label: int
    text: str


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How images are stored."""

    size: int = 256
    fmt: str = "jpeg"
    quality: int = 95
    max_pixels: int = 50_000_000


class GarbageDataset(tfds.core.GeneratorBasedBuilder):
    """Prepared image + text garbage dataset."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Prepared by jaxmm.prepare."}

    def __init__(self, *, plan: dict[str, list[Sample]], class_names: list[str], raw_dir: str,
                 options: EncodeOptions, pool=None, **kwargs):
        """Builder for one prepare run.

        Args:
          plan: tfds split name -> samples, in the order they are written.
          class_names: label names (index = label).
          raw_dir: root the samples' rel_path is relative to.
          options: image storage options.
          pool: a multiprocessing pool for decoding, or None to decode in-process.
          **kwargs: passed to tfds (data_dir, file_format, ...).
        """
        self._plan, self._class_names, self._raw_dir = plan, list(class_names), raw_dir
        self._options, self._pool = options, pool
        self.skipped: list[dict] = []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format=self._options.fmt),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=self._class_names),
            "file_name": tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(
            builder=self, features=features, disable_shuffling=True,
            description="Garbage images with file-name or caption texts, prepared by jaxmm.")

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        return {split: self._generate_examples(split) for split in self._plan}

    def _generate_examples(self, split: str):
        samples = self._plan[split]
        o = self._options
        tasks = ((os.path.join(self._raw_dir, s.rel_path), o.size, o.fmt, o.quality, o.max_pixels)
                 for s in samples)
        results = (self._pool.imap(transforms.encode_file, tasks, chunksize=4) if self._pool
                   else map(transforms.encode_file, tasks))
        for i, (sample, (data, reason)) in enumerate(
                zip(samples, tqdm(results, total=len(samples), desc=f"prepare {split}",
                                  unit="img"), strict=True)):
            if data is None:
                self.skipped.append({"split": split, "file": sample.rel_path, "reason": reason})
                continue
            yield i, {"image": data, "text": sample.text, "label": sample.label,
                      "file_name": sample.rel_path}


# ----------------------------------------------------------------------------------------------
# Scanning the raw folders (what to prepare, what to skip, which texts).

SPLIT_FOLDERS = {"train": "Train", "validation": "Val", "test": "Test"}
FOLDER_PATTERN = "CVPR_2024_dataset_{}"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class PrepareError(ValueError):
    """A user error in the raw data or options; its message is one line naming the path."""


@dataclasses.dataclass
class Scan:
    """What a prepare run will do."""

    data_dir: str
    class_names: list[str]
    plan: dict[str, list[Sample]]
    skipped: list[dict]
    warnings: list[str]
    text_counts: dict[str, dict[str, int]]
    stats: list[tuple]  # (rel_path, size, mtime_ns) of every input file, for the fingerprint


def has_dataset(data_dir: str) -> bool:
    """True when data_dir holds a Train split folder."""
    return os.path.isdir(os.path.join(data_dir, FOLDER_PATTERN.format("Train")))


def _class_dirs(split_dir: str) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def _resolve_classes(data_dir: str, class_names: list[str]) -> list[str]:
    train_dir = os.path.join(data_dir, FOLDER_PATTERN.format("Train"))
    if not os.path.isdir(train_dir):
        raise PrepareError(f"missing split folder {train_dir}")
    names = list(class_names) or _class_dirs(train_dir)
    if not names:
        raise PrepareError(f"no class folders in {train_dir}")
    if len(set(names)) != len(names):
        raise PrepareError(f"duplicate class names {names}")
    return names


def _load_split_captions(data_dir: str, text_source: str, warnings: list[str]) -> dict:
    """Caption tables per split folder suffix; warns when only some splits have a CSV."""
    if text_source == "filename":
        return {}
    tables = {}
    for folder in SPLIT_FOLDERS.values():
        path = captions_lib.caption_csv_path(data_dir, folder)
        if os.path.isfile(path):
            try:
                tables[folder] = captions_lib.load_captions(path)
            except ValueError as e:
                raise PrepareError(str(e)) from None
    if not tables:
        raise PrepareError(f"text_source={text_source!r} but no *_image_descriptions.csv "
                           f"in {data_dir}")
    missing = [f for f in SPLIT_FOLDERS.values() if f not in tables]
    if missing:
        warnings.append(f"no captions CSV for split(s) {missing}: their texts fall back to "
                        "file names, so train and eval texts differ in kind")
    return tables


def _scan_split(data_dir: str, folder: str, names: list[str], scan: Scan,
                split: str, text_source: str, table) -> None:
    split_dir = os.path.join(data_dir, FOLDER_PATTERN.format(folder))
    if not os.path.isdir(split_dir):
        raise PrepareError(f"missing split folder {split_dir}")
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir() and entry.name not in names:
            raise PrepareError(f"class folder {entry.path} is not in the class list {names}")
        if not entry.is_dir():
            scan.skipped.append({"split": split, "file": os.path.relpath(entry.path, data_dir),
                                 "reason": "not inside a class folder"})
    counts = scan.text_counts[split] = {"csv": 0, "filename": 0, "fallback": 0}
    samples = scan.plan[split] = []
    for label, cls in enumerate(names):
        cls_dir = os.path.join(split_dir, cls)
        if not os.path.isdir(cls_dir):
            scan.warnings.append(f"class folder {cls_dir} is missing (0 examples of {cls})")
            continue
        for root, dirs, files in os.walk(cls_dir):
            dirs.sort()
            for name in sorted(files):
                _add_file(data_dir, os.path.join(root, name), label, split, scan,
                          text_source, table, counts)
    if not samples:
        raise PrepareError(f"split folder {split_dir} holds no images")


def _add_file(data_dir, path, label, split, scan, text_source, table, counts) -> None:
    rel = os.path.relpath(path, data_dir)
    try:
        st = os.stat(path)
        scan.stats.append((rel, st.st_size, st.st_mtime_ns))
    except OSError as e:  # e.g. a dangling link: skipped below when it fails to open
        scan.stats.append((rel, -1, type(e).__name__))
    base = os.path.basename(path)
    if base.startswith(".") or not base.lower().endswith(IMAGE_EXTENSIONS):
        scan.skipped.append({"split": split, "file": rel, "reason": "not an image file name"})
        return
    text, from_csv = captions_lib.sample_text(rel, text_source, table)
    if from_csv:
        counts["csv"] += 1
    else:
        counts["filename"] += 1
        counts["fallback"] += text_source != "filename"
    scan.plan[split].append(Sample(rel, label, text))


def scan(data_dir: str, class_names: list[str], text_source: str) -> Scan:
    """Lists what to prepare and what to skip.

    Args:
      data_dir: raw root.
      class_names: label order; empty = sorted Train class folders.
      text_source: 'filename', 'caption' or 'both'.

    Returns:
      The scan (plan per tfds split, skipped files with reasons, warnings, text counts).

    Raises:
      PrepareError: missing split folder, unknown class folder, empty split, bad CSV.
    """
    if text_source not in captions_lib.TEXT_SOURCES:
        raise PrepareError(f"text_source must be one of {captions_lib.TEXT_SOURCES}")
    if not os.path.isdir(data_dir):
        raise PrepareError(f"data dir {data_dir} does not exist")
    names = _resolve_classes(data_dir, class_names)
    result = Scan(data_dir, names, {}, [], [], {}, [])
    tables = _load_split_captions(data_dir, text_source, result.warnings)
    for split, folder in SPLIT_FOLDERS.items():
        _scan_split(data_dir, folder, names, result, split, text_source, tables.get(folder))
    for folder in SPLIT_FOLDERS.values():
        path = captions_lib.caption_csv_path(data_dir, folder)
        if folder in tables:
            st = os.stat(path)
            result.stats.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    return result
