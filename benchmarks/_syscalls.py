"""Count the file-sync system calls a benchmark process really makes, per row.

The fsync counts in the benchmarks' tables come from the kernel, not from walbatch's
own counters: ``perf record`` samples the syscall tracepoints of this
process (every thread, also threads started later) while the benchmark runs, with the
monotonic clock, and each row's window [start, end) picks its events afterwards.

A *sync* is one system call that makes data durable: ``fsync``, ``fdatasync``,
``sync_file_range``, or a ``write``/``pwrite64``/``writev``/``pwritev`` on a file
descriptor opened with ``O_DSYNC`` (or ``O_SYNC``), which the kernel completes only
once the data is on disk. File descriptors are followed from ``openat`` (its flags)
to ``close``; one opened before tracing started counts as not synchronous.

Why perf and not ``strace -c``: ptrace stops the traced thread on every traced call
(tens of µs each), which slows a 130 µs submit enough to change how commit groups
form, i.e. the very count being measured. A tracepoint costs about a microsecond and
never stops the thread. Needs ``perf`` (Debian: linux-perf) and the right to trace
(root, or kernel.perf_event_paranoid <= -1); without them the counts are None and the
tables say so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

O_DSYNC = os.O_DSYNC if hasattr(os, "O_DSYNC") else 0o10000
WRITES = ("write", "pwrite64", "writev", "pwritev", "pwritev2")
SYNCS = ("fsync", "fdatasync", "sync_file_range")
EVENTS = [f"syscalls:sys_enter_{n}" for n in ("openat", "close", *WRITES, *SYNCS)] + \
    ["syscalls:sys_exit_openat"]

# "  12345  4817.140156:    syscalls:sys_enter_write: fd: 0x00000003, buf: ..., count: 0x..."
_LINE = re.compile(r"^\s*(\d+)\s+(\d+\.\d+):\s+syscalls:sys_(enter|exit)_(\w+):\s*(.*)$")
_FIELD = re.compile(r"(\w+): (0x[0-9a-f]+|-?\d+)")


@dataclass(frozen=True)
class Event:
    time: float
    name: str  # "fsync", "fdatasync", "dsync_write", ...


def parse(text: str) -> list[Event]:
    """The sync events in ``perf script -F tid,time,event,trace`` output of one process."""
    fds: dict[int, bool] = {}  # fd -> opened O_DSYNC
    opening: dict[int, int] = {}  # tid -> flags of its openat in progress
    out: list[Event] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        tid, t, phase, call, rest = int(m[1]), float(m[2]), m[3], m[4], m[5]
        if phase == "exit":
            if call == "openat" and tid in opening:
                flags = opening.pop(tid)
                ret = int(rest.strip(), 0) if rest.strip() else -1
                if ret >= 0:
                    fds[ret] = bool(flags & O_DSYNC)
            continue
        fields = {k: int(v, 0) for k, v in _FIELD.findall(rest)}
        if call == "openat":
            opening[tid] = fields.get("flags", 0)
        elif call == "close":
            fds.pop(fields.get("fd", -1), None)
        elif call in SYNCS:
            out.append(Event(t, call))
        elif call in WRITES and fds.get(fields.get("fd", -1)):
            out.append(Event(t, "dsync_write"))
    return out


def summarize(events: list[Event], start: float, end: float) -> dict[str, int]:
    """Counts of each kind in [start, end), plus ``syncs``: all of them."""
    c = Counter(e.name for e in events if start <= e.time < end)
    out = {k: c.get(k, 0) for k in ("fsync", "fdatasync", "sync_file_range", "dsync_write")}
    out["syncs"] = sum(out.values())
    return out


class SyscallTrace:
    """``perf record`` of this process's sync system calls until ``stop()``.

    ``SyscallTrace.start(workdir)`` returns None (and ``why`` says why) when perf is
    missing or may not trace; ``window(start, end)`` then gives the counts of a row
    timed with ``time.monotonic()``.
    """

    why_not: str | None = None

    def __init__(self, proc: subprocess.Popen[bytes], data: str, ctl: int, ack: int) -> None:
        self.proc, self.data, self.ctl, self.ack = proc, data, ctl, ack
        self.events: list[Event] | None = None
        self.error: str | None = None

    @classmethod
    def start(cls, workdir: str, pid: int | None = None) -> SyscallTrace | None:
        perf = shutil.which("perf")
        if perf is None:
            cls.why_not = "perf is not installed (Debian: apt-get install linux-perf)"
            return None
        d = os.path.join(workdir, "perf")
        os.makedirs(d, exist_ok=True)
        ctl_path, ack_path = os.path.join(d, "ctl"), os.path.join(d, "ack")
        for p in (ctl_path, ack_path):
            os.mkfifo(p)
        data = os.path.join(d, "perf.data")
        # O_RDWR: opening the ack fifo neither blocks nor ever reads EOF (we hold a writer too).
        ack_fd = os.open(ack_path, os.O_RDWR)
        proc = subprocess.Popen(
            [perf, "record", "-q", "-D", "-1", "--control", f"fifo:{ctl_path},{ack_path}",
             "-k", "CLOCK_MONOTONIC", "-m", "1024", "-e", ",".join(EVENTS),
             "-p", str(pid or os.getpid()), "-o", data],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ctl_fd = _open_writer(ctl_path, proc)
        if ctl_fd is None:
            os.close(ack_fd)
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            cls.why_not = f"perf record failed: {err[-300:] or 'no message'}"
            return None
        t = cls(proc, data, ctl_fd, ack_fd)
        if not t._command("enable"):
            t.stop()
            cls.why_not = "perf record did not acknowledge 'enable'"
            return None
        return t

    def _command(self, what: str, timeout: float = 30.0) -> bool:
        """Send a control command; wait for perf's ack."""
        import select

        try:
            os.write(self.ctl, (what + "\n").encode())
            got = b""
            while b"ack" not in got:
                ready, _, _ = select.select([self.ack], [], [], timeout)
                if not ready:
                    return False
                got += os.read(self.ack, 64)
            return True
        except OSError:
            return False

    def stop(self) -> list[Event] | None:
        """Stop perf and read its events (None, with ``error`` set, if that failed)."""
        if self.events is not None or self.error is not None:
            return self.events
        self._command("disable")
        for fd in (self.ctl, self.ack):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.send_signal(2)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            text = subprocess.run(["perf", "script", "-i", self.data, "-F", "tid,time,event,trace"],
                                  capture_output=True, text=True, timeout=600, check=True).stdout
        except (OSError, subprocess.SubprocessError) as ex:
            self.error = f"perf script failed: {ex}"
            return None
        self.events = parse(text)
        return self.events

    def window(self, start: float, end: float) -> dict[str, int] | None:
        return None if self.events is None else summarize(self.events, start, end)


def _open_writer(path: str, proc: subprocess.Popen[bytes]) -> int | None:
    """Open a fifo for writing once perf has opened it for reading (None if perf died)."""
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until there is a reader
            os.set_blocking(fd, True)
            return fd
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.01)
