"""Hooks on the data path for metrics, state-change logs and tracing: one interface.

An ``Observer`` is told what happened where only the data path can see it: how
long a group commit's fsync took, that a batch closed, how a sink call went, a
breaker transition, the log filling up. Counters and gauges that
``DurableBatcher.stats()`` already holds are *not* hooks: a reader computes them
from a snapshot when it needs them (``walbatch.metrics`` at scrape time).

Who calls what (each one line at its site, never holding the delivery lock):

- ``fsynced``: the group committer's leader after each write + fsync (commit.py)
- ``submitted``: ``submit``/``asubmit``(``_many``) in the caller's thread or task,
  after the acknowledgement (durable.py), so a tracer sees the caller's context
- ``log_full``: a submit that has to wait for room in the log (durable.py)
- ``batch_closed``: the flusher, as it hands a batch on (flusher.py)
- ``sink_called``: after each ``sink.write`` attempt, and ``breaker_changed`` on a
  circuit breaker transition (sinkcall.py)
- ``delivery_stopped``: the flusher stopped for good, e.g. on corruption (flusher.py)
- ``high_water``: the log crossed its high-water mark or fell below its low one
  (``walbatch.health.Backpressure``, evaluated by the daemon)
- ``closed``: ``close()`` finished, with what the drain delivered (durable.py)

Observers are called on walbatch's own threads (the committer's leader, the
flusher, the sink's pool threads): they must be thread-safe and quick, and must
not call back into the batcher's delivery lock from ``breaker_changed``. One
that raises is logged (once per observer) and otherwise ignored: an observer
never fails a submit or a delivery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .record import Batch

log = logging.getLogger("walbatch")


class Observer(Protocol):
    """What the data path reports. Every hook has a no-op default: subclass it
    (``class Mine(Observer): ...``) and override only what you need."""

    def fsynced(self, seconds: float, first_seq: int, count: int) -> None:
        """A group commit made seqs ``first_seq .. first_seq+count-1`` durable; its write
        and fsync took ``seconds``."""

    def submitted(self, first_seq: int, count: int) -> None:
        """A submit was acknowledged (called in the submitter's thread or task)."""

    def log_full(self, log_bytes: int, capacity: int) -> None:
        """A submit found no room in the log and waits for delivery to free some."""

    def high_water(self, above: bool, log_bytes: int, capacity: int) -> None:
        """The log crossed its high-water mark (``above``) or fell below its low one."""

    def batch_closed(self, reason: str, items: int) -> None:
        """The flusher closed a batch of ``items`` records for ``reason``."""

    def sink_called(self, batch: Batch, seconds: float, error: BaseException | None,
                    permanent: bool) -> None:
        """One ``sink.write(batch)`` returned (``error`` None) or raised ``error``
        after ``seconds``; ``permanent``: the error sends the batch to dead letters."""

    def breaker_changed(self, state: str, failures: int) -> None:
        """The circuit breaker went to ``state`` (``open``, ``half_open``, ``closed``)
        after ``failures`` failures in a row."""

    def delivery_stopped(self, error: BaseException) -> None:
        """Delivery stopped for good (corrupt log, a bug): nothing more is delivered."""

    def closed(self, delivered_while_draining: int, left_in_log: int) -> None:
        """``close()`` finished: what the drain delivered, what stays for the next open."""


HOOKS = ("fsynced", "submitted", "log_full", "high_water", "batch_closed", "sink_called",
         "breaker_changed", "delivery_stopped", "closed")


def _noop(*_args: Any) -> None:
    return None


def _stopped_loudly(error: BaseException) -> None:
    # Without an observer (the state log removed, a bare Flusher) a stop is still no secret.
    log.error("walbatch: delivery stopped: %s: %s", type(error).__name__, error, exc_info=error)


_UNHEARD = {"delivery_stopped": _stopped_loudly}
"""What a hook nobody overrides does, where the no-op would hide something."""


class Observers:
    """The observers of one batcher, called as one.

    Each hook is an attribute rebuilt when an observer is added or removed: the
    no-op when no observer overrides it, so the data path pays one call for
    hooks nobody listens to.
    """

    def __init__(self) -> None:
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._failed: set[int] = set()
        self._rebuild()

    def add(self, observer: Any) -> None:
        """Start calling ``observer``'s hooks (an ``Observer``; missing hooks are skipped)."""
        with self._lock:
            if observer not in self._all:
                self._all.append(observer)
            self._rebuild()

    def remove(self, observer: Any) -> None:
        with self._lock:
            if observer in self._all:
                self._all.remove(observer)
            self._rebuild()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._all))

    def _rebuild(self) -> None:
        for name in HOOKS:
            fns = [getattr(o, name) for o in self._all if _overrides(o, name)]
            setattr(self, name, self._guarded(fns) if fns else _UNHEARD.get(name, _noop))

    def _guarded(self, fns: list[Callable[..., None]]) -> Callable[..., None]:
        if len(fns) == 1:
            fn = fns[0]

            def call(*args: Any) -> None:
                try:
                    fn(*args)
                except Exception:
                    self._report(fn)
            return call

        def fan_out(*args: Any) -> None:
            for fn in fns:
                try:
                    fn(*args)
                except Exception:
                    self._report(fn)
        return fan_out

    def _report(self, fn: Callable[..., None]) -> None:
        owner = getattr(fn, "__self__", fn)
        if id(owner) in self._failed:
            return
        self._failed.add(id(owner))
        log.exception("walbatch: observer %r failed in %s (logged once; its later failures "
                      "are ignored)", owner, getattr(fn, "__name__", fn))

    # Typed views of the hooks set by _rebuild (for readers and type checkers).
    fsynced: Callable[[float, int, int], None]
    submitted: Callable[[int, int], None]
    log_full: Callable[[int, int], None]
    high_water: Callable[[bool, int, int], None]
    batch_closed: Callable[[str, int], None]
    sink_called: Callable[[Batch, float, BaseException | None, bool], None]
    breaker_changed: Callable[[str, int], None]
    delivery_stopped: Callable[[BaseException], None]
    closed: Callable[[int, int], None]


def _overrides(observer: Any, name: str) -> bool:
    fn = getattr(type(observer), name, None)
    if fn is None:
        return callable(getattr(observer, name, None))  # e.g. set on the instance
    return fn is not getattr(Observer, name)
