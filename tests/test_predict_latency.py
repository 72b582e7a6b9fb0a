"""Smoke test of the prediction-latency benchmark: tiny towers, a few photos, every field there.

It checks that each measurement runs and reports, not the speed.
"""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "predict_latency", os.path.join(ROOT, "benchmarks", "predict_latency.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # six fresh processes that import jax (~1 min on 2 idle cores)
def test_predict_latency_tiny(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "r.json"
    res = bench.main(["--image_arch", "tiny", "--text_arch", "tiny", "--image_size", "32",
                      "--stored_size", "40", "--text_length", "8", "--photos", "5",
                      "--batch_size", "4", "--work_dir", str(tmp_path / "work"),
                      "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()
            if x.startswith("{")] == [res]
    for kind in ("workdir", "bundle"):
        r = res[kind]
        for run in ("cold", "warm"):
            assert 0 < r[run]["first_s"] <= r[run]["total_s"], (kind, run)
            assert r[run]["peak_rss_mb"] > 50
            assert any(f": {c}" in r[run]["line"] for c in ("Black", "Blue", "Green", "TTR"))
        assert r["throughput"]["photos"] == 5 and r["throughput"]["photos_per_s"] > 0
    assert res["bundle"]["cache_mb"] > 0  # the bundle path fills its compilation cache
    assert set(res["goals"]) == {"bundle_warm_first_s_le_4",
                                 "bundle_warm_le_third_of_workdir_cold",
                                 "bundle_warm_le_third_of_workdir_warm"}
