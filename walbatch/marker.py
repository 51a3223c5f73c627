"""The synced marker ``<dir>/synced``: how far the log is durable, and how far delivered.

WARNING: serialized to disk (docs/format.md, "The synced marker").

Ownership: only the process holding the writer lock writes it (``MarkerWriter``),
after every successful fsync of the log and after every checkpoint it commits.
Readers: a follower (``replay --follow``) delivers nothing past its ``seq``;
recovery reads it as a high-water mark (damage at the end of the log below it
hit acknowledged records: corruption, not a torn write) and its ``checkpoint``
as a floor of what was delivered (a checkpoint file older than that was put back
from a backup: seqs missing below the floor were delivered, not lost).

It is created durably (written to a temporary file, fsync'd, renamed, directory
fsync'd) when a writer opens the log, then rewritten in place with one
``pwrite`` and no fsync. A crash can only leave an older complete version
behind (a lower mark: the follower waits, recovery is more careful), because
the in-place overwrite of a durable file is all or nothing in the simulator
and, at 56 bytes inside one sector, on a real disk.
"""

from __future__ import annotations

import os
import struct
import threading
import uuid
from dataclasses import dataclass

from crc32c import crc32c

from .datadir import SYNCED_FILE
from .fileio import FileHandle, FileSystem, write_atomic

_V1 = struct.Struct("<IQQQ16s")  # magic, synced seq, active segment, its end, log id
_V1_MAGIC = 0x53594E43  # "SYNC"
_V2 = struct.Struct("<IQQQ16sQ")  # ... and the checkpoint's seq
_V2_MAGIC = 0x324E5953  # "SYN2"


@dataclass(frozen=True, slots=True)
class Marker:
    seq: int
    """Every record through this seq is durable."""
    segment: int
    """The first seq (the name) of the segment being written."""
    offset: int
    """Where the durable part of that segment ends."""
    checkpoint: int = 0
    """The highest checkpoint seq the writer knew durable (0 in a version-1 marker)."""


def load_marker(fs: FileSystem, directory: str,
                log_id: uuid.UUID) -> tuple[Marker | None, str | None]:
    """The marker, or None and why it cannot be used when it is there but damaged.

    A missing or empty file says nothing (no writer yet, or a crash right after
    creating it); anything else that does not check out is damage.
    """
    try:
        data = fs.read_file(os.path.join(directory, SYNCED_FILE))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None, None
    if not data:
        return None, None
    layouts = {_V2.size + 4: (_V2, _V2_MAGIC), _V1.size + 4: (_V1, _V1_MAGIC)}
    if len(data) not in layouts:
        return None, f"the marker file '{SYNCED_FILE}' is damaged ({len(data)} bytes)"
    layout, magic = layouts[len(data)]
    if struct.unpack_from("<I", data, layout.size)[0] != crc32c(data[:layout.size]):
        return None, f"the marker file '{SYNCED_FILE}' is damaged ({len(data)} bytes, bad checksum)"
    fields = layout.unpack_from(data)
    if fields[0] != magic or fields[4] != log_id.bytes:
        return None, f"the marker file '{SYNCED_FILE}' belongs to another log"
    return Marker(fields[1], fields[2], fields[3], fields[5] if layout is _V2 else 0), None


def read_marker(fs: FileSystem, directory: str, log_id: uuid.UUID) -> Marker | None:
    """The marker if it is there, intact and this log's."""
    return load_marker(fs, directory, log_id)[0]


def encode_marker(log_id: uuid.UUID, m: Marker) -> bytes:
    body = _V2.pack(_V2_MAGIC, m.seq, m.segment, m.offset, log_id.bytes, m.checkpoint)
    return body + struct.pack("<I", crc32c(body))


class MarkerWriter:
    """The writer's handle on its marker. Thread-safe: the committer publishes
    after each sync, the flusher after each checkpoint."""

    def __init__(self, fs: FileSystem, directory: str, log_id: uuid.UUID, first: Marker) -> None:
        self.fs = fs
        self.path = os.path.join(directory, SYNCED_FILE)
        self.log_id = log_id
        self._mu = threading.Lock()
        self._last = first
        # Durable from the start: a later in-place rewrite that a crash loses then
        # leaves this version, never a file that does not check out.
        write_atomic(fs, self.path, encode_marker(log_id, first))
        self._fh: FileHandle | None = fs.open_write(self.path)

    def publish(self, seq: int | None = None, segment: int | None = None,
                offset: int | None = None, checkpoint: int | None = None) -> None:
        """Rewrite the marker with the fields given (the others as last published)."""
        with self._mu:
            if self._fh is None:
                return
            last = self._last
            m = Marker(last.seq if seq is None else seq,
                       last.segment if segment is None else segment,
                       last.offset if offset is None else offset,
                       last.checkpoint if checkpoint is None else checkpoint)
            self._fh.pwrite(encode_marker(self.log_id, m), 0)
            self._last = m

    def close(self) -> None:
        with self._mu:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
