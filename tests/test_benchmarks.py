"""Smoke tests of the training-throughput benchmarks: tiny towers, a few steps, on fake CPU devices.

They check that every measurement runs and that the result has its fields, not the speed.
"""

import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
TINY = ["--image_arch", "tiny", "--text_arch", "tiny", "--image_size", "32",
        "--text_length", "8", "--batch_size", "8", "--steps", "2", "--warmup", "1"]


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)  # torch_reference imports train_throughput as a sibling
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # compiles the pmapped step (~20 s on 2 idle cores, minutes on busy ones)
def test_train_throughput_tiny(tmp_path, capsys):
    tt = _load("train_throughput")
    out = tmp_path / "r.json"
    res = tt.main(TINY + ["--work_dir", str(tmp_path / "work"), "--num_workers", "0",
                          "--prefetch_thread", "both", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [json.loads(x) for x in lines] == [res]  # one JSON line
    assert res["num_devices"] == 4 and res["global_batch"] == 8  # conftest's fake devices
    for key in ("samples_per_s", "step_time_ms", "compile_s", "e2e_samples_per_s",
                "e2e_step_time_ms", "e2e_thread_samples_per_s", "e2e_thread_step_time_ms"):
        assert res[key] > 0, key
    assert res["flops_per_sample_xla"] > 0  # XLA's cost analysis works on CPU
    assert res["flops_per_sample_analytic"] is None  # only defined for the full model
    assert res["peak_memory_bytes"] == "n/a" or res["peak_memory_bytes"] > 0
    assert res["mfu"] == "n/a"  # no known peak for a CPU
    assert res["e2e_train_examples"] >= 8


def test_train_throughput_batchnorm_values(capsys):
    tt = _load("train_throughput")
    assert tt.parse_args(["--batchnorm", "flax,fused"]).batchnorm == "flax,fused"
    with pytest.raises(SystemExit):
        tt.parse_args(["--batchnorm", "flax,cudnn"])
    assert "--batchnorm: 'cudnn' is not one of flax, fused" in capsys.readouterr().err
    assert tt.parse_args(["--stem", "conv,space_to_depth"]).stem == "conv,space_to_depth"
    with pytest.raises(SystemExit):
        tt.parse_args(["--stem", "s2d"])
    assert "--stem: 's2d' is not one of conv, space_to_depth" in capsys.readouterr().err
    assert list(tt.model_variants(tt.parse_args(["--batchnorm", "flax,fused"]))) == [
        "flax", "fused"]
    both = tt.model_variants(tt.parse_args(["--batchnorm", "flax,fused", "--stem",
                                            "conv,space_to_depth"]))
    assert both["fused+space_to_depth"] == {"batchnorm": "fused", "stem": "space_to_depth",
                                            "attention": "transformers"}
    assert list(tt.model_variants(tt.parse_args(["--attention", "transformers,fused"]))) == [
        "transformers", "fused"]
    assert list(both)[0] == "flax+conv" and len(both) == 4
    assert list(tt.model_variants(tt.parse_args(["--stem", "conv,space_to_depth"]))) == [
        "conv", "space_to_depth"]
    table = tt.format_table({"variant_compare": {"fused": {
        "step_time_ms_median": 1.5, "step_time_ms": [1.5], "first_step_metrics": {
            "weighted_ce": 2.0}}}})
    assert table.split() == ["fused.step_time_ms_median", "1.5", "fused.first_step_weighted_ce",
                             "2.0"]


def test_train_throughput_analytic_flops_and_peaks():
    tt = _load("train_throughput")
    config = tt.make_config(tt.parse_args([]))
    assert tt.analytic_flops_per_sample(config) == pytest.approx(32.8e9, rel=0.01)

    def gpu(kind):
        return type("Device", (), {"platform": "gpu", "device_kind": kind})()

    # NVIDIA's datasheets give the peaks with sparsity; the dense peak is half of it.
    # H100 SXM and H200: BF16 1,979, TF32 989 (989.4 / 494.7 dense); H100 PCIe: 1,513 / 756.
    sxm, pcie = gpu("NVIDIA H100 80GB HBM3"), gpu("NVIDIA H100 PCIe")
    assert tt.peak_tflops(sxm, "bfloat16", 0)[0] == pytest.approx(1978.8 / 2)
    assert tt.peak_tflops(sxm, "float32", 0)[0] == pytest.approx(989.4 / 2)
    assert tt.peak_tflops(gpu("NVIDIA H200"), "bfloat16", 0)[0] == pytest.approx(1978.8 / 2)
    # The PCIe card is not taken for the SXM one although its name also holds "H100".
    assert tt.peak_tflops(pcie, "bfloat16", 0)[0] == pytest.approx(1512 / 2)
    assert tt.peak_tflops(pcie, "float32", 0)[0] == pytest.approx(756 / 2)
    assert tt.peak_tflops(sxm, "float32", 67.0) == (67.0, "--peak_tflops")
    assert tt.peak_tflops(gpu("NVIDIA GeForce RTX 4090"), "bfloat16", 0)[0] is None


def test_torch_reference_tiny(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ref = _load("torch_reference")
    # jaxmm's own measurement is covered above; a fixed result keeps this test to torch's time.
    fake = {"samples_per_s": 100.0, "step_time_ms": 80.0, "compile_s": 1.0, "dtype": "float32",
            "num_devices": 4, "device_kind": "cpu", "peak_memory_bytes": "n/a", "mfu": "n/a"}
    monkeypatch.setattr(ref, "run_jaxmm", lambda args: fake)
    out = tmp_path / "t.json"
    res = ref.main(TINY + ["--dtype", "float32", "--no_compile", "--compare", "--device", "cpu",
                           "--out", str(out)])
    assert json.loads(out.read_text()) == res
    for mode in ("original", "tuned"):
        assert res[mode]["samples_per_s"] > 0 and res[mode]["step_time_ms"] > 0
    assert res["original"]["memory_format"] == "NCHW"
    assert res["tuned"]["memory_format"] == "channels_last"
    assert res["tuned"]["torch_compile"] == "off"
    assert res["ratios"]["jaxmm_vs_original"] == pytest.approx(
        100.0 / res["original"]["samples_per_s"], rel=1e-2)
    assert set(res["ratios"]) == {"jaxmm_vs_original", "jaxmm_vs_tuned"}


def test_torch_model_matches_jaxmm_parameter_count():
    """Same architecture: the PyTorch reference has as many weights as jaxmm's model."""
    pytest.importorskip("torch")
    import jax

    ref = _load("torch_reference")
    args = ref.parse_args(TINY)
    tt = ref.tt
    config = tt.make_config(ref.jax_args(args))
    config.image_size, config.max_text_length = 32, 8
    model = tt.setup_lib.make_model(config, len(tt.TRAIN_COUNTS), tt.vocab_size(config),
                                   axis_name=None)
    shapes = tt.setup_lib.abstract_variables(config, model)  # shapes only: nothing is compiled
    jax_count = sum(x.size for x in jax.tree.leaves(shapes["params"]))
    torch_count = sum(p.numel() for p in ref.make_model(args, "cpu").parameters())
    # BatchNorm running statistics are buffers in torch and batch_stats in jaxmm: not counted.
    assert torch_count == jax_count
    # The reference keeps DistilBERT's attention dropout unless told to mirror attention="fused".
    assert ref.make_model(args, "cpu").text.config.attention_dropout == 0.1
    mirrored = ref.parse_args([*TINY, "--attention_dropout", "0"])
    assert ref.make_model(mirrored, "cpu").text.config.attention_dropout == 0.0


def test_gpu_suite_script_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_suite.sh")], check=True)


def test_input_pipeline_measures_startup_and_steady_state():
    from ml_collections import ConfigDict

    from jaxmm.data import pipeline, prepared
    from tests.support import demo_dataset

    ip = _load("input_pipeline")
    assert ip.worker_counts("0,2,auto,2") == [0, 2, max(1, os.cpu_count() - 2)]
    with pytest.raises(ValueError, match="negative"):
        ip.worker_counts("-1")
    _, ds_dir = demo_dataset()
    config = ConfigDict(dict(tokenizer="", seed=0, image_size=24, max_text_length=8,
                             color_jitter=0.0, num_workers=0))
    tok = prepared.get_tokenizer(config, ds_dir)
    source = pipeline.load_splits(ds_dir)["train"]
    args = ip.parse_args(["--grain_workers", "0", "--repeats", "2", "--steady_batches", "3",
                          "--batch_size", "4"])
    table = ip.compare_workers(config, source, tok, args)
    row = table[0]
    assert row["startup_s"] > 0 and row["samples_per_s"] > 0
    assert len(row["samples_per_s_runs"]) == 2 and row["vs_in_process"] == 1.0
    if "cpu_ms_per_sample_main" in row:  # psutil installed
        assert row["cpu_ms_per_sample_main"] > 0 and row["cpu_ms_per_sample_workers"] == 0


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def test_gpu_suite_summary_checks_goals_and_demo_runs(tmp_path):
    rep = _load("gpu_suite_report")
    out, work = tmp_path / "out", tmp_path / "work"
    for batch, e2e in ((256, 5200.0), (512, 5900.0)):
        _write(str(out / f"jax_bf16_b{batch}.json"),
               {"global_batch": batch, "samples_per_s": 2 * e2e, "e2e_samples_per_s": e2e})
    _write(str(out / "torch_bf16_b256.json"),
           {"original": {"samples_per_s": 900.0}, "tuned": {"samples_per_s": 9000.0},
            "ratios": {"jaxmm_vs_original": 11.0, "jaxmm_vs_tuned": 1.1}})
    _write(str(out / "pipeline.json"), {"grain": {"0": {"samples_per_s": 900.0},
                                                  "14": {"samples_per_s": 6100.0}}})
    demo = work / "demo_bf16"
    _write(str(demo / "train_summary.json"), {"status": "finished", "compile_seconds": 9.0})
    _write(str(demo / "metrics.jsonl"), '{"loss": 1.2}\n{"loss": NaN}\n')
    _write(str(demo / "eval" / "best" / "test" / "metrics.json"), {"accuracy": 0.81})
    _write(str(demo / "jax_cache" / "a"), "")
    _write(str(demo / "jax_cache" / "b"), "")
    _write(str(out / "demo_cache_before.json"), ["a"])
    s = rep.summary(str(out), str(work), 256, 0.79)
    assert s["largest_batch_run"] == 512
    # Ratios use the standalone jaxmm step (2 x 5200 samples/s); --compare's are kept apart.
    assert s["ratios"] == {"jaxmm_vs_original": 11.556, "jaxmm_vs_tuned": 1.156}
    assert s["ratios_jaxmm_in_torch_process"]["jaxmm_vs_tuned"] == 1.1
    assert s["met"] == {"demos": False, "compile_cache": False, "pipeline_alone": True,
                        "e2e": True, "vs_original": True, "vs_tuned": False}
    assert s["demo"]["demo_bf16"]["losses_finite"] is False  # the NaN is caught
    assert s["demo"]["demo_bf16"]["test_accuracy_ok"] is True
    assert s["demo"]["demo_fp32"] is None  # not run
    assert s["demo"]["compile_cache"] == {"entries_before_second_start": 1,
                                          "entries_added_by_second_start": 1}


def test_largest_batch_is_predicted_from_the_measured_peak(monkeypatch):
    rep = _load("gpu_suite_report")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    gib = 2**30
    # 1 GiB of state, 9 GiB peak at batch 256 -> 7.67 GiB / 256 per sample; the limit was 75 %
    # of 100 GiB, so 90 % is 90 GiB, less 8 % -> (82.8 - 1.33) / 0.02995 GiB = 2720 -> 2688.
    res = {"global_batch": 256, "peak_memory_bytes": 9 * gib, "memory_limit_bytes": 75 * gib,
           "state_bytes": gib}
    assert rep.largest_batches(res, 0.9) == [2688, 1984]  # 3/4, down to 64s
    assert rep.largest_batches(dict(res, peak_memory_bytes="n/a"), 0.9) == []  # CPUs
    assert rep.largest_batches(dict(res, peak_memory_bytes=70 * gib), 0.9) == []  # no larger


def test_trace_summary_finds_idle_gaps_and_kernel_kinds(tmp_path):
    ts = _load("trace_summary")
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name",
             "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    kernels = [("sm90_xmma_fprop_implicit_gemm_bf16", 0, 400), ("loop_add_fusion_3", 400, 100),
               ("nvjet_sm90_tst_gemm", 450, 100),  # overlaps: busy counts it once
               ("MemcpyH2D", 1550, 50), ("input_reduce_fusion_9", 1600, 400)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "ts": t, "dur": d, "name": n}
                     for n, t, d in kernels]
    events += [{"ph": "X", "pid": 1, "tid": 8, "ts": 0, "dur": 2000, "name": "module"},
               {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 4000, "name": "host"}]
    path = tmp_path / "plugins" / "profile" / "x" / "perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    res = ts.main([str(tmp_path), "--steps", "2"])
    gpu = res["devices"]["/device:GPU:0"]
    assert res["window_ms"] == 4.0 and res["window_ms_per_step"] == 2.0
    assert gpu["busy_ms"] == 1.0  # 0-550 and 1550-2000; the "XLA Ops" line is not a stream
    assert gpu["idle_gaps_over_0.1ms"] == 1 and gpu["longest_gap_ms"] == 1.0
    kinds = gpu["time_by_kind"]
    assert kinds["convolution"]["ms"] == 0.4 and kinds["matmul"]["ms"] == 0.1
    assert kinds["copy"]["ms"] == 0.05
    assert kinds["fused XLA (elementwise, reductions, norms)"]["ms"] == 0.5
    assert gpu["top_kernels"][0]["name"].startswith("sm90_xmma_fprop")
    assert "time_by_part" not in gpu  # only with --hlo

    hlo = tmp_path / "step_hlo.txt.gz"
    with gzip.open(hlo, "wt") as f:  # as XLA prints it: '.' in the name, '_' in the kernel's
        f.write('  %loop_add_fusion.3 = f32[8]{0} fusion(%p), kind=kLoop, calls=%fc.3, metadata={'
                'op_name="jit(_fun)/transpose(jvp(Model))/image/layer1_0/bn2/add" '
                'stack_frame_id=5}\n'
                '  ROOT %input_reduce_fusion.9 = f32[] fusion(%g), kind=kInput, calls=%fc.9, '
                'metadata={op_name="jit(_fun)/reduce_sum" stack_frame_id=9}\n')
    gpu = ts.main([str(tmp_path), "--hlo", str(hlo)])["devices"]["/device:GPU:0"]
    assert gpu["time_by_part"] == {
        "library kernel": {"ms": 0.55, "share": 0.5238},  # fprop, gemm, memcpy
        "outside the model (loss, gradient norm, optimizer)": {"ms": 0.4, "share": 0.381},
        "backward image": {"ms": 0.1, "share": 0.0952}}
    assert gpu["time_by_layer_kind"]["bn"]["ms"] == 0.1


def test_trace_summary_step_structure_and_update_tail():
    ts = _load("trace_summary")

    def kernel(name, dur, grid="64,1,1"):
        return {"name": name, "dur": dur, "args": {"kernel_details": f"grid:{grid} block:128"}}

    # One step: a convolution, a matrix product, then the update: two tiny single-block kernels
    # and one larger one.
    step = [kernel("sm90_xmma_wgrad_implicit_gemm", 300), kernel("nvjet_sm90_tst", 100),
            kernel("loop_add_fusion_1", 5, "1,1,1"), kernel("loop_add_fusion_2", 4, "1,1,1"),
            kernel("loop_multiply_fusion_3", 50)]
    events = [dict(e, ts=i * 1000 + j * 10) for i in range(3) for j, e in enumerate(step)]
    got = ts.step_structure(events, 3)
    assert got == {"kernels_per_step": 5, "kernels_under_20us_per_step": 2.0,
                   "kernels_under_20us_ms_per_step": 0.009,
                   "single_block_kernels_per_step": 2.0, "update_tail_kernels_per_step": 3.0,
                   "update_tail_busy_ms_per_step": 0.059}
    assert ts.step_structure(events[:-1], 3) is None  # not the same program every step


def test_gpu_suite_refuses_jax_and_cuda_wheels(tmp_path):
    """The suite installs only what the GPU image lacks: never jax, jaxlib, CUDA or torch."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("jaxlib-0.10.2-cp312-none-any.whl", "nvidia_cudnn_cu12-9-py3-none-any.whl",
                 "torch-2.11-cp312-none-any.whl", "grain-0.2.18-py3-none-any.whl"):
        (wheels / name).write_text("")
    fake_py = tmp_path / "python3"  # records the pip command line instead of installing
    fake_py.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\nexit 1\n")
    fake_py.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake_py), SITE=str(tmp_path / "site"))
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_suite.sh"), str(wheels),
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2  # the fake pip fails: the suite stops at once
    calls = (tmp_path / "calls").read_text()
    assert "--no-index --no-deps" in calls and f"--target {tmp_path}/site" in calls
    assert "grain-0.2.18" in calls
    assert not any(w in calls for w in ("jaxlib-", "nvidia_", "torch-"))
    assert "refusing jaxlib-0.10.2" in proc.stderr


def test_comm_count_demo(tmp_path):
    """The all-reduces of the demo step, counted from its HLO on the 4 fake devices: per-device
    BatchNorm drops one forward and one backward all-reduce per layer; the gradient all-reduces
    carry 4 bytes per parameter."""
    cc = _load("comm_count")
    out = tmp_path / "comm.json"
    res = cc.main(["--config", "demo", "--dtype", "float32", "--image_size", "32",
                   "--text_length", "8", "--batchnorm_sync", "global", "device", "group:2",
                   "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    glob, dev = res["settings"]["global"], res["settings"]["device"]
    sizes = glob["sizes"]
    assert res["devices"] == 4 and sizes["batchnorm_layers"] == 17  # tiny ResNet
    assert glob["all_reduces"] - dev["all_reduces"] == 2 * sizes["batchnorm_layers"]
    assert glob["by_category"]["batchnorm_forward"]["all_reduces"] == sizes["batchnorm_layers"]
    assert not any(c.startswith("batchnorm") for c in dev["by_category"])
    for r in (glob, dev):
        assert r["by_category"]["gradients"]["bytes"] == 4 * sizes["params"]
        assert r["by_category"]["gradients"]["tensors"] == sizes["param_arrays"]
        assert r["by_category"]["batch_stats"]["bytes"] == 4 * sizes["batch_stats"]
        assert r["gradient_bytes_bf16"] == 2 * sizes["params"]
        assert r["replica_groups"] == ["{{0,1,2,3}}"]
    group = res["settings"]["group:2"]  # as many all-reduces as "global", within pairs
    assert group["all_reduces"] == glob["all_reduces"]
    assert group["replica_groups"] == ["{{0,1,2,3}}", "{{0,1},{2,3}}"]
    assert "| global | **total** |" in cc.table(res)


def test_unmapped_state_reads_the_compiled_programs_and_the_transfers():
    """benchmarks/unmapped_state.py on a tiny donated step, with and without the device axis:
    every entry parameter, the donated ones and the all-reduce are found, and the transfer
    guard tells the returned state (no copy) from host arrays (copied)."""
    import jax
    import numpy as np

    us = _load("unmapped_state")
    host = {"w": np.ones((8, 4), np.float32), "n": np.zeros((), np.int32)}
    batches = [np.full((8, 4), i, np.float32) for i in range(2)]
    key = np.ones(2, np.float32)

    def fn(state, batch, key):
        g = jax.lax.psum(batch.sum(0), "batch") * key[0]
        return {"w": state["w"] - g, "n": state["n"] + 1}, g.sum()

    results = {"hlo": {}, "transfers": {}}
    for variant in us.VARIANTS:
        hlo = results["hlo"][variant] = us.compiled_step(variant, host, fn, batches[0], key)
        assert hlo["entry_parameters"] == 4 and hlo["donated_parameters"] == 2, hlo
        assert hlo["instructions"].get("all-reduce", 0) >= 1, hlo
        moved = results["transfers"][variant] = us.transfers(variant, host, fn, batches, key)
        assert moved["returned_state"] == "no transfer", moved
        assert moved["host_state"].startswith("Disallowed host-to-device transfer"), moved
        assert moved["copies_equal_across_devices"]
    assert "| donated_parameters | 2 | 2 |" in us.markdown(results)


def test_comm_count_refuses_a_step_it_cannot_account_for():
    cc = _load("comm_count")
    hlo = "\n".join(f'  x.{i} = f32[{n}]{{0}} all-reduce(y), replica_groups={{{{0,1}}}}, '
                    f'metadata={{op_name="psum"}}' for i, n in enumerate([1, 10, 5, 1]))
    ops = cc.all_reduces(hlo)
    assert [op["bytes"] for op in ops] == [4, 40, 20, 4]
    sizes = {"params": 15, "param_arrays": 2, "batchnorm_layers": 0}
    assert [op["category"] for op in cc.classify(ops, sizes)] == [
        "loss", "gradients", "gradients", "loss"]
    with pytest.raises(ValueError, match="not the 16 parameters"):
        cc.classify(cc.all_reduces(hlo), {**sizes, "params": 16})


def test_scaling_model_orders_the_batchnorm_settings():
    sm = _load("scaling_model")

    def setting(bn_layers):
        cats = {"gradients": {"bytes": 4 * 90_000_000, "all_reduces": 270}}
        if bn_layers:
            cats["batchnorm_forward"] = cats["batchnorm_backward"] = {"all_reduces": bn_layers}
        return {"by_category": cats, "gradient_bytes_bf16": 2 * 90_000_000}

    rows = sm.predict({"settings": {"global": setting(53), "device": setting(0)}}, 45.8, 256)
    eff = {(r["batchnorm_sync"], r["gradients"], r["gpus"]): r["efficiency"] for r in rows}
    assert eff[("global", "float32", 1)] == [1.0, 1.0]
    for g in (8, 64):
        for exposed, overlapped in eff.values():
            assert exposed <= overlapped
        assert eff[("global", "float32", g)][0] <= eff[("group:8", "float32", g)][0] \
            <= eff[("device", "float32", g)][0] < eff[("device", "bfloat16", g)][0]
    # One node: a group of 8 is the global batch; more nodes only cost "global" its latency.
    assert eff[("global", "float32", 8)] == eff[("group:8", "float32", 8)]
    assert eff[("global", "float32", 64)][0] < eff[("group:8", "float32", 64)][0]
    assert "| device | float32 | 64 |" in sm.table(rows)


@pytest.mark.slow  # trains and evaluates the tiny model once (~35 s on 2 idle cores)
def test_time_to_result_reports_every_phase_of_a_cold_run(tmp_path, capsys):
    ttr = _load("time_to_result")
    res = ttr.main(["--work", str(tmp_path), "--dry_run", "--runs", "cold", "--per_class", "8"])
    assert json.loads((tmp_path / "time_to_result.json").read_text()) == res
    assert res["raw"]["files"] > 0 and res["raw"]["generated_s"] is not None
    run = res["runs"]["cold"]
    assert run["train_exit"] == 0 and run["evaluate_exit"] == 0, run
    assert run["train_status"] == "finished" and run["epochs_completed"] == 1
    phases = run["phases_s"]
    assert list(phases) == ["process_start", "prepare", "startup", "compile", "train",
                            "validation", "checkpoints", "calibration", "other",
                            "test_evaluation"]
    assert all(v >= 0 for v in phases.values()) and phases["prepare"] > 0  # prepared cold
    assert sum(phases.values()) == pytest.approx(run["total_s"], abs=0.1)
    assert 0 <= run["test"]["accuracy"] <= 1
    assert run["goal_met"] == (run["total_s"] <= 300)
    assert "test accuracy" in capsys.readouterr().out
    # A warm run needs what the cold one leaves: asked alone in a new folder, it says so.
    alone = ttr.main(["--work", str(tmp_path / "other"), "--dry_run", "--runs", "warm",
                      "--per_class", "8"])
    assert "needs the cold run" in alone["runs"]["warm"]["error"]


def test_step_ratio_rotates_the_order_and_reports_the_spread(monkeypatch, tmp_path):
    sr = _load("step_ratio")
    args = sr.parse_args(["--reps", "3", "--variant", "flax=", "--variant",
                          "fused=--batchnorm fused", "--work", str(tmp_path)])
    cmds = sr.commands(args)
    assert list(cmds) == ["flax", "fused", "torch"]
    assert cmds["fused"][-2:] == ["--batchnorm", "fused"] and "--skip_e2e" in cmds["flax"]
    assert cmds["torch"][cmds["torch"].index("--modes") + 1] == "tuned"
    rates = {"flax": [600, 500, 700], "fused": [650, 640, 660], "torch": [500, 500, 1000]}
    calls = []

    def fake(name, cmd, rep, args, env):
        calls.append(name)
        return {"samples_per_s": rates[name][rep], "step_time_ms": 1.0, "device": "test"}

    monkeypatch.setattr(sr, "run_one", fake)
    res = sr.main(["--reps", "3", "--variant", "flax=", "--variant", "fused=--batchnorm fused",
                   "--work", str(tmp_path)])
    assert calls == ["flax", "fused", "torch", "fused", "torch", "flax", "torch", "flax", "fused"]
    s = res["summary"]
    assert s["torch"] == {"median": 500, "min": 500, "max": 1000, "n": 3}
    assert s["flax_vs_torch"]["ratio_of_medians"] == 1.2 and s["flax_vs_torch"]["goal_met"]
    assert s["flax_vs_torch"]["pair_ratios"] == {"median": 1.0, "min": 0.7, "max": 1.2, "n": 3}
    assert not s["flax_vs_torch"]["goal_met_in_every_pair"]
    assert s["fused_vs_torch"]["ratio_of_medians"] == 1.3
    assert json.loads((tmp_path / "step_ratio.json").read_text())["summary"] == s
    with pytest.raises(SystemExit):
        sr.parse_args(["--variant", "torch=--x"])
