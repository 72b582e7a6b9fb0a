"""Tests of the file-name text rule and the captions CSV join."""

import pytest

from jaxmm.data import captions


@pytest.mark.parametrize("name, text", [
    ("Plastic_Bottle_12.png", "plastic bottle"),
    ("bag _10.png", "bag"),
    ("non-stretchy plastic_5.png", "nonstretchy plastic"),
    ("Chip Bag.png", "chip bag"),
    ("Styrofoam  Cup 3.JPG", "styrofoam cup"),
    ("Battery.png", "battery"),
    ("CVPR_2024_dataset_Train/Blue/Soup Can_2.png", "soup can"),
    ("Café_Crème_2.png", "café crème"),
    ("123.png", ""),
])
def test_text_from_filename(name, text):
    assert captions.text_from_filename(name) == text


def _write_csv(path, rows):
    path.write_text("image,description\n" + "".join(f"{a},{b}\n" for a, b in rows),
                    encoding="utf-8")


def test_join_on_class_and_basename_with_foreign_paths(tmp_path):
    csv_path = tmp_path / "train_image_descriptions.csv"
    _write_csv(csv_path, [
        ("/cluster/x/CVPR_2024_dataset_Train/Black/spoon_1.png", "A white spoon on a table."),
        ("C:\\data\\CVPR_2024_dataset_Train\\Blue\\spoon_1.png", "A blue spoon."),
        ("/other/Black/empty.png", ""),
    ])
    table = captions.load_captions(str(csv_path))
    assert table[("Black", "spoon_1.png")] == "A white spoon on a table."
    assert table[("Blue", "spoon_1.png")] == "A blue spoon."
    assert ("Black", "empty.png") not in table  # empty description falls back

    rel = "CVPR_2024_dataset_Train/Black/spoon_1.png"
    assert captions.sample_text(rel, "caption", table) == ("A white spoon on a table.", True)
    assert captions.sample_text(rel, "both", table) == (
        "spoon. A white spoon on a table.", True)
    assert captions.sample_text(rel, "filename", table) == ("spoon", False)
    missing = "CVPR_2024_dataset_Train/Green/spoon_1.png"
    assert captions.sample_text(missing, "caption", table) == ("spoon", False)
    assert captions.sample_text(missing, "both", None) == ("spoon", False)


def test_bad_csv_header_and_source(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("path,text\na,b\n")
    with pytest.raises(ValueError, match="image,description"):
        captions.load_captions(str(bad))
    with pytest.raises(ValueError, match="text_source"):
        captions.sample_text("a/b.png", "nope", None)


def test_caption_csv_path():
    assert captions.caption_csv_path("/r", "Val").endswith("val_image_descriptions.csv")
