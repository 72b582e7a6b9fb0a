"""Everything that knows about ``jax.pmap``: the axis name, batch sharding, device prefetch,
placing the state on the devices and multi-process start-up.

The batch is mapped over the devices (a leading device axis); the train state, the evaluated
variables, the root key and the psummed metrics are not: pmap takes and returns them unmapped
(``in_axes=None``, ``out_axes=None``) as arrays of their own shape with one full copy on every
device (a replicated ``NamedSharding``), as flax's ImageNet example does. A state placed so
(``put_replicated``) or returned by a step goes back into the next step without a copy;
host arrays would be copied to every device at every call. pmap does not check that an
unmapped output really is equal on every device: the steps make sure of it (everything they
return is psummed or pmeaned, or computed from psummed values).

Keeping this in one module means a later move to ``jit`` + ``NamedSharding`` stays local.
"""

import collections
import logging
import os
import queue as queue_lib
import threading
from collections.abc import Iterator

import jax
import numpy as np

from jaxmm.errors import ConfigError

log = logging.getLogger("jaxmm")

# The one axis name used by pmap, BatchNorm and every collective.
AXIS_NAME = "batch"


def _launched_multiprocess() -> bool:
    """True when this process is one of several (an srun step, or explicit JAX_* variables)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    # Inside an srun step with more than one task; a bare sbatch shell is not enough.
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1 \
        and "SLURM_STEP_ID" in os.environ


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """Calls ``jax.distributed.initialize`` when the launch has several processes.

    Must run before anything touches a JAX device. Explicit arguments (or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables) win;
    otherwise JAX auto-detects a Slurm ``srun`` step. CPU runs use gloo collectives.

    Args:
      coordinator_address: "host:port" of process 0, or "" to auto-detect.
      num_processes: total number of processes, or 0 to auto-detect.
      process_id: this process's index, or -1 to auto-detect.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if not (coordinator_address or _launched_multiprocess()):
        return
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms == "cpu" or (not platforms and not _has_gpu_env()):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _has_gpu_env() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("SLURM_JOB_GPUS")
                or os.environ.get("SLURM_GPUS_ON_NODE"))


# Safe on every GPU run: overlaps the gradient psum and synchronised-BatchNorm collectives with
# compute on several GPUs (a no-op on one). NVIDIA's JAX containers enable it by default.
_GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def configure_xla(compilation_cache_dir: str = "") -> None:
    """Adds GPU XLA flags the user has not set and turns on the persistent compilation cache.

    Call before the first device is touched. A requeued Slurm job then reuses the compiled step
    instead of compiling again (minutes for the full model).

    Args:
      compilation_cache_dir: folder for compiled executables; "" leaves the cache off unless
        JAX_COMPILATION_CACHE_DIR is set.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in _GPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    if compilation_cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)


def local_batch_size(global_batch: int, name: str = "batch_size", *,
                     round_up: bool = False) -> int:
    """The per-process share of a global batch, which must split evenly over all devices.

    Args:
      global_batch: the global batch size from the config.
      name: the config key, for the error message.
      round_up: round ``global_batch`` up to the next multiple of the device count instead of
        refusing it (evaluation, where padding is masked, on a machine the run was not
        configured for).

    Returns:
      (global batch, rounded up if asked) // jax.process_count().
    """
    devices = jax.device_count()
    if global_batch < 1:
        raise ConfigError(f"config.{name}={global_batch} must be at least 1")
    if round_up:
        global_batch = -(-global_batch // devices) * devices
    elif global_batch % devices:
        raise ConfigError(f"config.{name}={global_batch} is not divisible by the {devices} devices "
                          f"of this run; choose a multiple of {devices}")
    return global_batch // jax.process_count()


def pmap_train_step(step_fn, devices=None):
    """``step_fn(state, batch, key) -> (state, metrics)`` pmapped over the batch only.

    The state (donated), the root key, the returned state and the psummed metrics are unmapped.

    Args:
      step_fn: the train step with its constants bound.
      devices: the devices to map over (None = all local devices; tests compare 1 with 4).
    """
    return jax.pmap(step_fn, axis_name=AXIS_NAME, in_axes=(None, 0, None),
                    out_axes=(None, None), donate_argnums=(0,), devices=devices)


def pmap_eval_step(step_fn):
    """``step_fn(variables, batch, modality_mask) -> (sums, confusion, probs)`` pmapped over
    the batch; the variables and the mask are unmapped, so are the psummed sums and confusion
    matrix; the probabilities keep the device axis."""
    return jax.pmap(step_fn, axis_name=AXIS_NAME, in_axes=(None, 0, None),
                    out_axes=(None, None, 0))


def _replicated_sharding() -> jax.sharding.NamedSharding:
    """One full copy on every local device: the sharding of pmap's unmapped arguments."""
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS_NAME,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def put_replicated(tree):
    """Copies a host pytree onto every local device once, as the steps take it (no device
    axis); a state placed so enters the pmapped steps without another copy."""
    return jax.device_put(jax.tree.map(np.asarray, tree), _replicated_sharding())


def init_replicated(init_fn):
    """``init_fn(tree)`` (e.g. an optimizer's init) compiled to run on the devices, its result
    placed like ``put_replicated``'s."""
    return jax.jit(init_fn, out_shardings=_replicated_sharding())


def shard(batch: dict) -> dict:
    """Reshapes host arrays [B, ...] to [local_devices, B / local_devices, ...]."""
    n = jax.local_device_count()
    return jax.tree.map(lambda x: np.asarray(x).reshape((n, -1) + np.shape(x)[1:]), batch)


def _device_axis_sharding() -> jax.sharding.NamedSharding:
    """Splits a leading axis over the local devices, in the order pmap uses.

    It matches the sharding of pmap's own outputs (same devices, same axis name), so a state
    fed back into the step does not look new to pmap's cache and trigger a second compile.
    """
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS_NAME,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))


def shard_to_devices(batch: dict) -> dict:
    """Splits a host batch over the local devices and transfers it."""
    return jax.device_put(shard(batch), _device_axis_sharding())


def prefetch_to_device(iterator: Iterator, size: int = 2, *,
                       thread: bool = False) -> Iterator[tuple[dict, object]]:
    """Places batches on the local devices ``size`` steps ahead of the train step.

    Yields (device_batch, iterator_state) where ``iterator_state`` is the grain iterator state
    right after that batch was drawn: saving it (not the live iterator, which has run ahead)
    makes resume exact.

    Args:
      iterator: a grain DatasetIterator yielding host batches.
      size: how many batches to keep in flight.
      thread: draw and transfer the batches in a background thread, so that taking a batch out
        of grain and its host-to-device copy overlap with the dispatch of the steps (same
        batches and states, in the same order). An exception of the iterator reaches the caller
        at the batch where it happened.
    """
    if thread:
        yield from _prefetch_in_thread(iterator, max(size, 1))
        return
    queue = collections.deque()

    def enqueue():
        batch = next(iterator)
        queue.append((shard_to_devices(batch), iterator.get_state()))

    try:
        for _ in range(max(size, 1)):
            enqueue()
    except StopIteration:
        pass
    while queue:
        item = queue.popleft()
        try:
            enqueue()
        except StopIteration:
            pass
        yield item


_END = object()


def _prefetch_in_thread(iterator: Iterator, size: int) -> Iterator[tuple[dict, object]]:
    """prefetch_to_device(thread=True): one producer thread, a queue of ``size`` batches."""
    items = queue_lib.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue_lib.Full:
                continue
        return False

    def produce():
        try:
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                if not put((shard_to_devices(batch), iterator.get_state())):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)

    producer = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
    producer.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped early or is done: release the producer
        stop.set()
        producer.join(timeout=10)


def global_arrays(tree):
    """Device arrays of the state (``put_replicated`` or returned by a step) as global arrays
    replicated over every device of every process, for orbax; no data is copied.

    With one process they are that already. With several, pmap returns each process's arrays
    on its own devices; their shards make the global array.
    """
    if jax.process_count() == 1:
        return tree
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (AXIS_NAME,))
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
        x.shape, everywhere, [s.data for s in x.addressable_shards]), tree)


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    return bool(np.asarray(flags).any())
