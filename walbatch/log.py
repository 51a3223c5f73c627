"""The segment log: recovery on open, append, sync, roll, truncate_front, read.

Ownership: one ``Log`` per directory per process, enforced by an flock on
``<dir>/LOCK``. Writers (``append``/``sync``) must be serialized by the caller
(the group committer does it); ``truncate_front``, ``commit_checkpoint`` and
readers may run on other threads: the segment list is guarded by ``_lock``.

Invariants:
- ``next_seq`` never goes back below anything that could have been delivered:
  it is at least ``checkpoint.seq + 1`` and above every durable record.
- A reader only sees bytes up to the last successful sync of a segment.
- A segment is deleted only after a durable checkpoint covers all of it, and the
  directory is fsync'd after every create and unlink.
- After a failed fsync the log is failed (``LogFailed``) until reopened.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from crc32c import crc32c

from .checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from .errors import CorruptLog, LogFailed, LogLocked, LogWriteError
from .fileio import FileHandle, FileSystem, OsFileSystem, write_atomic
from .framing import (
    BAD,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    Frame,
    decode_header,
    decode_items,
    encode_frame_header,
    encode_header,
    find_next_frame,
    parse_frame,
)
from .segment import Damage, parse_segment_name, scan_segment, segment_name

log = logging.getLogger("walbatch")

SEGMENTS_DIR = "segments"
CHECKPOINT_FILE = "checkpoint"
LOCK_FILE = "LOCK"
FLUSH_LOCK_FILE = "FLUSH.LOCK"
SYNCED_FILE = "synced"
_MARKER = struct.Struct("<IQQQ16s")  # magic, synced seq, active segment, its end, log id
_MARKER_MAGIC = 0x53594E43  # "SYNC"
QUARANTINE_DIR = "quarantine"
QUARANTINE_REPORT = "report.jsonl"

_READ_CHUNK = 1 << 20


@dataclass(slots=True)
class SegmentInfo:
    first_seq: int
    """The seq in the file name: the first seq the segment was created to hold."""
    path: str
    size: int
    """Durable size: bytes up to the last successful sync."""
    last_seq: int
    """Last durable seq in the segment (``first_seq - 1`` while it is empty)."""
    sealed: bool = False
    """Never append here again (its header is damaged): the next append rolls."""


@dataclass(frozen=True, slots=True)
class LostRange:
    """Seqs given up to corruption by quarantine; recorded in the report."""

    first: int
    last: int
    path: str
    offset: int
    reason: str


@dataclass(frozen=True, slots=True)
class RawFrame:
    """Frame data handed to the flusher; ``payload`` None means the seqs were lost."""

    first_seq: int
    count: int
    payload: bytes | None
    skip: int = 0
    """How many leading items were already delivered (checkpoint inside a frame)."""


class Log:
    """An open segment log. Use ``Log.open()``."""

    def __init__(
        self,
        directory: str,
        fs: FileSystem,
        lock: object,
        checkpoint: Checkpoint,
        segments: list[SegmentInfo],
        next_seq: int,
        segment_bytes: int,
        lost: list[LostRange],
        notes: list[str],
        findings: list[Finding] | None = None,
        readonly: bool = False,
    ) -> None:
        self.directory = directory
        self.fs = fs
        self._filelock = lock
        self.checkpoint = checkpoint
        self.log_id: uuid.UUID = checkpoint.log_id
        self.segment_bytes = segment_bytes
        self.next_seq = next_seq
        self.synced_seq = next_seq - 1
        self.lost = lost
        """Seq ranges quarantined at open (above the checkpoint)."""
        self.recovery_notes = notes
        """What open found and did, one line each (torn tails trimmed, ...)."""
        self.findings = findings or []
        """Everything recovery found: torn tails, damage, ignored damage."""
        self.readonly = readonly
        self.role = "reader" if readonly else "owner"
        self._marker_fd = -1
        self.fsyncs = 0
        self._segments = segments
        self.total_bytes = sum(s.size for s in segments)
        """Bytes in all segments, including unsynced ones (for the quota)."""
        self._lock = threading.Lock()
        self._fh: FileHandle | None = None
        self._active_size = 0
        self._failed: BaseException | None = None
        self._closed = False
        self.segdir = os.path.join(directory, SEGMENTS_DIR)

    # ------------------------------------------------------------------ open

    @classmethod
    def open(
        cls,
        directory: str,
        *,
        fs: FileSystem | None = None,
        segment_bytes: int = 64 << 20,
        on_corruption: str = "raise",
        readonly: bool = False,
        role: str = "owner",
    ) -> Log:
        """Open (creating if needed) the log in ``directory`` and recover it.

        Recovery trims a torn tail (an unacknowledged, partly written last
        frame), deletes segments a durable checkpoint already covers and checks
        every remaining frame. Damage anywhere else raises ``CorruptLog``; with
        ``on_corruption="quarantine"`` it is copied to ``<dir>/quarantine/``,
        reported in ``quarantine/report.jsonl`` and its seqs listed in
        ``Log.lost``; with ``"report"`` it is only listed (in ``Log.findings``).

        ``readonly=True`` takes no lock and changes nothing on disk (for
        ``walbatch verify``, ``status`` and ``dump``, which may run beside a
        live writer); the log can then only be read.

        ``role`` splits the log between two processes (``walbatch replay
        --follow``): ``"owner"`` (the default) writes and delivers and holds
        both ``LOCK`` and ``FLUSH.LOCK``; ``"writer"`` appends only, holds
        ``LOCK`` and publishes its last synced position in ``<dir>/synced``
        after every sync; ``"flusher"`` holds ``FLUSH.LOCK``, changes no segment,
        reads only up to the published position (``refresh()``), and may write
        the checkpoint and delete covered sealed segments.
        """
        if role not in ("owner", "writer", "flusher"):
            raise ValueError(f"role must be 'owner', 'writer' or 'flusher', not {role!r}")
        if on_corruption not in ("raise", "quarantine", "report"):
            raise ValueError(
                f"on_corruption must be 'raise', 'quarantine' or 'report', not {on_corruption!r}")
        if on_corruption == "report" and not readonly:
            raise ValueError("on_corruption='report' is only for readonly opens")
        fs = fs or OsFileSystem()
        directory = os.path.abspath(directory)
        if readonly:
            if not fs.exists(os.path.join(directory, CHECKPOINT_FILE)) and not fs.exists(
                    os.path.join(directory, SEGMENTS_DIR)):
                raise FileNotFoundError(f"{directory} is not a walbatch log directory "
                                        "(no checkpoint and no segments)")
            return cls._recover(directory, fs, _NoLock(), segment_bytes, on_corruption, True)
        if role == "flusher" and not fs.exists(os.path.join(directory, CHECKPOINT_FILE)):
            raise FileNotFoundError(f"{directory} is not a walbatch log directory (no checkpoint)")
        created = not fs.exists(directory)
        fs.makedirs(directory)
        if created:
            fs.fsync_dir(os.path.dirname(directory))
        locks = _Locks()
        try:
            if role in ("owner", "writer"):
                # The grace covers `replay --follow` starting beside a writer: it holds
                # LOCK for a moment to recover the log (trim a torn tail) before following.
                locks.take(fs, os.path.join(directory, LOCK_FILE),
                           f"failed to lock {directory}: is another process (or another open "
                           "DurableBatcher) writing to this directory?", grace=_LOCK_GRACE)
            if role in ("owner", "flusher"):
                locks.take(fs, os.path.join(directory, FLUSH_LOCK_FILE),
                           f"failed to lock {directory} for delivery: is another process "
                           "(a DurableBatcher with a sink, walbatch serve or walbatch replay) "
                           "delivering this log?")
            log_ = cls._recover(directory, fs, locks, segment_bytes, on_corruption,
                                role == "flusher")
        except BaseException:
            locks.release()
            raise
        log_.role = role
        if role in ("writer", "owner"):
            log_._publish()
        elif role == "flusher":
            log_.readonly = False  # may checkpoint; _check_usable still refuses appends
            # Trust only what the writer says is synced, not what happens to be on disk.
            log_.synced_seq = log_.next_seq = log_.checkpoint.seq
            log_.refresh()
        return log_

    @classmethod
    def _recover(
        cls, directory: str, fs: FileSystem, lock: object, segment_bytes: int, on_corruption: str,
        readonly: bool,
    ) -> Log:
        segdir = os.path.join(directory, SEGMENTS_DIR)
        if not fs.exists(segdir):
            if readonly:
                fs = _EmptySegments(fs, segdir)  # type: ignore[assignment]
            else:
                fs.makedirs(segdir)
                fs.fsync_dir(directory)
        names = sorted(
            (first, name)
            for name in fs.listdir(segdir)
            if (first := parse_segment_name(name)) is not None
        )
        cp_path = os.path.join(directory, CHECKPOINT_FILE)
        if fs.exists(cp_path) or names:
            try:
                if not fs.exists(cp_path):
                    raise CorruptLog(
                        cp_path, 0, "checkpoint file is missing but segments exist (was it deleted?)")
                cp = read_checkpoint(fs, cp_path)
            except CorruptLog as ex:
                if on_corruption != "quarantine" or readonly:
                    raise
                cp = _rebuild_checkpoint(fs, directory, segdir, names, ex)
        else:
            cp = Checkpoint(uuid.uuid4())
            if not readonly:  # a reader changes nothing, not even a brand-new directory
                if fs.exists(os.path.join(directory, SYNCED_FILE)):
                    fs.unlink(os.path.join(directory, SYNCED_FILE))  # a former log's
                write_checkpoint(fs, cp_path, cp)
        rec = _Recovery(fs, directory, cp, on_corruption, readonly)
        # Everything through here was durable: the checkpoint's mark, or the newer one
        # the writer published after its last fsync.
        marker, marker_damage = load_marker(fs, directory, cp.log_id)
        high_water = max(cp.seq, cp.high_water, marker[0] if marker else 0)

        # Segments a durable checkpoint covers entirely were due for deletion
        # when the process stopped; finish the job.
        covered = []
        while len(names) > 1 and names[1][0] - 1 <= cp.seq:
            covered.append(os.path.join(segdir, names.pop(0)[1]))
        if covered and not readonly:
            for path in covered:
                fs.unlink(path)
            fs.fsync_dir(segdir)

        segments: list[SegmentInfo] = []
        expected = cp.seq + 1  # the next seq we must find
        for idx, (first, name) in enumerate(names):
            path = os.path.join(segdir, name)
            data = fs.read_file(path)
            scan = scan_segment(path, data)
            is_last = idx == len(names) - 1
            next_first = names[idx + 1][0] if not is_last else None
            if scan.log_id is not None and scan.log_id != cp.log_id:
                # Another log's file: none of its frames is ours. Quarantine moves it out
                # of segments/ (nothing may read it); the seqs its name claims are lost.
                last_here = (next_first - 1) if next_first is not None else expected - 1
                rec.damage(path, 0, len(data), f"segment belongs to log {scan.log_id}, not "
                           f"{cp.log_id}", (expected, last_here) if last_here >= expected else None,
                           data, remove=True)
                expected = max(expected, last_here + 1)
                continue
            if scan.header_error and not scan.frames and is_last and len(data) <= HEADER_SIZE:
                # Crash while the segment was being created: nothing in it was acknowledged.
                rec.torn(path, 0, len(data), f"incomplete segment header ({scan.header_error})",
                         remove=True)
                continue
            if first > expected:
                rec.damage(path, 0, 0, f"records {expected}..{first - 1} are missing (segment deleted?)",
                           (expected, first - 1))
                expected = first
            # Walk the segment in file order: damaged ranges and frames alternate.
            pieces: list[tuple[int, object]] = [(f.offset, f) for f in scan.frames]
            pieces += [(d.offset, d) for d in scan.damage]
            if scan.header_error:
                end = scan.frames[0].offset if scan.frames else len(data)
                pieces.append((0, Damage(0, end, scan.header_error)))
            pieces.sort(key=lambda p: p[0])
            last_seq = max(first, expected) - 1
            prev_last = first - 1  # last seq of the previous valid frame in this segment
            pending_damage: Damage | None = None
            damaged_last = False
            for _off, piece in pieces:
                if isinstance(piece, Damage):
                    pending_damage = piece
                    continue
                f = piece
                assert isinstance(f, Frame)
                hidden_from = max(prev_last + 1, expected)
                d = pending_damage
                if d is not None and f.first_seq > prev_last + 1:
                    rec.damage(path, d.offset, d.end - d.offset, d.reason,
                               (prev_last + 1, f.first_seq - 1), data[d.offset:d.end])
                elif d is not None and f.first_seq > cp.seq:
                    # Garbage between contiguous frames: no record lost, still corruption.
                    rec.damage(path, d.offset, d.end - d.offset, d.reason + " (no record lost)",
                               None, data[d.offset:d.end])
                elif f.first_seq > hidden_from:
                    rec.damage(path, f.offset, 0, f"records {hidden_from}..{f.first_seq - 1} are missing",
                               (hidden_from, f.first_seq - 1))
                if f.first_seq <= prev_last and f.first_seq > cp.seq:
                    raise CorruptLog(path, f.offset, f"frame repeats seqs {f.first_seq}..{f.last_seq}")
                pending_damage = None
                prev_last = max(prev_last, f.last_seq)
                if f.last_seq >= expected:
                    expected = f.last_seq + 1
                    last_seq = f.last_seq
            if pending_damage is not None:
                # A bad header with no valid frame after it: the whole file is damage.
                # (Not a torn create: that leaves at most HEADER_SIZE bytes, handled above.)
                d = pending_damage
                reason = d.reason
                if next_first is not None:
                    lost_to = next_first - 1
                else:
                    # The last segment, destroyed: nothing says how many records it held.
                    # Each item takes at least one byte, so this many seqs at most; skip
                    # them all rather than hand out a seq that may have been delivered.
                    lost_to = expected - 1 + max(1, len(data) - HEADER_SIZE - FRAME_HEADER_SIZE)
                    reason += " (no frame header survived: an upper bound of the seqs it held)"
                seqs = (expected, lost_to) if lost_to >= expected else None
                rec.damage(path, d.offset, d.end - d.offset, reason, seqs, data[d.offset:d.end])
                if seqs:
                    expected = seqs[1] + 1
                damaged_last = is_last
            size = len(data)
            if scan.tail_at is not None and scan.tail_at >= HEADER_SIZE:
                if is_last and expected - 1 >= high_water and marker_damage is None:
                    rec.torn(path, scan.tail_at, len(data) - scan.tail_at, scan.tail_reason)
                    size = scan.tail_at
                elif is_last and expected - 1 >= high_water:
                    # The mark that tells a torn write from damaged acknowledged records is
                    # itself damaged: assume the worst. Each item took at least a byte, so
                    # skip that many seqs rather than hand out one that may be acknowledged.
                    tail = len(data) - scan.tail_at
                    seqs = (expected, expected - 1 + max(1, tail - FRAME_HEADER_SIZE))
                    rec.damage(path, scan.tail_at, tail, f"{scan.tail_reason}, and {marker_damage}, "
                               "so it cannot be told from a torn write (seqs: an upper bound)",
                               seqs, data[scan.tail_at:])
                    expected = seqs[1] + 1
                    damaged_last = True
                else:
                    # Not torn: the high-water mark says records past this point were durable.
                    lost_to = next_first - 1 if next_first is not None else max(
                        expected - 1, high_water)
                    damaged_last = damaged_last or is_last
                    seqs = (expected, lost_to) if lost_to >= expected else None
                    rec.damage(path, scan.tail_at, len(data) - scan.tail_at, scan.tail_reason, seqs,
                               data[scan.tail_at:])
                    if seqs:
                        expected = seqs[1] + 1
            if next_first is not None and next_first > expected:
                rec.damage(path, size, 0, f"records {expected}..{next_first - 1} are missing",
                           (expected, next_first - 1))
                expected = next_first
            segments.append(SegmentInfo(first, path, size, max(last_seq, expected - 1),
                                        sealed=damaged_last or bool(scan.header_error)))
        if high_water > expected - 1 and not any(r.last >= high_water for r in rec.lost):
            # Truncated at a frame boundary (or a segment deleted): the log ends
            # before the high-water mark said it was durable.
            at = segments[-1].path if segments else segdir
            rec.damage(at, segments[-1].size if segments else 0, 0,
                       f"records {expected}..{high_water} are missing: the log ends before "
                       "its high-water mark (checkpoint or synced marker)", (expected, high_water))
            if segments:
                segments[-1].sealed = True
        expected = max(expected, high_water + 1)
        if segments and not readonly:
            # A process that crashed (rather than lost power) may have left frames
            # that were written but never fsync'd: valid in the page cache now,
            # gone after a later power loss. Make them durable before trusting
            # them, or a later recovery could hand their (delivered) seqs out again.
            fh = fs.open_append(segments[-1].path)
            try:
                fh.sync()
            finally:
                fh.close()
        next_seq = max(expected, cp.seq + 1, *(s.last_seq + 1 for s in segments))
        lost = rec.finish()
        notes = [f.describe() for f in rec.findings]
        return cls(directory, fs, lock, cp, segments, next_seq, segment_bytes, lost, notes,
                   rec.findings, readonly)

    # ----------------------------------------------------------------- write

    def _check_usable(self) -> None:
        if self.readonly or self.role == "flusher":
            raise LogFailed(f"the log in {self.directory} was opened for reading only")
        if self._failed is not None:
            raise LogFailed(
                f"the log in {self.directory} failed ({self._failed}) and refuses writes "
                "until it is reopened"
            ) from self._failed
        if self._closed:
            raise LogFailed(f"the log in {self.directory} is closed")

    def append(self, payload: bytes | memoryview, count: int) -> int:
        """Write one frame holding ``count`` items; return its first seq. Not durable."""
        self._check_usable()
        header = encode_frame_header(self.next_seq, count, payload)
        if self._fh is None or self._active_size >= self.segment_bytes:
            self._roll()
        assert self._fh is not None
        before = self._active_size
        try:
            self._fh.write(header, payload)
        except OSError as ex:
            self._undo_write(before, ex)
        first = self.next_seq
        self._active_size = before + len(header) + len(payload)
        with self._lock:  # truncate_front updates it from the flusher thread
            self.total_bytes += len(header) + len(payload)
        self.next_seq += count
        return first

    def sync(self) -> None:
        """Make every appended record durable: fdatasync the active segment, unless its
        writes are synchronous already (O_DSYNC), in which case they were durable when
        append returned and this only publishes them."""
        self._check_usable()
        if self._fh is None:
            return
        try:
            if not getattr(self._fh, "dsync", False):
                self._fh.sync()
        except OSError as ex:
            self._fail(ex)
            raise LogFailed(
                f"fsync of {self._segments[-1].path} failed: {ex}; the log refuses writes "
                "until reopened (unsynced data is in an unknown state)"
            ) from ex
        self.fsyncs += 1
        with self._lock:
            seg = self._segments[-1]
            seg.size = self._active_size
            seg.last_seq = self.next_seq - 1
            self.synced_seq = self.next_seq - 1
        if self.role in ("writer", "owner"):
            self._publish()

    # ------------------------------------------------- writer/flusher split

    def _publish(self) -> None:
        """Record how far the log is durable, in ``<dir>/synced``.

        A follower (``replay --follow``) reads it to know what it may deliver, and
        recovery reads it as a high-water mark: damage at the tail below it is
        corruption of acknowledged records, not a torn write. Written after the
        fsync it describes, never fsync'd itself: a lost or stale update only
        lowers the mark, it never claims unsynced data. Only on the real file
        system (the simulator has no second process).
        """
        if not isinstance(self.fs, OsFileSystem):
            return
        if self._marker_fd < 0:
            self._marker_fd = os.open(os.path.join(self.directory, SYNCED_FILE),
                                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        with self._lock:
            seg = self._segments[-1] if self._segments else None
            body = _MARKER.pack(_MARKER_MAGIC, self.synced_seq, seg.first_seq if seg else 0,
                                seg.size if seg else 0, self.log_id.bytes)
        os.pwrite(self._marker_fd, body + struct.pack("<I", crc32c(body)), 0)

    def read_marker(self) -> tuple[int, int, int] | None:
        """The writer's published ``(synced_seq, segment first_seq, end offset)``."""
        return read_marker(self.fs, self.directory, self.log_id)

    def refresh(self) -> bool:
        """Flusher role: pick up the writer's new segments and durable end; True if it moved."""
        marker = self.read_marker()
        if marker is None:
            return False
        seq, seg_first, end = marker
        if seq <= self.synced_seq:
            return False
        names = sorted(first for name in self.fs.listdir(self.segdir)
                       if (first := parse_segment_name(name)) is not None)
        with self._lock:
            segs = []
            for i, first in enumerate(names):
                if first > seg_first:
                    break
                path = os.path.join(self.segdir, segment_name(first))
                if first == seg_first:
                    size, last = end, seq
                else:
                    # Sealed: complete and synced before the writer rolled past it.
                    size = os.path.getsize(path) if isinstance(self.fs, OsFileSystem) else len(
                        self.fs.read_file(path))
                    last = names[i + 1] - 1
                segs.append(SegmentInfo(first, path, size, last))
            self._segments = segs
            self.total_bytes = sum(s.size for s in segs)
            self.synced_seq = seq
            self.next_seq = seq + 1
        return True

    def reconcile(self) -> None:
        """Writer role: forget sealed segments a follower has delivered and deleted."""
        with self._lock:
            gone = [s for s in self._segments[:-1] if not self.fs.exists(s.path)]
            if gone:
                self._segments = [s for s in self._segments if s not in gone]
                self.total_bytes -= sum(s.size for s in gone)

    def _undo_write(self, before: int, ex: OSError) -> None:
        assert self._fh is not None
        path = self._segments[-1].path
        try:
            self._fh.truncate(before)
            self._fh.sync()
        except OSError as ex2:
            self._fail(ex2)
            raise LogFailed(f"write to {path} failed ({ex}) and could not be undone ({ex2})") from ex
        raise LogWriteError(
            f"write to {path} failed: {ex}; nothing in this write was acknowledged"
        ) from ex

    def release_delivered(self) -> int:
        """Free the active segment when the checkpoint covers every record in it.

        Only sealed segments are deleted, and a segment is sealed by the append
        that overflows it: a caught-up log whose active segment filled the quota
        would wait for room forever. The caller must keep appends out (the group
        committer's ``exclusive``). Returns the bytes freed.
        """
        if self.role != "owner" or self.readonly or self._closed:
            return 0
        with self._lock:
            if not self._segments or self._segments[-1].size <= HEADER_SIZE:
                return 0
            if self.checkpoint.seq < self.next_seq - 1:
                return 0  # not all delivered: the flusher will free sealed segments
            before = self.total_bytes
        self._roll(force=True)
        self.truncate_front(self.checkpoint.seq)
        return before - self.total_bytes

    def _roll(self, force: bool = False) -> None:
        """Seal the active segment and start a new one named by ``next_seq``."""
        if self._fh is None and self._segments and not force:
            last = self._segments[-1]
            if last.size < self.segment_bytes and not last.sealed:
                try:
                    self._fh = self.fs.open_append(last.path, dsync=True)
                except OSError as ex:
                    raise LogWriteError(f"reopening segment {last.path} failed: {ex}") from ex
                self._active_size = last.size
                return
        if self._fh is not None:
            # Seal: a frame appended since the last sync must not be left behind
            # in a segment that sync() will never look at again.
            self.sync()
        path = os.path.join(self.segdir, segment_name(self.next_seq))
        try:
            fh = self.fs.open_append(path, dsync=True)
        except OSError as ex:  # nothing was created: a clean, retryable write error
            raise LogWriteError(f"creating segment {path} failed: {ex}") from ex
        try:
            fh.truncate(0)
            fh.write(encode_header(self.log_id))
            fh.sync()
            self.fs.fsync_dir(self.segdir)
        except OSError as ex:
            fh.close()
            try:
                self.fs.unlink(path)
                self.fs.fsync_dir(self.segdir)
            except OSError as ex2:
                self._fail(ex2)
                raise LogFailed(f"creating {path} failed ({ex}) and could not be undone") from ex
            raise LogWriteError(f"creating segment {path} failed: {ex}") from ex
        self.fsyncs += 2
        old, self._fh = self._fh, fh
        if old is not None:
            old.close()
        self._active_size = HEADER_SIZE
        with self._lock:
            self.total_bytes += HEADER_SIZE
            self._segments.append(SegmentInfo(self.next_seq, path, HEADER_SIZE, self.next_seq - 1))

    def _fail(self, ex: BaseException) -> None:
        self._failed = ex
        log.error("walbatch log in %s failed: %s", self.directory, ex)

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    # ------------------------------------------------------------ checkpoint

    def commit_checkpoint(self, cp: Checkpoint) -> None:
        """Make ``cp`` durable, then delete the segments it covers entirely."""
        if self._closed or self.readonly or self.role == "writer":
            # A flusher outliving close() must not touch a directory it no longer locks.
            raise LogFailed(f"the log in {self.directory} is closed, read-only or write-only")
        if cp.seq < self.checkpoint.seq:
            raise ValueError(f"checkpoint may not move back from {self.checkpoint.seq} to {cp.seq}")
        if cp == self.checkpoint:
            return
        write_checkpoint(self.fs, os.path.join(self.directory, CHECKPOINT_FILE), cp)
        self.fsyncs += 2
        self.checkpoint = cp
        self.truncate_front(cp.seq)

    def truncate_front(self, seq: int) -> None:
        """Delete sealed segments whose records are all <= ``seq``.

        The caller must have made a checkpoint covering ``seq`` durable first.
        """
        with self._lock:
            doomed = []
            while len(self._segments) > 1 and self._segments[0].last_seq <= seq:
                doomed.append(self._segments.pop(0))
            self.total_bytes -= sum(s.size for s in doomed)
        for seg in doomed:
            try:
                self.fs.unlink(seg.path)
            except FileNotFoundError:
                pass  # a writer's recovery got there first (split roles)
        if doomed:
            self.fs.fsync_dir(self.segdir)

    # ------------------------------------------------------------------ read

    def segments(self) -> list[SegmentInfo]:
        with self._lock:
            return [SegmentInfo(s.first_seq, s.path, s.size, s.last_seq, s.sealed) for s in self._segments]

    @property
    def bytes(self) -> int:
        """Durable bytes in all segments."""
        with self._lock:
            return sum(s.size for s in self._segments)

    def active_bytes(self) -> int:
        """Bytes written to the active segment, synced or not (for quotas)."""
        return self._active_size

    def reader(self, from_seq: int) -> LogReader:
        return LogReader(self, from_seq)

    def first_seq(self) -> int:
        """The lowest seq still on disk (records below it were delivered and deleted)."""
        segs = self.segments()
        return segs[0].first_seq if segs else self.checkpoint.seq + 1

    def records(self, from_seq: int | None = None, to_seq: int | None = None
                ) -> Iterator[tuple[int, object, bool]]:
        """Yield ``(seq, item, lost)`` for durable records in ``[from_seq, to_seq]``.

        ``lost`` is True (and ``item`` None) for seqs quarantined as damaged.
        Raises CorruptLog on damage that was not quarantined.
        """
        seq_from = max(from_seq or 1, self.first_seq())
        reader = self.reader(seq_from)
        try:
            while frames := reader.read():
                for f in frames:
                    if f.payload is None:
                        for seq in range(f.first_seq, f.first_seq + f.count):
                            if seq >= seq_from and (to_seq is None or seq <= to_seq):
                                yield seq, None, True
                        continue
                    try:
                        decoded = decode_items(f.payload, f.count)
                    except ValueError as ex:
                        raise CorruptLog(self.segdir, 0, str(ex),
                                         (f.first_seq, f.first_seq + f.count - 1)) from ex
                    for i, (item, _size) in enumerate(decoded):
                        seq = f.first_seq + i
                        if seq < seq_from:
                            continue
                        if to_seq is not None and seq > to_seq:
                            return
                        yield seq, item, False
        finally:
            reader.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._marker_fd >= 0:
            os.close(self._marker_fd)
            self._marker_fd = -1
        self._filelock.release()  # type: ignore[attr-defined]


class LogReader:
    """Reads durable records from ``from_seq`` on, checking every checksum again.

    Damage may be stepped over only where the seqs it hides are already
    delivered (below ``from_seq``) or were given up by quarantine at open.
    """

    def __init__(self, log: Log, from_seq: int) -> None:
        self.log = log
        self.next_seq = from_seq
        self._seg: SegmentInfo | None = None
        self._fh: FileHandle | None = None
        self._offset = 0
        self._buf = b""
        self._buf_at = 0

    def _lost_at(self, seq: int) -> LostRange | None:
        return next((r for r in self.log.lost if r.first <= seq <= r.last), None)

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
                    raise CorruptLog(self.log.segdir, 0, f"no segment holds seq {self.next_seq}")
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
            hidden = (self.next_seq, nxt.first_seq - 1)
            lost = self._lost_at(self.next_seq)
            if hidden[1] < hidden[0] or (lost is not None and lost.last >= hidden[1]):
                return Frame(offset + nxt.offset, offset + nxt.end, nxt.first_seq, nxt.count)
            raise CorruptLog(seg.path, offset, "invalid frame (bad marker, length or checksum)",
                             hidden)
        later = [s for s in self.log.segments() if s.first_seq > seg.first_seq]
        if later:
            hidden = (self.next_seq, later[0].first_seq - 1)
            lost = self._lost_at(self.next_seq)
            if hidden[1] < hidden[0] or (lost is not None and lost.last >= hidden[1]):
                return None  # damage at the end of a sealed segment hides no undelivered record
        raise CorruptLog(seg.path, offset, "invalid frame (bad marker, length or checksum)",
                         (self.next_seq, seg.last_seq) if seg.last_seq >= self.next_seq else None)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing recovery found in the log, and what it did about it."""

    path: str
    offset: int
    length: int
    reason: str
    seqs: tuple[int, int] | None
    action: str
    """``trimmed`` (torn tail cut off), ``removed`` (half-created segment),
    ``torn`` (readonly: would be trimmed), ``ignored`` (damage in delivered
    records), ``quarantined`` (moved aside, seqs lost) or ``corrupt``
    (readonly report of damage that would stop the log)."""

    @property
    def is_corruption(self) -> bool:
        return self.action in ("quarantined", "corrupt")

    def describe(self) -> str:
        seqs = f"; seqs {self.seqs[0]}..{self.seqs[1]}" if self.seqs else ""
        what = _ACTIONS.get(self.action, self.action)
        return f"{what}: {self.path} at offset {self.offset} ({self.length} bytes): {self.reason}{seqs}"


_ACTIONS = {
    "trimmed": "trimmed torn tail",
    "removed": "removed half-created segment",
    "torn": "torn tail (open would trim it)",
    "ignored": "ignored damage in delivered records",
    "quarantined": "quarantined damaged range",
    "corrupt": "CORRUPT",
}


def _rebuild_checkpoint(fs: FileSystem, directory: str, segdir: str,
                        names: list[tuple[int, str]], cause: CorruptLog) -> Checkpoint:
    """Quarantine repair of a damaged or missing checkpoint: assume nothing was delivered.

    Everything still in the log is delivered again (an idempotent sink drops the
    duplicates); the running totals restart from zero. The log id comes from the
    first segment header that is intact.
    """
    log_id = None
    for _first, name in names:
        found, _why = decode_header(fs.read_file(os.path.join(segdir, name))[:HEADER_SIZE])
        if found is not None:
            log_id = found
            break
    if log_id is None:
        raise CorruptLog(cause.path, cause.offset,
                         f"{cause.reason}, and no segment header names the log id to rebuild it")
    cp = Checkpoint(log_id, names[0][0] - 1 if names else 0)
    path = os.path.join(directory, CHECKPOINT_FILE)
    qdir = os.path.join(directory, QUARANTINE_DIR)
    fs.makedirs(qdir)
    if fs.exists(path):
        fs.write_file(os.path.join(qdir, f"checkpoint@{int(time.time())}.bad"), fs.read_file(path))
    write_checkpoint(fs, path, cp)
    log.error("walbatch recovery: rebuilt %s (%s): everything from seq %d on is delivered "
              "again", path, cause.reason, cp.seq + 1)
    return cp


_LOCK_GRACE = 0.5  # seconds


def read_marker(fs: FileSystem, directory: str, log_id: uuid.UUID) -> tuple[int, int, int] | None:
    """``(synced_seq, segment first_seq, end offset)`` from ``<dir>/synced``, if it is this log's."""
    return load_marker(fs, directory, log_id)[0]


def load_marker(fs: FileSystem, directory: str,
                log_id: uuid.UUID) -> tuple[tuple[int, int, int] | None, str | None]:
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
    if len(data) != _MARKER.size + 4 or struct.unpack_from("<I", data, _MARKER.size)[0] != crc32c(
            data[:_MARKER.size]):
        return None, f"the marker file '{SYNCED_FILE}' is damaged ({len(data)} bytes, bad checksum)"
    magic, seq, seg_first, end, lid = _MARKER.unpack_from(data)
    if magic != _MARKER_MAGIC or lid != log_id.bytes:
        return None, f"the marker file '{SYNCED_FILE}' belongs to another log"
    return (seq, seg_first, end), None


class _NoLock:
    def release(self) -> None:
        pass


class _Locks:
    """The file locks a role holds, released together."""

    def __init__(self) -> None:
        self.held: list[object] = []

    def take(self, fs: FileSystem, path: str, message: str, grace: float = 0.0) -> None:
        """Lock ``path``; wait up to ``grace`` seconds for a holder that is only passing by."""
        end = time.monotonic() + grace
        while True:
            try:
                self.held.append(fs.lock(path))
                return
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise LogLocked(message) from None
                time.sleep(0.02)

    def release(self) -> None:
        while self.held:
            self.held.pop().release()  # type: ignore[attr-defined]


class _EmptySegments:
    """A read-only view that pretends a missing segments/ directory is empty."""

    def __init__(self, fs: FileSystem, segdir: str) -> None:
        self._fs, self._segdir = fs, segdir

    def listdir(self, path: str) -> list[str]:
        return [] if path == self._segdir else self._fs.listdir(path)

    def __getattr__(self, name: str) -> object:
        return getattr(self._fs, name)


class _Recovery:
    """Collects what recovery finds and acts on it according to the mode."""

    def __init__(self, fs: FileSystem, directory: str, cp: Checkpoint, mode: str,
                 readonly: bool) -> None:
        self.fs = fs
        self.directory = directory
        self.cp = cp
        self.mode = mode
        self.readonly = readonly
        self.findings: list[Finding] = []
        self.lost: list[LostRange] = []
        self.removed: list[str] = []
        self._raw: list[bytes] = []
        self.known_seqs: list[tuple[int, int]] = []
        self.known = self._reported_ranges()

    def _reported_ranges(self) -> set[tuple[str, int]]:
        """(segment, offset) of damage an earlier quarantine already moved aside.

        Also fills ``known_seqs``: the seqs it reported lost (a quarantined file
        shows up afterwards as a gap at another place).
        """
        path = os.path.join(self.directory, QUARANTINE_DIR, QUARANTINE_REPORT)
        if not self.fs.exists(path):
            return set()
        known = set()
        for line in self.fs.read_file(path).decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
                known.add((str(entry["segment"]), int(entry["offset"])))
                if entry.get("lost_seqs"):
                    first, last = entry["lost_seqs"]
                    self.known_seqs.append((int(first), int(last)))
            except (ValueError, KeyError, TypeError):
                log.warning("walbatch: ignoring a malformed line in %s: %.80r", path, line)
        return known

    def torn(self, path: str, offset: int, length: int, reason: str, remove: bool = False) -> None:
        if self.readonly:
            action = "torn"
        elif remove:
            self.fs.unlink(path)
            self.fs.fsync_dir(os.path.dirname(path))
            action = "removed"
        else:
            fh = self.fs.open_append(path)
            try:
                fh.truncate(offset)
                fh.sync()
            finally:
                fh.close()
            action = "trimmed"
        finding = Finding(path, offset, length, reason + "; a write cut short by a crash, which "
                          "was never acknowledged (or damage to the newest records: see "
                          "docs/guarantees.md)", None, action)
        self.findings.append(finding)
        if not self.readonly:
            log.warning("walbatch recovery: %s", finding.describe())

    def damage(self, path: str, offset: int, length: int, reason: str,
               seqs: tuple[int, int] | None, raw: bytes = b"", remove: bool = False) -> None:
        """Record damage; ``remove``: the whole file goes to quarantine (a foreign segment)."""
        cp = self.cp.seq
        if remove and self.mode == "quarantine" and not self.readonly:
            self.removed.append(path)
        if seqs is not None and seqs[1] <= cp:
            self.findings.append(Finding(path, offset, length, reason + " (already delivered)",
                                         seqs, "ignored"))
            return
        if seqs is not None and seqs[0] <= cp:
            seqs = (cp + 1, seqs[1])
        reported = (os.path.basename(path), offset) in self.known or (
            seqs is not None and any(a <= seqs[0] and seqs[1] <= b for a, b in self.known_seqs))
        if self.mode == "raise" and not reported:
            raise CorruptLog(path, offset, reason, seqs)
        action = "quarantined" if self.mode == "quarantine" or reported else "corrupt"
        self.findings.append(Finding(path, offset, length, reason, seqs, action))
        self._raw.append(raw)
        if seqs is not None:
            self.lost.append(LostRange(seqs[0], seqs[1], path, offset, reason))

    def finish(self) -> list[LostRange]:
        """Write the quarantine report and the damaged bytes (quarantine mode)."""
        if self.mode != "quarantine" or self.readonly:
            return self.lost
        qdir = os.path.join(self.directory, QUARANTINE_DIR)
        for path in self.removed:  # another log's segment: out of segments/, kept as it was
            self.fs.makedirs(qdir)
            self.fs.rename(path, os.path.join(qdir, os.path.basename(path) + ".foreign"))
            self.fs.fsync_dir(os.path.dirname(path))
            self.fs.fsync_dir(qdir)
        entries = [(f, raw) for f, raw in zip(
            [f for f in self.findings if f.action in ("quarantined", "corrupt")], self._raw,
            strict=True) if f.action == "quarantined"]
        if not entries:
            return self.lost
        self.fs.makedirs(qdir)
        report_path = os.path.join(qdir, QUARANTINE_REPORT)
        known = self.fs.read_file(report_path).decode() if self.fs.exists(report_path) else ""
        lines = []
        for f, raw in entries:
            bad_name = f"{os.path.basename(f.path)}@{f.offset}.bad"
            if f'"bytes_file": "{bad_name}"' in known:
                continue  # reported by an earlier open
            self.fs.write_file(os.path.join(qdir, bad_name), raw)
            lines.append(json.dumps({
                "time": time.time(), "segment": os.path.basename(f.path), "offset": f.offset,
                "length": f.length, "reason": f.reason,
                "lost_seqs": list(f.seqs) if f.seqs else None, "bytes_file": bad_name,
            }, sort_keys=True))
            log.error("walbatch recovery: %s", f.describe())
        if lines:
            write_atomic(self.fs, report_path, (known + "\n".join(lines) + "\n").encode())
        return self.lost
