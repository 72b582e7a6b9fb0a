"""Small file helpers shared by every writer: atomic JSON, CSV (formula-safe), text cells."""

import csv
import json
import os

import numpy as np


def jsonable(x):
    """A JSON-ready stand-in for a value json cannot write (NumPy values, anything else)."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return str(x)


def write_json(path: str, obj) -> str:
    """Writes JSON to a temporary file and renames it, so a reader never sees half a file.

    NumPy values become lists/numbers; anything else unknown becomes its ``str``.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, default=jsonable)
    os.replace(tmp, path)
    return path


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# A spreadsheet reads a cell that starts with one of these as a formula (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def printable(text: str) -> str:
    """``text`` as valid UTF-8 text: the bytes of a file name that were not UTF-8 (Python
    keeps them as lone surrogates) become ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def csv_cell(value):
    """A CSV cell that a spreadsheet shows as text: a string starting with ``= + - @`` (or a
    tab or carriage return) gets a leading apostrophe, and non-UTF-8 bytes of a file name
    become ``\\xNN`` (``printable``); numbers are left as they are."""
    if isinstance(value, str):
        value = printable(value)
        if value.startswith(FORMULA_STARTS):
            return "'" + value
    return value


def write_csv(path: str, rows: list[dict], columns: list[str]) -> str:
    """Writes ``rows`` (dicts) with the given column order, atomically (a temporary file in
    the same folder, renamed): an interrupted write leaves the previous file or none, never
    half of one. Every cell goes through ``csv_cell``, so a file name such as
    ``=HYPERLINK(...).png`` stays text."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def text(value) -> str:
    """A record's text field as ``str`` (TFDS returns bytes)."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)
