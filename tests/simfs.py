"""An in-memory file system that simulates power loss, for walbatch's tests.

``SimFileSystem`` implements the ``walbatch.fileio.FileSystem`` seam and models
what the real one (``OsFileSystem``) does, durability included:

- a file's bytes are durable as of its handle's last ``sync`` (fdatasync); a
  write through a handle opened with ``dsync=True`` (O_DSYNC) is durable when
  it returns, as the real one is, so the log takes the same path here as on
  disk and calls no separate sync;
- ``write_file`` unlinks what is at the path, creates the file afresh, writes and
  fsyncs, as on disk: its data is not durable until that fsync, and a power loss
  can come in between;
- names created, renamed or unlinked, and directories made, are durable as of
  their directory's last ``fsync_dir``. (``makedirs`` takes the directories
  above the one it makes as already there and durable, as they were before the
  test in any real directory);
- a SQLite database the code opens itself (``dlq.db``) lives in a real file
  that ``local_path`` hands out; it is durable at every committed transaction
  (the store commits with ``synchronous=FULL``), so a power loss leaves it as
  of its last commit.

``crash()`` does what a power loss may do: every file goes back to its durable
content, optionally keeping a torn prefix of the unsynced bytes (as written, or
as garbage); names and directories made since their directory's last fsync are
undone; databases go back to their last commit. Every handle and lock of the
old "process" dies: any use raises EIO, and so does every operation (and
``alive()`` turns false) in every thread that was alive at the crash but the
main one, so an abandoned batcher's threads stop instead of writing on (a real
power loss gives a dead process no last word, not even a delivery).

Faults can be injected (``fail(op, errno, times)``), a crash armed at the Nth
mutating operation (``crash_after``), every mutating operation gated
(``gate``: a deterministic scheduler, tests/scheduling.py), and
``skip_fsync=True`` makes a deliberately broken file system whose fsync and
O_DSYNC do nothing, to prove a test can catch lost data.
"""

from __future__ import annotations

import errno as errno_mod
import os
import random
import shutil
import sqlite3
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Inode:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class _Dead(OSError):
    def __init__(self) -> None:
        super().__init__(errno_mod.EIO, "simulated crash: this handle belongs to a dead process")


class _Handle:
    def __init__(self, fs: SimFileSystem, inode: _Inode, path: str, dsync: bool = False) -> None:
        self.fs = fs
        self.inode = inode
        self.path = path
        self.dsync = dsync
        self.gen = fs.generation
        self.closed = False

    def _check(self, op: str) -> None:
        if self.gen != self.fs.generation:
            raise _Dead()
        if self.closed:
            raise ValueError(f"I/O on closed handle {self.path}")
        self.fs._maybe_fail(op, self.path)

    def write(self, *bufs: bytes | memoryview) -> None:
        self.fs._before("write", self.path)
        with self.fs._mu:
            self._check("write")
            for b in bufs:
                self.inode.data += bytes(b)
            # A power loss "during" a write: the bytes are in the unsynced area,
            # and crash() keeps none, a prefix, or garbage of them.
            self.fs._tick("write")
            if self.dsync:
                # O_DSYNC: the write syncs its data before it returns; when that sync
                # fails (fail("sync")) the write fails with the bytes written, unsynced.
                self.fs._fault("sync", self.path)
                if not self.fs.skip_fsync:
                    self.inode.durable = bytes(self.inode.data)
                self.fs.syncs += 1

    def sync(self) -> None:
        self.fs._before("sync", self.path)
        with self.fs._mu:
            self._check("sync")
            if not self.fs.skip_fsync:
                self.inode.durable = bytes(self.inode.data)
            self.fs.syncs += 1

    def pwrite(self, data: bytes, offset: int) -> None:
        self.fs._before("write", self.path)
        with self.fs._mu:
            self._check("write")
            if len(self.inode.data) < offset:
                self.inode.data += bytes(offset - len(self.inode.data))
            self.inode.data[offset : offset + len(data)] = data
            # Unsynced like any write: crash() keeps the durable content, or a torn
            # prefix of new bytes where they extend it.
            self.fs._tick("write")

    def truncate(self, size: int) -> None:
        self.fs._before("truncate", self.path)
        with self.fs._mu:
            self._check("truncate")
            del self.inode.data[size:]

    def size(self) -> int:
        with self.fs._mu:
            self._check("size")
            return len(self.inode.data)

    def pread(self, size: int, offset: int) -> bytes:
        with self.fs._mu:
            self._check("read")
            return bytes(self.inode.data[offset : offset + size])

    def close(self) -> None:
        self.closed = True


class _Lock:
    def __init__(self, fs: SimFileSystem, path: str) -> None:
        self.fs, self.path, self.gen = fs, path, fs.generation

    def release(self) -> None:
        with self.fs._mu:
            if self.gen == self.fs.generation:
                self.fs._locks.discard(self.path)

    def still_held(self) -> bool:
        with self.fs._mu:
            if self.gen != self.fs.generation:
                raise _Dead()  # asked by a thread of the crashed "process"
            return self.path in self.fs._locks


class SimFileSystem:
    def __init__(self, *, skip_fsync: bool = False, honour_dsync: bool = True) -> None:
        self._mu = threading.RLock()
        self.names: dict[str, _Inode] = {}
        self.durable_names: dict[str, _Inode] = {}
        self.dirs: set[str] = {"/"}
        self.durable_dirs: set[str] = {"/"}
        self.generation = 0
        self.skip_fsync = skip_fsync
        self.honour_dsync = honour_dsync
        """False: a file system whose handles ignore ``dsync`` (and say so: no ``dsync``
        attribute is true), so the log must call ``sync()`` itself. Production's honours it."""
        self.syncs = 0
        """Durability points on files: syncs, O_DSYNC writes, write_file's fsync."""
        self.dir_syncs = 0
        self.crashes = 0
        self.gate: Callable[[str, str], None] | None = None
        """Called (outside the lock) before every mutating operation of a thread
        that is still alive: a scheduler's hook to order the threads' operations."""
        self._locks: set[str] = set()
        self._faults: list[tuple[str, int, str]] = []
        self._crash_at: tuple[int, random.Random, str] | None = None
        self._dead_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._databases: set[str] = set()
        self._real_root: str | None = None

    # ---------------------------------------------------------------- faults

    def fail(self, op: str, err: int = errno_mod.EIO, times: int = 1, path_contains: str = "") -> None:
        """Make the next ``times`` calls of ``op`` (write, sync, truncate, read, create,
        rename, unlink, fsync_dir, write_file) on a matching path fail with ``err``.

        "sync" also fails the sync inside an O_DSYNC write: that write raises after
        its bytes were written (unsynced), as a real one does."""
        with self._mu:
            self._faults.extend([(op, err, path_contains)] * times)

    def crash_after(self, ops: int, rng: random.Random, torn: str = "random") -> None:
        """Simulate a power loss at the ``ops``-th mutating operation from now.

        Counted: write (the crash comes right after its bytes land, before an
        O_DSYNC write made them durable), sync, truncate, create, write_file
        (twice: before it, and between its write and its fsync), rename, unlink,
        fsync_dir (the crash comes before these take effect). The operation that
        hits it raises EIO, as every later one of the dead "process" does.
        """
        with self._mu:
            self._crash_at = (ops, rng, torn)

    def clear_faults(self) -> None:
        """Forget faults armed with ``fail`` that nothing hit."""
        with self._mu:
            self._faults.clear()

    def disarm(self) -> None:
        """Cancel a ``crash_after`` that was not reached."""
        with self._mu:
            self._crash_at = None

    @property
    def armed(self) -> bool:
        return self._crash_at is not None

    def alive(self) -> bool:
        """False in a thread that a simulated power loss killed (see the module docstring)."""
        return threading.current_thread() not in self._dead_threads

    def _before(self, op: str, path: str) -> None:
        gate = self.gate
        if gate is not None and self.alive():
            gate(op, path)

    def _tick(self, op: str) -> None:
        if self._crash_at is None or op in ("read", "size"):
            return
        left, rng, torn = self._crash_at
        if left > 1:
            self._crash_at = (left - 1, rng, torn)
            return
        self._crash_at = None
        self.crash(rng, torn)
        raise _Dead()

    def _maybe_fail(self, op: str, path: str) -> None:
        if not self.alive():
            raise _Dead()
        if op != "write":
            self._tick(op)
        self._fault(op, path)

    def _fault(self, op: str, path: str) -> None:
        for i, (fop, err, part) in enumerate(self._faults):
            if fop == op and part in path:
                del self._faults[i]
                raise OSError(err, f"simulated {os.strerror(err)} on {op}", path)

    # ------------------------------------------------------------ the seam

    def open_append(self, path: str, dsync: bool = False, exclusive: bool = False) -> _Handle:
        self._before("open_append", path)
        with self._mu:
            inode = self.names.get(path)
            if inode is not None and exclusive:
                raise FileExistsError(errno_mod.EEXIST, "File exists", path)
            if inode is None:
                self._need_dir(path)
                self._maybe_fail("create", path)
                inode = self.names[path] = _Inode()
            return _Handle(self, inode, path, dsync and self.honour_dsync)

    def open_write(self, path: str) -> _Handle:
        return self.open_append(path)  # the handle's pwrite writes in place

    def open_read(self, path: str) -> _Handle:
        with self._mu:
            inode = self.names.get(path)
            if inode is None:
                raise FileNotFoundError(errno_mod.ENOENT, "No such file", path)
            return _Handle(self, inode, path)

    def read_file(self, path: str) -> bytes:
        with self._mu:
            inode = self.names.get(path)
            if inode is None:
                raise FileNotFoundError(errno_mod.ENOENT, "No such file", path)
            self._maybe_fail("read", path)
            return bytes(inode.data)

    def write_file(self, path: str, data: bytes) -> None:
        """Unlink what is there, create afresh, write, fsync: as on disk, the data is
        durable once the fsync is done, the new name once the directory is fsync'd."""
        self._before("write_file", path)
        with self._mu:
            self._need_dir(path)
            self._maybe_fail("write_file", path)
            inode = self.names[path] = _Inode()
            inode.data = bytearray(data)
            self._tick("write")  # a power loss between the write and its fsync
            if not self.skip_fsync:
                inode.durable = bytes(data)
            self.syncs += 1

    def exists(self, path: str) -> bool:
        with self._mu:
            return path in self.names or path.rstrip("/") in self.dirs

    def listdir(self, path: str) -> list[str]:
        with self._mu:
            path = path.rstrip("/")
            if path not in self.dirs:
                raise FileNotFoundError(errno_mod.ENOENT, "No such directory", path)
            names = {os.path.basename(p) for p in self.names if os.path.dirname(p) == path}
            names |= {os.path.basename(d) for d in self.dirs if os.path.dirname(d) == path and d != path}
            return sorted(names)

    def makedirs(self, path: str) -> None:
        """The directory itself is durable once its parent is fsync'd; the ones above
        it that are missing count as made before the test (durable)."""
        with self._mu:
            path = path.rstrip("/") or "/"
            if path in self.dirs:
                return
            self.dirs.add(path)
            up = os.path.dirname(path)
            while up not in self.dirs:
                self.dirs.add(up)
                self.durable_dirs.add(up)
                up = os.path.dirname(up)

    def rename(self, src: str, dst: str) -> None:
        self._before("rename", src)
        with self._mu:
            self._maybe_fail("rename", src)
            if src not in self.names:
                raise FileNotFoundError(errno_mod.ENOENT, "No such file", src)
            self.names[dst] = self.names.pop(src)

    def unlink(self, path: str) -> None:
        self._before("unlink", path)
        with self._mu:
            self._maybe_fail("unlink", path)
            if path not in self.names:
                raise FileNotFoundError(errno_mod.ENOENT, "No such file", path)
            del self.names[path]

    def fsync_dir(self, path: str) -> None:
        self._before("fsync_dir", path)
        with self._mu:
            self._maybe_fail("fsync_dir", path)
            path = path.rstrip("/") or "/"
            self.dir_syncs += 1
            if self.skip_fsync:
                return
            for p in [p for p in self.durable_names if os.path.dirname(p) == path]:
                del self.durable_names[p]
            for p, inode in self.names.items():
                if os.path.dirname(p) == path:
                    self.durable_names[p] = inode
            self.durable_dirs |= {d for d in self.dirs if os.path.dirname(d) == path and d != path}

    def lock(self, path: str, directory: bool = False) -> _Lock:
        with self._mu:
            if path in self._locks:
                raise BlockingIOError(errno_mod.EWOULDBLOCK, "locked", path)
            self._locks.add(path)
            return _Lock(self, path)

    def local_path(self, path: str) -> str:
        """A real file standing for ``path``, for SQLite (see the module docstring)."""
        with self._mu:
            self._databases.add(path)
            return self._real(path, self.generation)

    def _real(self, path: str, generation: int) -> str:
        if self._real_root is None:
            self._real_root = tempfile.mkdtemp(prefix="walbatch-simfs-")
            weakref.finalize(self, shutil.rmtree, self._real_root, True)
        d = os.path.join(self._real_root, f"gen{generation}")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, path.strip("/").replace("/", "%"))

    def _need_dir(self, path: str) -> None:
        if os.path.dirname(path) not in self.dirs:
            raise FileNotFoundError(errno_mod.ENOENT, "No such directory", os.path.dirname(path))

    # ---------------------------------------------------------------- crash

    def crash(self, rng: random.Random | None = None, torn: str = "none") -> None:
        """Simulate a power loss now.

        ``torn``: what happens to unsynced bytes appended to a file: "none"
        (dropped), "prefix" (a random prefix survives), "garbage" (a random
        prefix survives with its bytes scrambled), "random" (one of these).
        """
        rng = rng or random.Random()
        with self._mu:
            old = self.generation
            self.generation += 1
            self.crashes += 1
            # The old process's threads die with it; the main thread runs the test.
            self._dead_threads.update(t for t in threading.enumerate() if t is not threading.main_thread())
            self._locks.clear()
            self._faults.clear()
            self._crash_at = None  # an armed crash_after() belonged to the old machine too
            dirs = {"/"}
            for d in sorted(self.durable_dirs, key=len):
                if os.path.dirname(d) in dirs:
                    dirs.add(d)
            survivors: dict[str, _Inode] = {}
            for p, inode in self.durable_names.items():
                if os.path.dirname(p) not in dirs:
                    continue
                mode = torn if torn != "random" else rng.choice(["none", "prefix", "garbage"])
                data = bytearray(inode.durable)
                current = bytes(inode.data)
                if mode != "none" and current.startswith(inode.durable) and len(current) > len(data):
                    extra = current[len(data) : len(data) + rng.randint(0, len(current) - len(data))]
                    if mode == "garbage" and extra:
                        extra = bytes(rng.getrandbits(8) for _ in extra)
                    data += extra
                survivors[p] = _Inode(data, bytes(data))
            # Inodes renamed in place share identity: rebuild both maps from survivors.
            self.names = dict(survivors)
            self.durable_names = dict(survivors)
            self.dirs = set(dirs)
            self.durable_dirs = set(dirs)
            for path in sorted(self._databases):
                _copy_committed(self._real(path, old), self._real(path, self.generation))


def _copy_committed(src: str, dst: str) -> None:
    """What a power loss leaves of a SQLite database that commits with synchronous=FULL:
    every committed transaction, nothing of one in progress (another thread's)."""
    if not os.path.exists(src):
        return
    if os.path.getsize(src) == 0 and not os.path.exists(src + "-wal"):
        open(dst, "wb").close()
        return
    source = sqlite3.connect(src)
    try:
        target = sqlite3.connect(dst)
        try:
            source.backup(target)  # a read transaction: the last commit, whatever else runs
        finally:
            target.close()
    finally:
        source.close()
