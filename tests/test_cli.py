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
