"""Readiness and backpressure of a running batcher: policy only, no I/O of its own.

``Backpressure`` is the hysteresis behind the HTTP listener's 429: it engages when
the log's bytes reach ``high`` of ``max_log_bytes`` and releases only once they are
back below ``low``, so a log hovering at the mark does not flap between 200 and
429. Each transition is reported to the batcher's observers (``high_water``), which
log it once.

``not_ready`` lists why the batcher should not be sent traffic (``/readyz``): it is
shutting down, its log failed or delivery stopped, the log is above the high-water
mark, or the sink has been failing for longer than a grace period. A sink that
is merely slow, or failed a moment ago, keeps the process ready: the log is
there to absorb exactly that.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .durable import DurableBatcher


class Backpressure:
    """High/low water marks over the log's fill, with hysteresis.

    ``log_bytes`` is read at most every ``refresh`` seconds (a ``stats()``
    snapshot takes the delivery lock; a burst of requests shares one reading).
    """

    def __init__(self, batcher: DurableBatcher, high: float = 0.8, low: float = 0.6,
                 refresh: float = 0.02, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < low <= high <= 1:
            raise ValueError(f"the water marks must satisfy 0 < low <= high <= 1, not low={low} "
                             f"high={high}")
        self.batcher = batcher
        self.capacity = batcher.options.max_log_bytes
        self.high_bytes = int(high * self.capacity)
        self.low_bytes = int(low * self.capacity)
        self.refresh = refresh
        self._clock = clock
        self.engaged = False
        """True from crossing the high-water mark until the log is below the low one."""
        self.log_bytes = 0
        self._read_at = -1e18
        self._lock = threading.Lock()

    def check(self) -> bool:
        """True while submits should be refused (429): re-read the log size if due."""
        if self._clock() - self._read_at >= self.refresh:
            self.update(self.batcher.stats().log_bytes)
        return self.engaged

    def update(self, log_bytes: int) -> bool:
        """Apply a reading of the log's size; report a crossing; return ``engaged``."""
        with self._lock:
            self.log_bytes = log_bytes
            self._read_at = self._clock()
            before = self.engaged
            if log_bytes >= self.high_bytes:
                self.engaged = True
            elif log_bytes < self.low_bytes:
                self.engaged = False
            changed = self.engaged != before
        if changed:
            self.batcher.observers.high_water(self.engaged, log_bytes, self.capacity)
        return self.engaged


def not_ready(batcher: DurableBatcher, backpressure: Backpressure | None, sink_grace: float,
              stopping: bool = False) -> list[str]:
    """Why ``batcher`` should get no traffic now; empty when it is ready."""
    reasons = []
    if stopping or batcher.closed:
        reasons.append("shutting down")
    broken = batcher.broken
    if broken is not None:
        reasons.append(f"{type(broken).__name__}: {broken}")
    if backpressure is not None and backpressure.check():
        reasons.append(f"log above its high-water mark ({backpressure.log_bytes} of "
                       f"{backpressure.capacity} bytes); submits get 429 until it is below "
                       f"{backpressure.low_bytes} bytes")
    failing = batcher.state_log.sink_failing_for()
    if failing > sink_grace:
        last = batcher.stats().last_error
        reasons.append(f"sink failing for {failing:.0f}s (more than {sink_grace:g}s)"
                       + (f"; last error: {last}" if last else ""))
    free = _free_bytes(batcher.directory)
    need = batcher.options.segment_bytes
    if free is not None and free < need:
        reasons.append(f"the file system of {batcher.directory} has {free} bytes free, less "
                       f"than one segment (segment_bytes={need}): the next segment cannot be "
                       "written")
    return reasons


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
