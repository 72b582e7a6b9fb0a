"""The label audit's checks and what they leave in the audit folder.

Three checks, each on its own, over the probabilities of ``jaxmm.experiments.audit`` (out of fold
for Train, the mean of the fold models for Val and Test):
- ``label_issue``: confident learning with cleanlab (``cleanlab.filter.find_label_issues`` with
  its per-class thresholds and its estimate of the joint of given and true label; nothing of it
  is re-implemented here), kept where the fused model gives the label little probability and
  each tower alone doubts it too;
- ``cross_modal``: the image alone and the text alone (the model's own towers, the other one
  masked) are both confident and disagree with each other or both with the label;
- ``duplicate``: an exact or near copy of the image in the same split carries another label
  (prepare's duplicate check).
Outputs: ``label_issues.csv`` (one row per flagged example; an ``exclude_file`` as it is),
``summary.json`` and the ``label_issues.png`` gallery.
"""

import dataclasses
import os
import textwrap

import numpy as np

from jaxmm import files, paths
from jaxmm.data import dedup, transforms

ISSUES_FILE = "label_issues.csv"
SUMMARY_FILE = "summary.json"
GALLERY_FILE = "label_issues.png"
COLUMNS = ["file", "split", "given", "suggested", "score", "reason", "text", "detail", "keep"]
CHECKS = ("label_issue", "cross_modal", "duplicate")
# cleanlab.filter.find_label_issues' filter_by rules.
FILTER_RULES = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                "predicted_neq_given", "low_normalized_margin", "low_self_confidence")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The checks' thresholds. The defaults were chosen on seeds 0-2 of benchmarks/label_audit.py
    (look-alike data, 8 % of Train mislabelled; docs/evaluation.md) before seeds 3-5 were
    measured: the most precise setting whose recall stays >= 0.7 on each of seeds 0-2."""

    # cleanlab's rule for which off-diagonal examples to flag (FILTER_RULES).
    filter_by: str = "prune_by_class"
    # Of cleanlab's issues, keep those whose score (1 - the probability of the given label) is
    # at least this (0: no such condition).
    min_score: float = 0.0
    # ... and that each tower alone doubts too: the image alone and the text alone each give the
    # given label less than this (1: no such condition). A correct label with one misleading
    # modality (a black-looking blue bottle) is doubted by the fused model but not by the other
    # tower; a wrong label by both.
    tower_doubt: float = 0.2
    # Both towers at least this sure for a cross-modal conflict (the most precise of 0.6-0.9
    # that flags anything).
    conflict_confidence: float = 0.7

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULTS = Settings()


def require_cleanlab() -> None:
    """Raises a one-line ConfigError when the optional cleanlab is not installed."""
    import importlib.util

    from jaxmm.errors import ConfigError

    if importlib.util.find_spec("cleanlab") is None:
        raise ConfigError("the label audit needs cleanlab: pip install -r requirements-audit.txt "
                          "(or pip install 'jaxmm[audit]', or slurm/setup_env.sh audit)")


def label_issue_check(labels, probs, filter_by: str = DEFAULTS.filter_by,
                      min_score: float = DEFAULTS.min_score, towers=None,
                      tower_doubt: float = DEFAULTS.tower_doubt) -> tuple[dict, np.ndarray]:
    """cleanlab's confident learning on out-of-sample probabilities.

    Args:
      labels: [N] given labels.
      probs: [N, K] out-of-sample probabilities.
      filter_by: cleanlab's ``find_label_issues`` rule.
      min_score: of the issues cleanlab finds, keep those with a score (1 - cleanlab's
        self-confidence label quality, i.e. 1 - p(given label)) at least this.
      towers: None, or ([N, K] image-alone, [N, K] text-alone probabilities) of the same models.
      tower_doubt: with ``towers``, keep only the issues to whose given label each tower alone
        gives less than this.

    Returns:
      ({index: (suggested class, score, detail)}, the estimated joint [K, K] of given (rows) and
      true label).
    """
    require_cleanlab()
    import cleanlab.count
    import cleanlab.filter
    import cleanlab.rank

    labels, probs = np.asarray(labels, np.int64), np.asarray(probs, np.float64)
    probs = probs / probs.sum(1, keepdims=True)
    flagged = cleanlab.filter.find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1)
    quality = cleanlab.rank.get_label_quality_scores(labels, probs)
    joint = cleanlab.count.estimate_joint(labels, probs)
    keep = flagged & (1.0 - quality >= min_score)
    rows = np.arange(len(labels))
    given_by = [] if towers is None else [np.asarray(t, np.float64)[rows, labels] for t in towers]
    if tower_doubt < 1.0:
        for given in given_by:
            keep &= given < tower_doubt
    out = {}
    for i in np.flatnonzero(keep):
        other = probs[i].copy()
        other[labels[i]] = -1.0
        detail = f"p(given)={probs[i, labels[i]]:.2f}, p(suggested)={other.max():.2f}"
        if given_by:
            detail += (f"; p(given) image alone {given_by[0][i]:.2f}, "
                       f"text alone {given_by[1][i]:.2f}")
        out[int(i)] = (int(other.argmax()), float(1.0 - quality[i]), detail)
    return out, joint


def cross_modal_check(labels, image_probs, text_probs,
                      confidence: float = DEFAULTS.conflict_confidence) -> dict:
    """Examples whose image alone and text alone are both at least ``confidence`` sure and
    disagree with each other, or agree on a class other than the label.

    Returns:
      {index: (suggested class, score, detail)}: the suggestion is the towers' common class,
      else the more confident tower's class that is not the label.
    """
    out = {}
    image_probs, text_probs = np.asarray(image_probs), np.asarray(text_probs)
    for i, label in enumerate(np.asarray(labels)):
        a, b = int(image_probs[i].argmax()), int(text_probs[i].argmax())
        ca, cb = float(image_probs[i, a]), float(text_probs[i, b])
        if min(ca, cb) < confidence or (a == b == label):
            continue
        candidates = sorted(((ca, a), (cb, b)), reverse=True)
        suggested = next((c for _, c in candidates if c != label), a)
        out[i] = (suggested, min(ca, cb), f"image says {a} ({ca:.2f}), text says {b} ({cb:.2f})")
    return out


def duplicate_check(within: dict, split: str, files_: list, labels) -> dict:
    """Examples with a copy of their image in the same split under another label.

    Args:
      within: ``dedup.find_within``'s result.
      split: the split to check.
      files_: the split's file names, in record order.
      labels: their labels.

    Returns:
      {index: (the copy's class, score (1 exact, else 1 - RMS / 255), detail)}.
    """
    where = {n: i for i, n in enumerate(files_)}
    out = {}
    for pair in within.get("pairs", []):
        if pair["split"] != split or not all(f in where for f in pair["files"]):
            continue
        i, j = (where[f] for f in pair["files"])
        if labels[i] == labels[j]:
            continue
        score = 1.0 if pair["kind"] == "exact" else 1.0 - pair["rms"] / 255.0
        for a, b in ((i, j), (j, i)):
            out[a] = (int(labels[b]), score, f"{pair['kind']} copy of {files_[b]}")
    return out


def within_split_copies(dataset_dir: str, sources: dict) -> dict:
    """The copies within each split: prepare's report, or (a dataset prepared before prepare
    looked within splits) hashed here from the stored images, which are read, never written."""
    meta = files.read_json(os.path.join(dataset_dir, paths.META_FILE)) or {}
    within = (meta.get("duplicates") or {}).get("within")
    if within is not None:
        return within
    hashes = {}
    for split, source in sources.items():
        rows = []
        for r in source.__getitems__(list(range(len(source)))):
            img = transforms.as_pil(r["image"]).convert("RGB")
            rows.append((files.text(r["file_name"]), dedup.exact_hash(img, img.size),
                         dedup.perceptual_hash(img), dedup.thumbnail(img)))
        hashes[split] = rows
    return dedup.find_within(hashes)


def run_checks(probs: dict, class_names: list, within: dict, settings: Settings = DEFAULTS
               ) -> tuple[list, dict]:
    """Every check on every split.

    Args:
      probs: ``audit.collect_probabilities``' result.
      class_names: class names in label order.
      within: the copies within splits.
      settings: the checks' thresholds.

    Returns:
      (rows of label_issues.csv, most doubtful first; {split: {"check": {index: ...}},
      "joint": {split: [K, K]}}).
    """
    rows, found = [], {"joint": {}}
    for split, d in probs.items():
        labels = d["label"]
        checks = {}
        towers = (d["p_image"], d["p_text"]) if "p_image" in d and "p_text" in d else None
        if "p_image+text" in d:
            checks["label_issue"], joint = label_issue_check(
                labels, d["p_image+text"], settings.filter_by, settings.min_score, towers,
                settings.tower_doubt)
            found["joint"][split] = joint
        if towers is not None:
            checks["cross_modal"] = cross_modal_check(labels, *towers,
                                                      settings.conflict_confidence)
        checks["duplicate"] = duplicate_check(within, split, list(d["file"]), labels)
        found[split] = checks
        for i in sorted(set().union(*checks.values())):
            hits = [(c, checks[c][i]) for c in CHECKS if i in checks.get(c, {})]
            suggested = hits[0][1][0]  # label_issue first, then cross_modal, then duplicate
            rows.append({"file": str(d["file"][i]), "split": split,
                         "given": class_names[int(labels[i])],
                         "suggested": class_names[suggested],
                         "score": round(max(h[1][1] for h in hits), 4),
                         "reason": "+".join(c for c, _ in hits), "text": str(d["text"][i]),
                         "detail": "; ".join(f"{c}: {h[2]}" for c, h in hits), "keep": ""})
    order = {"train": 0, "validation": 1, "test": 2}
    rows.sort(key=lambda r: (order.get(r["split"], 3), -r["score"], r["file"]))
    return rows, found


def summary(rows: list, found: dict, probs: dict, class_names: list, settings: dict,
            runs: list) -> dict:
    """summary.json: counts per split, check and class pair, the estimated noise rate per class
    (cleanlab's joint on Train), the fold runs and their validation metrics."""
    out = {"settings": settings, "fold_runs": runs, "splits": {}}
    for split, d in probs.items():
        checks = found.get(split, {})
        pairs = {}
        for r in rows:
            if r["split"] == split:
                key = f"{r['given']}->{r['suggested']}"
                pairs[key] = pairs.get(key, 0) + 1
        entry = {"examples": len(d["label"]),
                 "flagged": sum(r["split"] == split for r in rows),
                 "per_check": {c: len(checks.get(c, {})) for c in CHECKS},
                 "class_pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1]))}
        joint = found["joint"].get(split)
        if joint is not None:
            given = joint.sum(1)
            entry["estimated_noise_rate"] = {
                c: float(1.0 - joint[i, i] / given[i]) if given[i] > 0 else None
                for i, c in enumerate(class_names)}
        out["splits"][split] = entry
    return out


def gallery(rows: list, image_of, path: str, top: int = 16, columns: int = 4) -> str:
    """The ``top`` most doubtful rows as a grid: image, text, given and suggested label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = rows[:top]
    if not shown:
        fig = Figure(figsize=(4, 1.5))
        fig.text(0.5, 0.5, "no label issues found", ha="center", va="center")
    else:
        columns = min(columns, len(shown))
        n_rows = -(-len(shown) // columns)
        fig = Figure(figsize=(3.4 * columns, 4.0 * n_rows), layout="constrained")
        axes = np.asarray(fig.subplots(n_rows, columns, squeeze=False)).reshape(-1)
        for ax, r in zip(axes, shown, strict=False):
            ax.imshow(np.asarray(image_of(r)))
            ax.set_title(f"{r['split']}: given {r['given']} -> {r['suggested']}?\n"
                         f"{r['reason']} ({r['score']:.2f})", fontsize=8, color="firebrick")
            ax.set_xlabel(textwrap.shorten(r["text"], 50) or "(no text)", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[len(shown):]:
            ax.set_axis_off()
        fig.suptitle(f"most doubtful labels ({len(rows)} flagged in all)")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90)
    return path
