"""Prediction inputs from the outside world, through ``python -m jaxmm.predict --model``: file
names that are not UTF-8, a thin strip that would resize to billions of pixels, a phone photo
with an EXIF orientation tag, a captions CSV typed every which way (with rows that match no
image and rows that repeat), and an ``--out`` that is one of the inputs."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxmm.data import captions
from tests.support import REPO, env


def _predict(bundle_dir, *args):
    return subprocess.run([sys.executable, "-m", "jaxmm.predict", "--model", bundle_dir, *args],
                          cwd=REPO, env=env(1), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photos(test_split, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    black = folder / "Black"
    black.mkdir()
    photo = Image.open(test_split[0][0]).convert("RGB")
    photo.resize((60, 40)).save(black / "cup_1.png")
    photo.resize((50, 50)).save(black / "lid_2.png")
    # A name with bytes that are not UTF-8 (Latin-1 "é" of an old camera or a Windows share).
    odd = os.path.join(os.fsencode(str(black)), b"caf\xe9_3.png")
    photo.resize((40, 60)).save(odd.decode("utf-8", "surrogateescape"))
    Image.new("L", (600_000, 1), 9).save(black / "strip_4.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees": the camera was held sideways
    photo.resize((60, 40)).save(black / "phone_5.jpg", exif=exif, quality=95)
    return folder


def test_names_strips_and_exif_photos(bundle_dir, photos, tmp_path):
    out = tmp_path / "preds.csv"
    proc = _predict(bundle_dir, str(photos), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_bytes().decode("utf-8")  # valid UTF-8 whatever the names were
    assert "caf\\xe9_3.png" in text
    rows = text.splitlines()
    assert len(rows) == 1 + 4  # header, cup, lid, café, phone; the strip is skipped
    strip = [line for line in proc.stderr.splitlines() if "strip_4.png" in line]
    assert len(strip) == 1 and "over the bound of 50000000 pixels" in strip[0], proc.stderr
    assert not any(name.startswith(".preds.csv.tmp") for name in os.listdir(tmp_path))


def test_exif_orientation_follows_the_recorded_preprocessing(bundle_dir, photos):
    from jaxmm.trained.bundle import read_record
    from jaxmm.trained.model import Preprocessing

    pre = read_record(bundle_dir)["model"]["preprocessing"]
    assert pre["exif_transpose"] is True  # a dataset prepared now turns phone photos upright
    phone = str(photos / "Black" / "phone_5.jpg")
    upright = Preprocessing.from_json(pre, "x").image_view()
    as_before = Preprocessing.from_json({k: v for k, v in pre.items()
                                         if k != "exif_transpose"}, "x").image_view()
    # Turned by hand, as pixels (an array carries no EXIF tag).
    turned = np.asarray(Image.open(phone).transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(upright(phone), upright(turned))
    assert not np.array_equal(upright(phone), as_before(phone))  # older bundles: as decoded
    np.testing.assert_array_equal(as_before(phone), as_before(np.asarray(Image.open(phone))))


def test_out_that_is_an_input_is_refused(bundle_dir, photos):
    image = photos / "Black" / "cup_1.png"
    before = image.read_bytes()
    proc = _predict(bundle_dir, str(image), "--out", str(photos / "Black" / ".." / "Black" /
                                                          "cup_1.png"))
    assert proc.returncode != 0 and image.read_bytes() == before
    last = proc.stderr.strip().splitlines()[-1]
    assert "is one of the input images; give another file" in last, proc.stderr
    proc = _predict(bundle_dir, str(image), "--out", str(photos))
    assert proc.returncode != 0 and "is a folder" in proc.stderr


def test_captions_match_however_the_path_was_typed(photos, tmp_path):
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text(
        "image,description\n"
        "C:\\photos\\Black\\cup_1.png,a paper cup\n"  # Windows path, folder named
        "./lid_2.png,a plastic lid\n"  # base name only: any folder
        "Blue/lid_2.png,wrong folder\n"  # another folder: no match
        "Black/cup_1.png,the same image again\n"  # repeats line 2's image
        "gone_9.png,not predicted\n"
        "Black/strip_4.png,\n", encoding="utf-8")  # empty: file-name text
    images = [str(photos / "Black" / n) for n in ("cup_1.png", "lid_2.png", "strip_4.png")]
    images[0] = os.path.relpath(images[0])  # typed relative to the working directory
    matched, notes = captions.match_captions(str(csv_path), images)
    assert matched == {images[0]: "a paper cup", images[1]: "a plastic lid"}
    assert notes[0].startswith("captions: 2 of 3 images got a caption")
    assert notes[1] == ("captions: 2 rows match no image: line 4 ('Blue/lid_2.png'), line 6 "
                        "('gone_9.png')")
    assert notes[2].startswith("captions: 1 rows name an image again (the first row is used): "
                               "line 5 repeats line 2")
