#!/usr/bin/env bash
# Submits a sweep as ONE Slurm job array: array task I trains run I of the sweep file with
# slurm/jax_train.sh (one process per GPU, warning signal, checkpoint + requeue) in its own
# workdir SWEEP_DIR/<I>-<short name of its overrides>.
#
# Usage (from the repository root, after slurm/setup_env.sh):
#   CONFIG=configs/x.py [SWEEP_DIR=runs/name] [SWEEP_PARALLEL=K] \
#     slurm/sweep.sh SWEEP.py [sbatch options] [-- --config.KEY=VALUE ...]
# Examples:
#   CONFIG=configs/default.py slurm/sweep.sh configs/sweeps/lr.py --partition=gpu \
#     -- --config.data_dir=/shared/garbage_data
#   CONFIG=configs/demo.py slurm/sweep.sh configs/sweeps/demo_lr_fusion.py --gpus-per-node=0
#
# Every entry of the sweep is checked against the loaded config before anything is submitted
# (unknown key, wrong type: one line naming the key and the entry). Submitting the same sweep
# again skips finished runs and runs whose array task is still queued or running, and resumes
# the others from their checkpoints. Arguments after `--` go to every run.
#
# Environment variables read here (all optional):
#   CONFIG          config file (default configs/default.py)
#   SWEEP_DIR       sweep folder (default runs/<sweep file name without .py>)
#   SWEEP_PARALLEL  array tasks running at the same time (--array=...%K; default 4)
#   JAXMM_PYTHON, VENV, JAXMM_ROOT, ...   as for slurm/jax_train.sh
# The #SBATCH defaults are those of slurm/jax_train.sh; sbatch options given here override them.
# Task logs go to SWEEP_DIR/logs/<job name>-<array job id>_<index>.out.

set -euo pipefail

log() { echo "[sweep $(date '+%F %T')] $*"; }
die() { log "ERROR: $*" >&2; exit 2; }

root="${JAXMM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$root/slurm/common.sh" ] || die "no jaxmm repository at '$root': run from the repository root or set JAXMM_ROOT"
# shellcheck source=slurm/common.sh
source "$root/slurm/common.sh"  # cd "$root"; sets $py; defines gpus_on_node

# --- inside the job array: become slurm/jax_train.sh for this task's run ---------------------
if [ "${1:-}" = --task ]; then
  sweep_dir="${2:?--task needs the sweep folder}"
  index="${SLURM_ARRAY_TASK_ID:?--task runs inside a Slurm job array}"
  mapfile -t lines < <("$py" -m jaxmm.experiments.sweep task --sweep_dir "$sweep_dir" --index "$index")
  [ "${#lines[@]}" -ge 3 ] || die "cannot read run $index of $sweep_dir"
  if [ "${lines[0]}" = finished ]; then
    log "run $index (${lines[1]}) has already finished; nothing to do"
    exit 0
  fi
  export WORKDIR="${lines[1]}" CONFIG="${lines[2]}"
  export JAXMM_PREPARE_LOCK="${JAXMM_PREPARE_LOCK:-$sweep_dir/.prepare.lock}"
  log "array task $index: workdir $WORKDIR"
  # exec keeps the batch shell's pid, so Slurm's signals reach jax_train.sh's traps.
  exec "$root/slurm/jax_train.sh" "${lines[@]:3}"
fi

# --- on the login node: check the sweep and submit it ---------------------------------------
sweep_file="${1:?usage: CONFIG=configs/x.py [SWEEP_DIR=runs/name] slurm/sweep.sh SWEEP.py [sbatch options] [-- --config.KEY=VALUE ...]}"
shift
sbatch_args=()
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do sbatch_args+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
config="${CONFIG:-configs/default.py}"
stem="$(basename "$sweep_file" .py)"
sweep_dir="${SWEEP_DIR:-runs/$stem}"
mkdir -p "$sweep_dir/logs" || die "cannot create $sweep_dir"
sweep_dir="$(cd "$sweep_dir" && pwd)"
command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node"

# The job name (ours unless the sbatch options name one) finds array tasks still in the queue.
job_name="jaxmm-sweep-$(basename "$sweep_dir")"
for ((i = 0; i < ${#sbatch_args[@]}; i++)); do
  case "${sbatch_args[i]}" in
    --job-name=*) job_name="${sbatch_args[i]#--job-name=}" ;;
    --job-name|-J) job_name="${sbatch_args[i + 1]:-}" ;;
    -J?*) job_name="${sbatch_args[i]#-J}" ;;
  esac
done
active="$(squeue -u "$(id -un)" -h -r -n "$job_name" -o '%K' 2>/dev/null |
  grep -E '^[0-9]+$' | paste -sd, || true)"

# The checks need no accelerator: keep JAX on the CPU of the login node.
todo="$(JAX_PLATFORMS=cpu "$py" -m jaxmm.experiments.sweep plan --config "$config" --sweep "$sweep_file" \
  --sweep_dir "$sweep_dir" --active "$active" -- "$@")" || exit 2
if [ -z "$todo" ]; then
  log "nothing to submit: every run has finished or is queued"
  exit 0
fi

# jax_train.sh's own #SBATCH lines first, then ours, then the user's: the last one wins.
mapfile -t defaults < <(sed -n 's/^#SBATCH[[:space:]]\{1,\}//p' "$root/slurm/jax_train.sh")
job="$(sbatch --parsable "${defaults[@]}" --job-name="$job_name" \
  --output="$sweep_dir/logs/%x-%A_%a.out" --array="$todo%${SWEEP_PARALLEL:-4}" \
  "${sbatch_args[@]}" "$root/slurm/sweep.sh" --task "$sweep_dir")" || die "sbatch failed"
log "submitted job array ${job%%;*} (runs $todo, at most ${SWEEP_PARALLEL:-4} at a time)"
log "logs: $sweep_dir/logs   compare: $py -m jaxmm.compare $sweep_dir"
