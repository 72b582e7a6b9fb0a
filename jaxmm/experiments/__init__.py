"""Experiments across runs: sweeps (the Python half of slurm/sweep.sh) and run tables
(``jaxmm.compare``)."""
