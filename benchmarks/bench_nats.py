#!/usr/bin/env python
"""End-to-end throughput into NATS JetStream: walbatch's sink vs one acked publish per item.

    python benchmarks/bench_nats.py [--seconds 10] [--methods-seconds 3] [--dir DIR] [--json FILE]

Starts its own ``nats-server -js`` (tests/nats_server.py) on loopback, its store under
``--dir`` (default: the current directory; avoid a tmpfs), one file-storage stream per row
with a 10-minute duplicate window, and measures one after the other in the same run:

* ``per-item``: one ``await js.publish(subject, payload, headers={"Nats-Msg-Id": ...})``
  per item, each waiting for its PubAck before the next (what an application that wants
  to know each item is stored does without walbatch). The baseline every ratio is to.
* ``walbatch``: DurableBatcher with the ``nats://`` sink URL. Items are fdatasync'd to the
  log, acknowledged, then published in batches. The clock runs from the first submit
  until ``flush()`` returns, i.e. until JetStream acked every acknowledged item; then the
  stream's message count is checked against the number submitted (exactly once). The
  log is kept small (``max_log_bytes``), so submitters block when the sink falls behind:
  the rate is the sustained end-to-end rate, not a burst into the log.

Then (``--methods-seconds``, 0 to skip) the publish methods alone, without the log, on
1,000-item batches: ``asyncio.gather`` over nats-py's ``js.publish`` (its own concurrent
way); nats-py's ``nc.publish`` with every reply on one inbox subscription (the lower
level, which the sink uses); and the sink's ``write`` (that, plus encoding, routing and
the size checks, behind its loop thread), from 1 and 2 threads.
Target: the best walbatch row >= 90% of the ceiling: nats-py publishing the
same 1,000-message batches with nothing else to do (the faster of its two methods
above), measured in the same run. ``--methods-seconds 0`` skips the ceiling, and the
target is then not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import nats  # noqa: E402
from _e2e import BUSY_CORES, cores, cpu_snapshot, drive, log_batcher, threads_label  # noqa: E402
from _run import Target, busy, document, now, print_targets, write_json  # noqa: E402
from nats.js.api import StorageType, StreamConfig  # noqa: E402
from nats_server import NatsServer, find_binary  # noqa: E402

from walbatch import Batch, Record  # noqa: E402
from walbatch.sinks.nats import encode_json, from_url  # noqa: E402

TS = 1700000000.123
TARGET = 0.90  # of the nats-py ceiling in the same run
WINDOW = 600.0  # the streams' duplicate window, seconds (the sink's default horizon)


def item(i: int) -> dict:
    return {"user_id": i, "action": "login", "ts": TS}


async def _stream(url: str, name: str, info: bool = False):
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=10)
        if info:
            return await js.stream_info(name)
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.in"],
                                         storage=StorageType.FILE, duplicate_window=WINDOW))
    finally:
        await nc.close()


def create_stream(url: str, name: str) -> None:
    asyncio.run(_stream(url, name))


def count(url: str, name: str) -> int:
    return asyncio.run(_stream(url, name, info=True)).state.messages


# -------------------------------------------------------------- per item


def per_item(server: NatsServer, seconds: float) -> dict:
    name = "PERITEM"
    create_stream(server.url, name)
    log_id = str(uuid.uuid4())

    async def run() -> tuple[int, float, list[float]]:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        subject, n, lat = f"{name.lower()}.in", 0, []
        t0 = time.perf_counter()
        end = t0 + seconds
        while (now := time.perf_counter()) < end:
            await js.publish(subject, encode_json(item(n)), headers={"Nats-Msg-Id": f"{log_id}:{n}"})
            lat.append(time.perf_counter() - now)
            n += 1
        elapsed = time.perf_counter() - t0
        await nc.close()
        return n, elapsed, lat

    n, elapsed, lat = asyncio.run(run())
    assert count(server.url, name) == n
    lat.sort()
    return {"writer": "per-item: await js.publish(...) per item, 1 task", "items": n,
            "seconds": elapsed, "items_per_s": n / elapsed,
            "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


# -------------------------------------------------------------- walbatch


def walbatch_run(server: NatsServer, base: str, seconds: float, *, threads: int, many: int,
                 flush_concurrency: int, max_items: int) -> dict:
    name = f"WB{threads}T{many}M{flush_concurrency}C{max_items}"
    create_stream(server.url, name)
    url = f"{server.url}?stream={name}&subject={name.lower()}.in"
    with log_batcher(base, url, max_items=max_items, max_delay=0.05,
                     flush_concurrency=flush_concurrency) as b:
        d = drive(b, seconds, threads=threads, many=many, make_item=item)
    stored = count(server.url, name)
    assert d.stats.delivered == d.items and stored == d.items, (d.stats, stored, d.items)
    how = (f"submit_many({many})" if many > 1 else "submit()") + f", {threads_label(threads)}"
    return {"writer": f"walbatch: {how}, batches of {max_items}, flush_concurrency={flush_concurrency}",
            "items": d.items, "seconds": d.seconds, "items_per_s": d.items_per_s,
            "drain_s": d.drain, "retries": d.stats.retries}


# ------------------------------------------------------ publish methods alone


def method_gather(server: NatsServer, seconds: float, size: int = 1000) -> dict:
    name = "MGATHER"
    create_stream(server.url, name)
    log_id = str(uuid.uuid4())

    async def run() -> tuple[int, float]:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        subject, n = f"{name.lower()}.in", 0
        payloads = [encode_json(item(i)) for i in range(size)]
        t0 = time.perf_counter()
        while time.perf_counter() < t0 + seconds:
            await asyncio.gather(*[js.publish(subject, p, headers={"Nats-Msg-Id": f"{log_id}:{n + i}"})
                                   for i, p in enumerate(payloads)])
            n += size
        elapsed = time.perf_counter() - t0
        await nc.close()
        return n, elapsed

    n, elapsed = asyncio.run(run())
    assert count(server.url, name) == n
    return {"method": f"asyncio.gather(js.publish x {size}) per batch", "items_per_s": n / elapsed}


def method_inbox(server: NatsServer, seconds: float, size: int = 1000) -> dict:
    """nats-py's lower level: nc.publish with a reply subject on one inbox subscription.

    What the sink does (walbatch/sinks/nats.py ``_publish``); nats-py's per-reply path
    (parser, Msg, queue, callback task) is its cost per message.
    """
    name = "MINBOX"
    create_stream(server.url, name)
    log_id = str(uuid.uuid4())

    async def run() -> tuple[int, float]:
        nc = await nats.connect(server.url, skip_subject_validation=True)
        subject, n, prefix = f"{name.lower()}.in", 0, nc.new_inbox()
        loop = asyncio.get_running_loop()
        state: dict = {}

        async def on_reply(msg) -> None:
            left = state["left"] = state["left"] - 1
            if b'"error"' in msg.data or not msg.data:
                state["errors"] += 1
            if left == 0:
                state["done"].set_result(None)

        await nc.subscribe(prefix + ".>", cb=on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1)
        payloads = [encode_json(item(i)) for i in range(size)]
        t0 = time.perf_counter()
        while time.perf_counter() < t0 + seconds:
            state.update(left=size, errors=0, done=loop.create_future())
            for i, p in enumerate(payloads):
                await nc.publish(subject, p, reply=f"{prefix}.{i}",
                                 headers={"Nats-Msg-Id": f"{log_id}:{n + i}"})
            await asyncio.wait_for(state["done"], 30)
            assert state["errors"] == 0
            n += size
        elapsed = time.perf_counter() - t0
        await nc.close()
        return n, elapsed

    n, elapsed = asyncio.run(run())
    assert count(server.url, name) == n
    return {"method": f"nats-py nc.publish x {size} + one reply inbox", "items_per_s": n / elapsed}


def method_sink(server: NatsServer, seconds: float, size: int = 1000, threads: int = 1) -> dict:
    name = f"MSINK{threads}"
    create_stream(server.url, name)
    sink = from_url(f"{server.url}?stream={name}&subject={name.lower()}.in")
    log_id = str(uuid.uuid4())
    counts = [0] * threads
    end = time.perf_counter() + seconds

    def run(t: int) -> None:
        seq = 1 + (t << 40)
        while time.perf_counter() < end:
            # Encoding is inside write(), as in real use; building the Records is not.
            batch = Batch([Record(seq + i, item(i)) for i in range(size)], log_id, "size")
            assert sink.write(batch) is None
            seq += size
            counts[t] += size

    t0 = time.perf_counter()
    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    elapsed = time.perf_counter() - t0
    sink.close()
    assert count(server.url, name) == sum(counts)
    return {"method": f"NATSSink.write({size}-item batch), {threads} thread{'s' if threads > 1 else ''}",
            "items_per_s": sum(counts) / elapsed}


# ------------------------------------------------------------------ main


def _cores(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


WALBATCH_ROWS = (  # key, threads, many, flush_concurrency, max_items
    ("walbatch-many", 1, 1000, 1, 1000),
    ("walbatch-many-c2", 1, 1000, 2, 1000),
    ("walbatch-many-5000-c2", 1, 1000, 2, 5000),
    ("walbatch-16t", 16, 1, 2, 1000),
)
CEILINGS = ("nats-py-gather", "nats-py-inbox")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per row (default 10)")
    ap.add_argument("--methods-seconds", type=float, default=3.0,
                    help="per publish-method row, the ceiling among them (0: skip that table)")
    ap.add_argument("--dir", default=".", help="where the server's store and the logs go")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.methods_seconds < 0:
        ap.error("--seconds must be positive and --methods-seconds not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    started = now()
    args = parse_args(argv)
    binary = find_binary()
    if binary is None:
        sys.exit("nats-server not found on PATH, /usr/sbin or /usr/local/bin")
    os.makedirs(args.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="walbatch-bench-", dir=args.dir)
    server = NatsServer(binary, store_dir=os.path.join(base, "nats"))
    os.makedirs(server.store_dir)
    try:
        server.start()
        pid = server.proc.pid if server.proc else None

        def timed(key: str, fn: Callable[[], dict]) -> dict:
            before = cpu_snapshot(pid)
            row = fn()
            other, srv = cores(before, cpu_snapshot(pid))
            row.update(key=key, other_cores=None if other is None else round(other, 3),
                       server_cores=None if srv is None else round(srv, 3))
            row["items_per_s"] = round(row["items_per_s"], 1)
            print(f"  {key}: {row['items_per_s']:,.0f} items/s", file=sys.stderr, flush=True)
            return row

        baseline = timed("per-item", partial(per_item, server, args.seconds))
        rows = [baseline]
        for key, threads, many, conc, max_items in WALBATCH_ROWS:
            rows.append(timed(key, partial(walbatch_run, server, base, args.seconds, threads=threads,
                                           many=many, flush_concurrency=conc, max_items=max_items)))
        table = []
        if args.methods_seconds > 0:
            table = [timed("nats-py-gather", partial(method_gather, server, args.methods_seconds)),
                     timed("nats-py-inbox", partial(method_inbox, server, args.methods_seconds)),
                     timed("sink-1t", partial(method_sink, server, args.methods_seconds)),
                     timed("sink-2t", partial(method_sink, server, args.methods_seconds, threads=2))]
        version = server_version(binary)
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    for r in rows:
        r["x_per_item"] = round(r["items_per_s"] / baseline["items_per_s"], 3)
    best = max((r for r in rows if r["key"].startswith("walbatch")), key=lambda r: r["items_per_s"])
    ceiling = max((m for m in table if m["key"] in CEILINGS), key=lambda m: m["items_per_s"], default=None)
    for r in rows:
        r["fraction_of_ceiling"] = round(r["items_per_s"] / ceiling["items_per_s"], 4) if ceiling else None
    targets = [Target("JetStream sink end to end", best["fraction_of_ceiling"], TARGET, "fraction",
                      "of nats-py alone",
                      detail=(f"best row {best['key']}: {best['items_per_s']:,.0f} vs {ceiling['key']} "
                              f"{ceiling['items_per_s']:,.0f} items/s (1,000-message batches, no log)")
                      if ceiling else "the ceiling was not measured (--methods-seconds 0)")]
    print(f"nats-server -js ({version}), file storage, one node on loopback; {args.seconds:g} s per "
          f"row; every counted item was acked by JetStream and the stream holds each once")
    print(f"| {'writer':<76} | {'items/s':>9} | {'x per-item':>10} | {'drain s':>7} | "
          f"{'server cores':>12} | {'other cores':>11} |")
    print(f"|{'-' * 78}|{'-' * 10}:|{'-' * 11}:|{'-' * 8}:|{'-' * 13}:|{'-' * 12}:|")
    for r in rows:
        drain = f"{r['drain_s']:.1f}" if "drain_s" in r else "—"
        print(f"| {r['writer']:<76} | {r['items_per_s']:>9,.0f} | {r['x_per_item']:>9.1f}x | "
              f"{drain:>7} | {_cores(r['server_cores']):>12} | {_cores(r['other_cores']):>11} |")
    print(f"per-item latency: p50 {baseline['p50_us']:.0f} µs, p99 {baseline['p99_us']:.0f} µs")
    for r in rows + table:
        if r["other_cores"] is not None and r["other_cores"] >= BUSY_CORES:
            print(f"WARNING: other processes kept {r['other_cores']:.2f} CPU cores busy during "
                  f"'{r.get('writer') or r.get('method')}': rerun on an idle machine")
    if table:
        print()
        print(f"Publish methods alone (no log), {args.methods_seconds:g} s each:")
        print(f"| {'method':<56} | {'items/s':>9} | {'server cores':>12} | {'other cores':>11} |")
        print(f"|{'-' * 58}|{'-' * 10}:|{'-' * 13}:|{'-' * 12}:|")
        for r in table:
            print(f"| {r['method']:<56} | {r['items_per_s']:>9,.0f} | "
                  f"{_cores(r['server_cores']):>12} | {_cores(r['other_cores']):>11} |")
    print_targets(targets)
    doc = document("nats", args.dir, rows, targets, started=started, script=__file__,
                   argv=argv and [__file__, *argv], nats_server=version, methods=table,
                   settings={"seconds_per_row": args.seconds, "methods_seconds": args.methods_seconds,
                             "item": item(0)})
    doc["busy"] = busy(rows + table)
    write_json(doc, args.json)
    return 0


def server_version(binary: str) -> str:
    import subprocess

    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "nats-server"
    except (OSError, subprocess.SubprocessError):
        return "nats-server"


if __name__ == "__main__":
    sys.exit(main())
