"""Export bundles: the same probabilities as evaluation on both engines, no pickle, no training
packages on the load path, a persistent compilation cache, and one-line errors for bad bundles.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import without_shared_cache
from tests.test_eval_report import REPO, _env, _read_csv, trained_run  # noqa: F401

TRAINING_ONLY = ("orbax", "grain", "tensorflow_datasets", "optax")


@pytest.fixture(scope="module")
def bundle_dir(trained_run, tmp_path_factory):  # noqa: F811
    """The demo run exported without its temperature, so probabilities compare with the raw
    ones of evaluation (the calibrated path has its own test below)."""
    from jaxmm import bundle_writer, paths

    root = tmp_path_factory.mktemp("bundle")
    run = str(root / "run")
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(
        paths.CALIBRATION_FILE, paths.JAX_CACHE_DIR))
    out = str(root / "garbage")
    bundle_writer.export_run(run, out, "best")
    return out


@pytest.fixture(scope="module")
def expected(trained_run):  # noqa: F811
    """Test-split probabilities of jaxmm's evaluation, with the raw file of every example."""
    from jaxmm import restore, scoring

    evaluator = scoring.SplitEvaluator(restore.load_run(trained_run, "best", axis_name="batch"),
                                       "test")
    run = evaluator.run
    _, predictions = evaluator(collect=True)
    files = [os.path.join(run.config.data_dir, evaluator.source[int(i)]["file_name"].decode())
             for i in predictions["index"]]
    texts = [evaluator.source[int(i)]["text"].decode() for i in predictions["index"]]
    return files, texts, predictions["probs"]


def test_bundle_is_self_describing_and_pickle_free(bundle_dir):
    from jaxmm import bundle, paths

    spec = bundle.read_spec(bundle_dir)
    assert spec["format_version"] == bundle.FORMAT_VERSION
    assert spec["function"]["platforms"] == ["cpu", "cuda"]
    assert spec["calibration"] is None  # exported without the run's calibration.json
    pre = spec["preprocessing"]
    assert (pre["stored_size"], pre["crop_size"], pre["text"]["max_text_length"]) == (40, 32, 16)
    assert spec["versions"]["jax"] and spec["architecture"]["image_arch"] == "tiny"
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


def test_tokenizer_matches_the_runs_transformers_tokenizer(bundle_dir, trained_run):  # noqa: F811
    from jaxmm import bundle, restore
    from jaxmm.data import transforms

    run = restore.load_run(trained_run, "best")
    texts = ["plastic bottle", "", "glass jar " * 20, "Égg shells, ÜBER-long!", "x"]
    want = transforms.TokenizeBatch(run.tokenizer, 16)({"text": list(texts)})
    spec = bundle.read_spec(bundle_dir)
    ids, mask = bundle.Tokenizer(bundle_dir, spec["preprocessing"]["text"])(texts)
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
    spec_path = os.path.join(copy, paths.BUNDLE_SPEC_FILE)
    with open(spec_path) as f:
        spec = json.load(f)
    spec["calibration"] = {"temperature": 2.5}
    with open(spec_path, "w") as f:
        json.dump(spec, f)
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
    from jaxmm import bundle, paths

    path = os.path.join(copy, paths.BUNDLE_SPEC_FILE)
    spec = json.load(open(path))
    spec["format_version"] = bundle.FORMAT_VERSION + 1
    json.dump(spec, open(path, "w"))
    return paths.BUNDLE_SPEC_FILE, "newer than this jaxmm"


def _wrong_shape(copy):
    from safetensors.numpy import load_file, save_file

    from jaxmm import paths

    path = os.path.join(copy, paths.BUNDLE_WEIGHTS_FILE)
    flat = load_file(path)
    hidden, classes = flat["params/head/out/kernel"].shape
    flat["params/head/out/kernel"] = np.zeros((hidden, classes + 1), np.float32)
    save_file(flat, path)
    return paths.BUNDLE_WEIGHTS_FILE, f"params/head/out/kernel has shape ({hidden}, {classes + 1})"


def _missing(name):
    def remove(copy):
        path = os.path.join(copy, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return name, "missing"
    remove.__name__ = f"missing_{name}"
    return remove


@pytest.mark.parametrize("damage", [
    _newer_version, _wrong_shape, _missing("model.json"), _missing("weights.safetensors"),
    _missing("predict.jaxexport"), _missing("tokenizer")], ids=lambda f: f.__name__)
@pytest.mark.parametrize("engine", ["exported", "model"])
def test_bad_bundles_fail_in_one_line_naming_the_file(bundle_dir, tmp_path, damage, engine):
    import jaxmm
    from jaxmm import bundle

    copy = _broken_copy(bundle_dir, tmp_path, "broken")
    name, words = damage(copy)
    if engine == "model" and name == "predict.jaxexport":
        jaxmm.Classifier.load(copy, engine="model", cache_dir="")  # not needed there
        return
    with pytest.raises(bundle.BundleError) as info:
        jaxmm.Classifier.load(copy, engine=engine, cache_dir="")
    message = str(info.value)
    assert "\n" not in message and words in message
    assert os.path.join(copy, name.split("/")[0]) in message


def test_bundle_path_imports_no_training_package_and_caches_compilation(bundle_dir, expected,
                                                                        tmp_path):
    files, texts, probs = expected
    copy = str(tmp_path / "fresh")
    shutil.copytree(bundle_dir, copy)
    script = (
        "import sys, json, jaxmm\n"
        "assert 'jax' not in sys.modules, 'import jaxmm imports jax'\n"
        f"p = jaxmm.Classifier.load({copy!r}).predict([{files[0]!r}], [{texts[0]!r}]).probs\n"
        "print(json.dumps({'probs': p.tolist(), 'modules': sorted(sys.modules)}))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=without_shared_cache(_env(1)),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(result["probs"][0], probs[0], atol=1e-5)
    roots = {m.split(".")[0] for m in result["modules"]}
    assert not roots & set(TRAINING_ONLY + ("flax", "transformers")), roots & set(TRAINING_ONLY)
    cache = os.path.join(copy, "jax_cache")
    assert os.path.isdir(cache) and os.listdir(cache)  # the next start reuses the compilation


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
