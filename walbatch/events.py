"""State changes of one open log's delivery, logged once each (never per batch).

``StateLog`` is the observer every ``Delivery`` installs. It turns the data
path's hooks (walbatch.observer) into one log line per change of state: the
sink started failing (then a summary every ``summary_interval`` seconds while it
keeps failing, with counts) and recovered (how long it was down, how many items
waited), the circuit breaker opened or closed, the log crossed its high-water
mark or cleared it, the log is full, delivery stopped (corruption), and the
close summary. It also remembers since when the sink has been failing, which is
what ``/readyz`` asks (``sink_failing_for``).

Every line is a plain ``logging`` record on the ``walbatch`` logger whose
``extra`` fields carry the numbers (``event`` names the change), so
``--log-format json`` and an embedding application's own handlers see them as
fields, not only inside the message. The field names are listed in
docs/operations.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import WalbatchError
from .observer import Observer

if TYPE_CHECKING:
    from .record import Batch

log = logging.getLogger("walbatch")


class StateLog(Observer):
    summary_interval = 300.0
    """Seconds between "still failing" summaries while the sink keeps failing."""
    full_interval = 60.0
    """At most one "log full" line per this many seconds."""

    def __init__(self, pending: Callable[[], int], clock: Callable[[], float] = time.monotonic) -> None:
        self._pending = pending
        self._clock = clock
        self._lock = threading.Lock()
        self.failing_since: float | None = None
        """Monotonic time of the first failure of the current outage; None while the sink works."""
        self._failures = 0
        self._since_summary = 0
        self._summary_at = 0.0
        self._full_at: float | None = None

    def sink_failing_for(self) -> float:
        """Seconds the sink has been failing without a success in between (0 while it works)."""
        since = self.failing_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    # ------------------------------------------------------------- hooks

    def sink_called(self, batch: Batch, seconds: float, error: BaseException | None,
                    permanent: bool) -> None:
        if error is None or permanent:  # the sink answered (a refusal is the data's fault)
            if self.failing_since is None:
                return
            with self._lock:
                since, failures = self.failing_since, self._failures
                if since is None:
                    return
                self.failing_since = None
                self._failures = 0
            down = self._clock() - since
            waiting = self._pending()
            log.info("walbatch: sink recovered after %.1fs down (%d failed attempts); %d "
                     "item(s) waited in the log and are being delivered", down, failures,
                     waiting, extra={"event": "sink_recovered", "down_seconds": round(down, 3),
                                     "failed_attempts": failures, "waiting_items": waiting})
            return
        now = self._clock()
        text = f"{type(error).__name__}: {error}"
        with self._lock:
            first = self.failing_since is None
            if first:
                self.failing_since = now
                self._failures = 0
                self._since_summary = 0
                self._summary_at = now
            self._failures += 1
            self._since_summary += 1
            summary = not first and now - self._summary_at >= self.summary_interval
            if summary:
                since_summary, self._since_summary, self._summary_at = self._since_summary, 0, now
            failures, down = self._failures, now - (self.failing_since or now)
        if first:
            log.warning("walbatch: sink failing: %s; the batch stays in the log and is retried "
                        "with backoff (a summary follows every %ds while it fails)", text,
                        self.summary_interval,
                        extra={"event": "sink_failing", "error": text, "batch_items": len(batch),
                               "attempt": batch.attempt})
        elif summary:
            log.warning("walbatch: sink still failing after %.0fs: %d failed attempts (%d since "
                        "the last summary), %d item(s) waiting; last error: %s", down, failures,
                        since_summary, self._pending(), text,
                        extra={"event": "sink_still_failing", "down_seconds": round(down, 3),
                               "failed_attempts": failures, "error": text})

    def breaker_changed(self, state: str, failures: int) -> None:
        if state == "open":
            log.warning("walbatch: circuit breaker opened after %d failure(s) in a row; the "
                        "sink is not called until the cool-down ends", failures,
                        extra={"event": "breaker_opened", "failures": failures})
        elif state == "closed":
            log.info("walbatch: circuit breaker closed: the probe batch went through",
                     extra={"event": "breaker_closed"})
        else:
            log.debug("walbatch: circuit breaker half-open: one probe batch goes through",
                      extra={"event": "breaker_half_open"})

    def high_water(self, above: bool, log_bytes: int, capacity: int) -> None:
        pct = 100.0 * log_bytes / capacity if capacity else 0.0
        fields = {"log_bytes": log_bytes, "capacity_bytes": capacity}
        if above:
            log.warning("walbatch: log above its high-water mark: %d of %d bytes (%.0f%%); HTTP "
                        "submits get 429 until it drains below the low-water mark", log_bytes,
                        capacity, pct, extra={"event": "high_water_crossed", **fields})
        else:
            log.info("walbatch: log back below its low-water mark: %d of %d bytes (%.0f%%)",
                     log_bytes, capacity, pct, extra={"event": "high_water_cleared", **fields})

    def log_full(self, log_bytes: int, capacity: int) -> None:
        now = self._clock()
        with self._lock:
            if self._full_at is not None and now - self._full_at < self.full_interval:
                return
            self._full_at = now
        log.warning("walbatch: log full: %d of max_log_bytes=%d bytes; submits wait up to "
                    "submit_timeout for delivery to free room, then fail with LogFull",
                    log_bytes, capacity,
                    extra={"event": "log_full", "log_bytes": log_bytes, "capacity_bytes": capacity})

    def delivery_stopped(self, error: BaseException) -> None:
        # Our own errors (a corrupt log) say everything in one line; anything else is a bug.
        log.error("walbatch: delivery stopped: %s: %s", type(error).__name__, error,
                  exc_info=None if isinstance(error, WalbatchError) else error,
                  extra={"event": "delivery_stopped", "error": f"{type(error).__name__}: {error}"})

    def closed(self, delivered_while_draining: int, left_in_log: int) -> None:
        log.info("walbatch: closed: %d item(s) delivered while draining, %d left in the log for "
                 "the next open", delivered_while_draining, left_in_log,
                 extra={"event": "closed", "drained_items": delivered_while_draining,
                        "left_items": left_in_log})
