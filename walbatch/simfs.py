"""An in-memory file system that simulates power loss, for tests.

``SimFileSystem`` implements the ``walbatch.fileio.FileSystem`` seam. It keeps,
for every file, what is durable (as of its last ``sync``) apart from what was
written since, and for every directory which names are durable (as of its
last ``fsync_dir``). ``crash()`` then does what a power loss may do:

- every file goes back to its durable content, optionally keeping a torn
  prefix of the unsynced bytes (as written, or as garbage);
- names created, renamed or unlinked since their directory's last fsync are
  undone;
- every handle and lock of the old "process" becomes dead: any use raises EIO,
  so threads of an abandoned batcher stop instead of writing on; so does every
  thread alive at the crash but the main one (the old flusher, submitters), for
  path operations too (a dead flusher must not write a checkpoint afterwards).

Directories themselves are modelled as always durable. Faults can be injected
(``fail(op, errno, times)``) and ``skip_fsync=True`` makes a deliberately broken
file system whose fsync does nothing, to prove a test can catch lost data.
"""

from __future__ import annotations

import errno as errno_mod
import os
import random
import threading
import weakref
from dataclasses import dataclass, field


@dataclass
class _Inode:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class _Dead(OSError):
    def __init__(self) -> None:
        super().__init__(errno_mod.EIO, "simulated crash: this handle belongs to a dead process")


class _Handle:
    def __init__(self, fs: SimFileSystem, inode: _Inode, path: str) -> None:
        self.fs = fs
        self.inode = inode
        self.path = path
        self.gen = fs.generation
        self.closed = False

    def _check(self, op: str) -> None:
        if self.gen != self.fs.generation:
            raise _Dead()
        if self.closed:
            raise ValueError(f"I/O on closed handle {self.path}")
        self.fs._maybe_fail(op, self.path)

    def write(self, *bufs: bytes | memoryview) -> None:
        with self.fs._mu:
            self._check("write")
            for b in bufs:
                self.inode.data += bytes(b)
            # A power loss "during" a write: the bytes are in the unsynced area,
            # and crash() keeps none, a prefix, or garbage of them.
            self.fs._tick("write")

    def sync(self) -> None:
        with self.fs._mu:
            self._check("sync")
            if not self.fs.skip_fsync:
                self.inode.durable = bytes(self.inode.data)
            self.fs.syncs += 1

    def pwrite(self, data: bytes, offset: int) -> None:
        with self.fs._mu:
            self._check("write")
            if len(self.inode.data) < offset:
                self.inode.data += bytes(offset - len(self.inode.data))
            self.inode.data[offset : offset + len(data)] = data
            # Unsynced like any write: crash() keeps the durable content, or a torn
            # prefix of new bytes where they extend it.
            self.fs._tick("write")

    def truncate(self, size: int) -> None:
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
    def __init__(self, *, skip_fsync: bool = False) -> None:
        self._mu = threading.RLock()
        self.names: dict[str, _Inode] = {}
        self.durable_names: dict[str, _Inode] = {}
        self.dirs: set[str] = {"/"}
        self.generation = 0
        self.skip_fsync = skip_fsync
        self.syncs = 0
        self.crashes = 0
        self._locks: set[str] = set()
        self._faults: list[tuple[str, int, str]] = []
        self._crash_at: tuple[int, random.Random, str] | None = None
        self._dead_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()

    # ---------------------------------------------------------------- faults

    def fail(self, op: str, err: int = errno_mod.EIO, times: int = 1, path_contains: str = "") -> None:
        """Make the next ``times`` calls of ``op`` (write, sync, truncate, read, create,
        rename, unlink, fsync_dir, write_file) on a matching path fail with ``err``."""
        with self._mu:
            self._faults.extend([(op, err, path_contains)] * times)

    def crash_after(self, ops: int, rng: random.Random, torn: str = "random") -> None:
        """Simulate a power loss at the ``ops``-th mutating operation from now.

        Counted: write (the crash comes right after its bytes land, unsynced),
        sync, truncate, create, write_file, rename, unlink, fsync_dir (the crash
        comes before these take effect). The operation that hits it raises EIO,
        as every later one of the dead "process" does.
        """
        with self._mu:
            self._crash_at = (ops, rng, torn)

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
        if threading.current_thread() in self._dead_threads:
            raise _Dead()
        if op != "write":
            self._tick(op)
        for i, (fop, err, part) in enumerate(self._faults):
            if fop == op and part in path:
                del self._faults[i]
                raise OSError(err, f"simulated {os.strerror(err)} on {op}", path)

    # ------------------------------------------------------------ the seam

    def open_append(self, path: str, dsync: bool = False, exclusive: bool = False) -> _Handle:
        # dsync is not simulated: the handle says so (no ``dsync``), and the log
        # then calls sync() itself, which this layer tracks.
        with self._mu:
            inode = self.names.get(path)
            if inode is not None and exclusive:
                raise FileExistsError(errno_mod.EEXIST, "File exists", path)
            if inode is None:
                self._need_dir(path)
                self._maybe_fail("create", path)
                inode = self.names[path] = _Inode()
            return _Handle(self, inode, path)

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
        with self._mu:
            self._need_dir(path)
            self._maybe_fail("write_file", path)
            inode = self.names.get(path)
            if inode is None:
                inode = self.names[path] = _Inode()
            inode.data = bytearray(data)
            if not self.skip_fsync:
                inode.durable = bytes(data)

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
        with self._mu:
            path = path.rstrip("/") or "/"
            while path not in self.dirs:
                self.dirs.add(path)
                path = os.path.dirname(path)

    def rename(self, src: str, dst: str) -> None:
        with self._mu:
            self._maybe_fail("rename", src)
            if src not in self.names:
                raise FileNotFoundError(errno_mod.ENOENT, "No such file", src)
            self.names[dst] = self.names.pop(src)

    def unlink(self, path: str) -> None:
        with self._mu:
            self._maybe_fail("unlink", path)
            if path not in self.names:
                raise FileNotFoundError(errno_mod.ENOENT, "No such file", path)
            del self.names[path]

    def fsync_dir(self, path: str) -> None:
        with self._mu:
            self._maybe_fail("fsync_dir", path)
            path = path.rstrip("/") or "/"
            if self.skip_fsync:
                return
            for p in [p for p in self.durable_names if os.path.dirname(p) == path]:
                del self.durable_names[p]
            for p, inode in self.names.items():
                if os.path.dirname(p) == path:
                    self.durable_names[p] = inode

    def lock(self, path: str, directory: bool = False) -> _Lock:
        with self._mu:
            if path in self._locks:
                raise BlockingIOError(errno_mod.EWOULDBLOCK, "locked", path)
            self._locks.add(path)
            return _Lock(self, path)

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
            self.generation += 1
            self.crashes += 1
            # The old process's threads die with it; the main thread runs the test.
            self._dead_threads.update(t for t in threading.enumerate() if t is not threading.main_thread())
            self._locks.clear()
            self._faults.clear()
            self._crash_at = None  # an armed crash_after() belonged to the old machine too
            survivors: dict[str, _Inode] = {}
            for p, inode in self.durable_names.items():
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
