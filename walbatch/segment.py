"""Segment files: their names and a full scan of one segment's bytes.

Design constraints (docs/format.md): one writer; a frame never spans segments;
a sealed segment is never rewritten; a segment is named by the first seq it was
created to hold, so names sort in log order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from .framing import (
    _FRAME,
    FRAME_HEADER_SIZE,
    FRAME_MARKER,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    SHORT,
    Frame,
    decode_header,
    find_next_frame,
    parse_frame,
)

# How much of a segment file a scan holds at once (a frame larger than this is read
# whole: its checksum covers it). Recovery reads every segment at every open, so this,
# not the segment size, bounds its memory.
SCAN_WINDOW = 1 << 20

SEGMENT_SUFFIX = ".wal"


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    if dot and "." + ext == SEGMENT_SUFFIX and len(stem) == 20 and stem.isdigit():
        return int(stem)
    return None


@dataclass(slots=True)
class SegmentInfo:
    """What an open log knows about one of its segments."""

    first_seq: int
    """Where the segment stands in the log: the first seq it was created to hold
    (its file name, once recovery has put every segment in its place)."""
    path: str
    size: int
    """Durable size: bytes up to the last successful sync."""
    last_seq: int
    """Last durable seq in the segment (``first_seq - 1`` while it is empty)."""
    sealed: bool = False
    """Never append here again (it is damaged): the next append rolls."""


@dataclass(slots=True)
class Damage:
    """Bytes ``[offset, end)`` of a segment that hold no valid frame."""

    offset: int
    end: int
    reason: str


@dataclass(slots=True)
class SegmentScan:
    path: str
    size: int
    log_id: uuid.UUID | None
    header_error: str
    frames: list[Frame] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    tail_at: int | None = None
    """Offset where trailing bytes with no valid frame after them begin: a torn
    tail in the last segment, damage anywhere else."""
    tail_reason: str = ""


def scan_segment(path: str, data: bytes | SegmentBytes, merge: bool = False) -> SegmentScan:
    """Find every valid frame in a segment and every damaged range between them.

    ``data`` is the whole file, or a ``SegmentBytes`` read a window at a time (the
    same result, in bounded memory). With ``merge``, frames that follow each other
    in the file and in seqs are reported as one run (one ``Frame`` whose count is
    the sum): a segment of a million one-item frames would otherwise cost a million
    objects, and nothing in recovery tells a run from a frame.
    """
    view = _Window(data)
    log_id, header_error = decode_header(view.get(0, HEADER_SIZE))
    scan = SegmentScan(path, view.size, log_id, header_error)
    pos = HEADER_SIZE
    if header_error:
        first = view.find_next_frame(-1)
        if first is None:
            scan.tail_at = 0
            scan.tail_reason = header_error
            return scan
        pos = first.offset
    frames = scan.frames
    while pos < view.size:
        found = view.parse_frame(pos)
        if isinstance(found, Frame):
            last = frames[-1] if frames else None
            if (merge and last is not None and last.end == found.offset
                    and last.first_seq + last.count == found.first_seq):
                frames[-1] = Frame(last.offset, found.end, last.first_seq, last.count + found.count)
            else:
                frames.append(found)
            pos = found.end
            continue
        reason = (
            "frame runs past the end of the file" if found == SHORT
            else "invalid frame (bad marker, length or checksum)"
        )
        nxt = view.find_next_frame(pos)
        if nxt is None:
            scan.tail_at = pos
            scan.tail_reason = reason
            break
        scan.damage.append(Damage(pos, nxt.offset, reason))
        pos = nxt.offset
    return scan


class SegmentBytes:
    """A segment file read on demand: ``len()`` and slices, never the whole file at once."""

    def __init__(self, fs: Any, path: str) -> None:
        self._fh = fs.open_read(path)
        self._size = self._fh.size()

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, s: slice) -> bytes:
        start, stop, step = s.indices(self._size)
        assert step == 1, "SegmentBytes takes plain slices"
        return self._fh.pread(max(0, stop - start), start) if stop > start else b""

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> SegmentBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Window:
    """``parse_frame`` / ``find_next_frame`` over bytes or a SegmentBytes, at file offsets.

    For bytes it is the plain functions; for a file it keeps a window of at most
    ``SCAN_WINDOW`` bytes (or one whole frame) and gives the same answers.
    """

    def __init__(self, data: bytes | SegmentBytes) -> None:
        self.src = data
        self.size = len(data)
        self.whole = not isinstance(data, SegmentBytes)
        self.base = 0
        self.buf = data if self.whole else b""

    def get(self, at: int, n: int) -> bytes:
        self._cover(at, n)
        return bytes(self.buf[at - self.base : at - self.base + n])

    def _cover(self, at: int, n: int) -> None:
        """Make the window hold [at, at + n) (or up to the end of the file)."""
        if self.whole:
            return
        end = min(self.size, at + n)
        if self.base <= at and end <= self.base + len(self.buf):
            return
        self.base = at
        self.buf = self.src[at : max(end, min(self.size, at + SCAN_WINDOW))]

    def parse_frame(self, pos: int) -> Frame | str:
        if self.whole:
            return parse_frame(self.buf, pos)  # type: ignore[arg-type]
        self._cover(pos, FRAME_HEADER_SIZE)
        rel = pos - self.base
        if len(self.buf) - rel >= FRAME_HEADER_SIZE:
            marker, _crc, length, first_seq, count = _FRAME.unpack_from(self.buf, rel)
            if marker == FRAME_MARKER and length <= MAX_FRAME_PAYLOAD:
                self._cover(pos, FRAME_HEADER_SIZE + length)
                rel = pos - self.base
        found = parse_frame(memoryview(self.buf)[rel:] if rel else self.buf, 0)  # type: ignore[arg-type]
        if isinstance(found, Frame):
            return Frame(pos, pos + (found.end - found.offset), found.first_seq, found.count)
        if found == SHORT and self.base + len(self.buf) < self.size:
            # The window, not the file, ends inside it: read on (a frame never exceeds
            # what its header promises, so this is a torn or bad one either way).
            self._cover(pos, self.size - pos)
            return self.parse_frame(pos)
        return found

    def find_next_frame(self, pos: int) -> Frame | None:
        if self.whole:
            return find_next_frame(self.buf, pos)  # type: ignore[arg-type]
        at = pos + 1
        while at < self.size:
            self._cover(at, SCAN_WINDOW)
            hit = self.buf.find(FRAME_MARKER, at - self.base)
            if hit < 0:
                if self.base + len(self.buf) >= self.size:
                    return None
                at = self.base + len(self.buf) - (len(FRAME_MARKER) - 1)  # a marker may straddle
                continue
            cand = self.base + hit
            found = self.parse_frame(cand)
            if isinstance(found, Frame):
                return found
            at = cand + 1
        return None
