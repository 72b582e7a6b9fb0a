"""Helpers shared by the test modules (plain functions and constants; fixtures are in
conftest.py)."""

import atexit
import csv
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Split sizes of the tiny demo data of ``eval_tiny_config``: validation 10, test 16; neither
# divides the eval batch 12.
TINY = {"per_class": 12, "eval_batch_size": 12, "val_size": 10, "test_size": 16}


def env(devices: int = 4, *, shipped_prng: bool = False) -> dict:
    """The environment of a jaxmm subprocess on ``devices`` fake CPU devices; with
    ``shipped_prng``, JAX's default (threefry) keys, as users run, instead of the suite's rbg."""
    out = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out.pop("JAX_COORDINATOR_ADDRESS", None)
    if shipped_prng:
        out.pop("JAX_DEFAULT_PRNG_IMPL", None)
    return out


def without_shared_cache(environ: dict) -> dict:
    """``environ`` for a subprocess that must choose its compilation cache itself."""
    return {k: v for k, v in environ.items()
            if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}


def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def eval_tiny_config(root: str):
    """The demo config shrunk to seconds per epoch: the shared trained run uses it."""
    from configs import demo

    c = demo.get_config()
    c.data_dir = os.path.join(root, "data")
    c.demo.per_class = TINY["per_class"]
    c.demo.max_side = 64
    c.stored_image_size = 40
    c.image_size = 32
    c.batch_size = 8
    c.eval_batch_size = TINY["eval_batch_size"]
    c.num_epochs = 2
    c.model.modality_dropout = 0.2
    c.checkpoint_every_steps = 100
    # 10 validation examples fail the trust criterion (fewer than 50); the tests of calibrated
    # evaluation and export need a temperature applied (the criterion has its own tests).
    c.calibration = "always"
    return c


@functools.cache
def demo_dataset() -> tuple[str, str]:
    """(raw dir, dataset dir) of a small prepared synthetic dataset, built once per process
    (a per-process path plus prepare's idempotence)."""
    from jaxmm.data import prepared, synthetic

    root = os.path.join(tempfile.gettempdir(), f"jaxmm_test_data_{os.getpid()}")
    raw = os.path.join(root, "raw")
    if not os.path.isdir(raw):
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        synthetic.generate(raw, per_class=12, seed=0, max_side=96, workers=1)
    ds_dir, _ = prepared.prepare(raw, os.path.join(root, "out"), stored_image_size=48, workers=1,
                                log=lambda s: None)
    return raw, ds_dir


# Small enough for 2 CPU cores; batch sizes divisible by the 4 fake devices.
LOOP_TINY = {"demo.per_class": 16, "demo.max_side": 96, "stored_image_size": 40, "image_size": 32,
        "max_text_length": 12, "batch_size": 8, "eval_batch_size": 12, "num_epochs": 2,
        "checkpoint_every_steps": 3, "log_every_steps": 2, "model.modality_dropout": 0.2}


def tiny_config(data_dir, **overrides):
    """The demo config of the training-loop tests (``LOOP_TINY``) on ``data_dir``."""
    from configs import demo

    config = demo.get_config()
    for key, value in {**LOOP_TINY, "data_dir": data_dir, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def loop_flags(data_dir, **overrides):
    """``--config.K=V`` flags of ``tiny_config``."""
    values = {**LOOP_TINY, "data_dir": data_dir, **overrides}
    return [f"--config.{k}={v}" for k, v in values.items()]


def train_cmd(workdir, data_dir, *extra, **overrides):
    """``python -m jaxmm.train`` of the loop tests' tiny demo run."""
    return [sys.executable, "-m", "jaxmm.train", "--config", os.path.join(REPO, "configs/demo.py"),
            "--workdir", str(workdir), *loop_flags(data_dir, **overrides), *extra]


def wait_for_checkpoint(workdir, proc, timeout=300):
    ckpt = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
            return
        assert proc.poll() is None, "training exited before its first checkpoint"
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def model_config(**overrides):
    """``config.model`` of a tiny image + text classifier."""
    import ml_collections

    cfg = dict(modalities=("image", "text"), image_arch="tiny", image_pretrained="",
               text_arch="tiny", text_pretrained="", text_pooling="cls", fusion="concat",
               proj_dim=16, hidden_dim=32, dropout=0.1, modality_dropout=0.0,
               dtype="float32", freeze_image=False, freeze_text=False)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


class StandIn(nn.Module):
    """A small image+text model with synchronised BatchNorm, shaped like the real one."""

    axis_name: str | None = "batch"  # parallel.AXIS_NAME

    @nn.compact
    def __call__(self, image, input_ids, attention_mask, *, train, modality_mask=None,
                 example_ids=None):
        # No conv bias before BatchNorm (as in ResNet): its gradient is exactly zero in theory,
        # and Adam would turn float noise in it into full-size steps.
        x = nn.Conv(4, (3, 3), use_bias=False)(image.astype(jnp.float32) / 255.0)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name if train
                         else None, momentum=0.9)(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        t = nn.Embed(50, 4)(input_ids) * attention_mask[..., None]
        x = jnp.concatenate([x, t.sum(1)], -1)
        return nn.Dense(3)(x)


def step_batch(n, seed=0):
    """A batch for ``StandIn`` with uneven classes across devices."""
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
            "input_ids": rng.integers(0, 50, (n, 5)).astype(np.int32),
            "attention_mask": np.ones((n, 5), np.int32),
            # Uneven classes across devices: the first rows are all class 2.
            "label": np.concatenate([np.full(n // 2, 2), rng.integers(0, 2, n - n // 2)])
            .astype(np.int32)}


def step_state():
    """A train state of ``StandIn`` with Adam."""
    import jax
    import optax

    from jaxmm.training import steps

    model = StandIn()
    b = step_batch(2)
    variables = model.init(jax.random.PRNGKey(0), b["image"], b["input_ids"],
                           b["attention_mask"], train=False)
    return steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                   batch_stats=variables["batch_stats"],
                                   tx=optax.adam(1e-2))


# --- Slurm (tests/test_slurm*.py) ---------------------------------------------------------

JOB_TIMEOUT_S = 900  # generous: a loaded 2-core machine compiles slowly
# Tiny demo run of the Slurm tests: 48 Train examples -> 6 steps per epoch; metrics logged
# and stop signals checked every step so the interruption lands mid-run.
SLURM_TINY = ["--config.demo.per_class=12", "--config.demo.max_side=64",
        "--config.stored_image_size=40", "--config.image_size=32", "--config.batch_size=8",
        "--config.eval_batch_size=8", "--config.num_epochs=2", "--config.log_every_steps=1",
        "--config.signal_check_every_steps=1", "--config.checkpoint_every_steps=100"]


def run_quiet(cmd: list[str], **kwargs) -> str:
    """A short command's stdout; RuntimeError naming it when it fails."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, **kwargs)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None when an idle node is there."""
    missing = [c for c in ("sbatch", "sinfo", "scontrol", "scancel") if not shutil.which(c)]
    if missing:
        return f"Slurm commands not found: {', '.join(missing)} (.ci/slurm_up.sh installs them)"
    try:
        # A node busy with other jobs is usable too: the jobs queue behind them.
        nodes = run_quiet(["sinfo", "-h", "-t", "idle,mixed,allocated", "-o", "%n"]).split()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return f"Slurm controller not reachable: {e}"
    return None if nodes else "no Slurm node up (idle, mixed or allocated)"


def require_cluster() -> None:
    """Skips the Slurm tests where no Slurm is expected; fails where it is (in CI, or as root
    with Slurm installed: .ci/slurm_up.sh starts a cluster there), so that a broken set-up
    cannot pass as a skip."""
    import pytest

    problem = cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI") or (os.geteuid() == 0 and shutil.which("sbatch")):
        pytest.fail(f"Slurm is expected here (CI, or root with Slurm installed): {problem}",
                    pytrace=False)
    pytest.skip(problem)


class Cluster:
    """Submits jobs from the repository root and cancels leftovers at the end."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.jobs: list[str] = []
        # JAX's default (threefry) keys: the jobs run what users run, not the suite's rbg.
        environ = {k: v for k, v in os.environ.items() if k != "JAX_DEFAULT_PRNG_IMPL"}
        self.env = dict(environ, JAXMM_PYTHON=sys.executable, JAX_PLATFORMS="cpu",
                        XLA_FLAGS="--xla_force_host_platform_device_count=2",
                        # Shared by all jobs here: later runs skip most of the compilation.
                        JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"))

    def submit(self, script: str, name: str, sbatch_args: list[str], args: list[str],
               **env: str) -> str:
        cmd = ["sbatch", "--parsable", f"--job-name={name}",
               f"--output={self.tmp / name}-%j.out", *sbatch_args, script, *args]
        job = run_quiet(cmd, cwd=REPO, env=dict(self.env, **env)).strip().split(";")[0]
        self.jobs.append(job)
        return job

    def log(self, job: str) -> str:
        logs = sorted(self.tmp.glob(f"*-{job}.out"))
        return logs[0].read_text(errors="replace") if logs else "(no log)"

    def cancel_all(self) -> None:
        for job in self.jobs:
            subprocess.run(["scancel", job], capture_output=True, check=False)


# Modules the server must never import (tests/test_serve_api.py checks its process at exit).
SERVE_FORBIDDEN = ("flax", "optax", "orbax", "grain", "tensorflow_datasets", "transformers")
_SERVE_WRAPPER = (
    "import atexit, runpy, sys\n"
    "forbidden = set(sys.argv.pop(1).split(','))\n"
    "atexit.register(lambda: print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} "
    "& forbidden), flush=True))\n"
    "sys.argv[0] = 'jaxmm.serve'\n"
    "runpy.run_module('jaxmm.serve', run_name='__main__')\n")


class Server:
    """``python -m jaxmm.serve`` in a subprocess on a free loopback port; ``url`` once ready.
    At exit the process prints which ``SERVE_FORBIDDEN`` modules it ever imported."""

    def __init__(self, bundle: str, *flags: str, cwd=None, environ=None, timeout: float = 600):
        import threading

        cmd = [sys.executable, "-c", _SERVE_WRAPPER, ",".join(SERVE_FORBIDDEN), "--model",
               bundle, "--port", "0", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=cwd, env=environ or env(1))
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("ready: "):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout)
        found = [line for line in self.lines if line.startswith("ready: ")]
        if not found:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-30:]))
        self.url = found[0][len("ready: "):].rstrip("/")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (killed after ``timeout`` seconds)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def imported(self) -> list[str]:
        """The forbidden modules the stopped process imported (its last line says)."""
        time.sleep(0.2)  # the reader thread takes the last lines
        line = next(line for line in reversed(self.lines) if line.startswith("IMPORTED "))
        import ast

        return ast.literal_eval(line[len("IMPORTED "):])


def png_bytes(array) -> bytes:
    """PNG bytes of a uint8 image array."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
