"""Dispatch: how many batches are at the sink at once, and in which order.

With ``flush_concurrency`` 1 a batch is delivered on the flusher thread itself.
Above 1, up to that many batches are delivered at once by a thread pool, with
one rule: batches of one key reach the sink one at a time, in order. While a
key's batch is at the sink its later batches queue behind it (at most
``_MAX_QUEUED_PER_SLOT`` per slot), and the pool thread that delivered it
takes them next.

Ownership: the key queues and the in-flight count are guarded by the delivery
lock (``progress.cv``); the flusher waits on it while every slot is busy.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .batcher import ClosedBatch
from .progress import Progress
from .record import Record
from .sinkcall import Shutdown

log = logging.getLogger("walbatch")

_MAX_QUEUED_PER_SLOT = 4


class Dispatcher:
    def __init__(self, concurrency: int, deliver: Callable[[ClosedBatch[Record]], None],
                 progress: Progress, shutdown: Shutdown) -> None:
        self.slots = concurrency
        self.deliver = deliver
        self.progress = progress
        self.shutdown = shutdown
        self.cv = progress.cv
        # --- guarded by cv
        self.inflight = 0
        self._key_queues: dict[Any, deque[ClosedBatch[Record]]] = {}
        self._queued = 0
        self._pool = (ThreadPoolExecutor(concurrency, thread_name_prefix="walbatch-deliver")
                      if concurrency > 1 else None)
        self._pool_thread = threading.local()  # marks the pool's threads (inside the sink)

    def dispatch(self, closed: ClosedBatch[Record]) -> None:
        """Deliver ``closed`` now (one slot), or hand it to a free pool thread."""
        if self.shutdown.abandoned:
            return  # shutting down: the rest stays in the log
        if self._pool is None:
            self.deliver(closed)
            return
        key = closed.key
        with self.cv:
            while True:
                if self.progress.fatal is not None:
                    raise self.progress.fatal
                if key is not None and key in self._key_queues:
                    if self._queued < _MAX_QUEUED_PER_SLOT * self.slots:
                        self._key_queues[key].append(closed)  # after the key's batch at the sink
                        self._queued += 1
                        return
                elif self.inflight < self.slots:
                    self.inflight += 1
                    if key is not None:
                        self._key_queues[key] = deque()
                    break
                self.cv.wait()
        self._pool.submit(self._deliver_in_pool, closed)

    def _deliver_in_pool(self, first: ClosedBatch[Record]) -> None:
        """Deliver a batch, then the batches of its key that queued up meanwhile, in order."""
        self._pool_thread.active = True
        key = first.key
        closed: ClosedBatch[Record] | None = first
        try:
            while closed is not None:
                if not self.shutdown.abandoned:
                    self.deliver(closed)
                with self.cv:
                    queue = self._key_queues.get(key) if key is not None else None
                    closed = queue.popleft() if queue else None
                    if closed is not None:
                        self._queued -= 1
                    self.cv.notify_all()
        except BaseException as ex:
            log.exception("walbatch delivery failed")
            self.progress.fail(ex)
        finally:
            with self.cv:
                if key is not None:
                    self._queued -= len(self._key_queues.pop(key, ()))
                self.inflight -= 1
                self.cv.notify_all()

    def in_pool_thread(self) -> bool:
        """True on one of the pool's threads (that is, inside the sink)."""
        return getattr(self._pool_thread, "active", False)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
