#!/usr/bin/env bash
# One GPU machine, one script, under 8 minutes with the install: is jaxmm correct and fast there?
#
#   benchmarks/gpu_suite.sh WHEELDIR [OUTDIR]          (from anywhere; OUTDIR default $OUT)
#   DRY_RUN=1 benchmarks/gpu_suite.sh - OUTDIR         (tiny sizes on a CPU: the plumbing only)
#
# The machine's image brings Python 3.12 with JAX (CUDA), flax, optax, orbax and torch; WHEELDIR
# holds the few Python 3.12 wheels it lacks (grain, tensorflow-datasets, transformers 4.x,
# ml-collections, tensorboardX and their small dependencies; see docs/benchmarks.md for the
# list). They go into a private folder with `pip install --no-index --no-deps --target SITE` and
# PYTHONPATH; jax, jaxlib, CUDA and torch wheels are refused, so the image's GPU builds stay in
# use. "-" installs nothing. Every version is printed first; then, in two phases:
#   1. untimed and concurrent (each JAX process may take $SHARE of the GPU's memory): the demo
#      config trained in bf16 and evaluated on test, then started again in a fresh workdir that
#      must find the first run's compilation cache; the demo in fp32, evaluated on test; and the
#      one-off work of phase 2: the full-size synthetic dataset ($PER_CLASS Train images per
#      class), jaxmm's full-model step compiled into phase 2's compilation cache (the early
#      check: the suite stops when it fails; its optimized HLO goes to OUTDIR/step_hlo.txt.gz,
#      which names the kernels of the trace) and the tuned PyTorch mode compiled into
#      inductor's cache.
#   2. speed, one step at a time: the full model (ResNet-50 at 224 px + DistilBERT at length 32,
#      random init), bf16, global batch $BATCH: train step alone and end to end from the
#      prepared dataset through the grain pipeline ($WORKERS workers; batches placed on the GPU
#      by the training loop's prefetch, then by the same in a background thread), compile time,
#      peak memory, MFU, and a jax.profiler trace of 5 steady-state end-to-end steps
#      (OUTDIR/trace, summed up by trace_summary.py); the PyTorch reference, original-style
#      (fp32, eager) and tuned (bf16 autocast, channels_last, torch.compile); the largest batch
#      that fits when JAX may take $FRACTION of the memory (predicted from the first
#      measurement's peak, then 3/4 of it; $TRY overrides), step alone and end to end; the
#      input pipeline alone, in-process and with $WORKERS workers.
# Each step runs under `timeout`, and no step starts past the budget ($BUDGET s in all), so a
# hang or a slow step costs that step, never the results already written. OUTDIR gets one JSON
# per step, logs/, versions.json, nvidia-smi.txt, steps.tsv and summary.json (goals checked).
#
# Knobs (environment): PYTHON (python3), SITE (wheel install folder, default /tmp/jaxmm_site),
# BUDGET (seconds, 450), BATCH (256), TRY (batches tried for "largest that fits"; default
# predicted), FRACTION (0.9), SHARE (0.2), STEPS (timed steps, 30), PER_CLASS (1024), WORKERS
# (grain workers, nproc - 2), WORK (datasets and compile caches, /tmp/jaxmm_suite_work),
# CPU_TEST_ACCURACY (the README's seed-0 CPU demo test accuracy, 0.793), DRY_RUN=1 (tiny towers
# and sizes, JAX on the CPU allowed; numbers mean nothing), LIMIT_SCALE (multiplies every step's
# time limit; 1, or 5 with DRY_RUN for slow shared CPUs), ARCHIVE (also write OUTDIR as this
# .tgz at the end).
set -uo pipefail

log() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 2; }

[ "$#" -ge 1 ] || die "usage: benchmarks/gpu_suite.sh WHEELDIR|- [OUTDIR]"
wheels="$1"
out="${2:-${OUT:-}}"
[ -n "$out" ] || die "no OUTDIR given and \$OUT is not set"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out/logs" || die "cannot create $out"
out="$(cd "$out" && pwd)"
cd "$root" || die "cannot enter $root"

py="${PYTHON:-python3}"
site="${SITE:-/tmp/jaxmm_site}"
budget="${BUDGET:-450}"
work="${WORK:-/tmp/jaxmm_suite_work}"
nproc_="$(nproc)"
workers="${WORKERS:-$(( nproc_ > 3 ? nproc_ - 2 : 1 ))}"
dry="${DRY_RUN:-0}"
if [ "$dry" = 1 ]; then
  batch="${BATCH:-8}"; steps="${STEPS:-2}"; scale="${LIMIT_SCALE:-5}"
  per_class="${PER_CLASS:-16}"; pipe_batches=4; TRY="${TRY:-16}"
  model=(--image_arch tiny --text_arch tiny --image_size 32 --text_length 8)
  torch_extra=(--no_compile)
  demo=(--config.num_epochs=1 --config.demo.per_class=12 --config.demo.max_side=64
        --config.stored_image_size=40 --config.image_size=32 --config.batch_size=8
        --config.eval_batch_size=8)
else
  batch="${BATCH:-256}"; steps="${STEPS:-30}"; scale="${LIMIT_SCALE:-1}"
  per_class="${PER_CLASS:-1024}"; pipe_batches=24
  model=(); torch_extra=(); demo=()
fi
share="${SHARE:-0.2}"
fraction="${FRACTION:-0.9}"
mkdir -p "$work"
export JAXMM_CACHE="$work/cache"  # the demo config generates its data there
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
start_s=$SECONDS
printf 'step\texit\tseconds\n' >"$out/steps.tsv"

# step NAME LIMIT COMMAND...: runs under timeout (at most the budget left); log in logs/NAME.log.
step() {
  local name="$1" limit=$(( $2 * scale )); shift 2
  local left=$(( budget - (SECONDS - start_s) ))
  if (( left < 20 )); then
    log "$name: skipped, the budget of $budget s is spent"
    printf '%s\tskipped\t0\n' "$name" >>"$out/steps.tsv"
    return 3
  fi
  (( limit < left )) || limit=$left
  log "$name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$out/logs/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" >>"$out/steps.tsv"
  log "$name: exit $rc after $(( SECONDS - t0 )) s"
  [ "$rc" = 0 ] || tail -n 15 "$out/logs/$name.log" >&2
  return "$rc"
}

if [ "$wheels" != "-" ]; then  # the image's own jax/torch stay; only what it lacks goes in
  [ -d "$wheels" ] || die "wheel folder $wheels does not exist"
  keep=()
  for w in "$wheels"/*.whl; do
    case "$(basename "$w")" in
      jax-*|jaxlib-*|jax_cuda*|jax_plugins*|nvidia_*|torch-*|triton-*)
        log "refusing $(basename "$w"): the image's build is used" ;;
      *) [ -f "$w" ] && keep+=("$w") ;;
    esac
  done
  (( ${#keep[@]} )) || die "no wheels to install in $wheels"
  step install 120 "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target "$site" "${keep[@]}" || die "installing the wheels failed (logs/install.log)"
  export PYTHONPATH="$PYTHONPATH:$site"  # after the repo, before the image's site-packages
fi
{ nvidia-smi 2>&1 || echo "nvidia-smi not available"; } >"$out/nvidia-smi.txt"
step versions 90 "$py" benchmarks/gpu_suite_report.py versions "$out/versions.json" \
  || die "the environment is incomplete (logs/versions.log)"
cat "$out/logs/versions.log" >&2
[ "$dry" = 1 ] || "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
  || die "JAX sees no GPU (set DRY_RUN=1 for a CPU plumbing check)"

# Phase 1, untimed and concurrent (each JAX process may take $SHARE of the GPU's memory):
# correctness (the demo in bf16, then its second start, which must find the first one's
# compilation cache, and in fp32, each evaluated on test) and the one-off work of phase 2: the
# full-size synthetic dataset, the compile of jaxmm's full-model step into the compilation cache
# that phase 2 reads (also the early check that the step builds on this JAX), and the
# torch.compile of the tuned PyTorch mode into inductor's cache.
export JAX_COMPILATION_CACHE_DIR="$work/jax_cache"  # the full model's; the demos keep their own
data=(--work_dir "$work/full" --per_class "$per_class" --raw_max_side 320)
full=("${model[@]}" --dtype bfloat16 --batch_size "$batch")
JAX_PLATFORMS=cpu step prepare_full 150 "$py" benchmarks/train_throughput.py "${model[@]}" \
  "${data[@]}" --prepare_only &
pids=($!)
rm -rf "$work/demo_bf16" "$work/demo_fp32" "$work/demo_bf16_again"
export XLA_PYTHON_CLIENT_MEM_FRACTION="$share"
demo_run() {  # demo_run NAME DTYPE [train flags...]: train, then evaluate the test split
  local name="$1" dtype="$2"; shift 2
  JAX_COMPILATION_CACHE_DIR= step "$name" 180 "$py" -m jaxmm.train --config configs/demo.py \
    --workdir "$work/$name" --config.model.dtype="$dtype" "${demo[@]}" "$@" \
    && JAX_COMPILATION_CACHE_DIR= step "${name}_eval" 90 "$py" -m jaxmm.evaluate \
    --workdir "$work/$name" --split test
}
(
  demo_run demo_bf16 bfloat16 || exit
  "$py" benchmarks/gpu_suite_report.py cache "$work/demo_bf16/jax_cache" \
    >"$out/demo_cache_before.json"
  JAX_COMPILATION_CACHE_DIR="$work/demo_bf16/jax_cache" \
    step demo_bf16_again 120 "$py" -m jaxmm.train --config configs/demo.py \
    --workdir "$work/demo_bf16_again" --config.model.dtype=bfloat16 "${demo[@]}"
) &
pids+=($!)
# Its own data cache: two runs must not generate the same demo dataset at once (same seed,
# so the same data).
JAXMM_CACHE="$work/cache_fp32" demo_run demo_fp32 float32 &
pids+=($!)
step torch_compile 240 "$py" benchmarks/torch_reference.py "${full[@]}" --modes tuned \
  --steps 1 --warmup 1 "${torch_extra[@]}" &
pids+=($!)
if ! step jax_compile 240 "$py" benchmarks/train_throughput.py "${full[@]}" --compile_only \
    --hlo_out "$out/step_hlo.txt.gz"; then
  kill "${pids[@]}" 2>/dev/null
  die "jaxmm's full-model step does not compile here (logs/jax_compile.log)"
fi
wait "${pids[@]}"
unset XLA_PYTHON_CLIENT_MEM_FRACTION

# Phase 2, speed: one step at a time, the GPU to itself, compiles read from the caches.
step jax_bf16_b"$batch" 180 "$py" benchmarks/train_throughput.py "${full[@]}" \
  --steps "$steps" --warmup $(( workers + 2 )) --num_workers "$workers" --prefetch_thread both \
  "${data[@]}" --trace_dir "$out/trace" --out "$out/jax_bf16_b$batch.json"
step torch_bf16_b"$batch" 180 "$py" benchmarks/torch_reference.py "${full[@]}" \
  --steps "$steps" "${torch_extra[@]}" --out "$out/torch_bf16_b$batch.json"
# The largest batch that fits when JAX may take $FRACTION of the memory: predicted from the
# peak of the first measurement, then 3/4 of it if the prediction does not run.
read -r -a try_batches <<<"${TRY:-$("$py" benchmarks/gpu_suite_report.py largest \
  "$out/jax_bf16_b$batch.json" "$fraction" 2>/dev/null)}"
log "largest-batch candidates: ${try_batches[*]:-none}"
for b in "${try_batches[@]}"; do
  XLA_PYTHON_CLIENT_MEM_FRACTION="$fraction" step "jax_bf16_b$b" 180 "$py" \
    benchmarks/train_throughput.py "${model[@]}" --dtype bfloat16 --batch_size "$b" \
    --steps "$steps" --warmup $(( workers + 2 )) --num_workers "$workers" "${data[@]}" \
    --out "$out/jax_bf16_b$b.json" && break
  [ $? = 3 ] && break  # out of budget
done
unset JAX_COMPILATION_CACHE_DIR
# The input pipeline alone on this machine's cores: in-process and $WORKERS workers (the same
# prepared dataset and tokenizer as the end-to-end runs).
step pipeline 120 "$py" benchmarks/input_pipeline.py --data_dir "$work/full/raw" \
  --work_dir "$work/full" --skip_original --grain_workers "0,$workers" --repeats 1 \
  --steady_batches "$pipe_batches" --batch_size "$batch" --workers "$nproc_" \
  --out "$out/pipeline.json"

hlo=(); [ -f "$out/step_hlo.txt.gz" ] && hlo=(--hlo "$out/step_hlo.txt.gz")
[ -d "$out/trace" ] && "$py" benchmarks/trace_summary.py "$out/trace" --steps 5 "${hlo[@]}" \
  --out "$out/trace_summary.json" >/dev/null 2>"$out/logs/trace_summary.log"
"$py" benchmarks/gpu_suite_report.py summary "$out" "$work" "$batch" \
  "${CPU_TEST_ACCURACY:-0.793}" | tee "$out/summary.json"
log "done in $(( SECONDS - start_s )) s; results in $out"
if [ -n "${ARCHIVE:-}" ]; then  # one file to carry the results off the machine
  tar czf "$ARCHIVE" -C "$(dirname "$out")" "$(basename "$out")" && log "archive: $ARCHIVE"
fi
