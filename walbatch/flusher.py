"""The flusher thread: read acknowledged records, batch them, deliver, checkpoint.

Shape (huey's consumer): ``run()`` loops until told to stop; signals only set
flags under ``_cv``. Records come from an in-memory tail fed by the group
committer after each fsync; the log on disk is read only for the backlog found
at open (replay) or when the tail overflowed ``memory_tail_bytes``.

Ownership: everything under "progress" (what is complete, the totals, the dead
seqs) is guarded by ``_cv``; the batch policy, reader and checkpoint writes
belong to the flusher thread alone.

Invariant: the checkpoint moves only over a contiguous prefix of seqs that are
delivered or durably dead-lettered, whatever order batches complete in.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from .batcher import REASONS, BatchPolicy, ClosedBatch, KeyedPolicies
from .breaker import CircuitBreaker
from .checkpoint import Checkpoint
from .codec import unpack_values
from .dlq import DeadLetterStore
from .errors import CorruptLog, DeadLettered, SinkError
from .framing import decode_items
from .keys import KEY_EXT, Keyed, ext_hook
from .log import Log, RawFrame
from .options import Options
from .record import Batch, Record

_record = partial(tuple.__new__, Record)  # Record((seq, item)) built in C

log = logging.getLogger("walbatch")

_MAX_REMEMBERED_DEAD = 100_000
_MAX_QUEUED_PER_SLOT = 4


class _Abandoned(Exception):
    """The shutdown deadline passed while a batch was still failing."""


class Flusher:
    def __init__(self, log_: Log, sink: Any, dlq: DeadLetterStore, opts: Options,
                 follow: bool = False) -> None:
        self.log = log_
        self.sink = sink
        self.dlq = dlq
        self.opts = opts
        self.log_id = str(log_.log_id)
        self.policy: BatchPolicy[Record] = BatchPolicy(opts.max_items, opts.max_bytes, opts.max_delay)
        self.keyed: KeyedPolicies[Record] = KeyedPolicies(opts.max_items, opts.max_bytes,
                                                          opts.max_delay, opts.max_open_keys)
        self._keyed_in_frame = False  # set by _ext_hook while decoding
        self._cv = threading.Condition(threading.Lock())
        # --- intake (guarded by _cv)
        self._tail: deque[RawFrame] = deque()
        self._tail_bytes = 0
        self._tail_items = 0
        self._wake_items = 1  # on_durable wakes the flusher once this many items wait
        self._tail_next = log_.next_seq  # the seq the next tail frame must start at
        self._tail_ok = not follow
        self._follow = follow
        """Another process writes the log: always read it from disk (walbatch replay --follow)."""
        self._waiting = False
        self._read_seq = log_.checkpoint.seq + 1  # flusher thread only
        self._replay_end = log_.synced_seq  # records <= this were found at open
        self._reader = log_.reader(self._read_seq)
        # --- progress (guarded by _cv)
        cp = log_.checkpoint
        self.done_through = cp.seq
        self.delivered_total = cp.delivered
        self.dead_total = cp.dead_lettered
        self._completed: dict[int, tuple[int, int, int]] = {}
        self.delivered_above = 0
        self.dead_above = 0
        self.dead_seqs: dict[int, str] = {}
        self.batches_by_reason = dict.fromkeys(REASONS, 0)
        self.retries = 0
        self.coalesced = 0
        self.breaker = (CircuitBreaker(opts.breaker_failures, opts.breaker_cooldown)
                        if opts.breaker_failures else None)
        self.batch_limit = (max(1, min(opts.max_items, opts.adaptive_min_items))
                            if opts.adaptive_batching else opts.max_items)
        self._limit_wanted: int | None = self.batch_limit if opts.adaptive_batching else None
        self.last_error: str | None = None
        self.fatal: BaseException | None = None
        self.persisted = cp
        self._flush_target = 0
        self._flush_waiters = 0
        self._last_cp_write = time.monotonic()
        self._cp_retry_at = 0.0  # after a failed checkpoint write: not before this
        self._cp_warned = -1e9
        # --- lifecycle
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._abandoned = False
        self._inflight = 0
        # Keyed batches of one key go to the sink one at a time, in order: while one is
        # there, the key's later batches wait here (at most _MAX_QUEUED_PER_SLOT per slot).
        self._key_queues: dict[Any, deque[ClosedBatch[Record]]] = {}
        self._queued = 0
        self._pool = (
            ThreadPoolExecutor(opts.flush_concurrency, thread_name_prefix="walbatch-deliver")
            if opts.flush_concurrency > 1 else None
        )
        self._delivery_thread = threading.local()  # marks the pool's threads (inside the sink)
        self.on_space: Any = lambda: None  # called when segments were freed
        self.thread = threading.Thread(target=self._run, name="walbatch-flusher", daemon=True)
        self.exited = threading.Event()

    # ------------------------------------------------------------- intake

    def on_durable(self, first_seq: int, count: int, payload: bytes) -> None:
        """Called by the group committer, in seq order, after each fsync."""
        with self._cv:
            if self._tail_ok:
                full = self._tail_bytes + len(payload) > self.opts.memory_tail_bytes
                if first_seq != self._tail_next or full:
                    self._tail_ok = False  # fall back to reading the log from disk
                    self._tail.clear()
                    self._tail_bytes = 0
                    self._tail_items = 0
                else:
                    self._tail.append(RawFrame(first_seq, count, payload))
                    self._tail_bytes += len(payload)
                    self._tail_next = first_seq + count
                    self._tail_items += count
            # Wake the flusher only when it has something to do now: a first item
            # (its batch timer starts), or a batch's worth. Otherwise its own
            # deadline wakes it; a wake-up per commit group costs submitters GIL time.
            if self._waiting and (self._tail_items >= self._wake_items or not self._tail_ok):
                self._cv.notify_all()

    def _take_frames(self) -> list[RawFrame]:
        """Next frames to batch, from memory or disk; [] if there are none now."""
        with self._cv:
            if self._tail_ok and self._tail and self._tail[0].first_seq <= self._read_seq:
                frames = list(self._tail)
                self._tail.clear()
                self._tail_bytes = 0
                self._tail_items = 0
                return self._trim(frames)
            if self._tail_ok and self._read_seq >= self._tail_next:
                return []
        self._reader.next_seq = self._read_seq
        frames = self._reader.read()
        if not frames:
            with self._cv:
                if not self._tail_ok and not self._follow and self._read_seq > self.log.synced_seq:
                    # Caught up with the disk: new frames may go to memory again.
                    self._tail_ok = True
                    self._tail_next = self._read_seq
        return frames

    def _trim(self, frames: list[RawFrame]) -> list[RawFrame]:
        out = []
        for f in frames:
            if f.first_seq + f.count <= self._read_seq:
                continue
            skip = self._read_seq - f.first_seq
            out.append(f if skip <= 0 else RawFrame(f.first_seq, f.count, f.payload, skip))
        return out

    # --------------------------------------------------------------- loop

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as ex:  # a flusher that dies must say so, loudly
            log.exception("walbatch flusher stopped")
            with self._cv:
                self.fatal = ex
                self.last_error = f"{type(ex).__name__}: {ex}"
                self._cv.notify_all()
        finally:
            try:
                self._write_checkpoint(force=True)
            except Exception:
                log.exception("walbatch: final checkpoint write failed")
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self.exited.set()

    def _open_items(self) -> int:
        return len(self.policy) + len(self.keyed)

    def _take_all(self, reason: str) -> list[ClosedBatch[Record]]:
        """Close every open batch, unkeyed and keyed (flush, shutdown, replay, a gap)."""
        closed = self.policy.take(reason)
        rest = self.keyed.take_all(reason) if len(self.keyed) else []
        return rest if closed is None else [closed, *rest]

    def _poll(self, now: float) -> list[ClosedBatch[Record]]:
        closed = self.policy.poll(now)
        rest = self.keyed.poll(now) if len(self.keyed) else []
        return rest if closed is None else [closed, *rest]

    def _apply_limit(self) -> None:
        """Adaptive batching: the size trigger the last deliveries asked for."""
        with self._cv:
            n, self._limit_wanted = self._limit_wanted, None
        if n is None:
            return
        closed = self.policy.set_max_items(n)
        for c in ([closed] if closed is not None else []) + self.keyed.set_max_items(n):
            self._dispatch(c)

    def _loop(self) -> None:
        while True:
            if self._stop.is_set() and (self._abandoned or self._past_deadline()):
                return
            if self._limit_wanted is not None:
                self._apply_limit()
            frames = self._take_frames()
            now = time.monotonic()
            for frame in frames:
                self._feed(frame, now)
            if not frames:
                for closed in self._poll(now):
                    self._dispatch(closed)
                if self._open_items() and self._flush_due():
                    for closed in self._take_all("flush" if not self._stop.is_set() else "shutdown"):
                        self._dispatch(closed)
            self._write_checkpoint()
            if frames:
                continue
            with self._cv:
                if self._stop.is_set() and self._read_seq > self.log.synced_seq:
                    if not self._open_items() and self._inflight == 0:
                        return
                    if self._open_items():
                        continue
                if self._tail and self._tail_ok:
                    continue
                if not self._tail_ok and self._read_seq <= self.log.synced_seq:
                    continue
                timeout = self._next_wakeup(now)
                open_items = self._open_items()
                self._wake_items = 1 if not open_items else max(1, self.policy.max_items - open_items)
                self._waiting = True
                self._cv.wait(timeout)
                self._waiting = False

    def _next_wakeup(self, now: float) -> float | None:
        times = []
        due = self.policy.deadline()
        if due is not None:
            times.append(due - now)
        due = self.keyed.deadline() if len(self.keyed) else None
        if due is not None:
            times.append(due - now)
        if self.done_through > self.persisted.seq:
            times.append(self._last_cp_write + self.opts.checkpoint_interval - now)
        if self._deadline is not None:
            times.append(self._deadline - now)
        if not times:
            return None
        return max(0.0, min(times)) + 0.0005

    def _flush_due(self) -> bool:
        """Close the open batch early: a flush() or close() wants everything read so far."""
        with self._cv:
            wanted = self._flush_target if not self._stop.is_set() else self.log.synced_seq
            return (self._flush_waiters > 0 or self._stop.is_set()) and self._read_seq > wanted

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _feed(self, frame: RawFrame, now: float) -> None:
        if frame.payload is None:  # seqs lost to quarantined corruption
            self._flush_open_batch_before_gap()
            last = frame.first_seq + frame.count - 1
            first = max(frame.first_seq, self._read_seq)
            self._complete(first, last, 0, last - first + 1, {})
            self._read_seq = last + 1
            return
        replay = frame.first_seq <= self._replay_end
        policy = self.policy
        total = len(frame.payload) - frame.skip  # each skipped item took at least a byte
        if len(policy) and policy.nbytes + total > policy.max_bytes >= total:
            self._dispatch_closed(policy.take("bytes"), replay)  # the frame fits a fresh batch
        if policy.nbytes + total <= policy.max_bytes:
            items = self._decode(frame)
            if self._keyed_in_frame:
                self._keyed_in_frame = False
                self._feed_each(frame, now, replay)  # route item by item to the keys' batches
            else:
                self._feed_bulk(frame, items, now, replay, total)
        else:
            self._feed_each(frame, now, replay)
        self._read_seq = frame.first_seq + frame.count
        if replay and self._read_seq > self._replay_end and self._open_items():
            for closed in self._take_all("replay"):
                self._dispatch(closed)

    def _feed_bulk(self, frame: RawFrame, items: list[Any], now: float, replay: bool,
                   total: int) -> None:
        """The common case: the whole frame fits the byte budget, so only counts split it.

        Decoding and building Records happen in C (one Unpacker pass, tuple.__new__),
        which keeps the flusher from taking the GIL away from submitters for long.
        """
        policy = self.policy
        n = len(items)
        seq = frame.first_seq + frame.skip
        i = 0
        while i < n:
            k = min(policy.max_items - len(policy), n - i)
            chunk = list(map(_record, zip(range(seq + i, seq + i + k), items[i:i + k], strict=True)))
            # An upper bound of the chunk's bytes: every item outside it took at least one.
            for closed in policy.add_bulk(chunk, total - (n - k), now):
                self._dispatch_closed(closed, replay)
            i += k

    def _feed_each(self, frame: RawFrame, now: float, replay: bool) -> None:
        """A frame larger than the byte budget: exact sizes, item by item."""
        assert frame.payload is not None
        try:
            decoded = decode_items(frame.payload, frame.count)
        except ValueError as ex:
            raise self._undecodable(frame, ex) from ex
        seq = frame.first_seq + frame.skip
        for item, size in (decoded[frame.skip:] if frame.skip else decoded):
            if type(item) is Keyed:
                closed_now = self.keyed.add(item.key, Record(seq, item.item), size, now)
            else:
                closed_now = self.policy.add(Record(seq, item), size, now)
            for closed in closed_now:
                self._dispatch_closed(closed, replay)
            seq += 1

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == KEY_EXT:
            self._keyed_in_frame = True
        return ext_hook(code, data)

    def _decode(self, frame: RawFrame) -> list[Any]:
        assert frame.payload is not None
        try:
            items = unpack_values(frame.payload, self._ext_hook)
        except Exception as ex:  # msgpack raises several unrelated types
            raise self._undecodable(frame, ex) from ex
        if len(items) != frame.count:
            raise self._undecodable(frame, ValueError(
                f"payload holds {len(items)} items, frame says {frame.count}"))
        return items[frame.skip:] if frame.skip else items

    def _undecodable(self, frame: RawFrame, ex: BaseException) -> CorruptLog:
        # A valid checksum over an undecodable payload means a writer bug, not disk damage.
        return CorruptLog(self.log.segdir, 0, f"undecodable payload: {ex}",
                          (frame.first_seq, frame.first_seq + frame.count - 1))

    def _dispatch_closed(self, closed: ClosedBatch[Record] | None, replay: bool) -> None:
        if closed is None:
            return
        if replay:
            closed.reason = "replay"
        self._dispatch(closed)

    def _flush_open_batch_before_gap(self) -> None:
        for closed in self._take_all("replay"):
            self._dispatch(closed)

    # ----------------------------------------------------------- delivery

    def _dispatch(self, closed: ClosedBatch[Record]) -> None:
        if self._abandoned:
            return  # shutting down: the rest stays in the log
        with self._cv:
            self.batches_by_reason[closed.reason] = self.batches_by_reason.get(closed.reason, 0) + 1
        # A backlog is fed many batches per loop turn: save progress as it is made
        # (rate-limited), so repeated crashes during a long replay still move forward.
        self._write_checkpoint()
        if self._pool is None:
            self._deliver(closed)
            return
        key = closed.key
        slots = self.opts.flush_concurrency
        with self._cv:
            while True:
                if self.fatal is not None:
                    raise self.fatal
                if key is not None and key in self._key_queues:
                    if self._queued < _MAX_QUEUED_PER_SLOT * slots:
                        self._key_queues[key].append(closed)  # after the key's batch at the sink
                        self._queued += 1
                        return
                elif self._inflight < slots:
                    self._inflight += 1
                    if key is not None:
                        self._key_queues[key] = deque()
                    break
                self._cv.wait()
        self._pool.submit(self._deliver_in_pool, closed)

    def _deliver_in_pool(self, first: ClosedBatch[Record]) -> None:
        """Deliver a batch, then the batches of its key that queued up meanwhile, in order."""
        self._delivery_thread.active = True
        key = first.key
        closed: ClosedBatch[Record] | None = first
        try:
            while closed is not None:
                if not self._abandoned:
                    self._deliver(closed)
                with self._cv:
                    queue = self._key_queues.get(key) if key is not None else None
                    closed = queue.popleft() if queue else None
                    if closed is not None:
                        self._queued -= 1
                    self._cv.notify_all()
        except BaseException as ex:
            log.exception("walbatch delivery failed")
            with self._cv:
                self.fatal = ex
        finally:
            with self._cv:
                if key is not None:
                    self._queued -= len(self._key_queues.pop(key, ()))
                self._inflight -= 1
                self._cv.notify_all()

    def in_sink(self) -> bool:
        """True on a thread that calls the sink (the flusher's own or a pool thread)."""
        return threading.current_thread() is self.thread or getattr(
            self._delivery_thread, "active", False)

    def _deliver(self, closed: ClosedBatch[Record]) -> None:
        """Deliver one batch until every record is taken or dead-lettered (or shutdown)."""
        records = closed.items
        first, last = records[0].seq, records[-1].seq
        key = closed.key
        started = time.monotonic()
        attempt = 1
        todo = records
        coalesced = 0
        if self.opts.combine is not None:
            while True:
                try:
                    todo = self._combine(closed)
                    break
                except Exception as ex:  # a bug in the hook: loud, retried, nothing dropped
                    if not self._backoff(attempt, ex):
                        return
                    attempt += 1
            coalesced = len(records) - len(todo)
            attempt = 1
        dead: dict[int, str] = {}
        while todo:
            batch = Batch(todo, self.log_id, closed.reason, attempt, key, first, last, coalesced)
            if not self._breaker_allows():
                return  # shutdown deadline while the circuit was open: stays in the log
            t0 = time.monotonic()
            try:
                outcomes = self.sink.write(batch)
                failed = self._check_outcomes(batch, outcomes)
            except BaseException as ex:
                # SystemExit, KeyboardInterrupt or GeneratorExit raised *by the sink* on
                # this thread are its failures too: letting them through ended delivery
                # for the process and re-raised SystemExit in every flush() caller.
                permanent = self._is_permanent(ex)
                self._sink_answered(ok=permanent, latency=None, full=False)
                if permanent or self._gave_up(attempt, started):
                    dead.update(self._dead_letter(todo, ex, attempt, key))
                    break
                if not self._backoff(attempt, ex):
                    return  # shutdown deadline: the batch stays in the log
                attempt += 1
                continue
            self._sink_answered(ok=True, latency=time.monotonic() - t0,
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
                return
            todo = retry
            attempt += 1
        if coalesced:
            with self._cv:
                self.coalesced += coalesced
        self._complete_records(records, dead)

    def _combine(self, closed: ClosedBatch[Record]) -> list[Record]:
        """Run the combine hook; check it only dropped records or changed items."""
        assert self.opts.combine is not None
        batch = Batch(closed.items, self.log_id, closed.reason, 1, closed.key)
        kept = list(self.opts.combine(batch))
        seqs = {r.seq for r in closed.items}
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
        while True:
            with self._cv:
                wait = self.breaker.wait_time(time.monotonic())
            if wait <= 0:
                return True
            if self._stop.is_set() and (self._deadline is None
                                        or time.monotonic() + wait >= self._deadline):
                self._abandoned = True
                return False
            if self._stop.is_set():
                time.sleep(min(wait, 0.05))  # closing: keep checking the deadline
            else:
                self._stop.wait(wait)  # close() cuts the cool-down short

    def _sink_answered(self, ok: bool, latency: float | None, full: bool) -> None:
        """Feed the breaker and the adaptive size trigger with how the sink did."""
        if self.breaker is None and not self.opts.adaptive_batching:
            return
        with self._cv:
            if self.breaker is not None:
                if ok:
                    self.breaker.success()
                else:
                    self.breaker.failure(time.monotonic())
            if not self.opts.adaptive_batching:
                return
            limit = self.batch_limit
            if not ok or (latency is not None and latency > self.opts.adaptive_target_latency):
                new = max(self.opts.adaptive_min_items, limit // 2)
            elif full:
                new = min(self.opts.max_items, max(limit + 1, limit * 3 // 2))
            else:
                return
            if new != limit:
                self.batch_limit = self._limit_wanted = new
                self._cv.notify_all()

    def _check_outcomes(self, batch: Batch, outcomes: Any) -> list[tuple[Record, BaseException]]:
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
        for rec, out in zip(batch, outcomes, strict=True):
            if out is None:
                continue
            if not isinstance(out, BaseException):
                raise TypeError(f"sink outcome for seq {rec.seq} is {type(out).__name__}; "
                                "expected None or an exception")
            failed.append((rec, out))
        return failed

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
        with self._cv:
            self.retries += 1
            self.last_error = f"{type(ex).__name__}: {ex}"
        cap = min(self.opts.retry_max_delay, self.opts.retry_initial_delay * (2 ** (attempt - 1)))
        delay = random.uniform(0, cap)
        retry_after = getattr(ex, "retry_after", None)
        if isinstance(retry_after, (int, float)) and retry_after > delay:
            # The server said when to come back (HTTP Retry-After): wait at least that
            # long, but never more than an hour on its word alone.
            delay = min(float(retry_after), 3600.0)
        log.warning("walbatch sink failed (attempt %d), retrying in %.2fs: %s", attempt, delay, ex)
        wake_at = time.monotonic() + delay
        if not self._stop.is_set():
            self._stop.wait(delay)  # close() cuts the sleep short
        if self._stop.is_set():
            # Closing: retry only while the next attempt can start before the deadline.
            if self._deadline is None or wake_at >= self._deadline:
                self._abandoned = True
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
                  len(records), records[0].seq, records[-1].seq, text)
        return {r.seq: text for r in records}

    def _complete(self, first: int, last: int, delivered: int, dead_n: int,
                  dead: dict[int, str]) -> None:
        with self._cv:
            self._completed[first] = (last, delivered, dead_n)
            self._advance(delivered, dead_n, dead)

    def _complete_records(self, records: list[Record], dead: dict[int, str]) -> None:
        """Complete a delivered batch: every record not in ``dead`` was taken.

        A keyed batch's seqs interleave with other keys', so it completes one run of
        consecutive seqs at a time; an unkeyed batch is a single run.
        """
        first, last = records[0].seq, records[-1].seq
        if last - first + 1 == len(records):
            runs = [(first, last)]
        else:
            runs = []
            start = prev = first
            for rec in records[1:]:
                if rec.seq != prev + 1:
                    runs.append((start, prev))
                    start = rec.seq
                prev = rec.seq
            runs.append((start, prev))
        with self._cv:
            for a, b in runs:
                x = len(dead) if len(runs) == 1 else sum(1 for s in dead if a <= s <= b)
                self._completed[a] = (b, b - a + 1 - x, x)
            self._advance(len(records) - len(dead), len(dead), dead)

    def _advance(self, delivered: int, dead_n: int, dead: dict[int, str]) -> None:
        """Move done_through over the contiguous prefix of completed runs (holding _cv)."""
        if len(self.dead_seqs) < _MAX_REMEMBERED_DEAD:
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
        self._cv.notify_all()

    # --------------------------------------------------------- checkpoint

    def _write_checkpoint(self, force: bool = False) -> None:
        with self._cv:
            if self.done_through <= self.persisted.seq:
                return
            now = time.monotonic()
            if now < self._cp_retry_at and not (force and self._stop.is_set()):
                return
            if not (force or self._flush_waiters or self._stop.is_set()
                    or now - self._last_cp_write >= self.opts.checkpoint_interval):
                return
            cp = Checkpoint(self.log.log_id, self.done_through, self.delivered_total,
                            self.dead_total, max(self.done_through, self.log.synced_seq))
        segments = len(self.log.segments())
        try:
            self.log.commit_checkpoint(cp)
        except OSError as ex:
            # A full disk (ENOSPC) is transient: delivery goes on, and the next
            # attempt writes a checkpoint covering everything delivered by then.
            now = time.monotonic()
            with self._cv:
                self.last_error = f"checkpoint write failed: {type(ex).__name__}: {ex}"
                self._last_cp_write = now
                # Not at every loop turn (a waiting flush forces one each time): once a
                # second, and a warning at most every 30 s.
                self._cp_retry_at = now + 1.0
            if now - self._cp_warned >= 30.0:
                self._cp_warned = now
                log.warning("walbatch: %s; retrying every second", self.last_error)
            return
        with self._cv:
            self.persisted = cp
            self._last_cp_write = time.monotonic()
            self._cv.notify_all()
        if len(self.log.segments()) < segments:
            self.on_space()

    # ---------------------------------------------------------- for callers

    def wait_seq(self, seq: int, timeout: float | None) -> None:
        """Block until ``seq`` is delivered; raise DeadLettered or TimeoutError."""
        if self.in_sink():
            raise RuntimeError("Receipt.wait() called from inside the sink would wait for itself")
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self._is_complete(seq):
                if self.fatal is not None:
                    raise self.fatal
                if self.exited.is_set():
                    from .errors import Closed

                    raise Closed(f"the batcher closed before seq {seq} was delivered; "
                                 "it stays in the log for the next open")
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"seq {seq} not delivered within {timeout}s"
                                       + (f"; last sink error: {self.last_error}"
                                          if self.last_error else ""))
                self._cv.wait(left if left is None else min(left, 0.5))
            err = self.dead_seqs.get(seq)
            overflow = err is None and len(self.dead_seqs) >= _MAX_REMEMBERED_DEAD
        if overflow:  # past what memory keeps: the store knows
            err = self.dlq.error_of(self.log_id, seq)
        if err is not None:
            raise DeadLettered(seq, err)

    def _is_complete(self, seq: int) -> bool:
        if seq <= self.done_through:
            return True
        return any(first <= seq <= last for first, (last, _, _) in self._completed.items())

    def flush(self, target: int, timeout: float | None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._begin_flush(target)
            try:
                while not self._flushed(target, timeout, end):
                    self._cv.wait(0.5 if end is None else max(0.0, min(end - time.monotonic(), 0.5)))
            finally:
                self._flush_waiters -= 1

    async def aflush(self, target: int, timeout: float | None) -> None:
        """``flush`` for asyncio, holding no thread while it waits (it polls, 1-20 ms).

        A thread per waiting flush let a few long flushes take every thread of
        the daemon's executor, stalling other clients and the shutdown.
        """
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._begin_flush(target)
        try:
            delay = 0.001
            while True:
                with self._cv:
                    if self._flushed(target, timeout, end):
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
        finally:
            with self._cv:
                self._flush_waiters -= 1

    def _begin_flush(self, target: int) -> None:
        """(Holding _cv.) Deliver through ``target`` now, without waiting for batch triggers."""
        self._flush_target = max(self._flush_target, target)
        self._flush_waiters += 1
        self._cv.notify_all()

    def _flushed(self, target: int, timeout: float | None, end: float | None) -> bool:
        """(Holding _cv.) True once ``target`` is checkpointed; raises why it never will be."""
        if self.persisted.seq >= target:
            return True
        if self.fatal is not None:
            raise self.fatal
        if self.exited.is_set():
            from .errors import Closed

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

    def wake(self) -> None:
        """New data may be in the log (follow mode): look again."""
        with self._cv:
            self._cv.notify_all()

    def stop(self, deadline: float) -> None:
        with self._cv:
            self._deadline = deadline
            self._stop.set()
            self._cv.notify_all()
