# Sourced by the job scripts (jax_train.sh, evaluate.sh, sweep.sh, audit.sh, serve.sh) after they
# define log() and die(), with $root set to the repository root
# (${JAXMM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}: sbatch runs a copy of the script, so the script's
# own path does not lead back to the repository). Changes to $root and sets $py:
#   JAXMM_PYTHON   Python to use (default $VENV/bin/python, VENV defaulting to <root>/.venv,
#                  else python3 on PATH)
# and defines gpus_on_node (the node's GPU count from Slurm's variables; 0 without GPUs).

[ -d "$root/jaxmm" ] || die "no jaxmm package in '$root': run from the repository root or set JAXMM_ROOT"
cd "$root" || die "cannot cd to $root"
if [ -n "${JAXMM_PYTHON:-}" ]; then
  py="$JAXMM_PYTHON"
elif [ -x "${VENV:-$root/.venv}/bin/python" ]; then
  py="${VENV:-$root/.venv}/bin/python"
else
  py="$(command -v python3)" || die "no python3 on PATH; set JAXMM_PYTHON or VENV"
fi

gpus_on_node() {
  local gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}"
  gpus="${gpus##*:}"  # "a100:4" -> "4"
  [[ "$gpus" =~ ^[0-9]+$ ]] && echo "$gpus" || echo 0
}
