"""README's demo numbers hold: the seed-0 quick start (configs/demo.py, one CPU device, JAX's
default threefry random numbers) is trained and evaluated again, and README's seed-0 sentence and
calibration paragraph must agree with it within the tolerance of benchmarks/demo_numbers.py.
About two minutes on 2 cores."""

import importlib.util
import os

import pytest

from tests.support import REPO


def _demo_numbers():
    path = os.path.join(REPO, "benchmarks", "demo_numbers.py")
    spec = importlib.util.spec_from_file_location("demo_numbers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_update_writes_what_the_check_reads():
    dn = _demo_numbers()
    quoted = dn.readme_numbers(_readme())
    measured = {k: v + (1 if k == "val_examples" else 0.2) for k, v in quoted.items()}
    updated = dn.readme_numbers(dn.update(_readme(), measured))
    assert updated == {k: float(dn.fmt(k, v)) for k, v in measured.items()}
    assert dn.differences(quoted, measured) != [] and dn.differences(updated, measured) == []


@pytest.mark.slow
def test_readme_demo_numbers_hold_for_a_fresh_seed_0_run(tmp_path):
    dn = _demo_numbers()
    quoted = dn.readme_numbers(_readme())
    measured = dn.run_seed(0, str(tmp_path))
    assert dn.differences(quoted, measured) == [], measured
    # README says the demo's temperature is not applied, and why.
    assert measured["temperature_applied"] is False, measured
    assert "fewer than 50" in measured["temperature_reason"], measured
