"""Delivery progress: which seqs are complete, the totals, and waiting for them.

A seq is *complete* once it is delivered or durably dead-lettered. Batches may
complete in any order (``flush_concurrency`` > 1, keyed batches), so completed
runs of seqs are kept until the prefix before them is complete too;
``done_through`` is the end of that contiguous prefix, and only it may become
the checkpoint (``Checkpointer``).

Ownership: every field of ``Progress`` is guarded by ``cv``, the delivery lock
that the intake, the dispatcher and the flusher loop share (a single lock, so
the flusher can wait for "new frames, a completion, a flush request or stop"
on one condition). ``Checkpointer``'s own fields belong to the flusher thread.

Invariant: ``done_through`` only moves forward, over seqs that are complete.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .batcher import REASONS
from .checkpoint import Checkpoint
from .errors import Closed, DeadLettered, ResultDropped
from .log import Log
from .record import Record

log = logging.getLogger("walbatch")

# Past this many dead seqs, Progress stops remembering their errors in memory and
# wait_seq asks the dead-letter store instead.
MAX_REMEMBERED_DEAD = 100_000
# Per-item results (a sink's values) wait in memory until a Receipt collects them;
# past this many uncollected, the oldest are dropped (ResultDropped for their waiters).
MAX_RESULTS = 100_000

_NO_RESULT = object()


class Progress:
    def __init__(self, cp: Checkpoint, cv: threading.Condition, exited: threading.Event,
                 dead_error: Callable[[int], str | None]) -> None:
        self.cv = cv
        self.exited = exited
        """Set when the flusher thread has ended: nothing more will complete."""
        self._dead_error = dead_error  # the store's answer past MAX_REMEMBERED_DEAD
        self.done_through = cp.seq
        self.delivered_total = cp.delivered
        self.dead_total = cp.dead_lettered
        self._completed: dict[int, tuple[int, int, int]] = {}  # first -> (last, delivered, dead)
        self.delivered_above = 0  # completed past done_through
        self.dead_above = 0
        self.dead_seqs: dict[int, str] = {}
        self.persisted = cp
        """The checkpoint last made durable."""
        self.batches_by_reason = dict.fromkeys(REASONS, 0)
        self.retries = 0
        self.coalesced = 0
        self.last_error: str | None = None
        self.fatal: BaseException | None = None
        """Why delivery stopped for good (CorruptLog, a flusher bug); raised to waiters."""
        self.flush_target = 0
        self.flush_waiters = 0
        self.results: dict[int, Any] = {}
        """Per-item values a sink returned, until a waiter collects them (memory only)."""
        self._results_dropped_through = 0
        self._async_waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    # ---------------------------------------------------------- completing

    def complete_range(self, first: int, last: int, delivered: int, dead_n: int) -> None:
        """Complete seqs ``first..last`` (e.g. lost to quarantined damage)."""
        with self.cv:
            self._completed[first] = (last, delivered, dead_n)
            self._advance(delivered, dead_n, {})

    def complete_records(self, records: list[Record], dead: dict[int, str],
                         results: dict[int, Any] | None = None) -> None:
        """Complete a delivered batch: every record not in ``dead`` was taken.

        ``results`` holds the sink's per-item values (seq -> value), for waiters.

        A keyed batch's seqs interleave with other keys', so it completes one run of
        consecutive seqs at a time; an unkeyed batch is a single run.
        """
        first, last = records[0].seq, records[-1].seq
        runs = ([(first, last)] if last - first + 1 == len(records)
                else runs_of(r.seq for r in records))
        with self.cv:
            if results:
                self._keep_results(results)
            for a, b in runs:
                x = len(dead) if len(runs) == 1 else sum(1 for s in dead if a <= s <= b)
                self._completed[a] = (b, b - a + 1 - x, x)
            self._advance(len(records) - len(dead), len(dead), dead)
            if self._async_waiters:
                self._wake_async(runs)

    def _keep_results(self, results: dict[int, Any]) -> None:
        """(Holding cv.) Store results for their waiters, dropping the oldest past the cap."""
        self.results.update(results)
        over = len(self.results) - MAX_RESULTS
        if over > 0:
            for seq in list(self.results)[:over]:  # dicts keep insertion order: oldest first
                del self.results[seq]
                self._results_dropped_through = max(self._results_dropped_through, seq)

    def _advance(self, delivered: int, dead_n: int, dead: dict[int, str]) -> None:
        """Move done_through over the contiguous prefix of completed runs (holding cv)."""
        if len(self.dead_seqs) < MAX_REMEMBERED_DEAD:
            self.dead_seqs.update(dead)
        self.delivered_above += delivered
        self.dead_above += dead_n
        while self.done_through + 1 in self._completed:
            end, d, x = self._completed.pop(self.done_through + 1)
            self.done_through = end
            self.delivered_total += d
            self.dead_total += x
            self.delivered_above -= d
            self.dead_above -= x
        self.cv.notify_all()

    def count_batch(self, reason: str) -> None:
        with self.cv:
            self.batches_by_reason[reason] = self.batches_by_reason.get(reason, 0) + 1

    def failed_attempt(self, ex: BaseException) -> None:
        with self.cv:
            self.retries += 1
            self.last_error = f"{type(ex).__name__}: {ex}"

    def add_coalesced(self, n: int) -> None:
        with self.cv:
            self.coalesced += n

    def fail(self, ex: BaseException) -> None:
        """Delivery stopped for good: every waiter gets ``ex``."""
        with self.cv:
            self.fatal = ex
            self.last_error = f"{type(ex).__name__}: {ex}"
            self.cv.notify_all()
            self._wake_async(None)

    def finish(self) -> None:
        """The flusher thread has ended: nothing more completes; waiters stop waiting."""
        with self.cv:
            self.exited.set()
            self.cv.notify_all()
            self._wake_async(None)

    def _wake_async(self, runs: list[tuple[int, int]] | None) -> None:
        """(Holding cv.) Wake asyncio waiters of seqs in ``runs`` (None: all of them)."""
        woken = [s for s in self._async_waiters
                 if runs is None or any(a <= s <= b for a, b in runs)]
        for seq in woken:
            for loop, fut in self._async_waiters.pop(seq):
                try:
                    loop.call_soon_threadsafe(_set_done, fut)
                except RuntimeError:  # that loop is closed: nobody is waiting any more
                    pass

    # -------------------------------------------------------------- asking

    def is_complete(self, seq: int) -> bool:
        """(Holding cv.) True once ``seq`` is delivered or dead-lettered."""
        if seq <= self.done_through:
            return True
        return any(first <= seq <= last for first, (last, _, _) in self._completed.items())

    def completed(self, seq: int) -> bool:
        with self.cv:
            return self.is_complete(seq)

    def wait_seq(self, seq: int, timeout: float | None) -> Any:
        """Block until ``seq`` is delivered and return its result (None if the sink gave none).

        Raises DeadLettered, TimeoutError, Closed, or ResultDropped. The result is
        handed out once: the caller keeps it (``Receipt`` does).
        """
        end = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            while not self.is_complete(seq):
                self._check_waitable(seq)
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"seq {seq} not delivered within {timeout}s"
                                       + (f"; last sink error: {self.last_error}"
                                          if self.last_error else ""))
                self.cv.wait(left if left is None else min(left, 0.5))
        return self._outcome(seq)

    async def await_seq(self, seq: int) -> Any:
        """``wait_seq`` for asyncio, without a thread or polling; cancelling only stops the wait."""
        loop = asyncio.get_running_loop()
        with self.cv:
            if not self.is_complete(seq):
                self._check_waitable(seq)
                fut: asyncio.Future[None] = loop.create_future()
                self._async_waiters.setdefault(seq, []).append((loop, fut))
            else:
                fut = None  # type: ignore[assignment]
        if fut is not None:
            try:
                await fut
            finally:
                if not fut.done():  # cancelled: forget this waiter (the item is unaffected)
                    with self.cv:
                        waiters = self._async_waiters.get(seq, [])
                        if (loop, fut) in waiters:
                            waiters.remove((loop, fut))
                        if not waiters:
                            self._async_waiters.pop(seq, None)
            with self.cv:
                if not self.is_complete(seq):
                    self._check_waitable(seq)
                    raise Closed(f"the batcher closed before seq {seq} was delivered")
        return self._outcome(seq)

    def _check_waitable(self, seq: int) -> None:
        """(Holding cv.) Raise why ``seq`` will never complete in this process, if it will not."""
        if self.fatal is not None:
            raise self.fatal
        if self.exited.is_set():
            raise Closed(f"the batcher closed before seq {seq} was delivered; "
                         "it stays in the log for the next open")

    def _outcome(self, seq: int) -> Any:
        """A complete seq's result, or DeadLettered / ResultDropped."""
        with self.cv:
            err = self.dead_seqs.get(seq)
            overflow = err is None and len(self.dead_seqs) >= MAX_REMEMBERED_DEAD
            result = self.results.pop(seq, _NO_RESULT) if err is None else _NO_RESULT
            dropped = seq <= self._results_dropped_through
        if overflow and result is _NO_RESULT:  # past what memory keeps: the store knows
            err = self._dead_error(seq)
        if err is not None:
            raise DeadLettered(seq, err)
        if result is _NO_RESULT:
            if dropped:
                raise ResultDropped(seq)
            return None
        return result

    def flush(self, target: int, timeout: float | None) -> None:
        """Block until everything through ``target`` is checkpointed."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            self._begin_flush(target)
            try:
                while not self._flushed(target, timeout, end):
                    self.cv.wait(0.5 if end is None else max(0.0, min(end - time.monotonic(), 0.5)))
            finally:
                self.flush_waiters -= 1

    async def aflush(self, target: int, timeout: float | None) -> None:
        """``flush`` for asyncio, holding no thread while it waits (it polls, 1-20 ms).

        A thread per waiting flush let a few long flushes take every thread of
        the daemon's executor, stalling other clients and the shutdown.
        """
        end = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            self._begin_flush(target)
        try:
            delay = 0.001
            while True:
                with self.cv:
                    if self._flushed(target, timeout, end):
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
        finally:
            with self.cv:
                self.flush_waiters -= 1

    def _begin_flush(self, target: int) -> None:
        """(Holding cv.) Deliver through ``target`` now, without waiting for batch triggers."""
        self.flush_target = max(self.flush_target, target)
        self.flush_waiters += 1
        self.cv.notify_all()

    def _flushed(self, target: int, timeout: float | None, end: float | None) -> bool:
        """(Holding cv.) True once ``target`` is checkpointed; raises why it never will be."""
        if self.persisted.seq >= target:
            return True
        if self.fatal is not None:
            raise self.fatal
        if self.exited.is_set():
            raise Closed("the batcher is closed")
        if end is not None and time.monotonic() >= end:
            if self.done_through >= target:
                raise TimeoutError(f"flush: everything through seq {target} was delivered, but "
                                   f"the checkpoint could not be written within {timeout}s"
                                   + (f": {self.last_error}" if self.last_error else ""))
            raise TimeoutError(
                f"flush: {target - self.done_through} item(s) not delivered within {timeout}s"
                + (f"; last sink error: {self.last_error}" if self.last_error else ""))
        return False


class Checkpointer:
    """Writes ``Progress.done_through`` as the durable checkpoint, rate-limited.

    Flusher thread only. A checkpoint that cannot be written (a full disk) is
    transient: delivery goes on, and the next attempt, a second later, covers
    everything delivered by then.
    """

    def __init__(self, log_: Log, progress: Progress, interval: float,
                 on_space: Callable[[], None]) -> None:
        self.log = log_
        self.progress = progress
        self.interval = interval
        self.on_space = on_space
        """Called when segments were freed (submitters waiting for room)."""
        self.last_write = time.monotonic()
        self._retry_at = 0.0  # after a failed write: not before this
        self._warned = -1e9

    def due_in(self, now: float) -> float | None:
        """(Holding cv.) Seconds until a pending checkpoint is due; None if none is pending."""
        if self.progress.done_through <= self.progress.persisted.seq:
            return None
        return self.last_write + self.interval - now

    def write(self, force: bool = False, stopping: bool = False) -> None:
        """Write the checkpoint if it moved and is due (always when ``force``d)."""
        p = self.progress
        with p.cv:
            if p.done_through <= p.persisted.seq:
                return
            now = time.monotonic()
            if now < self._retry_at and not (force and stopping):
                return
            # A waiting flush wants the checkpoint as soon as it covers its target, not at
            # every batch before that: during a replay that was one fsync'd checkpoint (and
            # a directory fsync) per batch, a sixth of the replay's time.
            flush_done = p.flush_waiters and p.done_through >= p.flush_target
            if not (force or flush_done or now - self.last_write >= self.interval):
                return
            cp = Checkpoint(self.log.log_id, p.done_through, p.delivered_total, p.dead_total,
                            max(p.done_through, self.log.synced_seq))
        segments = len(self.log.segments())
        try:
            self.log.commit_checkpoint(cp)
        except OSError as ex:
            now = time.monotonic()
            with p.cv:
                p.last_error = f"checkpoint write failed: {type(ex).__name__}: {ex}"
                self.last_write = now
                # Not at every loop turn (a waiting flush forces one each time): once a
                # second, and a warning at most every 30 s.
                self._retry_at = now + 1.0
            if now - self._warned >= 30.0:
                self._warned = now
                log.warning("walbatch: %s; retrying every second", p.last_error)
            return
        with p.cv:
            p.persisted = cp
            self.last_write = time.monotonic()
            p.cv.notify_all()
        if len(self.log.segments()) < segments:
            self.on_space()


def runs_of(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, last)`` of sorted ``seqs``."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] + 1 == s:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

