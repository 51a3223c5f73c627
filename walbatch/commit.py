"""Group commit: concurrent submitters share one write and one fdatasync.

As leveldb's ``DBImpl::Write``: every committer queues a waiter. If no commit
is running, the arriving thread leads at once, so a lone submitter pays no
thread hand-off. Otherwise it sleeps; the leader takes the queue (up to
``max_group_bytes``), writes it as one frame, fsyncs once, hands each waiter its
first seq (or the shared error) and passes leadership to the next waiter.

Invariant: at most one leader at a time, so frames are written, synced and
handed to ``on_durable`` in seq order.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import Closed
from .log import Log
from .observer import Observers

log = logging.getLogger("walbatch")

_allocate = threading.Lock


class _Waiter:
    __slots__ = ("payload", "count", "decoded", "first_seq", "error", "done", "wake", "alone")

    def __init__(self, payload: bytes, count: int, alone: bool = False,
                 decoded: list[Any] | None = None) -> None:
        self.payload = payload
        self.count = count
        self.decoded = decoded
        self.first_seq = 0
        self.error: BaseException | None = None
        self.done = False
        self.wake: threading.Lock | None = None
        self.alone = alone  # an exclusive() caller: leads by itself, never in a group


def join_decoded(parts: list[list[Any] | None]) -> list[Any] | None:
    """The decoded items of payloads joined into one, or None unless every part has them
    (a payload without them would shift every item after it onto the wrong seq)."""
    if len(parts) == 1:
        return parts[0]
    if any(p is None for p in parts):
        return None
    return list(itertools.chain.from_iterable(parts))  # type: ignore[arg-type]


class GroupCommitter:
    def __init__(
        self,
        log: Log,
        on_durable: Callable[[int, int, bytes, list[Any] | None], None],
        max_group_bytes: int = 4 << 20,
        observers: Observers | None = None,
    ) -> None:
        self.log = log
        self.observers = observers or Observers()
        self.on_durable = on_durable
        self.max_group_bytes = max_group_bytes
        self.groups = 0
        self._mu = threading.Lock()
        self._idle = threading.Condition(self._mu)
        self._queue: deque[_Waiter] = deque()
        self._leading = False
        self._closed = False

    def commit(self, payload: bytes, count: int, decoded: list[Any] | None = None) -> int:
        """Durably append ``count`` items encoded in ``payload``; return the first seq.

        ``decoded``: the same items as the log's reader would decode them, owned by
        nobody else; passed on to ``on_durable`` so delivery need not decode them.
        """
        w = _Waiter(payload, count, decoded=decoded)
        self._join(w)
        if not w.done:
            self._lead()
        if w.error is not None:
            raise w.error
        return w.first_seq

    def exclusive(self, fn: Callable[[], int]) -> int:
        """Run ``fn`` while no commit runs (as a leader would), e.g. to roll the log."""
        w = _Waiter(b"", 0, alone=True)
        self._join(w)
        try:
            with self._mu:
                self._queue.popleft()  # ours: a leader is at the head of the queue
            return fn()
        finally:
            self._pass_lead()

    def _join(self, w: _Waiter) -> None:
        """Queue ``w``; return when it leads, or (a commit) when its group is done."""
        with self._mu:
            if self._closed:
                raise Closed("the batcher is closed; the item was not written")
            self._queue.append(w)
            if self._leading:
                w.wake = _allocate()
                w.wake.acquire()
            else:
                self._leading = True
        if w.wake is not None:
            w.wake.acquire()  # released when our group is done, or when we lead

    def _pass_lead(self) -> None:
        """The leader is done: wake the next waiter to lead, or go idle."""
        with self._mu:
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._leading = False
                self._idle.notify_all()
        if successor is not None:
            assert successor.wake is not None
            successor.wake.release()

    def _lead(self) -> None:
        with self._mu:
            group = [self._queue.popleft()]
            size = len(group[0].payload)
            while (self._queue and not self._queue[0].alone
                   and size + len(self._queue[0].payload) <= self.max_group_bytes):
                w = self._queue.popleft()
                group.append(w)
                size += len(w.payload)
        count = sum(w.count for w in group) if len(group) > 1 else group[0].count
        payload = group[0].payload if len(group) == 1 else b"".join(w.payload for w in group)
        decoded = join_decoded([w.decoded for w in group])
        t0 = time.perf_counter()
        took = -1.0
        try:
            first = self.log.append(payload, count)
            self.log.sync()
        except BaseException as ex:  # every waiter in the group gets the error
            for w in group:
                w.error = ex
        else:
            took = time.perf_counter() - t0
            seq = first
            for w in group:
                w.first_seq = seq
                seq += w.count
            self.groups += 1
            try:
                self.on_durable(first, count, payload, decoded)
            except Exception:
                # The items are durable, so the waiters succeed; the flusher notices
                # the missing frame (its tail is no longer contiguous) and reads the
                # log from disk instead. A raise here must never strand the waiters.
                log.exception("walbatch: on_durable failed; delivery falls back to the log")
        with self._mu:
            for w in group:
                w.done = True
        for w in group[1:]:
            assert w.wake is not None
            w.wake.release()
        if took >= 0:  # after the waiters go, before the next leader: calls stay in seq order
            self.observers.fsynced(took, first, count)
        self._pass_lead()

    def close(self) -> None:
        """Refuse new commits and wait for the running one (and its queue) to finish."""
        with self._mu:
            self._closed = True
            while self._leading:
                self._idle.wait()
