"""The entry points' error handling: only the project's user errors become one line."""

import os
import subprocess
import sys

import pytest

from jaxmm import cli, errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_errors_are_one_line(capsys, monkeypatch):
    monkeypatch.delenv("JAXMM_TRACEBACK", raising=False)
    for error in (errors.ConfigError("config.batch_size=0 must be\n a whole number >= 1"),
                  errors.PrepareError("missing split folder /d/CVPR_2024_dataset_Test"),
                  errors.WorkdirError("workdir runs/x does not exist"),
                  errors.DivergedError("non-finite loss")):
        with pytest.raises(SystemExit) as exit_info:
            with cli.user_errors("jaxmm.train"):
                raise error
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("jaxmm.train: error: "), err


@pytest.mark.parametrize("bug", [KeyError("params"), OSError("disk full"), ValueError("shape"),
                                 FileNotFoundError("/tmp/x"), PermissionError("denied"),
                                 FloatingPointError("overflow"), TypeError("bad call")])
def test_other_exceptions_keep_their_traceback(bug):
    with pytest.raises(type(bug)):
        with cli.user_errors("jaxmm.train"):
            raise bug


def test_predict_checks_batch_size_before_anything_else(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxmm.predict", "--workdir", str(tmp_path / "no_run"),
         "--batch_size", "0", str(tmp_path / "x.png")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "--batch_size=0" in lines[0] and "Traceback" not in proc.stderr


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("module, flag", [
    ("jaxmm.train", "--config"), ("jaxmm.evaluate", "--split"), ("jaxmm.predict", "--captions"),
    ("jaxmm.export", "--out"), ("jaxmm.compare", "--out")])
def test_help_lists_the_commands_own_flags_and_exits_0(module, flag):
    proc = _run("-m", module, "--help")
    assert proc.returncode == 0, proc.stderr
    own = proc.stdout.split("\nflags:\n", 1)[1]
    assert f"  {flag}" in own and "--helpfull" in proc.stdout
    assert "--logtostderr" not in own  # absl's own flags stay under --helpfull


def test_a_mistyped_config_key_is_said_in_words():
    proc = _run("-m", "jaxmm.train", "--config", "configs/demo.py", "--config.batchsize=3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ('jaxmm.train: error: unknown config key \'batchsize\' (Did '
                                   'you mean "batch_size" instead of "batchsize"?)')


def test_only_jaxmm_speaks_at_info_level_wherever_it_is_installed():
    """The filter goes by logger name, not by file path: a library installed under a folder
    named jaxmm (a .venv inside the clone) stays quiet below warnings."""
    import logging

    keep = cli._OwnInfoOnly().filter
    record = logging.LogRecord
    orbax = record("absl", logging.INFO, "/home/u/jaxmm/.venv/lib/orbax/checkpoint.py", 1,
                   "saved", (), None)
    assert not keep(orbax)
    assert keep(record("absl", logging.WARNING, orbax.pathname, 1, "disk slow", (), None))
    assert keep(record("jaxmm", logging.INFO, "/x/loop.py", 1, "epoch 1", (), None))
