"""The delivery side of an open log, built in one place.

An open log is delivered by exactly one ``Delivery``: the dead-letter store
(and what an open must tell it), the flusher thread with its parts, the stats
snapshot and the close order. ``DurableBatcher`` (embedded, or under the
daemon) and ``Follower`` (``walbatch replay --follow``) both build one, so the
two paths cannot drift apart.

What an open owes the dead-letter store, in order:
1. ``dlq.db`` deleted or emptied while the checkpoint counts dead letters: the
   loss is recorded as one entry (seq 0), never passed over in silence.
2. Seqs a quarantining open gave up to damage are recorded as lost.
3. When this open delivers (it has a sink), this log's dead letters past the
   checkpoint are forgotten: their batch was never checkpointed, so they are
   delivered again now, and a requeue must not deliver them a second time.

Close order: stop intake is the caller's (the group committer); then the
flusher delivers until the deadline and writes its last checkpoint; then the
sink is closed; then the dead-letter store. The log is the caller's to close.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from .dlq import DLQ_FILE, DeadLetterStore, record_lost
from .events import StateLog
from .flusher import Flusher
from .log import Log
from .observer import Observers
from .options import Options

log = logging.getLogger("walbatch")


@dataclass(frozen=True)
class Stats:
    """A snapshot of a batcher. At a quiescent point (nothing being submitted or
    delivered) ``submitted == delivered + dead_lettered + pending``, across
    reopens too."""

    log_id: str
    submitted: int
    """Items acknowledged since the log was created (the last durable seq)."""
    delivered: int
    dead_lettered: int
    pending: int
    """Acknowledged items not yet delivered or dead-lettered."""
    batches_by_reason: dict[str, int] = field(default_factory=dict)
    log_bytes: int = 0
    segments: int = 0
    fsyncs: int = 0
    commit_groups: int = 0
    last_checkpoint: int = 0
    retries: int = 0
    last_error: str | None = None
    lost_to_corruption: int = 0
    coalesced: int = 0
    """Delivered items that a ``combine`` hook merged into others (part of ``delivered``)."""
    keys_open: int = 0
    """Keys with an open batch (keyed batching)."""
    batch_limit: int = 0
    """The size trigger in force: ``max_items``, or the adaptive limit."""
    breaker_state: str = "off"
    """The circuit breaker: ``off`` (not configured), ``closed``, ``open`` or ``half_open``."""
    breaker_opens: int = 0
    """How many times the circuit breaker opened."""
    done_through: int = 0
    """Every seq up to this one is delivered or dead-lettered (the checkpoint follows it
    within ``checkpoint_interval``); the oldest pending item is the next one."""


def close_sink(sink: Any) -> None:
    """Call ``sink.close()`` if it has one; a failure is logged, never raised."""
    close = getattr(sink, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.exception("walbatch: sink.close() failed")


class Delivery:
    """The dead-letter store, the flusher and the stats of one open log.

    ``sink`` None: a writer only; the store is kept (and told about losses) but
    nothing is delivered here. ``follow``: another process writes the log, so
    the flusher reads it from disk (``Log.refresh`` publishes new records).
    """

    def __init__(self, log_: Log, sink: Any, opts: Options, *, follow: bool = False) -> None:
        self.log = log_
        self.sink = sink
        self.options = opts
        directory = log_.directory
        # Through the file layer, so that a simulated power loss rolls dlq.db back too.
        dlq_path = log_.fs.local_path(os.path.join(directory, DLQ_FILE))
        gone = "missing" if not os.path.exists(dlq_path) else (
            "empty" if os.path.getsize(dlq_path) == 0 else None)
        self.dead_letters = DeadLetterStore(dlq_path)
        self.observers = Observers()
        """The data path's hooks (walbatch.observer): metrics, state-change logs, tracing."""
        self.state_log = StateLog(lambda: self.stats().pending)
        self.observers.add(self.state_log)
        try:
            if gone and log_.checkpoint.dead_lettered:
                _record_store_lost(self.dead_letters, log_, gone)
            record_lost(self.dead_letters, log_)
            if sink is not None:  # this open delivers everything past the checkpoint
                again = self.dead_letters.forget_above(str(log_.log_id), log_.checkpoint.seq)
                if again:
                    log.info("walbatch: %d dead letter(s) past the checkpoint are delivered "
                             "again (their batch was not checkpointed)", again)
            self.flusher = Flusher(log_, sink, self.dead_letters, opts, follow=follow,
                                   on_space=self._space_freed, observers=self.observers)
        except BaseException:
            self.dead_letters.close()
            raise
        self.progress = self.flusher.progress
        self.on_space: Any = lambda: None
        """Called when delivery freed segments (e.g. to wake submitters waiting for room)."""
        self._closed = False

    def _space_freed(self) -> None:
        self.on_space()

    @property
    def delivering(self) -> bool:
        return self.sink is not None

    def start(self) -> None:
        """Start delivering (a writer-only delivery has nothing to start)."""
        if self.sink is not None:
            self.flusher.start()
        else:
            self.progress.finish()  # nothing is delivered here: waiters learn at once

    # ------------------------------------------------------------ waiting

    def in_sink(self) -> bool:
        return self.flusher.in_sink()

    def wait_seq(self, seq: int, timeout: float | None) -> Any:
        if self.in_sink():
            raise RuntimeError("Receipt.wait() called from inside the sink would wait for itself")
        return self.progress.wait_seq(seq, timeout)

    async def await_seq(self, seq: int) -> Any:
        if self.in_sink():
            raise RuntimeError("awaiting a Receipt inside the sink would wait for itself")
        return await self.progress.await_seq(seq)

    def completed(self, seq: int) -> bool:
        return self.progress.completed(seq)

    @property
    def last_error(self) -> str | None:
        return self.progress.last_error

    def stats(self, commit_groups: int = 0) -> Stats:
        """A consistent snapshot of the log and its delivery."""
        f, p = self.flusher, self.progress
        with p.cv:
            delivered = p.delivered_total + p.delivered_above
            dead = p.dead_total + p.dead_above
            completed_above = p.delivered_above + p.dead_above
            done = p.done_through
            by_reason = dict(p.batches_by_reason)
            retries, last_error, cp = p.retries, p.last_error, p.persisted.seq
            coalesced, batch_limit = p.coalesced, f.caller.batch_limit
            breaker = f.caller.breaker
            breaker_state = ("off", 0) if breaker is None else (breaker.state, breaker.opened)
        log_ = self.log
        submitted = max(log_.synced_seq, done)
        segs = log_.segments()
        return Stats(
            log_id=str(log_.log_id),
            submitted=submitted,
            delivered=delivered,
            dead_lettered=dead,
            pending=submitted - done - completed_above,
            batches_by_reason=by_reason,
            log_bytes=sum(s.size for s in segs),
            segments=len(segs),
            fsyncs=log_.fsyncs,
            commit_groups=commit_groups,
            last_checkpoint=cp,
            retries=retries,
            last_error=last_error,
            lost_to_corruption=sum(r.last - r.first + 1 for r in log_.lost),
            coalesced=coalesced,
            keys_open=f.keyed.keys_open,
            batch_limit=batch_limit,
            breaker_state=breaker_state[0],
            breaker_opens=breaker_state[1],
            done_through=done,
        )

    # ------------------------------------------------------------ closing

    def stop(self, deadline: float) -> None:
        """Deliver what is acknowledged until ``deadline`` (monotonic), then stop."""
        self.flusher.stop(deadline)

    def wait_stopped(self, timeout: float) -> bool:
        """Wait for the flusher to exit; False if it did not within ``timeout``."""
        return self.flusher.exited.wait(timeout)

    def close(self) -> None:
        """Close the sink and the dead-letter store (after the flusher stopped). Idempotent."""
        if self._closed:
            return
        self._closed = True
        close_sink(self.sink)
        self.dead_letters.close()


def _record_store_lost(store: DeadLetterStore, log_: Log, how: str) -> None:
    """dlq.db was deleted or truncated although dead letters had been recorded: say so.

    The items are gone; what is left is to make the loss visible where an operator
    looks (``walbatch dlq list``, ``status``), as one entry with seq 0.
    """
    n = log_.checkpoint.dead_lettered
    text = (f"the dead-letter store was lost: {DLQ_FILE} was {how} on open while the "
            f"checkpoint counts {n} dead letter(s); their items are gone (purge this entry "
            "once noted)")
    store.add(str(log_.log_id), [(0, None)], text, lost=True)
    log.error("walbatch: %s", text)
