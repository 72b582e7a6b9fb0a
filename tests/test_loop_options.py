"""Training options in the loop: warm start (init_from), weight EMA and gradient accumulation,
and the progress output of batch jobs (log lines instead of a redrawn bar)."""

import json
import re
import subprocess

import jax
import numpy as np
import pytest
from etils import epath

from jaxmm import paths
from jaxmm.errors import ConfigError
from jaxmm.trained.model import ModelSpec
from jaxmm.trained.workdir import Workdir, model_architecture
from jaxmm.training import checkpointing, loop, train_log
from jaxmm.training import setup as setup_lib
from tests.support import REPO as ROOT
from tests.support import env as _env
from tests.support import tiny_config
from tests.support import train_cmd as _train_cmd


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from jaxmm.data import prepared

    path = str(tmp_path_factory.mktemp("demo_data"))
    prepared.ensure_prepared(tiny_config(path))
    return path


def _fake_source(workdir, config, setup, seed=3) -> dict:
    """A finished-looking run: config.json and a best checkpoint of random variables."""
    rng = np.random.default_rng(seed)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                             setup_lib.abstract_variables(config, setup.model))
    spec = ModelSpec(tuple(setup.data.class_names), model_architecture(setup.model, config),
                     setup_lib.preprocessing(config, setup.data.meta))
    Workdir(str(workdir)).write_record({"config": config.to_dict(),
                                        "class_names": setup.data.class_names,
                                        "model": spec.to_json()})
    ckpts = checkpointing.Checkpoints(str(workdir), 1)
    ckpts.save_best(40, variables, {})
    ckpts.close()
    return variables


def test_warm_start_takes_weights_and_statistics_only(data_dir, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    config = tiny_config(data_dir, ema_decay=0.9)
    setup = loop.build(config, str(tmp_path / "w0"))
    saved = _fake_source(source, config, setup)
    config.init_from = f"{source}:best"
    workdir = tmp_path / "warm"
    ckpts = checkpointing.Checkpoints(str(workdir), 1)
    state, progress = loop._initial_state(config, setup, ckpts, None)
    ckpts.close()
    got = jax.device_get({"params": state.params, "ema": state.ema_params,
                          "batch_stats": state.batch_stats, "opt_state": state.opt_state})
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(got["params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(got["ema"]), strict=True):
        np.testing.assert_array_equal(a, b)  # The average starts at the loaded weights.
    for a, b in zip(jax.tree.leaves(saved["batch_stats"]), jax.tree.leaves(got["batch_stats"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 0 and progress.best_epoch is None
    # A fresh optimizer: Adam's moments are zero.
    assert all(not np.any(x) for x in jax.tree.leaves(got["opt_state"])
               if np.ndim(x) > 0)


def test_warm_start_from_another_architecture_is_one_line(data_dir, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    config = tiny_config(data_dir)
    _fake_source(source, config, loop.build(config, str(tmp_path / "w0")))
    out = subprocess.run(_train_cmd(tmp_path / "warm", data_dir, init_from=str(source),
                                    **{"model.fusion": "gated"}),
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1
    error = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"init_from {source}: the architecture differs" in error[0]
    assert "model.fusion: 'concat' vs 'gated'" in error[0]


def test_ema_weights_are_validated_and_kept_as_best(data_dir, tmp_path, monkeypatch):
    """One epoch with EMA and 2 micro-batches per step: the best checkpoint (the only epoch)
    holds the weight average, not the raw weights. Output is not a terminal under pytest, so
    progress comes as log lines."""
    logged = []
    monkeypatch.setattr(train_log.logger, "info", lambda msg, *args, **_: logged.append(
        str(msg) % args if args else str(msg)))
    config = tiny_config(data_dir, num_epochs=1, ema_decay=0.5, accumulate_steps=2,
                         log_every_seconds=0.0)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    progress = [line for line in logged if line.startswith("epoch 1: step")]
    steps = summary["step"]
    assert len(progress) == 1 and re.fullmatch(  # log_every_seconds=0: the epoch's end only
        rf"epoch 1: step {steps}/{steps} \(100%\), [\d.]+ steps/s, \S+ elapsed, 0:00:00 "
        r"left loss=[\d.]+ samples_s=\d+", progress[0]), logged
    assert summary["status"] == "finished" and summary["step"] > 0
    best, best_step = checkpointing.restore_model(str(tmp_path), "best")
    latest_dir = epath.Path(tmp_path) / paths.CHECKPOINTS_DIR / str(summary["step"]) / "state"
    latest = checkpointing._restore_tree(latest_dir, keys=("params", "ema_params"))
    assert best_step == summary["step"]
    for a, b in zip(jax.tree.leaves(best["params"]), jax.tree.leaves(latest["ema_params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(latest["ema_params"]), jax.tree.leaves(latest["params"]), strict=True))
    rows = [json.loads(line) for line in open(tmp_path / paths.METRICS_FILE)]
    assert [r["epoch"] for r in rows if r["kind"] == "val"] == [1]


def test_bad_accumulation_or_ema_is_refused(data_dir):
    with pytest.raises(ConfigError, match="accumulate_steps=3: must be a whole number >= 1 that "
                                          "divides the 2 rows"):
        setup_lib.validate_config(tiny_config(data_dir, accumulate_steps=3))
    with pytest.raises(ConfigError, match=r"ema_decay=1.0: must be in \[0, 1\)"):
        setup_lib.validate_config(tiny_config(data_dir, ema_decay=1.0))


# --- progress output --------------------------------------------------------------------------

def test_progress_in_a_log_file_is_one_line_every_n_seconds(monkeypatch):
    clock = iter([100.0, 101.0, 104.0, 105.0, 111.0, 112.0, 113.0])
    monkeypatch.setattr(train_log.time, "monotonic", lambda: next(clock))
    lines = []
    bar = train_log.ProgressBar(1, 10, 2, log_every_seconds=5.0, interactive=False,
                                log=lines.append)
    for _ in range(5):
        bar.update(1, loss="0.5000")
    bar.close()
    # t=101, 104: no line; t=105 (5 s on): a line; t=111: a line; t=112: none; the epoch's
    # end (close, t=113) always gets its line.
    assert lines == [
        "epoch 2: step 5/10 (50%), 0.60 steps/s, 0:00:05 elapsed, 0:00:08 left loss=0.5000",
        "epoch 2: step 6/10 (60%), 0.36 steps/s, 0:00:11 elapsed, 0:00:11 left loss=0.5000",
        "epoch 2: step 7/10 (70%), 0.38 steps/s, 0:00:13 elapsed, 0:00:07 left loss=0.5000"]


def test_progress_on_a_terminal_is_a_bar(capsys):
    lines = []
    bar = train_log.ProgressBar(0, 4, 0, log_every_seconds=0.0, interactive=True,
                                log=lines.append)
    bar.update(4)
    bar.close()
    assert lines == [] and "4/4" in capsys.readouterr().err


def test_phase_clock_counts_nested_phases_once(monkeypatch):
    now = iter([0.0,  # the clock starts
                1.0, 3.0, 7.0, 8.0,  # startup 1..8 holding prepare 3..7
                10.0, 12.0, 13.0, 16.0,  # train twice: 2 s + 3 s
                20.0])  # record
    monkeypatch.setattr(train_log.time, "perf_counter", lambda: next(now))
    clock = train_log.PhaseClock()
    with clock.phase("startup"):
        with clock.phase("prepare"):
            pass
    for _ in range(2):
        with clock.phase("train"):
            pass
    record = clock.record()
    assert record == {"prepare": 4.0, "startup": 3.0, "train": 5.0, "other": 8.0, "total": 20.0}
    assert list(record) == ["prepare", "startup", "train", "other", "total"]  # the phases' order
    assert train_log.format_seconds(record).startswith("prepare 4.0 s, startup 3.0 s, train 5.0 s")


def test_resuming_a_run_of_per_device_keys_is_warned_in_one_line(monkeypatch):
    from configs import demo

    warnings = []
    monkeypatch.setattr(loop.log, "warning", lambda msg, *a: warnings.append(msg % a))
    config = demo.get_config()
    saved = {k: v for k, v in config.to_dict().items() if k != "rng_scheme"}  # an older run
    loop._warn_config_changes(saved, config)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "rng_scheme: 'per_device' -> 'per_example'" in warnings[0]
    warnings.clear()
    loop._warn_config_changes(config.to_dict(), config)  # a run with per-example keys
    assert not warnings
