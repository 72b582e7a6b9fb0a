"""Tests of the grain train/eval pipelines."""

import io

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from jaxmm.data import pipeline, prepared, transforms
from tests.support import demo_dataset


class FakeSource:
    """n records whose label is the record index (to track order) and a JPEG image."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        buf = io.BytesIO()
        Image.new("RGB", (40, 36), (i % 256, 50, 100)).save(buf, format="JPEG")
        return {"image": buf.getvalue(), "text": f"item {i}".encode(), "label": i,
                "file_name": b"x"}


@pytest.fixture(scope="module")
def tok():
    _, ds_dir = demo_dataset()
    return prepared.get_tokenizer(ConfigDict(dict(tokenizer="")), ds_dir)


def _config(**kw):
    base = dict(seed=0, image_size=24, max_text_length=8, color_jitter=0.0, num_workers=0)
    base.update(kw)
    return ConfigDict(base)


def _train(config, source, tok, b=4, p=0, pc=1, epochs=1):
    return pipeline.make_train_iter(config, source, tok, local_batch_size=b, process_index=p,
                                    process_count=pc, num_epochs=epochs)


def test_train_batches_shapes_and_epochs(tok):
    src = FakeSource(23)
    batches = list(_train(_config(color_jitter=0.2), src, tok, b=4, epochs=2))
    assert len(batches) == 2 * (23 // 4)
    b = batches[0]
    assert b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.uint8
    assert b["input_ids"].shape == (4, 8) and b["input_ids"].dtype == np.int32
    assert b["attention_mask"].dtype == np.int32 and b["label"].dtype == np.int32
    assert set(b) == {"image", "input_ids", "attention_mask", "label"}
    e1 = np.concatenate([x["label"] for x in batches[:5]])
    e2 = np.concatenate([x["label"] for x in batches[5:]])
    assert len(set(e1)) == len(e1) == 20 and len(set(e2)) == 20  # no epoch mixing
    assert not np.array_equal(e1, e2)  # reshuffled per epoch


def test_train_order_deterministic_and_sharded(tok):
    src = FakeSource(30)
    a = [x["label"] for x in _train(_config(), src, tok, b=8)]
    again = list(_train(_config(), src, tok, b=8))
    assert all(np.array_equal(x, y["label"]) for x, y in zip(a, again, strict=True))
    assert all(np.array_equal(x["image"], y["image"])
               for x, y in zip(again, _train(_config(), src, tok, b=8), strict=True))
    other = [x["label"] for x in _train(_config(seed=1), src, tok, b=8)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, other, strict=True))
    shards = [[x["label"] for x in _train(_config(), src, tok, b=2, p=p, pc=4)]
              for p in range(4)]
    for step, global_labels in enumerate(a):  # each global batch is split across processes
        # Contiguous blocks in process order: process p holds rows [p*B, (p+1)*B).
        np.testing.assert_array_equal(np.concatenate([s[step] for s in shards]), global_labels)


def test_augmentation_does_not_depend_on_the_process_split(tok):
    src = FakeSource(32)
    config = _config(color_jitter=0.3)
    whole = list(_train(config, src, tok, b=8))
    parts = [list(_train(config, src, tok, b=4, p=p, pc=2)) for p in range(2)]
    for step, batch in enumerate(whole):
        by_label = {int(lab): img for lab, img in zip(batch["label"], batch["image"],
                                                       strict=True)}
        for part in parts:
            for lab, img in zip(part[step]["label"], part[step]["image"], strict=True):
                np.testing.assert_array_equal(img, by_label[int(lab)])


def test_state_round_trip(tok):
    src = FakeSource(40)
    it = _train(_config(), src, tok, b=4, epochs=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = list(it)
    fresh = _train(_config(), src, tok, b=4, epochs=2)
    fresh.set_state(state)
    again = list(fresh)
    assert len(rest) == len(again) == 17
    for x, y in zip(rest, again, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_workers_do_not_change_batches(tok):
    src = FakeSource(24)
    inproc = list(_train(_config(), src, tok, b=4))
    it = _train(_config(num_workers=2), src, tok, b=4)
    workers = list(it)
    for x, y in zip(inproc, workers, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("n", [1, 7, 37])
@pytest.mark.parametrize("per_device", [1, 3])
@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("process_count", [1, 4])
def test_eval_exactly_once(tok, n, per_device, devices, process_count):
    src = FakeSource(n)
    local = per_device * devices
    expected = pipeline.num_eval_batches(n, local, process_count)
    seen = []
    for p in range(process_count):
        batches = list(pipeline.make_eval_iter(_config(), src, tok, local_batch_size=local,
                                               process_index=p, process_count=process_count))
        assert len(batches) == expected
        for b in batches:
            assert b["image"].shape[0] == local and b["mask"].dtype == np.bool_
            b["image"].reshape(devices, per_device, 24, 24, 3)
            assert np.all((b["index"] >= 0) == b["mask"])
            assert np.array_equal(b["label"][b["mask"]], b["index"][b["mask"]])
            seen += list(b["index"][b["mask"]])
    assert sorted(seen) == list(range(n))


def test_eval_has_no_augmentation(tok):
    raw_dir, ds_dir = demo_dataset()
    src = pipeline.load_splits(ds_dir)["validation"]
    config = _config(image_size=40)
    one = list(pipeline.make_eval_iter(config, src, tok, local_batch_size=5, process_index=0,
                                       process_count=1))
    two = list(pipeline.make_eval_iter(config, src, tok, local_batch_size=5, process_index=0,
                                       process_count=1))
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(one, two, strict=True))
    # The documented view, built here: the central 87.5% of the shorter side, bilinear to 40.
    stored = src[0]["image"]
    stored = (Image.open(io.BytesIO(stored)).convert("RGB") if isinstance(stored, bytes)
              else Image.fromarray(np.asarray(stored)))
    w, h = stored.size
    side = 0.875 * min(w, h)
    box = tuple(round(v) for v in ((w - side) / 2, (h - side) / 2, (w + side) / 2,
                                   (h + side) / 2))
    expected = np.asarray(stored.resize((40, 40), Image.BILINEAR, box=box))
    assert np.array_equal(one[0]["image"][0], expected)
    meta = prepared.dataset_meta(ds_dir)
    assert meta["num_examples"]["validation"] == len(src)
    assert sum(meta["counts"]["train"].values()) == meta["num_examples"]["train"]


def test_orbax_checkpoint_round_trip(tok, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    src = FakeSource(40)
    it = _train(_config(), src, tok, b=4, epochs=2)
    for _ in range(5):
        next(it)
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data_iter",))
    mgr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    rest = list(it)
    fresh = _train(_config(), src, tok, b=4, epochs=2)
    mgr.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    again = list(fresh)
    assert len(rest) == len(again) == 15
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(rest, again, strict=True))


def _inception_crop(img, size, rng):
    """The documented train crop, written out here (torchvision's RandomResizedCrop): area
    8-100 %, aspect ratio 3/4-4/3 drawn log-uniformly, 10 tries, then the central square;
    bilinear resize."""
    w, h = img.size
    for _ in range(10):
        target = w * h * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return np.asarray(img.resize((size, size), Image.BILINEAR,
                                         box=(x, y, x + cw, y + ch)))
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=box))


def test_flip_is_the_mirror_of_the_crop():
    """The train view is the random crop or its exact mirror, drawn from the same rng calls."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8))
    record = {"image": img, "text": b"t", "label": 1}
    seen = set()
    for seed in range(12):
        out = transforms.TrainTransform(16)(record, np.random.default_rng(seed))["image"]
        rng = np.random.default_rng(seed)
        crop = _inception_crop(img, 16, rng)
        flipped = rng.random() < 0.5
        np.testing.assert_array_equal(out, crop[:, ::-1] if flipped else crop)
        seen.add(flipped)
    assert seen == {True, False}


def test_worker_setup_limits_threads_and_keeps_jax_on_cpu(monkeypatch):
    import sys
    import types

    env = {}
    monkeypatch.setattr(pipeline.os, "environ", env)
    # A stand-in for the jax a worker may have imported (the suite's own jax is on the CPU
    # already, so it could not show whether init_worker sets the platform).
    updates = []
    fake_jax = types.SimpleNamespace(config=types.SimpleNamespace(
        update=lambda *args: updates.append(args)))
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    pipeline.init_worker(0, 2)
    assert env["OMP_NUM_THREADS"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert updates == [("jax_platforms", "cpu")]
    monkeypatch.delitem(sys.modules, "jax")
    pipeline.init_worker(0, 2)  # a worker without jax: nothing imports it
    assert "jax" not in sys.modules
    options = pipeline._read_options(2)
    assert options.num_threads == 1 and options.prefetch_buffer_size <= 4  # batches, not records
