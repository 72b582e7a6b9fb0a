#!/usr/bin/env bash
# Serves an export bundle from a cluster node: `python -m jaxmm.serve` (HTTP API + web page).
# The job's log says how to reach it from a laptop (an ssh tunnel) and when it is ready.
#
# Usage (from the repository root; needs `slurm/setup_env.sh serve` once):
#   sbatch [sbatch options] slurm/serve.sh --model garbage_model [more jaxmm.serve flags]
#   sbatch --gpus-per-node=0 slurm/serve.sh --model garbage_model     # on a CPU node
# Stop it with `scancel JOB`: the server finishes the requests in flight and exits 0.
#
# The server binds the node's loopback interface, so only a tunnel reaches it; the log prints
#   ssh -N -L 8000:127.0.0.1:PORT -J USER@LOGIN USER@NODE
# to run on the laptop, then open http://localhost:8000/. Where compute nodes refuse ssh, pass
# `--host 0.0.0.0 --token SECRET` and tunnel through the login node (the log prints that line
# too); anyone on the cluster network can then reach the port, hence the token.
#
# Environment variables read here:
#   PORT (default 8000 + job id % 1000), LOGIN_HOST (default the submit host), JAXMM_ROOT,
#   JAXMM_PYTHON, VENV: as in slurm/jax_train.sh.
#
#SBATCH --job-name=jaxmm-serve
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out

set -uo pipefail

log() { echo "[serve $(date '+%F %T')] $*"; }
die() { log "ERROR: $*"; exit 2; }

root="${JAXMM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$root/slurm/common.sh" ] || die "no jaxmm repository at '$root': run from the repository root or set JAXMM_ROOT"
# shellcheck source=slurm/common.sh
source "$root/slurm/common.sh"  # cd "$root"; sets $py; defines gpus_on_node
"$py" -c 'import fastapi, uvicorn' 2>/dev/null || die "the server's packages are missing: run slurm/setup_env.sh serve"

gpus="$(gpus_on_node)"
[ "$gpus" -gt 0 ] || export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export PYTHONUNBUFFERED=1

port="${PORT:-$((8000 + ${SLURM_JOB_ID:-0} % 1000))}"
node="$(hostname)"
login="${LOGIN_HOST:-${SLURM_SUBMIT_HOST:-LOGIN}}"
user="${USER:-$(id -un)}"
log "job ${SLURM_JOB_ID:-none} on $node, port $port"
log "from your laptop: ssh -N -L 8000:127.0.0.1:$port -J $user@$login $user@$node"
log "  (with --host 0.0.0.0: ssh -N -L 8000:$node:$port $user@$login)"
log "then open http://localhost:8000/ (the API is described at /docs)"
# exec: the server itself gets Slurm's SIGTERM (scancel, time limit) and stops gracefully.
exec "$py" -m jaxmm.serve --port "$port" "$@"
