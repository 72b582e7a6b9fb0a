#!/usr/bin/env bash
# Submits a label audit: the K fold trainings as ONE Slurm job array (the sweep machinery:
# each array task is slurm/sweep.sh --task, i.e. slurm/jax_train.sh on fold run k), then one
# scoring job that starts when every fold has finished and writes label_issues.csv,
# summary.json and label_issues.png into AUDIT_DIR.
#
# Usage (from the repository root, after slurm/setup_env.sh and slurm/setup_env.sh audit):
#   CONFIG=configs/x.py AUDIT_DIR=runs/audit [FOLDS=4] [AUDIT_PARALLEL=K] \
#     slurm/audit.sh [sbatch options] [-- --config.KEY=VALUE ...]
# Example:
#   CONFIG=configs/default.py AUDIT_DIR=runs/audit slurm/audit.sh --partition=gpu \
#     -- --config.data_dir=/shared/garbage_data
#
# The folds are checked and written on the login node first (python -m jaxmm.audit --stage
# plan: too few examples of a class for the folds is one line and nothing is submitted; the
# dataset is prepared there if it is not yet). Submitting again skips finished fold runs and
# those still queued or running, resumes the others, and scores again.
#
# Environment variables read here (all optional):
#   CONFIG          config file (default configs/default.py)
#   AUDIT_DIR       audit folder (default runs/audit)
#   FOLDS           number of folds (default 4)
#   AUDIT_PARALLEL  array tasks running at the same time (--array=...%K; default 4)
#   JAXMM_PYTHON, VENV, JAXMM_ROOT, ...   as for slurm/jax_train.sh
# The #SBATCH defaults are those of slurm/jax_train.sh; sbatch options given here override them
# (for the fold tasks and the scoring job alike). Logs: AUDIT_DIR/logs/.

set -euo pipefail

log() { echo "[audit $(date '+%F %T')] $*"; }
die() { log "ERROR: $*" >&2; exit 2; }

root="${JAXMM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$root/slurm/common.sh" ] || die "no jaxmm repository at '$root': run from the repository root or set JAXMM_ROOT"
# shellcheck source=slurm/common.sh
source "$root/slurm/common.sh"  # cd "$root"; sets $py; defines gpus_on_node

# --- the scoring job, after the array ---------------------------------------------------------
if [ "${1:-}" = --score ]; then
  audit_dir="${2:?--score needs the audit folder}"
  log "scoring the fold runs of $audit_dir"
  exec "$py" -m jaxmm.audit --stage score --audit_dir "$audit_dir"
fi

# --- on the login node: check, write the folds, submit -----------------------------------------
sbatch_args=()
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do sbatch_args+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
config="${CONFIG:-configs/default.py}"
audit_dir="${AUDIT_DIR:-runs/audit}"
mkdir -p "$audit_dir/logs" || die "cannot create $audit_dir"
audit_dir="$(cd "$audit_dir" && pwd)"
command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node"

job_name="jaxmm-audit-$(basename "$audit_dir")"
for ((i = 0; i < ${#sbatch_args[@]}; i++)); do
  case "${sbatch_args[i]}" in
    --job-name=*) job_name="${sbatch_args[i]#--job-name=}" ;;
    --job-name|-J) job_name="${sbatch_args[i + 1]:-}" ;;
    -J?*) job_name="${sbatch_args[i]#-J}" ;;
  esac
done

# The checks need no accelerator: keep JAX on the CPU of the login node.
todo="$(JAX_PLATFORMS=cpu "$py" -m jaxmm.audit --stage plan --config "$config" \
  --audit_dir "$audit_dir" --folds "${FOLDS:-4}" -- "$@" | tail -n 1)" || exit 2
active=",$(squeue -u "$(id -un)" -h -r -n "$job_name" -o '%K' 2>/dev/null |
  grep -E '^[0-9]+$' | paste -sd, || true),"
submit=()
for i in ${todo//,/ }; do
  if [[ "$active" == *",$i,"* ]]; then
    log "fold $i: already queued or running, skipped"
  else
    submit+=("$i")
  fi
done

mapfile -t defaults < <(sed -n 's/^#SBATCH[[:space:]]\{1,\}//p' "$root/slurm/jax_train.sh")
dependency=()
if [ "${#submit[@]}" -gt 0 ]; then
  array="$(IFS=,; echo "${submit[*]}")"
  job="$(JAXMM_PREPARE_LOCK="${JAXMM_PREPARE_LOCK:-$audit_dir/.prepare.lock}" sbatch --parsable \
    "${defaults[@]}" --job-name="$job_name" --output="$audit_dir/logs/%x-%A_%a.out" \
    --array="$array%${AUDIT_PARALLEL:-4}" "${sbatch_args[@]}" \
    "$root/slurm/sweep.sh" --task "$audit_dir")" || die "sbatch failed"
  job="${job%%;*}"
  log "submitted job array $job (folds $array, at most ${AUDIT_PARALLEL:-4} at a time)"
  dependency=(--dependency="afterok:$job")
else
  log "every fold run has finished or is queued"
fi
score="$(sbatch --parsable "${defaults[@]}" --job-name="$job_name-score" \
  --output="$audit_dir/logs/%x-%j.out" --requeue "${dependency[@]}" "${sbatch_args[@]}" \
  "$root/slurm/audit.sh" --score "$audit_dir")" || die "sbatch of the scoring job failed"
log "submitted scoring job ${score%%;*}${dependency:+ (after job array ${job:-})}"
log "results: $audit_dir/label_issues.csv   compare the folds: $py -m jaxmm.compare $audit_dir"
