"""``train_and_evaluate(config, workdir)``: the training loop, its cadence and its hooks.

Per step: one pmapped train step; metrics stay on the devices until a log step. Per epoch: an
exact validation pass, best-model tracking and early stopping. Checkpoints every
``checkpoint_every_steps``, at every epoch end and when SIGTERM/SIGUSR1 arrives; a workdir that
holds a checkpoint resumes from it (data position included), so a killed run loses at most the
steps since the last save and repeats them exactly.
"""

import dataclasses
import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxmm import (
    checkpointing,
    evaluation,
    losses,
    models,
    optim,
    parallel,
    prepare,
    reporting,
    steps,
)
from jaxmm.data import pipeline
from jaxmm.data import tokenizer as tokenizer_lib

# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving: "try again later" (EX_TEMPFAIL).
EXIT_PREEMPTED = 75
# Validation metrics where lower is better; every other metric is maximised.
_LOWER_IS_BETTER = ("loss", "ce")
# Config keys that must not change when a run resumes (the data order and step count hang on
# them); a change is reported, since the user may mean it (e.g. more epochs).
_METRICS = ("macro_f1", "accuracy", "balanced_accuracy", "weighted_f1", "macro_precision",
            "macro_recall", "loss", "ce")
_RESUME_SENSITIVE = ("seed", "batch_size", "num_epochs", "data_dir", "text_source", "image_size",
                     "max_text_length", "num_workers")


class NonFiniteLossError(FloatingPointError):
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
    """Everything a run is built from, before any state is restored."""

    dataset_dir: str
    class_names: list
    num_examples: dict
    tokenizer: object
    sources: dict
    model: object
    state: steps.TrainState
    class_weights: np.ndarray
    steps_per_epoch: int
    total_steps: int


def build(config: ml_collections.ConfigDict) -> Setup:
    """Prepares the data (once), loads the tokenizer, builds the model, optimizer and state."""
    if not config.data_dir:
        raise ValueError("config.data_dir is not set: pass --config.data_dir=/path/to/dataset "
                         "(the folder holding CVPR_2024_dataset_Train, _Val and _Test)")
    parallel.check_batch_size(config.batch_size, "batch_size")
    if config.early_stopping_metric not in _METRICS:
        raise ValueError(f"config.early_stopping_metric={config.early_stopping_metric!r}; "
                         f"choose one of {', '.join(_METRICS)}")
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size")
    dataset_dir = prepare.ensure_prepared(config)
    meta = pipeline.dataset_meta(dataset_dir)
    class_names = list(meta["class_names"])
    tokenizer = tokenizer_lib.get_tokenizer(config, dataset_dir)
    steps_per_epoch = meta["num_examples"]["train"] // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"config.batch_size={config.batch_size} exceeds the "
                         f"{meta['num_examples']['train']} training examples")
    total_steps = steps_per_epoch * config.num_epochs
    model = models.build_model(config.model, len(class_names), len(tokenizer),
                               axis_name=parallel.AXIS_NAME)
    init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    variables = models.init_variables(model, init_key, config.image_size,
                                      config.max_text_length)
    tx = optim.make_optimizer(config, models.param_labels(variables["params"]), total_steps,
                              steps_per_epoch)
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    batch_stats=variables.get("batch_stats", {}), tx=tx)
    weights = losses.resolve_class_weights(config.class_weights, class_names,
                                           meta["counts"]["train"])
    return Setup(dataset_dir, class_names, meta["num_examples"], tokenizer,
                 pipeline.load_splits(dataset_dir), model, state, weights, steps_per_epoch,
                 total_steps)


def _host_state(state: steps.TrainState) -> dict:
    return jax.tree.map(np.asarray, {"step": state.step, "params": state.params,
                                     "batch_stats": state.batch_stats,
                                     "opt_state": state.opt_state})


def _fresh_progress(config) -> dict:
    # Dropout keys are fold_in(PRNGKey(seed), step, device): the seed is the whole rng state.
    return {"epoch": 0, "best_metric": None, "best_epoch": None, "best_step": None,
            "bad_epochs": 0, "history": [], "status": "running", "rng_seed": config.seed,
            "config": config.to_dict()}


def _warn_config_changes(saved: dict, config) -> None:
    changed = [f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in _RESUME_SENSITIVE
               if k in saved and saved.get(k) != config.get(k)]
    if changed:
        logging.warning("resuming with a changed config (%s); the run will not repeat an "
                        "uninterrupted one exactly", "; ".join(changed))


def _restore_or_init(config, setup: Setup, ckpts, train_iter) -> tuple[dict, dict]:
    host = _host_state(setup.state)
    if ckpts.latest_step() is not None:
        host, progress = ckpts.restore(host, train_iter)
        if progress["status"] == "preempted":  # Saved on a stop signal: carry on training.
            progress["status"] = "running"
        logging.info("Resumed from step %d (epoch %d)", int(host["step"]), progress["epoch"])
        _warn_config_changes(progress.get("config", {}), config)
        progress["config"] = config.to_dict()
        return host, progress
    variables = models.pretrained.load_pretrained({"params": host["params"],
                                        "batch_stats": host["batch_stats"]},
                                       config.model, log=logging.info)
    host["params"] = jax.tree.map(np.asarray, variables["params"])
    host["batch_stats"] = jax.tree.map(np.asarray, variables["batch_stats"])
    host["opt_state"] = jax.tree.map(np.asarray, setup.state.tx.init(host["params"]))
    return host, _fresh_progress(config)


def _eval_batches(config, setup: Setup, split: str):
    return pipeline.make_eval_iter(
        config, setup.sources[split], setup.tokenizer,
        local_batch_size=config.eval_batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count())


def _scalars(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (int, float))}


class _Run:
    """The mutable pieces of one training run, so the loop reads top to bottom."""

    def __init__(self, config, workdir, setup: Setup):
        self.config, self.workdir, self.setup = config, workdir, setup
        self.ckpts = checkpointing.Checkpoints(workdir, config.keep_checkpoints)
        self.writer = reporting.MetricWriter(workdir)
        self.train_iter = pipeline.make_train_iter(
            config, setup.sources["train"], setup.tokenizer,
            local_batch_size=config.batch_size // jax.process_count(),
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_epochs=config.num_epochs)
        host, self.progress = _restore_or_init(config, setup, self.ckpts, self.train_iter)
        self.step = int(host["step"])
        self.state = setup.state.replace(**parallel.replicate(host))
        self.root_key = parallel.replicate(np.asarray(jax.random.PRNGKey(config.seed)))
        self.train_fn = jax.pmap(
            functools.partial(steps.train_step, class_weights=setup.class_weights,
                              label_smoothing=config.optim.label_smoothing),
            axis_name=parallel.AXIS_NAME, donate_argnums=(0,))
        self.eval_fn = evaluation.make_eval_fn(setup.model.apply, setup.class_weights,
                                               len(setup.class_names))
        self.iter_state = None
        self.window, self.bad = None, jnp.zeros(())
        self.window_steps, self.window_start = 0, time.perf_counter()

    # -- per step ---------------------------------------------------------------------------
    def add_metrics(self, m):
        m = parallel.first(m)
        self.bad = self.bad + (~jnp.isfinite(m["weighted_ce"]) | ~jnp.isfinite(m["grad_norm"]))
        self.window = m if self.window is None else jax.tree.map(jnp.add, self.window, m)
        self.window_steps += 1

    def check_finite(self):
        if float(self.bad) > 0:
            last = self.ckpts.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss or gradient before step {self.step}; stopping. The last good "
                f"checkpoint (step {last}) is kept in {self.workdir}. Lower the learning rates "
                f"or check the data.")

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
        self.check_finite()
        host = parallel.unreplicate_to_host(
            {"step": self.state.step, "params": self.state.params,
             "batch_stats": self.state.batch_stats, "opt_state": self.state.opt_state})
        self.ckpts.save(self.step, host, self.iter_state, self.progress)

    def evaluate_epoch(self):
        """Validation after an epoch; updates best model, patience and the history."""
        c, p = self.config, self.progress
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        val, _ = evaluation.evaluate_split(self.eval_fn, variables,
                                           _eval_batches(c, self.setup, "validation"),
                                           self.setup.class_names)
        p["epoch"] = self.step // self.setup.steps_per_epoch
        value = val[c.early_stopping_metric]
        sign = -1.0 if c.early_stopping_metric in _LOWER_IS_BETTER else 1.0
        improved = p["best_metric"] is None or sign * value > sign * p["best_metric"]
        if improved:
            p.update(best_metric=value, best_epoch=p["epoch"], best_step=self.step, bad_epochs=0)
            self.ckpts.save_best(self.step, parallel.unreplicate_to_host(variables), dict(p))
        else:
            p["bad_epochs"] += 1
        p["history"].append({"epoch": p["epoch"], "step": self.step, **_scalars(val)})
        self.writer.write(self.step, "val", {**_scalars(val), "epoch": p["epoch"]})
        logging.info("epoch %d: val loss %.4f accuracy %.4f macro-F1 %.4f%s", p["epoch"],
                     val["loss"], val["accuracy"], val["macro_f1"], " (best)" if improved else "")
        return c.patience > 0 and p["bad_epochs"] >= c.patience


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes training) and validates every epoch.

    Args:
      config: the run's config (see configs/default.py).
      workdir: where checkpoints, metrics and reports go; resumed from when it has a checkpoint.

    Returns:
      The run summary (also written to ``workdir/train_summary.json``); its ``status`` is
      "finished", "early_stopped" or "preempted" (the caller exits with EXIT_PREEMPTED).
    """
    os.makedirs(workdir, exist_ok=True)
    signals = StopSignals()
    run = _Run(config, workdir, build(config))
    setup, spe, p = run.setup, run.setup.steps_per_epoch, run.progress
    if reporting.is_writer():
        reporting.write_json(os.path.join(workdir, "config.json"),
                             {"config": config.to_dict(), "run": reporting.run_info(),
                              "class_names": setup.class_names,
                              "class_weights": setup.class_weights.tolist(),
                              "num_examples": setup.num_examples, "steps_per_epoch": spe})
    batches = parallel.prefetch_to_device(run.train_iter, config.prefetch_batches)
    compile_s = None
    while p["status"] == "running" and run.step < setup.total_steps:
        bar = reporting.Progress(run.step // spe, spe, run.step % spe)
        while True:
            device_batch, run.iter_state = next(batches)
            t0 = time.perf_counter()
            run.state, m = run.train_fn(run.state, device_batch, run.root_key)
            run.step += 1
            run.add_metrics(m)
            if compile_s is None:
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t0
                logging.info("first step (compile + run): %.1f s", compile_s)
            bar.update(1)
            if run.step % config.log_every_steps == 0 or run.step % spe == 0:
                run.log_train(bar)
            if signals.should_stop(run.step, config.signal_check_every_steps):
                p["status"] = "preempted"
                break
            if run.step % spe == 0:
                break
            if run.step % config.checkpoint_every_steps == 0:
                run.save()
        bar.close()
        if p["status"] == "preempted":
            logging.warning("%s received: saving step %d and exiting", signals.received, run.step)
            run.save()
            break
        if run.evaluate_epoch():
            p["status"] = "early_stopped"
        elif run.step >= setup.total_steps:
            p["status"] = "finished"
        run.save()
    run.ckpts.wait()
    run.train_iter.close()  # Stops grain workers and frees their shared memory.
    summary = _summary(run, compile_s)
    run.ckpts.close()
    run.writer.close()
    return summary


def _summary(run: _Run, compile_s) -> dict:
    p = run.progress
    params = parallel.unreplicate_to_host(run.state.params)
    checksum = float(sum(np.abs(x.astype(np.float64)).sum() for x in jax.tree.leaves(params)))
    best = next((h for h in p["history"] if h["epoch"] == p["best_epoch"]), None)
    summary = {"status": p["status"], "step": run.step, "epochs_completed": p["epoch"],
               "best_epoch": p["best_epoch"], "best_step": p["best_step"],
               "best_validation": best, "early_stopping_metric": run.config.early_stopping_metric,
               "params_abs_sum": checksum, "compile_seconds": compile_s,
               "workdir": os.path.abspath(run.workdir)}
    if reporting.is_writer():
        summary["learning_curves"] = reporting.plot_learning_curves(
            run.workdir, run.config.early_stopping_metric)
        reporting.write_json(os.path.join(run.workdir, "train_summary.json"), summary)
    return summary
