"""The label audit: folds, exclusion files, the three checks, and a small audit end to end
(2 folds, 1 epoch) -- as a Slurm job array (slurm/audit.sh) when a cluster is up, else with
``python -m jaxmm.audit`` -- then rerun locally (finished folds skipped), compared, resumed with
another exclusion list (refused)."""

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jaxmm import files, paths
from jaxmm.data import exclusions, synthetic
from jaxmm.errors import ConfigError
from jaxmm.evaluation import label_issues
from jaxmm.experiments import audit
from jaxmm.trained.workdir import data_changes
from tests import support

CLASSES = list(synthetic.CLASSES)
FLAGS = ["--config.demo.enabled=False", "--config.stored_image_size=40",
         "--config.image_size=32", "--config.batch_size=8", "--config.eval_batch_size=8",
         "--config.num_epochs=1", "--config.checkpoint_every_steps=100",
         "--config.model.modality_dropout=0.2"]
SBATCH = ["--gpus-per-node=0", "--ntasks=1", "--cpus-per-task=1", "--time=15"]


# --- folds, exclusion files and checks, without training ---------------------------------------

def test_folds_are_stratified_deterministic_and_checked():
    labels = np.repeat(np.arange(3), [9, 5, 4])
    names = [f"f{i:02d}" for i in range(len(labels))]
    fold = audit.assign_folds(names, labels, 4, seed=3, class_names=["a", "b", "c"])
    for c in range(3):
        per_fold = np.bincount(fold[labels == c], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1  # every class dealt evenly
    assert np.array_equal(fold, audit.assign_folds(names, labels, 4, 3, ["a", "b", "c"]))
    assert not np.array_equal(fold, audit.assign_folds(names, labels, 4, 4, ["a", "b", "c"]))
    with pytest.raises(ConfigError, match="class 'c' has 4 Train example.*fewer than the 5 folds"):
        audit.assign_folds(names, labels, 5, 0, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="fold 1 holds out no example of class 'b'"):
        audit.check_folds(np.array([0, 1, 2, 0, 2]), np.array([0, 0, 1, 1, 1]), 3, ["a", "b"])
    with pytest.raises(ConfigError, match="fold 0 trains on no example of class 'b'"):
        audit.check_folds(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 0]), 2, ["a", "b"])


def _names():
    return {"train": ["T/Black/a.png", "T/Blue/b.png", "=c.png", "T/TTR/d.png"],
            "validation": ["V/Blue/e.png"], "test": ["S/TTR/f.png"]}


def test_exclusion_file_resolution(tmp_path):
    path = tmp_path / "x.csv"
    files.write_csv(str(path), [{"file": "T/Blue/b.png"}, {"file": "-c.png"},  # not a file
                                {"file": "=c.png", "keep": "yes"}], ["file", "keep"])
    with pytest.raises(ConfigError, match=r"names 1 file\(s\) that are in no split.*'-c.png'"):
        exclusions.resolve(str(path), _names(), [0, 1, 1, 3], CLASSES)
    # A name protected from spreadsheets (leading apostrophe) still matches; Val/Test rows are
    # counted, not applied; keep=yes rows stay.
    files.write_csv(str(path), [{"file": "=c.png", "keep": ""},
                                {"file": "T/Black/a.png", "keep": "1"},
                                {"file": "V/Blue/e.png"}, {"file": "S/TTR/f.png"}],
                    ["file", "keep"])
    ex = exclusions.resolve(str(path), _names(), [0, 1, 1, 3], CLASSES)
    assert ex.excluded == ["=c.png"] and ex.keep_index.tolist() == [0, 1, 3]
    assert ex.ignored == {"validation": 1, "test": 1}
    assert ex.kept_counts == {"Black": 1, "Blue": 1, "Green": 0, "TTR": 1}
    assert ex.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "1 Train example(s) left out, 3 kept; 2 row(s) of other splits ignored" in \
        ex.summary_line()
    plain = {"class_names": CLASSES}  # run records' data: another list is a data change
    with_list = {**plain, "exclusions": ex.record()}
    assert data_changes(plain, plain) == [] and len(data_changes(plain, with_list)) == 1
    assert "exclusions.sha256" in data_changes(plain, with_list)[0]
    assert data_changes(with_list, {**plain, "exclusions": {**ex.record(), "file": "/x.csv"}}) \
        == []  # the same list moved elsewhere
    files.write_csv(str(path), [{"file": "T/TTR/d.png"}], ["file"])
    with pytest.raises(ConfigError, match="would leave no Train example of class 'TTR'"):
        exclusions.resolve(str(path), _names(), [0, 1, 1, 3], CLASSES)
    path.write_text("name\nT/TTR/d.png\n")
    with pytest.raises(ConfigError, match="has no 'file' column"):
        exclusions.read_names(str(path))
    path.write_text("file,keep\nT/TTR/d.png,maybe\n")
    with pytest.raises(ConfigError, match="line 2: keep='maybe'"):
        exclusions.read_names(str(path))


def test_checks_on_planted_probabilities():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    probs = np.full((200, 4), 0.02) + rng.uniform(0, 0.02, (200, 4))
    probs[np.arange(200), labels] = 0.9
    wrong = np.array([3, 60, 120, 170])  # the model is sure of another class
    probs[wrong] = probs[wrong][:, ::-1]
    probs /= probs.sum(1, keepdims=True)
    found, joint = label_issues.label_issue_check(labels, probs)
    assert sorted(found) == wrong.tolist()
    assert [found[i][0] for i in wrong] == [3, 2, 1, 0]
    assert joint.shape == (4, 4) and abs(joint.sum() - 1) < 1e-6
    # Each tower alone must doubt the label too: at 3 the image alone backs the given label.
    towers = np.full((2, 200, 4), 0.1)
    towers[:, np.arange(200), 3 - labels] = 0.7
    towers[0, 3, labels[3]] = 0.7
    kept, _ = label_issues.label_issue_check(labels, probs, towers=towers, tower_doubt=0.3)
    assert sorted(kept) == [60, 120, 170]
    assert "image alone 0.70" in label_issues.label_issue_check(
        labels, probs, towers=towers, tower_doubt=1.0)[0][3][2]

    image = np.eye(4)[[0, 1, 2, 0]] * 0.95 + 0.0125
    text = np.eye(4)[[0, 2, 2, 0]] * 0.95 + 0.0125
    text[3] = [0.4, 0.3, 0.2, 0.1]  # not confident
    conflicts = label_issues.cross_modal_check([0, 1, 1, 3], image, text, 0.9)
    assert sorted(conflicts) == [1, 2]  # towers disagree; towers agree on another class (2)
    assert conflicts[1][0] == 2 and conflicts[2][0] == 2

    within = {"pairs": [{"kind": "near", "split": "train", "files": ["a", "b"], "rms": 5.1},
                        {"kind": "exact", "split": "train", "files": ["a", "c"], "rms": 0.0},
                        {"kind": "exact", "split": "test", "files": ["x", "y"], "rms": 0.0}]}
    dup = label_issues.duplicate_check(within, "train", ["a", "b", "c"], [0, 1, 0])
    assert sorted(dup) == [0, 1] and dup[1][0] == 0 and dup[0][2] == "near copy of b"


# --- a small audit end to end ------------------------------------------------------------------

def _snapshot(root) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
    return out


def _wait(job: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                             text=True, timeout=30, check=False).stdout
        states = re.findall(r"JobState=(\S+)", out)
        if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states):
            return states
        time.sleep(2)
    return states


def _audit_by_slurm(tmp, flags, audit_dir) -> dict:
    cluster = support.Cluster(tmp)
    try:
        out = subprocess.run(
            ["slurm/audit.sh", *SBATCH, "--", *flags],
            cwd=support.REPO, capture_output=True, text=True, timeout=300, check=False,
            env=dict(cluster.env, CONFIG="configs/demo.py", AUDIT_DIR=str(audit_dir), FOLDS="2",
                     AUDIT_PARALLEL="1"))
        assert out.returncode == 0, out.stdout + out.stderr
        array = re.search(r"submitted job array (\d+) \(folds 0,1", out.stdout).group(1)
        score = re.search(r"submitted scoring job (\d+)", out.stdout).group(1)
        cluster.jobs += [array, score]
        logs = lambda: "\n".join(p.read_text(errors="replace")
                                 for p in sorted((audit_dir / "logs").glob("*.out")))
        assert _wait(array, support.JOB_TIMEOUT_S) == ["COMPLETED"] * 2, logs()
        assert _wait(score, 300) == ["COMPLETED"], logs()
        return {"mode": "slurm", "logs": logs()}
    finally:
        cluster.cancel_all()


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """Noisy tiny data with a planted in-split copy under another label, audited in 2 folds."""
    tmp = tmp_path_factory.mktemp("audit")
    raw = tmp / "raw"
    synthetic.generate(str(raw), per_class=12, seed=1, max_side=64, workers=1, label_noise=0.1)
    blue = raw / "CVPR_2024_dataset_Train" / "Blue"
    original = sorted(blue.iterdir())[0]
    with Image.open(original) as im:
        im.convert("RGB").save(raw / "CVPR_2024_dataset_Train" / "Green" / "copy.png")
    before = _snapshot(raw)
    audit_dir = tmp / "audit"
    flags = [f"--config.data_dir={raw}", f"--config.prepared_dir={tmp / 'prepared'}", *FLAGS]
    if support.cluster_problem() is None:
        result = _audit_by_slurm(tmp, flags, audit_dir)
    else:
        out = subprocess.run(
            [sys.executable, "-m", "jaxmm.audit", "--config", "configs/demo.py", "--audit_dir",
             str(audit_dir), "--folds", "2", "--", *flags],
            cwd=support.REPO, env=support.env(2), capture_output=True, text=True, timeout=900,
            check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        result = {"mode": "local", "logs": out.stdout}
    assert _snapshot(raw) == before  # the raw data is never written to
    return {**result, "raw": raw, "dir": audit_dir, "tmp": tmp, "flags": flags,
            "copy": (f"CVPR_2024_dataset_Train/Blue/{original.name}",
                     "CVPR_2024_dataset_Train/Green/copy.png")}


def test_slurm_array_trains_the_folds(audited):
    if audited["mode"] != "slurm":
        pytest.skip(f"no Slurm cluster: {support.cluster_problem()}")
    assert "array task 0: workdir" in audited["logs"] and "array task 1" in audited["logs"]
    assert "scoring the fold runs" in audited["logs"]


def test_outputs_flag_the_planted_copy_and_summarise(audited):
    d = audited["dir"]
    rows = support.read_csv(d / label_issues.ISSUES_FILE)
    assert rows and list(rows[0]) == label_issues.COLUMNS
    by_file = {r["file"]: r for r in rows}
    a, b = audited["copy"]
    assert "duplicate" in by_file[a]["reason"] and "duplicate" in by_file[b]["reason"]
    assert (by_file[b]["given"], by_file[b]["suggested"]) == ("Green", "Blue") or \
        "label_issue" in by_file[b]["reason"]
    assert {r["split"] for r in rows} <= {"train", "validation", "test"}
    probs = audit.load_probabilities(str(d))
    assert np.isfinite(probs["train"]["p_image+text"]).all()  # every Train example, out of fold
    assert {"p_image", "p_text"} <= set(probs["train"])
    summary = files.read_json(str(d / label_issues.SUMMARY_FILE))
    assert [r["status"] for r in summary["fold_runs"]] == ["finished", "finished"]
    assert all(0 <= r["validation"]["accuracy"] <= 1 for r in summary["fold_runs"])
    train = summary["splits"]["train"]
    assert set(train["estimated_noise_rate"]) == set(CLASSES)
    assert train["flagged"] == sum(r["split"] == "train" for r in rows)
    assert sum(train["class_pairs"].values()) == train["flagged"]
    assert os.path.getsize(d / label_issues.GALLERY_FILE) > 5000


def test_fold_runs_train_on_the_other_folds(audited):
    d = audited["dir"]
    held = [exclusions.read_names(audit.fold_file(str(d), k)) for k in (0, 1)]
    assert not set(held[0]) & set(held[1])
    for k in (0, 1):
        record = files.read_json(str(d / f"fold{k}" / paths.CONFIG_FILE))
        ex = record["data"]["exclusions"]
        assert ex["sha256"] == exclusions.sha256_of(audit.fold_file(str(d), k))
        assert ex["excluded"] == len(held[k]) and set(ex["kept_counts"]) == set(CLASSES)
        kept = sum(ex["kept_counts"].values())
        assert kept == record["num_examples"]["train"] - len(held[k])
        assert record["steps_per_epoch"] == kept // 8
        n = np.array([ex["kept_counts"][c] for c in CLASSES], float)  # balanced, from kept
        assert np.allclose(record["class_weights"], kept / (len(CLASSES) * n), rtol=1e-5)


def test_rerun_skips_finished_folds_and_compare_lists_them(audited):
    d = audited["dir"]
    prepared = paths.dataset_path(str(audited["tmp"] / "prepared"))  # records, meta, tokenizer
    prepared_before = _snapshot(prepared)
    out = subprocess.run(
        [sys.executable, "-m", "jaxmm.audit", "--config", "configs/demo.py", "--audit_dir",
         str(d), "--folds", "2", "--", *audited["flags"]],
        cwd=support.REPO, env=support.env(2), capture_output=True, text=True, timeout=600,
        check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("finished, skipped") == 2 and "wrote" in out.stdout
    assert _snapshot(prepared) == prepared_before  # the audit never writes into the dataset
    res = subprocess.run([sys.executable, "-m", "jaxmm.compare", str(d)], cwd=support.REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    with open(d / f"{paths.COMPARISON_BASENAME}.csv", newline="") as f:
        assert sorted(r["run"] for r in csv.DictReader(f)) == ["fold0", "fold1"]


def test_resume_with_another_exclusion_list_is_refused(audited):
    d = audited["dir"]
    work = audited["tmp"] / "resume"
    shutil.copytree(d / "fold0", work)
    out = subprocess.run(
        [sys.executable, "-m", "jaxmm.train", "--config", "configs/demo.py", "--workdir",
         str(work), *audited["flags"],
         f"--config.exclude_file={audit.fold_file(str(d), 1)}"],
        cwd=support.REPO, env=support.env(2), capture_output=True, text=True, timeout=300,
        check=False)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "prepared data changed" in last and "exclusions.sha256" in last


def test_bad_audit_input_is_one_line_before_training(audited, tmp_path):
    base = [sys.executable, "-m", "jaxmm.audit", "--config", "configs/demo.py", "--audit_dir"]
    out = subprocess.run([*base, str(tmp_path / "a"), "--folds", "30", "--", *audited["flags"]],
                         cwd=support.REPO,
                         env=support.env(1), capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert re.search(r"class '\w+' has \d+ Train example\(s\), fewer than the 30 folds", line)
    assert not (tmp_path / "a" / "fold0").exists()
    bad = tmp_path / "bad.csv"
    files.write_csv(str(bad), [{"file": "CVPR_2024_dataset_Train/Blue/nothing.png"}], ["file"])
    config = support.tiny_config(str(audited["raw"]), **{
        "demo.enabled": False, "stored_image_size": 40, "exclude_file": str(bad),
        "prepared_dir": str(audited["tmp"] / "prepared")})
    from jaxmm.training import setup as setup_lib

    with pytest.raises(ConfigError, match="in no split of the prepared dataset"):
        setup_lib.prepared_data(config, log=lambda s: None)
    with pytest.raises(ConfigError, match="the audit sets it for each fold run"):
        audit.plan("configs/demo.py", [*audited["flags"], f"--config.exclude_file={bad}"],
                   str(tmp_path / "b"), 2)


def test_copies_within_splits_hashed_when_prepare_did_not_record_them(audited, tmp_path):
    """A dataset prepared before prepare looked within splits: the audit hashes the stored
    images itself (reading them, never writing) and finds the same copies."""
    from jaxmm.data import pipeline

    prepared = paths.dataset_path(str(audited["tmp"] / "prepared"))
    recorded = label_issues.within_split_copies(prepared, pipeline.load_splits(prepared))
    assert any(set(p["files"]) == set(audited["copy"]) for p in recorded["pairs"])
    older = tmp_path / "older"
    shutil.copytree(prepared, older)
    meta = files.read_json(str(older / paths.META_FILE))
    del meta["duplicates"]["within"]
    files.write_json(str(older / paths.META_FILE), meta)
    before = _snapshot(older)
    hashed = label_issues.within_split_copies(str(older), pipeline.load_splits(str(older)))
    assert _snapshot(older) == before
    key = lambda within: sorted((p["split"], p["kind"], sorted(p["files"]))
                                for p in within["pairs"])
    assert key(hashed) == key(recorded)
