"""One GPU node (e.g. one H100 or A100): bf16 compute, bigger batch, more grain workers.

      python -m jaxmm.train --config configs/gpu_bf16.py --workdir runs/gpu \
          --config.data_dir=/path/to/garbage_data
"""

from jaxmm.config_files import sibling


def get_config():
    """Returns the default configuration with GPU-friendly settings."""
    c = sibling(__file__, "default")()
    c.model.dtype = "bfloat16"
    c.batch_size = 128
    c.eval_batch_size = 256
    c.num_workers = 8
    return c
