"""The model card of an export bundle (``MODEL_CARD.md``), in the Hugging Face model-card form:
a YAML metadata header, then sections for people.

Every number in it is read from the run's own files (run record, closing summary, metrics,
calibration.json, the best checkpoint's test evaluation and ablation); nothing is typed by hand.
Where the run lacks a file (no test evaluation, no calibration) the card says so. The card is
not part of the bundle's digests: a user may edit it, and ``jaxmm.export`` writes it anew.
"""

import json
import os

import numpy as np

from jaxmm import files, paths

_TEST_DIR = os.path.join(paths.EVAL_DIR, "best", "test")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f} %"


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def _yaml(record: dict, test: dict | None) -> list[str]:
    lines = ["---", "library_name: jaxmm",
             "tags: [image-classification, text-classification, multimodal, jax, flax]",
             "pipeline_tag: image-classification"]
    if test:
        lines += ["model-index:", f"- name: {record['model_id']}", "  results:",
                  "  - task: {type: image-classification}",
                  "    dataset: {name: prepared Test split of the run, type: garbage-bins}",
                  "    metrics:",
                  f"    - {{type: accuracy, value: {test['accuracy']:.4f}}}",
                  f"    - {{type: f1, name: macro F1, value: {test['macro_f1']:.4f}}}"]
    return lines + ["---", ""]


def _data_section(data: dict | None) -> list[str]:
    if not data:
        return ["The run records no description of its training data.", ""]
    names = list(data.get("class_names") or [])
    counts = data.get("counts") or {}
    lines = ["| split | " + " | ".join(names) + " | total |",
             "|---|" + "---|" * (len(names) + 1)]
    for split, n in (data.get("num_examples") or {}).items():
        row = counts.get(split, {})
        lines.append(f"| {split} | " + " | ".join(str(row.get(c, "")) for c in names)
                     + f" | {n} |")
    report = data.get("report") or {}
    if report:
        dup = report.get("duplicates") or {}
        lines += ["", f"Prepare skipped {report.get('skipped', 'n/a')} file(s) it could not "
                  f"read; it found {dup.get('exact', 'n/a')} exact and {dup.get('near', 'n/a')} "
                  f"near copies across splits ({json.dumps(dup.get('counts') or {})})."]
    return lines + [""]


def _confused_pairs(test: dict, top: int = 3) -> list[str]:
    cm = np.asarray(test["confusion_matrix"]["counts"], np.float64)
    names = test["confusion_matrix"]["labels"]
    rows = cm.sum(1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    np.fill_diagonal(rate, 0)
    order = np.dstack(np.unravel_index(np.argsort(-rate, axis=None), rate.shape))[0]
    return [f"- true **{names[i]}** predicted as **{names[j]}**: {_pct(rate[i, j])} of "
            f"{names[i]} ({int(cm[i, j])} examples)" for i, j in order[:top] if cm[i, j] > 0]


def _evaluation_section(best: dict | None, test: dict | None, ablation: dict | None
                        ) -> list[str]:
    lines = []
    if best:
        lines += [f"Validation at the best epoch ({best.get('epoch')}): accuracy "
                  f"{_pct(best.get('accuracy'))}, macro F1 {_num(best.get('macro_f1'))}, "
                  f"weighted loss {_num(best.get('loss'))}.", ""]
    if not test:
        return lines + ["The run was not evaluated on its Test split when this bundle was "
                        "exported (`python -m jaxmm.evaluate --workdir RUN`, then export "
                        "again).", ""]
    names = test["confusion_matrix"]["labels"]
    lines += [f"Test ({test['num_examples']} examples): accuracy {_pct(test['accuracy'])}, "
              f"balanced accuracy {_pct(test['balanced_accuracy'])}, macro F1 "
              f"{_num(test['macro_f1'])}.", "",
              "| true \\ predicted | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for name, row in zip(names, test["confusion_matrix"]["counts"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "Most confused:", *_confused_pairs(test), ""]
    if ablation and ablation.get("rows"):
        lines += ["Towers masked at evaluation (same checkpoint):", "",
                  "| towers | accuracy | macro F1 |", "|---|---|---|"]
        lines += [f"| {'+'.join(r['modalities'])} | {_pct(r['accuracy'])} | "
                  f"{_num(r['macro_f1'])} |" for r in ablation["rows"]]
        lines.append("")
    return lines


def _calibration_section(cal: dict | None) -> list[str]:
    if not cal:
        return ["No temperature was fitted: probabilities are the model's raw softmax.", ""]
    before, after = cal["before"], cal["after"]
    if cal.get("applied", True) is False:
        return [f"A temperature of {cal['temperature']:.3f} was fitted on {cal['split']} "
                f"({cal['num_examples']} examples) but is not applied: {cal.get('reason')}. "
                "Probabilities are the model's raw softmax.", ""]
    return [f"Temperature {cal['temperature']:.3f}, fitted on {cal['split']} "
            f"({cal['num_examples']} examples): ECE {_num(before['ece'])} → "
            f"{_num(after['ece'])}, NLL {_num(before['nll'])} → {_num(after['nll'])}. It divides "
            "the logits before the softmax and never changes a prediction.", ""]


def card_text(record: dict, wd) -> str:
    """The card of a bundle record (model.json's content), from the workdir ``wd`` it came
    from."""
    run = wd.stored_record() or {}
    config = run.get("config") or {}
    model = record["model"]
    summary = wd.summary() or {}
    test = files.read_json(os.path.join(wd.path, _TEST_DIR, paths.EVAL_METRICS_FILE))
    ablation = files.read_json(os.path.join(wd.path, _TEST_DIR, "ablation.json"))
    cal = files.read_json(wd.file(paths.CALIBRATION_FILE))
    arch = model["architecture"]
    names = model["class_names"]
    pre = model["preprocessing"]
    lines = _yaml(record, test) + [
        f"# {record['model_id']}: a garbage-bin classifier (image + text)", "",
        "## What it does", "",
        f"Sorts a photo of a piece of rubbish, with a short text (by default its file name), "
        f"into one of {len(names)} bins: {', '.join(names)}. For students and researchers "
        "working on the multimodal garbage dataset, and for demos; it is not a safety system.",
        "", f"Towers: {' + '.join(arch['modalities'])} (image `{arch.get('image_arch')}`, "
        f"fusion `{arch.get('fusion')}`), {record['weights']['values']:,} weights; trained "
        f"{summary.get('epochs_completed', 'n/a')} epoch(s), exported from the "
        f"`{record['source'].get('checkpoint')}` checkpoint (step {record['source'].get('step')}).",
        "", "## Training data", "", *_data_section(run.get("data")),
        "## Training", "",
        f"Batch {config.get('batch_size', 'n/a')}, {config.get('num_epochs', 'n/a')} epochs, "
        f"seed {config.get('seed', 'n/a')}, compute dtype "
        f"`{(config.get('model') or {}).get('dtype', 'n/a')}`, early stopping on "
        f"`{config.get('early_stopping_metric', 'n/a')}`; the whole config is in model.json's "
        "`source.config`.", "",
        "## Evaluation", "", *_evaluation_section(summary.get("best_validation"), test, ablation),
        "## Calibration", "", *_calibration_section(cal),
        "## Limitations", "",
        f"- Text comes from file names unless given (trained on `{pre['text_source']}` texts): "
        "a photo named `IMG_1234.jpg` gets no useful text, and the text tower carries most of "
        "the signal on this dataset.",
        "- The dataset's Test split is distributed differently from Train and Validation, so "
        "validation accuracy runs above test accuracy.",
        "- Labels were assigned by people and some are ambiguous (the same text in two bins).",
        "",
        "## How to use", "",
        "    python -m jaxmm.predict --model BUNDLE photo.jpg [--text \"plastic bottle\"]", "",
        "    import jaxmm", "    clf = jaxmm.Classifier.load(\"BUNDLE\")",
        "    labels, probs = clf.predict([\"photo.jpg\"], [\"plastic bottle\"])", "",
        "Without jaxmm: `examples/predict_standalone.py BUNDLE photo.jpg` (jax, numpy, "
        "safetensors, pillow, tokenizers); model.json is described in docs/bundle.md.", "",
        "## Versions", "",
        *[f"- {k}: {v}" for k, v in (record.get("versions") or {}).items()], ""]
    return "\n".join(lines)


def write_card(out_dir: str, record: dict, wd) -> str:
    """Writes ``MODEL_CARD.md`` into a bundle folder being written."""
    path = os.path.join(out_dir, paths.MODEL_CARD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(card_text(record, wd))
    return path
