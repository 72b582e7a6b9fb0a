"""Export bundles: the same probabilities as evaluation on both engines, no pickle, no training
packages on the load path, a persistent compilation cache, and one-line errors for bad bundles.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.support import REPO, without_shared_cache
from tests.support import env as _env
from tests.support import read_csv as _read_csv

TRAINING_ONLY = ("orbax", "grain", "tensorflow_datasets", "optax")


@pytest.fixture(scope="module")
def expected(test_split):
    """Test-split probabilities of jaxmm's evaluation, with the raw file of every example."""
    return test_split


def _rewrite_spec(copy, change):
    """Changes model.json as a tool that re-digests it would (so only the field checks can
    catch the change)."""
    from jaxmm import paths
    from jaxmm.trained import bundle

    path = os.path.join(copy, paths.BUNDLE_SPEC_FILE)
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    change(record)
    record["digests"]["model"] = bundle.json_digest(record["model"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)


def test_bundle_is_self_describing_and_pickle_free(bundle_dir):
    from jaxmm import paths
    from jaxmm.trained import bundle

    spec = bundle.read_record(bundle_dir)
    assert spec["format_version"] == bundle.FORMAT_VERSION
    assert spec["function"]["platforms"] == ["cpu", "cuda"]
    assert spec["model"]["calibration"] is None  # exported without the run's calibration.json
    pre = spec["model"]["preprocessing"]
    assert (pre["stored_size"], pre["crop_size"], pre["max_text_length"]) == (40, 32, 16)
    assert spec["versions"]["jax"] and spec["versions"]["pillow"]
    assert spec["model"]["architecture"]["image_arch"] == "tiny"
    assert spec["model_id"].startswith("jaxmm-") and set(spec["digests"]) >= {
        "model", paths.BUNDLE_WEIGHTS_FILE, paths.BUNDLE_FUNCTION_FILE,
        f"{paths.TOKENIZER_DIR}/tokenizer.json"}
    weights = bundle.read_weights(bundle_dir, spec)
    assert set(weights) == {"params", "batch_stats"} and "head" in weights["params"]
    names = set(os.listdir(bundle_dir))
    assert {paths.BUNDLE_SPEC_FILE, paths.BUNDLE_WEIGHTS_FILE, paths.BUNDLE_FUNCTION_FILE,
            paths.TOKENIZER_DIR} <= names
    for root, _, found in os.walk(bundle_dir):
        for name in found:
            with open(os.path.join(root, name), "rb") as f:
                head = f.read(2)
            # Every pickle (protocol 2 and later) starts with the PROTO opcode 0x80.
            assert not (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"), name
            assert not name.endswith((".pkl", ".pickle", ".bin", ".msgpack")), name


@pytest.mark.parametrize("engine", ["exported", "model"])
def test_bundle_probabilities_equal_evaluation(bundle_dir, expected, engine):
    import jaxmm

    files, texts, probs = expected
    clf = jaxmm.Classifier.load(bundle_dir, engine=engine, batch_size=8, cache_dir="")
    labels, got = clf.predict(files, texts)
    np.testing.assert_allclose(got, probs, atol=1e-5)
    assert labels == [clf.class_names[k] for k in probs.argmax(-1)]
    # Without texts, the file-name rule gives the dataset's own texts (demo data: no captions).
    np.testing.assert_allclose(clf.predict(files[:8]).probs, probs[:8], atol=1e-5)


def test_tokenizer_matches_the_runs_transformers_tokenizer(bundle_dir, trained_run):
    from jaxmm.data import transforms
    from jaxmm.trained import bundle, classifier
    from jaxmm.trained.workdir import Workdir

    tokenizer = Workdir(trained_run).tokenizer()
    texts = ["plastic bottle", "", "glass jar " * 20, "Égg shells, ÜBER-long!", "x"]
    want = transforms.TokenizeBatch(tokenizer, 16)({"text": list(texts)})
    ids, mask = classifier.Tokenizer(bundle_dir, bundle.read_record(bundle_dir))(texts)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])


def test_paths_pil_images_and_arrays_agree(bundle_dir, expected, tmp_path):
    import jaxmm

    files, texts, _ = expected
    clf = jaxmm.Classifier.load(bundle_dir, cache_dir="")
    pil = Image.open(files[0])
    array = np.asarray(pil.convert("RGB"))
    got = clf.predict([files[0], pil, array], [texts[0]] * 3).probs
    np.testing.assert_allclose(got[1:], got[:1].repeat(2, 0), atol=1e-6)
    with pytest.raises(ValueError, match="must be uint8"):
        clf.predict(array.astype(np.float32), "x")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        clf.predict([files[0], str(broken)])


def test_calibration_temperature_divides_the_logits(bundle_dir, expected, tmp_path):
    import jaxmm
    from jaxmm import paths

    copy = str(tmp_path / "calibrated")
    shutil.copytree(bundle_dir, copy, ignore=shutil.ignore_patterns(paths.JAX_CACHE_DIR))
    _rewrite_spec(copy, lambda r: r["model"].update(calibration={"temperature": 2.5}))
    files, texts, probs = expected
    got = jaxmm.Classifier.load(copy, cache_dir="").predict(files[:4], texts[:4]).probs
    z = np.log(probs[:4]) / 2.5
    want = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _broken_copy(bundle_dir, tmp_path, name):
    from jaxmm import paths

    copy = str(tmp_path / name)
    shutil.copytree(bundle_dir, copy, ignore=shutil.ignore_patterns(paths.JAX_CACHE_DIR))
    return copy


def _newer_version(copy):
    from jaxmm import paths
    from jaxmm.trained import bundle

    path = os.path.join(copy, paths.BUNDLE_SPEC_FILE)
    spec = json.load(open(path))
    spec["format_version"] = bundle.FORMAT_VERSION + 1
    json.dump(spec, open(path, "w"))
    return paths.BUNDLE_SPEC_FILE, "newer than this jaxmm"


def _wrong_shape(copy):
    """Weights of another shape, with model.json re-digested: the shape check catches it."""
    from safetensors.numpy import load_file, save_file

    from jaxmm import paths
    from jaxmm.trained import bundle

    path = os.path.join(copy, paths.BUNDLE_WEIGHTS_FILE)
    flat = load_file(path)
    hidden, classes = flat["params/head/out/kernel"].shape
    flat["params/head/out/kernel"] = np.zeros((hidden, classes + 1), np.float32)
    save_file(flat, path)
    digest = bundle.file_digest(path)
    _rewrite_spec(copy, lambda r: r["digests"].update({paths.BUNDLE_WEIGHTS_FILE: digest}))
    return (paths.BUNDLE_WEIGHTS_FILE,
            f"params/head/out/kernel is float32 [{hidden}, {classes + 1}]")


def _changed_weights(copy):
    from safetensors.numpy import load_file, save_file

    from jaxmm import paths

    path = os.path.join(copy, paths.BUNDLE_WEIGHTS_FILE)
    flat = load_file(path)
    flat["params/head/out/bias"] = flat["params/head/out/bias"] + 1.0
    save_file(flat, path)
    return paths.BUNDLE_WEIGHTS_FILE, "changed after export"


def _reordered_classes(copy):
    from jaxmm import paths

    path = os.path.join(copy, paths.BUNDLE_SPEC_FILE)
    record = json.load(open(path))
    record["model"]["class_names"] = record["model"]["class_names"][::-1]
    json.dump(record, open(path, "w"))
    return paths.BUNDLE_SPEC_FILE, "changed after export"


def _swapped_tokenizer(copy):
    from jaxmm import paths

    path = os.path.join(copy, paths.TOKENIZER_DIR, "tokenizer.json")
    record = json.load(open(path))
    record["model"]["vocab"] = dict(reversed(list(record["model"]["vocab"].items())))
    json.dump(record, open(path, "w"))
    return f"{paths.TOKENIZER_DIR}/tokenizer.json", "changed after export"


def _missing(name):
    def remove(copy):
        path = os.path.join(copy, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return name, "missing"
    remove.__name__ = f"missing_{name}"
    return remove


@pytest.mark.parametrize("damage", [
    _newer_version, _wrong_shape, _changed_weights, _reordered_classes, _swapped_tokenizer,
    _missing("model.json"), _missing("weights.safetensors"), _missing("predict.jaxexport"),
    _missing("tokenizer")], ids=lambda f: f.__name__)
@pytest.mark.parametrize("engine", ["exported", "model"])
def test_bad_bundles_fail_in_one_line_naming_the_file(bundle_dir, tmp_path, damage, engine):
    import jaxmm
    from jaxmm.trained import bundle

    copy = _broken_copy(bundle_dir, tmp_path, "broken")
    name, words = damage(copy)
    with pytest.raises(bundle.BundleError) as info:
        jaxmm.Classifier.load(copy, engine=engine, cache_dir="")
    message = str(info.value)
    assert "\n" not in message and words in message, message
    assert os.path.join(copy, name.split("/")[0]) in message, message


def test_bundle_path_imports_no_training_package_and_caches_compilation(bundle_dir, expected,
                                                                        tmp_path):
    files, texts, probs = expected
    copy = str(tmp_path / "fresh")
    shutil.copytree(bundle_dir, copy)
    environ = dict(without_shared_cache(_env(1)), XDG_CACHE_HOME=str(tmp_path / "cache"))
    script = (
        "import sys, json, jaxmm\n"
        "assert 'jax' not in sys.modules, 'import jaxmm imports jax'\n"
        f"p = jaxmm.Classifier.load({copy!r}).predict([{files[0]!r}], [{texts[0]!r}]).probs\n"
        "print(json.dumps({'probs': p.tolist(), 'modules': sorted(sys.modules)}))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=environ, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(result["probs"][0], probs[0], atol=1e-5)
    roots = {m.split(".")[0] for m in result["modules"]}
    assert not roots & set(TRAINING_ONLY + ("flax", "transformers")), roots & set(TRAINING_ONLY)
    # The compiled programs stay on the user's side; the bundle holds no native code.
    cache = tmp_path / "cache" / "jaxmm" / "jax_cache"
    assert os.path.isdir(cache) and os.listdir(cache)  # the next start reuses the compilation
    assert sorted(os.listdir(copy)) == sorted(os.listdir(bundle_dir))


def _predict(*args):
    return subprocess.run([sys.executable, "-m", "jaxmm.predict", *args], env=_env(1), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_predict_cli_with_only_the_bundle(bundle_dir, expected, tmp_path):
    files, texts, probs = expected
    copy = str(tmp_path / "elsewhere" / "bundle")  # a copy that knows nothing of the run
    shutil.copytree(bundle_dir, copy)
    folder = tmp_path / "photos"
    (folder / "Blue").mkdir(parents=True)
    for f in files[:3]:
        shutil.copy(f, folder / "Blue" / os.path.basename(f))
    (folder / "Blue" / "corrupt.png").write_bytes(b"\x89PNG truncated")
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("image,description\n/far/away/Blue/" + os.path.basename(files[0])
                        + ",a tin can\n")
    out = tmp_path / "preds.csv"
    proc = _predict("--model", copy, str(folder), "--captions", str(csv_path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [x for x in proc.stderr.splitlines() if x.startswith("skipped ")]
    assert len(skipped) == 1 and "corrupt.png" in skipped[0]
    rows = {os.path.basename(r["file"]): r for r in _read_csv(out)}
    assert len(rows) == 3 and rows[os.path.basename(files[0])]["text"] == "a tin can"
    for f, t, p in zip(files[1:3], texts[1:3], probs[1:3], strict=True):
        row = rows[os.path.basename(f)]  # no caption: the file-name text, evaluation's probs
        assert row["text"] == t
        np.testing.assert_allclose([float(row[k]) for k in row if k.startswith("p_")], p,
                                   atol=1e-5)


def test_predict_cli_bad_bundle_is_one_line(bundle_dir, expected, tmp_path):
    copy = _broken_copy(bundle_dir, tmp_path, "broken")
    _wrong_shape(copy)
    proc = _predict("--model", copy, expected[0][0])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1 and "weights.safetensors" in errors[0], proc.stderr[-2000:]
    proc = _predict("--model", copy, "--workdir", copy, expected[0][0])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = _predict("--model", bundle_dir, os.path.dirname(expected[0][0]))  # a folder
    assert proc.returncode == 1 and "give --out" in proc.stderr and "Traceback" not in proc.stderr


def _set(path, value):
    def change(record):
        node = record
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return change


# (model.json field, bad value, words of the message); every field is checked on load.
BAD_FIELDS = [
    ("model.class_names", "Black", "class_names must be a list"),
    ("model.class_names", [1, 2, 3, 4], "class_names must be a list"),
    ("model.class_names", ["a", "a", "b", "c"], "distinct"),
    ("model.class_names", ["a", "b", "c"], r"3 classes|needs float32 \[3\]"),
    ("model.calibration", {"temperature": -1}, "calibration.temperature"),
    ("model.calibration", {"temperature": 0}, "calibration.temperature"),
    ("model.calibration", {"temperature": float("nan")}, "calibration.temperature"),
    ("model.calibration", {"temperature": 1e308}, "calibration.temperature"),
    ("model.calibration", {"temperature": "2"}, "calibration.temperature"),
    ("model.calibration", {"temperature": [2]}, "calibration.temperature"),
    ("model.preprocessing.stored_size", 0, "preprocessing.stored_size"),
    ("model.preprocessing.crop_size", "32", "preprocessing.crop_size"),
    ("model.preprocessing.crop_fraction", 1.5, "preprocessing.crop_fraction"),
    ("model.preprocessing.resize_resample", "cubic", "preprocessing.resize_resample"),
    ("model.preprocessing.stored_format", "gif", "preprocessing.stored_format"),
    ("model.preprocessing.text_rule", [["upper"]], "preprocessing.text_rule"),
    ("model.preprocessing.exif", True, "preprocessing.exif"),
    ("model.preprocessing.exif_transpose", "yes", "preprocessing.exif_transpose"),
    ("model.architecture.modalities", "image", "architecture"),
    ("weights.tensors.params/head/out/bias.dtype", "float16", "needs float16"),
    ("tokenizer.pad_id", "0", "tokenizer.pad_id"),
]
# Fields the exported function fixes: the "model" engine rebuilds the model at any size.
EXPORTED_ONLY = [
    ("model.preprocessing.crop_size", 48, "crop_size 48"),
    ("model.preprocessing.max_text_length", 20, "max_text_length 20"),
]


@pytest.mark.parametrize("engine", ["exported", "model"])
@pytest.mark.parametrize("field, value, words", BAD_FIELDS + EXPORTED_ONLY,
                         ids=[f"{f}={v!r}"[:60] for f, v, _ in BAD_FIELDS + EXPORTED_ONLY])
def test_every_model_json_field_is_checked(bundle_dir, tmp_path, engine, field, value, words):
    import jaxmm
    from jaxmm.errors import BundleError

    copy = _broken_copy(bundle_dir, tmp_path, "bad")
    _rewrite_spec(copy, _set(field, value))
    if engine == "model" and (field, value, words) in EXPORTED_ONLY:
        jaxmm.Classifier.load(copy, engine=engine, cache_dir="")
        return
    with pytest.raises(BundleError) as info:
        jaxmm.Classifier.load(copy, engine=engine, cache_dir="")
    message = str(info.value)
    assert "\n" not in message and re.search(words, message), message
    assert "model.json" in message, message


@pytest.mark.parametrize("field, value, words", [BAD_FIELDS[0], BAD_FIELDS[4], BAD_FIELDS[-1]],
                         ids=["class_names", "temperature", "pad_id"])
def test_the_server_refuses_a_damaged_bundle_in_one_line(bundle_dir, tmp_path, field, value,
                                                         words):
    """The server loads through ``Classifier.load``: the same checks, before it listens."""
    pytest.importorskip("fastapi")
    copy = _broken_copy(bundle_dir, tmp_path, "bad")
    _rewrite_spec(copy, _set(field, value))
    proc = subprocess.run([sys.executable, "-m", "jaxmm.serve", "--model", copy, "--port", "0"],
                          cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert "model.json" in lines[0] and re.search(words, lines[0]), lines[0]
    assert "ready" not in proc.stdout


def test_export_keeps_what_is_not_its_own(trained_run, bundle_dir, tmp_path):
    from jaxmm.errors import ConfigError
    from jaxmm.trained import bundle

    copy = _broken_copy(bundle_dir, tmp_path, "mine")
    (tmp_path / "mine" / "NOTES.md").write_text("my notes")
    bundle.export_run(trained_run, copy, calibrated=False)  # replaces a bundle's own files
    assert (tmp_path / "mine" / "NOTES.md").read_text() == "my notes"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("x")
    (busy / "model.json").write_text("{}")  # named like a bundle file, but no bundle
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for out, words in ((str(busy), "not a jaxmm bundle"), (str(afile), "not a folder"),
                       ("", "--out is empty")):
        with pytest.raises(ConfigError, match=words):
            bundle.export_run(trained_run, out, calibrated=False)
    assert sorted(os.listdir(busy)) == ["model.json", "thesis.tex"] and afile.read_text() == "x"
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # no private folder left


def test_predict_inputs_are_checked(bundle_dir, expected, caplog):
    import jaxmm
    from jaxmm.errors import ConfigError

    files, texts, probs = expected
    clf = jaxmm.Classifier.load(bundle_dir, cache_dir="")
    got = clf.predict((f for f in files[:2]), iter(texts[:2])).probs  # iterables are fine
    np.testing.assert_allclose(got, probs[:2], atol=1e-5)
    with pytest.raises(ValueError, match=r"#0: an image array .* H, W > 0"):
        clf.predict(np.zeros((0, 5, 3), np.uint8), "x")
    with pytest.raises(ValueError, match=r"texts\[1\] must be a string, got int"):
        clf.predict(files[:2], ["a", 3])
    for size in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            jaxmm.Classifier.load(bundle_dir, batch_size=size, cache_dir="")
    clf.predict(np.asarray(Image.open(files[0]).convert("RGB")))
    assert "the empty text is used" in caplog.text


def test_model_card_is_read_from_the_runs_files(trained_run, tmp_path):
    import jaxmm
    from jaxmm import paths
    from jaxmm.trained import bundle

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(paths.JAX_CACHE_DIR,
                                                                    paths.EVAL_DIR))
    out = str(tmp_path / "bundle")
    record = bundle.export_run(str(run), out)
    card = open(os.path.join(out, paths.MODEL_CARD_FILE), encoding="utf-8").read()
    assert card.startswith("---\nlibrary_name: jaxmm\n") and record["model_id"] in card
    assert "was not evaluated on its Test split" in card and "model-index" not in card
    calibration = json.load(open(run / paths.CALIBRATION_FILE))
    assert f"Temperature {calibration['temperature']:.3f}" in card
    assert ", ".join(record["model"]["class_names"]) in card
    assert "Prepare skipped 0 file(s)" in card  # recorded in the run when it started
    assert paths.MODEL_CARD_FILE not in record["digests"]
    test_dir = run / paths.EVAL_DIR / "best" / "test"
    test_dir.mkdir(parents=True)
    names = record["model"]["class_names"]
    counts = [[4, 1, 0, 0], [0, 3, 0, 1], [0, 0, 4, 0], [2, 0, 0, 1]]
    metrics = {"num_examples": 16, "accuracy": 0.75, "balanced_accuracy": 0.7,
               "macro_f1": 0.6875, "confusion_matrix": {"labels": names, "counts": counts}}
    (test_dir / "metrics.json").write_text(json.dumps(metrics))
    bundle.export_run(str(run), out)
    card = open(os.path.join(out, paths.MODEL_CARD_FILE), encoding="utf-8").read()
    assert "accuracy 75.0 %" in card and "value: 0.6875" in card
    assert f"true **{names[3]}** predicted as **{names[0]}**: 66.7 %" in card
    metrics["accuracy"] = 0.5  # a number changes in the run's files: the card follows
    (test_dir / "metrics.json").write_text(json.dumps(metrics))
    bundle.export_run(str(run), out)
    card = open(os.path.join(out, paths.MODEL_CARD_FILE), encoding="utf-8").read()
    assert "accuracy 50.0 %" in card and "accuracy 75.0 %" not in card
    with open(os.path.join(out, paths.MODEL_CARD_FILE), "a", encoding="utf-8") as f:
        f.write("\nA note of mine.\n")  # the card is the user's to edit
    jaxmm.Classifier.load(out, cache_dir="")
