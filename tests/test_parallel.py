"""pmap helpers: sharding, replication, prefetch with iterator state, and no recompiles."""

import functools
import logging

import jax
import numpy as np
import pytest

from jaxmm import parallel, steps
from tests.test_steps import _batch, _state


class _Counting:
    def __init__(self, n):
        self.i, self.n = 0, n

    def __next__(self):
        if self.i == self.n:
            raise StopIteration
        self.i += 1
        return {"x": np.full((8, 2), self.i, np.float32)}

    def get_state(self):
        return {"i": self.i}


def test_prefetch_keeps_order_and_the_state_after_each_batch():
    seen = [(int(b["x"][0, 0, 0]), s["i"])
            for b, s in parallel.prefetch_to_device(_Counting(5), size=2)]
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]


def test_shard_replicate_and_unreplicate_round_trip():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    rep = parallel.replicate(tree)
    assert rep["a"].shape == (jax.local_device_count(), 2, 3)
    np.testing.assert_array_equal(parallel.unreplicate_to_host(rep)["a"], tree["a"])
    assert parallel.shard({"x": np.zeros((8, 5))})["x"].shape == (4, 2, 5)


def test_batch_size_must_divide_device_count():
    assert parallel.check_batch_size(8) == 8
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        parallel.check_batch_size(10, "eval_batch_size")


def test_train_step_compiles_once(caplog):
    state = _state()
    host = jax.tree.map(np.asarray, {"step": state.step, "params": state.params,
                                     "batch_stats": state.batch_stats,
                                     "opt_state": state.opt_state})
    state = state.replace(**parallel.replicate(host))
    step = jax.pmap(functools.partial(steps.train_step, class_weights=np.ones(3)),
                    axis_name=parallel.AXIS_NAME, donate_argnums=(0,))
    key = parallel.replicate(np.asarray(jax.random.PRNGKey(0)))
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            for i in range(3):
                state, _ = step(state, parallel.shard_to_devices(_batch(16, i)), key)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r for r in caplog.records if "XLA compilation of jit(_fun)" in r.getMessage()
                or "XLA compilation of pmap" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage() for r in compiles]
