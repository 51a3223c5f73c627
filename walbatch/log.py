"""The segment log: append, sync, roll, checkpoint, truncate_front, read.

Ownership: one ``Log`` per directory per process, enforced by the locks in
``walbatch.lock``. Writers (``append``/``sync``) must be serialized by the caller
(the group committer does it); ``truncate_front``, ``commit_checkpoint`` and
readers may run on other threads: the segment list is guarded by ``_lock``.
Opening recovers the log first (``walbatch.recovery``); reading is
``walbatch.reader``; the writer's published position is ``walbatch.marker``.

Invariants:
- ``next_seq`` never goes back below anything that could have been delivered:
  it is at least ``checkpoint.seq + 1`` and above every durable record.
- A reader only sees bytes up to the last successful sync of a segment.
- A segment is deleted only after a durable checkpoint covers all of it, and the
  directory is fsync'd after every create and unlink.
- After a failed fsync the log is failed (``LogFailed``) until reopened; so it is
  when its lock turns out to have been deleted or replaced.
- Nothing is acknowledged (``sync`` returns) unless the writer lock still holds.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import uuid
from collections.abc import Iterator

from .checkpoint import Checkpoint, write_checkpoint
from .datadir import (
    CHECKPOINT_FILE,
    FLUSH_LOCK_FILE,
    LOCK_FILE,
    QUARANTINE_DIR,
    QUARANTINE_REPORT,
    SEGMENTS_DIR,
    SYNCED_FILE,
)
from .errors import CorruptLog, LogFailed, LogWriteError
from .fileio import FileHandle, FileSystem, OsFileSystem
from .framing import HEADER_SIZE, decode_items, encode_frame_header, encode_header
from .lock import DirLocks, NoLocks
from .marker import Marker, MarkerWriter, load_marker, read_marker
from .reader import LogReader, RawFrame
from .recovery import Finding, LostRange, Recovered, recover
from .segment import SegmentInfo, parse_segment_name, segment_name

log = logging.getLogger("walbatch")

__all__ = [
    "CHECKPOINT_FILE", "FLUSH_LOCK_FILE", "LOCK_FILE", "QUARANTINE_DIR", "QUARANTINE_REPORT",
    "SEGMENTS_DIR", "SYNCED_FILE", "Finding", "Log", "LogReader", "LostRange", "Marker",
    "RawFrame", "SegmentInfo", "load_marker", "read_marker",
]


# A write refused for lack of room wrote nothing that matters: undo it and go on.
_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class Log:
    """An open segment log. Use ``Log.open()``."""

    def __init__(self, directory: str, fs: FileSystem, locks: DirLocks, rec: Recovered,
                 segment_bytes: int, readonly: bool = False) -> None:
        self.directory = directory
        self.fs = fs
        self._locks = locks
        self.checkpoint = rec.checkpoint
        self.log_id: uuid.UUID = rec.checkpoint.log_id
        self.segment_bytes = segment_bytes
        self.next_seq = rec.next_seq
        self.synced_seq = rec.next_seq - 1
        self.lost = rec.lost
        """Seq ranges quarantined at open (above the checkpoint)."""
        self.holes = rec.holes
        """Delivered seqs whose records are damaged or gone (readers step over them)."""
        self.findings = rec.findings
        """Everything recovery found: torn tails, damage, ignored damage, moves."""
        self.recovery_notes = [f.describe() for f in rec.findings]
        """What open found and did, one line each (torn tails trimmed, ...)."""
        self.readonly = readonly
        self.role = "reader" if readonly else "owner"
        self._marker: MarkerWriter | None = None
        self.fsyncs = 0
        self._segments = rec.segments
        self.total_bytes = sum(s.size for s in rec.segments)
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
        every remaining frame and that every segment is in its place. Damage
        anywhere else raises ``CorruptLog``; with ``on_corruption="quarantine"``
        it is copied to ``<dir>/quarantine/``, reported in
        ``quarantine/report.jsonl`` and its seqs listed in ``Log.lost`` (misplaced
        segments are moved out, or back under their right name); with
        ``"report"`` it is only listed (in ``Log.findings``). See
        ``walbatch.recovery``.

        ``readonly=True`` takes no lock and changes nothing on disk (for
        ``walbatch verify``, ``status`` and ``dump``, which may run beside a
        live writer); the log can then only be read.

        ``role`` splits the log between two processes (``walbatch replay
        --follow``): ``"owner"`` (the default) writes and delivers and holds
        both the writer and the deliverer locks; ``"writer"`` appends only,
        holds the writer locks and publishes its last synced position in
        ``<dir>/synced`` after every sync; ``"flusher"`` holds the deliverer
        locks, changes no segment, reads only up to the published position
        (``refresh()``), and may write the checkpoint and delete covered sealed
        segments.
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
            rec = recover(fs, directory, on_corruption, True)
            return cls(directory, fs, NoLocks(), rec, segment_bytes, True)
        if role == "flusher" and not fs.exists(os.path.join(directory, CHECKPOINT_FILE)):
            raise FileNotFoundError(f"{directory} is not a walbatch log directory (no checkpoint)")
        if not fs.exists(directory):
            fs.makedirs(directory)
            fs.fsync_dir(os.path.dirname(directory))
        segdir = os.path.join(directory, SEGMENTS_DIR)
        if not fs.exists(segdir):
            fs.makedirs(segdir)  # the deliverer locks it
            fs.fsync_dir(directory)
        fs.makedirs(segdir)  # refuses a symlink where segments/ should be
        locks = DirLocks(fs, directory)
        log_: Log | None = None
        try:
            if role in ("owner", "writer"):
                locks.take_writer()
            if role in ("owner", "flusher"):
                locks.take_deliverer()
            rec = recover(fs, directory, on_corruption, role == "flusher")
            log_ = cls(directory, fs, locks, rec, segment_bytes)
            log_.role = role
            if role in ("writer", "owner"):
                seg = rec.segments[-1] if rec.segments else None
                log_._marker = MarkerWriter(fs, directory, log_.log_id, Marker(
                    log_.synced_seq, seg.first_seq if seg else 0, seg.size if seg else 0,
                    max(log_.checkpoint.seq, rec.marker.checkpoint if rec.marker else 0)))
        except BaseException:
            locks.release()
            raise
        if role == "flusher":
            log_.readonly = False  # may checkpoint; _check_usable still refuses appends
            # Trust only what the writer says is synced, not what happens to be on disk.
            log_.synced_seq = log_.next_seq = log_.checkpoint.seq
            log_.refresh()
        return log_

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
        try:
            self._locks.check("writer")
        except LogFailed as ex:
            self._fail(ex)
            raise
        except OSError as ex:
            self._fail(ex)
            raise LogFailed(f"checking the lock on {self.directory} failed: {ex}; the log "
                            "refuses writes until reopened") from ex
        with self._lock:
            seg = self._segments[-1]
            seg.size = self._active_size
            seg.last_seq = self.next_seq - 1
            self.synced_seq = self.next_seq - 1
        self._publish(seq=self.synced_seq, segment=seg.first_seq, offset=seg.size)

    # ------------------------------------------------- writer/flusher split

    def _publish(self, **fields: int) -> None:
        """Record how far the log is durable (and delivered) in ``<dir>/synced``.

        A follower (``replay --follow``) reads it to know what it may deliver, and
        recovery reads it as a high-water mark: damage at the tail below it is
        corruption of acknowledged records, not a torn write (``walbatch.marker``).
        Written after the fsync it describes, never fsync'd itself: a lost or stale
        update only lowers the mark, it never claims unsynced data.
        """
        if self._marker is None:
            return
        try:
            self._marker.publish(**fields)
        except OSError as ex:
            self._fail(ex)
            raise LogFailed(f"writing {self._marker.path} failed: {ex}; the log refuses writes "
                            "until reopened") from ex

    def read_marker(self) -> Marker | None:
        """The writer's published marker (``seq``: everything through it is durable)."""
        return read_marker(self.fs, self.directory, self.log_id)

    def refresh(self) -> bool:
        """Flusher role: pick up the writer's new segments and durable end; True if it moved."""
        marker = self.read_marker()
        if marker is None:
            return False
        seq, seg_first, end = marker.seq, marker.segment, marker.offset
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
                    fh = self.fs.open_read(path)
                    try:
                        size = fh.size()
                    finally:
                        fh.close()
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
        if getattr(self._fh, "dsync", False) and ex.errno not in _NO_ROOM:
            # An O_DSYNC write that failed for another reason (EIO) is a failed sync: the
            # file's state is unknown, so refuse every later write until reopened (as
            # after a failed fdatasync; leveldb does the same).
            self._fail(ex)
            raise LogFailed(f"synchronous write to {path} failed: {ex}; the log refuses writes "
                            "until reopened (unsynced data is in an unknown state)") from ex
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
            # Exclusive: a file already under this name is not ours to overwrite.
            fh = self.fs.open_append(path, dsync=True, exclusive=True)
        except FileExistsError as ex:
            self._fail(ex)
            raise LogFailed(f"creating segment {path} failed: a file of that name is already "
                            "there, which recovery did not see (is another process writing in "
                            f"{self.segdir}?); the log refuses writes until reopened") from ex
        except OSError as ex:  # nothing was created: a clean, retryable write error
            raise LogWriteError(f"creating segment {path} failed: {ex}") from ex
        try:
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
        self._locks.check("deliverer")
        write_checkpoint(self.fs, os.path.join(self.directory, CHECKPOINT_FILE), cp)
        self.fsyncs += 2
        self.checkpoint = cp
        if self._marker is not None:
            try:
                self._marker.publish(checkpoint=cp.seq)
            except OSError as ex:  # the checkpoint is durable; a stale floor is only lower
                log.warning("walbatch: recording checkpoint %d in %s failed: %s", cp.seq,
                            self._marker.path, ex)
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
        """A reader of durable records from ``from_seq`` on (``walbatch.reader``)."""
        return LogReader(self, from_seq)

    def first_seq(self) -> int:
        """The lowest seq still on disk (records below it were delivered and deleted)."""
        segs = self.segments()
        first = segs[0].first_seq if segs else self.checkpoint.seq + 1
        # Seqs before the first segment's name that recovery stepped over (a checkpoint
        # moved forward past them) are not on disk either.
        for r in sorted(self.holes, key=lambda r: r.first):
            if r.first <= first <= r.last:
                first = r.last + 1
        return first

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
        if self._marker is not None:
            self._marker.close()
            self._marker = None
        self._locks.release()


