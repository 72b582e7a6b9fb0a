"""Where things live: the layout of a training workdir and of a prepared dataset.

Every file or folder name that more than one module (or a Slurm script) needs is spelled here
once. Shell scripts read them with ``python -m jaxmm.paths NAME``.
"""

import os
import sys

# --- A training workdir ----------------------------------------------------------------------
CONFIG_FILE = "config.json"  # the run record: config, classes, class weights, preprocessing
METRICS_FILE = "metrics.jsonl"  # one JSON line per train log step / validation
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "learning_curves.png"
SUMMARY_FILE = "train_summary.json"  # written when a run stops (finished, early, preempted)
JAX_CACHE_DIR = "jax_cache"  # persistent compilation cache (survives requeues)
EVAL_DIR = "eval"  # eval/<checkpoint>/<split>/ reports of jaxmm.evaluate
EVAL_METRICS_FILE = "metrics.json"  # eval/<checkpoint>/<split>/: the metrics of one evaluation
PREDICTIONS_FILE = "predictions.csv"  # jaxmm.predict's CSV for folders when --out is not given
CHECKPOINTS_DIR = "checkpoints"  # latest K train states + data position (orbax)
BEST_DIR = "best"  # params + batch statistics of the best validation epoch (orbax)
TOKENIZER_DIR = "tokenizer"  # the tokenizer the run was trained with (a copy)
SET_ASIDE_DIR = "set_aside"  # checkpoints moved out of the way (unreadable, or from a replay)
LOCK_FILE = "train.lock"  # host, pid and Slurm job of the training run using the workdir
CALIBRATION_FILE = "calibration.json"  # temperature fitted on validation (+ before/after)
TRACKING_FILE = "tracking.json"  # tracked run (MLflow/W&B) id and highest step logged per kind
# --- In an evaluation folder or a predict --explain folder
RELIABILITY_FILE = "reliability_diagram.png"  # accuracy vs confidence per bin, with counts
EXPLANATIONS_DIR = "explanations"  # one PNG per explained example
GALLERY_FILE = "gallery.png"  # every explanation of a folder in one grid

# --- An export bundle (written by jaxmm.export, read by jaxmm.trained.bundle) --------------
# It also holds TOKENIZER_DIR.
BUNDLE_SPEC_FILE = "model.json"  # format version, architecture, classes, preprocessing, ...
BUNDLE_WEIGHTS_FILE = "weights.safetensors"  # params + batch statistics, "/"-joined names
BUNDLE_FUNCTION_FILE = "predict.jaxexport"  # serialized jax.export function (StableHLO)
MODEL_CARD_FILE = "MODEL_CARD.md"  # for people; not digested, written anew by every export
BUNDLE_EXPLAIN_DIR = "explain"  # optional explanation functions (export --explain), digested

# --- A sweep folder (slurm/sweep.sh): one workdir per run, <index>-<overrides> ------------------
SWEEP_FILE = "sweep.json"  # the runs of the sweep: names, overrides, trainer arguments
SWEEP_LOGS_DIR = "logs"  # the Slurm output of the array tasks
COMPARISON_BASENAME = "comparison"  # jaxmm.compare writes comparison.{csv,md,png}
# --- Beside workdirs (a sweep folder, or the parent of a workdir): the default MLflow store
MLFLOW_DB_FILE = "mlflow.db"  # SQLite database of tracked runs (config.tracking="mlflow")
MLFLOW_ARTIFACTS_DIR = "mlartifacts"  # their figures and files

# --- A prepared dataset (prepare's output root and the TFDS dataset folder inside it) ----------
REPORT_FILE = "prepare_report.json"  # in the output root: counts, skipped files, text sources
FINGERPRINT_FILE = "prepare_fingerprint.json"  # in the output root: raw data + options hash
DONE_MARKER = "prepare_done.json"  # in the output root: written last, read by other processes
META_FILE = "jaxmm_meta.json"  # in the dataset folder: class names, counts, options
DATASET_NAME = "jaxmm_garbage"  # TFDS builder name
DATASET_VERSION = "1.0.0"
DEFAULT_PREPARED_SUBDIR = "jaxmm_prepared"  # <data_dir>/jaxmm_prepared unless configured


def dataset_path(out_dir: str) -> str:
    """The TFDS dataset folder (``tfds.builder_from_directory`` opens it) inside an output root."""
    return os.path.join(out_dir, DATASET_NAME, DATASET_VERSION)


if __name__ == "__main__":
    # For shell scripts: `python -m jaxmm.paths SUMMARY_FILE` prints train_summary.json.
    print(globals()[sys.argv[1]])
