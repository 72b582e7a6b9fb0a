"""Classifies image files (with texts) using a trained run.

    python -m jaxmm.predict --workdir runs/x PATH... [--text "plastic bottle"]
        [--checkpoint best] [--out preds.csv] [--batch_size 16]

PATH is an image file or a folder (searched recursively). Each image's text is ``--text`` or,
as in the dataset, derived from its file name. Images are preprocessed exactly like evaluation.
Files are printed with their class probabilities; with a folder or ``--out`` a CSV is written
(``<workdir>/predictions.csv`` when ``--out`` is not given; nothing is written anywhere else).
Unreadable files are reported on stderr, one line each, and the rest are still predicted; the
exit code is 1 only when nothing was predicted.
"""

import os
import sys

from absl import flags

from jaxmm import cli, paths
from jaxmm.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds config.json).")
_TEXT = flags.DEFINE_string("text", None, "Text of every image; default: from the file name.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
_OUT = flags.DEFINE_string("out", "", "CSV file to write; default predictions.csv for folders.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) < 2:
        raise ConfigError("give at least one image file or folder")
    if _BATCH.value < 1:
        raise ConfigError(f"--batch_size={_BATCH.value} must be at least 1")
    cli.setup_logging()
    from jaxmm import classify, files, restore

    images, problems, any_folder = classify.find_images(argv[1:])
    if not images:
        raise ConfigError("; ".join(problems))
    run = restore.load_run(_WORKDIR.value, _CHECKPOINT.value)
    rows, unreadable = classify.predict_files(classify.Predictor(run, _BATCH.value), images,
                                              _TEXT.value)
    for line in problems + unreadable:
        print(f"skipped {line}", file=sys.stderr)
    out = _OUT.value or (paths.in_workdir(_WORKDIR.value, paths.PREDICTIONS_FILE)
                         if any_folder else "")
    if out:
        columns = ["file", "text", "predicted", "confidence"] + [f"p_{c}" for c in run.class_names]
        files.write_csv(out, rows, columns)
        print(f"{len(rows)} predictions written to {os.path.abspath(out)}")
    else:
        for r in rows:
            probs = "  ".join(f"{c} {r[f'p_{c}']:.3f}" for c in run.class_names)
            print(f"{r['file']}: {r['predicted']} ({r['confidence']:.3f})  text '{r['text']}'  "
                  f"[{probs}]")
    if not rows:
        sys.exit(1)


def run():
    """Console-script entry point (``jaxmm-predict``)."""
    cli.run(main, "jaxmm.predict")


if __name__ == "__main__":
    run()
