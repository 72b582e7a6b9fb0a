"""The label audit's runs: K stratified folds of Train, one ordinary training run per fold, and
out-of-fold probabilities for every Train example.

An audit folder holds ``audit.json`` (the config, its arguments, the folds), ``folds/fold<k>.csv``
(the Train files fold k holds out: the ``exclude_file`` of run k), the fold runs ``fold<k>/``
(ordinary workdirs, listed in ``sweep.json`` so ``slurm/sweep.sh --task`` and ``jaxmm.compare``
treat the folder like a sweep) and ``probabilities.npz`` (what the checks of
``jaxmm.evaluation.label_issues`` read). Run k trains on the other K-1 folds and validates on
Val, as any run; it then predicts its held-out fold, so every Train example gets probabilities
from a model that never saw it. Val and Test are scored by the mean of the K models. Nothing is
written into the dataset folder.
"""

import os

import numpy as np

from jaxmm import files, paths
from jaxmm.data import exclusions
from jaxmm.errors import ConfigError
from jaxmm.experiments import sweep

AUDIT_FILE = "audit.json"
FOLDS_DIR = "folds"
PROBS_FILE = "probabilities.npz"
MODALITIES = (("image", "text"), ("image",), ("text",))  # full model, then each tower alone


def probs_key(modalities) -> str:
    """The probabilities' entry of a tower combination: "p_image+text", "p_image", "p_text"."""
    return "p_" + "+".join(modalities)


def run_name(fold: int) -> str:
    return f"fold{fold}"


def fold_file(audit_dir: str, fold: int) -> str:
    return os.path.join(os.path.abspath(audit_dir), FOLDS_DIR, f"{run_name(fold)}.csv")


def assign_folds(names: list, labels, num_folds: int, seed: int, class_names: list
                 ) -> np.ndarray:
    """Stratified, deterministic folds: each class's files (by name) shuffled with ``seed`` and
    dealt round-robin, so every fold holds about 1/K of each class.

    Raises:
      ConfigError: fewer examples of a class than folds, or a class missing from a fold.
    """
    labels = np.asarray(labels, np.int64)
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ConfigError(f"--folds {num_folds!r}: at least 2 folds")
    counts = np.bincount(labels, minlength=len(class_names))
    for c, n in zip(class_names, counts, strict=True):
        if n < num_folds:
            raise ConfigError(f"class {c!r} has {n} Train example(s), fewer than the {num_folds} "
                              "folds: use fewer folds (--folds) or add examples")
    fold = np.full(len(labels), -1, np.int64)
    rng = np.random.default_rng([seed, 24])
    for c in range(len(class_names)):
        members = sorted(np.flatnonzero(labels == c), key=lambda i: names[i])
        order = rng.permutation(len(members))
        for position, k in enumerate(order):
            fold[members[k]] = position % num_folds
    check_folds(fold, labels, num_folds, class_names)
    return fold


def check_folds(fold, labels, num_folds: int, class_names: list) -> None:
    """Every fold holds out, and trains on, at least one example of every class."""
    for k in range(num_folds):
        for side, rows in (("holds out", fold == k), ("trains on", fold != k)):
            present = set(np.asarray(labels)[rows].tolist())
            missing = [c for i, c in enumerate(class_names) if i not in present]
            if missing:
                raise ConfigError(f"fold {k} {side} no example of class {missing[0]!r}: use "
                                  "fewer folds (--folds)")


def _write_if_changed(path: str, rows: list, columns: list) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    files.write_csv(tmp, rows, columns)
    same = False
    if os.path.isfile(path):
        with open(tmp, "rb") as new, open(path, "rb") as old:
            same = old.read() == new.read()
    if same:  # an unchanged file keeps its time stamp (the fold runs record its hash anyway)
        os.remove(tmp)
    else:
        os.replace(tmp, path)


def plan(config_file: str, common_args: list, audit_dir: str, num_folds: int,
         log=print) -> tuple[list, dict]:
    """Checks the config, prepares the data (once), deals the folds and writes the audit folder.

    Returns:
      (the fold runs as ``sweep.RunSpec``, the audit record).

    Raises:
      ConfigError: bad config, too few examples for the folds, or an exclude_file set.
    """
    from jaxmm.evaluation import label_issues

    label_issues.require_cleanlab()  # before any fold trains, not after
    config = sweep.parse_config(config_file, common_args)
    if config.get("exclude_file"):
        raise ConfigError(f"config.exclude_file={config.exclude_file!r}: the audit sets it for "
                          "each fold run; audit without it (review its list in the output)")
    old = files.read_json(os.path.join(audit_dir, AUDIT_FILE))
    if old and old.get("folds") != num_folds:
        raise ConfigError(f"{os.path.join(audit_dir, AUDIT_FILE)} has {old.get('folds')} folds, "
                          f"not {num_folds}: use a new --audit_dir for another fold count")
    from jaxmm.training import setup as setup_lib

    setup_lib.validate_config(config)
    data = setup_lib.prepared_data(config)
    names = exclusions.split_files({"train": data.sources["train"]})["train"]
    labels = exclusions.labels_of(data.sources["train"])
    fold = assign_folds(names, labels, num_folds, config.seed, data.class_names)
    os.makedirs(os.path.join(audit_dir, FOLDS_DIR), exist_ok=True)
    runs = []
    for k in range(num_folds):
        rows = [{"file": names[i], "split": "train", "fold": k} for i in np.flatnonzero(fold == k)]
        _write_if_changed(fold_file(audit_dir, k), rows, ["file", "split", "fold"])
        args = [f"--config.exclude_file={fold_file(audit_dir, k)}"]
        runs.append(sweep.RunSpec(k, run_name(k), {"exclude_file": fold_file(audit_dir, k)},
                                  args))
        # The run must be able to train: at least one global batch of what it keeps.
        setup_lib.schedule_lengths(config, int((fold != k).sum()))
    record = {"config": os.path.abspath(config_file), "common_args": list(common_args),
              "folds": num_folds, "seed": config.seed, "class_names": data.class_names,
              "dataset_dir": data.dataset_dir, "runs": [r.name for r in runs]}
    sweep.write_manifest(audit_dir, config_file, os.path.join(audit_dir, AUDIT_FILE),
                         common_args, runs)
    files.write_json(os.path.join(audit_dir, AUDIT_FILE), record)
    log(f"audit: {num_folds} folds of {len(names)} Train examples in {audit_dir}")
    return runs, record


def train_folds(audit_dir: str, runs: list, config_file: str, common_args: list,
                log=print) -> str:
    """Trains the fold runs that have not finished, one after the other, in this process.

    Returns:
      "finished", or "preempted" when a run stopped on a signal (run the command again).
    """
    from jaxmm.training import loop

    for run in runs:
        workdir = os.path.join(audit_dir, run.name)
        if sweep.is_done(workdir):
            log(f"  {run.name}: finished, skipped")
            continue
        log(f"  {run.name}: {'resumes' if os.path.isdir(workdir) else 'trains'} ({workdir})")
        config = sweep.parse_config(config_file, [*common_args, *run.args])
        summary = loop.train_and_evaluate(config, workdir)
        if summary["status"] == "preempted":
            return "preempted"
    return "finished"


# --- Out-of-fold probabilities ------------------------------------------------------------------

def _predict(wd, trained, variables, source, split: str) -> dict:
    """Probabilities of every record of ``source``: the whole model (calibrated with the run's
    temperature when it has one) and, for a two-tower model, each tower alone."""
    from jaxmm.evaluation import calibration, scoring

    record = wd.read_record()
    evaluator = scoring.SplitEvaluator(wd.config(), trained.model, trained.class_names,
                                       np.asarray(record["class_weights"], np.float32),
                                       trained.tokenizer, source, split)
    out = {}
    for mods in MODALITIES:
        if not set(mods) <= set(trained.modalities) or (len(mods) == 1 and len(
                trained.modalities) == 1):
            continue
        _, predictions = evaluator(variables, mods, collect=True)
        probs = predictions["probs"]
        temperature = wd.temperature()
        if len(mods) == 2 and temperature is not None:
            probs = calibration.softmax(calibration.log_probs_as_logits(probs), temperature)
        out[probs_key(mods)] = np.asarray(probs, np.float32)
    return out


def collect_probabilities(audit_dir: str, record: dict, log=print) -> dict:
    """Out-of-fold probabilities of Train, mean-of-K probabilities of Val and Test.

    Returns:
      {split: {"file": [N] names, "label": [N], "text": [N], ``probs_key(towers)``: [N, K]}};
      also saved to ``PROBS_FILE``.

    Raises:
      WorkdirError: a fold run has no best checkpoint (it has not trained yet).
    """
    from jaxmm.data import pipeline
    from jaxmm.errors import WorkdirError
    from jaxmm.trained.workdir import Workdir
    from jaxmm.training import parallel

    sources = pipeline.load_splits(record["dataset_dir"])
    out = {}
    for split, source in sources.items():
        records = source.__getitems__(list(range(len(source))))
        out[split] = {"file": np.array([files.text(r["file_name"]) for r in records]),
                      "label": np.array([int(r["label"]) for r in records], np.int64),
                      "text": np.array([files.text(r["text"]) for r in records])}
    position = {n: i for i, n in enumerate(out["train"]["file"])}
    for k, name in enumerate(record["runs"]):
        wd = Workdir(os.path.join(audit_dir, name))
        if not sweep.is_done(wd.path):
            raise WorkdirError(f"fold run {wd.path} has not finished: train it first "
                               "(python -m jaxmm.audit ... or slurm/audit.sh)")
        trained = wd.load_model("best", axis_name=parallel.AXIS_NAME, calibrated=False)
        variables = parallel.put_replicated(trained.variables)
        held = np.array([position[n] for n in exclusions.read_names(
            fold_file(audit_dir, k))], np.int64)
        log(f"  {name}: predicting its {len(held)} held-out Train examples, Val and Test")
        for key, probs in _predict(wd, trained, variables,
                                   exclusions.Subset(sources["train"], held), "train").items():
            out["train"].setdefault(key, np.full((len(position), probs.shape[1]), np.nan,
                                                 np.float32))[held] = probs
        for split in ("validation", "test"):
            if split in sources:
                for key, probs in _predict(wd, trained, variables, sources[split],
                                           split).items():
                    out[split][key] = out[split].get(key, 0.0) + probs / len(record["runs"])
    np.savez_compressed(os.path.join(audit_dir, PROBS_FILE), **{
        f"{split}/{key}": value for split, d in out.items() for key, value in d.items()})
    return out


def load_probabilities(audit_dir: str) -> dict | None:
    """``collect_probabilities``' result as saved, or None."""
    path = os.path.join(audit_dir, PROBS_FILE)
    if not os.path.isfile(path):
        return None
    out = {}
    with np.load(path) as z:
        for key in z.files:
            split, name = key.split("/", 1)
            out.setdefault(split, {})[name] = z[key]
    return out


def fold_runs(audit_dir: str, record: dict) -> list[dict]:
    """Each fold run's folder, status and best validation metrics (summary.json's list)."""
    out = []
    for name in record["runs"]:
        summary = files.read_json(os.path.join(audit_dir, name, paths.SUMMARY_FILE)) or {}
        best = summary.get("best_validation") or {}
        out.append({"run": name, "workdir": os.path.join(audit_dir, name),
                    "status": summary.get("status"), "best_epoch": summary.get("best_epoch"),
                    "validation": {k: best.get(k) for k in ("accuracy", "macro_f1", "loss")}})
    return out


# --- The audit's report ----------------------------------------------------------------------

def _fresh_probabilities(audit_dir: str, record: dict):
    """The saved probabilities when no fold run finished after they were saved."""
    path = os.path.join(audit_dir, PROBS_FILE)
    if not os.path.isfile(path):
        return None
    newest = max((os.path.getmtime(os.path.join(audit_dir, n, paths.SUMMARY_FILE))
                  for n in record["runs"]
                  if os.path.isfile(os.path.join(audit_dir, n, paths.SUMMARY_FILE))), default=0.0)
    return load_probabilities(audit_dir) if os.path.getmtime(path) >= newest else None


def write_report(audit_dir: str, settings=None, top: int = 16, log=print) -> list[str]:
    """Scores the finished fold runs and writes label_issues.csv, summary.json and
    label_issues.png into the audit folder.

    Args:
      audit_dir: the audit folder.
      settings: the checks' thresholds (``label_issues.Settings``; None: its defaults).
      top: examples in the gallery.
      log: where progress lines go.

    Returns:
      Lines to print: what was flagged per split and where the files are.

    Raises:
      WorkdirError: no audit record, or a fold run not finished.
    """
    from jaxmm.data import pipeline
    from jaxmm.errors import WorkdirError
    from jaxmm.evaluation import label_issues

    record = files.read_json(os.path.join(audit_dir, AUDIT_FILE))
    if not isinstance(record, dict) or "runs" not in record:
        raise WorkdirError(f"{audit_dir} has no readable {AUDIT_FILE}: run python -m jaxmm.audit "
                           "--config ... --audit_dir first")
    settings = settings or label_issues.DEFAULTS
    probs = _fresh_probabilities(audit_dir, record)
    if probs is None:
        probs = collect_probabilities(audit_dir, record, log)
    sources = pipeline.load_splits(record["dataset_dir"])
    within = label_issues.within_split_copies(record["dataset_dir"], sources)
    class_names = list(record["class_names"])
    rows, found = label_issues.run_checks(probs, class_names, within, settings)
    out = {n: os.path.join(audit_dir, f) for n, f in (
        ("csv", label_issues.ISSUES_FILE), ("summary", label_issues.SUMMARY_FILE),
        ("png", label_issues.GALLERY_FILE))}
    files.write_csv(out["csv"], rows, label_issues.COLUMNS)
    summary = label_issues.summary(rows, found, probs, class_names,
                                   dict(settings.as_dict(), folds=record["folds"]),
                                   fold_runs(audit_dir, record))
    files.write_json(out["summary"], summary)
    index = {split: {n: i for i, n in enumerate(d["file"])} for split, d in probs.items()}
    label_issues.gallery(rows, lambda r: _stored_image(sources[r["split"]][
        index[r["split"]][r["file"]]]), out["png"], top)
    lines = [f"{split}: {s['flagged']} of {s['examples']} flagged ("
             + ", ".join(f"{c} {n}" for c, n in s["per_check"].items()) + ")"
             for split, s in summary["splits"].items()]
    if "test" in summary["splits"]:
        lines.append(f"the test accuracy counts {summary['splits']['test']['flagged']} test "
                     "example(s) whose label the audit doubts (reported, never excluded)")
    return lines + [f"wrote {p}" for p in out.values()] + [
        f"retrain without the flagged Train examples: --config.exclude_file={out['csv']}"]


def _stored_image(record):
    """A record's stored image as a PIL image (for the gallery)."""
    from jaxmm.data import transforms

    return transforms.as_pil(record["image"])
