"""Evaluates a trained run on a split and writes reports and figures.

    python -m jaxmm.evaluate --workdir runs/x [--split test|validation|train]
        [--checkpoint best|latest|STEP] [--modalities image,text] [--ablation]
        [--exclude_test_duplicates]
        [--calibrate] [--no_calibration] [--explain N]

Writes ``<workdir>/eval/best/<split>/`` (``eval/step_<N>/<split>/`` for ``latest`` and step
numbers; ``<split>-<modalities>`` when towers are masked):
metrics.json, classification_report.txt, predictions.csv, misclassified.csv,
confusion_matrix.png, misclassified.png, reliability_diagram.png (and ablation.json with
``--ablation``, explanations/ with ``--explain``). ``--calibrate`` first fits the temperature
on the validation split into ``<workdir>/calibration.json``; probabilities are calibrated
whenever that file exists, unless ``--no_calibration``. Every example
counts once on any device count; under Slurm (``srun``, one process per GPU) every process
evaluates its share and process 0 writes.
"""

import os

from absl import flags, logging

from jaxmm import cli, paths
from jaxmm.errors import ConfigError
from jaxmm.trained.workdir import Workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds config.json).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation", "train"], "Split to evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
_MODALITIES = flags.DEFINE_list("modalities", [], "Towers to keep, e.g. 'text'; default: all.")
_ABLATION = flags.DEFINE_bool("ablation", False,
                              "Also evaluate image+text, image-only and text-only.")
_EXCLUDE = flags.DEFINE_bool(
    "exclude_test_duplicates", None,
    "On test, also report metrics without the images that have a copy in Train; "
    "default: the run's config.exclude_test_duplicates.")
_CALIBRATE = flags.DEFINE_bool("calibrate", False,
                               "First fit the temperature on validation (calibration.json).")
_NO_CALIBRATION = flags.DEFINE_bool("no_calibration", False,
                                    "Report raw probabilities even with a calibration.json.")
_EXPLAIN = flags.DEFINE_integer("explain", None,
                                "Explain the misclassified examples and the first N.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    # The run's compilation cache: validation compiled the same scoring program in training.
    cli.initialize_distributed(
        Workdir(os.path.abspath(_WORKDIR.value)).file(paths.JAX_CACHE_DIR))
    import jax

    from jaxmm.evaluation import report as eval_report

    logging.info("process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    result = eval_report.evaluate_run(
        _WORKDIR.value, _SPLIT.value, _CHECKPOINT.value, _MODALITIES.value, _ABLATION.value,
        _EXCLUDE.value, calibrate=_CALIBRATE.value, calibrated=not _NO_CALIBRATION.value,
        explain_first=_EXPLAIN.value)
    if jax.process_index() != 0:
        return
    print(eval_report.summary(result["metrics"], result["report"]))
    for note in result["notes"]:
        print(note)
    if result["ablation"]:
        print("\nmodality ablation (same checkpoint, towers masked at evaluation):")
        print(eval_report.ablation_table(result["ablation"]))
    print(f"\nreports in {result['out_dir']}")


def run():
    """Console-script entry point (``jaxmm-evaluate``)."""
    cli.run(main, "jaxmm.evaluate")


if __name__ == "__main__":
    run()
