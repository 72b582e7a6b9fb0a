"""Classifies image files (with texts) using a trained run or an export bundle.

    python -m jaxmm.predict --workdir runs/x PATH... [--checkpoint best]
    python -m jaxmm.predict --model bundle/ PATH...      # only the bundle needed, offline
        [--text "plastic bottle" | --captions captions.csv] [--out preds.csv] [--batch_size 16]

PATH is an image file or a folder (searched recursively). Each image's text is ``--text``, its
caption in ``--captions`` (an ``image,description`` CSV) or, as in the dataset, its file name.
Images are preprocessed exactly like evaluation. Files are printed with their probabilities;
with a folder or ``--out`` a CSV is written (default with ``--workdir``:
``<workdir>/predictions.csv``); nothing is written anywhere else. Unreadable files are reported
on stderr, one line each; the exit code is 1 only when nothing was predicted.
Probabilities are calibrated by the fitted temperature when there is one (``--no_calibration``
for raw ones); ``--explain DIR`` (with ``--workdir``) writes one explanation PNG per image and
a gallery.
"""

import os
import sys

from absl import flags

from jaxmm import cli, paths
from jaxmm.errors import ConfigError
from jaxmm.trained.workdir import Workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds config.json).")
_MODEL = flags.DEFINE_string("model", None, "Bundle folder written by jaxmm.export.")
_TEXT = flags.DEFINE_string("text", None, "Text of every image; default: from the file name.")
_CAPTIONS = flags.DEFINE_string("captions", "", "CSV (image,description) of the images' texts.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
_OUT = flags.DEFINE_string("out", "", "CSV file to write (needed for folders with --model).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")
_NO_CALIBRATION = flags.DEFINE_bool("no_calibration", False,
                                    "Raw probabilities even when a temperature was fitted.")
_EXPLAIN = flags.DEFINE_string("explain", "", "Folder for one explanation PNG per image "
                               "(with --workdir).")
flags.mark_flags_as_mutual_exclusive(["workdir", "model"], required=True)


def main(argv):
    if len(argv) < 2:
        raise ConfigError("give at least one image file or folder")
    if _BATCH.value < 1:
        raise ConfigError(f"--batch_size={_BATCH.value} must be at least 1")
    if _WORKDIR.value:  # the run's compiled programs are kept in its workdir
        from jaxmm.training import parallel

        parallel.configure_xla(Workdir(_WORKDIR.value).file(paths.JAX_CACHE_DIR))
    cli.setup_logging()
    from jaxmm import files
    from jaxmm.trained import classify

    images, problems, any_folder = classify.find_images(argv[1:])
    if not images:
        raise ConfigError(files.printable("; ".join(problems)))
    if any_folder and _MODEL.value and not _OUT.value:
        raise ConfigError("give --out FILE.csv for the predictions of a folder")
    _check_out(_OUT.value, images)
    if _EXPLAIN.value and _MODEL.value:
        raise ConfigError("--explain needs --workdir (a bundle has no gradients)")
    predictor = classify.open_predictor(_WORKDIR.value, _MODEL.value, _CHECKPOINT.value,
                                        _BATCH.value, not _NO_CALIBRATION.value)
    notes = []
    text = classify.text_rule(_TEXT.value, _CAPTIONS.value, predictor.spec, images, notes)
    for line in notes:
        print(line, file=sys.stderr)
    rows, unreadable = classify.predict_files(predictor, images, text)
    for line in problems + unreadable:
        print(f"skipped {files.printable(line)}", file=sys.stderr)
    names = predictor.class_names
    out = _OUT.value or (Workdir(_WORKDIR.value).file(paths.PREDICTIONS_FILE)
                         if any_folder else "")
    if out:
        files.write_csv(out, rows, ["file", "text", "predicted", "confidence"]
                        + [f"p_{c}" for c in names])
        print(f"{len(rows)} predictions written to {os.path.abspath(out)}")
    for r in [] if out else rows:
        probs = "  ".join(f"{c} {r[f'p_{c}']:.3f}" for c in names)
        print(f"{files.printable(r['file'])}: {r['predicted']} ({r['confidence']:.3f})  text "
              f"'{files.printable(r['text'])}'  [{probs}]")
    if _EXPLAIN.value and rows:
        written = classify.explain_files(predictor, rows, _EXPLAIN.value)
        print(f"{len(written)} explanation figures written to {os.path.abspath(_EXPLAIN.value)}")
    if not rows:
        sys.exit(1)


def _check_out(out: str, images: list[str]) -> None:
    """Refuses an --out that would destroy an input image or cannot be a file."""
    if not out:
        return
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a folder; give a CSV file name")
    target = os.path.realpath(out)
    for image in images:
        if os.path.realpath(image) == target:
            raise ConfigError(f"--out {out} is one of the input images; give another file")
    if not os.path.isdir(os.path.dirname(target)):
        raise ConfigError(f"--out {out}: the folder {os.path.dirname(target)} does not exist")


def run():
    """Console-script entry point (``jaxmm-predict``)."""
    cli.run(main, "jaxmm.predict")


if __name__ == "__main__":
    run()
