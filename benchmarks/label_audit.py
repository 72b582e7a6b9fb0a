"""Measures the label audit against planted wrong labels (not part of CI).

    python benchmarks/label_audit.py --seeds 0,1,2 --out runs/label_audit_bench --tune
    python benchmarks/label_audit.py --seeds 3,4,5 --out runs/label_audit_bench

Per seed: look-alike data (``jaxmm.data.synthetic``, ``--per_class`` files per class: 200 by
default, 800 Train images; the demo's size is 60) with a fraction ``--noise`` of Train filed under
a wrong class (the truth in its side file, read here only), ``jaxmm.audit`` on it with the demo
config, then precision and recall of each check against the truth (Train only), and the test
accuracy of a default run vs a retrain with ``exclude_file=label_issues.csv``. Everything runs in
this process, one run after the other, so the compiled programs are shared. ``--tune`` also
scores a grid of thresholds on the saved probabilities and prints the setting ``choose`` picks:
use it on seeds 0-2 only, make that the default in ``jaxmm/evaluation/label_issues.py``
(``Settings``), then measure seeds 3-5 untouched. ``--rescore`` scores the saved probabilities
again without training the folds (the cleaned retrain trains anew when its list changed).
Results: ``OUT/seed<N>/result.json`` per seed and ``OUT/results.json`` for all seeds given.
"""

import argparse
import csv
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(data_dir: str, seed: int, epochs: int, extra=()):
    from jaxmm.experiments import sweep

    args = [f"--config.data_dir={data_dir}", "--config.demo.enabled=False",
            f"--config.seed={seed}", f"--config.num_epochs={epochs}", *extra]
    return "configs/demo.py", args, sweep.parse_config("configs/demo.py", args)


def _precision_recall(flagged: set, truth: set) -> dict:
    hit = len(flagged & truth)
    return {"flagged": len(flagged), "correct": hit,
            "precision": hit / len(flagged) if flagged else None,
            "recall": hit / len(truth) if truth else None}


def _train_and_test(config, workdir: str) -> float:
    from jaxmm.evaluation import report
    from jaxmm.experiments import sweep
    from jaxmm.training import loop

    if not sweep.is_done(workdir):
        loop.train_and_evaluate(config, workdir)
    return float(report.evaluate_run(workdir, "test")["metrics"]["accuracy"])


def _check_scores(probs, class_names, within, truth, settings) -> dict:
    from jaxmm.evaluation import label_issues

    _, found = label_issues.run_checks({"train": probs["train"]}, class_names, within, settings)
    files_ = probs["train"]["file"]
    out = {c: _precision_recall({str(files_[i]) for i in found["train"].get(c, {})}, truth)
           for c in label_issues.CHECKS}
    union = set().union(*({str(files_[i]) for i in v} for v in found["train"].values()))
    out["any"] = _precision_recall(union, truth)
    return out


# The grid --tune scores: the label-issue check's thresholds (filter_by, min_score,
# tower_doubt) and, separately, the cross-modal confidence.
_FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning")
_MIN_SCORES = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9)
_TOWER_DOUBTS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0)
_CONFIDENCES = (0.6, 0.7, 0.8, 0.9)


def _tuning(probs, class_names, within, truth) -> dict:
    from jaxmm.evaluation import label_issues

    out = {}
    for fb in _FILTERS:
        for ms in _MIN_SCORES:
            for td in _TOWER_DOUBTS:
                settings = label_issues.Settings(fb, ms, td)
                out[f"label_issue {fb} min_score={ms} tower_doubt={td}"] = _check_scores(
                    probs, class_names, within, truth, settings)["label_issue"]
    for c in _CONFIDENCES:
        settings = label_issues.Settings(conflict_confidence=c)
        out[f"cross_modal confidence={c}"] = _check_scores(
            probs, class_names, within, truth, settings)["cross_modal"]
    return out


def choose(results: list, min_recall: float = 0.7) -> list[str]:
    """Per check, the tuning entry to make the default.

    The label-issue check: the highest pooled precision among the settings whose recall on
    every seed given is at least ``min_recall`` (0.7: a margin over the goal of 0.6, as seeds
    differ); of equals, the one with the lowest ``min_score`` (the fewest conditions). The
    cross-modal check: the most precise confidence that flags anything.
    """
    pooled = {}
    for r in results:
        for key, s in r["tuning"].items():
            p = pooled.setdefault(key, [0, 0, 0, 1.0])
            p[0] += s["flagged"]
            p[1] += s["correct"]
            p[2] += r["planted"]
            p[3] = min(p[3], s["recall"])
    lines = []
    for check in ("label_issue", "cross_modal"):
        rows = []
        for key, (f, c, t, worst) in pooled.items():
            if key.startswith(check) and (worst >= min_recall if check == "label_issue"
                                          else f > 0):
                ms = float(key.split("min_score=")[1].split()[0]) if "min_score=" in key else 0
                rows.append((-(c / f if f else 0.0), ms, key, c / t, f, worst))
        if rows:
            p, _, key, rec, f, worst = min(rows)
            lines.append(f"{key}: pooled precision {-p:.3f}, recall {rec:.3f} (lowest seed "
                         f"{worst:.3f}; {f} flagged)")
        else:
            lines.append(f"{check}: no setting reaches the recall")
    return lines


def run_seed(seed: int, args) -> dict:
    from jaxmm import files
    from jaxmm.data import exclusions, pipeline, synthetic
    from jaxmm.evaluation import label_issues
    from jaxmm.experiments import audit

    root = os.path.abspath(os.path.join(args.out, f"seed{seed}"))
    data_dir = os.path.join(root, "data")
    if not os.path.isdir(data_dir):
        synthetic.generate(data_dir, per_class=args.per_class, seed=seed,
                           max_side=args.max_side, workers=1, label_noise=args.noise)
    with open(os.path.join(data_dir, synthetic.TRUTH_FILE), newline="", encoding="utf-8") as f:
        truth = {r["file"] for r in csv.DictReader(f)}
    start = time.time()
    config_file, common, config = _config(data_dir, seed, args.epochs)
    audit_dir = os.path.join(root, "audit")
    saved = os.path.join(root, "result.json")
    if args.rescore:  # the fold runs as they are: the checks again on their probabilities
        record = files.read_json(os.path.join(audit_dir, audit.AUDIT_FILE))
        result = files.read_json(saved)
    else:
        runs, record = audit.plan(config_file, common, audit_dir, args.folds)
        audit.train_folds(audit_dir, runs, config_file, common)
        result = {"seed": seed, "folds": args.folds, "epochs": args.epochs,
                  "per_class": args.per_class}
    audit.write_report(audit_dir)  # label_issues.csv with the current defaults
    probs = audit.load_probabilities(audit_dir)
    within = label_issues.within_split_copies(record["dataset_dir"],
                                              pipeline.load_splits(record["dataset_dir"]))
    p = probs["train"]
    result.update(train_examples=len(p["file"]), planted=len(truth),
                  out_of_fold_accuracy=float((p["p_image+text"].argmax(1) == p["label"]).mean()),
                  checks=_check_scores(probs, record["class_names"], within, truth,
                                       label_issues.DEFAULTS))
    if args.tune:
        result["tuning"] = _tuning(probs, record["class_names"], within, truth)
    if not args.rescore:
        result["audit_seconds"] = round(time.time() - start, 1)
    result["test_accuracy_default"] = _train_and_test(config, os.path.join(root, "default"))
    # The retrain without the flagged Train examples; its folder is named by the list's hash,
    # so another list (other defaults) trains anew.
    issues = os.path.join(audit_dir, label_issues.ISSUES_FILE)
    _, _, cleaned = _config(data_dir, seed, args.epochs, [f"--config.exclude_file={issues}"])
    with open(issues, newline="", encoding="utf-8") as f:
        result["excluded"] = sum(r["split"] == "train" for r in csv.DictReader(f))
    result["test_accuracy_cleaned"] = _train_and_test(cleaned, os.path.join(
        root, "cleaned-" + exclusions.sha256_of(issues)[:8]))
    result["settings"] = label_issues.DEFAULTS.as_dict()
    if not args.rescore:
        result["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(root, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


def _table(results: list) -> str:
    lines = ["| seed | check | flagged | precision | recall |", "|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    for r in results:
        for check, s in r["checks"].items():
            lines.append(f"| {r['seed']} | {check} | {s['flagged']} | {fmt(s['precision'])} | "
                         f"{fmt(s['recall'])} |")
    acc = [(r["test_accuracy_default"], r["test_accuracy_cleaned"]) for r in results]
    for name, k in (("default", 0), ("cleaned", 1)):
        values = [a[k] for a in acc]
        each = ", ".join(f"{v:.4f}" for v in values)
        lines.append(f"\ntest accuracy {name}: mean {sum(values) / len(values):.4f}, range "
                     f"{min(values):.4f}-{max(values):.4f} ({each})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/label_audit_bench")
    p.add_argument("--noise", type=float, default=0.08)
    p.add_argument("--per_class", type=int, default=200, help="files per class (the demo: 60)")
    p.add_argument("--max_side", type=int, default=128)
    p.add_argument("--epochs", type=int, default=10, help="the demo's epochs")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--tune", action="store_true", help="also score a grid of thresholds")
    p.add_argument("--rescore", action="store_true", help="only score the saved probabilities "
                   "of earlier runs again (after changing the defaults)")
    args = p.parse_args()
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(
        os.path.join(args.out, "jax_cache")))
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    results = [run_seed(int(s), args) for s in args.seeds.split(",")]
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(_table(results))
    if args.tune:
        print("\nchosen on these seeds:\n" + "\n".join(choose(results)))


if __name__ == "__main__":
    main()
