"""The locks that keep one writer and one deliverer per data directory.

Two roles can hold a log (``Log.open(role=...)``): the *writer* appends and
acknowledges, the *deliverer* (flusher) writes the checkpoint and deletes
delivered segments. A batcher with a sink is both. Each role holds two locks,
both ``flock``s taken without waiting:

- the writer: ``<dir>/LOCK`` and the data directory itself;
- the deliverer: ``<dir>/FLUSH.LOCK`` and ``<dir>/segments/``.

The lock files are what other tools (and older walbatch versions) look at; the
directory locks are what makes the lock hold when a lock file is deleted or
replaced while its holder runs: the next opener would lock a new file, but not
the directory, which cannot be deleted while it holds the log. A holder checks
its locks before each acknowledgement and each checkpoint (``check``): a lock
file or directory that is no longer the one at its path fails the log closed
(``LogFailed``) rather than let it go on beside a second process.
"""

from __future__ import annotations

import os
import time

from .datadir import FLUSH_LOCK_FILE, LOCK_FILE, SEGMENTS_DIR
from .errors import LogFailed, LogLocked, UnsafeDataDir
from .fileio import FileSystem, Lock

# A writer waits this long for a holder that is only passing by: `replay --follow`
# starting beside a writer holds LOCK for a moment to recover the log (trim a torn
# tail) before following; so may `walbatch status` probing the lock.
LOCK_GRACE = 0.5  # seconds


class DirLocks:
    """The locks one role holds on a data directory, released together."""

    def __init__(self, fs: FileSystem, directory: str) -> None:
        self.fs = fs
        self.directory = directory
        self.held: list[tuple[str, Lock, str]] = []

    def take_writer(self) -> None:
        msg = (f"failed to lock {self.directory}: is another process (or another open "
               "DurableBatcher) writing to this directory?")
        self._take(os.path.join(self.directory, LOCK_FILE), False, msg, LOCK_GRACE, "writer")
        self._take(self.directory, True, msg, LOCK_GRACE, "writer")

    def take_deliverer(self) -> None:
        msg = (f"failed to lock {self.directory} for delivery: is another process (a "
               "DurableBatcher with a sink, walbatch serve or walbatch replay) delivering this log?")
        self._take(os.path.join(self.directory, FLUSH_LOCK_FILE), False, msg, 0.0, "deliverer")
        self._take(os.path.join(self.directory, SEGMENTS_DIR), True, msg, 0.0, "deliverer")

    def _take(self, path: str, directory: bool, message: str, grace: float, role: str) -> None:
        end = time.monotonic() + grace
        while True:
            try:
                lock = self.fs.lock(path, directory=directory)
            except BlockingIOError:
                if time.monotonic() >= end:
                    raise LogLocked(message) from None
                time.sleep(0.02)
                continue
            if lock.still_held():
                self.held.append((path, lock, role))
                return
            # Deleted or replaced between our open and our flock: whoever replaced it
            # may hold the new one. Look again.
            lock.release()

    def check(self, role: str) -> None:
        """Raise LogFailed if a lock of ``role`` ("writer" or "deliverer") is no longer
        on the file or directory at its path."""
        for path, lock, held_for in self.held:
            if held_for == role and not lock.still_held():
                raise LogFailed(
                    f"the lock {path} was deleted or replaced while this process held it, so "
                    f"another process may now be using {self.directory}; refusing to acknowledge "
                    "or checkpoint anything more. Make sure no other walbatch process uses the "
                    "directory, then restart this one")

    def release(self) -> None:
        while self.held:
            self.held.pop()[1].release()


class NoLocks(DirLocks):
    """What a read-only open holds: nothing."""

    def __init__(self) -> None:
        self.held = []

    def check(self, role: str) -> None:
        pass


def is_locked(fs: FileSystem, directory: str) -> bool:
    """True if a writer holds the log in ``directory`` (probes without creating anything)."""
    if not fs.exists(os.path.join(directory, LOCK_FILE)):
        return False
    try:
        fs.lock(directory, directory=True).release()
    except BlockingIOError:
        return True
    except (OSError, UnsafeDataDir):
        return False
    try:
        fs.lock(os.path.join(directory, LOCK_FILE)).release()
    except BlockingIOError:
        return True  # an older walbatch that locks only the file
    except (OSError, UnsafeDataDir):
        return False
    return False
