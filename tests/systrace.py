"""The file-system system calls a process really makes, recorded with strace.

Tests and benchmarks count fsyncs here, at the operating system, rather than in
the code under test (``Log.fsyncs`` counts calls to ``Log.sync``, which would
go on counting if the fdatasync inside it were gone). The crash explorer
(crashtests/explorer.py) builds crash states from the same records.

``traced(out)`` attaches ``strace -f`` to the running process (every thread,
and threads started later) for the duration of a ``with`` block and writes
the raw trace to ``out``; ``parse_trace(out)`` reads it back as ``Call``s in
the order they returned. strings are printed in hex (``-xx``) and descriptors
with their paths (``-y``), so the parser never guesses at quoting.

A *durability point* is a system call after whose return data is durable: an
``fsync`` or ``fdatasync`` (of a file or a directory), or a write to a
descriptor opened with ``O_DSYNC``/``O_SYNC``.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

STRACE = shutil.which("strace")

# Everything that changes a file, a name or a descriptor, and the syncs.
FS_CALLS = ("open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,ftruncate,truncate,"
            "rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,rmdir,link,linkat,"
            "symlink,symlinkat,fallocate,fsync,fdatasync,sync_file_range,close,dup,dup2,dup3,"
            "fcntl,lseek")
WRITES = frozenset({"write", "pwrite64", "writev", "pwritev", "pwritev2"})
SYNCS = frozenset({"fsync", "fdatasync"})
AT_FDCWD = -100


@dataclass(frozen=True, slots=True)
class Fd:
    """A descriptor argument as ``-y`` prints it: the number and the path it had."""

    num: int
    path: str


@dataclass(slots=True)
class Call:
    """One system call: its arguments, result and where it sits in the trace.

    ``start``/``end``: line numbers of its entry and its return (equal unless
    another thread's call came in between). Calls are listed by ``end``.
    """

    pid: int
    name: str
    args: list[Any]
    ret: int | None
    error: str | None
    ret_path: str | None
    start: int
    end: int

    def fd(self, i: int = 0) -> Fd | None:
        a = self.args[i] if len(self.args) > i else None
        return a if isinstance(a, Fd) else None


def _unhex(s: str) -> bytes:
    return bytes.fromhex(s.replace("\\x", ""))


_TOKEN = re.compile(r'"((?:\\x[0-9a-f]{2})*)"(\.\.\.)?|[\[\]{},=]|\(deleted\)|<((?:\\x[0-9a-f]{2})*)>'
                    r'|[^\s\[\]{},="<>]+|\s+')


def _parse_args(text: str) -> list[Any]:
    """Arguments as strace prints them: strings (bytes), Fd, lists, dicts, words, ints."""
    pos = 0
    tokens: list[tuple[str, Any]] = []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"cannot parse strace arguments at {text[pos:pos + 40]!r}")
        pos = m.end()
        tok = m.group(0)
        if tok.isspace() or tok == "(deleted)":
            continue
        if m.group(1) is not None:
            tokens.append(("str", _unhex(m.group(1))))
        elif m.group(3) is not None:
            tokens.append(("path", _unhex(m.group(3)).decode("utf-8", "surrogateescape")))
        elif tok in "[]{},=":
            tokens.append((tok, tok))
        else:
            tokens.append(("word", tok))
    out, i = _values(tokens, 0, None)
    return out


def _atom(word: str) -> Any:
    if _OCTAL.fullmatch(word):
        return int(word, 8)  # modes: 0644
    try:
        return int(word, 0)
    except ValueError:
        return word


_OCTAL = re.compile(r"0[0-7]+")


def _values(tokens: list[tuple[str, Any]], i: int, close: str | None) -> tuple[list[Any], int]:
    out: list[Any] = []
    while i < len(tokens):
        kind, val = tokens[i]
        if kind == close:
            return out, i + 1
        if kind == ",":
            i += 1
            continue
        if kind == "[":
            inner, i = _values(tokens, i + 1, "]")
            out.append(inner)
            continue
        if kind == "{":
            inner, i = _values(tokens, i + 1, "}")
            d: dict[str, Any] = {}
            k = 0
            while k < len(inner):
                if k + 2 < len(inner) and inner[k + 1] == "=":
                    d[str(inner[k])] = inner[k + 2]
                    k += 3
                else:
                    k += 1
            out.append(d)
            continue
        if kind == "=":
            out.append("=")
            i += 1
            continue
        if kind == "str":
            out.append(val)
            i += 1
            continue
        if kind == "word":
            if i + 1 < len(tokens) and tokens[i + 1][0] == "path":
                num = AT_FDCWD if val == "AT_FDCWD" else _atom(val)
                out.append(Fd(num if isinstance(num, int) else -1, tokens[i + 1][1]))
                i += 2
                continue
            out.append(_atom(val))
            i += 1
            continue
        i += 1  # a stray path
    return out, i


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^([a-z0-9_]+)\((.*)$", re.S)
_RESUMED = re.compile(r"^<\.\.\. ([a-z0-9_]+) resumed>(.*)$", re.S)
_RESULT = re.compile(r"\)\s+=\s+(-?\d+|\?|0x[0-9a-f]+)(?:<((?:\\x[0-9a-f]{2})*)>(?:\(deleted\))?)?"
                     r"(?:\s+([A-Z][A-Z0-9_]+))?.*$", re.S)


def parse_trace(path: str) -> list[Call]:
    """The calls in ``path`` (written by ``traced`` or ``strace -f -y -xx``), by return order."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, str, int]] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for lineno, raw in enumerate(f):
            m = _LINE.match(raw.rstrip("\n"))
            if m is None:
                continue
            pid, rest = int(m.group(1)), m.group(2)
            if rest.endswith("<unfinished ...>"):
                c = _CALL.match(rest)
                if c:
                    pending[pid] = (c.group(1), c.group(2)[: -len("<unfinished ...>")], lineno)
                continue
            r = _RESUMED.match(rest)
            if r:
                if pid not in pending or pending[pid][0] != r.group(1):
                    continue
                name, head, start = pending.pop(pid)
                body = head + r.group(2)
            else:
                c = _CALL.match(rest)
                if c is None:
                    continue
                name, body, start = c.group(1), c.group(2), lineno
            res = _RESULT.search(body)
            if res is None:
                continue
            args_text = body[: res.start()]
            ret_s = res.group(1)
            ret = None if ret_s == "?" else int(ret_s, 0)
            ret_path = _unhex(res.group(2)).decode("utf-8", "surrogateescape") if res.group(2) else None
            try:
                args = _parse_args(args_text)
            except ValueError:
                continue
            calls.append(Call(pid, name, args, ret, res.group(3), ret_path, start, lineno))
    return calls


# ----------------------------------------------------------------- attaching


def _allow_ptrace_by_children() -> None:
    """Under Yama ptrace_scope=1 only an ancestor may trace us; strace is our child."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(0x59616D61, ctypes.c_ulong(-1 & 0xFFFFFFFFFFFFFFFF), 0, 0, 0)  # PR_SET_PTRACER_ANY
    except (OSError, AttributeError):
        pass


@dataclass
class Trace:
    """What ``traced`` recorded: the raw file, and the descriptors open when it began."""

    path: str
    initial_fds: dict[int, tuple[str, int]] = field(default_factory=dict)
    """fd -> (path, open flags) of this process when tracing started."""
    _calls: list[Call] | None = None

    @property
    def calls(self) -> list[Call]:
        if self._calls is None:
            self._calls = parse_trace(self.path)
            self._calls = _after_marker(self._calls)
        return self._calls

    def durability_points(self, under: str) -> Counter[str]:
        """Durability points on files and directories at or below ``under``, by path."""
        return durability_points(self.calls, under, self.initial_fds)


_MARKER_DIR = "/nonexistent-walbatch-trace-marker"


def _after_marker(calls: list[Call]) -> list[Call]:
    for i, c in enumerate(calls):
        if c.name in ("openat", "open") and any(
                isinstance(a, bytes) and a.startswith(_MARKER_DIR.encode()) for a in c.args):
            return calls[i + 1:]
    return calls


def open_fds() -> dict[int, tuple[str, int]]:
    """This process's open descriptors: fd -> (path, flags)."""
    fds: dict[int, tuple[str, int]] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            with open(f"/proc/self/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        fds[fd] = (path, flags)
    return fds


@contextmanager
def traced(out: str, calls: str = FS_CALLS, timeout: float = 30.0) -> Iterator[Trace]:
    """Record this process's ``calls`` (every thread) into ``out`` while the block runs."""
    if STRACE is None:
        raise RuntimeError("strace is not installed (Debian: apt-get install strace)")
    _allow_ptrace_by_children()
    trace = Trace(out, open_fds())
    proc = subprocess.Popen(
        [STRACE, "-f", "-qq", "-e", "signal=none", "-y", "-xx", "-s", str(1 << 26),
         "-e", f"trace={calls}", "-o", out, "-p", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = f"{_MARKER_DIR}/{uuid.uuid4().hex}"
    needle = "".join(f"\\x{b:02x}" for b in marker.encode())
    deadline = time.monotonic() + timeout
    while True:  # until strace has seen a call of ours: from then on it sees them all
        try:
            os.close(os.open(marker, os.O_RDONLY))
        except OSError:
            pass
        if os.path.exists(out):
            with open(out) as f:
                if needle in f.read():
                    break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            raise RuntimeError(f"strace could not attach to this process: {err.strip()}")
        time.sleep(0.005)
    try:
        yield trace
    finally:
        proc.send_signal(signal.SIGINT)  # detach from every thread, flush, exit
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


# ------------------------------------------------------------ durability points


def _under(path: str | None, root: str) -> bool:
    return path is not None and (path == root or path.startswith(root.rstrip("/") + "/"))


def durability_points(calls: list[Call], under: str,
                      initial_fds: dict[int, tuple[str, int]] | None = None) -> Counter[str]:
    """Count durability points per path at or below ``under`` (see the module docstring)."""
    under = os.path.realpath(under)
    # Keyed by number and path (-y prints the path with every descriptor): a number
    # reused by another thread's open before this close returned names another file.
    flags: dict[tuple[int, str], int] = {
        (fd, p): fl for fd, (p, fl) in (initial_fds or {}).items()}
    counts: Counter[str] = Counter()
    for c in calls:
        if c.name in ("open", "openat", "creat") and c.ret is not None and c.ret >= 0 and c.ret_path:
            fl = 0
            for w in (a for a in c.args if isinstance(a, str) and "O_" in a):
                for part in w.split("|"):
                    fl |= _OPEN_FLAGS.get(part, 0)
            flags[(c.ret, c.ret_path)] = fl
        elif c.name in ("dup", "dup2", "dup3") and c.ret is not None and c.ret >= 0:
            src = c.fd(0)
            if src is not None and (src.num, src.path) in flags:
                flags[(c.ret, src.path)] = flags[(src.num, src.path)]
        fd = c.fd(0)
        if fd is None or not _under(fd.path, under) or c.ret is None or c.ret < 0:
            continue
        if c.name in SYNCS:
            counts[fd.path] += 1
        elif c.name in WRITES and flags.get((fd.num, fd.path), 0) & os.O_DSYNC:
            counts[fd.path] += 1
    return counts


_OPEN_FLAGS = {"O_DSYNC": os.O_DSYNC, "O_SYNC": os.O_SYNC, "O_APPEND": os.O_APPEND,
               "O_TRUNC": os.O_TRUNC, "O_CREAT": os.O_CREAT, "O_WRONLY": os.O_WRONLY,
               "O_RDWR": os.O_RDWR, "O_DIRECTORY": os.O_DIRECTORY, "O_EXCL": os.O_EXCL}
