"""Tests of the synthetic look-alike dataset."""

import csv
import hashlib
import os
import time

import numpy as np
from PIL import Image

from jaxmm.data import captions, synthetic


def _digest(root):
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _files(root, split):
    out = []
    for cls in synthetic.CLASSES:
        d = os.path.join(root, f"CVPR_2024_dataset_{split}", cls)
        out += [(cls, f, os.path.join(d, f)) for f in sorted(os.listdir(d))]
    return out


def test_deterministic_and_fast(tmp_path):
    start = time.perf_counter()
    a = synthetic.generate(str(tmp_path / "a"), per_class=30, seed=3, max_side=256)
    assert time.perf_counter() - start < 60  # ~1.3 s on 2 idle cores; generous when busy
    b = synthetic.generate(str(tmp_path / "b"), per_class=30, seed=3, max_side=256, workers=1)
    c = synthetic.generate(str(tmp_path / "c"), per_class=30, seed=4, max_side=256, workers=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_quirks_and_balance(tmp_path):
    root = synthetic.generate(str(tmp_path), per_class=40, seed=0, max_side=128)
    assert all(len(v) >= 12 for v in synthetic.ITEMS.values())
    train = _files(root, "Train")
    names = [f for _, f, _ in train]
    assert any(" _" in n for n in names)          # "bag _10.png"
    assert any("-" in n for n in names)           # hyphen
    assert any(" " in n.strip() for n in names)   # inner space
    assert any(n[0].isupper() for n in names) and any(n[0].islower() for n in names)
    assert any(not any(ch.isdigit() for ch in n) for n in names)  # no number suffix
    texts = {}
    for cls, f, _ in train:
        texts.setdefault(captions.text_from_filename(f), set()).add(cls)
    assert any(len(v) > 1 for v in texts.values())  # a text shared by two classes
    counts = {c: sum(1 for k, _, _ in train if k == c) for c in synthetic.CLASSES}
    assert counts["Blue"] == max(counts.values()) > 1.8 * counts["TTR"]
    test_counts = {c: sum(1 for k, _, _ in _files(root, "Test") if k == c)
                   for c in synthetic.CLASSES}
    assert test_counts["Blue"] / sum(test_counts.values()) < counts["Blue"] / len(train)
    modes, exts, sizes = set(), set(), []
    for _, f, p in train:
        with Image.open(p) as im:
            modes.add(im.mode)
            sizes.append(max(im.size))
        exts.add(os.path.splitext(f)[1])
    assert {"RGB", "RGBA"} <= modes and {".png", ".jpg"} <= exts
    assert max(sizes) == 128
    with open(os.path.join(root, "train_image_descriptions.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["image"].startswith("/") and r["description"] for r in rows)
    assert 0 < len(train) - len(rows) < 0.2 * len(train)


def _mean_colour(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((16, 16)), np.float32).mean(axis=(0, 1))


def test_image_content_beats_chance(tmp_path):
    root = synthetic.generate(str(tmp_path), per_class=20, seed=1, max_side=64, workers=1)
    classes = list(synthetic.CLASSES)
    feats = {c: [] for c in classes}
    for cls, _, p in _files(root, "Train"):
        feats[cls].append(_mean_colour(p))
    centroids = np.stack([np.mean(feats[c], axis=0) for c in classes])
    test = _files(root, "Test")
    hits = sum(classes[int(np.argmin(((centroids - _mean_colour(p)) ** 2).sum(1)))] == cls
               for cls, _, p in test)
    assert hits / len(test) > 0.4  # chance is 0.25


def test_cli(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--per_class", "4", "--max_side", "32"])
    assert "wrote" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "CVPR_2024_dataset_Val" / "TTR")


def test_label_noise_flips_a_fraction_of_train_and_writes_the_truth(tmp_path):
    clean = synthetic.generate(str(tmp_path / "clean"), per_class=15, seed=4, max_side=48,
                               workers=1)
    noisy = synthetic.generate(str(tmp_path / "noisy"), per_class=15, seed=4, max_side=48,
                               workers=1, label_noise=0.2)
    with open(os.path.join(noisy, synthetic.TRUTH_FILE), newline="", encoding="utf-8") as f:
        truth = list(csv.DictReader(f))
    train = _files(clean, "Train")
    assert len(truth) == round(0.2 * len(train)) > 0
    assert not os.path.exists(os.path.join(clean, synthetic.TRUTH_FILE))
    for row in truth:  # filed under another class, the pixels are those of the true class
        assert row["given"] != row["true"] and row["file"].split("/")[1] == row["given"]
        name = row["file"].split("/")[2]
        with Image.open(os.path.join(noisy, row["file"])) as a, \
                Image.open(os.path.join(clean, "CVPR_2024_dataset_Train", row["true"],
                                        name.replace("_x", ""))) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert len(_files(noisy, "Train")) == len(train)  # moved, none lost or added
    for split in ("Val", "Test"):  # only Train is touched
        assert [f[:2] for f in _files(noisy, split)] == [f[:2] for f in _files(clean, split)]
    again = synthetic.generate(str(tmp_path / "again"), per_class=15, seed=4, max_side=48,
                               workers=1, label_noise=0.2)
    assert _digest(again) == _digest(noisy)


def test_real_size_plans_the_real_counts():
    plan = synthetic._plan(per_class=7, seed=0, max_side=1024, real_size=True)  # per_class ignored
    assert len(plan) == 15_431
    for split in synthetic.SPLITS:
        counts = [sum(1 for p in plan if p[:2] == (split, cls)) for cls in synthetic.CLASSES]
        assert counts == list(synthetic.REAL_COUNTS[split]), split
    assert len({p[:3] for p in plan}) == len(plan)  # one file per (split, class, name)
    assert max(max(p[5]) for p in plan) == 1024
