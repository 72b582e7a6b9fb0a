"""Test setup: fake CPU devices, no network, one compilation cache, parsed absl flags.

The environment variables must be set before JAX is imported anywhere, which is why they are set
at the top of this module (pytest imports conftest first).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# rbg keys compile several times faster than threefry on CPU; the code under test takes whatever
# key implementation JAX is configured with. Subprocesses inherit the setting.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# One persistent compilation cache for the whole test run, in-process and in every subprocess
# (training runs, Slurm jobs): the many tiny runs compile the same programs, and every program is
# cached, however short its compile (a tiny run's many small programs add up to seconds).
# Tests of where jaxmm itself puts its cache run without it (``without_shared_cache``).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxmm_tests_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def without_shared_cache(env: dict) -> dict:
    """``env`` for a subprocess that must choose its compilation cache itself."""
    return {k: v for k, v in env.items()
            if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
