"""OpenTelemetry: the span that delivers a batch links to the spans its items were submitted in.

``trace(batcher)`` adds an observer (walbatch.observer) that

- on ``submitted``, in the submitter's thread or task, remembers the current span's
  context for the seqs just acknowledged (only when a span is recording: no
  span, no cost beyond one lookup);
- on ``sink_called``, makes one ``walbatch deliver`` span per ``sink.write``
  attempt, timed as the call, with ``walbatch.batch.size``, ``.reason``,
  ``.attempt``, ``walbatch.sink`` and ``walbatch.log_id``, an error status if it
  raised, and a link to each remembered context among the batch's seqs.

A context is forgotten once every seq it covers was delivered or dead-lettered,
and at most ``MAX_PENDING`` submits' contexts are kept (the oldest go first: an
item then loses its link, never itself). The OpenTelemetry SDK caps links per
span (128 by default). opentelemetry-api is the optional extra ``walbatch[otel]``,
imported only by ``trace()``; without it nothing here runs.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import TYPE_CHECKING, Any

from . import __version__
from .observer import Observer

if TYPE_CHECKING:
    from .durable import DurableBatcher
    from .record import Batch

MAX_PENDING = 100_000
"""Most submits whose span contexts wait for their items' delivery."""


def require() -> Any:
    """The opentelemetry.trace module, or ImportError naming the extra to install."""
    try:
        from opentelemetry import trace as otel_trace
    except ImportError as ex:
        raise ImportError("walbatch.tracing needs OpenTelemetry: pip install 'walbatch[otel]'") from ex
    return otel_trace


class Tracing(Observer):
    def __init__(self, batcher: DurableBatcher, tracer: Any = None, sink: str | None = None) -> None:
        otel = require()
        self._otel = otel
        self._tracer = tracer or otel.get_tracer("walbatch", __version__)
        self._current = otel.get_current_span
        self._link = otel.Link
        self._status_error = otel.Status(otel.StatusCode.ERROR)
        self._attrs = {"walbatch.log_id": batcher.log_id,
                       "walbatch.sink": sink or type(batcher.sink).__name__}
        self._lock = threading.Lock()
        self._firsts: list[int] = []  # first seqs of remembered submits, ascending
        self._ranges: dict[int, list[Any]] = {}  # first -> [last, context, seqs not yet done]
        self._dropped = 0  # entries of _firsts whose range was forgotten

    # ------------------------------------------------------------- hooks

    def submitted(self, first_seq: int, count: int) -> None:
        ctx = self._current().get_span_context()
        if not ctx.is_valid:
            return
        with self._lock:
            self._firsts.append(first_seq)
            self._ranges[first_seq] = [first_seq + count - 1, ctx, count]
            if len(self._ranges) > MAX_PENDING:
                oldest = next(iter(self._ranges))  # dicts keep insertion (= seq) order
                del self._ranges[oldest]
                self._dropped += 1
            if self._dropped > len(self._ranges):
                self._firsts = list(self._ranges)
                self._dropped = 0

    def sink_called(self, batch: Batch, seconds: float, error: BaseException | None,
                    permanent: bool) -> None:
        done = error is None or permanent  # its records leave the log's pending set
        links = self._take(batch, done)
        end = time.time_ns()
        span = self._tracer.start_span(
            "walbatch deliver", kind=self._otel.SpanKind.CLIENT,
            links=[self._link(ctx) for ctx in links], start_time=end - int(seconds * 1e9),
            attributes={**self._attrs, "walbatch.batch.size": len(batch),
                        "walbatch.batch.reason": batch.reason,
                        "walbatch.batch.attempt": batch.attempt})
        if error is not None:
            span.record_exception(error)
            span.set_status(self._status_error)
        span.end(end_time=end)

    # ----------------------------------------------------------- helpers

    def _take(self, batch: Batch, done: bool) -> list[Any]:
        """The contexts among the batch's seqs; forget those fully done when ``done``."""
        if not self._ranges:
            return []
        runs = batch.covers or _runs(batch)
        found: dict[int, Any] = {}
        with self._lock:
            firsts, ranges = self._firsts, self._ranges
            for a, b in runs:
                i = max(0, bisect.bisect_right(firsts, a) - 1)
                while i < len(firsts) and firsts[i] <= b:
                    first = firsts[i]
                    entry = ranges.get(first)
                    i += 1
                    if entry is None or entry[0] < a:
                        continue
                    found[first] = entry[1]
                    if done:
                        entry[2] -= min(b, entry[0]) - max(a, first) + 1
                        if entry[2] <= 0:
                            del ranges[first]
                            self._dropped += 1
        seen: set[int] = set()
        out = []
        for ctx in found.values():
            if ctx.span_id not in seen:
                seen.add(ctx.span_id)
                out.append(ctx)
        return out


def _runs(batch: Batch) -> list[tuple[int, int]]:
    first, last = batch[0].seq, batch[-1].seq
    if last - first + 1 == len(batch):
        return [(first, last)]
    runs: list[tuple[int, int]] = []
    for r in batch:
        if runs and runs[-1][1] + 1 == r.seq:
            runs[-1] = (runs[-1][0], r.seq)
        else:
            runs.append((r.seq, r.seq))
    return runs


def trace(batcher: DurableBatcher, tracer: Any = None, sink: str | None = None) -> Tracing:
    """Trace ``batcher``'s deliveries, linked to the submitters' spans; returns the observer.

    ``tracer``: an OpenTelemetry tracer (default: ``get_tracer("walbatch")`` from the
    global provider); ``sink``: the ``walbatch.sink`` attribute (default: the sink's
    class name). ``batcher.observers.remove(obs)`` stops it.
    """
    obs = Tracing(batcher, tracer, sink)
    batcher.observers.add(obs)
    return obs
