#!/usr/bin/env bash
# Training-throughput suite for one GPU machine (written for one H100): jaxmm in bf16 and fp32
# (train step alone + end to end through grain) and the PyTorch reference (original + tuned),
# every result as JSON in OUTDIR plus summary.json with the goals checked.
#
#   benchmarks/gpu_suite.sh WHEELDIR OUTDIR          (run from anywhere; OUTDIR default $OUT)
#
# WHEELDIR holds wheels for whatever the machine lacks (it may have no internet). Nothing is
# installed when the interpreter already imports jax with a GPU, jaxmm's dependencies and torch.
# Otherwise a venv (--system-site-packages, so preinstalled packages are reused) is made in
# $VENV and filled with `pip install --no-index --find-links WHEELDIR`; pass "-" as WHEELDIR to
# install from the package index instead (needs internet).
# Fill WHEELDIR on a machine with internet, the same CPU architecture (x86_64), glibc and Python
# version (3.11) as the GPU machine, from the repository root:
#   python3.11 -m pip download -d WHEELDIR -r requirements.txt "jax[cuda12]==0.10.2" torch==2.13.0
#   python3.11 -m pip wheel -w WHEELDIR --no-deps WHEELDIR/*.tar.gz   # only if sdists came down
# (torch from PyPI is the CUDA build on Linux x86_64; drop torch to skip the reference runs.)
# Carry WHEELDIR to the GPU machine (e.g. an untracked, not ignored wheels/ folder in the tree).
#
# Environment knobs: PYTHON (default python3), VENV (default /tmp/jaxmm_suite_venv), BATCH
# (global batch, default 256), STEPS (timed steps, default 30), WORKERS (grain workers, default
# nproc-2), WORK (synthetic dataset cache, default /tmp/jaxmm_suite_work), RUN_TIMEOUT (seconds
# per benchmark, default 420), BENCH_ARGS (extra arguments for every benchmark, e.g. the tiny
# sizes), TORCH_ARGS (extra arguments for torch_reference only, e.g. --no_compile), ALLOW_CPU=1 (run without a GPU: plumbing check only, numbers are CPU numbers).
set -uo pipefail

log() { echo "[gpu_suite] $*" >&2; }
die() { log "ERROR: $*"; exit 2; }

[ "$#" -ge 1 ] || die "usage: benchmarks/gpu_suite.sh WHEELDIR|- [OUTDIR]"
wheels="$1"
out="${2:-${OUT:-}}"
[ -n "$out" ] || die "no OUTDIR given and \$OUT is not set"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out/logs"
out="$(cd "$out" && pwd)"
cd "$root" || die "cannot enter $root"

py="${PYTHON:-python3}"
venv="${VENV:-/tmp/jaxmm_suite_venv}"
batch="${BATCH:-256}"
steps="${STEPS:-30}"
nproc_="$(nproc)"
workers="${WORKERS:-$(( nproc_ > 3 ? nproc_ - 2 : 1 ))}"
work="${WORK:-/tmp/jaxmm_suite_work}"
run_timeout="${RUN_TIMEOUT:-420}"
read -r -a extra <<<"${BENCH_ARGS:-}"
read -r -a torch_extra <<<"${TORCH_ARGS:-}"
jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' requirements.txt)"
torch_version="$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' requirements-test.txt)"

has_jax() {  # jaxmm's dependencies import, and JAX sees a GPU (or ALLOW_CPU=1)
  "$1" - <<'PY' 2>/dev/null
import os, sys
import flax, grain, optax, tensorflow_datasets, transformers, ml_collections  # noqa
import jax
sys.exit(0 if jax.default_backend() == "gpu" or os.environ.get("ALLOW_CPU") == "1" else 1)
PY
}
has_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() or __import__("os").environ.get("ALLOW_CPU") == "1" else 1)' 2>/dev/null; }

pip_install() {  # pip_install PYTHON REQUIREMENT...
  local p="$1"; shift
  if [ "$wheels" = "-" ]; then
    "$p" -m pip install -q "$@"
  else
    [ -d "$wheels" ] || die "wheel folder $wheels does not exist"
    "$p" -m pip install -q --no-index --find-links "$wheels" "$@"
  fi
}

setup_python() {  # prints the interpreter to use, installing what is missing
  if has_jax "$py" && has_torch "$py"; then echo "$py"; return; fi
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv (reusing the system's packages)"
    "$py" -m venv --system-site-packages "$venv" >&2 || die "python -m venv failed"
  fi
  local v="$venv/bin/python"
  if ! has_jax "$v"; then
    log "installing requirements.txt and jax[cuda12]==$jax_version"
    pip_install "$v" -r requirements.txt "jax[cuda12]==$jax_version" >&2 \
      || die "installing jax failed (see the pip output above)"
  fi
  if ! has_torch "$v"; then
    log "installing torch==$torch_version (optional: the reference runs are skipped without it)"
    pip_install "$v" "torch==$torch_version" >&2 || log "torch not installed"
  fi
  has_jax "$v" || die "jax still misses a GPU or a dependency after installing"
  echo "$v"
}

# run NAME COMMAND...: one benchmark, its log in logs/NAME.log; a failure does not stop the suite.
run() {
  local name="$1"; shift
  log "$name: $*"
  local start=$SECONDS
  timeout "$run_timeout" "$@" >"$out/logs/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc after $(( SECONDS - start )) s"
  [ "$rc" = 0 ] || tail -n 20 "$out/logs/$name.log" >&2
}

python="$(setup_python)" || exit 2
log "python: $python"
{ nvidia-smi 2>&1 || echo "nvidia-smi not available"; } >"$out/nvidia-smi.txt"
"$python" -m pip freeze >"$out/pip_freeze.txt" 2>/dev/null
"$python" - >"$out/machine.json" <<PY
import json, os, platform
import jax
print(json.dumps({"devices": [d.device_kind for d in jax.devices()], "cpus": os.cpu_count(),
                  "python": platform.python_version(), "jax": jax.__version__,
                  "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": $batch,
                  "steps": $steps, "grain_workers": $workers}))
PY

common=(--batch_size "$batch" --steps "$steps" "${extra[@]}")
# Most important first, in case the machine is taken back before the end.
run jax_bfloat16 "$python" benchmarks/train_throughput.py --dtype bfloat16 "${common[@]}" \
  --work_dir "$work" --num_workers "$workers" --out "$out/jax_bfloat16.json"
if has_torch "$python"; then
  run torch_bfloat16 "$python" benchmarks/torch_reference.py --dtype bfloat16 --compare \
    "${common[@]}" "${torch_extra[@]}" --out "$out/torch_bfloat16.json"
fi
run jax_float32 "$python" benchmarks/train_throughput.py --dtype float32 "${common[@]}" \
  --work_dir "$work" --num_workers "$workers" --out "$out/jax_float32.json"
if has_torch "$python"; then
  run torch_float32 "$python" benchmarks/torch_reference.py --dtype float32 \
    "${common[@]}" "${torch_extra[@]}" --out "$out/torch_float32.json"
fi

"$python" - "$out" <<'PY' | tee "$out/summary.json"
import json, os, sys

out = sys.argv[1]
def load(name):
    path = os.path.join(out, name + ".json")
    return json.load(open(path)) if os.path.exists(path) else None

jb, jf, tb, tf = (load(n) for n in ("jax_bfloat16", "jax_float32", "torch_bfloat16",
                                      "torch_float32"))
s = {"goals": {"e2e_samples_per_s": 5000, "vs_original": 3.0, "vs_tuned": 1.2}}
for tag, j, t in (("bfloat16", jb, tb), ("float32", jf, tf)):
    r = {}
    if j:
        r.update({k: j.get(k) for k in ("samples_per_s", "e2e_samples_per_s", "step_time_ms",
                                         "compile_s", "peak_memory_bytes", "mfu", "mfu_analytic")})
    if j and t:
        for mode in ("original", "tuned"):
            if mode in t:
                r[f"torch_{mode}_samples_per_s"] = t[mode]["samples_per_s"]
                # Prefer the ratio measured in one process (torch_reference --compare).
                r[f"jaxmm_vs_{mode}"] = t.get("ratios", {}).get(f"jaxmm_vs_{mode}") or round(
                    j["samples_per_s"] / t[mode]["samples_per_s"], 3)
                r[f"torch_{mode}_compile"] = t[mode]["torch_compile"]
    s[tag] = r
b = s["bfloat16"]
s["met"] = {"e2e": b.get("e2e_samples_per_s", 0) >= 5000,
            "vs_original": b.get("jaxmm_vs_original", 0) >= 3.0,
            "vs_tuned": b.get("jaxmm_vs_tuned", 0) >= 1.2}
print(json.dumps(s, indent=1))
PY
log "results in $out"
