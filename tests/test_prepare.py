"""Tests of prepare: report, bad input, idempotence, errors, ensure_prepared."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict
from PIL import Image

from jaxmm import paths
from jaxmm import prepare as prepare_cli
from jaxmm.data import prepared, synthetic
from jaxmm.errors import PrepareError
from tests.support import demo_dataset


def _records(ds_dir, split):
    src = tfds.builder_from_directory(ds_dir).as_data_source(split)
    return {r["file_name"].decode(): r for r in (src[i] for i in range(len(src)))}


def test_report_counts_match_files_on_disk():
    raw, ds_dir = demo_dataset()
    report = json.load(open(os.path.join(os.path.dirname(os.path.dirname(ds_dir)),
                                         paths.REPORT_FILE)))
    for split, folder in (("train", "Train"), ("validation", "Val"), ("test", "Test")):
        for cls in report["class_names"]:
            on_disk = len(os.listdir(os.path.join(raw, f"CVPR_2024_dataset_{folder}", cls)))
            assert report["counts"][split][cls] == on_disk
    assert report["skipped"] == []
    assert report["class_names"] == sorted(synthetic.CLASSES)
    assert report["text_sources"]["train"]["filename"] == report["num_examples"]["train"]
    assert report["options"]["text_source"] == "filename"


def test_builder_from_directory_opens_result():
    _, ds_dir = demo_dataset()
    b = tfds.builder_from_directory(ds_dir)
    assert set(b.info.splits) == {"train", "validation", "test"}
    assert b.info.features["label"].names == sorted(synthetic.CLASSES)
    rec = b.as_data_source("train")[0]
    assert rec["image"].dtype == np.uint8 and rec["image"].shape[2] == 3
    assert min(rec["image"].shape[:2]) == 48
    assert rec["file_name"].decode().startswith("CVPR_2024_dataset_Train/")
    assert isinstance(rec["text"], bytes) and isinstance(int(rec["label"]), int)


def _bad_inputs(black: str) -> dict:
    """Writes every kind of bad or unusual file; returns name -> expected outcome."""
    ok = os.path.join(black, "ok_1.png")
    data = open(ok, "rb").read()
    with open(os.path.join(black, "corrupt_1.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with open(os.path.join(black, "truncated_1.png"), "wb") as f:
        f.write(data[: len(data) // 2])
    open(os.path.join(black, "empty_1.png"), "wb").close()
    with open(os.path.join(black, "notes.txt"), "w") as f:
        f.write("not an image")
    Image.new("1", (9000, 9000)).save(os.path.join(black, "bomb_1.png"))  # 81 Mpx, tiny file
    os.symlink(os.path.join(black, "gone.png"), os.path.join(black, "dangling_1.png"))
    Image.new("L", (40, 30), 100).save(os.path.join(black, "grey_1.png"))
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.save(os.path.join(black, "palette_1.png"), transparency=0)
    Image.fromarray(np.full((30, 40), 32768, np.uint16)).save(os.path.join(black, "deep_1.png"))
    Image.new("RGBA", (40, 30), (10, 200, 10, 128)).save(os.path.join(black, "alpha_1.png"))
    Image.new("RGB", (40, 30), (5, 5, 250)).save(os.path.join(black, "Café_ñandú_2.png"))
    # Passes the decode bound (600,000 px) but would resize to 32 x 19,200,000 px.
    Image.new("L", (600_000, 1), 7).save(os.path.join(black, "strip_1.png"))
    # A phone photo: stored 40 x 30 with an EXIF tag saying "turn 90 degrees" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    phone = Image.new("RGB", (40, 30), (200, 30, 30))
    phone.paste((30, 30, 200), (0, 0, 20, 30))  # left half blue: after turning, the top half
    phone.save(os.path.join(black, "phone_1.jpg"), exif=exif, quality=95)
    return {"corrupt_1.png", "truncated_1.png", "empty_1.png", "notes.txt", "bomb_1.png",
            "dangling_1.png", "strip_1.png"}


@pytest.fixture(scope="module")
def raw_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw_small")
    synthetic.generate(str(root), per_class=3, seed=5, max_side=48, workers=1)
    black = os.path.join(root, "CVPR_2024_dataset_Train", "Black")
    Image.new("RGB", (50, 40), (90, 90, 90)).save(os.path.join(black, "ok_1.png"))
    return str(root)


def test_bad_input_skipped_and_converted(raw_small, tmp_path):
    raw = str(tmp_path / "raw")
    shutil.copytree(raw_small, raw)
    bad = _bad_inputs(os.path.join(raw, "CVPR_2024_dataset_Train", "Black"))
    ds_dir, _ = prepared.prepare(raw, str(tmp_path / "out"), stored_image_size=32, workers=2,
                                log=lambda s: None)
    report = json.load(open(tmp_path / "out" / paths.REPORT_FILE))
    skipped = {os.path.basename(s["file"]): s["reason"] for s in report["skipped"]}
    assert set(skipped) == bad, skipped
    assert "Bomb" in skipped["bomb_1.png"] and "0 bytes" in skipped["empty_1.png"]
    assert "ResizeBombError" in skipped["strip_1.png"], skipped["strip_1.png"]
    assert "over the bound of 50000000 pixels" in skipped["strip_1.png"]
    recs = _records(ds_dir, "train")
    black = "CVPR_2024_dataset_Train/Black/"
    phone = recs[black + "phone_1.jpg"]["image"]
    assert phone.shape == (43, 32, 3)  # turned upright: portrait
    assert phone[:10, :, 2].mean() > 150 and phone[-10:, :, 0].mean() > 150  # blue on top
    for name in ("grey_1.png", "palette_1.png", "deep_1.png", "alpha_1.png", "Café_ñandú_2.png"):
        assert recs[black + name]["image"].shape == (32, 43, 3), name
    assert abs(int(recs[black + "deep_1.png"]["image"].mean()) - 128) < 3  # rescaled, not white
    assert recs[black + "palette_1.png"]["image"][..., 0].mean() > 150
    assert recs[black + "Café_ñandú_2.png"]["text"].decode() == "café ñandú"
    n_files = sum(len(f) for _, _, f in os.walk(os.path.join(raw, "CVPR_2024_dataset_Train")))
    assert report["num_examples"]["train"] + len(bad) == n_files


def test_idempotent_and_rebuild(raw_small, tmp_path):
    raw = str(tmp_path / "raw")
    shutil.copytree(raw_small, raw)
    out = str(tmp_path / "out")
    kw = dict(stored_image_size=32, workers=1, log=lambda s: None)
    assert prepared.prepare(raw, out, **kw)[1]
    assert not prepared.prepare(raw, out, **kw)[1]
    Image.new("RGB", (50, 40), (1, 2, 3)).save(
        os.path.join(raw, "CVPR_2024_dataset_Val", "Blue", "new_1.png"))
    assert prepared.prepare(raw, out, **kw)[1]
    assert not prepared.prepare(raw, out, **kw)[1]
    ds_dir, built = prepared.prepare(raw, out, text_source="caption", **kw)
    assert built
    report = json.load(open(os.path.join(out, paths.REPORT_FILE)))
    t = report["text_sources"]
    assert t["train"]["csv"] > 0 and t["train"]["csv"] + t["train"]["fallback"] == \
        report["num_examples"]["train"]
    assert t["validation"]["fallback"] == report["num_examples"]["validation"]
    assert any("no captions CSV" in w for w in report["warnings"])


def test_user_errors(raw_small, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(raw_small, raw)
    shutil.rmtree(raw / "CVPR_2024_dataset_Test")
    with pytest.raises(PrepareError, match="CVPR_2024_dataset_Test"):
        prepared.prepare(str(raw), str(tmp_path / "o"), log=lambda s: None)
    code = prepare_cli.main(["--data_dir", str(raw), "--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "CVPR_2024_dataset_Test" in err
    (raw / "CVPR_2024_dataset_Test").mkdir()
    with pytest.raises(PrepareError, match="holds no images"):
        prepared.prepare(str(raw), str(tmp_path / "o"), log=lambda s: None)
    (raw / "CVPR_2024_dataset_Test" / "Purple").mkdir()
    with pytest.raises(PrepareError, match="Purple"):
        prepared.prepare(str(raw), str(tmp_path / "o"), log=lambda s: None)
    with pytest.raises(PrepareError, match="does not exist"):
        prepared.prepare(str(tmp_path / "nope"), str(tmp_path / "o"), log=lambda s: None)


def _config(data_dir, out_dir):
    return ConfigDict(dict(
        data_dir=data_dir, prepared_dir=out_dir, class_names=(), text_source="filename",
        stored_image_size=32, tokenizer="", tokenizer_vocab_size=200,
        demo=ConfigDict(dict(enabled=True, per_class=3, max_side=48, seed=0))))


def test_ensure_prepared_demo_and_waiting(tmp_path, monkeypatch):
    config = _config(str(tmp_path / "data"), str(tmp_path / "out"))
    ds_dir = prepared.ensure_prepared(config)
    assert os.path.isfile(os.path.join(ds_dir, "tokenizer", "tokenizer.json"))
    assert os.path.isfile(tmp_path / "out" / paths.DONE_MARKER)
    import jax

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert prepared.ensure_prepared(config, timeout_s=5, poll_s=0.1) == ds_dir
    os.remove(tmp_path / "out" / paths.DONE_MARKER)
    with pytest.raises(PrepareError, match="completion marker"):
        prepared.ensure_prepared(config, timeout_s=0.3, poll_s=0.1)


def test_class_names_from_config(raw_small, tmp_path):
    order = ("TTR", "Green", "Blue", "Black")
    ds_dir, _ = prepared.prepare(raw_small, str(tmp_path / "o"), stored_image_size=32, workers=1,
                                class_names=order, log=lambda s: None)
    assert tfds.builder_from_directory(ds_dir).info.features["label"].names == list(order)
    recs = _records(ds_dir, "train")
    assert all(order[int(r["label"])] == name.split("/")[1] for name, r in recs.items())
    with pytest.raises(PrepareError, match="TTR"):
        prepared.prepare(raw_small, str(tmp_path / "o2"), class_names=order[1:],
                        log=lambda s: None)


def test_failed_rebuild_keeps_previous_dataset(raw_small, tmp_path):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    shutil.copytree(raw_small, raw)
    kw = dict(stored_image_size=32, workers=1, log=lambda s: None)
    ds_dir, _ = prepared.prepare(raw, out, **kw)
    before = len(tfds.builder_from_directory(ds_dir).as_data_source("test"))
    test_dir = os.path.join(raw, "CVPR_2024_dataset_Test")
    for root, _, names in os.walk(test_dir):
        for name in names:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"not an image")
    with pytest.raises(PrepareError, match="no image of split folder .*CVPR_2024_dataset_Test"):
        prepared.prepare(raw, out, **kw)
    assert len(tfds.builder_from_directory(ds_dir).as_data_source("test")) == before
    assert os.path.isfile(os.path.join(out, paths.FINGERPRINT_FILE))
    assert not [n for n in os.listdir(out) if n.startswith(prepared.TMP_PREFIX)]


def test_bad_options_and_out_dir_are_one_line(raw_small, tmp_path, capsys):
    out = str(tmp_path / "o")
    with pytest.raises(PrepareError, match="stored_image_size"):
        prepared.prepare(raw_small, out, stored_image_size=0, log=lambda s: None)
    with pytest.raises(PrepareError, match="workers"):
        prepared.prepare(raw_small, out, workers=-1, log=lambda s: None)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for args in (["--stored_image_size", "0", "--out_dir", out],
                 ["--stored_image_size", "32", "--out_dir", str(afile)],
                 ["--stored_image_size", "32", "--out_dir", str(afile / "sub")]):
        code = prepare_cli.main(["--data_dir", raw_small, "--workers", "1", *args])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith("jaxmm.prepare: error: "), err
    assert "a_file" in err and afile.read_text() == "x"


def test_links_loops_unreadable_and_undecodable_names(raw_small, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    shutil.copytree(raw_small, raw)
    train = raw / "CVPR_2024_dataset_Train"
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    for k in range(2):
        Image.new("RGB", (40, 30), (k, 90, 9)).save(extra / f"linked item_{k}.png")
    os.symlink(extra, train / "Black" / "more")  # a linked sub-folder is followed
    os.symlink(train / "Blue", train / "Blue" / "loop")  # a loop ends
    os.symlink("self_1.png", train / "Green" / "self_1.png")  # a link to itself
    shutil.copy(train / "Black" / "ok_1.png", os.fsencode(train / "TTR") + b"/bad\xff_1.png")
    locked = raw / "CVPR_2024_dataset_Val" / "Blue" / "locked"
    locked.mkdir()
    shutil.copy(train / "Black" / "ok_1.png", locked / "hidden_1.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if path == str(locked):  # as root, chmod cannot make a folder unreadable
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    logs = []
    prepared.prepare(str(raw), str(tmp_path / "out"), stored_image_size=32, workers=1,
                     log=logs.append)
    report = json.load(open(tmp_path / "out" / paths.REPORT_FILE, encoding="utf-8"))
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert "already scanned" in skipped["CVPR_2024_dataset_Train/Blue/loop"]
    assert "symbolic links" in skipped["CVPR_2024_dataset_Train/Green/self_1.png"]
    assert "UTF-8" in skipped["CVPR_2024_dataset_Train/TTR/bad\\xff_1.png"]
    assert "not counted" in skipped["CVPR_2024_dataset_Val/Blue/locked"]
    assert any("locked" in line and "WARNING" in line for line in logs)
    on_disk = len(os.listdir(raw_small + "/CVPR_2024_dataset_Train/Black"))
    assert report["counts"]["train"]["Black"] == on_disk + 2
    recs = _records(paths.dataset_path(str(tmp_path / "out")), "train")
    assert recs["CVPR_2024_dataset_Train/Black/more/linked item_1.png"]["text"] == b"linked item"


def test_demo_data_only_into_a_new_or_empty_folder(tmp_path):
    data = tmp_path / "typo"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    config = _config(str(data), str(tmp_path / "out"))
    with pytest.raises(PrepareError, match="not empty"):
        prepared.ensure_prepared(config)
    assert os.listdir(data) == ["notes.txt"] and not os.path.exists(tmp_path / "out")
    with pytest.raises(PrepareError, match="not empty"):
        synthetic.generate(str(data), per_class=2, max_side=32, workers=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    logs = []
    prepared._generate_demo(_config(str(empty), ""), logs.append)
    assert len(logs) == 1 and "generating synthetic data" in logs[0]
    assert sorted(os.listdir(empty))[0] == "CVPR_2024_dataset_Test"
    prepared._generate_demo(_config(str(empty), ""), logs.append)  # a dataset: left alone
    assert len(logs) == 1
