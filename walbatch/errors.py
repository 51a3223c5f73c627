"""The exception tree.

Every error walbatch raises on purpose is a ``WalbatchError``. Each class says when
it happens and what state it leaves behind, because the caller's next move
depends on whether anything acknowledged could be at risk (it never is).
"""

from __future__ import annotations

from collections.abc import Sequence


class WalbatchError(Exception):
    """Base class of every error walbatch raises on purpose."""


class LogLocked(WalbatchError):
    """Another process (or another open batcher) holds the log directory.

    Nothing was read or written. Close the other user, or point this one at a
    different directory.
    """


class UnsafeDataDir(WalbatchError):
    """The data directory (or a file in it) is not safe to use, and was not used.

    Another user can write to it (the daemon's strict-modes check), or a file
    walbatch keeps there is a symbolic link or not a regular file: something
    walbatch never makes, which it refuses to follow. The message names the
    path and what to fix. Nothing was written through it.
    """


class CorruptLog(WalbatchError):
    """Damage found before the tail of the log (or in a file the log depends on).

    Delivery stops: nothing damaged is ever delivered and nothing after the
    damage is skipped silently. ``seqs`` is the range of sequence numbers whose
    records are affected, when it can be known (``(first, last)``, inclusive).
    Run ``walbatch verify --repair`` (or open with ``on_corruption="quarantine"``)
    to move the damaged bytes aside and go on; the lost seqs are then reported
    and recorded as dead letters.
    """

    def __init__(
        self,
        path: str,
        offset: int,
        reason: str,
        seqs: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        self.seqs = seqs
        where = f"{path} at offset {offset}"
        affected = f"; seqs {seqs[0]}..{seqs[1]} affected" if seqs else ""
        super().__init__(
            f"corrupt log: {where}: {reason}{affected}. Nothing after this point is "
            "delivered until it is repaired (walbatch verify --repair)"
        )


class LogFull(WalbatchError):
    """The log reached ``max_log_bytes`` and did not drain within ``submit_timeout``.

    The item was not written and not acknowledged: the caller still owns it.
    Everything already acknowledged stays in the log; the usual cause is a sink
    that is down or slower than the intake.
    """


class LogFailed(WalbatchError):
    """A write or fsync of the log failed, so the log refuses further writes.

    After a failed fsync the state of the file on disk is unknown (the kernel may
    have dropped the dirty pages), so the only safe course is to stop and reopen,
    which re-reads what actually reached the disk. Items that got this error were
    not acknowledged; they may or may not be delivered after the reopen.
    """


class LogWriteError(WalbatchError):
    """A write of the log failed (for example ENOSPC) and was rolled back cleanly.

    The items in the failed write were not acknowledged; the log is still usable
    and later submits succeed once the cause (a full disk) goes away.
    """


class Closed(WalbatchError):
    """The batcher is closed or closing: it takes no new items.

    Everything acknowledged before the close stays in the log and is delivered
    by the next open.
    """


class SinkError(WalbatchError):
    """A sink failed to take a batch or an item.

    ``retryable=True`` (the default) means transient: walbatch keeps the items in
    the log and retries with backoff. ``retryable=False`` means permanent: the
    items go to the dead-letter store with this error. ``retry_after`` (seconds)
    is the least the next attempt waits, e.g. from an HTTP ``Retry-After``
    header; the backoff delay is used when it is longer.
    """

    def __init__(self, message: str, *, retryable: bool = True,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """A sink error that retrying cannot fix (bad data, a constraint violation)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class DeadLettered(WalbatchError):
    """Raised by ``Receipt.wait()`` when the item went to the dead-letter store."""

    def __init__(self, seq: int, error: str) -> None:
        self.seq = seq
        self.error = error
        super().__init__(f"item seq {seq} was dead-lettered: {error}")


class ResultDropped(WalbatchError):
    """The item was delivered, but its result (the sink's per-item value) is gone.

    Results live in memory until a ``Receipt`` collects them; past
    ``walbatch.progress.MAX_RESULTS`` uncollected results the oldest are dropped.
    The item itself was delivered: only the value is missing.
    """

    def __init__(self, seq: int) -> None:
        self.seq = seq
        super().__init__(f"item seq {seq} was delivered, but its result was dropped: more results "
                         "than walbatch keeps were never collected by a wait()")


def format_seqs(seqs: Sequence[int]) -> str:
    """Render a sorted list of seqs compactly ("1..4, 9") for error messages."""
    parts: list[str] = []
    start = prev = None
    for s in seqs:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            parts.append(f"{start}" if start == prev else f"{start}..{prev}")
            start = prev = s
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}..{prev}")
    return ", ".join(parts)
