"""Training: the step loop and its cadence (``loop``), how a run is assembled (``setup``), the
pure steps, losses and optimizer, the pmap helpers (``parallel``), checkpoints, the workdir lock,
validation bookkeeping (``progress``), metric logs and warm starts."""
