"""Test setup: fake CPU devices, no network, parsed absl flags.

The environment variables must be set before JAX is imported anywhere, which is why they are set
at the top of this module (pytest imports conftest first).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# rbg keys compile several times faster than threefry on CPU; the code under test takes whatever
# key implementation JAX is configured with. Subprocesses inherit the setting.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
