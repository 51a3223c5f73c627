"""What the benchmarks share: the end-to-end walbatch driver and the /proc load readers.

* ``log_batcher`` + ``drive``: the ``walbatch`` rows of bench_postgresql.py, bench_nats.py
  and bench_http.py. A DurableBatcher with a small log (submitters block when the sink
  falls behind, so the rate is the sustained end-to-end rate, not a burst into the log),
  N submitter threads released together until a deadline, then ``flush()``: the clock runs
  from the release until every acknowledged item is delivered.
* ``cpu_snapshot`` / ``cores`` / ``other_cpu_cores``: how many CPU cores other processes
  (not this one, not the kernel's threads, which our own fsyncs keep busy, and not the
  benchmark's server, counted apart) kept busy during a row, to warn of a disturbed row.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from _run import BUSY_CORES  # noqa: F401 - the benchmarks import it from here too

from walbatch import DurableBatcher

# A small log (16 MiB in 2 MiB segments): submitters block when the sink falls behind.
LOG_OPTS: dict[str, Any] = dict(segment_bytes=2 << 20, max_log_bytes=16 << 20, submit_timeout=300)


# ------------------------------------------------------------- the walbatch driver


@contextmanager
def log_batcher(base: str, url: str, *, close_timeout: float | None = None,
                **opts: Any) -> Iterator[DurableBatcher]:
    """A DurableBatcher on ``url`` with a fresh log under ``base`` (``LOG_OPTS``, then ``opts``),
    closed and its log removed afterwards."""
    directory = tempfile.mkdtemp(prefix="log-", dir=base)
    b = DurableBatcher(directory, url, **{**LOG_OPTS, **opts})
    try:
        yield b
    finally:
        b.close(close_timeout)
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Drive:
    items: int  # submitted (acknowledged) by all threads
    seconds: float  # from the threads' release until flush() returned
    drain: float  # of that, the final flush() after the submitting stopped
    stats: Any  # b.stats() after the flush

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds


def drive(b: DurableBatcher, seconds: float, *, threads: int, many: int,
          make_item: Callable[[int], Any], stride: int = 0, fresh: bool = False) -> Drive:
    """Submit into ``b`` from ``threads`` threads for ``seconds``, then flush it.

    Each thread submits ``make_item(i)`` one at a time (``many`` 1), or lists of ``many``
    with ``submit_many``, until the deadline; thread ``t`` numbers its items from
    ``t * stride``. A thread builds its list once and submits it again and again, or, with
    ``fresh``, builds every list anew (inside the clock). An error in a thread is raised
    after the flush.
    """
    counts = [0] * threads
    errors: list[BaseException] = []
    end_at = [0.0]
    start = threading.Barrier(threads + 1)

    def run(t: int) -> None:
        first, n = t * stride, 0
        try:
            start.wait()
            if many > 1:
                chunk = None if fresh else [make_item(first + j) for j in range(many)]
                while time.perf_counter() < end_at[0]:
                    b.submit_many(chunk or [make_item(first + n + j) for j in range(many)])
                    n += many
            else:
                while time.perf_counter() < end_at[0]:
                    b.submit(make_item(first + n))
                    n += 1
        except BaseException as ex:
            errors.append(ex)
        finally:
            counts[t] = n

    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    end_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for th in ths:
        th.join()
    submitted_in = time.perf_counter() - t0
    b.flush(600)
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return Drive(sum(counts), elapsed, elapsed - submitted_in, b.stats())


def threads_label(threads: int) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}"


# --------------------------------------------------------- other processes' CPU


def proc_cpu(server_pid: int | None = None, *, session: bool = False) -> tuple[float, float]:
    """CPU seconds so far of (kernel threads, the server).

    Kernel threads: kthreadd (pid 2) and its children. The server: process ``server_pid``;
    with ``session``, every live process of the session it leads, plus its exited
    children's time (PostgreSQL: the postmaster, its backends, exited ones too).
    """
    kernel = server = 0
    sid = str(server_pid)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        used = int(fields[11]) + int(fields[12])  # utime + stime
        if pid == "2" or fields[1] == "2":  # ppid
            kernel += used
        elif server_pid is not None and (fields[3] == sid if session else pid == sid):  # session id
            server += used
            if session and pid == sid:
                server += int(fields[13]) + int(fields[14])  # cutime + cstime
    tick = os.sysconf("SC_CLK_TCK")
    return kernel / tick, server / tick


def cpu_snapshot(server_pid: int | None = None, *,
                 session: bool = False) -> tuple[float, float, float] | None:
    """(CPU s of processes other than us, the server and the kernel; the server's; wall), or None.

    Machine-wide user+nice+system time, less this process and the children it has waited
    for (the daemon and its clients, the command lines a row runs), the server
    (``proc_cpu``) and kernel threads (which our own fsyncs keep busy: journal commits,
    block I/O workers).
    """
    try:
        with open("/proc/stat") as f:
            busy = sum(int(v) for v in f.readline().split()[1:4]) / os.sysconf("SC_CLK_TCK")
        kernel, server = proc_cpu(server_pid, session=session)
    except (OSError, ValueError):
        return None
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    return busy - kernel - server - ours, server, time.monotonic()


def cores(before: tuple[float, float, float] | None,
          after: tuple[float, float, float] | None) -> tuple[float | None, float | None]:
    """(other processes' cores, the server's cores) on average between two snapshots."""
    if before is None or after is None or after[2] <= before[2]:
        return None, None
    wall = after[2] - before[2]
    return max(0.0, (after[0] - before[0]) / wall), (after[1] - before[1]) / wall


def other_cpu_cores(before: tuple[float, float, float] | None, server_pid: int | None = None, *,
                    session: bool = False) -> float | None:
    """How many CPU cores other processes kept busy, on average, since ``before``."""
    return cores(before, cpu_snapshot(server_pid, session=session))[0]
