"""On-disk layout of segments and frames; docs/format.md is the normative text.

WARNING: everything here is serialized to disk. Changing a constant, a struct
layout or what the checksum covers breaks every existing log; bump
``FORMAT_VERSION`` and keep a reader for the old version instead.

A segment is a header followed by frames::

    segment  = header frame*
    header   = magic:8 "WALBATCH" | version:u16 | reserved:u16 | log_id:16 | crc:u32
    frame    = marker:4 | crc:u32 | length:u32 | first_seq:u64 | count:u32 | payload
    payload  = item{count}            (each item one msgpack value)

All integers are little-endian. A frame's crc is CRC32C over everything after
the crc field (length, first_seq, count and payload). One frame holds the items
of one commit group (Kafka's record batch): seqs first_seq .. first_seq+count-1.
The marker lets a scan find the next frame after damage; the crc rules out a
marker that merely occurs inside a payload.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from crc32c import crc32c

from .codec import unpack_sized
from .keys import ext_hook

SEGMENT_MAGIC = b"WALBATCH"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHH16s")
HEADER_SIZE = _HEADER.size + 4  # 32

FRAME_MARKER = b"\xc7\xfa\x57\xb1"
_FRAME = struct.Struct("<4sIIQI")
FRAME_HEADER_SIZE = _FRAME.size  # 24
_FRAME_CRC_FROM = 8  # the crc covers the frame from the length field on

# A frame payload larger than this is refused when written and treated as
# damage when read: it bounds how much a corrupt length field can make us read.
MAX_FRAME_PAYLOAD = (1 << 31) - 1


def encode_header(log_id: uuid.UUID) -> bytes:
    head = _HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0, log_id.bytes)
    return head + struct.pack("<I", crc32c(head))


def decode_header(data: bytes) -> tuple[uuid.UUID | None, str]:
    """Return ``(log_id, "")`` for a valid header, else ``(None, reason)``."""
    if len(data) < HEADER_SIZE:
        return None, f"segment header is {len(data)} bytes, expected {HEADER_SIZE}"
    magic, version, _reserved, raw_id = _HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        return None, "bad segment magic"
    (crc,) = struct.unpack_from("<I", data, _HEADER.size)
    if crc != crc32c(data[: _HEADER.size]):
        return None, "segment header checksum mismatch"
    if version != FORMAT_VERSION:
        return None, f"unsupported segment format version {version}"
    return uuid.UUID(bytes=raw_id), ""


def encode_frame_header(first_seq: int, count: int, payload: bytes | memoryview) -> bytes:
    """The 24-byte frame header for ``payload``; write it followed by the payload."""
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise ValueError(
            f"a single commit of {len(payload)} bytes exceeds the frame limit of "
            f"{MAX_FRAME_PAYLOAD} bytes; submit fewer items at once"
        )
    tail = _FRAME.pack(FRAME_MARKER, 0, len(payload), first_seq, count)[_FRAME_CRC_FROM:]
    crc = crc32c(payload, crc32c(tail))
    return FRAME_MARKER + struct.pack("<I", crc) + tail


@dataclass(frozen=True, slots=True)
class Frame:
    """A valid frame found in a buffer: where it is and which seqs it holds."""

    offset: int
    end: int
    first_seq: int
    count: int

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1

    def payload(self, buf: bytes | memoryview) -> memoryview:
        return memoryview(buf)[self.offset + FRAME_HEADER_SIZE : self.end]


# Outcomes of parse_frame besides a Frame.
SHORT = "short"  # the buffer ends inside the frame: a torn tail, if nothing follows
BAD = "bad"  # the bytes at this offset are not a valid frame


def parse_frame(buf: bytes | memoryview, pos: int) -> Frame | str:
    """Parse the frame at ``pos``: a Frame, or SHORT / BAD."""
    size = len(buf)
    if size - pos < FRAME_HEADER_SIZE:
        # A torn header: it is short if what is there is a prefix of a marker.
        have = bytes(buf[pos : pos + 4])
        return SHORT if FRAME_MARKER.startswith(have) else BAD
    marker, crc, length, first_seq, count = _FRAME.unpack_from(buf, pos)
    if marker != FRAME_MARKER or count == 0 or count > length or first_seq == 0:
        return BAD
    end = pos + FRAME_HEADER_SIZE + length
    if length > MAX_FRAME_PAYLOAD:
        return BAD
    if end > size:
        return SHORT
    view = memoryview(buf)
    if crc32c(view[pos + FRAME_HEADER_SIZE : end], crc32c(view[pos + 8 : pos + FRAME_HEADER_SIZE])) != crc:
        return BAD
    return Frame(pos, end, first_seq, count)


def find_next_frame(buf: bytes | memoryview, pos: int) -> Frame | None:
    """The first valid frame starting after ``pos``, found by its marker, or None."""
    data = bytes(buf) if isinstance(buf, memoryview) else buf
    at = pos + 1
    while True:
        at = data.find(FRAME_MARKER, at)
        if at < 0:
            return None
        found = parse_frame(data, at)
        if isinstance(found, Frame):
            return found
        at += 1


def decode_items(payload: bytes | memoryview, count: int) -> list[tuple[object, int]]:
    """``(item, encoded_size)`` for each of the ``count`` items of a payload.

    Keyed items come back as ``keys.Keyed(key, item)``. Raises ValueError if the
    payload does not hold exactly ``count`` msgpack values; with a valid
    checksum that means a writer bug, not disk damage.
    """
    decoded = unpack_sized(payload, ext_hook)
    size = sum(n for _, n in decoded)
    if len(decoded) != count or size != len(payload):
        raise ValueError(f"payload holds {len(decoded)} items in {size} bytes, "
                         f"frame says {count} in {len(payload)}")
    return decoded
