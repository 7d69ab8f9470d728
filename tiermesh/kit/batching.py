"""Dynamic micro-batching: concurrent callers' items are run through a model together.

Each call to `submit` enqueues its items; one worker forms a batch when `max_batch` items are
waiting or the oldest has waited `max_wait_s`, runs it in a worker thread (so the event loop
stays responsive), and resolves every caller's future. While a batch runs, the next one fills,
which is what lets many small concurrent requests share one forward pass.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Histogram

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

BATCH_SIZE = Histogram(
    "tiermesh_batch_size",
    "Items per micro-batch run",
    ["tier"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
BATCH_QUEUE_SECONDS = Histogram(
    "tiermesh_batch_queue_seconds",
    "Time an item waited before its batch started",
    ["tier"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)


@dataclasses.dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued: float


class MicroBatcher(Generic[In, Out]):
    """Batch items from concurrent `submit` calls into calls of `run_batch` (a sync function)."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch: int,
        max_wait_s: float,
        label: str,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._label = label
        self._queue: collections.deque[_Pending[In, Out]] = collections.deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name=f"{self._label}-batcher")

    async def close(self) -> None:
        """Stop the worker; items still queued fail with CancelledError."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while self._queue:
            self._queue.popleft().future.cancel()

    async def submit(self, items: Sequence[In]) -> list[Out]:
        """Run `items` through the model (together with other callers' items) and return outputs."""
        if self._worker is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        pending = [_Pending(item, loop.create_future(), now) for item in items]
        self._queue.extend(pending)
        self._arrived.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except BaseException:
            for p in pending:  # a cancelled caller's items are skipped by the worker
                p.future.cancel()
            raise

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].enqueued + self._max_wait_s
            while len(self._queue) < self._max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch: list[_Pending[In, Out]] = []
            while self._queue and len(batch) < self._max_batch:
                pending = self._queue.popleft()
                if not pending.future.done():
                    batch.append(pending)
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Pending[In, Out]]) -> None:
        started = time.perf_counter()
        BATCH_SIZE.labels(self._label).observe(len(batch))
        for pending in batch:
            BATCH_QUEUE_SECONDS.labels(self._label).observe(started - pending.enqueued)
        try:
            outputs = await asyncio.to_thread(self._run_batch, [p.item for p in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(batch)} inputs")
        except Exception as error:
            logger.exception("%s batch of %d failed", self._label, len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        for pending, output in zip(batch, outputs, strict=True):
            if not pending.future.done():
                pending.future.set_result(output)
