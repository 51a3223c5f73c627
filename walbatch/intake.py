"""Intake: how acknowledged records reach the flusher, from memory or from disk.

The group committer hands every fsync'd frame to ``on_durable`` (in seq order).
Frames wait here, in an in-memory tail, for the flusher; the log on disk is
read only for the backlog found at open (replay), when the tail overflowed
``memory_tail_bytes``, or always when another process writes the log
(``follow``: ``walbatch replay --follow``).

A frame may come with its items already decoded (the daemon read them off a
request with the log's own decoder, and nobody else holds them): the flusher then
takes those objects instead of decoding the bytes again, which on the daemon was a
third of the GIL time of a batch. Only while the tail is small (DECODED_TAIL_BYTES).

Ownership: the tail's fields are guarded by ``cv``, the delivery lock shared
with the flusher loop (``sleep`` waits on it); the reader belongs to the
flusher thread.

Invariant: frames come out of ``take`` in seq order with no gap, whether from
memory or disk: the tail is used only while it starts exactly where the
reader would, and is dropped whole (falling back to disk) when it does not.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from .log import Log, RawFrame

DECODED_TAIL_BYTES = 4 << 20
"""Items handed over decoded are kept as objects while the tail holds at most this many
bytes of payload; beyond it only the bytes (decoded objects take about ten times the
room, and a tail of ``memory_tail_bytes`` of them would be hundreds of MiB)."""


class Intake:
    def __init__(self, log_: Log, cv: threading.Condition, memory_tail_bytes: int,
                 read_from: int, follow: bool = False) -> None:
        self.log = log_
        self.cv = cv
        self.memory_tail_bytes = memory_tail_bytes
        self.follow = follow
        self._reader = log_.reader(read_from)  # flusher thread only
        # --- guarded by cv
        self._tail: deque[RawFrame] = deque()
        self._tail_bytes = 0
        self._tail_items = 0
        self._tail_next = log_.next_seq  # the seq the next tail frame must start at
        self._tail_ok = not follow
        self._waiting = False  # the flusher sleeps in sleep()
        self._wake_items = 1  # ... and wants waking once this many items wait

    def on_durable(self, first_seq: int, count: int, payload: bytes,
                   decoded: list[Any] | None = None) -> None:
        """Called by the group committer, in seq order, after each fsync."""
        with self.cv:
            if self._tail_ok:
                full = self._tail_bytes + len(payload) > self.memory_tail_bytes
                if first_seq != self._tail_next or full:
                    self._tail_ok = False  # fall back to reading the log from disk
                    self._tail.clear()
                    self._tail_bytes = 0
                    self._tail_items = 0
                else:
                    if decoded is not None and self._tail_bytes + len(payload) > DECODED_TAIL_BYTES:
                        decoded = None  # the flusher is behind: keep bytes, not objects
                    self._tail.append(RawFrame(first_seq, count, payload, 0, decoded))
                    self._tail_bytes += len(payload)
                    self._tail_next = first_seq + count
                    self._tail_items += count
            # Wake the flusher only when it has something to do now: a first item
            # (its batch timer starts), or a batch's worth. Otherwise its own
            # deadline wakes it; a wake-up per commit group costs submitters GIL time.
            if self._waiting and (self._tail_items >= self._wake_items or not self._tail_ok):
                self.cv.notify_all()

    def take(self, read_seq: int) -> list[RawFrame]:
        """(Flusher thread.) The next frames from ``read_seq`` on; [] if there are none now."""
        with self.cv:
            if self._tail_ok and self._tail and self._tail[0].first_seq <= read_seq:
                frames = list(self._tail)
                self._tail.clear()
                self._tail_bytes = 0
                self._tail_items = 0
                return _trim(frames, read_seq)
            if self._tail_ok and read_seq >= self._tail_next:
                return []
        self._reader.next_seq = read_seq
        frames = self._reader.read()
        if not frames:
            with self.cv:
                if not self._tail_ok and not self.follow and read_seq > self.log.synced_seq:
                    # Caught up with the disk: new frames may go to memory again.
                    self._tail_ok = True
                    self._tail_next = read_seq
        return frames

    def ready(self, read_seq: int) -> bool:
        """(Holding cv.) True if ``take`` has frames for the flusher without waiting."""
        if self._tail_ok:
            return bool(self._tail)
        return read_seq <= self.log.synced_seq

    def sleep(self, timeout: float | None, wake_items: int) -> None:
        """(Holding cv.) Wait for ``wake_items`` new items, any other notify, or ``timeout``."""
        self._wake_items = wake_items
        self._waiting = True
        try:
            self.cv.wait(timeout)
        finally:
            self._waiting = False

    def close(self) -> None:
        self._reader.close()


def _trim(frames: list[RawFrame], read_seq: int) -> list[RawFrame]:
    """Drop what lies before ``read_seq`` (delivered already: a checkpoint inside a frame)."""
    out = []
    for f in frames:
        if f.first_seq + f.count <= read_seq:
            continue
        skip = read_seq - f.first_seq
        out.append(f if skip <= 0 else RawFrame(f.first_seq, f.count, f.payload, skip, f.decoded))
    return out
