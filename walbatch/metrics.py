"""Prometheus metrics of one DurableBatcher, in a prometheus-client registry.

``register(batcher, registry)`` adds two things:

- a collector that reads ``batcher.stats()`` at scrape time for every counter and
  gauge the snapshot already holds (submitted, delivered, pending, log bytes,
  flushes by reason, ...): nothing is counted twice and the data path pays nothing;
- an observer (walbatch.observer) for what only the data path sees: the
  histograms of fsync time, commit group and batch sizes and sink write time,
  sink errors by kind, and when each group commit was acknowledged (for the age
  of the oldest pending item). A histogram observation costs the data path one
  deque append: the values are folded into prometheus-client's histograms when
  scraped (or every ``FOLD_AT`` values). Observing them in place cost 3-5% of the
  16-thread submit rate (benchmarks/bench_metrics.py), though well under 1% of a
  core: the leader of a group commit waited on the GIL for the others' bookkeeping.

The names are fixed (docs/operations.md lists them; the alert rules and the
dashboard in docs/ops/ use them). The daemon serves them on ``GET /metrics``
(``walbatch serve --http``); an embedding application serves its registry itself.
prometheus-client is the optional extra ``walbatch[metrics]`` (``walbatch[http]``
includes it), imported only here.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .observer import Observer

if TYPE_CHECKING:
    from .durable import DurableBatcher
    from .record import Batch

FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5, 5.0)
SINK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)
ITEM_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)
FOLD_AT = 8192
"""Values waiting for a scrape, per histogram, before the data path folds them itself."""


class _Deferred:
    """A histogram fed at the cost of a deque append, folded into prometheus-client's later.

    ``add`` may be called from any thread (deque appends and pops are atomic); ``fold``
    too, so no value is lost or counted twice.
    """

    __slots__ = ("histogram", "values")

    def __init__(self, histogram: Any) -> None:
        self.histogram = histogram
        self.values: deque[float] = deque()

    def add(self, value: float) -> None:
        self.values.append(value)
        if len(self.values) > FOLD_AT:
            self.fold()

    def fold(self) -> None:
        pop, observe = self.values.popleft, self.histogram.observe
        while True:
            try:
                value = pop()
            except IndexError:
                return
            observe(value)


class _Fold:
    """Registered before the histograms: at scrape, folds what waits into them first."""

    def __init__(self, deferred: list[_Deferred]) -> None:
        self.deferred = deferred

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        for d in self.deferred:
            d.fold()
        return []


def require() -> Any:
    """The prometheus_client module, or ImportError naming the extra to install."""
    try:
        import prometheus_client
    except ImportError as ex:
        raise ImportError("walbatch's Prometheus metrics need prometheus-client: "
                          "pip install 'walbatch[metrics]' (or 'walbatch[http]' for the daemon's "
                          "HTTP listener)") from ex
    return prometheus_client


class Metrics:
    """The metrics of one batcher in one registry. ``unregister()`` takes them out again."""

    def __init__(self, batcher: DurableBatcher, registry: Any = None) -> None:
        pc = require()
        self.batcher = batcher
        self.registry = pc.REGISTRY if registry is None else registry
        self.acks = AckClock(batcher.stats().submitted)
        self._collector = _StatsCollector(batcher, self.acks)
        h = pc.Histogram
        self.fsync_seconds = h("walbatch_fsync_duration_seconds", "Time to write and fsync one "
                               "group commit (what an acknowledgement waits for).",
                               buckets=FSYNC_BUCKETS, registry=None)
        self.group_items = h("walbatch_commit_group_items", "Items made durable by one group "
                             "commit (one write and one fsync).", buckets=ITEM_BUCKETS, registry=None)
        self.batch_items = h("walbatch_batch_items", "Items in each batch the flusher closed.",
                             buckets=ITEM_BUCKETS, registry=None)
        self.sink_seconds = h("walbatch_sink_write_duration_seconds", "Time of each sink.write "
                              "call, successful or not.", buckets=SINK_BUCKETS, registry=None)
        self.sink_errors = pc.Counter("walbatch_sink_errors_total", "sink.write calls that raised, "
                                      "by kind: transient (retried) or permanent (dead-lettered).",
                                      ["kind"], registry=None)
        for kind in ("transient", "permanent"):
            self.sink_errors.labels(kind)  # both series exist from the start, at 0
        self.deferred = [_Deferred(h) for h in (self.fsync_seconds, self.group_items,
                                                self.batch_items, self.sink_seconds)]
        self._own = [_Fold(self.deferred), self._collector, self.fsync_seconds, self.group_items,
                     self.batch_items, self.sink_seconds, self.sink_errors]
        registered: list[Any] = []
        try:
            for c in self._own:
                self.registry.register(c)
                registered.append(c)
        except ValueError as ex:  # a name taken: another batcher's metrics in this registry
            for c in registered:
                self.registry.unregister(c)
            raise ValueError(f"{ex}: a registry holds the metrics of one batcher; give each "
                             "batcher its own prometheus_client.CollectorRegistry") from None
        self._observer = _Observer(self)
        batcher.observers.add(self._observer)

    def unregister(self) -> None:
        self.batcher.observers.remove(self._observer)
        for c in self._own:
            self.registry.unregister(c)


def register(batcher: DurableBatcher, registry: Any = None) -> Metrics:
    """Export ``batcher``'s metrics into ``registry`` (prometheus-client's default if None).

    One batcher per registry: the names carry no label to tell two apart.
    """
    return Metrics(batcher, registry)


class _Observer(Observer):
    """The hot-path half: a histogram observation or two per hook, nothing else."""

    def __init__(self, m: Metrics) -> None:
        self._fsync, self._group, self._batch, self._sink = (d.add for d in m.deferred)
        self._transient = m.sink_errors.labels("transient").inc
        self._permanent = m.sink_errors.labels("permanent").inc
        self._acked = m.acks.acked

    def fsynced(self, seconds: float, first_seq: int, count: int) -> None:
        self._fsync(seconds)
        self._group(count)
        self._acked(first_seq)

    def batch_closed(self, reason: str, items: int) -> None:
        self._batch(items)

    def sink_called(self, batch: Batch, seconds: float, error: BaseException | None,
                    permanent: bool) -> None:
        self._sink(seconds)
        if error is not None:
            (self._permanent if permanent else self._transient)()


class AckClock:
    """When the oldest pending item was acknowledged, to within ``grain`` seconds.

    A mark ``(first_seq, time)`` says: the seqs from ``first_seq`` on were
    acknowledged at ``time`` or later. A new mark is made at most once per
    ``grain`` (the first group commit after it passed), so the hot path is one
    clock read and a comparison; the age of a seq is read from the last mark at
    or before it, so it is at most ``grain`` too old, never too young. Items
    already in the log at start count from the start: their acknowledgement
    time was not recorded. At most ``max_marks`` are kept: past that, they are
    merged into coarser ones (``grain`` at least doubles), which bounds memory
    however long the sink is down (a day of outage at 4,096 marks is a
    precision of about 40 seconds).
    """

    def __init__(self, synced_at_open: int, grain: float = 0.1, max_marks: int = 4096,
                 clock: Any = time.monotonic) -> None:
        self.grain = grain
        self.max_marks = max_marks
        self._clock = clock
        self._opened = clock()
        self._open_seq = synced_at_open
        self._marks: deque[tuple[int, float]] = deque()
        self._next = -1e18  # no mark before this time (read without the lock: one writer)
        self._lock = threading.Lock()

    def acked(self, first_seq: int) -> None:
        """Seqs from ``first_seq`` on were just acknowledged (called in seq order)."""
        now = self._clock()
        if now < self._next:
            return
        with self._lock:
            self._marks.append((first_seq, now))
            if len(self._marks) > self.max_marks:
                self._coarsen(now)
            self._next = now + self.grain

    def _coarsen(self, now: float) -> None:
        """(Holding the lock.) Merge marks at a grain that leaves half the room.

        Of marks less than the new grain apart only the earliest stays: it covers
        the later ones' seqs at an earlier time, so ages only grow, by less than
        the grain.
        """
        span = now - self._marks[0][1]
        self.grain = max(self.grain * 2, span / (self.max_marks // 2))
        merged: deque[tuple[int, float]] = deque()
        for mark in self._marks:
            if not merged or mark[1] - merged[-1][1] >= self.grain:
                merged.append(mark)
        self._marks = merged

    def oldest_age(self, done_through: int, synced: int) -> float:
        """Seconds since the first seq after ``done_through`` was acknowledged (0: none pending)."""
        if done_through >= synced:
            return 0.0
        now = self._clock()
        oldest = done_through + 1
        if oldest <= self._open_seq:
            return now - self._opened
        with self._lock:
            marks = self._marks
            while len(marks) > 1 and marks[1][0] <= oldest:
                marks.popleft()  # delivered: the next mark covers the oldest pending seq
            if marks and marks[0][0] <= oldest:
                return now - marks[0][1]
        return now - self._opened


class _StatsCollector:
    """The scrape-time half: one ``stats()`` snapshot becomes the counters and gauges."""

    def __init__(self, batcher: DurableBatcher, acks: AckClock) -> None:
        self.batcher = batcher
        self.acks = acks
        self.capacity = batcher.options.max_log_bytes

    def describe(self) -> list[Any]:
        return []  # names are fixed, but describing them would need a snapshot at registration

    def collect(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        b = self.batcher
        s = b.stats()

        def counter(name: str, doc: str, value: float) -> Any:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> Any:
            return GaugeMetricFamily(name, doc, value=value)

        flushes = CounterMetricFamily("walbatch_flushes", "Batches closed, by why they closed "
                                      "(size, bytes, time, flush, shutdown, replay, keys).",
                                      labels=["reason"])
        for reason, n in sorted(s.batches_by_reason.items()):
            flushes.add_metric([reason], n)
        return [
            counter("walbatch_items_submitted", "Items acknowledged (fsync'd) since the log was "
                    "created.", s.submitted),
            counter("walbatch_items_delivered", "Items the sink took since the log was created.",
                    s.delivered),
            counter("walbatch_items_dead_lettered", "Items moved to the dead-letter store since "
                    "the log was created.", s.dead_lettered),
            counter("walbatch_items_lost_to_corruption", "Acknowledged items lost to damage "
                    "that was quarantined or repaired (recorded as dead letters).",
                    s.lost_to_corruption),
            gauge("walbatch_items_pending", "Acknowledged items not yet delivered or "
                  "dead-lettered.", s.pending),
            gauge("walbatch_oldest_pending_age_seconds", "How long ago the oldest pending item "
                  "was acknowledged (0 when nothing is pending).",
                  self.acks.oldest_age(s.done_through, s.submitted) if s.pending else 0.0),
            gauge("walbatch_log_bytes", "Bytes in the log's segments.", s.log_bytes),
            gauge("walbatch_log_capacity_bytes", "The log's quota (max_log_bytes); submits wait "
                  "for room past it.", self.capacity),
            gauge("walbatch_log_segments", "Segment files in the log.", s.segments),
            gauge("walbatch_breaker_open", "1 while the circuit breaker keeps batches from the "
                  "sink (open or half-open), else 0.",
                  1 if s.breaker_state in ("open", "half_open") else 0),
            counter("walbatch_breaker_opens", "Times the circuit breaker opened.", s.breaker_opens),
            gauge("walbatch_sink_failing_seconds", "How long the sink has been failing without a "
                  "success in between (0 while it works).", b.state_log.sink_failing_for()),
            counter("walbatch_sink_retries", "Failed delivery attempts that were retried.",
                    s.retries),
            gauge("walbatch_failed", "1 when the log refuses writes (a failed fsync) or delivery "
                  "stopped (a corrupt log) until the daemon is restarted or the log repaired.",
                  1 if b.broken is not None else 0),
            counter("walbatch_fsyncs", "fsync calls on the log (data, checkpoint, directories).",
                    s.fsyncs),
            counter("walbatch_commit_groups", "Group commits (one write and one fsync each).",
                    s.commit_groups),
            flushes,
        ]
