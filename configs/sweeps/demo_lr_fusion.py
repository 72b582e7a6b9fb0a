"""Example sweep: head learning rate x fusion type on the demo config (4 runs).

    CONFIG=configs/demo.py slurm/sweep.sh configs/sweeps/demo_lr_fusion.py --gpus-per-node=0
    python -m jaxmm.compare runs/demo_lr_fusion

Each dict holds ``--config.KEY=VALUE`` overrides of one run; ``grid`` builds every combination.
"""

from jaxmm.experiments.sweep import grid


def get_sweep():
    """Returns the override dicts, one per run."""
    return grid({"optim.lr_head": [2e-3, 5e-4], "model.fusion": ["concat", "gated"]})
