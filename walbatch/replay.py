"""Replay: deliver a log's backlog to a sink without the daemon, or count it.

``replay`` opens the log with a sink (the writer must be stopped), delivers
everything past the checkpoint, advances the checkpoint and closes: what could
not be delivered in ``timeout`` stays in the log. ``scan`` only reads: what a
replay would deliver, and what is damaged. ``walbatch replay`` prints these;
``walbatch replay --follow`` is ``walbatch.follow.Follower``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .durable import DurableBatcher
from .errors import WalbatchError
from .log import Finding, Log


@dataclass(frozen=True)
class ReplayResult:
    backlog: int
    """Acknowledged items waiting for delivery when the log was opened."""
    delivered: int
    dead_lettered: int
    left: int
    """Items still in the log (not delivered before the timeout, or the sink kept failing)."""
    checkpoint: int
    elapsed: float
    error: BaseException | None = None
    """Why delivery stopped early (a timeout, corruption); None when it finished."""


Progress = Callable[[int, int, float], None]
"""``progress(done, total, items_per_second)``, called about every 0.2 s while replaying."""


def replay(data_dir: str | os.PathLike[str], sink: Any, *, timeout: float | None = None,
           progress: Progress | None = None, **options: Any) -> ReplayResult:
    """Deliver everything after the checkpoint to ``sink``; return what happened.

    Raises what opening the log raises (LogLocked while a writer runs, CorruptLog,
    a bad sink URL); a failure during delivery is returned in ``error``.
    """
    b = DurableBatcher(data_dir, sink, **options)
    start = b.initial_checkpoint
    total = b.backlog_at_open
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            b.flush(timeout)
        except BaseException as ex:  # returned in the result
            failure.append(ex)
        finally:
            done.set()

    t0 = time.monotonic()
    try:
        threading.Thread(target=run, name="walbatch-replay", daemon=True).start()
        while not done.wait(0.2):
            if progress is not None:
                s = b.stats()
                now = s.delivered + s.dead_lettered - start.delivered - start.dead_lettered
                progress(now, total, now / max(1e-9, time.monotonic() - t0))
    finally:
        # After a failed flush (the timeout passed) the time is up: what is left stays.
        b.close(timeout=0 if failure or not done.is_set() else 5)
    end = b.stats()
    if progress is not None:
        progress(end.delivered + end.dead_lettered - start.delivered - start.dead_lettered, total,
                 0.0)
    return ReplayResult(backlog=total, delivered=end.delivered - start.delivered,
                        dead_lettered=end.dead_lettered - start.dead_lettered, left=end.pending,
                        checkpoint=end.last_checkpoint, elapsed=time.monotonic() - t0,
                        error=failure[0] if failure else None)


@dataclass(frozen=True)
class ScanResult:
    checkpoint: int
    would_deliver: int
    """Intact records after the checkpoint."""
    damaged: int
    """Seqs after the checkpoint whose records are damaged (lost, unless repaired from elsewhere)."""
    corruption: list[Finding] = field(default_factory=list)


def scan(data_dir: str | os.PathLike[str]) -> ScanResult:
    """Read the backlog as a replay would, without delivering or changing anything.

    Every frame's checksum is verified (by the reader) and its payload must hold
    exactly the frame's count of whole msgpack values; the values are walked, not
    built, which is what makes a scan several times faster than a delivery. Works
    beside a running writer. Raises WalbatchError for a payload that does not hold
    its items (a writer bug, not disk damage).
    """
    log = Log.open(os.fspath(data_dir), readonly=True, on_corruption="report")
    try:
        start = log.checkpoint.seq + 1
        reader = log.reader(start)
        n = lost = 0
        try:
            while frames := reader.read():
                for f in frames:
                    first = max(f.first_seq, start)
                    count = f.first_seq + f.count - first
                    if f.payload is None:
                        lost += count
                    else:
                        _check_payload(f.payload, f.count, f.first_seq, n)
                    n += count
        finally:
            reader.close()
        return ScanResult(log.checkpoint.seq, n - lost, lost,
                          [f for f in log.findings if f.is_corruption])
    finally:
        log.close()


def _check_payload(payload: bytes | memoryview, count: int, first_seq: int, good: int) -> None:
    """Raise WalbatchError unless ``payload`` is exactly ``count`` whole msgpack values."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(payload), 1 << 20))
    unpacker.feed(payload)
    try:
        for _ in range(count):
            unpacker.skip()
        whole = unpacker.tell() == len(payload)
    except (ValueError, msgpack.UnpackException) as ex:  # OutOfData, FormatError, ...
        raise WalbatchError(f"undecodable payload at seq {first_seq}: {ex} "
                            f"(after {good} good records)") from ex
    if not whole:
        raise WalbatchError(f"the payload at seq {first_seq} holds more than its {count} "
                            f"items (after {good} good records)")
