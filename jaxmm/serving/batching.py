"""Micro-batching: concurrent requests gathered into one device batch.

A batch starts with the oldest waiting item and closes when it holds ``max_batch`` items, or
when that item has waited ``max_wait`` seconds and no item announced with ``expect`` (accepted,
still being decoded) could still join it; the announced items are waited for at most
``HOLD_FACTOR`` times ``max_wait``. Without that, a server whose decoding is the bottleneck
would see items one by one and run many tiny batches, each costing nearly as much device
time as a full one. The batch then runs on the one device thread while new items keep
arriving. Items wait in a bounded queue: a full queue refuses at
once (the server answers 503 with Retry-After) rather than growing without end. Every result
goes back to the future of its own item.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import time

HOLD_FACTOR = 10  # items being decoded are waited for at most this many times max_wait


class QueueFull(Exception):
    """The queue holds ``max_queue`` items already."""


@dataclasses.dataclass
class _Item:
    value: object
    future: asyncio.Future
    since: float


class MicroBatcher:
    """Gathers items submitted from the event loop and runs them in batches.

    Args:
      run_batch: a function from a list of items to a list of results (same order); it runs on
        a dedicated thread, one batch at a time.
      max_batch: the most items per batch.
      max_wait: seconds the oldest item may wait for others.
      max_queue: the most items waiting (not counting the batch that runs).
      on_batch: optional callback with each batch's size (metrics).
    """

    def __init__(self, run_batch, max_batch: int, max_wait: float, max_queue: int,
                 on_batch=None):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait
        self.max_queue, self.on_batch = max_queue, on_batch
        self.batches = 0
        self.incoming = 0  # announced items not yet submitted (being decoded)
        self._items: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device")
        self._task = None

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._items)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Runs what is queued, then stops."""
        while self._items:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._device.shutdown(wait=True)

    def expect(self, count: int) -> None:
        """Announces ``count`` items that will be submitted (or ``cancel``led) soon."""
        self.incoming += count

    def cancel(self, count: int = 1) -> None:
        """Withdraws announced items that will not come (their request failed)."""
        self.incoming -= count
        self._arrived.set()

    async def submit(self, value, expected: bool = False):
        """The result of one item, once its batch has run.

        Args:
          value: the item.
          expected: it was announced with ``expect``.

        Raises:
          QueueFull: the queue is full (nothing was queued).
        """
        if expected:
            self.incoming -= 1
        if len(self._items) >= self.max_queue:
            self._arrived.set()
            raise QueueFull()
        future = asyncio.get_running_loop().create_future()
        self._items.append(_Item(value, future, time.monotonic()))
        self._arrived.set()
        return await future

    async def run_alone(self, fn, *args):
        """Runs one call on the device thread between batches (explanations)."""
        return await asyncio.get_running_loop().run_in_executor(self._device, fn, *args)

    async def _gather(self) -> list[_Item]:
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        since = self._items[0].since
        while len(self._items) < self.max_batch:
            now = time.monotonic()
            left = since + self.max_wait - now
            if left <= 0 and self.incoming > 0:
                left = since + HOLD_FACTOR * self.max_wait - now
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        return [self._items.popleft() for _ in range(min(self.max_batch, len(self._items)))]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(
                    self._device, self.run_batch, [item.value for item in batch])
            except Exception as e:  # noqa: BLE001 -- every waiting request gets the failure
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():  # the client may have gone away
                    item.future.set_result(result)
