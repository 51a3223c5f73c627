#!/usr/bin/env python
"""How fast does an acknowledged (written + fdatasync'd) submit go?

One process, one disk, one writer after the other, each for ``--seconds``:

* ``naive``       one write + fdatasync per item, single thread (the baseline: ratios are to it)
* ``sqlite``      stdlib sqlite3, WAL, synchronous=FULL, one INSERT + COMMIT per item
* ``ceiling-*``   a minimal group-commit writer: producers append frames to a shared list
                  under a lock; one writer thread swaps the list, writes it, fdatasyncs, and
                  wakes the producers (16 threads / 1,000-item batches / 1,000 asyncio tasks)
* ``walbatch-*``  DurableBatcher.submit (1 and 16 threads), submit_many(1,000 items),
                  and 1,000 asyncio tasks looping ``await b.asubmit(item)``
* ``walbatch-16t-half``  16 threads each held to its share of half the rate ``walbatch-16t``
                  reached in the same run: submit latency when the log is not saturated

Targets are ratios to the minimal writer doing the same job in the same run.
The sync counts come from the system calls the process made (``_syscalls.py``, perf).

Run: ``python benchmarks/bench_submit.py [--seconds 3] [--dir DIR] [--only KEYS] [--json FILE]``.
See benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from _e2e import cpu_snapshot, other_cpu_cores
from _run import BUSY_CORES, Target, document, fs_type, now, percentiles_us, print_targets, write_json
from _syscalls import SyscallTrace
from crc32c import crc32c

from walbatch import DurableBatcher

TS = 1700000000.123
THREADS = 16
BATCH = 1000
TASKS = 1000

# The minimal writer doing the same job as each walbatch row, and the target: walbatch's
# items/s as a fraction of that writer's, measured in the same run.
CEILING_OF = {
    "walbatch-1t": "naive",
    "walbatch-16t": "ceiling-16t",
    "walbatch-many": "ceiling-batch",
    "walbatch-aio": "ceiling-aio",
}
TARGETS = {
    "walbatch-1t": 0.95,
    "walbatch-16t": 0.95,
    "walbatch-many": 1.00,
    "walbatch-aio": 0.85,
}
# At half the 16-thread throughput, p99 submit latency <= this many times p99 fdatasync latency.
LATENCY_TARGET = 2.0


_FRAME = struct.Struct("<II")  # length, crc32c of the payload
# One shared Packer: packing these plain dicts runs in C under the GIL, so threads cannot interleave.
_packb = msgpack.Packer(use_bin_type=True).pack
_ns = time.perf_counter_ns


def make_item(i: int) -> dict[str, Any]:
    return {"user_id": i, "action": "login", "ts": TS}


def encode_frame(item: Any) -> bytes:
    """What the naive and minimal writers put on disk for one item: length, crc32c, msgpack."""
    payload = _packb(item)
    return _FRAME.pack(len(payload), crc32c(payload)) + payload


# ---------------------------------------------------------------------------- results


@dataclass
class Result:
    key: str
    writer: str
    items: int
    seconds: float
    latencies_ns: list[int] = field(repr=False)
    latency_of: str = "item"
    """What one latency sample times: one item's submit, or one whole 1,000-item call."""
    fsyncs: int | None = None
    commit_groups: int | None = None
    notes: list[str] = field(default_factory=list)
    other_cpu: float | None = None
    """CPU cores other processes used, on average, while this row ran (Linux only)."""
    window_ns: tuple[int, int] | None = None
    """The timed window on the monotonic clock (perf's events are picked from it)."""
    syscalls: dict[str, int] | None = None
    """Sync system calls made in the timed window (``_syscalls.summarize``), or None."""
    fdatasync_ns: list[int] = field(default_factory=list, repr=False)
    """The naive writer's fdatasync calls alone (the latency target's yardstick)."""
    paced: dict[str, Any] | None = None
    """For a rate-limited row: the rate asked for and how far behind schedule it fell."""
    _sorted: list[int] | None = field(default=None, repr=False)

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def percentile_us(self, q: float) -> float | None:
        if not self.latencies_ns:
            return None
        if self._sorted is None or len(self._sorted) != len(self.latencies_ns):
            self._sorted = sorted(self.latencies_ns)
        s = self._sorted
        rank = max(0, min(len(s) - 1, int(q * len(s) + 0.999999) - 1))  # nearest rank
        return s[rank] / 1000.0

    @property
    def syncs_per_1k(self) -> float | None:
        """Sync system calls per 1,000 items in the timed window (None: not traced)."""
        if self.syscalls is None or not self.items:
            return None
        return self.syscalls["syncs"] * 1000.0 / self.items

    def to_json(self, by_key: dict[str, Result]) -> dict[str, Any]:
        naive = by_key.get("naive")
        ceiling = by_key.get(CEILING_OF.get(self.key, ""))
        return {
            "key": self.key,
            "writer": self.writer,
            "items": self.items,
            "seconds": round(self.seconds, 4),
            "items_per_s": round(self.rate, 1),
            "latency_of": self.latency_of,
            **percentiles_us(self.latencies_ns),
            "syscalls": self.syscalls,
            "syncs_per_1k_items": None if self.syncs_per_1k is None else round(self.syncs_per_1k, 3),
            "stats_fsyncs": self.fsyncs,
            "commit_groups": self.commit_groups,
            "fdatasync": percentiles_us(self.fdatasync_ns) if self.fdatasync_ns else None,
            "paced": self.paced,
            "other_cores": None if self.other_cpu is None else round(self.other_cpu, 3),
            "ratio_to_naive": round(self.rate / naive.rate, 4) if naive and naive.rate else None,
            "ceiling": ceiling.key if ceiling else None,
            "fraction_of_ceiling": round(self.rate / ceiling.rate, 4) if ceiling and ceiling.rate else None,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------- drivers

Op = Callable[[], int]
"""One timed call: submits one or more items, returns how many."""


Run = tuple[int, float, list[int], tuple[int, int]]
"""(items, seconds, latency samples in ns, (start, end) on the monotonic clock in ns)."""


def run_threads(nthreads: int, make_op: Callable[[int], Op], seconds: float, *,
                interval_ns: int | None = None, lag: list[int] | None = None) -> Run:
    """Run ``nthreads`` threads calling their op until the deadline; time every call.

    With ``interval_ns`` each thread calls on a fixed schedule, one call per interval
    (threads staggered evenly), sleeping (untimed) until its next slot; a call that
    finds its slot past does not sleep. ``lag`` gets each thread's worst lateness.
    """
    lats: list[list[int]] = [[] for _ in range(nthreads)]
    late = [0] * nthreads
    counts = [0] * nthreads
    clock: dict[str, int] = {}
    errors: list[BaseException] = []

    def start() -> None:
        clock["start"] = _ns()
        clock["deadline"] = clock["start"] + int(seconds * 1e9)

    barrier = threading.Barrier(nthreads, action=start)

    def worker(tid: int) -> None:
        try:
            op = make_op(tid)
            lat = lats[tid]
            append = lat.append
            n = 0
            barrier.wait()
            deadline = clock["deadline"]
            slot = clock["start"] + (interval_ns * tid // nthreads if interval_ns else 0)
            while True:
                if interval_ns:
                    wait = slot - _ns()
                    if wait > 0:
                        time.sleep(wait / 1e9)
                    else:
                        late[tid] = max(late[tid], -wait)
                    slot += interval_ns
                t0 = _ns()
                n += op()
                t1 = _ns()
                append(t1 - t0)
                if t1 >= deadline:
                    break
            counts[tid] = n
        except BaseException as ex:  # report, do not hang the barrier
            errors.append(ex)
            barrier.abort()
            raise

    if nthreads == 1:
        worker(0)
    else:
        threads = [threading.Thread(target=worker, args=(t,), name=f"producer-{t}") for t in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    end = _ns()
    start = clock.get("start", end)
    if errors:
        raise errors[0]
    if lag is not None:
        lag.extend(late)
    return sum(counts), (end - start) / 1e9, [x for lat in lats for x in lat], (start, end)


AsyncOp = Callable[[int], Any]  # (item number) -> awaitable


def run_tasks(ntasks: int, seconds: float, setup: Callable[[asyncio.AbstractEventLoop], AsyncOp]) -> Run:
    """Run ``ntasks`` asyncio tasks, each looping ``await op(i)`` until the deadline."""
    lat: list[int] = []
    counts = [0] * ntasks
    clock: dict[str, int] = {}

    async def main() -> None:
        op = setup(asyncio.get_running_loop())
        append = lat.append

        async def worker(tid: int) -> None:
            n = 0
            i = tid * 1_000_000_000
            deadline = clock["deadline"]
            while True:
                t0 = _ns()
                await op(i + n)
                t1 = _ns()
                append(t1 - t0)
                n += 1
                if t1 >= deadline:
                    break
            counts[tid] = n

        clock["start"] = _ns()
        clock["deadline"] = clock["start"] + int(seconds * 1e9)
        await asyncio.gather(*(worker(t) for t in range(ntasks)))
        clock["end"] = _ns()

    asyncio.run(main())
    return sum(counts), (clock["end"] - clock["start"]) / 1e9, lat, (clock["start"], clock["end"])


def counter_from(tid: int) -> Callable[[], int]:
    return itertools.count(tid * 1_000_000_000).__next__


# ------------------------------------------------------------------------------ naive


def bench_naive(workdir: str, seconds: float) -> Result:
    path = os.path.join(workdir, "naive.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    syncs: list[int] = []
    try:
        def make_op(tid: int) -> Op:
            nxt = counter_from(tid)
            append = syncs.append

            def op() -> int:
                os.write(fd, encode_frame(make_item(nxt())))
                t0 = _ns()
                os.fdatasync(fd)
                append(_ns() - t0)
                return 1
            return op

        items, elapsed, lat, window = run_threads(1, make_op, seconds)
    finally:
        os.close(fd)
    return Result("naive", "naive: write + fdatasync per item (1 thread)", items, elapsed, lat,
                  window_ns=window, fdatasync_ns=syncs)


# ----------------------------------------------------------------------------- sqlite


def bench_sqlite(workdir: str, seconds: float) -> Result:
    path = os.path.join(workdir, "bench.db")
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE items (user_id INTEGER, action TEXT, ts REAL)")
        conn.commit()
        insert = "INSERT INTO items (user_id, action, ts) VALUES (?, ?, ?)"

        def make_op(tid: int) -> Op:
            nxt = counter_from(tid)

            def op() -> int:
                item = make_item(nxt())
                conn.execute(insert, (item["user_id"], item["action"], item["ts"]))
                conn.commit()
                return 1
            return op

        items, elapsed, lat, window = run_threads(1, make_op, seconds)
    finally:
        conn.close()
    return Result("sqlite", "sqlite3 WAL, synchronous=FULL, INSERT+COMMIT per item", items, elapsed, lat,
                  window_ns=window)


# -------------------------------------------------------------- minimal group commit


class MinimalGroupWriter:
    """The least a group commit can do: swap a shared list, write it, fdatasync, wake.

    A waiter is anything the ``wake`` callback understands: a per-producer lock
    (threads) or an asyncio future (resolved through ``loop.call_soon_threadsafe``).
    """

    def __init__(self, path: str, wake: Callable[[list[Any]], None]) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.cv = threading.Condition(threading.Lock())
        self.frames: list[bytes] = []
        self.waiters: list[Any] = []
        self.wake = wake
        self.stopping = False
        self.fsyncs = 0
        self.thread = threading.Thread(target=self._run, name="minimal-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        cv = self.cv
        while True:
            with cv:
                while not self.frames and not self.stopping:
                    cv.wait()
                if not self.frames:
                    return
                frames, self.frames = self.frames, []
                waiters, self.waiters = self.waiters, []
            os.write(self.fd, b"".join(frames))
            os.fdatasync(self.fd)
            self.fsyncs += 1
            self.wake(waiters)

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join()
        os.close(self.fd)


def _release_all(locks: list[threading.Lock]) -> None:
    for lock in locks:
        lock.release()


def bench_ceiling_threads(workdir: str, seconds: float, nthreads: int, batch: int) -> Result:
    w = MinimalGroupWriter(os.path.join(workdir, f"ceiling-{nthreads}-{batch}.log"), _release_all)
    cv = w.cv

    def make_op(tid: int) -> Op:
        nxt = counter_from(tid)
        wake = threading.Lock()
        wake.acquire()  # held; the writer releases it when our frames are durable

        if batch == 1:
            def op() -> int:
                frame = encode_frame(make_item(nxt()))
                with cv:
                    w.frames.append(frame)
                    w.waiters.append(wake)
                    cv.notify()
                wake.acquire()
                return 1
        else:
            def op() -> int:
                frames = [encode_frame(make_item(nxt())) for _ in range(batch)]
                with cv:
                    w.frames.extend(frames)
                    w.waiters.append(wake)
                    cv.notify()
                wake.acquire()
                return batch
        return op

    try:
        items, elapsed, lat, window = run_threads(nthreads, make_op, seconds)
    finally:
        w.close()
    if batch == 1:
        return Result("ceiling-16t" if nthreads == THREADS else f"ceiling-{nthreads}t",
                      f"minimal group commit, {nthreads} threads", items, elapsed, lat, fsyncs=w.fsyncs,
                      window_ns=window)
    return Result("ceiling-batch", f"minimal group commit, {batch}-item batches ({nthreads} thread)",
                  items, elapsed, lat, latency_of=f"{batch}-item call", fsyncs=w.fsyncs, window_ns=window)


def bench_ceiling_tasks(workdir: str, seconds: float, ntasks: int) -> Result:
    holder: dict[str, MinimalGroupWriter] = {}

    def setup(loop: asyncio.AbstractEventLoop) -> AsyncOp:
        def resolve(futures: list[asyncio.Future[None]]) -> None:
            for f in futures:
                if not f.done():
                    f.set_result(None)

        def wake(futures: list[asyncio.Future[None]]) -> None:
            loop.call_soon_threadsafe(resolve, futures)

        w = holder["w"] = MinimalGroupWriter(os.path.join(workdir, "ceiling-aio.log"), wake)
        cv = w.cv
        create_future = loop.create_future

        def op(i: int) -> asyncio.Future[None]:
            frame = encode_frame(make_item(i))
            fut = create_future()
            with cv:
                w.frames.append(frame)
                w.waiters.append(fut)
                cv.notify()
            return fut
        return op

    try:
        items, elapsed, lat, window = run_tasks(ntasks, seconds, setup)
    finally:
        if "w" in holder:
            holder["w"].close()
    return Result("ceiling-aio", f"minimal group commit, {ntasks} asyncio tasks", items, elapsed, lat,
                  fsyncs=holder["w"].fsyncs, window_ns=window)


# --------------------------------------------------------------------------- walbatch


class CountingSink:
    """The cheapest sink: counts what the flusher delivers (runs on the flusher thread)."""

    def __init__(self) -> None:
        self.items = 0

    def __call__(self, batch: list[Any]) -> None:
        self.items += len(batch)


def with_batcher(workdir: str, key: str, body: Callable[[DurableBatcher], Run], **result_kw: Any) -> Result:
    """Run ``body`` against a DurableBatcher in a fresh directory; close it cleanly; check it."""
    parent = tempfile.mkdtemp(prefix=f"{key}-", dir=workdir)
    directory = os.path.join(parent, "wal")  # does not exist yet: opened as a brand-new log
    sink = CountingSink()
    b = DurableBatcher(directory, sink)
    try:
        items, elapsed, lat, window = body(b)
        st = b.stats()  # the timed window only: before close() adds its flush and checkpoint
    except BaseException:
        b.close(timeout=5)
        raise
    t0 = time.perf_counter()
    b.close(timeout=120)
    close_s = time.perf_counter() - t0
    after = b.stats()
    notes = [f"close() took {close_s * 1000:.0f} ms"]
    if st.submitted != items:
        notes.append(f"WARNING: stats().submitted={st.submitted} but {items} submits returned")
    if after.delivered != after.submitted or sink.items != after.submitted:
        notes.append(f"WARNING: after close delivered={after.delivered} sink saw {sink.items} "
                      f"of submitted={after.submitted}")
    else:
        notes.append(f"after close: all {after.submitted} items delivered to the sink")
    notes.append(f"{st.commit_groups} commit groups, {st.fsyncs} fsyncs (incl. segment create and "
                 f"checkpoints), batches {dict((k, v) for k, v in st.batches_by_reason.items() if v)}")
    shutil.rmtree(parent, ignore_errors=True)
    return Result(key, items=items, seconds=elapsed, latencies_ns=lat, fsyncs=st.fsyncs,
                  commit_groups=st.commit_groups, notes=notes, window_ns=window, **result_kw)


def bench_walbatch_threads(workdir: str, seconds: float, nthreads: int) -> Result:
    def body(b: DurableBatcher) -> Run:
        submit = b.submit

        def make_op(tid: int) -> Op:
            nxt = counter_from(tid)

            def op() -> int:
                submit(make_item(nxt()))
                return 1
            return op
        return run_threads(nthreads, make_op, seconds)

    key = {1: "walbatch-1t", THREADS: "walbatch-16t"}.get(nthreads, f"walbatch-{nthreads}t")
    what = "1 thread" if nthreads == 1 else f"{nthreads} threads"
    return with_batcher(workdir, key, body, writer=f"walbatch submit(), {what}")


def bench_walbatch_paced(workdir: str, seconds: float, nthreads: int, rate: float) -> Result:
    """``nthreads`` threads calling submit() on a schedule that adds up to ``rate`` items/s."""
    interval_ns = max(1, int(nthreads * 1e9 / rate))
    lag: list[int] = []

    def body(b: DurableBatcher) -> Run:
        submit = b.submit

        def make_op(tid: int) -> Op:
            nxt = counter_from(tid)

            def op() -> int:
                submit(make_item(nxt()))
                return 1
            return op
        return run_threads(nthreads, make_op, seconds, interval_ns=interval_ns, lag=lag)

    r = with_batcher(workdir, "walbatch-16t-half", body,
                     writer=f"walbatch submit(), {nthreads} threads held to half the 16-thread rate")
    r.paced = {"asked_items_per_s": round(rate, 1), "worst_lateness_ms": round(max(lag, default=0) / 1e6, 2)}
    r.notes.insert(0, f"paced: asked {rate:,.0f} items/s, got {r.rate:,.0f}; worst lateness of a thread "
                      f"against its schedule {max(lag, default=0) / 1e6:.1f} ms")
    return r


def bench_walbatch_many(workdir: str, seconds: float, batch: int) -> Result:
    def body(b: DurableBatcher) -> Run:
        submit_many = b.submit_many

        def make_op(tid: int) -> Op:
            nxt = counter_from(tid)

            def op() -> int:
                submit_many([make_item(nxt()) for _ in range(batch)])
                return batch
            return op
        return run_threads(1, make_op, seconds)

    return with_batcher(workdir, "walbatch-many", body, writer=f"walbatch submit_many({batch}), 1 thread",
                        latency_of=f"{batch}-item call")


def bench_walbatch_tasks(workdir: str, seconds: float, ntasks: int) -> Result:
    def body(b: DurableBatcher) -> Run:
        def setup(loop: asyncio.AbstractEventLoop) -> AsyncOp:
            asubmit = b.asubmit
            return lambda i: asubmit(make_item(i))
        return run_tasks(ntasks, seconds, setup)

    return with_batcher(workdir, "walbatch-aio", body, writer=f"walbatch asubmit(), {ntasks} asyncio tasks")


# ------------------------------------------------------------------------------ report


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_table(results: list[Result], by_key: dict[str, Result], out: Any = sys.stdout) -> None:
    head = ["writer", "items/s", "p50 µs", "p99 µs", "latency of", "syncs/1k items", "x naive",
            "of its ceiling"]
    naive = by_key.get("naive")
    rows = []
    for r in results:
        ceiling = by_key.get(CEILING_OF.get(r.key, ""))
        rows.append([
            r.writer,
            f"{r.rate:,.0f}",
            fmt(r.percentile_us(0.50), ",.0f"),
            fmt(r.percentile_us(0.99), ",.0f"),
            r.latency_of,
            fmt(r.syncs_per_1k, ",.2f"),
            fmt(r.rate / naive.rate if naive and naive.rate else None, ",.2f") + ("x" if naive else ""),
            fmt(r.rate / ceiling.rate if ceiling and ceiling.rate else None, ".0%"),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    right = {1, 2, 3, 5, 6, 7}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    print(line(head), file=out)
    print("|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|", file=out)
    for row in rows:
        print(line(row), file=out)


def targets(by_key: dict[str, Result]) -> list[Target]:
    """Issue 13's targets: each walbatch row against its ceiling, and the latency target."""
    out = []
    names = {"walbatch-1t": "submit(), 1 thread", "walbatch-16t": "submit(), 16 threads",
             "walbatch-many": "submit_many(1000)", "walbatch-aio": "asubmit(), 1,000 asyncio tasks"}
    for key, needed in TARGETS.items():
        r, ceiling = by_key.get(key), by_key.get(CEILING_OF[key])
        if r is None and ceiling is None:
            continue
        measured = r.rate / ceiling.rate if r and ceiling and ceiling.rate else None
        detail = (f"{r.rate if r else 0:,.0f} vs {ceiling.rate if ceiling else 0:,.0f} items/s "
                  f"({CEILING_OF[key]})")
        if key == "walbatch-1t":
            out.append(Target(names[key], measured, needed, "ratio", "naive", detail=detail))
        else:
            out.append(Target(names[key], measured, needed, "fraction", f"of {CEILING_OF[key]}",
                              detail=detail))
    half, naive = by_key.get("walbatch-16t-half"), by_key.get("naive")
    if half is not None:
        p99 = half.percentile_us(0.99)
        sync99 = percentiles_us(naive.fdatasync_ns)["p99_us"] if naive and naive.fdatasync_ns else None
        out.append(Target(
            "p99 submit latency at half the 16-thread rate", p99 / sync99 if p99 and sync99 else None,
            LATENCY_TARGET, "ratio", "p99 fdatasync", op="<=",
            detail=f"p99 submit {fmt(p99, ',.0f')} µs at {half.rate:,.0f} items/s; p99 fdatasync "
                   f"{fmt(sync99, ',.0f')} µs (naive row)"))
    return out


# -------------------------------------------------------------------------------- main

BENCHES: dict[str, Callable[[argparse.Namespace, str, dict[str, Result]], Result]] = {
    "naive": lambda a, d, done: bench_naive(d, a.seconds),
    "sqlite": lambda a, d, done: bench_sqlite(d, a.seconds),
    "ceiling-16t": lambda a, d, done: bench_ceiling_threads(d, a.seconds, THREADS, 1),
    "ceiling-batch": lambda a, d, done: bench_ceiling_threads(d, a.seconds, 1, BATCH),
    "ceiling-aio": lambda a, d, done: bench_ceiling_tasks(d, a.seconds, TASKS),
    "walbatch-1t": lambda a, d, done: bench_walbatch_threads(d, a.seconds, 1),
    "walbatch-16t": lambda a, d, done: bench_walbatch_threads(d, a.seconds, THREADS),
    "walbatch-16t-half": lambda a, d, done: bench_walbatch_paced(d, a.seconds, THREADS,
                                                                 done["walbatch-16t"].rate / 2),
    "walbatch-many": lambda a, d, done: bench_walbatch_many(d, a.seconds, BATCH),
    "walbatch-aio": lambda a, d, done: bench_walbatch_tasks(d, a.seconds, TASKS),
}
NEEDS = {"walbatch-16t-half": ["walbatch-16t"]}
"""Rows another row takes a number from (always run first)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="rows (for --only): " + ", ".join(BENCHES))
    p.add_argument("--seconds", type=float, default=3.0, help="duration of each writer (default 3)")
    p.add_argument("--dir", default=".", help="where to make the temp directory (default: the current "
                   "directory, so the benchmark measures that disk; not /tmp, which may be tmpfs)")
    p.add_argument("--only", default="", help="comma-separated row keys to run (naive always runs too, "
                   "as the baseline of the ratios, and so does a row another needs)")
    p.add_argument("--syscalls", choices=("perf", "off"), default="perf",
                   help="count sync system calls per row with perf (default; the sync column is "
                        "empty, saying why, when perf cannot run) or not at all")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-' for stdout)")
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    keys = list(BENCHES)
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in BENCHES]
        if unknown:
            p.error(f"unknown row(s) {unknown}; choose from {', '.join(BENCHES)}")
        wanted += [n for k in wanted for n in NEEDS.get(k, [])]
        if "walbatch-16t-half" in wanted:
            wanted.append("naive")
        keys = ["naive"] + [k for k in keys if k in wanted and k != "naive"]
    args.keys = keys
    return args


def main(argv: list[str] | None = None) -> int:
    started = now()
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="walbatch-bench-", dir=args.dir)
    fs = fs_type(workdir)
    log = sys.stderr
    print(f"walbatch submit benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{args.seconds:g} s per writer, in {workdir} ({fs})", file=log)
    trace = SyscallTrace.start(workdir) if args.syscalls == "perf" else None
    why_no_syscalls = None if trace else (SyscallTrace.why_not or "--syscalls off")
    if why_no_syscalls:
        print(f"  sync system calls not counted: {why_no_syscalls}", file=log)
    results: list[Result] = []
    by_key: dict[str, Result] = {}
    try:
        for key in args.keys:
            gc.collect()
            print(f"  running {key} ...", end="", flush=True, file=log)
            perf_pid = trace.proc.pid if trace else None  # perf's own CPU is not a disturbance
            before = cpu_snapshot(perf_pid)
            r = BENCHES[key](args, workdir, by_key)
            r.other_cpu = other_cpu_cores(before, perf_pid)
            if r.other_cpu is not None and r.other_cpu >= BUSY_CORES:
                r.notes.insert(0, f"WARNING: other processes kept {r.other_cpu:.2f} CPU cores busy during "
                                  "this row; its numbers are disturbed")
            results.append(r)
            by_key[key] = r
            print(f" {r.rate:,.0f} items/s", file=log, flush=True)
    finally:
        if trace is not None:
            trace.stop()
            if trace.events is None:
                why_no_syscalls = trace.error
        shutil.rmtree(workdir, ignore_errors=True)
    if trace is not None and trace.events is not None:
        for r in results:
            if r.window_ns:
                r.syscalls = trace.window(r.window_ns[0] / 1e9, r.window_ns[1] / 1e9)

    naive = by_key.get("naive")
    print()
    print(f"Acknowledged-write throughput: every item is written and fdatasync'd before its submit "
          f"returns. Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {fs} at {args.dir!r}, "
          f"{args.seconds:g} s per writer, item {make_item(0)}.")
    print("walbatch rows: the sink is an in-process callable that only counts items; the flusher "
          "thread still decodes, batches, delivers and checkpoints as in real use (same process, same GIL).")
    print()
    print_table(results, by_key)
    print()
    print("latency of: 'item' = one submit call; '1000-item call' = one whole submit_many / batch call "
          "(not per item). syncs/1k items: fsync + fdatasync + O_DSYNC writes the process made in the "
          "timed window, counted by perf" + (f" (not counted: {why_no_syscalls})" if why_no_syscalls else "")
          + ". of its ceiling: items/s over the minimal writer doing the same job.")
    if naive and naive.fdatasync_ns:
        p = percentiles_us(naive.fdatasync_ns)
        print(f"fdatasync alone (naive row): p50 {p['p50_us']:,.0f} µs, p99 {p['p99_us']:,.0f} µs")
    busy = [r for r in results if r.other_cpu is not None and r.other_cpu >= BUSY_CORES]
    if busy:
        print(f"WARNING: the machine was not quiet: other processes used >= {BUSY_CORES} CPU cores during "
              f"{', '.join(r.key for r in busy)}; rerun on an idle machine for numbers to compare.")
    tr = targets(by_key)
    print()
    print_targets(tr)
    notes = [(r.key, n) for r in results for n in r.notes]
    if notes:
        print()
        print("Notes:")
        for key, n in notes:
            print(f"  {key}: {n}")

    if args.json:
        rows = [r.to_json(by_key) for r in results]
        doc = document("submit", workdir, rows, tr, started=started, argv=argv and [__file__, *argv],
                       script=__file__,
                       settings={"seconds_per_writer": args.seconds, "threads": THREADS, "batch": BATCH,
                                 "tasks": TASKS, "item": make_item(0)},
                       syscalls_counted_by="perf record of syscall tracepoints" if not why_no_syscalls
                       else None,
                       syscalls_not_counted=why_no_syscalls)
        doc["machine"]["fs_type"] = fs
        write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
