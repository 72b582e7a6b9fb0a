#!/usr/bin/env bash
# Sets up the Python environment jaxmm jobs run in, on a cluster login node.
#
#   slurm/setup_env.sh [install]        create/update the env (idempotent), then verify it
#   slurm/setup_env.sh verify           print the JAX version, backend and devices it sees;
#                                       on a GPU node: srun --gpus-per-node=1 slurm/setup_env.sh verify
#   slurm/setup_env.sh weights [DIR] [ARGS]
#                                       pre-download the pretrained towers and the tokenizer into
#                                       DIR (default: weights, where configs/default.py looks) with
#                                       `python -m jaxmm.download_weights --out DIR ARGS`; run it on
#                                       a node with internet access, compute nodes stay offline
#   slurm/setup_env.sh tracking         optional: add experiment tracking (MLflow, W&B offline) from
#                                       requirements-tracking.txt, for --config.tracking=mlflow|wandb
#   slurm/setup_env.sh serve            optional: add the HTTP server (python -m jaxmm.serve,
#                                       slurm/serve.sh) from requirements-serve.txt
#   slurm/setup_env.sh audit            optional: add the label audit's cleanlab from
#                                       requirements-audit.txt, for python -m jaxmm.audit
#
# Environment variables (all optional):
#   ENV_KIND   venv (default) or conda
#   VENV       venv path (default <repo>/.venv, which the job scripts find by themselves)
#   CONDA_ENV  conda env name (default jaxmm); jobs then need JAXMM_PYTHON=<its python>, printed below
#   PYTHON     interpreter that creates the venv / version for conda (default python3 / 3.11)
#   JAX_CUDA   jax extra for the GPU wheels (default cuda12; "none" = CPU-only jax)
#   FORCE=1    reinstall even when requirements.txt and JAX_CUDA are unchanged
#   EXPECT_GPU=1  make `verify` fail when JAX sees no GPU
set -euo pipefail

log() { echo "[setup_env] $*"; }
die() { echo "[setup_env] ERROR: $*" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${JAXMM_ROOT:-$here}"
[ -f "$root/requirements.txt" ] || root="${SLURM_SUBMIT_DIR:-$PWD}"
[ -f "$root/requirements.txt" ] || die "no requirements.txt found; run from the repository root"
cd "$root"

env_kind="${ENV_KIND:-venv}"
jax_cuda="${JAX_CUDA:-cuda12}"
venv="${VENV:-$root/.venv}"
conda_env="${CONDA_ENV:-jaxmm}"

# Prints the interpreter of the env, creating the env when it does not exist.
env_python() {
  case "$env_kind" in
    venv)
      if [ ! -x "$venv/bin/python" ]; then
        log "creating venv $venv" >&2
        "${PYTHON:-python3}" -m venv "$venv"
      fi
      echo "$venv/bin/python" ;;
    conda)
      command -v conda >/dev/null || die "conda not found (module load conda / miniforge?)"
      if ! conda env list | awk '{print $1}' | grep -qx "$conda_env"; then
        log "creating conda env $conda_env" >&2
        conda create -y -q -n "$conda_env" "python=${PYTHON:-3.11}" pip >&2
      fi
      conda run -n "$conda_env" python -c 'import sys; print(sys.executable)' ;;
    *) die "ENV_KIND must be venv or conda, not '$env_kind'" ;;
  esac
}

install() {
  local py jax_version jax_req stamp marker
  py="$(env_python)"
  jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' requirements.txt)"
  [ -n "$jax_version" ] || die "requirements.txt pins no jax==VERSION"
  if [ "$jax_cuda" = none ]; then
    jax_req="jax==$jax_version"
  else
    jax_req="jax[$jax_cuda]==$jax_version"
  fi
  # Skip pip when nothing it would install has changed since the last successful run.
  stamp="$( (cat requirements.txt; echo "$jax_req") | sha256sum | cut -d' ' -f1)"
  marker="$(dirname "$(dirname "$py")")/.jaxmm-setup"
  if [ "${FORCE:-0}" != 1 ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$stamp" ]; then
    log "environment up to date ($py)"
  else
    log "installing requirements.txt and $jax_req into $py"
    "$py" -m pip install -q --upgrade pip
    # One resolver run so the CUDA plugin matches the pinned jax/jaxlib.
    "$py" -m pip install -q -r requirements.txt "$jax_req"
    echo "$stamp" >"$marker"
  fi
  verify "$py"
  if [ "$env_kind" = conda ]; then
    log "jobs need: export JAXMM_PYTHON=$py"
  fi
}

verify() {
  local py="${1:-}"
  if [ -z "$py" ]; then
    [ "$env_kind" != venv ] || [ -x "$venv/bin/python" ] || die "no venv at $venv: run install first"
    py="$(env_python)"
  fi
  log "verifying $py"
  EXPECT_GPU="${EXPECT_GPU:-0}" "$py" - <<'PY'
import os
import sys

import jax

devices = jax.devices()
print(f"[setup_env] jax {jax.__version__}, backend {jax.default_backend()}, "
      f"{len(devices)} device(s): {devices}")
import flax, grain, optax, orbax.checkpoint, transformers  # noqa: E401,F401,E402
print(f"[setup_env] flax {flax.__version__}, optax {optax.__version__}, "
      f"transformers {transformers.__version__}: imports ok")
if os.environ["EXPECT_GPU"] == "1" and jax.default_backend() != "gpu":
    sys.exit("[setup_env] ERROR: no GPU visible to JAX (EXPECT_GPU=1)")
PY
}

weights() {
  local py out="${1:-weights}"
  [ "$#" -gt 0 ] && shift
  py="$(env_python)"
  log "downloading pretrained weights and tokenizer into $out"
  "$py" -m jaxmm.download_weights --out "$out" "$@"
  log "done; compute nodes read them offline (HF_HUB_OFFLINE=1) from $out"
}

tracking() {
  local py
  py="$(env_python)"
  log "installing requirements-tracking.txt into $py"
  "$py" -m pip install -q -r requirements-tracking.txt
  "$py" -c 'import mlflow, wandb; print(f"[setup_env] mlflow {mlflow.__version__}, wandb {wandb.__version__}: imports ok")'
}

serve() {
  local py
  py="$(env_python)"
  log "installing requirements-serve.txt into $py"
  "$py" -m pip install -q -r requirements-serve.txt
  "$py" -c 'import fastapi, uvicorn, multipart, prometheus_client; print(f"[setup_env] fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}: imports ok")'
}

audit() {
  local py
  py="$(env_python)"
  log "installing requirements-audit.txt into $py"
  "$py" -m pip install -q -r requirements-audit.txt
  "$py" -c 'import cleanlab; print(f"[setup_env] cleanlab {cleanlab.__version__}: imports ok")'
}

cmd="${1:-install}"
[ "$#" -gt 0 ] && shift
case "$cmd" in
  install) install ;;
  verify) verify ;;
  weights) weights "$@" ;;
  tracking) tracking ;;
  serve) serve ;;
  audit) audit ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "unknown command '$cmd' (install | verify | weights | tracking | serve | audit)" ;;
esac
