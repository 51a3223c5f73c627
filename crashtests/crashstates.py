"""From a trace of real system calls to the file trees a power loss could leave.

ALICE (OSDI 2014) and CrashMonkey (OSDI 2018) in miniature. ``FsHistory`` replays
the calls a process made below one directory (``tests/systrace.py`` recorded
them with strace) and keeps every change as an ``Op``: data ops (a write at an
offset, a truncate) on an inode, and name ops (create, mkdir, rename, unlink,
link, rmdir) in one or two directories. Each op is durable from the moment a
*durability point* covering it returns:

- ``fsync``/``fdatasync`` of a file: every earlier data op on that inode;
- a write through a descriptor opened with ``O_DSYNC``/``O_SYNC``: that write;
- ``fsync``/``fdatasync`` of a directory: every earlier name op in it (a rename
  between two directories needs both).

Nothing else is durable: not a file's name after an fsync of the file, not a
rename because its data was synced. A ``CrashState`` is a power loss at a
point of the trace (every call that returned before it has happened; none
after it) that kept every durable op, any prefix (``cut``) of the rest in the
order they returned, and possibly part of the next write: a whole number of
512-byte sectors of it (sectors are the unit a disk writes atomically), with
the rest of the range either absent or reading as zeros (the size reached
the disk, the data did not). ``realize`` builds the tree.

This module knows nothing of walbatch; the crash explorer (explorer.py) does.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from systrace import Call, Fd

SECTOR = 512
DIR = None  # realize(): the value of a directory


@dataclass(slots=True)
class Op:
    idx: int
    pos: int
    """Trace line of the call's return."""
    kind: str
    """write, truncate (data ops); create, mkdir, rename, unlink, rmdir, link (name ops)."""
    inode: int
    path: str = ""
    path2: str = ""
    offset: int = 0
    data: bytes = b""
    size: int = 0
    durable_at: int | None = None
    """Trace line of the durability point that made it durable (its own for O_DSYNC)."""
    pending_dirs: set[str] = field(default_factory=set)

    @property
    def is_data(self) -> bool:
        return self.kind in ("write", "truncate")


@dataclass(slots=True)
class _Open:
    inode: int
    path: str
    flags: set[str]
    pos: int = 0


@dataclass(frozen=True, slots=True)
class ExternalWrite:
    """A write to a file outside the tree (the workload's record of acks or deliveries)."""

    path: str
    data: bytes
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class CrashState:
    at: int
    """Trace line of the power loss: calls that returned before it happened."""
    cut: int
    """Ops with ``idx < cut`` persisted although nothing made them durable."""
    torn: tuple[int, int, bool] | None = None
    """(op idx, bytes of it that reached the disk, the rest of its range reads as zeros)."""
    label: str = ""


class FsHistory:
    """Every change a trace made below ``root``; see the module docstring."""

    def __init__(self, root: str, external: tuple[str, ...] = ()) -> None:
        self.root = os.path.realpath(root)
        self.external = {os.path.realpath(p) for p in external}
        self.ops: list[Op] = []
        self.durability_points: list[int] = []
        """Trace lines of the durability points' returns, in order."""
        self.external_writes: list[ExternalWrite] = []
        self.calls_seen: dict[str, int] = {}
        self._next_inode = 1
        self._names: dict[str, int] = {self.root: 0}
        self._is_dir: dict[int, bool] = {0: True}
        self._size: dict[int, int] = {}
        # fd -> [valid from, valid until, what]: a close frees the number when it starts,
        # so another thread's open may get it back before that close returns.
        self._fds: dict[int, list[list[Any]]] = {}
        self._pending: dict[int, list[Op]] = {}  # inode -> data ops not yet durable
        self._pending_names: list[Op] = []

    # ------------------------------------------------------------ replay

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")

    def _resolve(self, base: object, raw: object) -> str:
        path = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)
        if not os.path.isabs(path):
            anchor = base.path if isinstance(base, Fd) else os.getcwd()
            path = os.path.join(anchor, path)
        return os.path.normpath(path)

    def _op(self, call: Call, kind: str, inode: int, **kw: object) -> Op:
        op = Op(len(self.ops), call.end, kind, inode, **kw)  # type: ignore[arg-type]
        self.ops.append(op)
        if op.is_data:
            self._pending.setdefault(inode, []).append(op)
        else:
            op.pending_dirs = {os.path.dirname(op.path)} | (
                {os.path.dirname(op.path2)} if op.path2 else set())
            self._pending_names.append(op)
        return op

    def _new_inode(self, is_dir: bool) -> int:
        n = self._next_inode
        self._next_inode += 1
        self._is_dir[n] = is_dir
        self._size[n] = 0
        return n

    def feed(self, calls: list[Call]) -> None:
        for c in calls:
            if c.ret is None or c.ret < 0:
                continue
            handler = getattr(self, f"_on_{c.name}", None)
            if handler is not None:
                handler(c)

    def _track(self, name: str) -> None:
        self.calls_seen[name] = self.calls_seen.get(name, 0) + 1

    def _open_at(self, call: Call, base: object, raw: object, flags: str) -> None:
        fd = call.ret
        assert fd is not None
        path = self._resolve(base, raw)
        if path in self.external:
            self._bind(fd, call.end, path)
            return
        if not self._inside(path):
            self._bind(fd, call.end, None)
            return
        fl = set(flags.split("|")) if isinstance(flags, str) else set()
        inode = self._names.get(path)
        if inode is None:
            if "O_CREAT" not in fl:
                raise ValueError(f"trace opens {path}, which the replay does not know")
            parent = self._names.get(os.path.dirname(path))
            if parent is None or not self._is_dir.get(parent):
                raise ValueError(f"trace creates {path} in a directory the replay does not know")
            inode = self._new_inode(False)
            self._names[path] = inode
            self._op(call, "create", inode, path=path)
            self._track("create")
        elif "O_TRUNC" in fl and not self._is_dir[inode] and self._size.get(inode, 0):
            self._op(call, "truncate", inode, path=path, size=0)
            self._size[inode] = 0
        self._bind(fd, call.end, _Open(inode, path, fl))

    def _bind(self, fd: int, at: int, what: object) -> None:
        self._fds.setdefault(fd, []).append([at, None, what])

    def _unbind(self, fd: int, at: int) -> None:
        for entry in reversed(self._fds.get(fd, [])):
            if entry[0] <= at and entry[1] is None:
                entry[1] = at
                return

    def _lookup(self, fd: int, at: int) -> object:
        for entry in reversed(self._fds.get(fd, [])):
            if entry[0] <= at and (entry[1] is None or at < entry[1]):
                return entry[2]
        return None

    def _on_openat(self, c: Call) -> None:
        self._open_at(c, c.args[0], c.args[1], c.args[2] if len(c.args) > 2 else "")

    def _on_open(self, c: Call) -> None:
        self._open_at(c, None, c.args[0], c.args[1] if len(c.args) > 1 else "")

    def _on_creat(self, c: Call) -> None:
        self._open_at(c, None, c.args[0], "O_CREAT|O_WRONLY|O_TRUNC")

    def _file(self, c: Call) -> _Open | str | None:
        fd = c.fd(0)
        return None if fd is None else self._lookup(fd.num, c.start)  # type: ignore[return-value]

    def _write(self, c: Call, data: bytes, offset: int | None) -> None:
        f = self._file(c)
        n = c.ret or 0
        data = data[:n]
        if isinstance(f, str):
            self.external_writes.append(ExternalWrite(f, data, c.start, c.end))
            return
        if f is None or not n:
            return
        if offset is None:
            if "O_APPEND" in f.flags:
                offset = self._size.get(f.inode, 0)
            else:
                offset = f.pos
            f.pos = offset + n
        op = self._op(c, "write", f.inode, path=f.path, offset=offset, data=data)
        self._size[f.inode] = max(self._size.get(f.inode, 0), offset + n)
        self._track("write")
        if f.flags & {"O_DSYNC", "O_SYNC"}:
            op.durable_at = c.end
            self._pending[f.inode].remove(op)
            self.durability_points.append(c.end)
            self._track("O_DSYNC write")

    def _on_write(self, c: Call) -> None:
        self._write(c, c.args[1], None)

    def _on_pwrite64(self, c: Call) -> None:
        self._write(c, c.args[1], c.args[3])

    def _on_writev(self, c: Call) -> None:
        self._write(c, b"".join(v["iov_base"] for v in c.args[1]), None)

    def _on_pwritev(self, c: Call) -> None:
        self._write(c, b"".join(v["iov_base"] for v in c.args[1]), c.args[3])

    _on_pwritev2 = _on_pwritev

    def _truncate(self, c: Call, inode: int, path: str, size: int) -> None:
        self._op(c, "truncate", inode, path=path, size=size)
        self._size[inode] = size
        self._track("truncate")

    def _on_ftruncate(self, c: Call) -> None:
        f = self._file(c)
        if isinstance(f, _Open):
            self._truncate(c, f.inode, f.path, c.args[1])

    def _on_truncate(self, c: Call) -> None:
        path = self._resolve(None, c.args[0])
        if self._inside(path) and path in self._names:
            self._truncate(c, self._names[path], path, c.args[1])

    def _on_fallocate(self, c: Call) -> None:
        f = self._file(c)
        if isinstance(f, _Open) and c.args[1] in (0, "0"):
            end = c.args[2] + c.args[3]
            if end > self._size.get(f.inode, 0):
                self._truncate(c, f.inode, f.path, end)

    def _sync(self, c: Call) -> None:
        f = self._file(c)
        if not isinstance(f, _Open):
            return
        self.durability_points.append(c.end)
        if self._is_dir[f.inode]:
            self._track("directory fsync")
            for op in list(self._pending_names):
                op.pending_dirs.discard(f.path)
                if not op.pending_dirs:
                    op.durable_at = c.end
                    self._pending_names.remove(op)
        else:
            self._track(c.name)
            for op in self._pending.pop(f.inode, []):
                op.durable_at = c.end

    _on_fsync = _sync
    _on_fdatasync = _sync

    def _name_op(self, c: Call, kind: str, path: str, path2: str = "") -> None:
        if not self._inside(path) and not (path2 and self._inside(path2)):
            return
        if kind == "mkdir":
            inode = self._new_inode(True)
            self._names[path] = inode
        elif kind in ("unlink", "rmdir"):
            inode = self._names.pop(path, -1)
        elif kind == "rename":
            inode = self._names.pop(path, -1)
            if self._is_dir.get(inode):
                raise ValueError(f"the replay does not model renaming a directory ({path})")
            self._names[path2] = inode
        else:  # link
            inode = self._names.get(path, -1)
            self._names[path2] = inode
        self._op(c, kind, inode, path=path, path2=path2)
        self._track(kind)

    def _on_rename(self, c: Call) -> None:
        self._name_op(c, "rename", self._resolve(None, c.args[0]), self._resolve(None, c.args[1]))

    def _on_renameat(self, c: Call) -> None:
        self._name_op(c, "rename", self._resolve(c.args[0], c.args[1]),
                      self._resolve(c.args[2], c.args[3]))

    _on_renameat2 = _on_renameat

    def _on_unlink(self, c: Call) -> None:
        self._name_op(c, "unlink", self._resolve(None, c.args[0]))

    def _on_unlinkat(self, c: Call) -> None:
        flags = c.args[2] if len(c.args) > 2 else 0
        kind = "rmdir" if isinstance(flags, str) and "AT_REMOVEDIR" in flags else "unlink"
        self._name_op(c, kind, self._resolve(c.args[0], c.args[1]))

    def _on_rmdir(self, c: Call) -> None:
        self._name_op(c, "rmdir", self._resolve(None, c.args[0]))

    def _on_mkdir(self, c: Call) -> None:
        self._name_op(c, "mkdir", self._resolve(None, c.args[0]))

    def _on_mkdirat(self, c: Call) -> None:
        self._name_op(c, "mkdir", self._resolve(c.args[0], c.args[1]))

    def _on_link(self, c: Call) -> None:
        self._name_op(c, "link", self._resolve(None, c.args[0]), self._resolve(None, c.args[1]))

    def _on_linkat(self, c: Call) -> None:
        self._name_op(c, "link", self._resolve(c.args[0], c.args[1]), self._resolve(c.args[2], c.args[3]))

    def _on_close(self, c: Call) -> None:
        fd = c.fd(0)
        if fd is not None:
            self._unbind(fd.num, c.start)

    def _dup(self, c: Call) -> None:
        fd = c.fd(0)
        if fd is not None and c.ret is not None:
            self._unbind(c.ret, c.start)  # dup2/dup3 onto an open number closes it
            self._bind(c.ret, c.end, self._lookup(fd.num, c.start))

    _on_dup = _dup
    _on_dup2 = _dup
    _on_dup3 = _dup

    def _on_fcntl(self, c: Call) -> None:
        if len(c.args) > 1 and isinstance(c.args[1], str) and c.args[1].startswith("F_DUPFD"):
            self._dup(c)

    def _on_lseek(self, c: Call) -> None:
        f = self._file(c)
        if isinstance(f, _Open) and c.ret is not None:
            f.pos = c.ret

    # ------------------------------------------------------------ states

    def included(self, state: CrashState) -> list[Op]:
        """The ops ``state`` kept, in the order they happened."""
        at, cut = state.at, state.cut
        return [op for op in self.ops if op.pos < at and (
            op.idx < cut or (op.durable_at is not None and op.durable_at < at))]

    def lost(self, state: CrashState) -> list[Op]:
        """Ops that had returned at ``state.at`` but did not reach the disk (the torn one too)."""
        kept = {op.idx for op in self.included(state)}
        return [op for op in self.ops if op.pos < state.at and op.idx not in kept]

    def realize(self, state: CrashState) -> dict[str, bytes | None]:
        """The tree ``state`` leaves: relative path -> content (``DIR`` for a directory)."""
        names: dict[str, int] = {self.root: 0}
        content: dict[int, bytearray] = {}
        is_dir: dict[int, bool] = {0: True}
        ops = self.included(state)
        if state.torn is not None:
            idx, keep, zeros = state.torn
            op = self.ops[idx]
            part = op.data[:keep] + (bytes(len(op.data) - keep) if zeros else b"")
            torn_op = Op(op.idx, op.pos, "write", op.inode, op.path, offset=op.offset, data=part)
            ops = sorted([*ops, torn_op], key=lambda o: o.idx)
        for op in ops:
            k = op.kind
            if k == "write":
                buf = content.setdefault(op.inode, bytearray())
                end = op.offset + len(op.data)
                if len(buf) < op.offset:
                    buf.extend(bytes(op.offset - len(buf)))
                buf[op.offset:end] = op.data
            elif k == "truncate":
                buf = content.setdefault(op.inode, bytearray())
                if len(buf) > op.size:
                    del buf[op.size:]
                else:
                    buf.extend(bytes(op.size - len(buf)))
            elif k == "create":
                names[op.path] = op.inode
                is_dir[op.inode] = False
            elif k == "mkdir":
                names[op.path] = op.inode
                is_dir[op.inode] = True
            elif k in ("unlink", "rmdir"):
                if names.get(op.path) == op.inode:
                    del names[op.path]
            elif k == "rename":
                if names.get(op.path) == op.inode:
                    del names[op.path]
                names[op.path2] = op.inode
            elif k == "link":
                names[op.path2] = op.inode
        tree: dict[str, bytes | None] = {}
        for path in sorted(names):
            # A name whose directory did not survive is gone with it.
            parent = os.path.dirname(path)
            if path != self.root and (parent not in names or not is_dir.get(names[parent], False)):
                names.pop(path, None)
                continue
            rel = os.path.relpath(path, self.root)
            if rel == ".":
                continue
            tree[rel] = DIR if is_dir.get(names[path]) else bytes(content.get(names[path], b""))
        return tree

    def torn_choices(self, op: Op) -> list[tuple[int, bool]]:
        """How much of write ``op`` may reach the disk: sector boundaries inside it."""
        if op.kind != "write" or not op.data:
            return []
        end = op.offset + len(op.data)
        cuts = sorted({b - op.offset for b in range((op.offset // SECTOR + 1) * SECTOR, end, SECTOR)} | {0})
        return [(k, zeros) for k in cuts for zeros in (False, True) if k or zeros]


def tree_digest(tree: dict[str, bytes | None]) -> str:
    h = hashlib.sha256()
    for path, data in sorted(tree.items()):
        h.update(path.encode() + b"\0")
        h.update(b"D" if data is None else hashlib.sha256(data).digest())
    return h.hexdigest()


def write_tree(tree: dict[str, bytes | None], dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for rel, data in sorted(tree.items()):
        path = os.path.join(dest, rel)
        if data is None:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

