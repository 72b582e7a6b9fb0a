"""pmap helpers: sharding, the unmapped state, prefetch with iterator state, no recompiles and
no per-step copies."""

import functools
import logging
import time
import types

import jax
import numpy as np
import pytest

from jaxmm.training import parallel, steps
from jaxmm.training import setup as setup_lib
from tests.support import step_batch as _batch
from tests.support import step_state as _state


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


def test_prefetch_in_a_thread_gives_the_same_batches_and_states():
    def run(thread):
        return [(int(b["x"][0, 0, 0]), s["i"])
                for b, s in parallel.prefetch_to_device(_Counting(7), size=2, thread=thread)]

    assert run(True) == run(False) == [(i, i) for i in range(1, 8)]


class _Failing(_Counting):
    def __next__(self):
        if self.i == 3:
            raise ValueError("bad record 3")
        return super().__next__()


def test_prefetch_in_a_thread_raises_the_iterators_error_at_its_batch():
    seen = []
    with pytest.raises(ValueError, match="bad record 3"):
        for b, _ in parallel.prefetch_to_device(_Failing(9), size=2, thread=True):
            seen.append(int(b["x"][0, 0, 0]))
    assert seen == [1, 2, 3]


def test_prefetch_in_a_thread_stops_when_the_consumer_stops():
    source = _Counting(1000)
    batches = parallel.prefetch_to_device(source, size=2, thread=True)
    assert int(next(batches)[0]["x"][0, 0, 0]) == 1
    batches.close()  # as when a training loop breaks out early
    drawn = source.i
    assert drawn <= 1 + 2 + 1  # the one taken, the queue, at most one being placed
    time.sleep(0.3)
    assert source.i == drawn  # the producer thread has stopped drawing


def test_put_replicated_is_one_full_copy_on_every_local_device():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    rep = parallel.put_replicated(tree)
    assert rep["a"].shape == (2, 3) and rep["a"].is_fully_replicated
    assert rep["a"].sharding.device_set == set(jax.local_devices())
    np.testing.assert_array_equal(np.asarray(rep["a"]), tree["a"])
    assert parallel.shard({"x": np.zeros((8, 5))})["x"].shape == (4, 2, 5)


def test_local_batch_size_must_divide_device_count():
    assert parallel.local_batch_size(8) == 8
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        parallel.local_batch_size(10, "eval_batch_size")
    with pytest.raises(ValueError, match="eval_batch_size=0 must be at least 1"):
        parallel.local_batch_size(0, "eval_batch_size")
    assert parallel.local_batch_size(10, round_up=True) == 12


def test_global_arrays_are_one_copy_on_every_device():
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.asarray(7, np.int32)}
    view = parallel.global_arrays(parallel.put_replicated(tree))
    for key, value in tree.items():
        assert view[key].shape == value.shape and view[key].is_fully_replicated
        assert len(view[key].sharding.device_set) == jax.device_count()
        np.testing.assert_array_equal(np.asarray(view[key]), value)


def _loop_state(model_apply=None):
    """A state and step built the way the training loop builds them."""
    state = _state()
    model = types.SimpleNamespace(apply=model_apply or state.apply_fn)
    state = setup_lib.replicated_state(model, state.tx, jax.device_get(state.variables))
    step = parallel.pmap_train_step(
        functools.partial(steps.train_step, class_weights=np.ones(3)))
    return state, step, parallel.put_replicated(jax.random.PRNGKey(0))


def test_the_state_goes_back_into_the_step_without_a_copy():
    """The state a step returns is already where the next step takes it: no host-to-device or
    device-to-device copy of any argument (the guard raises on either); a host state would be
    copied at every call, which the guard catches."""
    state, step, key = _loop_state()
    batches = [parallel.shard_to_devices(_batch(16, i)) for i in range(3)]
    state, _ = step(state, batches[0], key)
    with jax.transfer_guard("disallow"):
        for b in batches[1:]:
            state, m = step(state, b, key)
        jax.block_until_ready((state, m))
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            step(jax.device_get(state), batches[0], key)


def _copies_equal(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return all(np.array_equal(np.asarray(s.data), np.asarray(x.addressable_shards[0].data))
               for x in leaves for s in x.addressable_shards)


def test_per_device_batchnorm_statistics_leave_the_step_equal_on_every_device():
    """pmap does not check that an unmapped output is the same on every device; the step
    pmeans the running averages, so per-device statistics (no BatchNorm axis) still leave it
    as one value. The check itself tells differing copies apart."""
    from tests.support import StandIn

    state, step, key = _loop_state(StandIn(axis_name=None).apply)
    for i in range(2):
        state, m = step(state, parallel.shard_to_devices(_batch(16, i)), key)
    assert _copies_equal((state.params, state.batch_stats, state.opt_state, m))
    differing = jax.pmap(lambda x: jax.lax.axis_index(parallel.AXIS_NAME) + x,
                         parallel.AXIS_NAME, out_axes=None)(np.zeros(jax.local_device_count()))
    assert not _copies_equal(differing)


def test_train_step_compiles_once(caplog):
    # The state is built the way the training loop builds it (optimizer state made on device).
    state, step, key = _loop_state()
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
