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


def read_caption_rows(csv_path: str) -> list[tuple[int, str, str]]:
    """The rows of a captions CSV as (line number, image, stripped description).

    Raises:
      ValueError: when the header lacks the ``image`` and ``description`` columns.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "description"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: expected columns 'image,description', "
                             f"found {reader.fieldnames}")
        return [(reader.line_num, row.get("image") or "", (row.get("description") or "").strip())
                for row in reader]


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
    return {caption_key(image): desc for _, image, desc in read_caption_rows(csv_path)
            if image and desc}


def match_captions(csv_path: str, image_paths: list[str]) -> tuple[dict[str, str], list[str]]:
    """Joins a captions CSV to the images being predicted, whatever way the paths were typed.

    The rule: a row's ``image`` names a file by its base name, with the folder it sits in when
    the row has one (``Black/cup_1.png``, ``./data/Black/cup_1.png`` and ``C:\\x\\Black\\cup_1.png``
    all name ``cup_1.png`` in a folder ``Black``; ``cup_1.png`` alone names that base name in
    any folder). An image matches a row when its base name is the row's and, when the row names
    a folder, its own folder (of its absolute path) has that name; a row with its folder wins
    over one without. Rows naming the same image twice keep the first; empty descriptions leave
    the file-name text.

    Args:
      csv_path: an ``image,description`` CSV.
      image_paths: the files being predicted (as typed or found in folders).

    Returns:
      ({image path: caption}, notes): the notes say how many images matched, which rows
      matched no image and which rows repeat an earlier one (line numbers), one line each.

    Raises:
      ValueError: when the header lacks the two columns.
    """
    by_key, notes, duplicates = {}, [], []
    rows = read_caption_rows(csv_path)
    for line, image, desc in rows:
        key = _row_key(image)
        if key in by_key:
            duplicates.append(f"line {line} repeats line {by_key[key][0]} ({image!r})")
            continue
        by_key[key] = (line, desc)
    matched, used = {}, set()
    for path in image_paths:
        folder, base = caption_key(os.path.abspath(path))
        for key in ((folder, base), (None, base)):
            if key in by_key:
                used.add(key)
                if by_key[key][1]:
                    matched[path] = by_key[key][1]
                break
    unmatched = [f"line {by_key[k][0]} ({_shown_key(k)!r})" for k in by_key if k not in used]
    notes.append(f"captions: {len(matched)} of {len(image_paths)} images got a caption from "
                 f"{csv_path} (the rest use their file-name text)")
    if unmatched:
        notes.append(f"captions: {len(unmatched)} rows match no image: "
                     + ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else ""))
    if duplicates:
        notes.append(f"captions: {len(duplicates)} rows name an image again (the first row is "
                     "used): " + ", ".join(duplicates[:5])
                     + (" ..." if len(duplicates) > 5 else ""))
    return matched, notes


def _row_key(image: str) -> tuple[str | None, str]:
    """(folder or None, base name) of a CSV row's ``image`` value."""
    parts = [p for p in image.strip().replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return None, ""
    return (parts[-2] if len(parts) >= 2 and parts[-2] != ".." else None), parts[-1]


def _shown_key(key: tuple[str | None, str]) -> str:
    return key[1] if key[0] is None else f"{key[0]}/{key[1]}"


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
