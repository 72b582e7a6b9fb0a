"""The run's bookkeeping beside the train state: where validation stands and how the run ended.

The run's position is the train state's ``step`` alone; the epoch is derived from it. What is
here is saved with every checkpoint (as JSON), so a resumed run keeps its best epoch, patience
and history.
"""

import dataclasses
import enum

from jaxmm.evaluation.metrics import improves


class Status(enum.StrEnum):
    """How a run stands: RUNNING until the loop ends it one of the other three ways."""

    RUNNING = "running"
    PREEMPTED = "preempted"  # stopped by SIGTERM/SIGUSR1 after saving; run again to resume
    EARLY_STOPPED = "early_stopped"  # patience ran out
    FINISHED = "finished"  # every epoch trained


@dataclasses.dataclass
class RunProgress:
    """Validation bookkeeping of one run.

    Attributes:
      status: how the run stands.
      best_metric: the best value of the early-stopping metric so far (None before validation).
      best_epoch: the epoch that reached it.
      best_step: the train step of that epoch's end.
      bad_epochs: epochs since the last improvement (early stopping).
      history: one dict of validation metrics per epoch (with "epoch" and "step").
      config: the config the run last ran with (a changed resume is reported).
    """

    status: Status = Status.RUNNING
    best_metric: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    bad_epochs: int = 0
    history: list = dataclasses.field(default_factory=list)
    config: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready dict (what checkpoints store)."""
        return {**dataclasses.asdict(self), "status": self.status.value}

    @classmethod
    def from_json(cls, saved: dict) -> "RunProgress":
        """Reads what ``to_json`` wrote; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in saved.items() if k in names}
        fields["status"] = Status(fields.get("status", Status.RUNNING.value))
        return cls(**fields)

    def record_validation(self, epoch: int, step: int, metric: str, metrics: dict) -> bool:
        """Adds one epoch's validation to the history and updates best and patience.

        Returns:
          Whether this epoch is the new best.
        """
        value = metrics[metric]
        improved = improves(metric, value, self.best_metric)
        if improved:
            self.best_metric, self.best_epoch, self.best_step = value, epoch, step
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.history.append({"epoch": epoch, "step": step, **metrics})
        return improved

    def best_validation(self) -> dict | None:
        """The history row of the best epoch."""
        return next((h for h in self.history if h["epoch"] == self.best_epoch), None)
