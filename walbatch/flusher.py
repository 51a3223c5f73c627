"""The flusher thread: read acknowledged records, batch them, hand batches on.

Shape (huey's consumer): ``run()`` loops until told to stop; signals only set
flags under the delivery lock. Each turn it takes the next frames from the
intake (memory or disk), decodes them into ``Record``s, feeds the batch
policies (unkeyed and per key), closes batches on their triggers or for a
flush/shutdown/replay, dispatches them, and writes the checkpoint.

The parts, each its own module: ``intake`` (where frames come from),
``batcher`` (when a batch closes), ``dispatch`` (how many at the sink, per-key
order), ``sinkcall`` (retries, breaker, dead letters, outcomes), ``progress``
(what is complete, waiting for it, the checkpoint).

Ownership: the batch policies, the read position and the checkpointer belong
to this thread alone; everything shared is guarded by ``cv``, the one delivery
lock the parts are built around.

Invariant: the checkpoint moves only over a contiguous prefix of seqs that are
delivered or durably dead-lettered, whatever order batches complete in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .batcher import BatchPolicy, ClosedBatch, KeyedPolicies
from .codec import unpack_values
from .dispatch import Dispatcher
from .dlq import DeadLetterStore
from .errors import CorruptLog
from .framing import decode_items
from .intake import Intake
from .keys import KEY_EXT, Keyed, ext_hook
from .log import Log, RawFrame
from .observer import Observers
from .options import Options
from .progress import Checkpointer, Progress
from .record import Record
from .sinkcall import Shutdown, SinkCaller

_record = partial(tuple.__new__, Record)  # Record((seq, item)) built in C

log = logging.getLogger("walbatch")


class Flusher:
    def __init__(self, log_: Log, sink: Any, dlq: DeadLetterStore, opts: Options,
                 follow: bool = False, on_space: Callable[[], None] = lambda: None,
                 observers: Observers | None = None) -> None:
        self.log = log_
        self.opts = opts
        self.observers = observers = observers or Observers()
        log_id = str(log_.log_id)
        self.cv = threading.Condition(threading.Lock())
        self.exited = threading.Event()
        self.progress = Progress(log_.checkpoint, self.cv, self.exited,
                                 lambda seq: dlq.error_of(log_id, seq))
        self.shutdown = Shutdown()
        self.intake = Intake(log_, self.cv, opts.memory_tail_bytes, log_.checkpoint.seq + 1,
                             follow)
        self.caller = SinkCaller(sink, opts, dlq, log_id, self.progress, self.shutdown, observers)
        self.dispatcher = Dispatcher(opts.flush_concurrency, self.caller.deliver, self.progress,
                                     self.shutdown)
        self.checkpointer = Checkpointer(log_, self.progress, opts.checkpoint_interval, on_space)
        # --- flusher thread only
        self.policy: BatchPolicy[Record] = BatchPolicy(opts.max_items, opts.max_bytes, opts.max_delay)
        self.keyed: KeyedPolicies[Record] = KeyedPolicies(opts.max_items, opts.max_bytes,
                                                          opts.max_delay, opts.max_open_keys)
        self._keyed_in_frame = False  # set by _ext_hook while decoding
        self._read_seq = log_.checkpoint.seq + 1
        self._replay_end = log_.synced_seq  # records <= this were found at open
        self.thread = threading.Thread(target=self._run, name="walbatch-flusher", daemon=True)

    # ------------------------------------------------------------ control

    def on_durable(self, first_seq: int, count: int, payload: bytes,
                   decoded: list[Any] | None = None) -> None:
        """Called by the group committer, in seq order, after each fsync."""
        self.intake.on_durable(first_seq, count, payload, decoded)

    def start(self) -> None:
        self.thread.start()

    def stop(self, deadline: float) -> None:
        """Deliver what is acknowledged until ``deadline`` (monotonic), then exit."""
        with self.cv:
            self.shutdown.request(deadline)
            self.cv.notify_all()

    def wake(self) -> None:
        """New data may be in the log (follow mode): look again."""
        with self.cv:
            self.cv.notify_all()

    def in_sink(self) -> bool:
        """True on a thread that calls the sink (the flusher's own or a pool thread)."""
        return threading.current_thread() is self.thread or self.dispatcher.in_pool_thread()

    # --------------------------------------------------------------- loop

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as ex:  # a flusher that dies must say so, loudly
            self.observers.delivery_stopped(ex)  # the state log says it, once
            self.progress.fail(ex)
        finally:
            try:
                self.checkpointer.write(force=True, stopping=self.shutdown.requested)
            except Exception:
                log.exception("walbatch: final checkpoint write failed")
            self.dispatcher.close()
            self.intake.close()
            self.progress.finish()

    def _loop(self) -> None:
        sd = self.shutdown
        while True:
            if sd.requested and (sd.abandoned or sd.past_deadline()):
                return
            if self.caller.adaptive is not None:
                self._apply_limit()
            frames = self.intake.take(self._read_seq)
            now = time.monotonic()
            for frame in frames:
                self._feed(frame, now)
            if not frames:
                for closed in self._poll(now):
                    self._dispatch(closed)
                if self._open_items() and self._flush_due():
                    for closed in self._take_all("shutdown" if sd.requested else "flush"):
                        self._dispatch(closed)
            self.checkpointer.write(stopping=sd.requested)
            if frames:
                continue
            with self.cv:
                if sd.requested and self._read_seq > self.log.synced_seq:
                    if not self._open_items() and self.dispatcher.inflight == 0:
                        return
                    if self._open_items():
                        continue
                if self.intake.ready(self._read_seq):
                    continue
                open_items = self._open_items()
                self.intake.sleep(self._next_wakeup(now),
                                  1 if not open_items else max(1, self.policy.max_items - open_items))

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
        assert self.caller.adaptive is not None
        with self.cv:
            n = self.caller.adaptive.take_wanted()
        if n is None:
            return
        closed = self.policy.set_max_items(n)
        for c in ([closed] if closed is not None else []) + self.keyed.set_max_items(n):
            self._dispatch(c)

    def _next_wakeup(self, now: float) -> float | None:
        """(Holding cv.) How long the loop may sleep: the nearest batch timer or deadline."""
        times = []
        due = self.policy.deadline()
        if due is not None:
            times.append(due - now)
        due = self.keyed.deadline() if len(self.keyed) else None
        if due is not None:
            times.append(due - now)
        due = self.checkpointer.due_in(now)
        if due is not None:
            times.append(due)
        if self.shutdown.deadline is not None:
            times.append(self.shutdown.deadline - now)
        if not times:
            return None
        return max(0.0, min(times)) + 0.0005

    def _flush_due(self) -> bool:
        """Close the open batch early: a flush() or close() wants everything read so far."""
        with self.cv:
            stopping = self.shutdown.requested
            wanted = self.log.synced_seq if stopping else self.progress.flush_target
            return (self.progress.flush_waiters > 0 or stopping) and self._read_seq > wanted

    # --------------------------------------------------------------- feed

    def _feed(self, frame: RawFrame, now: float) -> None:
        if frame.payload is None:  # seqs lost to quarantined corruption
            self._flush_open_batch_before_gap()
            last = frame.first_seq + frame.count - 1
            first = max(frame.first_seq, self._read_seq)
            self.progress.complete_range(first, last, 0, last - first + 1)
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
        decoded = frame.decoded  # never keyed: keyed items are not handed over
        if decoded is not None and len(decoded) == frame.count:  # else the bytes decide
            return decoded[frame.skip:] if frame.skip else decoded
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

    def _dispatch(self, closed: ClosedBatch[Record]) -> None:
        if self.shutdown.abandoned:
            return  # shutting down: the rest stays in the log
        self.progress.count_batch(closed.reason)
        self.observers.batch_closed(closed.reason, len(closed.items))
        # A backlog is fed many batches per loop turn: save progress as it is made
        # (rate-limited), so repeated crashes during a long replay still move forward.
        self.checkpointer.write(stopping=self.shutdown.requested)
        self.dispatcher.dispatch(closed)
