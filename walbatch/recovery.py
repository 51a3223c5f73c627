"""Recovery: what ``Log.open`` finds in a log directory, and what it does about it.

docs/format.md ("Recovery on open") is the normative text. In short, recovery

1. reads the checkpoint (creating it for a new log; rebuilding a damaged one
   when quarantining), and the synced marker: the high-water mark (everything
   through it was durable) and the delivery floor (everything through it was
   delivered, whatever an older checkpoint put back from a backup says);
2. puts every segment file in its place. A segment is *in place* when its
   first frame starts at the seq in its name (or after damage) and holds no seq
   an earlier segment holds. Anything else is *misplaced*: another log's
   segment (``foreign``), a copy of records the log holds (``duplicate``), or
   a file under the wrong name (swapped, restored from a backup);
3. deletes in-place segments a durable checkpoint covers entirely;
4. checks every frame of every in-place segment, in log order, and classifies
   each damaged range and each run of missing seqs: seqs at or below the
   delivery floor were delivered (a *hole*, harmless; readers step over it);
   a torn tail past the high-water mark is a write that was never acknowledged
   (trimmed); everything else is *corruption*.

What corruption does depends on the mode: ``raise`` raises ``CorruptLog`` at the
first one (damage an earlier quarantine already reported excepted); ``report``
(read-only: ``walbatch verify``, ``status``, ``dump``) only lists it and changes
nothing; ``quarantine`` (``verify --repair``) copies damaged bytes to
``quarantine/``, gives the seqs up (``lost``, recorded as dead letters by the
caller), moves misplaced segments out of ``segments/`` and puts a misplaced one
back under its right name when its records fill a gap in the log. A read-only
open reports what a repair would do, so ``verify`` and ``verify --repair`` never
disagree about which seqs are lost.

Ownership: recovery runs before the log is usable, under the writer lock (or no
lock, read-only); it is the only code that trims, removes or moves segments.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from .checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from .datadir import CHECKPOINT_FILE, QUARANTINE_DIR, SEGMENTS_DIR, SYNCED_FILE
from .errors import CorruptLog
from .fileio import FileSystem
from .framing import FRAME_HEADER_SIZE, HEADER_SIZE, Frame, decode_header
from .marker import Marker, load_marker
from .quarantine import Quarantine, Reported
from .segment import (
    Damage,
    SegmentBytes,
    SegmentInfo,
    SegmentScan,
    parse_segment_name,
    scan_segment,
    segment_name,
)

log = logging.getLogger("walbatch")

_MAX_PASSES = 4


@dataclass(frozen=True, slots=True)
class LostRange:
    """Seqs recovery gave up (or, in ``holes``, found unreadable but already delivered)."""

    first: int
    last: int
    path: str
    offset: int
    reason: str


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
    ``torn`` (read-only: would be trimmed), ``ignored`` (damage in delivered
    records), ``quarantined`` (moved aside, seqs lost), ``moved`` (a misplaced
    segment taken out of the log), ``restored`` (a misplaced segment put back
    under its right name), ``checkpoint`` (a checkpoint older than the log's
    delivery moved forward) or ``corrupt`` (read-only report of damage that
    stops the log)."""

    @property
    def is_corruption(self) -> bool:
        return self.action in ("quarantined", "corrupt")

    def report(self, level: int) -> None:
        """One log line (``event`` ``recovery``, with the finding as fields)."""
        fields = {"event": "recovery", "action": self.action, "path": self.path,
                  "offset": self.offset, "length": self.length, "reason": self.reason}
        if self.seqs:
            fields.update(first_seq=self.seqs[0], last_seq=self.seqs[1])
        log.log(level, "walbatch recovery: %s", self.describe(), extra=fields)

    def describe(self) -> str:
        seqs = f"; seqs {self.seqs[0]}..{self.seqs[1]}" if self.seqs else ""
        what = _ACTIONS.get(self.action, self.action)
        if self.action in ("trimmed", "torn") and self.seqs:
            what = ("trimmed damage in delivered records" if self.action == "trimmed" else
                    "damage in delivered records at the tail (open would trim it)")
        return f"{what}: {self.path} at offset {self.offset} ({self.length} bytes): {self.reason}{seqs}"


_ACTIONS = {
    "trimmed": "trimmed torn tail",
    "removed": "removed half-created segment",
    "torn": "torn tail (open would trim it)",
    "ignored": "ignored damage in delivered records",
    "quarantined": "quarantined damaged range",
    "moved": "moved out of the log",
    "restored": "put back in place",
    "checkpoint": "moved the checkpoint forward",
    "corrupt": "CORRUPT",
}


@dataclass
class Recovered:
    """The state of a recovered log."""

    checkpoint: Checkpoint
    segments: list[SegmentInfo]
    next_seq: int
    lost: list[LostRange]
    """Undelivered seqs given up (quarantine), or that a repair would give up (report)."""
    holes: list[LostRange]
    """Delivered seqs whose records are unreadable or gone; readers step over them."""
    findings: list[Finding]
    marker: Marker | None


@dataclass
class _Misplaced:
    path: str
    name_seq: int
    kind: str  # "foreign" or "misplaced"
    lo: int = 0
    hi: int = 0
    """Seqs of its first and last valid frame (0 for a foreign segment)."""
    log_id: uuid.UUID | None = None
    same: bool | None = None
    """Its records above the floor are all in the log, byte for byte (a duplicate)."""
    staged: bool = False
    """It lies in quarantine/ already (moved by an earlier repair)."""

    @property
    def proper(self) -> int:
        return self.lo


def recover(fs: FileSystem, directory: str, mode: str, readonly: bool) -> Recovered:
    """Recover the log in ``directory`` (its segments directory must exist unless read-only)."""
    segdir = os.path.join(directory, SEGMENTS_DIR)
    if not fs.exists(segdir):
        fs = _EmptySegments(fs, segdir)  # type: ignore[assignment]  # read-only only
    cp, rebuilt = _load_checkpoint(fs, directory, segdir, mode, readonly)
    marker, marker_damage = load_marker(fs, directory, cp.log_id)
    quarantine = Quarantine(fs, directory)
    reported = quarantine.reported()
    virtual: dict[str, int] = {}  # read-only: path -> the name seq a repair would give it
    excluded: set[str] = set()  # read-only: paths a repair would move out
    moves: list[Finding] = rebuilt  # findings of moves made (or, read-only, foreseen) so far
    for attempt in range(_MAX_PASSES):
        names = _listing(fs, segdir, excluded, virtual)
        p = _Pass(fs, directory, cp, marker, marker_damage, mode, readonly, reported, names)
        p.walk()
        if mode == "raise":
            break
        p.check_misplaced()
        plan = p.restore_plan(quarantine.moved())
        last = attempt == _MAX_PASSES - 1
        if readonly:
            for m in p.misplaced:
                if m.path not in excluded:
                    excluded.add(m.path)
                    moves.append(p.misplaced_finding(m, m.path in {c.path for c in plan}))
            for c in plan:
                if c.staged and c.path not in virtual:
                    moves.append(p.misplaced_finding(c, True))
            fresh = {c.path: c.proper for c in plan if virtual.get(c.path) != c.proper}
            if not fresh or last:
                break
            virtual.update(fresh)
            continue
        if not p.misplaced and not plan:
            break
        # Quarantine: everything misplaced leaves segments/ first (so that no name is
        # taken twice), then what fills a gap comes back under its right name. A
        # crash in between leaves them in quarantine/, where the next repair finds them.
        where: dict[str, str] = {}
        chosen = {c.path for c in plan} if not last else set()
        for m in p.misplaced:
            suffix = ".foreign" if m.kind == "foreign" else (
                ".duplicate" if m.same and m.path not in chosen else ".misplaced")
            where[m.path] = quarantine.move_in(m.path, suffix)
            if m.path not in chosen:
                moves.append(p.misplaced_finding(m, False, where[m.path]))
        for c in plan if not last else []:
            src = where.get(c.path, c.path)
            dest = os.path.join(segdir, segment_name(c.proper))
            fs.rename(src, dest)
            fs.fsync_dir(segdir)
            fs.fsync_dir(os.path.dirname(src))
            moves.append(Finding(c.path, 0, 0, f"holds seqs {c.lo}..{c.hi}, which the log lacked; "
                                 f"moved to {dest}", None, "restored"))
            moves[-1].report(logging.ERROR)
        if last:
            break
    return p.finish(quarantine, moves)


def _listing(fs: FileSystem, segdir: str, excluded: set[str],
             virtual: dict[str, int]) -> list[tuple[int, str]]:
    names = [(first, os.path.join(segdir, n)) for n in fs.listdir(segdir)
             if (first := parse_segment_name(n)) is not None]
    names = [(virtual.get(p, first), p) for first, p in names if p not in excluded or p in virtual]
    names += [(seq, p) for p, seq in virtual.items() if not p.startswith(segdir + os.sep)]
    return sorted(names)


def _load_checkpoint(fs: FileSystem, directory: str, segdir: str, mode: str,
                     readonly: bool) -> tuple[Checkpoint, list[Finding]]:
    names = sorted((first, n) for n in fs.listdir(segdir)
                   if (first := parse_segment_name(n)) is not None)
    cp_path = os.path.join(directory, CHECKPOINT_FILE)
    if fs.exists(cp_path) or names:
        try:
            if not fs.exists(cp_path):
                raise CorruptLog(
                    cp_path, 0, "checkpoint file is missing but segments exist (was it deleted?)")
            return read_checkpoint(fs, cp_path), []
        except CorruptLog as ex:
            if mode == "raise" or (readonly and mode != "report"):
                raise  # (a follower does not rebuild what its writer may still need)
            return _rebuild_checkpoint(fs, directory, segdir, names, ex, mode, readonly)
    cp = Checkpoint(uuid.uuid4())
    if not readonly:  # a reader changes nothing, not even a brand-new directory
        if fs.exists(os.path.join(directory, SYNCED_FILE)):
            fs.unlink(os.path.join(directory, SYNCED_FILE))  # a former log's
        write_checkpoint(fs, cp_path, cp)
    return cp, []


def _rebuild_checkpoint(fs: FileSystem, directory: str, segdir: str,
                        names: list[tuple[int, str]], cause: CorruptLog, mode: str,
                        readonly: bool) -> tuple[Checkpoint, list[Finding]]:
    """Quarantine repair of a damaged or missing checkpoint: assume nothing was delivered.

    Everything still in the log is delivered again (an idempotent sink drops the
    duplicates); the running totals restart from zero. The log id comes from the
    first segment header that is intact. Read-only, only say so.
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
    what = f"{cause.reason}; everything from seq {cp.seq + 1} on is delivered again"
    if readonly:
        return cp, [Finding(path, cause.offset, 0, f"{what} once a repair rebuilds it", None,
                            "corrupt")]
    qdir = os.path.join(directory, QUARANTINE_DIR)
    fs.makedirs(qdir)
    if fs.exists(path):
        fs.write_file(os.path.join(qdir, f"checkpoint@{int(time.time())}.bad"), fs.read_file(path))
    write_checkpoint(fs, path, cp)
    finding = Finding(path, cause.offset, 0, f"rebuilt: {what}", None, "quarantined")
    finding.report(logging.ERROR)
    return cp, [finding]


@dataclass
class _Pass:
    """One walk over the segments in name order."""

    fs: FileSystem
    directory: str
    cp: Checkpoint
    marker: Marker | None
    marker_damage: str | None
    mode: str
    readonly: bool
    reported: Reported
    names: list[tuple[int, str]]
    findings: list[Finding] = field(default_factory=list)
    lost: list[LostRange] = field(default_factory=list)
    holes: list[LostRange] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    """Runs of missing seqs above the floor (a misplaced segment may fill one)."""
    misplaced: list[_Misplaced] = field(default_factory=list)
    segments: list[SegmentInfo] = field(default_factory=list)
    held: list[tuple[int, int]] = field(default_factory=list)
    """The seqs of the first and last frame of each in-place segment."""
    raw: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.segdir = os.path.join(self.directory, SEGMENTS_DIR)
        # Everything through here was durable: the checkpoint's mark, or the newer one
        # the writer published after its last fsync.
        self.high_water = max(self.cp.seq, self.cp.high_water, self.marker.seq if self.marker else 0)
        # Everything through here was delivered. A checkpoint file older than the
        # writer's record of delivery was put back from a backup: what it lacks was
        # delivered, not lost.
        self.floor = max(self.cp.seq, self.marker.checkpoint if self.marker else 0)
        self.expected = 0  # the next seq we must find (0: before the first segment)
        self.end = 0  # the highest seq an in-place segment holds

    # ------------------------------------------------------------- the walk

    def walk(self) -> None:
        # Segments are read a window at a time (SegmentBytes), never whole: this walk
        # runs at every open, and its memory must not grow with the segment size.
        pending: tuple[int, str, SegmentBytes, SegmentScan] | None = None
        kept = False  # an in-place segment was kept (not covered by the checkpoint)
        opened: list[SegmentBytes] = []
        try:
            for first, path in self.names:
                data = SegmentBytes(self.fs, path)
                opened.append(data)
                scan = scan_segment(path, data, merge=True)  # runs: one object per run
                kind = self._classify(first, scan)
                if kind != "in place":
                    self._add_misplaced(first, path, scan, kind)
                    continue
                if scan.frames:
                    self.end = max(self.end, max(f.last_seq for f in scan.frames))
                    self.held.append((scan.frames[0].first_seq, max(f.last_seq for f in scan.frames)))
                if pending is not None:
                    kept = self._segment(*pending, next_first=first, covered_ok=not kept) or kept
                pending = (first, path, data, scan)
                for done in opened[:-1]:  # only the pending segment stays open
                    done.close()
                del opened[:-1]
            if pending is not None:
                self._segment(*pending, next_first=None, covered_ok=False)
        finally:
            for data in opened:
                data.close()
        self._end_of_log()

    def _classify(self, first: int, scan: SegmentScan) -> str:
        if scan.log_id is not None and scan.log_id != self.cp.log_id:
            return "foreign"
        if not scan.frames:
            return "in place"
        f0 = scan.frames[0]
        if f0.first_seq < first or (f0.first_seq <= self.end and self.end > self.floor):
            return "misplaced"  # seqs before its name, or undelivered ones an earlier segment holds
        if f0.offset == HEADER_SIZE and f0.first_seq != first:
            return "misplaced"  # nothing before its first frame hides seqs from its name on
        return "in place"

    def _add_misplaced(self, first: int, path: str, scan: SegmentScan, kind: str) -> None:
        m = _Misplaced(path, first, kind, log_id=scan.log_id)
        if kind == "foreign":
            reason = (f"segment belongs to log {scan.log_id}, not {self.cp.log_id} (copied in from "
                      "another data directory?)")
        else:
            m.lo, m.hi = scan.frames[0].first_seq, max(f.last_seq for f in scan.frames)
            # Written by a writer of this log, so durable once: whatever of it the log
            # does not hold (or get back from it) is lost, never silently dropped.
            self.high_water = max(self.high_water, m.hi)
            reason = (f"segment named for seq {first} holds seqs {m.lo}..{m.hi} (a copy, or a file "
                      "put back under another name?)")
        if self.mode == "raise":
            # The seqs its place in the log stood for (what a repair may give up).
            later = [n for n, _p in self.names if n > first]
            last = later[0] - 1 if later else self.high_water
            seqs = (max(first, self.floor + 1), last)
            raise CorruptLog(path, 0, reason + "; walbatch verify --repair moves it out of the log",
                             seqs if seqs[0] <= seqs[1] else None)
        self.misplaced.append(m)

    def _segment(self, first: int, path: str, data: SegmentBytes, scan: SegmentScan,
                 next_first: int | None, covered_ok: bool) -> bool:
        """Check one in-place segment; return True if it stays in the log."""
        is_last = next_first is None
        if covered_ok and next_first is not None and next_first - 1 <= self.cp.seq:
            # A durable checkpoint covers it entirely: it was due for deletion when
            # the process stopped. Finish the job.
            if not self.readonly:
                self.fs.unlink(path)
                self.fs.fsync_dir(self.segdir)
            return False
        if scan.header_error and not scan.frames and is_last and len(data) <= HEADER_SIZE:
            # Crash while the segment was being created: nothing in it was acknowledged.
            self._torn(path, 0, len(data), f"incomplete segment header ({scan.header_error})",
                       remove=True)
            return False
        if not self.expected:
            self.expected = min(first, self.cp.seq + 1)
        if first > self.expected:
            self._damage(path, 0, 0, f"records {self.expected}..{first - 1} are missing "
                         "(segment deleted?)", (self.expected, first - 1), gap=True)
            self.expected = first
        last_seq, damaged_last = self._frames(first, path, data, scan, next_first)
        size = len(data)
        if scan.tail_at is not None and scan.tail_at >= HEADER_SIZE:
            size, sealed = self._tail(path, data, scan, next_first)
            damaged_last = damaged_last or sealed
        if next_first is not None and next_first > self.expected:
            self._damage(path, size, 0, f"records {self.expected}..{next_first - 1} are missing",
                         (self.expected, next_first - 1), gap=True)
            self.expected = next_first
        self.segments.append(SegmentInfo(first, path, size, max(last_seq, self.expected - 1),
                                         sealed=damaged_last or bool(scan.header_error)))
        return True

    def _frames(self, first: int, path: str, data: SegmentBytes, scan: SegmentScan,
                next_first: int | None) -> tuple[int, bool]:
        """Walk a segment's frames and damaged ranges in file order; return (its last
        seq, whether the damage reaches its end)."""
        pieces: list[tuple[int, Frame | Damage]] = [(f.offset, f) for f in scan.frames]
        pieces += [(d.offset, d) for d in scan.damage]
        if scan.header_error:
            end = scan.frames[0].offset if scan.frames else len(data)
            pieces.append((0, Damage(0, end, scan.header_error)))
        pieces.sort(key=lambda p: p[0])
        last_seq = max(first, self.expected) - 1
        prev_last = first - 1  # last seq of the previous valid frame in this segment
        pending: Damage | None = None
        damaged_last = False
        for _off, piece in pieces:
            if isinstance(piece, Damage):
                pending = piece
                continue
            f = piece
            hidden_from = max(prev_last + 1, self.expected)
            if f.first_seq <= prev_last:
                # Impossible from one writer: a frame repeating seqs is not trusted; the
                # ones it adds past the frames before it are given up.
                extra = (prev_last + 1, f.last_seq) if f.last_seq > prev_last else None
                self._damage(path, f.offset, f.end - f.offset, f"frame repeats seqs "
                             f"{f.first_seq}..{min(f.last_seq, prev_last)}"
                             + ("" if extra else " (no record lost)"), extra, data[f.offset:f.end])
                pending = None
                if extra:
                    prev_last = f.last_seq
                    self.expected = max(self.expected, f.last_seq + 1)
                    last_seq = max(last_seq, f.last_seq)
                continue
            d = pending
            if d is not None and f.first_seq > hidden_from:
                self._damage(path, d.offset, d.end - d.offset, d.reason,
                             (hidden_from, f.first_seq - 1), data[d.offset:d.end])
            elif d is not None and f.first_seq > self.floor:
                # Garbage between contiguous frames: no record lost, still corruption.
                self._damage(path, d.offset, d.end - d.offset, d.reason + " (no record lost)",
                             None, data[d.offset:d.end])
            elif f.first_seq > hidden_from:
                self._damage(path, f.offset, 0, f"records {hidden_from}..{f.first_seq - 1} are "
                             "missing", (hidden_from, f.first_seq - 1))
            pending = None
            prev_last = f.last_seq
            if f.last_seq >= self.expected:
                self.expected = f.last_seq + 1
                last_seq = f.last_seq
        if pending is not None:
            # A bad header with no valid frame after it: the whole file is damage.
            # (Not a torn create: that leaves at most HEADER_SIZE bytes, handled above.)
            d = pending
            reason = d.reason
            if next_first is not None:
                lost_to = next_first - 1
            else:
                # The last segment, destroyed: nothing says how many records it held.
                # Each item takes at least one byte, so this many seqs at most; skip
                # them all rather than hand out a seq that may have been delivered.
                lost_to = max(self.expected - 1 + max(1, len(data) - HEADER_SIZE - FRAME_HEADER_SIZE),
                              self.high_water)
                reason += " (no frame header survived: an upper bound of the seqs it held)"
            seqs = (self.expected, lost_to) if lost_to >= self.expected else None
            self._damage(path, d.offset, d.end - d.offset, reason, seqs, data[d.offset:d.end])
            if seqs:
                self.expected = seqs[1] + 1
            damaged_last = next_first is None
        return last_seq, damaged_last

    def _tail(self, path: str, data: SegmentBytes, scan: SegmentScan,
              next_first: int | None) -> tuple[int, bool]:
        """Bytes after the last valid frame of a segment; return (size kept, sealed)."""
        at = scan.tail_at
        assert at is not None
        tail = len(data) - at
        have = self.expected - 1  # every seq through here is accounted for
        if next_first is not None:
            # Not the last segment: whatever the tail held, up to the next segment's
            # first seq, is gone.
            seqs = (self.expected, next_first - 1) if next_first - 1 >= self.expected else None
            self._damage(path, at, tail, scan.tail_reason, seqs, data[at:])
            if seqs:
                self.expected = seqs[1] + 1
            return len(data), True
        if have >= self.high_water and self.marker_damage is None:
            self._torn(path, at, tail, scan.tail_reason)
            return at, False
        if have >= self.high_water:
            # The mark that tells a torn write from damaged acknowledged records is
            # itself damaged: assume the worst. Each item took at least a byte, so
            # skip that many seqs rather than hand out one that may be acknowledged.
            seqs = (self.expected, self.expected - 1 + max(1, tail - FRAME_HEADER_SIZE))
            self._damage(path, at, tail, f"{scan.tail_reason}, and {self.marker_damage}, so it "
                         "cannot be told from a torn write (seqs: an upper bound)", seqs, data[at:])
            self.expected = seqs[1] + 1
            return len(data), True
        # The high-water mark says records past this point were durable: they were
        # acknowledged, and the tail is damage.
        seqs = (self.expected, self.high_water)
        if self.high_water <= self.floor:
            # ... already delivered: nothing is lost, and the damage is in the way of
            # new records; trim it like a torn tail, but say what it was.
            self._hole(path, at, seqs, scan.tail_reason)
            self._torn(path, at, tail, f"{scan.tail_reason} (records already delivered)",
                       delivered=seqs)
            self.expected = seqs[1] + 1
            return at, False
        self._damage(path, at, tail, scan.tail_reason, seqs, data[at:])
        self.expected = seqs[1] + 1
        return len(data), True

    def _end_of_log(self) -> None:
        start = self.expected or self.cp.seq + 1
        if self.high_water >= start and not any(
                r.last >= self.high_water for r in self.lost + self.holes):
            # Truncated at a frame boundary (or a segment deleted): the log ends
            # before the high-water mark said it was durable.
            at = self.segments[-1].path if self.segments else self.segdir
            self._damage(at, self.segments[-1].size if self.segments else 0, 0,
                         f"records {start}..{self.high_water} are missing: the log ends before its "
                         "high-water mark (checkpoint or synced marker)", (start, self.high_water),
                         gap=True)
            if self.segments:
                self.segments[-1].sealed = True
        self.expected = max(start, self.high_water + 1, self.floor + 1)

    # ------------------------------------------------------------ findings

    def _torn(self, path: str, offset: int, length: int, reason: str, remove: bool = False,
              delivered: tuple[int, int] | None = None) -> None:
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
        if not delivered:
            reason += ("; a write cut short by a crash, which was never acknowledged (or damage "
                       "to the newest records: see docs/guarantees.md)")
        finding = Finding(path, offset, length, reason, delivered, action)
        self.findings.append(finding)
        if not self.readonly:
            finding.report(logging.WARNING)

    def _hole(self, path: str, offset: int, seqs: tuple[int, int], reason: str) -> None:
        self.holes.append(LostRange(seqs[0], seqs[1], path, offset, reason))

    def _damage(self, path: str, offset: int, length: int, reason: str,
                seqs: tuple[int, int] | None, raw: bytes = b"", gap: bool = False) -> None:
        """Record damage (or, with ``gap``, missing records) hiding ``seqs``."""
        floor = self.floor
        reported = self.reported.covers(os.path.basename(path), offset, seqs)
        if gap and seqs is not None and seqs[1] > floor and not reported:
            self.gaps.append(seqs)  # (seqs an earlier repair gave up stay given up)
        if seqs is not None and seqs[0] <= floor:
            below = (seqs[0], min(seqs[1], floor))
            why = "already delivered" if floor == self.cp.seq else (
                f"already delivered: the checkpoint (seq {self.cp.seq}) is older than the log's "
                f"record of delivery (seq {floor}); was it put back from a backup?")
            self._hole(path, offset, below, reason)
            self.findings.append(Finding(path, offset, length, f"{reason} ({why})", below, "ignored"))
            if seqs[1] <= floor:
                return
            seqs = (floor + 1, seqs[1])
        if reported or self.reported.covers(os.path.basename(path), offset, seqs):
            action = "quarantined"
        elif self.mode == "raise":
            raise CorruptLog(path, offset, reason, seqs)
        else:
            action = "quarantined" if self.mode == "quarantine" else "corrupt"
        self.findings.append(Finding(path, offset, length, reason, seqs, action))
        self.raw.append(raw)
        if seqs is not None:
            self.lost.append(LostRange(seqs[0], seqs[1], path, offset, reason))

    # ---------------------------------------------------- misplaced segments

    def check_misplaced(self) -> None:
        """Find out which misplaced segments hold only records the log holds too."""
        for m in self.misplaced:
            if m.kind == "misplaced" and m.same is None:
                m.same = self._same_records(m.path)

    def _same_records(self, path: str) -> bool:
        # Frame by frame, not in runs: a copy may hold a prefix of the original's runs.
        scan = scan_segment(path, data := self.fs.read_file(path))
        cache: dict[str, tuple[bytes, dict[int, Frame]]] = {}
        for f in scan.frames:
            if f.last_seq <= self.floor:
                continue
            seg = next((s for s in self.segments if s.first_seq <= f.first_seq <= s.last_seq), None)
            if seg is None:
                return False
            if seg.path not in cache:
                other = self.fs.read_file(seg.path)
                cache.clear()  # one segment in memory at a time
                cache[seg.path] = (other, {g.first_seq: g for g in scan_segment(seg.path, other).frames})
            other, frames = cache[seg.path]
            g = frames.get(f.first_seq)
            if g is None or data[f.offset:f.end] != other[g.offset:g.end]:
                return False
        return True

    def restore_plan(self, staged: list[str]) -> list[_Misplaced]:
        """Misplaced segments whose records fill a gap in the log, and whose right name is free."""
        if not self.gaps:
            return []
        candidates = [m for m in self.misplaced if m.kind == "misplaced" and not m.same]
        for path in staged:
            with SegmentBytes(self.fs, path) as data:
                scan = scan_segment(path, data, merge=True)
            if scan.frames and scan.log_id in (None, self.cp.log_id):
                candidates.append(_Misplaced(path, 0, "misplaced", scan.frames[0].first_seq,
                                             max(f.last_seq for f in scan.frames), staged=True))
        taken = {first for first, _p in self.names} - {m.name_seq for m in self.misplaced}
        plan = []
        for c in sorted(candidates, key=lambda c: c.lo):
            lo = max(c.lo, self.floor + 1)  # what it holds of the undelivered log
            fits = c.hi >= lo and any(a <= lo and c.hi <= b for a, b in self.gaps) and not any(
                max(lo, a) <= min(c.hi, b) for a, b in self.held)
            if fits and c.proper not in taken:
                plan.append(c)
                taken.add(c.proper)
                self.gaps = [(a, b) for a, b in self.gaps if not (a <= lo <= b)] + [
                    g for a, b in self.gaps if a <= lo <= b
                    for g in ((a, lo - 1), (c.hi + 1, b)) if g[0] <= g[1]]
        return plan

    def misplaced_finding(self, m: _Misplaced, restored: bool, moved_to: str = "") -> Finding:
        if m.kind == "foreign":
            what = f"belongs to log {m.log_id}, not {self.cp.log_id}"
        elif restored:
            what = (f"holds seqs {m.lo}..{m.hi}, which the log lacks: a repair puts it back as "
                    f"{segment_name(m.lo)}")
        elif m.same:
            what = f"holds seqs {m.lo}..{m.hi}, which the log holds too (a duplicate)"
        else:
            what = (f"holds seqs {m.lo}..{m.hi}, which do not fit in the log (named for seq "
                    f"{m.name_seq}; the log's own records win)")
        if moved_to:
            finding = Finding(m.path, 0, 0, f"{what}; moved to {moved_to}", None, "moved")
            finding.report(logging.ERROR)
            return finding
        return Finding(m.path, 0, 0, what + "; walbatch verify --repair moves it out of the log",
                       None, "corrupt")

    # -------------------------------------------------------------- finish

    def finish(self, quarantine: Quarantine, moves: list[Finding]) -> Recovered:
        segments = self.segments
        if segments and not self.readonly:
            # A process that crashed (rather than lost power) may have left frames
            # that were written but never fsync'd: valid in the page cache now,
            # gone after a later power loss. Make them durable before trusting
            # them, or a later recovery could hand their (delivered) seqs out again.
            fh = self.fs.open_append(segments[-1].path)
            try:
                fh.sync()
            finally:
                fh.close()
        cp = self.cp
        if self.floor > cp.seq and not self.readonly:
            # The checkpoint went back (a backup put back?) past records the log no
            # longer has: they were delivered; move it forward past them, so that
            # they are neither delivered again nor counted as lost.
            gone = [h.last for h in self.holes if h.last > cp.seq]
            if gone:
                to = max(gone)
                cp = Checkpoint(cp.log_id, to, cp.delivered + to - cp.seq, cp.dead_lettered,
                                max(cp.high_water, self.high_water))
                write_checkpoint(self.fs, os.path.join(self.directory, CHECKPOINT_FILE), cp)
                self.findings.append(Finding(
                    os.path.join(self.directory, CHECKPOINT_FILE), 0, 0,
                    f"the checkpoint said seq {self.cp.seq}, but the log's record of delivery "
                    f"says {self.floor}; seqs {self.cp.seq + 1}..{to} are no longer in the log",
                    (self.cp.seq + 1, to), "checkpoint"))
                self.findings[-1].report(logging.WARNING)
        next_seq = max(self.expected, cp.seq + 1, *(s.last_seq + 1 for s in segments))
        findings = moves + self.findings
        if self.mode == "quarantine" and not self.readonly:
            entries: list[tuple[dict[str, object], bytes | None]] = []
            damaged = [f for f in self.findings if f.action in ("quarantined", "corrupt")]
            for f, raw in zip(damaged, self.raw, strict=True):
                if f.action == "quarantined":
                    entries.append(({"segment": os.path.basename(f.path), "offset": f.offset,
                                     "length": f.length, "reason": f.reason,
                                     "lost_seqs": list(f.seqs) if f.seqs else None,
                                     "bytes_file": f"{os.path.basename(f.path)}@{f.offset}.bad"},
                                    raw))
            for f in moves:
                if f.action not in ("moved", "restored"):
                    continue
                entries.append(({"segment": os.path.basename(f.path), "offset": 0, "length": 0,
                                 "reason": f.reason, "lost_seqs": None, "bytes_file": None,
                                 "moved": f.action}, None))
            if quarantine.add(entries):
                for f in damaged:
                    f.report(logging.ERROR)
        return Recovered(cp, segments, next_seq, self.lost, self.holes, findings, self.marker)


class _EmptySegments:
    """A read-only view that pretends a missing segments/ directory is empty."""

    def __init__(self, fs: FileSystem, segdir: str) -> None:
        self._fs, self._segdir = fs, segdir

    def listdir(self, path: str) -> list[str]:
        return [] if path == self._segdir else self._fs.listdir(path)

    def __getattr__(self, name: str) -> object:
        return getattr(self._fs, name)
