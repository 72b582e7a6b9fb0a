#!/usr/bin/env bash
# Trains jaxmm under Slurm: one training process per GPU, launched with srun so that
# jax.distributed detects the cluster by itself; resumes from the workdir after a requeue.
#
# Usage (from the repository root, after slurm/setup_env.sh):
#   CONFIG=configs/x.py WORKDIR=runs/y sbatch [sbatch options] slurm/jax_train.sh [--config.KEY=VALUE ...]
# Examples:
#   sbatch slurm/jax_train.sh                                    # 1 node, 1 GPU
#   sbatch --nodes=2 --gpus-per-node=4 --ntasks-per-node=4 slurm/jax_train.sh --config.batch_size=256
#   sbatch --nodes=8 --gpus-per-node=8 --ntasks-per-node=8 --cpus-per-task=14 slurm/jax_train.sh \
#       --config.batch_size=16384 --config.batchnorm_sync=group:8   # 64 GPUs (docs/scaling.md)
#   sbatch --gpus-per-node=0 --ntasks=2 --cpus-per-task=1 slurm/jax_train.sh   # CPU-only partition
#
# Environment variables read here (all optional):
#   CONFIG         config file (default configs/default.py)
#   WORKDIR        run directory (default runs/<job name>-<job id>, stable across requeues)
#   JAXMM_ROOT     repository root (default: the directory sbatch was called from)
#   JAXMM_PYTHON   Python to use (default $VENV/bin/python, VENV defaulting to <root>/.venv,
#                  else python3 on PATH)
#   JAXMM_PREPARE  0 skips the dataset preparation step (default 1)
#   JAXMM_PREPARE_LOCK  a file; jobs naming the same one prepare the dataset one at a time
#                  (slurm/sweep.sh sets it, so the tasks of a sweep never prepare concurrently)
#   JAXMM_MAX_REQUEUES  requeues allowed before giving up (default 20)
#   HF_HUB_OFFLINE defaults to 1: compute nodes load pre-downloaded weights only (docs/slurm.md)
#   JAX_COMPILATION_CACHE_DIR  defaults to $WORKDIR/jax_cache (reused after a requeue)
#
# Exit codes of `python -m jaxmm.train` this script relies on: 0 = finished (no requeue);
# 75 = stopped by SIGUSR1/SIGTERM after saving a checkpoint (requeue); anything else = error.
#
#SBATCH --job-name=jaxmm-train
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180

set -uo pipefail

readonly EXIT_REQUEUE=75

log() { echo "[jax_train $(date '+%F %T')] $*"; }
die() { log "ERROR: $*"; exit 2; }

# --- signals -------------------------------------------------------------------------------
# Slurm sends USR1 to this shell (--signal=B:USR1@N) before the time limit, and TERM on
# preemption, scancel or at the limit. The shell forwards them to the training step, whose
# processes save a checkpoint and exit 75.
child=""
phase=setup
got_usr1=0
got_term=0
on_signal() {
  log "received SIG$1 during $phase"
  if [ "$phase" = train ] && [ -n "$child" ]; then
    kill -s "$1" "$child" 2>/dev/null && log "forwarded SIG$1 to the training step (srun pid $child)"
  fi
}
trap 'got_usr1=1; on_signal USR1' USR1
trap 'got_term=1; on_signal TERM' TERM

# --- where and with what -------------------------------------------------------------------
root="${JAXMM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$root/slurm/common.sh" ] || die "no jaxmm repository at '$root': run from the repository root or set JAXMM_ROOT"
# shellcheck source=slurm/common.sh
source "$root/slurm/common.sh"  # cd "$root"; sets $py; defines gpus_on_node

job_id="${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch}"
config="${CONFIG:-configs/default.py}"
workdir="${WORKDIR:-runs/${SLURM_JOB_NAME:-jaxmm}-${job_id}}"
restarts="${SLURM_RESTART_COUNT:-0}"
mkdir -p "$workdir" || die "cannot create workdir $workdir"
workdir="$(cd "$workdir" && pwd)"  # absolute: every task and restart sees the same path

# --- resources from the allocation ---------------------------------------------------------
cpus="${SLURM_CPUS_PER_TASK:-1}"
workers=$((cpus > 1 ? cpus - 1 : 0))  # one core stays with the training loop itself
nnodes="${SLURM_JOB_NUM_NODES:-1}"
ntasks="${SLURM_NTASKS:-1}"
gpus="$(gpus_on_node)"

srun_train=(srun --kill-on-bad-exit=1 --cpus-per-task="$cpus")
if [ "$gpus" -gt 0 ]; then
  # JAX gives each process the GPU numbered SLURM_LOCALID, so exactly one task per GPU.
  [ "$ntasks" -eq $((nnodes * gpus)) ] ||
    die "$ntasks tasks for $nnodes node(s) x $gpus GPU(s): use --ntasks-per-node=$gpus"
  srun_train+=(--nodes="$nnodes" --ntasks="$ntasks" --ntasks-per-node="$gpus")
else
  srun_train+=(--ntasks="$ntasks")
fi

# A CPU-only allocation should not let a CUDA-enabled jaxlib look for GPUs.
[ "$gpus" -gt 0 ] || export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# JAX's own Slurm default is the same port; exporting it makes it visible and overridable.
export JAX_COORDINATOR_PORT="${JAX_COORDINATOR_PORT:-$((61440 + job_id % 4096))}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export PYTHONUNBUFFERED=1
# Compiled programs persist across requeues, so a restart does not pay for compilation again.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$workdir/$("$py" -m jaxmm.paths JAX_CACHE_DIR)}"

log "job $job_id (restart $restarts) on ${SLURM_JOB_NODELIST:-?}: $nnodes node(s), $ntasks task(s)," \
  "$gpus GPU(s)/node, $cpus CPU(s)/task -> num_workers=$workers"
log "config=$config workdir=$workdir python=$py coordinator port=$JAX_COORDINATOR_PORT"
# Communication settings in effect (NCCL's are the site's to choose; docs/scaling.md).
log "XLA_FLAGS=${XLA_FLAGS:-} NCCL: $(env | grep '^NCCL_' | sort | tr '\n' ' ')"

# Waits for the background child; a trapped signal interrupts `wait`, so wait again while the
# child lives (kill -0 also succeeds on an unreaped child, whose status the next wait returns).
wait_child() {
  local rc
  while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  return "$rc"
}

requeue() {
  if [ "$restarts" -ge "${JAXMM_MAX_REQUEUES:-20}" ]; then
    log "already restarted $restarts times (JAXMM_MAX_REQUEUES); not requeueing"
    exit "$EXIT_REQUEUE"
  fi
  log "requeueing job $job_id; it resumes from the checkpoint in $workdir"
  scontrol requeue "$job_id" || { log "ERROR: scontrol requeue failed"; exit "$EXIT_REQUEUE"; }
  exit 0
}

# --- dataset, once, in a single task -------------------------------------------------------
# Only --config and --config.* arguments describe the dataset; keep those for the prepare step.
config_args=(--config "$config")
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --config.*=*) config_args+=("${args[i]}") ;;
    --config.*) config_args+=("${args[i]}" "${args[i + 1]:-}"); i=$((i + 1)) ;;
  esac
done
read -r -d '' prepare_py <<'PY'
from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)


def main(argv):
    del argv
    from jaxmm import cli
    from jaxmm.training import setup as builders
    from jaxmm.data import prepared

    with cli.user_errors("jaxmm prepare step"):
        builders.check_values(_CONFIG.value)  # bad values fail here, before any data work
        print("dataset ready:", prepared.ensure_prepared(_CONFIG.value), flush=True)


if __name__ == "__main__":
    app.run(main)
PY
if [ "${JAXMM_PREPARE:-1}" != 0 ]; then
  log "preparing the dataset (one task; no-op when already prepared)"
  phase=prepare
  lock=()
  [ -n "${JAXMM_PREPARE_LOCK:-}" ] && lock=(flock "$JAXMM_PREPARE_LOCK")
  JAX_PLATFORMS=cpu "${lock[@]}" srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" \
    "$py" -c "$prepare_py" "${config_args[@]}" &
  child=$!
  wait_child || die "dataset preparation failed (exit $?)"
fi
[ "$got_term" = 1 ] && { log "terminated before training started"; exit "$EXIT_REQUEUE"; }
[ "$got_usr1" = 1 ] && { log "time limit near before training started"; requeue; }

# --- training ------------------------------------------------------------------------------
phase=train
summary="$workdir/$("$py" -m jaxmm.paths SUMMARY_FILE)"
started="$(mktemp "${TMPDIR:-/tmp}/jaxmm_train_started.XXXXXX")" || die "cannot create a temp file"
trap 'rm -f "$started"' EXIT
log "starting training: ${srun_train[*]} $py -m jaxmm.train ..."
"${srun_train[@]}" "$py" -m jaxmm.train --config "$config" --workdir "$workdir" \
  --config.num_workers="$workers" "$@" &
child=$!
wait_child
rc=$?
phase=done

# srun --kill-on-bad-exit ends every task once one exits non-zero, so after a stop signal the
# first task to exit 75 may end a slower one before it exits 75 too; srun then reports that
# task's signal. The summary process 0 writes after the checkpoint is saved, newer than this
# training step, tells the two apart (no task exits before it is written).
if [ "$rc" != 0 ] && [ "$rc" != "$EXIT_REQUEUE" ] && [ $((got_usr1 + got_term)) -gt 0 ] &&
  [ "$summary" -nt "$started" ] && grep -q '"status": "preempted"' "$summary"; then
  log "srun exited $rc after a task saved the checkpoint and exited $EXIT_REQUEUE (its summary: $summary)"
  rc=$EXIT_REQUEUE
fi

case "$rc" in
  0)
    log "training finished (exit 0); not requeueing"
    exit 0 ;;
  "$EXIT_REQUEUE")
    if [ "$got_term" = 1 ]; then
      # TERM means Slurm itself is ending the job (preemption, scancel or the time limit);
      # a preempted job on a PreemptMode=REQUEUE partition is requeued by Slurm.
      log "training saved a checkpoint and stopped on SIGTERM; leaving the requeue to Slurm"
      exit "$EXIT_REQUEUE"
    fi
    log "training saved a checkpoint and stopped (exit $rc)"
    requeue ;;
  *)
    log "training failed (exit $rc)"
    exit "$rc" ;;
esac
