"""Tests of the cross-split copy check: hashes, pair search, and prepare's report."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxmm import paths
from jaxmm.data import dedup, prepared, synthetic, transforms


def _stored(img: Image.Image, size: int = 48) -> Image.Image:
    return transforms.resize_shorter(transforms.to_rgb(img), size)


def _copy(img: Image.Image, scale: float, quality: int) -> Image.Image:
    small = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    small.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def _hashes(img: Image.Image) -> tuple:
    stored = _stored(img)
    return dedup.exact_hash(stored, img.size), dedup.perceptual_hash(stored), \
        dedup.thumbnail(stored)


def test_copies_match_and_distinct_images_do_not():
    images = [synthetic.render(cls, seed, (160, 120))
              for seed, cls in enumerate(synthetic.CLASSES * 6)]
    train = [(f"t{k}", *_hashes(im)) for k, im in enumerate(images)]
    copies = [(f"c{k}/{scale}", *_hashes(_copy(im, scale, quality)))
              for k, im in enumerate(images) for scale, quality in ((0.5, 70), (1.0, 85))]
    found = dedup.find_duplicates({"train": train, "test": copies})
    assert {tuple(p["files"]) for p in found["pairs"]} == {
        (f"t{c[0].split('/')[0][1:]}", c[0]) for c in copies}
    assert found["exact"] == 0 and found["near"] == len(copies)
    assert dedup.find_duplicates({"train": train[:12], "test": train[12:]})["pairs"] == []


def test_find_duplicates_pairs_only_across_splits():
    grey, white = bytes(768), bytes([255]) * 768
    hashes = {
        "train": [("t/a.png", "A", 0b1111, grey), ("t/b.png", "B", 0xFFFF_0000_0000_0000, grey),
                  ("t/a2.png", "A", 0b1111, grey)],
        "validation": [("v/x.png", "X", 0b1111 ^ 0b11, grey)],  # 2 bits from a.png
        "test": [("s/a.bmp", "A", 0b1111, grey), ("s/c.png", "C", 0x0F0F_0F0F_0F0F_0F0F, grey),
                 ("s/w.png", "W", 0b1111, white)],  # same hash, other colours: not a copy
    }
    d = dedup.find_duplicates(hashes, max_distance=2)
    got = {(p["kind"], *p["files"], p["distance"]) for p in d["pairs"]}
    assert got == {("near", "t/a.png", "v/x.png", 2), ("near", "t/a2.png", "v/x.png", 2),
                   ("exact", "t/a.png", "s/a.bmp", 0), ("exact", "t/a2.png", "s/a.bmp", 0),
                   ("near", "v/x.png", "s/a.bmp", 2)}
    assert d["exact"] == 2 and d["near"] == 3
    assert d["counts"] == {"train/validation": 2, "train/test": 2, "validation/test": 1}
    assert dedup.files_with_copy_in(d, "test", "train") == {"s/a.bmp"}
    assert "2 exact, 3 near" in dedup.summary_line(d)
    assert dedup.find_duplicates({"train": hashes["train"]})["pairs"] == []  # same split
    within = dedup.find_within(hashes, max_distance=2)  # copies inside one split
    assert [(p["kind"], p["split"], *p["files"]) for p in within["pairs"]] == [
        ("exact", "train", "t/a.png", "t/a2.png")]
    assert within["counts"] == {"train": 1} and "train 1" in dedup.within_line(within)


@pytest.fixture(scope="module")
def raw_planted(tmp_path_factory):
    """Synthetic data with an exact copy (other format) and a near copy of Train images."""
    root = str(tmp_path_factory.mktemp("planted") / "raw")
    synthetic.generate(root, per_class=20, seed=2, max_side=96, workers=1)
    train = os.path.join(root, "CVPR_2024_dataset_Train", "Blue")
    a, b, c = sorted(f for f in os.listdir(train) if f.endswith(".png"))[:3]
    with Image.open(os.path.join(train, a)) as im:  # same pixels, another format and name
        im.convert("RGB").save(os.path.join(root, "CVPR_2024_dataset_Test", "Blue", "copy.bmp"))
    with Image.open(os.path.join(train, b)) as im:  # resized to 70 % and re-encoded
        _copy(im, 0.7, 75).save(os.path.join(root, "CVPR_2024_dataset_Val", "Green", "near.jpg"))
    with Image.open(os.path.join(train, c)) as im:  # a near copy in Train under another label
        _copy(im, 0.8, 80).save(os.path.join(root, "CVPR_2024_dataset_Train", "Green",
                                             "c_copy.jpg"))
    return root, f"CVPR_2024_dataset_Train/Blue/{a}", f"CVPR_2024_dataset_Train/Blue/{b}", \
        f"CVPR_2024_dataset_Train/Blue/{c}"


def test_prepare_reports_planted_copies_and_nothing_else(raw_planted, tmp_path):
    raw, exact_src, near_src, within_src = raw_planted
    logs = []
    ds_dir, _ = prepared.prepare(raw, str(tmp_path / "out"), stored_image_size=48, workers=1,
                                 log=logs.append)
    with open(tmp_path / "out" / paths.REPORT_FILE, encoding="utf-8") as f:
        dups = json.load(f)["duplicates"]
    got = {(p["kind"], *p["splits"], *p["files"]) for p in dups["pairs"]}
    assert got == {
        ("exact", "train", "test", exact_src, "CVPR_2024_dataset_Test/Blue/copy.bmp"),
        ("near", "train", "validation", near_src, "CVPR_2024_dataset_Val/Green/near.jpg")}
    assert all(0 <= p["distance"] <= dedup.MAX_DISTANCE for p in dups["pairs"])
    assert any("1 exact, 1 near" in line for line in logs[-1].splitlines())
    within = {(p["kind"], p["split"], *p["files"]) for p in dups["within"]["pairs"]}
    assert within == {("near", "train", within_src, "CVPR_2024_dataset_Train/Green/c_copy.jpg")}
    assert dups["within"]["counts"] == {"train": 1}
    with open(os.path.join(ds_dir, paths.META_FILE), encoding="utf-8") as f:
        assert json.load(f)["duplicates"] == dups


def test_no_copies_reported_without_planted_ones(raw_planted, tmp_path):
    raw = str(tmp_path / "raw")
    shutil.copytree(raw_planted[0], raw)
    os.remove(os.path.join(raw, "CVPR_2024_dataset_Test", "Blue", "copy.bmp"))
    os.remove(os.path.join(raw, "CVPR_2024_dataset_Val", "Green", "near.jpg"))
    os.remove(os.path.join(raw, "CVPR_2024_dataset_Train", "Green", "c_copy.jpg"))
    prepared.prepare(raw, str(tmp_path / "out"), stored_image_size=48, workers=1,
                     log=lambda s: None)
    with open(tmp_path / "out" / paths.REPORT_FILE, encoding="utf-8") as f:
        report = json.load(f)
    assert report["duplicates"]["pairs"] == [] and sum(report["num_examples"].values()) > 120
    assert report["duplicates"]["within"] == {"counts": {}, "pairs": []}


def test_pair_search_at_real_size_is_blockwise(monkeypatch):
    """The real dataset's split sizes: planted copies are found, random hashes are not, and the
    search compares blocks of 512 hashes per NumPy call, never pairs one by one in Python
    (its speed is measured in docs/benchmarks.md, not asserted here)."""
    rng = np.random.default_rng(0)
    sizes = {"train": 10_200, "validation": 1_800, "test": 3_431}
    thumb = bytes(range(64))
    hashes = {s: [(f"{s}/{i}", f"{s}{i}", int(h), thumb) for i, h in enumerate(
        rng.integers(0, 2**62, n, dtype=np.int64))] for s, n in sizes.items()}
    # Two near copies of train images in test: 2 bits flipped, same thumbnail.
    for i, j in ((5, 7), (9_999, 3_000)):
        h = hashes["train"][i][2] ^ 0b101
        hashes["test"][j] = (f"test/{j}", f"test{j}", h, thumb)
    calls = []
    count = np.bitwise_count
    monkeypatch.setattr(np, "bitwise_count", lambda x: (calls.append(x.shape), count(x))[1])
    found = dedup.find_duplicates(hashes)
    assert [(p["files"], p["distance"], p["kind"]) for p in found["pairs"]] == [
        (["train/5", "test/7"], 2, "near"), (["train/9999", "test/3000"], 2, "near")]
    blocks = lambda n: -(-n // 512)
    assert len(calls) == 2 * blocks(sizes["train"]) + blocks(sizes["validation"])
    assert calls[0] == (512, sizes["validation"])
    assert dedup.find_within(hashes)["pairs"] == []  # the same search inside each split
