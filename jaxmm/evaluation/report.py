"""Evaluating a trained run on a split (the work behind ``jaxmm.evaluate``) and what it leaves
behind: metrics.json, the classification report, the prediction CSVs, the confusion-matrix and
misclassified-example figures, the modality ablation and the printed summaries.

Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state), so they
work headless and in any thread; only process 0 writes anything here.
"""

import os
import shutil
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxmm import files, paths
from jaxmm.data import dedup, pipeline, prepared, transforms
from jaxmm.errors import ConfigError, WorkdirError
from jaxmm.evaluation import calibration, explain, scoring
from jaxmm.experiments import tracking
from jaxmm.trained.model import TrainedModel
from jaxmm.trained.workdir import Workdir, data_changes
from jaxmm.training import parallel, train_log

_ERROR_COLUMNS = ["file", "text", "true", "predicted", "confidence"]


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def _matrix(ax, values: np.ndarray, labels: list, title: str, fmt: str, vmax: float) -> None:
    ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
    k = len(labels)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    for i in range(k):
        for j in range(k):
            # Dark cells get white text so every number stays readable.
            color = "white" if values[i, j] > 0.6 * vmax else "black"
            ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", color=color)


def confusion_matrix(counts, class_names: list, path: str, title: str = "") -> str:
    """Draws the confusion matrix as counts and row-normalised (recall per true class).

    Args:
      counts: [K, K] counts, rows = true class.
      class_names: the K names in label order.
      path: PNG file to write.
      title: figure title (split, checkpoint, ...).

    Returns:
      path.
    """
    cm = np.asarray(counts, np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = 2.5 + 0.9 * len(class_names)
    fig = Figure(figsize=(2 * side + 1, side + 0.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _matrix(left, cm, class_names, "counts", ".0f", max(cm.max(), 1.0))
    _matrix(right, norm, class_names, "normalised by true class", ".2f", 1.0)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def misclassified_grid(items: list[dict], path: str, columns: int = 4, title: str = "") -> str:
    """Draws the given errors as a grid: image, text, true and predicted class, confidence.

    Args:
      items: dicts with image (PIL image or uint8 array), text, true, predicted, confidence.
      path: PNG file to write.
      columns: images per row.
      title: figure title.

    Returns:
      path.
    """
    if not items:
        fig = Figure(figsize=(4, 1.5))
        fig.text(0.5, 0.5, "no misclassified examples", ha="center", va="center")
        return _save(fig, path)
    columns = min(columns, len(items))
    rows = -(-len(items) // columns)
    fig = Figure(figsize=(3.2 * columns, 3.8 * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).reshape(-1)
    for ax, item in zip(axes, items, strict=False):
        ax.imshow(np.asarray(item["image"]))
        ax.set_title(f"true {item['true']} / pred {item['predicted']} "
                     f"({item['confidence']:.2f})", fontsize=9, color="firebrick")
        ax.set_xlabel(textwrap.shorten(item["text"], 60) or "(no text)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(items):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def summary(metrics: dict, report: str) -> str:
    """A readable summary of an evaluation: headline metrics, per-class report, confusion."""
    names = metrics["confusion_matrix"]["labels"]
    counts = np.asarray(metrics["confusion_matrix"]["counts"])
    width = max(len(n) for n in names + ["true\\pred"]) + 2
    lines = [f"{metrics['split']}: {metrics['num_examples']} examples, checkpoint step "
             f"{metrics['checkpoint_step']} ({metrics['checkpoint']}), modalities "
             f"{'+'.join(metrics['modalities'])}",
             f"accuracy {metrics['accuracy']:.4f}  balanced accuracy "
             f"{metrics['balanced_accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
             f"weighted-F1 {metrics['weighted_f1']:.4f}  loss {metrics['loss']:.4f}",
             "", report.rstrip(), "", "confusion matrix (rows true, columns predicted):",
             "true\\pred".ljust(width) + "".join(n.rjust(width) for n in names)]
    for name, row in zip(names, counts, strict=True):
        lines.append(name.ljust(width) + "".join(str(v).rjust(width) for v in row))
    cal = metrics.get("calibration")
    if cal:
        fmt = lambda m: f"ECE {m['ece']:.4f}  NLL {m['nll']:.4f}  Brier {m['brier']:.4f}"
        lines += ["", f"calibration, raw: {fmt(cal['raw'])}"]
        if cal["calibrated"]:
            lines.append(f"calibrated (T={cal['temperature']:.3f}): {fmt(cal['calibrated'])}")
    return "\n".join(lines)


def ablation_table(rows: list[dict]) -> str:
    """The modality ablation as a fixed-width table."""
    head = f"{'modalities':<12}{'examples':>10}{'accuracy':>10}{'bal.acc':>10}" \
           f"{'macro-F1':>10}{'loss':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{'+'.join(r['modalities']):<12}{r['num_examples']:>10}"
                     f"{r['accuracy']:>10.4f}{r['balanced_accuracy']:>10.4f}"
                     f"{r['macro_f1']:>10.4f}{r['loss']:>9.4f}")
    return "\n".join(lines)


def classification_report(rows: list[dict], class_names: list) -> str:
    """scikit-learn's classification report on per-example rows (``true``, ``predicted``).

    Pass the metrics' ``macro_classes`` (present in truth or prediction) as ``class_names``, so
    the report's macro average is the one of metrics.json.
    """
    from sklearn import metrics as sk_metrics

    return sk_metrics.classification_report(
        [r["true"] for r in rows], [r["predicted"] for r in rows], labels=list(class_names),
        digits=4, zero_division=0)


def write_reports(out_dir: str, metrics: dict, rows: list[dict], image_of,
                  top_k: int = 16) -> str:
    """Writes an evaluation's files into ``out_dir``.

    metrics.json, classification_report.txt, predictions.csv (every example), misclassified.csv
    (errors, most confident first), confusion_matrix.png and misclassified.png.

    Args:
      out_dir: folder to write (created).
      metrics: the evaluation metrics (with split, checkpoint_step and modalities).
      rows: per-example rows (index, file, text, true, predicted, confidence, p_<class>).
      image_of: index -> the stored image of that example (for the error grid).
      top_k: errors shown in the grid.

    Returns:
      The classification report text.
    """
    os.makedirs(out_dir, exist_ok=True)
    names = metrics["confusion_matrix"]["labels"]
    report = classification_report(rows, metrics.get("macro_classes", names))
    files.write_json(os.path.join(out_dir, "metrics.json"), metrics)
    with open(os.path.join(out_dir, "classification_report.txt"), "w", encoding="utf-8") as f:
        f.write(report)
    files.write_csv(os.path.join(out_dir, "predictions.csv"), rows,
              ["index"] + _ERROR_COLUMNS + [f"p_{c}" for c in names])
    errors = sorted((r for r in rows if r["true"] != r["predicted"]),
                    key=lambda r: -r["confidence"])
    files.write_csv(os.path.join(out_dir, "misclassified.csv"), errors, _ERROR_COLUMNS)
    title = (f"{metrics['split']}, step {metrics['checkpoint_step']}, "
             f"{'+'.join(metrics['modalities'])}: accuracy {metrics['accuracy']:.3f}")
    confusion_matrix(metrics["confusion_matrix"]["counts"], names,
                     os.path.join(out_dir, "confusion_matrix.png"), title)
    shown = [{**r, "image": image_of(r["index"])} for r in errors[:top_k]]
    misclassified_grid(shown, os.path.join(out_dir, "misclassified.png"),
                       title=f"most confident errors ({len(errors)} in all)")
    return report


# --- Evaluation of a split ----------------------------------------------------------------------

ABLATION = (("image", "text"), ("image",), ("text",))
WITHOUT_COPIES_KEY = "without_train_copies"  # metrics.json entry of exclude_test_duplicates


def dataset_dir(wd: Workdir, split: str | None = None, notes: list | None = None) -> str:
    """The run's prepared dataset, checked against the run record; never prepared here.

    The classes and prepare's options (stored size, format, EXIF orientation, text source)
    must be the run's: other options would feed the model other pixels or texts than it was
    trained on. Other raw files with the same options (a split with more images) are
    evaluated, and ``notes`` says what changed.

    Args:
      wd: the run.
      split: the split to be evaluated (its counts are compared), or None.
      notes: when given, gets one line per difference of the data that is allowed.

    Raises:
      WorkdirError: no prepared dataset where the run's config points, other classes, or
        data prepared with other options.
    """
    path = prepared.existing_dataset(wd.config())
    meta = prepared.dataset_meta(path)
    found = list(meta["class_names"])
    record = wd.read_record()
    trained_on = list(record["class_names"])
    if found != trained_on:
        raise WorkdirError(f"{path} has classes {found}, the run was trained on {trained_on}")
    saved = record.get("data")
    if saved is None:
        return path  # a run from before data records: nothing more to compare
    changes = data_changes(saved, prepared.data_record(path, meta))
    options = [c for c in changes if c.startswith("options.")]
    if options:
        raise WorkdirError(f"{path} was prepared with other options than the run was trained "
                           f"on ({'; '.join(options)}): evaluating it would feed the model "
                           "other inputs; prepare the data again with the run's options "
                           f"(recorded in {wd.file(paths.CONFIG_FILE)})")
    mine = [c for c in changes if split is None or c.startswith(("fingerprint", "the raw"))
            or f".{split}" in c.split(":")[0]]
    if mine and notes is not None:
        notes.append(f"the prepared data changed since the run was trained ({'; '.join(mine)})"
                     f": the {split or 'data'} evaluated is not the one of its record")
    return path


def open_split(wd: Workdir, trained: TrainedModel, split: str,
               notes: list | None = None) -> scoring.SplitEvaluator:
    """The evaluator of one split of a run's prepared dataset (never prepared here)."""
    path = dataset_dir(wd, split, notes)
    sources = pipeline.load_splits(path, (split,))  # only this split's files
    if split not in sources:
        raise ConfigError(f"{path} has no {split!r} split")
    record = wd.read_record()
    return scoring.SplitEvaluator(wd.config(), trained.model, trained.class_names,
                                  np.asarray(record["class_weights"], np.float32),
                                  trained.tokenizer, sources[split], split)


def fit_calibration(wd: Workdir, trained: TrainedModel, variables) -> dict:
    """Fits the temperature of a trained model on the run's validation split; process 0 writes
    calibration.json. Every process must call it."""
    policy = wd.config().get("calibration", "trusted")
    record = calibration.fit_on_split(open_split(wd, trained, "validation"), variables,
                                      trained.step, "trusted" if policy == "off" else policy)
    if train_log.is_writer():
        wd.write_calibration(record)
    return record


def evaluate_run(workdir: str, split: str = "test", checkpoint: str = "best", modalities=None,
                 ablation: bool = False, exclude_test_duplicates: bool | None = None,
                 calibrate: bool = False, calibrated: bool = True,
                 explain_first: int | None = None) -> dict:
    """Evaluates a split of a trained run and (on process 0) writes its reports.

    Args:
      workdir: the training workdir.
      split: "train", "validation" or "test".
      checkpoint: "best", "latest" or a step number.
      modalities: towers to keep (None = all of the model's); the others are masked.
      ablation: also evaluate every tower combination of ``ABLATION`` the model has.
      exclude_test_duplicates: on the test split, also report the metrics without the images
        that have an exact or near copy in Train (None = the run's config entry).
      calibrate: first fit the temperature on the validation split (``fit_calibration``).
      calibrated: report probabilities divided by the workdir's calibration temperature (when
        there is one and every tower is kept); metrics.json holds raw and calibrated figures.
      explain_first: None, or explain every misclassified example plus the first N.

    Returns:
      dict(metrics, report (classification report text), out_dir, ablation (rows or None),
      notes (lines to show)).
    """
    wd = Workdir(workdir)
    trained = wd.load_model(checkpoint, axis_name=parallel.AXIS_NAME, calibrated=False)
    variables = parallel.put_replicated(trained.variables)
    notes = []
    if calibrate:
        record = fit_calibration(wd, trained, variables)
        applied = "applied" if record["applied"] else f"not applied: {record['reason']}"
        notes.append(f"calibration: temperature {record['temperature']:.3f} fitted on "
                     f"validation ({applied}), written to {paths.CALIBRATION_FILE}")
    evaluator = open_split(wd, trained, split, notes)
    mods = scoring.selected_modalities(trained.modalities, modalities)
    metrics, predictions = evaluator(variables, mods, collect=True)
    metrics.update(split=split, checkpoint=str(checkpoint), checkpoint_step=trained.step,
                   modalities=list(mods))
    config = wd.config()
    if exclude_test_duplicates is None:
        exclude_test_duplicates = config.get("exclude_test_duplicates", False)
    if exclude_test_duplicates and split == "test":  # from the raw probabilities
        metrics[WITHOUT_COPIES_KEY], note = without_train_copies(evaluator, dataset_dir(wd),
                                                                 predictions)
        notes.append(note)
    temperature = _temperature(wd, calibrated and mods == trained.modalities, notes)
    labels = evaluator.labels(predictions["index"])
    metrics["calibration"] = calibration_summary(predictions["probs"], labels, temperature)
    if temperature is not None:
        predictions["probs"] = calibration.softmax(
            calibration.log_probs_as_logits(predictions["probs"]), temperature)
    suffix = "" if mods == trained.modalities else "-" + "+".join(mods)
    result = {"metrics": metrics, "out_dir": wd.eval_dir(split, checkpoint, trained.step, suffix),
              "ablation": None, "notes": notes, "report": ""}
    if ablation:
        result["ablation"], ablation_notes = run_ablation(
            evaluator, variables, config.model.get("modality_dropout", 0.0))
        notes += ablation_notes
    if train_log.is_writer():
        _write_all(result, evaluator, trained, predictions, labels, temperature, explain_first)
        tracking.log_evaluation(workdir, metrics, result["out_dir"])  # when the run is tracked
    return result


def without_train_copies(evaluator: scoring.SplitEvaluator, dataset_dir: str,
                         predictions: dict) -> tuple[dict, str]:
    """Metrics of the test split without the images that have a copy in Train.

    The copies are the ``duplicates`` prepare found (exact, or near by perceptual hash).

    Returns:
      (metrics with ``excluded_files``, a one-line summary).
    """
    meta = files.read_json(os.path.join(dataset_dir, paths.META_FILE)) or {}
    if "duplicates" not in meta:
        return {}, ("exclude_test_duplicates: the prepared dataset has no duplicate report "
                    "(prepared by an older jaxmm); prepare it again to use this option")
    excluded = dedup.files_with_copy_in(meta["duplicates"], evaluator.split, "train")
    names = [files.text(evaluator.source[int(i)]["file_name"]) for i in predictions["index"]]
    keep = [n not in excluded for n in names]
    metrics = scoring.subset_metrics(evaluator.source, predictions, evaluator.class_names,
                                     evaluator.class_weights, keep)
    metrics["excluded_files"] = sorted(n for n in names if n in excluded)
    return metrics, (f"{evaluator.split} without the {len(metrics['excluded_files'])} images "
                     f"that have a copy in Train: {metrics['num_examples']} examples, accuracy "
                     f"{metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")


def _write_all(result, evaluator, trained, predictions, labels, temperature,
               explain_first) -> None:
    """Process 0: reports, reliability diagram, ablation table and explanations."""
    out_dir, metrics = result["out_dir"], result["metrics"]
    rows = scoring.example_rows(evaluator.source, predictions, trained.class_names)
    result["report"] = write_reports(
        out_dir, metrics, rows, lambda i: transforms.as_pil(evaluator.source[i]["image"]))
    kind = "raw" if temperature is None else f"calibrated (T={temperature:.2f})"
    calibration.reliability_diagram(predictions["probs"], labels,
                                    os.path.join(out_dir, paths.RELIABILITY_FILE),
                                    title=f"{metrics['split']}, {kind}")
    if result["ablation"]:
        files.write_json(os.path.join(out_dir, "ablation.json"),
                         {"rows": result["ablation"], "notes": result["notes"]})
    if explain_first is not None:
        chosen = sorted({r["index"] for r in rows if r["true"] != r["predicted"]}
                        | set(range(min(explain_first, len(rows)))))
        view = transforms.EvalTransform(trained.preprocessing.crop_size)
        examples = [{**view(evaluator.source[i]),
                     "name": files.text(evaluator.source[i]["file_name"])} for i in chosen]
        folder = os.path.join(out_dir, paths.EXPLANATIONS_DIR)
        shutil.rmtree(folder, ignore_errors=True)  # no figures left over from an earlier call
        explain.write_explanations(trained, examples, folder, temperature or 1.0)
        result["notes"].append(f"{len(examples)} explanations in {folder}")


# --- Calibration ---------------------------------------------------------------------------------

def calibration_summary(probs, labels, temperature: float | None) -> dict:
    """metrics.json's 'calibration' entry: ECE/NLL/Brier raw and (with T) calibrated."""
    calibrated = None
    if temperature is not None:
        calibrated = calibration.calibration_metrics(calibration.softmax(
            calibration.log_probs_as_logits(probs), temperature), labels)
    return {"temperature": temperature, "num_bins": calibration.NUM_BINS,
            "raw": calibration.calibration_metrics(probs, labels), "calibrated": calibrated}


def _temperature(wd: Workdir, wanted: bool, notes: list) -> float | None:
    if not wanted:
        return None
    temperature = wd.temperature()
    record = wd.calibration()
    if record is not None and temperature is None:
        notes.append(f"{paths.CALIBRATION_FILE}: the fitted temperature "
                     f"{record['temperature']:.4g} is not applied ({record.get('reason')}): "
                     "probabilities are uncalibrated")
    elif temperature is None:
        notes.append(f"no {paths.CALIBRATION_FILE} in the workdir: probabilities are "
                     "uncalibrated (fit one with jaxmm.evaluate --calibrate)")
    return temperature


def run_ablation(evaluator: scoring.SplitEvaluator, variables, modality_dropout: float
                 ) -> tuple[list | None, list]:
    """Evaluates image+text, image-only and text-only from one checkpoint.

    Returns:
      (rows, notes): rows is None when the model has a single tower.
    """
    modalities = evaluator.modalities
    if len(modalities) < 2:
        return None, [f"ablation is not applicable: the model has only the "
                      f"{modalities[0]} tower"]
    notes = [] if modality_dropout else [
        "WARNING: the model was trained with config.model.modality_dropout=0, so it never saw a "
        "missing tower; the single-tower rows are not meaningful"]
    keys = ("num_examples", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "loss")
    rows = [{"modalities": list(mods), **{k: m[k] for k in keys}}
            for mods in ABLATION for m in [evaluator(variables, mods)[0]]]
    return rows, notes
