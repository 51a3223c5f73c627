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

from .batcher import REASONS
from .checkpoint import Checkpoint
from .errors import Closed, DeadLettered
from .log import Log
from .record import Record

log = logging.getLogger("walbatch")

# Past this many dead seqs, Progress stops remembering their errors in memory and
# wait_seq asks the dead-letter store instead.
MAX_REMEMBERED_DEAD = 100_000


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

    # ---------------------------------------------------------- completing

    def complete_range(self, first: int, last: int, delivered: int, dead_n: int) -> None:
        """Complete seqs ``first..last`` (e.g. lost to quarantined damage)."""
        with self.cv:
            self._completed[first] = (last, delivered, dead_n)
            self._advance(delivered, dead_n, {})

    def complete_records(self, records: list[Record], dead: dict[int, str]) -> None:
        """Complete a delivered batch: every record not in ``dead`` was taken.

        A keyed batch's seqs interleave with other keys', so it completes one run of
        consecutive seqs at a time; an unkeyed batch is a single run.
        """
        first, last = records[0].seq, records[-1].seq
        runs = ([(first, last)] if last - first + 1 == len(records)
                else runs_of(r.seq for r in records))
        with self.cv:
            for a, b in runs:
                x = len(dead) if len(runs) == 1 else sum(1 for s in dead if a <= s <= b)
                self._completed[a] = (b, b - a + 1 - x, x)
            self._advance(len(records) - len(dead), len(dead), dead)

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

    # -------------------------------------------------------------- asking

    def is_complete(self, seq: int) -> bool:
        """(Holding cv.) True once ``seq`` is delivered or dead-lettered."""
        if seq <= self.done_through:
            return True
        return any(first <= seq <= last for first, (last, _, _) in self._completed.items())

    def completed(self, seq: int) -> bool:
        with self.cv:
            return self.is_complete(seq)

    def wait_seq(self, seq: int, timeout: float | None) -> None:
        """Block until ``seq`` is delivered; raise DeadLettered, TimeoutError or Closed."""
        end = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            while not self.is_complete(seq):
                if self.fatal is not None:
                    raise self.fatal
                if self.exited.is_set():
                    raise Closed(f"the batcher closed before seq {seq} was delivered; "
                                 "it stays in the log for the next open")
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"seq {seq} not delivered within {timeout}s"
                                       + (f"; last sink error: {self.last_error}"
                                          if self.last_error else ""))
                self.cv.wait(left if left is None else min(left, 0.5))
            err = self.dead_seqs.get(seq)
            overflow = err is None and len(self.dead_seqs) >= MAX_REMEMBERED_DEAD
        if overflow:  # past what memory keeps: the store knows
            err = self._dead_error(seq)
        if err is not None:
            raise DeadLettered(seq, err)

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
            if not (force or p.flush_waiters or stopping or now - self.last_write >= self.interval):
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
