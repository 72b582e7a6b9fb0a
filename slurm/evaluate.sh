#!/usr/bin/env bash
# Evaluates a trained run on a cluster node: `python -m jaxmm.evaluate` on one split, writing
# <WORKDIR>/eval/<best or step_N>/<SPLIT>/metrics.json (plus the evaluator's reports).
#
# Usage (from the repository root):
#   WORKDIR=runs/y [SPLIT=test] [CHECKPOINT=best] sbatch [sbatch options] slurm/evaluate.sh [extra args]
#   WORKDIR=runs/y srun --gpus-per-node=1 slurm/evaluate.sh           # interactive, same thing
#   WORKDIR=runs/y sbatch --gpus-per-node=4 --ntasks=4 slurm/evaluate.sh   # one process per GPU
# Extra arguments go to `python -m jaxmm.evaluate` unchanged.
#
# Environment variables read here:
#   WORKDIR (required), SPLIT (default test), CHECKPOINT (default best; or latest / a step),
#   JAXMM_ROOT, JAXMM_PYTHON, VENV, HF_HUB_OFFLINE: as in slurm/jax_train.sh.
#
#SBATCH --job-name=jaxmm-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out

set -uo pipefail

log() { echo "[evaluate $(date '+%F %T')] $*"; }
die() { log "ERROR: $*"; exit 2; }

root="${JAXMM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$root/slurm/common.sh" ] || die "no jaxmm repository at '$root': run from the repository root or set JAXMM_ROOT"
# shellcheck source=slurm/common.sh
source "$root/slurm/common.sh"  # cd "$root"; sets $py; defines gpus_on_node

workdir="${WORKDIR:?set WORKDIR to the training run directory}"
split="${SPLIT:-test}"
checkpoint="${CHECKPOINT:-best}"
[ -d "$workdir" ] || die "WORKDIR $workdir does not exist"

gpus="$(gpus_on_node)"
# A CPU-only allocation should not let a CUDA-enabled jaxlib look for GPUs.
[ "$gpus" -gt 0 ] || export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export PYTHONUNBUFFERED=1

cmd=("$py" -m jaxmm.evaluate --workdir "$workdir" --split "$split" --checkpoint "$checkpoint" "$@")
# Inside a batch job, run one process per task of the allocation (one per GPU, like training;
# process 0 writes the reports); under srun or outside Slurm run directly.
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
  cmd=(srun --kill-on-bad-exit=1 --ntasks="${SLURM_NTASKS:-1}"
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${cmd[@]}")
fi
log "job ${SLURM_JOB_ID:-none} on $(hostname): split=$split checkpoint=$checkpoint workdir=$workdir"
log "${cmd[*]}"
"${cmd[@]}"
rc=$?
if [ "$rc" = 0 ]; then
  log "done: reports in $workdir/$("$py" -m jaxmm.paths EVAL_DIR)/"
else
  log "evaluation failed (exit $rc)"
fi
exit "$rc"
