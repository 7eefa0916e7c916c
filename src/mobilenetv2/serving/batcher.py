"""Dynamic batching: requests that arrive together are run as one batch, up to `max_batch` images or until the
oldest has waited `max_delay_s`. The queue is bounded (a full queue refuses at once, so a client can retry
elsewhere); the model runs in one worker thread, so the event loop keeps answering health checks and metrics."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class QueueFull(Exception):
    """More images are waiting than the queue holds."""


class Stopped(Exception):
    """The server is shutting down and takes no new work."""


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    timing: object = None  # a statistics.Timing whose queue_ns and infer_ns the batcher fills, or None
    queued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """`await submit(images)` -> the model's outputs for those images, run batched with whatever else is waiting.
    `observe(batch_size, queued_images)` is called for every batch run (metrics), `executed(batch_size, ns)` after
    it with the model's time (statistics)."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch: int, max_delay_s: float,
                 max_queue: int, observe: Callable[[int, int], None] = lambda size, queued: None,
                 executed: Callable[[int, int], None] = lambda size, ns: None):
        self.forward, self.max_batch, self.max_delay_s, self.max_queue = forward, max_batch, max_delay_s, max_queue
        self.observe, self.executed = observe, executed
        self.queued_images = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._stopping = False
        self._busy = False  # a batch is running or its results are being handed out

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, images: np.ndarray, timing=None) -> np.ndarray:
        if self._stopping:
            raise Stopped("the server is shutting down")
        if len(images) > self.max_batch:
            raise ValueError(f"{len(images)} images in one request; this server batches at most {self.max_batch}")
        if self.queued_images + len(images) > self.max_queue:
            raise QueueFull(f"{self.queued_images} images are waiting (the queue holds {self.max_queue})")
        pending = _Pending(images, asyncio.get_running_loop().create_future(), timing)
        self.queued_images += len(images)
        self._queue.put_nowait(pending)
        return await pending.future

    async def _next_batch(self) -> list[_Pending]:
        first = await self._queue.get()
        batch, count = [first], len(first.images)
        deadline = first.queued_at + self.max_delay_s
        while count < self.max_batch:
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if count + len(item.images) > self.max_batch:  # it leads the next batch instead
                self._requeue_front(item)
                break
            batch.append(item)
            count += len(item.images)
        return batch

    def _requeue_front(self, item: _Pending) -> None:
        rest = [item]
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
        for pending in rest:
            self._queue.put_nowait(pending)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            images = np.concatenate([pending.images for pending in batch])
            self._busy = True
            self.queued_images -= len(images)
            self.observe(len(images), self.queued_images)
            started = time.perf_counter()
            for pending in batch:
                if pending.timing is not None:
                    pending.timing.queue_ns = int((started - pending.queued_at) * 1e9)
            try:
                outputs = await loop.run_in_executor(self._worker, self.forward, images)
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request, the loop goes on
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                self._busy = False
                continue
            infer_ns = int((time.perf_counter() - started) * 1e9)
            self.executed(len(images), infer_ns)
            start = 0
            for pending in batch:
                if pending.timing is not None:
                    pending.timing.infer_ns = infer_ns
                end = start + len(pending.images)
                if not pending.future.done():  # a request that timed out no longer waits
                    pending.future.set_result(outputs[start:end])
                start = end
            self._busy = False

    async def drain(self, timeout_s: float) -> None:
        """Take no new work; let what is queued finish (up to `timeout_s`), then stop."""
        self._stopping = True
        deadline = time.perf_counter() + timeout_s
        while (self.queued_images > 0 or self._busy) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
        self._worker.shutdown(wait=True, cancel_futures=False)
