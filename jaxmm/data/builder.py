"""TFDS builder that writes the prepared dataset as ArrayRecord (no TensorFlow needed).

Records: ``image`` (encoded, shorter side = stored size), ``text`` (str), ``label`` (ClassLabel
with the configured class names) and ``file_name`` (path relative to the raw data dir). Decoding
and resizing run in a multiprocessing pool; results are consumed in order as they arrive, so
memory stays flat whatever the dataset size. Files that fail to decode are reported, not written.
Every written image is hashed on the way (``dedup``) so prepare can report cross-split copies.
"""

import dataclasses
import os

import tensorflow_datasets as tfds
from tqdm import tqdm

from jaxmm import paths
from jaxmm.data import captions as captions_lib
from jaxmm.data import dedup, transforms
from jaxmm.data.transforms import EncodeOptions
from jaxmm.errors import PrepareError

DATASET_NAME = paths.DATASET_NAME


@dataclasses.dataclass(frozen=True)
class Sample:
    """One raw file to prepare."""

    rel_path: str
    label: int
    text: str


class GarbageDataset(tfds.core.GeneratorBasedBuilder):
    """Prepared image + text garbage dataset."""

    name = DATASET_NAME
    VERSION = tfds.core.Version(paths.DATASET_VERSION)
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
        self.hashes: dict[str, list[tuple]] = {}  # split -> [(file, *dedup hashes)]
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
        tasks = ((os.path.join(self._raw_dir, s.rel_path), o.size, o.fmt, o.quality, o.max_pixels,
                  o.exif_transpose) for s in samples)
        results = (self._pool.imap(dedup.encode_and_hash, tasks, chunksize=4) if self._pool
                   else map(dedup.encode_and_hash, tasks))
        hashes = self.hashes[split] = []
        for i, (sample, (data, reason, sample_hashes)) in enumerate(
                zip(samples, tqdm(results, total=len(samples), desc=f"prepare {split}",
                                  unit="img"), strict=True)):
            if data is None:
                self.skipped.append({"split": split, "file": sample.rel_path, "reason": reason})
                continue
            hashes.append((sample.rel_path, *sample_hashes))
            yield i, {"image": data, "text": sample.text, "label": sample.label,
                      "file_name": sample.rel_path}


# ----------------------------------------------------------------------------------------------
# Scanning the raw folders (what to prepare, what to skip, which texts).

SPLIT_FOLDERS = {"train": "Train", "validation": "Val", "test": "Test"}
FOLDER_PATTERN = "CVPR_2024_dataset_{}"
IMAGE_EXTENSIONS = transforms.IMAGE_EXTENSIONS


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

    def skip(self, split: str, path: str, reason: str) -> None:
        """Records a skipped file or folder with its reason."""
        self.skipped.append({"split": split, "file": shown(os.path.relpath(path, self.data_dir)),
                             "reason": reason})


def shown(path: str) -> str:
    """A path as printable text: bytes of a name that are not UTF-8 become ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _os_reason(e: OSError) -> str:
    return f"{type(e).__name__}: {e.strerror or e}"


def has_dataset(data_dir: str) -> bool:
    """True when data_dir holds a Train split folder."""
    return os.path.isdir(os.path.join(data_dir, FOLDER_PATTERN.format("Train")))


def _entries(folder: str) -> list[tuple[os.DirEntry, bool]]:
    """(entry, is a folder) of a folder, sorted by name; symbolic links are followed."""
    out = []
    with os.scandir(folder) as it:
        for entry in sorted(it, key=lambda e: e.name):
            try:
                out.append((entry, entry.is_dir()))
            except OSError:  # a link that loops: treated as a file, skipped with its reason
                out.append((entry, False))
    return out


def _split_entries(split_dir: str) -> list[tuple[os.DirEntry, bool]]:
    if not os.path.isdir(split_dir):
        raise PrepareError(f"missing split folder {shown(split_dir)}")
    try:
        return _entries(split_dir)
    except OSError as e:
        raise PrepareError(
            f"cannot read split folder {shown(split_dir)}: {_os_reason(e)}") from None


def _resolve_classes(data_dir: str, class_names: list[str]) -> list[str]:
    train_dir = os.path.join(data_dir, FOLDER_PATTERN.format("Train"))
    names = list(class_names) or [e.name for e, is_dir in _split_entries(train_dir) if is_dir]
    if not names:
        raise PrepareError(f"no class folders in {shown(train_dir)}")
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
            except (ValueError, OSError) as e:
                raise PrepareError(" ".join(str(e).split())) from None
    if not tables:
        raise PrepareError(f"text_source={text_source!r} but no *_image_descriptions.csv "
                           f"in {data_dir}")
    missing = [f for f in SPLIT_FOLDERS.values() if f not in tables]
    if missing:
        warnings.append(f"no captions CSV for split(s) {missing}: their texts fall back to "
                        "file names, so train and eval texts differ in kind")
    return tables


@dataclasses.dataclass
class _SplitScan:
    """The state of scanning one split: where files go and how their texts are made."""

    scan: Scan
    split: str
    text_source: str
    table: dict | None
    counts: dict[str, int]


def _walk(folder: str, label: int, ctx: _SplitScan, seen: set[str]) -> None:
    """Adds every file below ``folder``; linked folders are followed once, problems skipped."""
    try:
        entries = _entries(folder)
    except OSError as e:
        reason = f"unreadable folder ({_os_reason(e)}); its files are not counted"
        ctx.scan.skip(ctx.split, folder, reason)
        ctx.scan.warnings.append(f"{shown(folder)}: {reason}")
        return
    subfolders = []
    for entry, is_dir in entries:
        if shown(entry.name) != entry.name:
            ctx.scan.skip(ctx.split, entry.path, "name is not valid UTF-8; rename it")
        elif is_dir:
            subfolders.append(entry.path)
        else:
            _add_file(entry.path, label, ctx)
    for sub in subfolders:
        real = os.path.realpath(sub)
        if real in seen:
            ctx.scan.skip(ctx.split, sub, "link to a folder that is already scanned (a loop or "
                                          "a second path to the same files)")
            continue
        seen.add(real)
        _walk(sub, label, ctx, seen)


def _add_file(path: str, label: int, ctx: _SplitScan) -> None:
    scan, rel = ctx.scan, os.path.relpath(path, ctx.scan.data_dir)
    try:
        st = os.stat(path)
        scan.stats.append((rel, st.st_size, st.st_mtime_ns))
    except OSError as e:  # a dangling or looping link, a file that vanished
        scan.stats.append((rel, -1, type(e).__name__))
        scan.skip(ctx.split, path, _os_reason(e))
        return
    base = os.path.basename(path)
    if base.startswith(".") or not base.lower().endswith(IMAGE_EXTENSIONS):
        scan.skip(ctx.split, path, "not an image file name")
        return
    text, from_csv = captions_lib.sample_text(rel, ctx.text_source, ctx.table)
    if from_csv:
        ctx.counts["csv"] += 1
    else:
        ctx.counts["filename"] += 1
        ctx.counts["fallback"] += ctx.text_source != "filename"
    scan.plan[ctx.split].append(Sample(rel, label, text))


def _scan_split(folder: str, names: list[str], scan: Scan, split: str, text_source: str,
                table) -> None:
    split_dir = os.path.join(scan.data_dir, FOLDER_PATTERN.format(folder))
    for entry, is_dir in _split_entries(split_dir):
        if is_dir and entry.name not in names:
            raise PrepareError(f"class folder {shown(entry.path)} is not in the class list "
                               f"{names}")
        if not is_dir:
            scan.skip(split, entry.path, "not inside a class folder")
    counts = scan.text_counts[split] = {"csv": 0, "filename": 0, "fallback": 0}
    scan.plan[split] = []
    ctx = _SplitScan(scan, split, text_source, table, counts)
    for label, cls in enumerate(names):
        cls_dir = os.path.join(split_dir, cls)
        if not os.path.isdir(cls_dir):
            scan.warnings.append(f"class folder {cls_dir} is missing (0 examples of {cls})")
            continue
        _walk(cls_dir, label, ctx, {os.path.realpath(cls_dir)})
    if not scan.plan[split]:
        raise PrepareError(f"split folder {shown(split_dir)} holds no images")


def scan(data_dir: str, class_names: list[str], text_source: str) -> Scan:
    """Lists what to prepare and what to skip.

    Files below a class folder are found at any depth; linked folders are followed (each real
    folder once, so a link loop ends). Unreadable folders, names that are not UTF-8, broken links
    and non-image names are skipped with their reason.

    Args:
      data_dir: raw root.
      class_names: label order; empty = sorted Train class folders.
      text_source: 'filename', 'caption' or 'both'.

    Returns:
      The scan (plan per tfds split, skipped files with reasons, warnings, text counts).

    Raises:
      PrepareError: missing or unreadable split folder, unknown class folder, empty split, bad
        CSV.
    """
    if text_source not in captions_lib.TEXT_SOURCES:
        raise PrepareError(f"text_source must be one of {captions_lib.TEXT_SOURCES}")
    if not os.path.isdir(data_dir):
        raise PrepareError(f"data dir {data_dir} does not exist")
    names = _resolve_classes(data_dir, class_names)
    result = Scan(data_dir, names, {}, [], [], {}, [])
    tables = _load_split_captions(data_dir, text_source, result.warnings)
    for split, folder in SPLIT_FOLDERS.items():
        _scan_split(folder, names, result, split, text_source, tables.get(folder))
    for folder in SPLIT_FOLDERS.values():
        path = captions_lib.caption_csv_path(data_dir, folder)
        if folder in tables:
            st = os.stat(path)
            result.stats.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    return result
