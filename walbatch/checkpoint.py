"""The durable "everything through seq N is delivered or dead-lettered" marker.

WARNING: serialized to disk (docs/format.md); changing the layout breaks old logs.

Invariant: the checkpoint only moves forward, and it is durable (written to a
temp file, fsync'd, renamed, directory fsync'd) before any segment it covers is
deleted. It also carries the log's id, fixed when the log is created, and the
running totals of delivered and dead-lettered items through ``seq``, so that
``stats()`` adds up across reopens.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from crc32c import crc32c

from .errors import CorruptLog
from .fileio import FileSystem, write_atomic

CHECKPOINT_MAGIC = b"WBCHKPT\x00"
CHECKPOINT_VERSION = 1
_LAYOUT = struct.Struct("<8sHH16sQQQQ")
CHECKPOINT_SIZE = _LAYOUT.size + 4


@dataclass(frozen=True, slots=True)
class Checkpoint:
    log_id: uuid.UUID
    seq: int = 0
    """Every record with seq <= this is delivered or dead-lettered."""
    delivered: int = 0
    """How many of the records through ``seq`` were delivered."""
    dead_lettered: int = 0
    """How many of the records through ``seq`` went to dead letters (or were lost
    to quarantined corruption, which is recorded as a dead letter)."""
    high_water: int = 0
    """The last fsync'd seq when this checkpoint was written. A log that ends
    below it on open lost acknowledged records (damage, not a torn write), and
    no seq up to it is ever handed out again."""

    def encode(self) -> bytes:
        body = _LAYOUT.pack(
            CHECKPOINT_MAGIC,
            CHECKPOINT_VERSION,
            0,
            self.log_id.bytes,
            self.seq,
            self.delivered,
            self.dead_lettered,
            self.high_water,
        )
        return body + struct.pack("<I", crc32c(body))

    @classmethod
    def decode(cls, data: bytes, path: str) -> Checkpoint:
        if len(data) != CHECKPOINT_SIZE:
            raise CorruptLog(path, 0, f"checkpoint is {len(data)} bytes, expected {CHECKPOINT_SIZE}")
        magic, version, _r, raw_id, seq, delivered, dead, high = _LAYOUT.unpack_from(data)
        (crc,) = struct.unpack_from("<I", data, _LAYOUT.size)
        if magic != CHECKPOINT_MAGIC:
            raise CorruptLog(path, 0, "bad checkpoint magic")
        if crc != crc32c(data[: _LAYOUT.size]):
            raise CorruptLog(path, 0, "checkpoint checksum mismatch")
        if version != CHECKPOINT_VERSION:
            raise CorruptLog(path, 8, f"unsupported checkpoint version {version}")
        return cls(uuid.UUID(bytes=raw_id), seq, delivered, dead, high)


def read_checkpoint(fs: FileSystem, path: str) -> Checkpoint:
    return Checkpoint.decode(fs.read_file(path), path)


def write_checkpoint(fs: FileSystem, path: str, cp: Checkpoint) -> None:
    """Durably replace the checkpoint file (temp, fsync, rename, directory fsync)."""
    write_atomic(fs, path, cp.encode())
