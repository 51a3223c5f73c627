"""Calling the sink: one closed batch, until every record is taken or dead-lettered.

The delivery policies live here, around ``sink.write``: the ``combine`` hook,
the circuit breaker, retries with exponential backoff and full jitter, per-item
outcomes (a refused item is dead-lettered alone, the rest of the batch is
delivered), ``retry_limit``/``retry_max_elapsed``, and the adaptive size
trigger's feedback. ``Shutdown`` says when ``close()`` wants delivery to give
up: a batch still failing at the deadline stays in the log, never dropped.

Ownership: ``SinkCaller`` keeps no per-batch state; what it learns goes to
``Progress`` (completions, retries, the last error) and to the breaker and
adaptive limit, both guarded by the delivery lock (``progress.cv``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from .batcher import AdaptiveLimit, ClosedBatch
from .breaker import CircuitBreaker
from .dlq import DeadLetterStore
from .errors import SinkError
from .observer import Observers
from .options import Options
from .progress import Progress, runs_of
from .record import Batch, Record

log = logging.getLogger("walbatch")


class Shutdown:
    """``close()`` asked delivery to stop: by when, and whether it gave up."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.deadline: float | None = None
        self.abandoned = False
        """A batch was given up at the deadline: delivery stops, the rest stays in the log."""

    def request(self, deadline: float) -> None:
        self.deadline = deadline
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def gives_up_before(self, when: float) -> bool:
        """Closing, and ``when`` is at or past the deadline: give up (and remember it)."""
        if self.deadline is None or when >= self.deadline:
            self.abandoned = True
            return True
        return False


class _Abandoned(Exception):
    """The shutdown deadline passed while a dead letter could not be stored."""


class SinkCaller:
    def __init__(self, sink: Any, opts: Options, dlq: DeadLetterStore, log_id: str,
                 progress: Progress, shutdown: Shutdown, observers: Observers | None = None) -> None:
        self.sink = sink
        self.observers = observers or Observers()
        self.opts = opts
        self.dlq = dlq
        self.log_id = log_id
        self.progress = progress
        self.shutdown = shutdown
        self.cv = progress.cv
        self.breaker = (CircuitBreaker(opts.breaker_failures, opts.breaker_cooldown)
                        if opts.breaker_failures else None)
        self.adaptive = (AdaptiveLimit(opts.adaptive_min_items, opts.max_items,
                                       opts.adaptive_target_latency)
                         if opts.adaptive_batching else None)

    @property
    def batch_limit(self) -> int:
        """(Holding cv.) The size trigger in force."""
        return self.opts.max_items if self.adaptive is None else self.adaptive.limit

    def deliver(self, closed: ClosedBatch[Record]) -> None:
        """Deliver one batch until every record is taken or dead-lettered (or shutdown).

        On return the batch's records are complete in ``Progress``, unless the
        shutdown deadline passed first: then they stay in the log.
        """
        results: dict[int, Any] = {}
        try:
            dead = self._deliver(closed, results)
        except _Abandoned:
            return
        if dead is not None:
            self.progress.complete_records(closed.items, dead, results)

    def _deliver(self, closed: ClosedBatch[Record], results: dict[int, Any]) -> dict[int, str] | None:
        """The dead seqs and their errors once the batch is done; None if given up.

        The sink's per-item values (neither None nor an exception) go to ``results``.
        """
        records = closed.items
        first, last = records[0].seq, records[-1].seq
        key = closed.key
        started = time.monotonic()
        attempt = 1
        todo = records
        coalesced = 0
        applied = getattr(self.sink, "applied", None)
        if callable(applied):
            # A sink that applies exactly once (ApplySink) says which records it already
            # applied (a redelivery): they are complete, and must not reach combine.
            while True:
                try:
                    done = applied(Batch(records, self.log_id, closed.reason, 1, key))
                    break
                except Exception as ex:  # e.g. its database is down: retried
                    if not self._backoff(attempt, ex):
                        return None
                    attempt += 1
            if done:
                todo = [r for r in records if r.seq not in done]
                if not todo:
                    return {}
            attempt = 1
        covers = [] if len(todo) == todo[-1].seq - todo[0].seq + 1 else runs_of(r.seq for r in todo)
        if self.opts.combine is not None:
            while True:
                try:
                    kept = self._combine(closed, todo)
                    break
                except Exception as ex:  # a bug in the hook: loud, retried, nothing dropped
                    if not self._backoff(attempt, ex):
                        return None
                    attempt += 1
            coalesced = len(todo) - len(kept)
            if coalesced:
                covers = covers or [(todo[0].seq, todo[-1].seq)]
            todo = kept
            attempt = 1
        dead: dict[int, str] = {}
        while todo:
            batch = Batch(todo, self.log_id, closed.reason, attempt, key, first, last, coalesced,
                          covers)
            if not self._breaker_allows():
                return None  # shutdown deadline while the circuit was open: stays in the log
            t0 = time.monotonic()
            try:
                outcomes = self.sink.write(batch)
                failed = _check_outcomes(batch, outcomes, results)
            except BaseException as ex:
                # SystemExit, KeyboardInterrupt or GeneratorExit raised *by the sink* on
                # this thread are its failures too: letting them through ended delivery
                # for the process and re-raised SystemExit in every flush() caller.
                permanent = self._is_permanent(ex)
                self.observers.sink_called(batch, time.monotonic() - t0, ex, permanent)
                self._sink_answered(ok=permanent, latency=None, full=False)
                if permanent or self._gave_up(attempt, started):
                    dead.update(self._dead_letter(todo, ex, attempt, key))
                    break
                if not self._backoff(attempt, ex):
                    return None  # shutdown deadline: the batch stays in the log
                attempt += 1
                continue
            latency = time.monotonic() - t0
            self.observers.sink_called(batch, latency, None, False)
            self._sink_answered(ok=True, latency=latency,
                                full=closed.reason == "size" and attempt == 1)
            retry: list[Record] = []
            for rec, ex in failed:
                if (isinstance(ex, SinkError) and ex.retryable
                        and not self._gave_up(attempt, started)):
                    retry.append(rec)
                else:
                    dead.update(self._dead_letter([rec], ex, attempt, key))
            if retry and not self._backoff(attempt, max(
                    (ex for _, ex in failed if isinstance(ex, SinkError) and ex.retryable),
                    key=lambda ex: getattr(ex, "retry_after", None) or 0.0)):
                return None
            todo = retry
            covers = []  # a retry stands for its own records only
            attempt += 1
        if coalesced:
            self.progress.add_coalesced(coalesced)
        return dead

    def _combine(self, closed: ClosedBatch[Record], records: list[Record]) -> list[Record]:
        """Run the combine hook; check it only dropped records or changed items."""
        assert self.opts.combine is not None
        batch = Batch(records, self.log_id, closed.reason, 1, closed.key)
        kept = list(self.opts.combine(batch))
        seqs = {r.seq for r in records}
        seen: set[int] = set()
        for r in kept:
            if not isinstance(r, Record):
                raise TypeError(f"combine returned a {type(r).__name__}; expected Records "
                                "taken from the batch")
            if r.seq not in seqs or r.seq in seen:
                raise ValueError(f"combine returned seq {r.seq}, which is not in the batch "
                                 "or appears twice: it may drop records, not invent them")
            seen.add(r.seq)
        return kept

    def _breaker_allows(self) -> bool:
        """Wait while the circuit breaker is open; False if shutdown wants us to give up."""
        if self.breaker is None:
            return True
        sd = self.shutdown
        while True:
            with self.cv:
                before = self.breaker.state
                wait = self.breaker.wait_time(time.monotonic())
                after, failures = self.breaker.state, self.breaker.consecutive
            if after != before:
                self.observers.breaker_changed(after, failures)
            if wait <= 0:
                return True
            if sd.requested and sd.gives_up_before(time.monotonic() + wait):
                return False
            if sd.requested:
                time.sleep(min(wait, 0.05))  # closing: keep checking the deadline
            else:
                sd.event.wait(wait)  # close() cuts the cool-down short

    def _sink_answered(self, ok: bool, latency: float | None, full: bool) -> None:
        """Feed the breaker and the adaptive size trigger with how the sink did."""
        if self.breaker is None and self.adaptive is None:
            return
        with self.cv:
            if self.breaker is not None:
                before = self.breaker.state
                if ok:
                    self.breaker.success()
                else:
                    self.breaker.failure(time.monotonic())
                after, failures = self.breaker.state, self.breaker.consecutive
            if self.adaptive is not None and self.adaptive.answered(ok, latency, full):
                self.cv.notify_all()  # the flusher applies the new limit
        if self.breaker is not None and after != before:
            self.observers.breaker_changed(after, failures)  # outside the lock: it may log

    def _is_permanent(self, ex: BaseException) -> bool:
        if isinstance(ex, SinkError):
            return not ex.retryable
        return isinstance(ex, self.opts.permanent_errors) if self.opts.permanent_errors else False

    def _gave_up(self, attempt: int, started: float) -> bool:
        """Out of attempts (retry_limit) or of time (retry_max_elapsed)."""
        if self.opts.retry_limit is not None and attempt >= self.opts.retry_limit:
            return True
        limit = self.opts.retry_max_elapsed
        return limit is not None and time.monotonic() - started >= limit

    def _backoff(self, attempt: int, ex: BaseException) -> bool:
        """Sleep before the next attempt; False if shutdown wants us to give up."""
        self.progress.failed_attempt(ex)
        cap = min(self.opts.retry_max_delay, self.opts.retry_initial_delay * (2 ** (attempt - 1)))
        delay = random.uniform(0, cap)
        retry_after = getattr(ex, "retry_after", None)
        if isinstance(retry_after, (int, float)) and retry_after > delay:
            # The server said when to come back (HTTP Retry-After): wait at least that
            # long, but never more than an hour on its word alone.
            delay = min(float(retry_after), 3600.0)
        # Debug only: the state log says when the sink starts failing, then sums up.
        log.debug("walbatch sink failed (attempt %d), retrying in %.2fs: %s", attempt, delay, ex)
        sd = self.shutdown
        wake_at = time.monotonic() + delay
        if not sd.requested:
            sd.event.wait(delay)  # close() cuts the sleep short
        if sd.requested:
            # Closing: retry only while the next attempt can start before the deadline.
            if sd.gives_up_before(wake_at):
                return False
            time.sleep(max(0.0, wake_at - time.monotonic()))
        return True

    def _dead_letter(self, records: list[Record], ex: BaseException,
                     attempts: int, key: Any = None) -> dict[int, str]:
        text = f"{type(ex).__name__}: {ex}"
        attempt = 1
        while True:
            try:
                self.dlq.add(self.log_id, [(r.seq, r.item) for r in records], ex, attempts, key=key)
                break
            except Exception as store_error:  # e.g. a full disk: retry, never skip
                if not self._backoff(attempt, store_error):
                    raise _Abandoned() from store_error
                attempt += 1
        log.error("walbatch dead-lettered %d item(s) (seq %d..%d): %s",
                  len(records), records[0].seq, records[-1].seq, text,
                  extra={"event": "dead_lettered", "items": len(records),
                         "first_seq": records[0].seq, "last_seq": records[-1].seq, "error": text})
        return {r.seq: text for r in records}


def _check_outcomes(batch: Batch, outcomes: Any,
                    results: dict[int, Any]) -> list[tuple[Record, BaseException]]:
    """The records a sink's per-item outcomes refused, with their errors.

    An outcome that is neither None nor an exception is that item's result (e.g.
    the id an ``INSERT ... RETURNING`` gave it): it goes to ``results`` by seq.
    """
    if outcomes is None:
        return []
    try:
        outcomes = list(outcomes)
    except TypeError:
        raise TypeError(f"sink.write returned {type(outcomes).__name__}; expected None "
                        "or a list of per-item outcomes") from None
    if len(outcomes) != len(batch):
        raise TypeError(f"sink.write returned {len(outcomes)} outcomes for a batch of "
                        f"{len(batch)} records")
    failed = []
    values = {}
    for rec, out in zip(batch, outcomes, strict=True):
        if out is None:
            continue
        if isinstance(out, BaseException):
            failed.append((rec, out))
        else:
            values[rec.seq] = out
    results.update(values)  # only once the whole list is known to be well formed
    return failed
