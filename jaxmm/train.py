"""Trains the fusion classifier.

    python -m jaxmm.train --config configs/default.py --workdir runs/x [--config.KEY=VALUE ...]

Resumes automatically when the workdir holds a checkpoint. Under Slurm (``srun``, one process per
GPU) or with ``--coordinator_address`` it starts ``jax.distributed`` first. Exit codes: 0 done
(finished or stopped early), 75 stopped by SIGTERM/SIGUSR1 after saving (resubmit to resume),
1 error, 2 bad flags.
"""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from jaxmm import cli, paths
from jaxmm.errors import ConfigError
from jaxmm.trained.workdir import Workdir
from jaxmm.training import train_log

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reports go here.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    # The workdir survives requeues, so its compilation cache saves a compile on every resume.
    cli.initialize_distributed(
        Workdir(os.path.abspath(_WORKDIR.value)).file(paths.JAX_CACHE_DIR))
    import jax

    from jaxmm.training import loop

    logging.info("process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if summary["status"] == "preempted":
        logging.warning("stopped after saving step %d; run the same command to resume",
                        summary["step"])
        if jax.process_count() > 1:
            # Under `srun --kill-on-bad-exit` the first task to exit 75 ends the others: none
            # leaves before process 0 has written the summary that says the save completed.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxmm_stopped")
        sys.exit(loop.EXIT_PREEMPTED)
    if jax.process_index() == 0:
        print(train_log.format_summary(summary))


def run():
    """Console-script entry point (``jaxmm-train``)."""
    cli.run(main, "jaxmm.train")


if __name__ == "__main__":
    run()
