"""Inspecting and repairing a log directory from outside a batcher: status, verify, dump.

The library side of ``walbatch status``, ``walbatch verify`` and ``walbatch dump``
(the command line only calls these and prints the result), usable from Python::

    from walbatch import admin

    report = admin.verify("/var/lib/walbatch")
    if not report.intact:
        print(report.to_dict()["findings"])

``status``, ``verify`` and ``dump`` take no lock and change nothing, so they work
beside a running daemon; ``verify(repair=True)`` needs the directory to itself.
All of them see the log through the same recovery as ``DurableBatcher``'s open
(``walbatch.recovery``, read-only), so they agree with it and with each other
about every log: what is damaged, which seqs a repair gives up, which records
can be read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .datadir import is_log_dir
from .errors import LogLocked, WalbatchError
from .fileio import OsFileSystem
from .keys import Keyed
from .lock import is_locked
from .log import Log
from .recovery import Finding


def _require_log_dir(data_dir: str) -> str:
    path = os.path.abspath(data_dir)
    if not is_log_dir(path):
        # A mistyped directory must not become a new, empty log that "repairs" fine.
        raise FileNotFoundError(f"{path} is not a walbatch log directory "
                                "(no checkpoint and no segments)")
    return path


def _blocks(f: Finding) -> bool:
    """Damage no repair has dealt with yet: delivery stops at it."""
    return f.action == "corrupt"


def _finding_dict(f: Finding) -> dict[str, Any]:
    d = asdict(f)
    d["seqs"] = list(f.seqs) if f.seqs else None
    d["text"] = f.describe()
    return d


def _ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged, inclusive ranges."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# ------------------------------------------------------------------ status


@dataclass(frozen=True)
class Status:
    """What ``walbatch status`` shows. ``to_dict()`` is its ``--json`` form."""

    data_dir: str
    log_id: str
    segments: int
    bytes: int
    """Durable bytes in all segments."""
    first_seq: int
    """The lowest seq still in the log."""
    last_seq: int
    """The last durable seq."""
    checkpoint: int
    """Everything through this seq is delivered or dead-lettered."""
    backlog: int
    delivered: int
    """Items delivered through the checkpoint (all time)."""
    dead_letters: int | None
    """Rows in dlq.db; None when it cannot be read (``dead_letters_error`` says why)."""
    dead_letters_error: str | None
    locked_by_a_writer: bool
    intact: bool
    """False when the log holds damage that stops delivery (``walbatch verify`` exits 3)."""
    damage: list[str]
    """Every finding of recovery, one line each (harmless ones included)."""
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["findings"] = [_finding_dict(f) for f in self.findings]
        return d


def status(data_dir: str) -> Status:
    """Read the log in ``data_dir`` (without locking it) and describe it."""
    log_ = Log.open(data_dir, readonly=True, on_corruption="report")
    try:
        segs = log_.segments()
        cp = log_.checkpoint
        dead, dead_error = _count_dead(log_.directory)
        return Status(
            data_dir=log_.directory,
            log_id=str(log_.log_id),
            segments=len(segs),
            bytes=sum(s.size for s in segs),
            first_seq=log_.first_seq(),
            last_seq=log_.synced_seq,
            checkpoint=cp.seq,
            backlog=max(0, log_.synced_seq - cp.seq),
            delivered=cp.delivered,
            dead_letters=dead,
            dead_letters_error=dead_error,
            locked_by_a_writer=is_locked(OsFileSystem(), log_.directory),
            intact=not any(_blocks(f) for f in log_.findings),
            damage=[f.describe() for f in log_.findings],
            findings=list(log_.findings),
        )
    finally:
        log_.close()


def _count_dead(data_dir: str) -> tuple[int | None, str | None]:
    from .dlq import DLQ_FILE, DeadLetterStore

    if not os.path.lexists(os.path.join(data_dir, DLQ_FILE)):
        return 0, None
    try:
        store = DeadLetterStore.for_dir(data_dir)
    except (OSError, WalbatchError) as ex:  # e.g. another user's store: the rest still stands
        return None, str(ex)
    try:
        return store.count(), None
    finally:
        store.close()


# ------------------------------------------------------------------ verify


@dataclass(frozen=True)
class VerifyReport:
    """What ``walbatch verify`` found (and, with ``repair``, did). ``to_dict()`` is its
    ``--json`` form."""

    data_dir: str
    repaired: bool
    findings: list[Finding]
    lost: list[tuple[int, int]]
    """Seq ranges given up: by the repair, or (without it) that a repair would give up."""
    first_seq: int
    last_seq: int
    checkpoint: int
    error: str | None = None
    """A record that checks out on disk but does not decode (a writer bug), if any."""

    @property
    def intact(self) -> bool:
        """Nothing stops delivery: no corruption (or it was just repaired), no error."""
        return self.error is None and (self.repaired or not any(_blocks(f) for f in self.findings))

    @property
    def harmless(self) -> int:
        """Damaged ranges in records already delivered (nothing lost)."""
        return sum(f.action == "ignored" for f in self.findings)

    @property
    def exit_code(self) -> int:
        """0 intact (or repaired), 3 damaged: the codes of ``walbatch verify``."""
        return 0 if self.intact else 3

    def lost_seqs(self) -> Iterator[int]:
        for a, b in self.lost:
            yield from range(a, b + 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir, "intact": self.intact, "repaired": self.repaired,
            "first_seq": self.first_seq, "last_seq": self.last_seq,
            "checkpoint": self.checkpoint, "lost_seqs": [list(r) for r in self.lost],
            "findings": [_finding_dict(f) for f in self.findings], "error": self.error,
        }


def verify(data_dir: str, repair: bool = False) -> VerifyReport:
    """Check every record's checksum and every segment's place in the log.

    ``repair=True`` (the log must not be open elsewhere: ``LogLocked`` otherwise)
    trims torn tails, moves damaged ranges and misplaced segments to
    ``quarantine/`` (putting a misplaced segment back under its right name when
    its records fill a gap), gives up exactly the seqs it cannot recover and
    records them as dead letters, so that delivery goes on.
    """
    from .dlq import DeadLetterStore, record_lost

    path = _require_log_dir(data_dir)
    if repair:
        try:
            log_ = Log.open(path, on_corruption="quarantine")
        except LogLocked as ex:
            raise LogLocked(f"{ex} (stop the daemon before a repair)") from None
        try:
            store = DeadLetterStore.for_dir(path)
            try:
                record_lost(store, log_)
            finally:
                store.close()
        finally:
            log_.close()
        return _report(log_, True, None)
    log_ = Log.open(path, readonly=True, on_corruption="report")
    error = None
    try:
        for _ in log_.records(log_.checkpoint.seq + 1):
            pass
    except WalbatchError as ex:
        error = str(ex)
    finally:
        log_.close()
    return _report(log_, False, error)


def _report(log_: Log, repaired: bool, error: str | None) -> VerifyReport:
    return VerifyReport(log_.directory, repaired, list(log_.findings),
                        _ranges([(r.first, r.last) for r in log_.lost]), log_.first_seq(),
                        log_.synced_seq, log_.checkpoint.seq, error)


# -------------------------------------------------------------------- dump


@dataclass(frozen=True, slots=True)
class DumpRecord:
    seq: int
    item: Any
    """The item as submitted (None when ``lost``)."""
    key: Any = None
    keyed: bool = False
    lost: bool = False
    """No readable record: given up to damage, or damaged after it was delivered."""

    def to_dict(self) -> dict[str, Any]:
        if self.lost:
            return {"seq": self.seq, "lost": True}
        if self.keyed:
            return {"seq": self.seq, "key": self.key, "item": self.item}
        return {"seq": self.seq, "item": self.item}


class Dump:
    """The records of a log, read without locking it. Iterate it; close it (or use ``with``).

    ``findings`` and ``intact`` are known as soon as it is made: when the log
    holds damage that a repair has not dealt with, the unreadable seqs come out
    as lost records (``walbatch dump`` then exits 3).
    """

    def __init__(self, data_dir: str, from_seq: int | None = None, to_seq: int | None = None,
                 pending: bool = False) -> None:
        if from_seq is not None and to_seq is not None and from_seq > to_seq:
            raise ValueError(f"from_seq {from_seq} is after to_seq {to_seq}")
        self._log = Log.open(data_dir, readonly=True, on_corruption="report")
        self.findings: list[Finding] = list(self._log.findings)
        self.intact = not any(_blocks(f) for f in self.findings)
        self.from_seq = max(from_seq or 1, self._log.checkpoint.seq + 1) if pending else from_seq
        self.to_seq = to_seq

    def __iter__(self) -> Iterator[DumpRecord]:
        for seq, item, lost in self._log.records(self.from_seq, self.to_seq):
            if lost:
                yield DumpRecord(seq, None, lost=True)
            elif isinstance(item, Keyed):
                yield DumpRecord(seq, item.item, item.key, keyed=True)
            else:
                yield DumpRecord(seq, item)

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> Dump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dump(data_dir: str, from_seq: int | None = None, to_seq: int | None = None,
         pending: bool = False) -> Dump:
    """The records in ``[from_seq, to_seq]`` (``pending``: only those after the checkpoint)."""
    return Dump(data_dir, from_seq, to_seq, pending)
