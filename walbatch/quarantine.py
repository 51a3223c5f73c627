"""The quarantine: where a repair puts what the log cannot use, and its report.

Layout (docs/format.md): ``<dir>/quarantine/report.jsonl`` holds one JSON object
per damaged range or segment moved aside (``segment``, ``offset``, ``length``,
``reason``, ``lost_seqs`` ``[first, last]`` or null, ``bytes_file``, ``time``; and for a
whole segment moved, ``moved``: ``"moved"`` or ``"restored"``);
``<segment>@<offset>.bad`` holds the damaged bytes as found; a whole segment
moved out of ``segments/`` keeps its name with a suffix saying why
(``.foreign``: another log's; ``.duplicate``: its records are in the log;
``.misplaced``: its records belong elsewhere in the log, and a repair puts it
back under the right name when its place is free).

Ownership: only a quarantining recovery writes here. The report is what later
opens read to recognise damage already reported (and not raise for it again).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from .datadir import QUARANTINE_DIR, QUARANTINE_REPORT
from .fileio import FileSystem, write_atomic

log = logging.getLogger("walbatch")

MOVED_SUFFIXES = (".foreign", ".duplicate", ".misplaced")


@dataclass(frozen=True, slots=True)
class Reported:
    """What earlier quarantines reported: damage by place, and the seqs given up."""

    places: frozenset[tuple[str, int]]
    """(segment file name, offset) of each damaged range moved aside."""
    seqs: tuple[tuple[int, int], ...]
    """The lost seq ranges (a quarantined file shows up afterwards as a gap elsewhere)."""

    def covers(self, segment: str, offset: int, seqs: tuple[int, int] | None) -> bool:
        return (segment, offset) in self.places or (
            seqs is not None and any(a <= seqs[0] and seqs[1] <= b for a, b in self.seqs))


class Quarantine:
    def __init__(self, fs: FileSystem, directory: str) -> None:
        self.fs = fs
        self.dir = os.path.join(directory, QUARANTINE_DIR)
        self.report_path = os.path.join(self.dir, QUARANTINE_REPORT)

    def reported(self) -> Reported:
        if not self.fs.exists(self.report_path):
            return Reported(frozenset(), ())
        places, seqs = set(), []
        for line in self.fs.read_file(self.report_path).decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
                if entry.get("moved"):
                    continue  # a whole segment moved out (or back): no damaged range
                places.add((str(entry["segment"]), int(entry["offset"])))
                if entry.get("lost_seqs"):
                    first, last = entry["lost_seqs"]
                    seqs.append((int(first), int(last)))
            except (ValueError, KeyError, TypeError):
                log.warning("walbatch: ignoring a malformed line in %s: %.80r", self.report_path, line)
        return Reported(frozenset(places), tuple(seqs))

    def moved(self) -> list[str]:
        """Paths of whole segments moved here as misplaced (candidates to put back)."""
        if not self.fs.exists(self.dir):
            return []
        return [os.path.join(self.dir, n) for n in sorted(self.fs.listdir(self.dir))
                if n.endswith(".misplaced")]

    def _ensure_dir(self) -> None:
        """Make ``quarantine/`` durably: its entry in the data directory is fsync'd before
        anything is moved or written into it (a power loss must not lose the directory
        and with it the segments a repair moved there)."""
        if not self.fs.exists(self.dir):
            self.fs.makedirs(self.dir)
            self.fs.fsync_dir(os.path.dirname(self.dir))

    def move_in(self, path: str, suffix: str) -> str:
        """Move a whole file (a segment) here, durably; return its new path."""
        self._ensure_dir()
        dest = os.path.join(self.dir, os.path.basename(path) + suffix)
        n = 1
        while self.fs.exists(dest):  # an earlier copy with the same name: keep both
            dest = os.path.join(self.dir, f"{os.path.basename(path)}.{n}{suffix}")
            n += 1
        self.fs.rename(path, dest)
        self.fs.fsync_dir(self.dir)
        self.fs.fsync_dir(os.path.dirname(path))
        return dest

    def add(self, entries: list[tuple[dict[str, object], bytes | None]]) -> int:
        """Append report lines (and write each damaged range's bytes); return lines added.

        An entry whose ``bytes_file`` an earlier open already reported is skipped.
        """
        if not entries:
            return 0
        self._ensure_dir()
        known = self.fs.read_file(self.report_path).decode() if self.fs.exists(
            self.report_path) else ""
        lines = []
        for entry, raw in entries:
            name = entry.get("bytes_file")
            if name and f'"bytes_file": "{name}"' in known:
                continue
            if name and raw is not None:
                self.fs.write_file(os.path.join(self.dir, str(name)), raw)
            lines.append(json.dumps({"time": time.time(), **entry}, sort_keys=True))
        if lines:
            write_atomic(self.fs, self.report_path, (known + "\n".join(lines) + "\n").encode())
        return len(lines)
