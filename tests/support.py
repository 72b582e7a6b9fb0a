"""Helpers shared by the test modules (plain functions and constants; fixtures are in
conftest.py)."""

import atexit
import csv
import functools
import os
import shutil
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Split sizes of the tiny demo data of ``eval_tiny_config``: validation 10, test 16; neither
# divides the eval batch 12.
TINY = {"per_class": 12, "eval_batch_size": 12, "val_size": 10, "test_size": 16}


def env(devices: int = 4) -> dict:
    """The environment of a jaxmm subprocess on ``devices`` fake CPU devices."""
    out = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out.pop("JAX_COORDINATOR_ADDRESS", None)
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
