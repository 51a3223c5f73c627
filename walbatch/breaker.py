"""Circuit breaker in front of the sink: stop hammering a sink that is down.

After ``failures`` transient failures in a row the circuit opens: no batch is
sent for ``cooldown`` seconds. Then it is half-open: exactly one batch (the
probe) goes through; if it succeeds the circuit closes, if it fails it opens
for another cooldown. Nothing is dropped while it is open: the items stay in
the log, and submitters only notice through the quota (LogFull) if it fills.

No threads and no clock of its own: callers pass the time and hold the lock
(the flusher's condition), so the state machine is tested by plain calls.
"""

from __future__ import annotations

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failures: int, cooldown: float) -> None:
        if failures < 1:
            raise ValueError(f"failures must be at least 1, not {failures}")
        self.failures = failures
        self.cooldown = cooldown
        self.state = CLOSED
        self.consecutive = 0
        self.opened = 0  # how many times the circuit opened
        self._open_until = 0.0
        self._probing = False

    def wait_time(self, now: float) -> float:
        """Seconds until a call may go through; 0 means go now (and, half-open, be the probe)."""
        if self.state == CLOSED:
            return 0.0
        if self.state == OPEN:
            if now < self._open_until:
                return self._open_until - now
            self.state = HALF_OPEN
        if self._probing:  # one probe at a time; the others wait for its verdict
            return min(self.cooldown, 0.05) or 0.01
        self._probing = True
        return 0.0

    def success(self) -> None:
        self.consecutive = 0
        self._probing = False
        self.state = CLOSED

    def failure(self, now: float) -> None:
        self.consecutive += 1
        was_probe = self._probing
        self._probing = False
        if was_probe or self.state == HALF_OPEN or (
                self.state == CLOSED and self.consecutive >= self.failures):
            if self.state != OPEN:
                self.opened += 1
            self.state = OPEN
            self._open_until = now + self.cooldown
