"""Training without chosen Train examples: the exclusion file of ``config.exclude_file``.

An exclusion file is a CSV with a ``file`` column naming examples as the prepared dataset names
them (``file_name``: the path under the raw data folder, e.g.
``CVPR_2024_dataset_Train/Blue/bag_3.png``): the audit's ``label_issues.csv``, or a copy the
user edited. An optional ``keep`` column (1/true/yes = keep) lets a reviewer clear a flagged
row without deleting it. Rows naming Val or Test files are ignored and counted (those splits
are never changed); a file in no split, or a list that would leave a class of Train empty, is
refused before any training. The raw data and the prepared dataset are never touched: training
reads Train through a view that skips the excluded records.
"""

import csv
import dataclasses
import hashlib
import os

import numpy as np

from jaxmm import files
from jaxmm.errors import ConfigError

FILE_COLUMN = "file"
KEEP_COLUMN = "keep"
_TRUE = ("1", "true", "yes", "y")
_FALSE = ("0", "false", "no", "n", "")


def sha256_of(path: str) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _keep_value(value: str, path: str, line: int) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"config.exclude_file {path}, line {line}: keep={value!r}; use 1/true/yes "
                      "to keep the example or 0/false/no/empty to exclude it")


def read_names(path: str) -> list[str]:
    """The files an exclusion CSV excludes (rows whose ``keep`` is true are left out).

    Raises:
      ConfigError: the file is missing or unreadable, or has no ``file`` column, or a bad keep.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config.exclude_file {path} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if FILE_COLUMN not in (reader.fieldnames or []):
                raise ConfigError(f"config.exclude_file {path} has no '{FILE_COLUMN}' column "
                                  f"(columns: {', '.join(reader.fieldnames or []) or 'none'})")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"config.exclude_file {path}: not a readable CSV ({e})") from None
    names = []
    for line, row in enumerate(rows, start=2):
        if KEEP_COLUMN in row and _keep_value(row[KEEP_COLUMN], path, line):
            continue
        name = (row.get(FILE_COLUMN) or "").strip()
        if name:
            names.append(name)
    return names


def _unquoted(name: str) -> str:
    """A name as written before ``files.csv_cell`` protected it from spreadsheets."""
    if name.startswith("'") and name[1:].startswith(files.FORMULA_STARTS):
        return name[1:]
    return name


def split_files(sources: dict) -> dict:
    """split -> [file name of record i] of every split (records are read, images not decoded)."""
    out = {}
    for split, source in sources.items():
        records = source.__getitems__(list(range(len(source)))) if len(source) else []
        out[split] = [files.text(r["file_name"]) for r in records]
    return out


def labels_of(source) -> np.ndarray:
    """The label of every record of a split source."""
    if not len(source):
        return np.zeros(0, np.int64)
    return np.array([int(r["label"]) for r in source.__getitems__(list(range(len(source))))],
                    np.int64)


@dataclasses.dataclass
class Exclusions:
    """What an exclusion file removes from Train.

    Attributes:
      path: the file (absolute).
      sha256: its content hash (recorded with the run; a resume with another list is refused).
      keep_index: sorted Train record indices that stay.
      excluded: Train files left out.
      ignored: split -> rows naming files of that (other) split.
      kept_counts: class -> Train examples kept.
    """

    path: str
    sha256: str
    keep_index: np.ndarray
    excluded: list
    ignored: dict
    kept_counts: dict

    def record(self) -> dict:
        """The run record's ``data.exclusions`` entry."""
        return {"file": self.path, "sha256": self.sha256, "excluded": len(self.excluded),
                "ignored": dict(self.ignored), "kept_counts": dict(self.kept_counts)}

    def summary_line(self) -> str:
        ignored = sum(self.ignored.values())
        other = (f"; {ignored} row(s) of other splits ignored ("
                 + ", ".join(f"{s} {n}" for s, n in self.ignored.items()) + ")") if ignored else ""
        return (f"exclude_file {self.path}: {len(self.excluded)} Train example(s) left out, "
                f"{len(self.keep_index)} kept{other}")


def resolve(path: str, names_by_split: dict, train_labels, class_names: list) -> Exclusions:
    """Matches an exclusion file against the dataset's files.

    Args:
      path: the CSV.
      names_by_split: ``split_files`` of every split.
      train_labels: [N] labels of the Train records.
      class_names: class names in label order.

    Raises:
      ConfigError: (one line) files in no split, or a class of Train left empty.
    """
    path = os.path.abspath(path)
    where = {n: s for s, names in names_by_split.items() for n in names}
    wanted = {_unquoted(n) for n in read_names(path)}
    unknown = sorted(n for n in wanted if n not in where)
    if unknown:
        raise ConfigError(f"config.exclude_file {path} names {len(unknown)} file(s) that are in "
                          f"no split of the prepared dataset, e.g. {unknown[0]!r} (names are "
                          "paths under the data folder, as in label_issues.csv)")
    ignored = {}
    for n in sorted(wanted):
        if where[n] != "train":
            ignored[where[n]] = ignored.get(where[n], 0) + 1
    train = names_by_split["train"]
    keep = np.array([i for i, n in enumerate(train) if n not in wanted], np.int64)
    labels = np.asarray(train_labels, np.int64)
    kept = np.bincount(labels[keep], minlength=len(class_names)) if len(keep) else \
        np.zeros(len(class_names), np.int64)
    empty = [c for c, k, n in zip(class_names, kept, np.bincount(labels, minlength=len(
        class_names)), strict=True) if k == 0 and n > 0]
    if empty:
        raise ConfigError(f"config.exclude_file {path} would leave no Train example of class "
                          f"{empty[0]!r}: keep some of its rows (keep column) or remove them")
    return Exclusions(path, sha256_of(path), keep, sorted(n for n in train if n in wanted),
                      ignored, {c: int(k) for c, k in zip(class_names, kept, strict=True)})


def load(path: str, sources: dict, class_names: list) -> Exclusions:
    """``resolve`` against the opened splits of a prepared dataset."""
    return resolve(path, split_files(sources), labels_of(sources["train"]), class_names)


class Subset:
    """A record source that shows only the records ``index`` of another, in that order."""

    def __init__(self, source, index):
        self._source, self._index = source, np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        return self._source[int(self._index[i])]

    def __getitems__(self, indices):
        return self._source.__getitems__([int(self._index[i]) for i in indices])
