"""Segment files: their names and a full scan of one segment's bytes.

Design constraints (docs/format.md): one writer; a frame never spans segments;
a sealed segment is never rewritten; a segment is named by the first seq it was
created to hold, so names sort in log order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from .framing import HEADER_SIZE, Frame, decode_header, find_next_frame, parse_frame

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


def scan_segment(path: str, data: bytes) -> SegmentScan:
    """Find every valid frame in ``data`` and every damaged range between them."""
    log_id, header_error = decode_header(data[:HEADER_SIZE])
    scan = SegmentScan(path, len(data), log_id, header_error)
    pos = HEADER_SIZE
    if header_error:
        first = find_next_frame(data, -1)
        if first is None:
            scan.tail_at = 0
            scan.tail_reason = header_error
            return scan
        pos = first.offset
    while pos < len(data):
        found = parse_frame(data, pos)
        if isinstance(found, Frame):
            scan.frames.append(found)
            pos = found.end
            continue
        reason = (
            "frame runs past the end of the file" if found == "short"
            else "invalid frame (bad marker, length or checksum)"
        )
        nxt = find_next_frame(data, pos)
        if nxt is None:
            scan.tail_at = pos
            scan.tail_reason = reason
            break
        scan.damage.append(Damage(pos, nxt.offset, reason))
        pos = nxt.offset
    return scan
