"""Resident models behind bounded queues: one :class:`ModelSlot` per loaded model, whatever its family.

A slot runs at most ``concurrency`` jobs at once on its own threads and lets at most ``max_queue`` more
wait; beyond that :meth:`ModelSlot.submit` raises :class:`QueueFull` (HTTP 503). Every job gets a
``threading.Event`` to poll: setting it (client gone) stops the job and frees its place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import Cancelled

M = TypeVar("M")
R = TypeVar("R")
Progress = Callable[[int, int], None]
JobFunction = Callable[[M, threading.Event, Progress], R]


class QueueFull(Exception):
    """The slot's queue is full; ``retry_after`` estimates the seconds until a place frees."""

    def __init__(self, name: str, retry_after: int) -> None:
        super().__init__(f"model {name!r} is busy: its queue is full, retry in about {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job(Generic[R]):
    """A submitted job: its result future, cancel event and latest progress ``(done, total)``."""

    future: asyncio.Future[R]
    cancel: threading.Event
    started: threading.Event
    _progress: list[int]

    @property
    def progress(self) -> tuple[int, int]:
        return self._progress[0], self._progress[1]

    def abort(self) -> None:
        """Stop the job: dropped if still queued, interrupted at its next check if running."""
        self.cancel.set()
        self.future.cancel()


class ModelSlot(Generic[M]):
    """One resident model (``kind`` e.g. ``"segmentation"``) with a bounded queue and a thread pool."""

    def __init__(self, name: str, kind: str, model: M, concurrency: int = 1, max_queue: int = 4) -> None:
        if concurrency < 1 or max_queue < 0:
            raise ValueError("concurrency must be >= 1 and max_queue >= 0")
        self.name, self.kind, self.model = name, kind, model
        self.concurrency, self.max_queue = concurrency, max_queue
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix=f"voxtext-{name}")
        self._lock = threading.Lock()
        self._running = self._pending = 0
        self._counts = {"completed": 0, "failed": 0, "cancelled": 0}
        self._rejected = 0  # refused with QueueFull (503), never queued
        self._seconds = 0.0

    def submit(self, function: JobFunction[M, R]) -> Job[R]:
        """Queue ``function(model, cancel, progress)``; raises :class:`QueueFull` when no place is left."""
        with self._lock:
            if self._pending >= self.concurrency + self.max_queue:
                self._rejected += 1
                raise QueueFull(self.name, self._retry_after())
            self._pending += 1
        cancel, started, progress = threading.Event(), threading.Event(), [0, 0]

        def report(done: int, total: int) -> None:
            progress[:] = done, total

        def run() -> R:
            with self._lock:
                self._running += 1
            started.set()
            t0 = time.perf_counter()
            try:
                return function(self.model, cancel, report)
            finally:
                with self._lock:
                    self._running -= 1
                    self._seconds += time.perf_counter() - t0

        future = self._pool.submit(run)
        future.add_done_callback(self._finished)
        return Job(asyncio.wrap_future(future), cancel, started, progress)

    def _finished(self, future: concurrent.futures.Future) -> None:
        error = None if future.cancelled() else future.exception()
        outcome = "cancelled" if future.cancelled() or isinstance(error, Cancelled) else \
            "failed" if error else "completed"
        with self._lock:
            self._pending -= 1
            self._counts[outcome] += 1

    def _retry_after(self) -> int:
        done = sum(self._counts.values())
        mean = self._seconds / done if done else 10.0
        return max(1, round(mean * self._pending / self.concurrency))

    def status(self) -> dict[str, Any]:
        """Name, kind, limits, the current load and the outcome counts of this slot (``rejected``: 503s)."""
        with self._lock:
            return {"name": self.name, "kind": self.kind, "concurrency": self.concurrency,
                    "max_queue": self.max_queue, "running": self._running,
                    "queued": self._pending - self._running, **self._counts, "rejected": self._rejected}

    def close(self) -> None:
        """Drop queued jobs and wait for running ones."""
        self._pool.shutdown(wait=True, cancel_futures=True)
