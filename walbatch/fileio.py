"""The file layer the log does all its I/O through.

It exists as a seam: tests replace ``OsFileSystem`` with a simulator (tests/simfs.py)
that remembers what was fsync'd and can simulate a power loss. Keep it small;
every method here is one the simulator must model faithfully. Every write the
log makes (segments, checkpoint, synced marker, quarantine) goes through it.

Rule: nothing may depend on a created, renamed or unlinked name until
``fsync_dir`` of its directory has returned.

Rule: walbatch never follows a symbolic link inside the data directory. A
directory another user can write to could hold one planted where walbatch keeps
a file, and a daemon running as root would then write through it into any file
on the system. ``OsFileSystem`` opens every file with ``O_NOFOLLOW`` (and
``O_NONBLOCK``, so a planted FIFO cannot hang an open), accepts only regular
files, creates temporary files exclusively (``O_EXCL``), and raises
``UnsafeDataDir`` for anything else. (The data directory itself may be a
symbolic link: that is the administrator's choice, not a file walbatch keeps.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Protocol

from .errors import UnsafeDataDir


class FileHandle(Protocol):
    def write(self, *bufs: bytes | memoryview) -> None:
        """Append all of ``bufs`` at the end of the file (not durable)."""

    def pwrite(self, data: bytes, offset: int) -> None:
        """Overwrite ``data`` at ``offset`` in place (not durable)."""

    def sync(self) -> None:
        """fdatasync: make everything written so far durable."""

    def truncate(self, size: int) -> None: ...

    def size(self) -> int: ...

    def pread(self, size: int, offset: int) -> bytes: ...

    def close(self) -> None: ...


class Lock(Protocol):
    def release(self) -> None: ...

    def still_held(self) -> bool:
        """True while the locked file (or directory) is still the one at its path.

        A lock on a file that was deleted or replaced protects nothing: the next
        opener creates a new file and locks that.
        """


class FileSystem(Protocol):
    def open_append(self, path: str, dsync: bool = False, exclusive: bool = False) -> FileHandle:
        """Open for appending, creating the file if needed. ``dsync``: each write
        returns only once its data is durable (O_DSYNC), so no separate fdatasync
        is needed after it; a handle that honours it has a true ``dsync``
        attribute. ``exclusive``: the file must not exist yet (FileExistsError)."""
        ...

    def open_write(self, path: str) -> FileHandle:
        """Open for writing in place (``pwrite``), creating the file if needed;
        nothing is truncated."""
        ...

    def open_read(self, path: str) -> FileHandle: ...

    def read_file(self, path: str) -> bytes: ...

    def write_file(self, path: str, data: bytes) -> None:
        """Create or replace ``path`` with ``data`` and fsync it (no directory fsync).

        Whatever was at ``path`` is unlinked first, never written through."""

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]: ...

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents; refuse (UnsafeDataDir) if ``path`` is a symlink."""

    def rename(self, src: str, dst: str) -> None: ...

    def unlink(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None: ...

    def lock(self, path: str, directory: bool = False) -> Lock:
        """Take an exclusive lock on ``path`` (a file, created if needed, or with
        ``directory`` an existing directory); raise BlockingIOError if someone
        holds it."""

    def local_path(self, path: str) -> str:
        """Where a library that opens files itself (SQLite, for ``dlq.db``) finds ``path``."""
        ...


def write_atomic(fs: FileSystem, path: str, data: bytes) -> None:
    """Replace ``path`` so a crash leaves either the old or the new content.

    The temporary file is created afresh (``write_file`` never writes through
    what it finds), and the rename replaces whatever is at ``path`` (a planted
    symbolic link included) without following it.
    """
    tmp = path + ".tmp"
    fs.write_file(tmp, data)
    fs.rename(tmp, path)
    fs.fsync_dir(os.path.dirname(path) or ".")


class _OsHandle:
    __slots__ = ("fd", "path", "dsync")

    def __init__(self, fd: int, path: str, dsync: bool = False) -> None:
        self.fd = fd
        self.path = path
        self.dsync = dsync

    def write(self, *bufs: bytes | memoryview) -> None:
        fd = self.fd
        pending = [memoryview(b) for b in bufs if len(b)]
        while pending:
            n = os.writev(fd, pending) if len(pending) > 1 else os.write(fd, pending[0])
            while n and pending:
                head = pending[0]
                if n >= len(head):
                    n -= len(head)
                    pending.pop(0)
                else:
                    pending[0] = head[n:]
                    n = 0

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, size: int, offset: int) -> bytes:
        chunks = []
        while size > 0:
            chunk = os.pread(self.fd, size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _FlockLock:
    def __init__(self, fd: int, path: str, directory: bool) -> None:
        self.fd = fd
        self.path = path
        self.directory = directory
        held = os.fstat(fd)
        self._identity = (held.st_dev, held.st_ino)  # what we locked: it never changes

    def still_held(self) -> bool:
        """Is the file (or directory) at our path still the one we locked? One stat:
        checked before every acknowledgement, so it must be cheap."""
        if self.fd < 0:
            return False
        try:
            # The data directory may be reached through a symlink the administrator
            # made; the LOCK file never is.
            now = os.stat(self.path, follow_symlinks=self.directory)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == self._identity

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` for a file walbatch keeps: never through a symlink, only a regular file."""
    try:
        fd = os.open(path, flags | _NOFOLLOW, mode)
    except OSError as ex:
        if ex.errno == errno.ELOOP and os.path.islink(path):
            raise UnsafeDataDir(
                f"{path} is a symbolic link; walbatch never makes one in its data directory "
                "and does not follow it (someone else can write there?): remove it") from None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeDataDir(f"{path} is not a regular file (mode {stat.filemode(st.st_mode)}); "
                            "walbatch keeps only regular files there: remove it")
    return fd


class OsFileSystem:
    """The real file system."""

    def open_append(self, path: str, dsync: bool = False, exclusive: bool = False) -> FileHandle:
        # O_DSYNC makes write() and the data sync one system call: the GIL is released
        # once per commit instead of twice, so the flusher thread runs while the
        # submitter waits for the disk instead of in between (submit_many +30%).
        flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_DSYNC if dsync else 0)
                 | (os.O_EXCL if exclusive else 0))
        return _OsHandle(open_nofollow(path, flags), path, dsync)

    def open_write(self, path: str) -> FileHandle:
        return _OsHandle(open_nofollow(path, os.O_WRONLY | os.O_CREAT), path)

    def open_read(self, path: str) -> FileHandle:
        return _OsHandle(open_nofollow(path, os.O_RDONLY), path)

    def read_file(self, path: str) -> bytes:
        h = self.open_read(path)
        try:
            return h.pread(h.size(), 0)
        finally:
            h.close()

    def write_file(self, path: str, data: bytes) -> None:
        for _attempt in range(3):
            try:
                fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                break
            except FileExistsError:
                # A leftover of a crash, or something planted: unlink removes the
                # name (a symlink itself, never its target); then create afresh.
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        else:
            raise UnsafeDataDir(f"{path} keeps reappearing while walbatch replaces it: is "
                                "another process writing in the data directory?")
        try:
            h = _OsHandle(fd, path)
            h.write(data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: str) -> None:
        # Never writable by group or others, whatever the umask (a umask of 002 is
        # common): they could plant files where walbatch looks for its own.
        os.makedirs(path, mode=0o755, exist_ok=True)
        if os.path.islink(path):
            raise UnsafeDataDir(f"{path} is a symbolic link; walbatch makes this directory "
                                "itself and does not follow a link there: remove it")

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock(self, path: str, directory: bool = False) -> Lock:
        if directory:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as ex:
            os.close(fd)
            if ex.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BlockingIOError(ex.errno, "locked", path) from None
            raise
        return _FlockLock(fd, path, directory)

    def local_path(self, path: str) -> str:
        return path
