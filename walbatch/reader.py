"""Reading an open log back: durable frames from a seq on, every checksum checked again.

Ownership: a reader belongs to one thread (the flusher's, or a tool's); the log
it reads may be appended to and truncated at the front meanwhile. It only ever
reads bytes up to a segment's durable size.

Rule: damage may be stepped over only where recovery said so: seqs it gave up
(``lost``: quarantined, or reported by a read-only open) and seqs already
delivered whose records are unreadable (``holes``). Both are handed out as a
``RawFrame`` without payload. Anything else raises ``CorruptLog``, so a reader
and the recovery that opened the log never disagree about the log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import CorruptLog
from .fileio import FileHandle, FileSystem
from .framing import BAD, FRAME_HEADER_SIZE, HEADER_SIZE, Frame, find_next_frame, parse_frame
from .segment import SegmentInfo

_READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class RawFrame:
    """Frame data handed to the flusher; ``payload`` None means the seqs were lost."""

    first_seq: int
    count: int
    payload: bytes | None
    skip: int = 0
    """How many leading items were already delivered (checkpoint inside a frame)."""
    decoded: list[Any] | None = None
    """The payload's items already decoded, when its submitter had them and nobody
    else holds them (the daemon's, read off a frame with the log's own decoder)."""


class SeqRange(Protocol):
    first: int
    last: int


class ReadableLog(Protocol):
    fs: FileSystem
    segdir: str
    synced_seq: int
    lost: list
    holes: list
    segments: Callable[[], list[SegmentInfo]]


class LogReader:
    """Reads durable records from ``from_seq`` on, checking every checksum again."""

    def __init__(self, log: ReadableLog, from_seq: int) -> None:
        self.log = log
        self.next_seq = from_seq
        self._seg: SegmentInfo | None = None
        self._fh: FileHandle | None = None
        self._offset = 0
        self._buf = b""
        self._buf_at = 0

    def _lost_at(self, seq: int) -> SeqRange | None:
        for ranges in (self.log.lost, self.log.holes):
            for r in ranges:
                if r.first <= seq <= r.last:
                    return r
        return None

    def _switch_to(self, seg: SegmentInfo) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = self.log.fs.open_read(seg.path)
        self._seg = seg
        self._offset = HEADER_SIZE
        self._buf = b""
        self._buf_at = 0

    def _get(self, offset: int, n: int, durable: int) -> bytes:
        """Bytes ``[offset, offset+n)`` of the current segment, through a read buffer.

        Never buffers past ``durable``: bytes beyond it may still be changing.
        """
        rel = offset - self._buf_at
        if rel < 0 or rel + n > len(self._buf):
            assert self._fh is not None
            self._buf = self._fh.pread(min(max(n, _READ_CHUNK), durable - offset), offset)
            self._buf_at = offset
            rel = 0
        return self._buf[rel : rel + n]

    def read(self, max_bytes: int = _READ_CHUNK) -> list[RawFrame]:
        """Return about ``max_bytes`` of the next durable frames; [] when caught up."""
        out: list[RawFrame] = []
        total = 0
        while total < max_bytes:
            lost = self._lost_at(self.next_seq)
            if lost is not None:
                out.append(RawFrame(self.next_seq, lost.last - self.next_seq + 1, None))
                self.next_seq = lost.last + 1
                self._seg = None  # the next seq may live in a later segment: look it up again
                continue
            if self.next_seq > self.log.synced_seq:
                break
            segs = self.log.segments()
            if self._seg is None or self._seg.path not in {s.path for s in segs}:
                candidates = [s for s in segs if s.first_seq <= self.next_seq]
                if not candidates:
                    raise CorruptLog(self.log.segdir, 0, f"no segment holds seq {self.next_seq}",
                                     (self.next_seq, self.next_seq))
                self._switch_to(candidates[-1])
            assert self._seg is not None
            seg = next(s for s in segs if s.path == self._seg.path)
            if self._offset >= seg.size:
                later = [s for s in segs if s.first_seq > seg.first_seq]
                if not later:
                    break
                self._switch_to(later[0])
                continue
            frame = self._frame_at(self._offset, seg)
            if frame is None:
                self._offset = seg.size
                continue
            if frame.last_seq >= self.next_seq:
                if frame.first_seq > self.next_seq:
                    raise CorruptLog(seg.path, frame.offset,
                                     f"records {self.next_seq}..{frame.first_seq - 1} are missing",
                                     (self.next_seq, frame.first_seq - 1))
                data = self._get(frame.offset, frame.end - frame.offset, seg.size)
                payload = data[FRAME_HEADER_SIZE:]
                out.append(RawFrame(frame.first_seq, frame.count, payload,
                                    self.next_seq - frame.first_seq))
                total += len(payload)
                self.next_seq = frame.last_seq + 1
            self._offset = frame.end
        return out

    def _hidden_ok(self, first: int, last: int) -> bool:
        """True if seqs ``first..last`` may be stepped over (none, or all given up)."""
        seq = first
        while seq <= last:
            r = self._lost_at(seq)
            if r is None:
                return False
            seq = r.last + 1
        return True

    def _frame_at(self, offset: int, seg: SegmentInfo) -> Frame | None:
        """The valid frame at ``offset`` (absolute), stepping over allowed damage.

        None: only allowed damage is left in this segment; go on to the next one.
        """
        head = self._get(offset, min(FRAME_HEADER_SIZE, seg.size - offset), seg.size)
        found: Frame | str = BAD
        if len(head) == FRAME_HEADER_SIZE:
            length = int.from_bytes(head[8:12], "little")
            if offset + FRAME_HEADER_SIZE + length <= seg.size:
                found = parse_frame(self._get(offset, FRAME_HEADER_SIZE + length, seg.size), 0)
        if isinstance(found, Frame):
            return Frame(offset, offset + found.end, found.first_seq, found.count)
        rest = self._get(offset, seg.size - offset, seg.size)
        nxt = find_next_frame(rest, 0)
        if nxt is not None:
            if self._hidden_ok(self.next_seq, nxt.first_seq - 1):
                return Frame(offset + nxt.offset, offset + nxt.end, nxt.first_seq, nxt.count)
            raise CorruptLog(seg.path, offset, "invalid frame (bad marker, length or checksum)",
                             (self.next_seq, nxt.first_seq - 1))
        later = [s for s in self.log.segments() if s.first_seq > seg.first_seq]
        if later and self._hidden_ok(self.next_seq, later[0].first_seq - 1):
            return None  # damage at the end of a sealed segment hides no undelivered record
        raise CorruptLog(seg.path, offset, "invalid frame (bad marker, length or checksum)",
                         (self.next_seq, seg.last_seq) if seg.last_seq >= self.next_seq else None)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
