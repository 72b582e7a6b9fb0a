"""model.json is an exact contract: the reference client examples/predict_standalone.py, run in a
Python where jaxmm (and flax, transformers, every training package) cannot be imported, gives
``jaxmm.predict --model``'s probabilities to 1e-5 on images of several sizes and modes, also
after the bundle's preprocessing, normalisation, text rule and text length are changed and the
model is exported again (so nothing of the default preprocessing is hard-coded in the client).
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.support import REPO, env, read_csv

CLIENT = os.path.join(REPO, "examples", "predict_standalone.py")
# What a client environment lacks: jaxmm itself and everything only jaxmm needs.
ABSENT = ("jaxmm", "flax", "transformers", "optax", "orbax", "grain", "tensorflow_datasets",
          "torch", "ml_collections", "tests", "configs")
# Runs a script with those packages made unimportable.
RUNNER = """
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ImportError("not in a standalone client's environment: " + name)
        return None
sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def images(test_split, tmp_path_factory):
    """Photos of several sizes and modes (grey, 16-bit, palette with transparency, RGBA, JPEG,
    a panorama, a thumbnail), with file names that exercise the text rule."""
    folder = tmp_path_factory.mktemp("client_images")
    photo = Image.open(test_split[0][0]).convert("RGB")
    made = {
        "Plastic_Bottle_12.png": photo.resize((97, 61)),
        "grey cup 3.png": photo.convert("L").resize((40, 40)),
        "Glass-Jar 7.png": photo.convert("RGBA").resize((50, 70)),
        "Café Crème_2.png": photo.convert("P", palette=Image.ADAPTIVE).resize((33, 33)),
        "panorama_1.jpg": photo.resize((300, 40)),
        "thumb.png": photo.resize((9, 12)),
    }
    paths = []
    for name, img in made.items():
        if name.startswith("Café"):
            img.info["transparency"] = 0
        paths.append(str(folder / name))
        img.save(paths[-1], **({"quality": 90} if name.endswith(".jpg") else {}))
    deep = np.linspace(0, 65535, 48 * 30).reshape(30, 48).astype(np.uint16)
    paths.append(str(folder / "deep_16bit.png"))
    Image.fromarray(deep).save(paths[-1])  # uint16: mode I;16
    return paths


def _client(bundle_dir, files, cwd, texts=()):
    """{file: (text, probabilities)} from the reference client in an environment without
    jaxmm (isolated mode, outside the repository, with the packages above unimportable)."""
    environ = {k: v for k, v in env(1).items() if k != "PYTHONPATH"}
    args = [a for t in texts for a in ("--text", t)]
    proc = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER.format(absent=ABSENT), CLIENT, bundle_dir, *files,
         *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["file"]: (r["text"], r["probabilities"]) for r in rows}


def _jaxmm(bundle_dir, files, out, texts=()):
    args = [a for t in texts for a in ("--text", t)]
    proc = subprocess.run([sys.executable, "-m", "jaxmm.predict", "--model", bundle_dir, *files,
                           *args, "--out", str(out)], cwd=REPO, env=env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["file"]: (r["text"], {k[2:]: float(v) for k, v in r.items() if k[:2] == "p_"})
            for r in read_csv(out)}


def _same(client, jaxmm_rows):
    assert sorted(client) == sorted(jaxmm_rows)
    for name, (text, probs) in jaxmm_rows.items():
        assert client[name][0] == text, name
        np.testing.assert_allclose([client[name][1][c] for c in probs], list(probs.values()),
                                   atol=1e-5, err_msg=name)


def test_the_client_environment_has_no_jaxmm(tmp_path):
    """The negative control of the runner: importing jaxmm there fails."""
    probe = RUNNER.format(absent=ABSENT).replace(
        "runpy.run_path(sys.argv[0], run_name=\"__main__\")", "import jaxmm")
    proc = subprocess.run([sys.executable, "-I", "-c", probe, "x"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not in a standalone client's environment" in proc.stderr


def test_client_equals_jaxmm_predict(trained_run, images, tmp_path):
    from jaxmm.trained import bundle

    out = str(tmp_path / "calibrated")
    record = bundle.export_run(trained_run, out)  # with the run's fitted temperature
    assert record["model"]["calibration"]["temperature"] > 0
    _same(_client(out, images, tmp_path), _jaxmm(out, images, tmp_path / "a.csv"))
    given = ["plastic bottle"]
    _same(_client(out, images[:3], tmp_path, given),
          _jaxmm(out, images[:3], tmp_path / "b.csv", given))


def test_client_follows_changed_preprocessing(trained_run, images, tmp_path):
    from jaxmm.trained import bundle
    from jaxmm.trained.model import ModelSpec, TrainedModel
    from jaxmm.trained.workdir import Workdir

    trained = Workdir(trained_run).load_model("best")
    spec = trained.spec
    pre = dataclasses.replace(
        spec.preprocessing, stored_size=56, crop_size=40, max_text_length=12,
        stored_format="png", crop_fraction=0.8, resize_resample="lanczos",
        crop_resample="bicubic", max_aspect=1.5,
        text_rule=(("replace", "-", " "), *spec.preprocessing.text_rule))
    arch = {**spec.architecture, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25]}
    changed = ModelSpec(spec.class_names, arch, pre, temperature=1.7)
    out = str(tmp_path / "changed")
    bundle.write_bundle(out, TrainedModel(changed, changed.build_model(), trained.variables,
                                          trained.tokenizer, trained.step), source={})
    ours = _jaxmm(out, images, tmp_path / "c.csv")
    _same(_client(out, images, tmp_path), ours)
    assert ours[images[2]][0] == "glass jar"  # the changed rule: hyphen to space
    default = str(tmp_path / "default")
    bundle.export_run(trained_run, default)
    before = _jaxmm(default, images, tmp_path / "d.csv")
    assert before[images[2]][0] == "glassjar"
    assert max(abs(ours[f][1][c] - before[f][1][c]) for f in images for c in ours[f][1]) > 1e-3
