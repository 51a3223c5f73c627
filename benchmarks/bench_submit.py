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

Run: ``python benchmarks/bench_submit.py [--seconds 3] [--dir DIR] [--only KEYS] [--json FILE]``.
See benchmarks/README.md for what each row means. The fsyncs column is counted at the
operating system: the same rows run again, briefly, in a child process under strace.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import platform
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from _e2e import BUSY_CORES, cpu_snapshot, other_cpu_cores
from crc32c import crc32c

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from systrace import STRACE, durability_points, parse_trace  # noqa: E402

from walbatch import DurableBatcher

TS = 1700000000.123
THREADS = 16
BATCH = 1000
TASKS = 1000

# Targets, as a ratio of items/s to the naive writer measured in the same run.
TARGETS = {
    "walbatch-1t": 0.9,
    "walbatch-16t": 4.0,
    "walbatch-many": 200.0,
    "walbatch-aio": 50.0,
}
# The minimal writer doing the same job as each walbatch row (compared in the targets section).
CEILING_OF = {
    "walbatch-1t": "naive",
    "walbatch-16t": "ceiling-16t",
    "walbatch-many": "ceiling-batch",
    "walbatch-aio": "ceiling-aio",
}


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
    """Durability points (fsync, fdatasync, O_DSYNC writes) counted by strace in the counting run."""
    fsync_items: int | None = None
    """Items the counting run acknowledged (it is not the timed run: see count_fsyncs)."""
    commit_groups: int | None = None
    notes: list[str] = field(default_factory=list)
    other_cpu: float | None = None
    """CPU cores other processes used, on average, while this row ran (Linux only)."""
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
    def fsyncs_per_1k(self) -> float | None:
        if self.fsyncs is None or not self.fsync_items:
            return None
        return self.fsyncs * 1000.0 / self.fsync_items

    def to_json(self, naive_rate: float | None) -> dict[str, Any]:
        return {
            "key": self.key,
            "writer": self.writer,
            "items": self.items,
            "seconds": round(self.seconds, 4),
            "items_per_s": round(self.rate, 1),
            "latency_of": self.latency_of,
            "latency_samples": len(self.latencies_ns),
            "p50_us": self.percentile_us(0.50),
            "p99_us": self.percentile_us(0.99),
            "fsyncs": self.fsyncs,
            "fsyncs_per_1k_items": self.fsyncs_per_1k,
            "fsyncs_counted_over_items": self.fsync_items,
            "commit_groups": self.commit_groups,
            "other_processes_cpu_cores": self.other_cpu,
            "ratio_to_naive": (self.rate / naive_rate) if naive_rate else None,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------- drivers

Op = Callable[[], int]
"""One timed call: submits one or more items, returns how many."""


def run_threads(nthreads: int, make_op: Callable[[int], Op], seconds: float) -> tuple[int, float, list[int]]:
    """Run ``nthreads`` threads calling their op until the deadline; time every call."""
    lats: list[list[int]] = [[] for _ in range(nthreads)]
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
            while True:
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
    elapsed = (_ns() - clock.get("start", _ns())) / 1e9
    if errors:
        raise errors[0]
    return sum(counts), elapsed, [x for lat in lats for x in lat]


AsyncOp = Callable[[int], Any]  # (item number) -> awaitable


def run_tasks(ntasks: int, seconds: float,
              setup: Callable[[asyncio.AbstractEventLoop], AsyncOp]) -> tuple[int, float, list[int]]:
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
    return sum(counts), (clock["end"] - clock["start"]) / 1e9, lat


def counter_from(tid: int) -> Callable[[], int]:
    return itertools.count(tid * 1_000_000_000).__next__


# ------------------------------------------------------------------------------ naive


def bench_naive(workdir: str, seconds: float) -> Result:
    path = os.path.join(workdir, "naive.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        def make_op(tid: int) -> Op:
            nxt = counter_from(tid)

            def op() -> int:
                os.write(fd, encode_frame(make_item(nxt())))
                os.fdatasync(fd)
                return 1
            return op

        items, elapsed, lat = run_threads(1, make_op, seconds)
    finally:
        os.close(fd)
    return Result("naive", "naive: write + fdatasync per item (1 thread)", items, elapsed, lat)


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

        items, elapsed, lat = run_threads(1, make_op, seconds)
    finally:
        conn.close()
    return Result("sqlite", "sqlite3 WAL, synchronous=FULL, INSERT+COMMIT per item", items, elapsed, lat)


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
        items, elapsed, lat = run_threads(nthreads, make_op, seconds)
    finally:
        w.close()
    if batch == 1:
        return Result("ceiling-16t" if nthreads == THREADS else f"ceiling-{nthreads}t",
                      f"minimal group commit, {nthreads} threads", items, elapsed, lat)
    return Result("ceiling-batch", f"minimal group commit, {batch}-item batches ({nthreads} thread)",
                  items, elapsed, lat, latency_of=f"{batch}-item call")


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
        items, elapsed, lat = run_tasks(ntasks, seconds, setup)
    finally:
        if "w" in holder:
            holder["w"].close()
    return Result("ceiling-aio", f"minimal group commit, {ntasks} asyncio tasks", items, elapsed, lat)


# --------------------------------------------------------------------------- walbatch


class CountingSink:
    """The cheapest sink: counts what the flusher delivers (runs on the flusher thread)."""

    def __init__(self) -> None:
        self.items = 0

    def __call__(self, batch: list[Any]) -> None:
        self.items += len(batch)


def with_batcher(workdir: str, key: str, body: Callable[[DurableBatcher], tuple[int, float, list[int]]],
                 **result_kw: Any) -> Result:
    """Run ``body`` against a DurableBatcher in a fresh directory; close it cleanly; check it."""
    parent = tempfile.mkdtemp(prefix=f"{key}-", dir=workdir)
    directory = os.path.join(parent, "wal")  # does not exist yet: opened as a brand-new log
    sink = CountingSink()
    b = DurableBatcher(directory, sink)
    try:
        items, elapsed, lat = body(b)
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
    notes.append(f"{st.commit_groups} commit groups, "
                 f"batches {dict((k, v) for k, v in st.batches_by_reason.items() if v)}")
    shutil.rmtree(parent, ignore_errors=True)
    return Result(key, items=items, seconds=elapsed, latencies_ns=lat,
                  commit_groups=st.commit_groups, notes=notes, **result_kw)


def bench_walbatch_threads(workdir: str, seconds: float, nthreads: int) -> Result:
    def body(b: DurableBatcher) -> tuple[int, float, list[int]]:
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


def bench_walbatch_many(workdir: str, seconds: float, batch: int) -> Result:
    def body(b: DurableBatcher) -> tuple[int, float, list[int]]:
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
    def body(b: DurableBatcher) -> tuple[int, float, list[int]]:
        def setup(loop: asyncio.AbstractEventLoop) -> AsyncOp:
            asubmit = b.asubmit
            return lambda i: asubmit(make_item(i))
        return run_tasks(ntasks, seconds, setup)

    return with_batcher(workdir, "walbatch-aio", body, writer=f"walbatch asubmit(), {ntasks} asyncio tasks")


# ------------------------------------------------------------------------------ report


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_table(results: list[Result], naive_rate: float | None, out: Any = sys.stdout) -> None:
    head = ["writer", "items/s", "p50 µs", "p99 µs", "latency of", "fsyncs/1k items", "x naive"]
    rows = []
    for r in results:
        rows.append([
            r.writer,
            f"{r.rate:,.0f}",
            fmt(r.percentile_us(0.50), ",.0f"),
            fmt(r.percentile_us(0.99), ",.0f"),
            r.latency_of,
            fmt(r.fsyncs_per_1k, ",.2f"),
            fmt(r.rate / naive_rate if naive_rate else None, ",.2f") + ("x" if naive_rate else ""),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    right = {1, 2, 3, 5, 6}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    print(line(head), file=out)
    print("|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|", file=out)
    for row in rows:
        print(line(row), file=out)


def targets_report(by_key: dict[str, Result], naive_rate: float | None) -> list[dict[str, Any]]:
    out = []
    for key, target in TARGETS.items():
        r = by_key.get(key)
        if r is None or not naive_rate:
            continue
        ratio = r.rate / naive_rate
        ceiling = by_key.get(CEILING_OF[key])
        out.append({
            "key": key,
            "writer": r.writer,
            "ratio_to_naive": ratio,
            "target": target,
            "met": ratio >= target,
            "ceiling": ceiling.key if ceiling else None,
            "ceiling_ratio_to_naive": ceiling.rate / naive_rate if ceiling else None,
            "fraction_of_ceiling": r.rate / ceiling.rate if ceiling and ceiling.rate else None,
        })
    return out


# -------------------------------------------------------------------------------- main

BENCHES: dict[str, Callable[[argparse.Namespace, str], Result]] = {
    "naive": lambda a, d: bench_naive(d, a.seconds),
    "sqlite": lambda a, d: bench_sqlite(d, a.seconds),
    "ceiling-16t": lambda a, d: bench_ceiling_threads(d, a.seconds, THREADS, 1),
    "ceiling-batch": lambda a, d: bench_ceiling_threads(d, a.seconds, 1, BATCH),
    "ceiling-aio": lambda a, d: bench_ceiling_tasks(d, a.seconds, TASKS),
    "walbatch-1t": lambda a, d: bench_walbatch_threads(d, a.seconds, 1),
    "walbatch-16t": lambda a, d: bench_walbatch_threads(d, a.seconds, THREADS),
    "walbatch-many": lambda a, d: bench_walbatch_many(d, a.seconds, BATCH),
    "walbatch-aio": lambda a, d: bench_walbatch_tasks(d, a.seconds, TASKS),
}


# The files each row writes in the work directory (the walbatch rows: a "<key>-*" directory).
CEILING_FILES = {f"ceiling-{THREADS}-1.log": "ceiling-16t", f"ceiling-1-{BATCH}.log": "ceiling-batch",
                 "ceiling-aio.log": "ceiling-aio", "naive.log": "naive"}
COUNTED_CALLS = "open,openat,creat,write,writev,pwrite64,pwritev,pwritev2,fsync,fdatasync,dup,dup2,dup3"


def row_of(relpath: str) -> str | None:
    top = relpath.split(os.sep)[0]
    if top in CEILING_FILES:
        return CEILING_FILES[top]
    if top.startswith("bench.db"):
        return "sqlite"
    return next((k for k in BENCHES if k.startswith("walbatch-") and top.startswith(k + "-")), None)


def count_fsyncs(args: argparse.Namespace, keys: list[str], results: list[Result]) -> str:
    """Fill each result's fsyncs from a second, shorter run of the same rows under strace.

    Counted at the operating system (fsync, fdatasync, writes to O_DSYNC descriptors,
    directory fsyncs) on each row's own files, including creating and closing a log.
    strace's seccomp filter stops only at those calls, so the run is barely slowed; but
    a traced call takes tens of microseconds longer, which can make commit groups a
    little larger than in the timed run. Returns a note for the report.
    """
    if STRACE is None:
        return "fsyncs not counted: strace is not installed (Debian: apt-get install strace)"
    with tempfile.TemporaryDirectory(prefix="walbatch-bench-count-", dir=args.dir) as tmp:
        trace, out = os.path.join(tmp, "trace"), os.path.join(tmp, "rows.json")
        cmd = [STRACE, "--seccomp-bpf", "-f", "-qq", "-e", "signal=none", "-y", "-xx", "-s", "0",
               "-e", f"trace={COUNTED_CALLS}", "-o", trace, sys.executable, os.path.abspath(__file__),
               "--seconds", str(args.fsync_seconds), "--dir", tmp, "--only", ",".join(keys),
               "--json", out, "--fsyncs", "off"]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            return f"fsyncs not counted: the traced run failed ({proc.stderr.strip()[-300:]})"
        with open(out) as f:
            doc = json.load(f)
        workdir = doc["info"]["dir"]
        per_row: Counter[str] = Counter()
        for path, n in durability_points(parse_trace(trace), workdir).items():
            row = row_of(os.path.relpath(path, workdir))
            if row is not None:
                per_row[row] += n
    items = {r["key"]: r["items"] for r in doc["results"]}
    for r in results:
        if r.key in items:
            r.fsyncs, r.fsync_items = per_row.get(r.key, 0), items[r.key]
    return (f"fsyncs/1k items: counted with strace in a second run of the same rows "
            f"({args.fsync_seconds:g} s each): fsync, fdatasync, O_DSYNC writes and directory "
            "fsyncs on each row's files, including creating and closing a walbatch log.")


def fs_type(path: str) -> str:
    """The file system type of ``path`` from /proc/mounts (Linux), or '?'."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return "?"
    path = os.path.realpath(path)
    best = ("", "?")
    for m in mounts:
        if len(m) < 3:
            continue
        inside = path == m[1] or path.startswith(m[1].rstrip("/") + "/")
        if inside and len(m[1]) >= len(best[0]):
            best = (m[1], m[2])
    return best[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="rows (for --only): " + ", ".join(BENCHES))
    p.add_argument("--seconds", type=float, default=3.0, help="duration of each writer (default 3)")
    p.add_argument("--dir", default=".", help="where to make the temp directory (default: the current "
                   "directory, so the benchmark measures that disk; not /tmp, which may be tmpfs)")
    p.add_argument("--only", default="", help="comma-separated row keys to run (naive always runs too, "
                   "as the baseline of the ratios)")
    p.add_argument("--json", metavar="FILE", help="also dump the results as JSON to FILE ('-' for stdout)")
    p.add_argument("--fsyncs", choices=["strace", "off"], default="strace",
                   help="count each row's fsyncs in a second, traced run (default) or not at all")
    p.add_argument("--fsync-seconds", type=float, default=1.0,
                   help="duration of each row in the counting run (default 1)")
    args = p.parse_args(argv)

    keys = list(BENCHES)
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in BENCHES]
        if unknown:
            p.error(f"unknown row(s) {unknown}; choose from {', '.join(BENCHES)}")
        keys = ["naive"] + [k for k in keys if k in wanted and k != "naive"]

    os.makedirs(args.dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="walbatch-bench-", dir=args.dir)
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dir": workdir,
        "fs_type": fs_type(workdir),
        "seconds_per_writer": args.seconds,
        "threads": THREADS,
        "batch": BATCH,
        "tasks": TASKS,
        "item": make_item(0),
        "walbatch_sink": "in-process callable counting delivered items; the flusher thread runs "
                         "(decode, batch, deliver, checkpoint) as in real use",
    }
    log = sys.stderr
    print(f"walbatch submit benchmark: Python {info['python']}, {info['cpus']} CPUs, "
          f"{args.seconds:g} s per writer, in {workdir} ({info['fs_type']})", file=log)
    results: list[Result] = []
    try:
        for key in keys:
            gc.collect()
            print(f"  running {key} ...", end="", flush=True, file=log)
            before = cpu_snapshot()
            r = BENCHES[key](args, workdir)
            r.other_cpu = other_cpu_cores(before)
            if r.other_cpu is not None and r.other_cpu >= BUSY_CORES:
                r.notes.insert(0, f"WARNING: other processes kept {r.other_cpu:.2f} CPU cores busy during "
                                  "this row; its numbers are disturbed")
            results.append(r)
            print(f" {r.rate:,.0f} items/s", file=log, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    fsync_note = "fsyncs not counted (--fsyncs off)"
    if args.fsyncs == "strace":
        print("  counting fsyncs in a traced run ...", end="", flush=True, file=log)
        fsync_note = count_fsyncs(args, keys, results)
        print(" done", file=log)

    by_key = {r.key: r for r in results}
    naive_rate = by_key["naive"].rate if "naive" in by_key else None

    print()
    print(f"Acknowledged-write throughput: every item is written and fdatasync'd before its submit "
          f"returns. Python {info['python']}, {info['cpus']} CPUs, {info['fs_type']} at {args.dir!r}, "
          f"{args.seconds:g} s per writer, item {info['item']}.")
    print("walbatch rows: the sink is an in-process callable that only counts items; the flusher "
          "thread still decodes, batches, delivers and checkpoints as in real use (same process, same GIL).")
    print()
    print_table(results, naive_rate)
    print()
    print("latency of: 'item' = one submit call; '1000-item call' = one whole submit_many / batch call "
          f"(not per item). {fsync_note}")
    busy = [r for r in results if r.other_cpu is not None and r.other_cpu >= BUSY_CORES]
    if busy:
        print(f"WARNING: the machine was not quiet: other processes used >= {BUSY_CORES} CPU cores during "
              f"{', '.join(r.key for r in busy)}; rerun on an idle machine for numbers to compare.")
    tr = targets_report(by_key, naive_rate)
    if tr:
        print()
        print("Targets (items/s ratio to naive in this run):")
        for t in tr:
            ceil = (f"; the minimal writer ({t['ceiling']}) does {t['ceiling_ratio_to_naive']:.2f}x, "
                    f"walbatch reaches {t['fraction_of_ceiling']:.0%} of it") if t["ceiling"] else ""
            print(f"  {t['writer']:<42} {t['ratio_to_naive']:8.2f}x  target >= {t['target']:g}x  "
                  f"{'met' if t['met'] else 'MISSED'}{ceil}")
    notes = [(r.key, n) for r in results for n in r.notes]
    if notes:
        print()
        print("Notes:")
        for key, n in notes:
            print(f"  {key}: {n}")

    if args.json:
        doc = {"info": info, "naive_items_per_s": naive_rate,
               "results": [r.to_json(naive_rate) for r in results], "targets": tr}
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
