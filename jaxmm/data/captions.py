"""Text of a sample: the file-name rule and the captions CSV join.

The dataset authors derive a sample's text from its file name: lower-case, ``_`` to space, drop
digits and every other non-letter, collapse spaces (``Plastic_Bottle_12.png`` -> ``plastic
bottle``). Optional captions CSVs (``image,description``) hold absolute paths from another machine,
so rows are joined on ``(class folder, basename)``, never on the full path.
"""

import csv
import os
import re

TEXT_SOURCES = ("filename", "caption", "both")

# The dataset authors' file-name rule as data: the steps, in order, applied to the file's base
# name without its extension. Regular expressions are Python ``re`` patterns on ``str`` (Unicode):
# letters in any script survive; digits, '_' and punctuation (hyphens too, as in the authors'
# rule: "non-stretchy" -> "nonstretchy") are removed. An export bundle records this tuple, so a
# client in any language can apply the same rule; ``apply_text_rule`` is jaxmm's own reading.
FILENAME_RULE = (
    ("lower",),
    ("replace", "_", " "),
    ("regex_sub", r"[^\w\s]|[\d_]", ""),
    ("regex_sub", r"\s+", " "),
    ("strip",),
)


# Caption files are looked up by split folder suffix: train_image_descriptions.csv, ...
CAPTION_FILE = "{}_image_descriptions.csv"


def apply_text_rule(rule, text: str) -> str:
    """Applies the steps of a text rule (see ``FILENAME_RULE``) to ``text``.

    Raises:
      ValueError: a step this jaxmm does not know.
    """
    for step in rule:
        op, *args = step
        if op == "lower" and not args:
            text = text.lower()
        elif op == "strip" and not args:
            text = text.strip()
        elif op == "replace" and len(args) == 2:
            text = text.replace(*args)
        elif op == "regex_sub" and len(args) == 2:
            text = re.sub(args[0], args[1], text)
        else:
            raise ValueError(f"unknown text-rule step {list(step)!r}")
    return text


def text_from_filename(file_name: str, rule=FILENAME_RULE) -> str:
    """Applies the dataset authors' file-name text rule.

    Args:
      file_name: a base name or path; only the base name without extension is used.
      rule: the steps (default: the authors' rule).

    Returns:
      Lower-case words separated by single spaces (may be empty).
    """
    stem = os.path.splitext(os.path.basename(file_name))[0]
    return apply_text_rule(rule, stem)


def caption_key(path: str) -> tuple[str, str]:
    """Join key of an image path: (class folder, base name), both as written on disk."""
    norm = path.replace("\\", "/").rstrip("/")
    parts = norm.split("/")
    folder = parts[-2] if len(parts) >= 2 else ""
    return folder, parts[-1]


def load_captions(csv_path: str) -> dict[tuple[str, str], str]:
    """Reads a captions CSV into a dict keyed by (class folder, base name).

    Args:
      csv_path: a CSV with an ``image`` column (any absolute or relative path) and a
        ``description`` column.

    Returns:
      Mapping from join key to the stripped description; empty descriptions are left out so that
      they fall back to the file-name text.

    Raises:
      ValueError: when the header lacks the two columns.
    """
    captions = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "description"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: expected columns 'image,description', "
                             f"found {reader.fieldnames}")
        for row in reader:
            desc = (row.get("description") or "").strip()
            if row.get("image") and desc:
                captions[caption_key(row["image"])] = desc
    return captions


def caption_csv_path(data_dir: str, split_folder_suffix: str) -> str:
    """Path of the captions CSV of a split (``Train`` -> ``train_image_descriptions.csv``)."""
    return os.path.join(data_dir, CAPTION_FILE.format(split_folder_suffix.lower()))


def sample_text(rel_path: str, text_source: str, captions: dict[tuple[str, str], str] | None,
                from_name=text_from_filename) -> tuple[str, bool]:
    """Text of one sample for a text source.

    Args:
      rel_path: image path relative to the data dir (``.../<Class>/<name>``).
      text_source: 'filename', 'caption' or 'both' (file-name text, then the caption).
      captions: join table from `load_captions`, or None when the split has no CSV.
      from_name: the file-name rule (a model's recorded one at prediction).

    Returns:
      (text, from_csv): from_csv is False when the caption was requested but missing, in which
      case the file-name text is used alone.
    """
    if text_source not in TEXT_SOURCES:
        raise ValueError(f"text_source must be one of {TEXT_SOURCES}, got {text_source!r}")
    name_text = from_name(rel_path)
    if text_source == "filename":
        return name_text, False
    caption = (captions or {}).get(caption_key(rel_path))
    if caption is None:
        return name_text, False
    if text_source == "caption":
        return caption, True
    return f"{name_text}. {caption}" if name_text else caption, True
