"""Grain input pipelines over the prepared TFDS ArrayRecord dataset.

Train: a per-epoch shuffle derived from the seed (``shuffle`` then ``repeat``, so epochs never mix),
the first ``steps * global_batch`` examples of each epoch split across JAX processes so that every
global batch comes from one epoch, random-resized crop + flip (+ colour jitter) with per-example
randomness fixed by (seed, position) -- hence independent of the worker count -- and one tokenizer
call per batch. The iterator state is a position, so orbax restores it exactly.

Eval: every example once, in split order, centre-cropped; the padded tail carries ``mask=False``
and ``index=-1`` so each process yields the same number of batches.
"""

import math
import os
import sys

import grain
import numpy as np

from jaxmm.data import transforms
from jaxmm.errors import ConfigError

SPLITS = ("train", "validation", "test")


def load_splits(dataset_dir: str, splits=SPLITS) -> dict:
    """Opens the prepared splits as random-access sources (images left encoded).

    Args:
      dataset_dir: the TFDS dataset directory returned by prepared.ensure_prepared.
      splits: the splits to open (evaluation opens one, so the others' files may be absent).

    Returns:
      split name -> source with ``len`` and ``[i]`` giving dict(image=bytes, text=bytes,
      label=int, file_name=bytes). Decoding happens in the pipeline's workers.
    """
    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(dataset_dir)
    skip = {"image": tfds.decode.SkipDecoding()}
    return {s: b.as_data_source(s, decoders=skip) for s in splits if s in b.info.splits}


def num_eval_batches(n: int, local_batch_size: int, process_count: int) -> int:
    """Eval batches every process yields for a split of n examples."""
    return max(1, math.ceil(n / (local_batch_size * process_count)))


# Batching comes before `to_iter_dataset`, so a worker's slice is a set of whole batches and the
# output does not depend on the worker count. Each element read is therefore a whole batch, decoded
# and augmented by one read thread, and the read-ahead below counts batches, not records.
IN_PROCESS_THREADS = 4  # PIL decodes and resizes without the GIL: threads share the cores
WORKER_THREADS = 1  # processes give the parallelism; more threads per worker only add switching
BATCHES_AHEAD_PER_THREAD = 2  # bounds host memory: a batch of 256 224-px images is 38.5 MB
WORKER_QUEUE = 2  # batches a worker may hand over before the main process takes one
# Thread pools a worker must not start: it decodes on one thread, and N workers share the cores.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def _read_options(num_workers: int) -> grain.ReadOptions:
    threads = WORKER_THREADS if num_workers else IN_PROCESS_THREADS
    return grain.ReadOptions(num_threads=threads,
                             prefetch_buffer_size=threads * BATCHES_AHEAD_PER_THREAD)


def init_worker(worker_index: int, worker_count: int) -> None:
    """Runs first in every grain worker: one thread per library, and JAX kept off accelerators.

    Grain imports JAX in its workers. Should anything there initialise a JAX backend, it must be
    the CPU: a GPU backend would start CUDA and reserve device memory in every worker.
    """
    del worker_index, worker_count  # every worker is set up alike
    os.environ.update(_WORKER_ENV)
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.config.update("jax_platforms", "cpu")


def _finish(ds: grain.MapDataset, num_workers: int, tokenize: transforms.TokenizeBatch):
    it_ds = ds.to_iter_dataset(_read_options(num_workers))
    if num_workers > 0:
        options = grain.MultiprocessingOptions(num_workers=num_workers,
                                               per_worker_buffer_size=WORKER_QUEUE)
        it_ds = it_ds.mp_prefetch(options, worker_init_fn=init_worker)
    # Tokenising after the worker hop keeps transformers out of the workers (seconds of start-up
    # each) and costs < 1 ms per batch here; the map is stateless, so checkpoints are unchanged.
    return iter(it_ds.map(tokenize))


def make_train_iter(config, source, tokenizer, *, local_batch_size: int, process_index: int,
                    process_count: int, num_epochs: int):
    """Training iterator of this process's share of each global batch.

    Args:
      config: ConfigDict with seed, image_size, max_text_length, color_jitter, num_workers.
      source: the train source from load_splits.
      tokenizer: a fast tokenizer.
      local_batch_size: examples per batch on this process (global batch / process_count).
      process_index: this process (jax.process_index()).
      process_count: number of processes (jax.process_count()).
      num_epochs: epochs to yield.

    Returns:
      A grain DatasetIterator of dict(image=uint8 [B,S,S,3], input_ids=int32 [B,L],
      attention_mask=int32 [B,L], label=int32 [B]); len(source) // global batch steps per epoch.

    Raises:
      ValueError: when the split is smaller than one global batch.
    """
    global_batch = local_batch_size * process_count
    steps = len(source) // global_batch
    if steps == 0:
        raise ConfigError(f"train split has {len(source)} examples, fewer than the global batch "
                          f"{global_batch}")
    ds = grain.MapDataset.source(source).seed(config.seed).shuffle()
    # Slices of a shuffled dataset keep the epoch in the index, so each epoch is reshuffled.
    ds = ds[: steps * global_batch].repeat(num_epochs)
    # Augmentation is drawn per global position, before the split between processes, so an
    # example gets the same crop and flip however many processes share the batch.
    ds = ds.random_map(transforms.TrainTransform(config.image_size,
                                                 config.get("color_jitter", 0.0)))
    ds = ProcessBlock(ds, local_batch_size, process_index, process_count)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    return _finish(ds, config.get("num_workers", 0),
                   transforms.TokenizeBatch(tokenizer, config.max_text_length))


class ProcessBlock(grain.MapDataset):
    """This process's contiguous block of every global batch.

    Process p takes positions [p*B, (p+1)*B) of each global batch of P*B positions, so device d
    of the job (process-major order) sees the same examples, in the same order, as device d of a
    single-process run on the same devices, and ``axis_index * rows + row`` on a device is the
    example's position in the global batch: the per-example dropout keys
    (``steps.dropout_key_and_ids``) fall on the same examples whatever the layout, and a
    multi-process run repeats a single-process one.
    """

    def __init__(self, parent: grain.MapDataset, local_batch_size: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._b, self._p, self._n = local_batch_size, process_index, process_count
        self._length = len(parent) // process_count

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        epoch, i = divmod(index, self._length)
        batch, offset = divmod(i, self._b)
        return epoch * len(self._parent) + (batch * self._n + self._p) * self._b + offset

    def __getitem__(self, index: int):
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessBlock(batch={self._b}, process={self._p}/{self._n})"


class PaddedSource:
    """A source padded to `length` records; each record gains ``index`` and ``mask``.

    Padding records repeat record 0 (so shapes match) with index -1 and mask False.
    """

    def __init__(self, source, length: int):
        self._source = source
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> dict:
        n = len(self._source)
        record = dict(self._source[i if i < n else 0])
        record["index"] = np.int32(i if i < n else -1)
        record["mask"] = np.bool_(i < n)
        return record


def make_eval_iter(config, source, tokenizer, *, local_batch_size: int, process_index: int,
                   process_count: int):
    """Evaluation iterator: each example exactly once across processes, no augmentation.

    Args:
      config: ConfigDict with image_size, max_text_length.
      source: a split source from load_splits.
      tokenizer: a fast tokenizer.
      local_batch_size: examples per batch on this process.
      process_index: this process.
      process_count: number of processes.

    Returns:
      An iterator of num_eval_batches(len(source), local_batch_size, process_count) batches of
      dict(image, input_ids, attention_mask, label, mask=bool [B], index=int32 [B]).
    """
    batches = num_eval_batches(len(source), local_batch_size, process_count)
    padded = PaddedSource(source, batches * local_batch_size * process_count)
    ds = grain.MapDataset.source(padded)[process_index::process_count]
    ds = ds.map(transforms.EvalTransform(config.image_size))
    ds = ds.batch(local_batch_size, drop_remainder=False)
    # Evaluation runs in-process: it is short, and workers would cost start-up time each call.
    return _finish(ds, 0, transforms.TokenizeBatch(tokenizer, config.max_text_length))
