"""``train_and_evaluate(config, workdir)``: the training loop, its cadence and its hooks.

Per step: one pmapped train step; metrics stay on the devices until a log step. Per epoch: an
exact validation pass, best-model tracking and early stopping. Checkpoints every
``checkpoint_every_steps``, at every epoch end and when SIGTERM/SIGUSR1 arrives; a workdir that
holds a checkpoint resumes from it (data position included), so a killed run loses at most the
steps since the last save and repeats them exactly. One run at a time holds the workdir
(``lock``); a resume is checked against the run record first (``run_record``).
"""

import contextlib
import dataclasses
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmm.data import pipeline
from jaxmm.errors import DivergedError
from jaxmm.evaluation import calibration, scoring
from jaxmm.experiments import tracking
from jaxmm.trained.model import ModelSpec
from jaxmm.trained.workdir import Workdir, model_architecture
from jaxmm.training import checkpointing, lock, optim, parallel, steps, train_log
from jaxmm.training import setup as setup_lib
from jaxmm.training.progress import RunProgress, Status

log = logging.getLogger("jaxmm")

# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving: "try again later" (EX_TEMPFAIL).
EXIT_PREEMPTED = 75
# Config keys that must not change when a run resumes (the data order and step count hang on
# them); a change is reported, since the user may mean it (e.g. more epochs).
_RESUME_SENSITIVE = ("seed", "batch_size", "num_epochs", "data_dir", "text_source", "image_size",
                     "max_text_length", "num_workers", "rng_scheme")


class NonFiniteLossError(DivergedError):
    """The loss or the gradient norm became NaN/inf."""


class StopSignals:
    """Turns SIGTERM and SIGUSR1 (Slurm's warning signal) into a flag the loop polls."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name

    def should_stop(self, step: int, every: int) -> bool:
        """Whether to stop now; processes agree on it every ``every`` steps."""
        if jax.process_count() == 1:
            return self.received is not None
        if step % max(every, 1):
            return False
        return parallel.any_process(self.received is not None)


@dataclasses.dataclass
class Setup:
    """Everything a run is built from, before any state is restored or initialised."""

    data: setup_lib.Data
    tokenizer: object
    model: object
    tx: object
    class_weights: np.ndarray
    steps_per_epoch: int
    total_steps: int


def build(config: ml_collections.ConfigDict, workdir: str,
          clock: train_log.PhaseClock | None = None) -> Setup:
    """Checks the config, prepares the data (once), loads the tokenizer, builds the model and
    optimizer (no variables yet: a resume never initialises them)."""
    setup_lib.validate_config(config)
    with (clock or train_log.PhaseClock()).phase("prepare"):
        data = setup_lib.prepared_data(config)
    tokenizer = setup_lib.load_tokenizer(config, data.dataset_dir, Workdir(workdir))
    # Train as the run sees it: without the examples config.exclude_file leaves out.
    steps_per_epoch, total_steps = setup_lib.schedule_lengths(config, len(data.sources["train"]))
    model = setup_lib.make_model(config, len(data.class_names), len(tokenizer))
    tx = setup_lib.make_optimizer(config, model, steps_per_epoch, total_steps)
    weights = setup_lib.class_weights(config, data.class_names, data.train_counts)
    return Setup(data, tokenizer, model, tx, weights, steps_per_epoch, total_steps)


def _warn_config_changes(saved: dict, config) -> None:
    saved = {"rng_scheme": "per_device", **saved}  # what runs recorded before the field drew
    changed = [f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in _RESUME_SENSITIVE
               if k in saved and saved.get(k) != config.get(k)]
    if changed:
        log.warning("resuming with a changed config (%s); the run will not repeat an "
                        "uninterrupted one exactly", "; ".join(changed))


def _initial_state(config, setup: Setup, ckpts, train_iter) -> tuple[steps.TrainState,
                                                                     RunProgress]:
    """The newest readable checkpoint (or ``config.resume_step``; data position included),
    else a fresh state with the pretrained towers (or, with ``init_from``, another run's
    weights). Either way the state reaches the devices in one host-to-device copy."""
    ema = setup_lib.uses_ema(config)
    resume_step = config.resume_step if config.resume_step >= 0 else None
    if ckpts.latest_step() is None and resume_step is None:
        for path in ckpts.start_fresh():
            log.warning("fresh start: set aside %s, left by an earlier run", path)
        variables = setup_lib.init_variables(config, setup.model, log=log.info,
                                            class_names=setup.data.class_names)
        return (setup_lib.replicated_state(setup.model, setup.tx, variables, ema=ema),
                RunProgress(config=config.to_dict()))
    if config.get("init_from"):
        log.info("the workdir has a checkpoint: resuming it (init_from applies to a fresh "
                     "start only)")
    template = setup_lib.host_state_template(config, setup.model, setup.tx)
    host, saved = ckpts.restore(template, train_iter, resume_step)
    progress = RunProgress.from_json(saved)
    step = int(host["step"])
    if progress.status == Status.PREEMPTED:  # Saved on a stop signal: carry on training.
        progress.status = Status.RUNNING
    if progress.status == Status.FINISHED and step < setup.total_steps:
        log.info("continuing a finished run: num_epochs is now %d, %d more epochs to train",
                     config.num_epochs, (setup.total_steps - step) // setup.steps_per_epoch)
        progress.status = Status.RUNNING
    log.info("Resumed from step %d (epoch %d)", step, step // setup.steps_per_epoch)
    _warn_config_changes(progress.config, config)
    progress.config = config.to_dict()
    state = setup_lib.replicated_state(setup.model, setup.tx, host, step, host["opt_state"],
                                      ema=ema)
    return state, progress


def _scalars(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (int, float))}


@jax.jit
def _add_metrics(window, bad, m):
    """Adds a step's metrics to the log window and counts a non-finite loss or gradient: one
    program per step on the devices, nothing fetched."""
    bad = bad + (~jnp.isfinite(m["weighted_ce"]) | ~jnp.isfinite(m["grad_norm"]))
    return (m if window is None else jax.tree.map(jnp.add, window, m)), bad


class _Run:
    """The mutable pieces of one training run, so the loop reads top to bottom.

    The run's position is the train state's step; ``step`` mirrors it on the host (read once
    from the restored state, then advanced with every train step) so the loop never waits on
    the device to know where it is.
    """

    def __init__(self, config, workdir: str, setup: Setup):
        self.config, self.setup = config, setup
        self.workdir = Workdir(workdir)
        self.ckpts = checkpointing.Checkpoints(workdir, config.keep_checkpoints)
        self.writer = train_log.MetricWriter(self.workdir)
        self.train_iter = pipeline.make_train_iter(
            config, setup.data.sources["train"], setup.tokenizer,
            local_batch_size=parallel.local_batch_size(config.batch_size),
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_epochs=config.num_epochs)
        self.state, self.progress = _initial_state(config, setup, self.ckpts, self.train_iter)
        self.step = int(self.state.step)
        self.root_key = parallel.put_replicated(jax.random.PRNGKey(config.seed))
        self.train_fn = setup_lib.train_step_fn(config, setup.class_weights)
        self.validation = scoring.SplitEvaluator(
            config, setup.model, setup.data.class_names, setup.class_weights, setup.tokenizer,
            setup.data.sources["validation"], "validation")
        self.iter_state = None
        self.window, self.bad = None, jnp.zeros(())
        self.window_steps, self.window_start = 0, time.perf_counter()
        self.compile_s = None

    @property
    def epoch(self) -> int:
        """Epochs completed (the loop validates and saves at every epoch end)."""
        return self.step // self.setup.steps_per_epoch

    # -- per step ---------------------------------------------------------------------------
    def train_step(self, batches, clock: train_log.PhaseClock) -> None:
        """One train step on the next batch; the first one's compile time is logged (and the
        wait for the first batch counts as start-up: the input pipeline starting)."""
        first = self.compile_s is None
        with clock.phase("startup" if first else "train"):
            device_batch, self.iter_state = next(batches)
        with clock.phase("compile" if first else "train"):
            t0 = time.perf_counter()
            self.state, m = self.train_fn(self.state, device_batch, self.root_key)
            self.step += 1
            self.add_metrics(m)
            if first:
                jax.block_until_ready(m)
                self.compile_s = time.perf_counter() - t0
                log.info("first step (compile + run): %.1f s", self.compile_s)

    def add_metrics(self, m):
        self.window, self.bad = _add_metrics(self.window, self.bad, m)
        self.window_steps += 1

    def check_finite(self):
        if float(self.bad) > 0:
            last = self.ckpts.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss or gradient before step {self.step}; stopping. The last good "
                f"checkpoint (step {last}) is kept in {self.workdir.path}. Lower the learning "
                f"rates or check the data.")

    def log_train(self, bar):
        self.check_finite()
        w = jax.device_get(self.window)
        elapsed = time.perf_counter() - self.window_start
        values = {"loss": float(w["weighted_ce"] / w["weight"]),
                  "ce": float(w["ce"] / w["count"]),
                  "accuracy": float(w["correct"] / w["count"]),
                  "grad_norm": float(w["grad_norm"] / self.window_steps),
                  "samples_per_s": self.window_steps * self.config.batch_size / elapsed,
                  "epoch": self.step / self.setup.steps_per_epoch,
                  **optim.learning_rates(self.config, self.step, self.setup.total_steps,
                                         self.setup.steps_per_epoch)}
        self.writer.write(self.step, "train", values)
        bar.update(0, loss=f"{values['loss']:.4f}", samples_s=f"{values['samples_per_s']:.0f}")
        self.window, self.window_steps, self.window_start = None, 0, time.perf_counter()

    # -- checkpoints ------------------------------------------------------------------------
    def save(self):
        """Saves the train state and data position. Orbax copies the device arrays to the host
        itself (asynchronously), so nothing is fetched here."""
        self.check_finite()
        s = self.state
        tree = {"step": s.step, "params": s.params, "batch_stats": s.batch_stats,
                "opt_state": s.opt_state}
        if s.ema_params is not None:
            tree["ema_params"] = s.ema_params
        self.ckpts.save(self.step, parallel.global_arrays(tree), self.iter_state,
                        self.progress.to_json())

    def evaluate_epoch(self) -> bool:
        """Validation after an epoch; updates the best model, patience and the history.

        Returns:
          Whether patience ran out (early stopping).
        """
        c, p = self.config, self.progress
        variables = self.state.eval_variables  # The EMA weights when the run keeps them.
        val, _ = self.validation(variables)
        metric = c.early_stopping_metric
        improved = p.record_validation(self.epoch, self.step, metric, _scalars(val))
        if improved:
            self.ckpts.save_best(self.step, parallel.global_arrays(variables), p.to_json())
        self.writer.write(self.step, "val", {**_scalars(val), "epoch": self.epoch})
        log.info("epoch %d: val loss %.4f accuracy %.4f macro-F1 %.4f%s", self.epoch,
                     val["loss"], val["accuracy"], val["macro_f1"], " (best)" if improved else "")
        return c.patience > 0 and p.bad_epochs >= c.patience


def _write_run_record(config, wd: Workdir, setup: Setup, data_record: dict) -> None:
    """config.json (what inference rebuilds the run from), written when the run starts."""
    data = setup.data
    spec = ModelSpec(tuple(data.class_names), model_architecture(setup.model, config),
                     setup_lib.preprocessing(config, data.meta))
    wd.write_record({
        "config": config.to_dict(), "run": train_log.run_info(), "class_names": data.class_names,
        "class_weights": setup.class_weights.tolist(), "num_examples": data.num_examples,
        "steps_per_epoch": setup.steps_per_epoch, "model": spec.to_json(),
        "data": data_record})


@contextlib.contextmanager
def _workdir_lock(workdir: str):
    """Holds the workdir lock (process 0 takes it; every process learns if it failed)."""
    held = lock.WorkdirLock(workdir, owner=jax.process_index() == 0)
    error = None
    try:
        held.acquire()
    except lock.WorkdirLockedError as e:
        error = e
    if parallel.any_process(error is not None):
        raise error or lock.WorkdirLockedError(
            f"{workdir}: process 0 could not lock the workdir (its log names the holder)")
    try:
        yield
    finally:
        held.release()


def _start(config, workdir: str, clock: train_log.PhaseClock) -> "_Run":
    """Builds the run; a resume is checked against the run record before anything is written,
    which is written only when the run starts (or predates run records)."""
    setup = build(config, workdir, clock)
    wd = Workdir(workdir)
    resuming = (checkpointing.available(workdir)["latest"] is not None
                or config.resume_step >= 0)
    data = setup.data.data_record()
    if resuming:
        wd.check_resume(data, config.allow_data_change)
    run = _Run(config, workdir, setup)
    if train_log.is_writer():
        if not resuming or wd.record() is None:
            _write_run_record(config, wd, setup, data)
        wd.keep_tokenizer(setup.tokenizer)
        run.writer.tracker = tracking.for_training(config, workdir)  # None when off
    return run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes training) and validates every epoch.

    Args:
      config: the run's config (see configs/default.py).
      workdir: where checkpoints, metrics and reports go; resumed from when it has a checkpoint.

    Returns:
      The run summary (also written to ``paths.SUMMARY_FILE`` in the workdir); its ``status`` is
      "finished", "early_stopped" or "preempted" (the caller exits with EXIT_PREEMPTED).
    """
    clock = train_log.PhaseClock()
    os.makedirs(workdir, exist_ok=True)
    signals = StopSignals()
    with _workdir_lock(workdir):
        return _train(config, workdir, signals, clock)


def _train(config, workdir: str, signals: StopSignals, clock: train_log.PhaseClock) -> dict:
    """One loop over steps; logging, validation, stopping and saving are periodic actions keyed
    on the step (the save policy is the checkpoint layer's). ``clock`` gets the time of each
    phase (the summary's ``seconds``)."""
    with clock.phase("startup"):
        run = _start(config, workdir, clock)
    setup, spe, p = run.setup, run.setup.steps_per_epoch, run.progress
    batches = parallel.prefetch_to_device(run.train_iter, config.prefetch_batches,
                                          thread=config.get("prefetch_thread", False))
    bar = None
    while p.status == Status.RUNNING and run.step < setup.total_steps:
        bar = bar or train_log.ProgressBar(run.epoch, spe, run.step % spe,
                                           config.get("log_every_seconds", 30.0))
        run.train_step(batches, clock)
        with clock.phase("train"):
            bar.update(1)
            epoch_end = run.step % spe == 0
            if run.step % config.log_every_steps == 0 or epoch_end:
                run.log_train(bar)
            stop = signals.should_stop(run.step, config.signal_check_every_steps)
            if stop or epoch_end:
                bar.close()
                bar = None
        if stop:
            p.status = Status.PREEMPTED
            log.warning("%s received: saving step %d and exiting", signals.received, run.step)
        elif epoch_end:
            with clock.phase("validation"):
                if run.evaluate_epoch():
                    p.status = Status.EARLY_STOPPED
                elif run.step >= setup.total_steps:
                    p.status = Status.FINISHED
        if run.ckpts.should_save(run.step, every=config.checkpoint_every_steps,
                                 epoch_end=epoch_end, stopping=p.status != Status.RUNNING):
            with clock.phase("checkpoints"):
                run.save()
    if bar is not None:
        bar.close()
    with clock.phase("checkpoints"):
        run.ckpts.wait()
    batches.close()  # Stops a prefetch thread before the iterator it draws from.
    run.train_iter.close()  # Stops grain workers and frees their shared memory.
    if (p.status != Status.PREEMPTED and p.best_step is not None
            and run.config.get("calibration", "trusted") != "off"):
        with clock.phase("calibration"):
            _fit_calibration(run)
    summary = _summary(run, run.compile_s, clock)
    run.ckpts.close()
    run.writer.close()
    return summary


def _fit_calibration(run: "_Run") -> None:
    """Temperature scaling of the best checkpoint on validation (``paths.CALIBRATION_FILE``)."""
    variables, step = checkpointing.restore_model(run.workdir.path, "best")
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}}
    record = calibration.fit_on_split(run.validation, parallel.put_replicated(variables), step,
                                      run.config.get("calibration", "trusted"))
    if train_log.is_writer():
        run.workdir.write_calibration(record)
    log.info("calibration: temperature %.3f (%s: %s); validation NLL %.4f -> %.4f, "
             "ECE %.4f -> %.4f", record["temperature"],
             "applied" if record["applied"] else "not applied", record["reason"],
             record["before"]["nll"], record["after"]["nll"], record["before"]["ece"],
             record["after"]["ece"])


@jax.jit
def _abs_sum(params) -> jax.Array:
    """A checksum of the final weights (tests compare runs by it): one program on the device,
    where summing leaf by leaf would compile a program for every distinct shape."""
    return sum(jnp.abs(x.astype(jnp.float32)).sum() for x in jax.tree.leaves(params))


def _summary(run: _Run, compile_s, clock: train_log.PhaseClock) -> dict:
    p = run.progress
    checksum = float(_abs_sum(run.state.params))
    summary = {"status": p.status.value, "step": run.step, "epochs_completed": run.epoch,
               "best_epoch": p.best_epoch, "best_step": p.best_step,
               "best_validation": p.best_validation(),
               "early_stopping_metric": run.config.early_stopping_metric,
               "params_abs_sum": checksum, "compile_seconds": compile_s,
               "workdir": os.path.abspath(run.workdir.path)}
    if train_log.is_writer():
        summary["learning_curves"] = train_log.plot_learning_curves(
            run.workdir, run.config.early_stopping_metric)
    summary["seconds"] = clock.record()
    log.info("time: %s", train_log.format_seconds(summary["seconds"]))
    if train_log.is_writer():
        run.workdir.write_summary(summary)
    return summary
