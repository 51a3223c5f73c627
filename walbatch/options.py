"""Every tunable of a DurableBatcher, in one place, with its default."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from .record import Batch, Record


@dataclass(frozen=True)
class Options:
    # -- batching ---------------------------------------------------------
    max_items: int = 500
    """A batch closes when it holds this many items (reason ``size``)."""
    max_bytes: int = 1 << 20
    """... or when the next item would take it past this many encoded bytes
    (``bytes``). An item larger than this travels alone."""
    max_delay: float = 0.2
    """... or this many seconds after its first item arrived (``time``)."""
    flush_concurrency: int = 1
    """How many batches may be at the sink at once. The checkpoint still only
    moves over a contiguous prefix of completed batches; batches of one key
    still reach the sink one at a time, in order."""
    max_open_keys: int = 1024
    """Keyed batching (``submit(item, key=...)``): at most this many keys have an
    open batch; a new key past it closes the oldest open batch (reason ``keys``)."""
    combine: Callable[[Batch], Iterable[Record]] | None = None
    """Coalescing hook: ``combine(batch)`` returns the records to deliver, e.g.
    only the last update per user id (``walbatch.combine.last_by``). It may drop
    records and change items, not invent seqs; the dropped ones count as
    delivered (``coalesced``) once the batch is."""
    adaptive_batching: bool = False
    """Let the size trigger move between ``adaptive_min_items`` and ``max_items``:
    grow while batches fill and deliveries are fast, halve on a sink error or a
    delivery slower than ``adaptive_target_latency``."""
    adaptive_min_items: int = 10
    """Lower bound of the adaptive size trigger."""
    adaptive_target_latency: float = 1.0
    """Seconds: a delivery slower than this shrinks the adaptive size trigger."""

    # -- the log ----------------------------------------------------------
    segment_bytes: int = 64 << 20
    """A segment is sealed and a new one started past this size."""
    max_log_bytes: int = 1 << 30
    """Quota for all segments. When full, submit waits (up to ``submit_timeout``)
    for delivery to free space, then raises LogFull. Must be at least twice
    ``segment_bytes``: only whole, sealed segments are freed."""
    submit_timeout: float = 30.0
    """How long submit waits for room in a full log before raising LogFull."""
    max_group_bytes: int = 4 << 20
    """Cap on one group commit: concurrent submitters share a write and an
    fsync until their items add up to this."""
    checkpoint_interval: float = 0.1
    """Write the checkpoint at most this often (plus on flush and close); a crash
    redelivers at most this much to the sink, which drops the duplicates."""
    memory_tail_bytes: int = 64 << 20
    """Items wait for delivery in memory up to this size; past it the flusher
    reads them back from the log instead."""
    on_corruption: str = "raise"
    """``raise``: damage before the tail raises CorruptLog on open.
    ``quarantine``: move damaged bytes to ``quarantine/``, report the lost seqs
    (as dead letters) and go on."""
    strict_modes: bool = False
    """Refuse a data directory that a user other than this process's (or root)
    can write to, or that lies under one (as ssh's StrictModes): such a user could
    delete the lock or plant links for walbatch to write through. The daemon
    turns it on (``walbatch serve --no-strict-modes`` turns it off)."""

    # -- delivery failures ------------------------------------------------
    retry_initial_delay: float = 0.1
    """First retry waits up to this long (full jitter: uniform in [0, delay])."""
    retry_max_delay: float = 30.0
    """Cap on the backoff delay, which doubles with each attempt."""
    retry_limit: int | None = None
    """Attempts before a batch goes to dead letters. None (the default) retries
    a transient error forever: the log holds the items while the sink is down."""
    retry_max_elapsed: float | None = None
    """Seconds since a batch's first attempt after which a failure sends it to
    dead letters instead of retrying. None: no time limit."""
    permanent_errors: tuple[type[BaseException], ...] = ()
    """Exception types raised by the sink that retrying cannot fix; the batch
    goes to dead letters at once. ``PermanentSinkError`` always is."""
    breaker_failures: int | None = None
    """Circuit breaker: after this many transient sink failures in a row, stop
    calling the sink for ``breaker_cooldown`` seconds, then let one probe batch
    through. None (the default): no breaker, only the backoff."""
    breaker_cooldown: float = 30.0
    """Seconds the open circuit breaker waits before its probe."""

    # -- shutdown ---------------------------------------------------------
    close_timeout: float = 30.0
    """How long ``with DurableBatcher(...)`` waits at exit to deliver what is
    left; the rest stays in the log for the next open."""

    def __post_init__(self) -> None:
        for name in POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name in SECONDS:
            if getattr(self, name) is not None or name != "retry_max_elapsed":
                _check_seconds(name, getattr(self, name))
        if self.max_log_bytes < 2 * self.segment_bytes:
            raise ValueError(
                f"max_log_bytes ({self.max_log_bytes}) must be at least twice segment_bytes "
                f"({self.segment_bytes}): only whole sealed segments are freed"
            )
        if self.on_corruption not in ("raise", "quarantine"):
            raise ValueError(
                f"on_corruption must be 'raise' or 'quarantine', not {self.on_corruption!r}"
            )
        for name in ("retry_limit", "breaker_failures"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name} must be None or an integer of at least 1, not {value!r}")
        if self.adaptive_batching and self.adaptive_min_items > self.max_items:
            raise ValueError(f"adaptive_min_items ({self.adaptive_min_items}) may not exceed "
                             f"max_items ({self.max_items}), the adaptive trigger's upper bound")
        errors = self.permanent_errors
        if not isinstance(errors, tuple) or not all(
                isinstance(e, type) and issubclass(e, BaseException) for e in errors):
            raise TypeError(f"permanent_errors must be a tuple of exception classes, not {errors!r}")
        if self.combine is not None and not callable(self.combine):
            raise TypeError(f"combine must be a callable taking a batch, not "
                            f"{type(self.combine).__name__}")
        if not isinstance(self.strict_modes, bool):
            raise ValueError(f"strict_modes must be True or False, not {self.strict_modes!r}")
        if not isinstance(self.adaptive_batching, bool):
            raise ValueError(f"adaptive_batching must be True or False, not {self.adaptive_batching!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# A day: longer waits are surely a mistake, and inf overflows the clocks waits use.
MAX_SECONDS = 86400.0

POSITIVE = ("max_items", "max_bytes", "flush_concurrency", "segment_bytes", "max_log_bytes",
            "max_group_bytes", "memory_tail_bytes", "max_open_keys", "adaptive_min_items")
"""Options that are counts or sizes of at least 1."""
SECONDS = ("max_delay", "submit_timeout", "checkpoint_interval", "retry_initial_delay",
           "retry_max_delay", "close_timeout", "adaptive_target_latency", "breaker_cooldown",
           "retry_max_elapsed")
"""Options in seconds, from 0 to MAX_SECONDS (retry_max_elapsed may also be None)."""


def _check_seconds(name: str, value: object) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not 0 <= value <= MAX_SECONDS):  # also false for NaN
        raise ValueError(f"{name} must be a number of seconds from 0 to {MAX_SECONDS:g} "
                         f"(a day), not {value!r}")
