"""Sweep files: grids, checks of every entry against the config, the sweep folder's record, and
slurm/sweep.sh against stand-ins for sbatch/squeue and jax_train.sh (no cluster needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmm import paths
from jaxmm.experiments import sweep

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo.py")
EXAMPLE = str(ROOT / "configs" / "sweeps" / "demo_lr_fusion.py")


def _sweep_file(tmp_path, body: str) -> str:
    path = tmp_path / "my_sweep.py"
    path.write_text(f"def get_sweep():\n    return {body}\n")
    return str(path)


def test_grid_is_every_combination_last_key_fastest():
    assert sweep.grid({"a": [1, 2], "b": ["x", "y", "z"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
        {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]


def test_example_sweep_plans_four_named_runs():
    runs = sweep.plan_runs(CONFIG, EXAMPLE)
    assert [r.name for r in runs] == [
        "0-lr_head=0.002_fusion=concat", "1-lr_head=0.002_fusion=gated",
        "2-lr_head=0.0005_fusion=concat", "3-lr_head=0.0005_fusion=gated"]
    assert runs[3].args == ["--config.optim.lr_head=0.0005", "--config.model.fusion=gated"]


def test_values_survive_the_command_line(tmp_path):
    runs = sweep.plan_runs(CONFIG, _sweep_file(tmp_path, """[
        {"model.modalities": ("text",), "model.freeze_text": True, "num_epochs": 3,
         "optim.weight_decay": 0, "class_weights": "none"},
        {"model.modalities": ["image", "text"], "model.dropout": 1e-5}]"""))
    config = sweep.parse_config(CONFIG, runs[0].args)
    assert config.model.modalities == ("text",) and config.model.freeze_text is True
    assert config.num_epochs == 3 and config.optim.weight_decay == 0.0
    assert sweep.parse_config(CONFIG, runs[1].args).model.dropout == 1e-5
    # Keys sharing a last part are named in full; 10+ entries get two-digit indices.
    assert sweep.run_name(3, {"model.dropout": 0.1, "x.dropout": 0.2}, 2) == (
        "03-model.dropout=0.1_x.dropout=0.2")


@pytest.mark.parametrize("body, message", [
    ('[{"optim.lr_head": 1e-3}, {"optim.lr_hed": 1e-3}]',
     r"sweep entry 1 \{'optim.lr_hed': 0.001\}: unknown config key 'optim.lr_hed' "
     r'\(Did you mean "lr_head"\?\)'),
    ('[{"num_epochs": 1.5}]', r"sweep entry 0 .*'num_epochs' = 1.5 \(float\) does not fit"),
    ('[{"optim.lr_head": "fast"}]', r"'optim.lr_head' = 'fast' \(str\) does not fit"),
    ('[{"optim": 3}]', r"'optim' = 3 \(int\) does not fit"),
    ('[{"nothing.here": 1}]', r"unknown config key 'nothing.here'"),
    ('[{"text_source": "caption"}, {"text_source": "filename"}]',
     r"sweep entries 0 and 1 prepare different data \(text_source: 'caption' vs 'filename'\)"),
    ('[{"early_stopping_metric": "f2"}]',
     r"sweep entry 0 \{'early_stopping_metric': 'f2'\}: config.early_stopping_metric='f2'"),
    ('[{"model.modalities": ["audio"]}]',
     r"sweep entry 0 .*config.model.modalities must be a non-empty subset of \('image', "
     r"'text'\), got \('audio',\)"),
    ('[{"init_from": "no/such/run:best"}]',
     r"config.init_from='no/such/run:best': no/such/run is not a training workdir"),
    ('[{"calibration": "sometimes"}]', r"config.calibration='sometimes': choose one of"),
    ('[{"seed": 1}, {"seed": 2}, {"seed": 1}]',
     r"sweep entries 0 and 2 are the same \(\{'seed': 1\}\)"),
    ('[]', "non-empty list of dicts"),
    ('[{"a": 1}, 3]', "sweep entry 1 is not a dict"),
    ('[1/0]', "ZeroDivisionError"),
])
def test_bad_entries_are_rejected_naming_key_and_entry(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        sweep.plan_runs(CONFIG, _sweep_file(tmp_path, body))


def test_different_data_is_fine_in_different_prepared_dirs(tmp_path):
    runs = sweep.plan_runs(CONFIG, _sweep_file(tmp_path, """[
        {"text_source": "caption", "prepared_dir": "/data/p_caption"},
        {"text_source": "filename", "prepared_dir": "/data/p_filename"}]"""))
    assert len(runs) == 2


def _finish(workdir: Path, status: str = "finished") -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / paths.SUMMARY_FILE).write_text(json.dumps({"status": status}))


def test_resubmission_skips_finished_and_active_runs_and_keeps_the_record(tmp_path):
    d = str(tmp_path / "sw")
    runs = sweep.plan_runs(CONFIG, EXAMPLE)
    sweep.write_manifest(d, CONFIG, EXAMPLE, ["--config.num_epochs=1"], runs)
    _finish(tmp_path / "sw" / runs[0].name)
    _finish(tmp_path / "sw" / runs[1].name, "preempted")  # Resumes.
    _finish(tmp_path / "sw" / runs[2].name, "early_stopped")
    lines = []
    assert sweep.to_submit(d, runs, active={3}, log=lines.append) == [1]
    assert "finished, skipped" in lines[0] and "resumes" in lines[1]
    assert "already queued or running" in lines[3]
    # The same sweep again is fine, and so is a longer one; a changed entry is not.
    sweep.write_manifest(d, CONFIG, EXAMPLE, ["--config.num_epochs=1"], runs)
    more = sweep.plan_runs(CONFIG, _sweep_file(tmp_path, repr([r.overrides for r in runs]
                                                             + [{"optim.lr_head": 1e-4}])))
    sweep.write_manifest(d, CONFIG, EXAMPLE, ["--config.num_epochs=1"], more)
    changed = sweep.plan_runs(CONFIG, _sweep_file(tmp_path, repr(
        [{"optim.lr_head": 0.1}] + [r.overrides for r in more[1:]])))
    with pytest.raises(ValueError, match="sweep entry 0 changed since"):
        sweep.write_manifest(d, CONFIG, EXAMPLE, ["--config.num_epochs=1"], changed)
    with pytest.raises(ValueError, match="common_args differs"):
        sweep.write_manifest(d, CONFIG, EXAMPLE, [], more)
    with pytest.raises(ValueError, match="the sweep has 4 entries"):
        sweep.write_manifest(d, CONFIG, EXAMPLE, ["--config.num_epochs=1"], runs)


def test_task_lines(tmp_path):
    d = str(tmp_path / "sw")
    runs = sweep.plan_runs(CONFIG, EXAMPLE)
    sweep.write_manifest(d, CONFIG, EXAMPLE, ["--config.num_epochs=1"], runs)
    assert sweep.task_lines(d, 1) == ["run", os.path.join(d, runs[1].name), CONFIG,
                                      "--config.num_epochs=1", *runs[1].args]
    _finish(tmp_path / "sw" / runs[1].name)
    assert sweep.task_lines(d, 1)[0] == "finished"
    with pytest.raises(ValueError, match="has no run 9"):
        sweep.task_lines(d, 9)


# --- slurm/sweep.sh with stand-ins ----------------------------------------------------------

def _fake_bin(tmp_path: Path) -> Path:
    """sbatch records its arguments and prints a job id; squeue reports array task 2 queued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/sbatch_args\necho 4242\n')
    (bin_dir / "squeue").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/squeue_args\necho 2\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _sweep_sh(tmp_path, *args, **env):
    env = dict(os.environ, PATH=f"{_fake_bin(tmp_path)}:{os.environ['PATH']}",
               JAXMM_PYTHON=sys.executable, CONFIG="configs/demo.py",
               SWEEP_DIR=str(tmp_path / "sw"), **env)
    return subprocess.run([str(ROOT / "slurm" / "sweep.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_sweep_sh_submits_one_array_of_the_runs_left(tmp_path):
    _finish(tmp_path / "sw" / "0-lr_head=0.002_fusion=concat")
    out = _sweep_sh(tmp_path, EXAMPLE, "--gpus-per-node=0", "--time=5", "--",
                    "--config.num_epochs=1", SWEEP_PARALLEL="2")
    assert out.returncode == 0, out.stderr
    args = (tmp_path / "sbatch_args").read_text().splitlines()
    # jax_train.sh's defaults first (signal and requeue included), the user's options last.
    assert args.index("--gpus-per-node=1") < args.index("--gpus-per-node=0")
    assert args.index("--time=24:00:00") < args.index("--time=5")
    assert "--requeue" in args and "--signal=B:USR1@180" in args
    assert "--array=1,3%2" in args  # 0 finished, 2 still queued.
    assert "--job-name=jaxmm-sweep-sw" in args
    queried = (tmp_path / "squeue_args").read_text().splitlines()
    assert queried[queried.index("-n") + 1] == "jaxmm-sweep-sw"
    assert args[-3:] == [str(ROOT / "slurm" / "sweep.sh"), "--task", str(tmp_path / "sw")]
    assert "submitted job array 4242" in out.stdout
    manifest = json.loads((tmp_path / "sw" / paths.SWEEP_FILE).read_text())
    assert manifest["common_args"] == ["--config.num_epochs=1"]


def test_sweep_sh_rejects_a_bad_entry_before_submitting(tmp_path):
    bad = _sweep_file(tmp_path, '[{"optim.lr_head": 1e-3}, {"model.fusoin": "gated"}]')
    out = _sweep_sh(tmp_path, bad)
    assert out.returncode == 2
    assert "sweep entry 1" in out.stderr and "model.fusoin" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sbatch_args").exists()


def test_sweep_task_becomes_jax_train_with_the_runs_arguments(tmp_path):
    """The array task execs jax_train.sh (same pid: Slurm's signals reach its traps)."""
    root = tmp_path / "root"
    (root / "slurm").mkdir(parents=True)
    (root / "jaxmm").symlink_to(ROOT / "jaxmm")
    (root / "slurm" / "common.sh").symlink_to(ROOT / "slurm" / "common.sh")
    fake = root / "slurm" / "jax_train.sh"
    fake.write_text('#!/bin/sh\necho "pid=$$ workdir=$WORKDIR config=$CONFIG '
                    'lock=$JAXMM_PREPARE_LOCK args=$*"\n')
    fake.chmod(0o755)
    d = str(tmp_path / "sw")
    sweep.write_manifest(d, CONFIG, EXAMPLE, [], sweep.plan_runs(CONFIG, EXAMPLE))
    script = (f'echo "pid=$$"; exec {ROOT}/slurm/sweep.sh --task {d}')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         check=False, env=dict(os.environ, JAXMM_ROOT=str(root),
                                               JAXMM_PYTHON=sys.executable,
                                               PYTHONPATH=str(ROOT), SLURM_ARRAY_TASK_ID="2"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[0] == lines[-1].split()[0]  # the same pid
    assert f"workdir={d}/2-lr_head=0.0005_fusion=concat config={CONFIG}" in lines[-1]
    assert f"lock={d}/.prepare.lock" in lines[-1]
    assert lines[-1].endswith("args=--config.optim.lr_head=0.0005 --config.model.fusion=concat")
