"""Daemon throughput: `walbatch serve` over its Unix socket vs the embedded API, one run.

    python benchmarks/bench_daemon.py [--seconds 3] [--dir DIR] [--json FILE]

Rows: the embedded `submit_many(1000)` baseline (same disk, same process kind), then the
daemon fed by 1 and by 8 client *processes*, with one item per request (pipelined, up to
256 requests in flight per client) and with batches of 1,000 items per request (up to 8 in
flight). Every answer the clients count came after the daemon's fsync. The daemon's sink is
a no-op (`benchmarks/_nullsink.py`): this measures the acknowledged-write path.
Targets: 8 client processes sending one item per request (each pipelining up
to 256 requests, on the same 2 cores as the daemon) >= 75k items/s; pipelined 1,000-item
requests (the better of 1 and 8 clients) >= 70% of embedded submit_many.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

from _e2e import BUSY_CORES, cpu_snapshot, other_cpu_cores
from _run import Target, document, now, print_targets, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ONE_ITEM_RATE = 75_000.0
BATCH_FRACTION = 0.70
ONE_ITEM_WINDOW = 256
BATCH_WINDOW = 8
ITEM = {"user_id": 1, "action": "login", "ts": 1700000000.123}

CLIENT = textwrap.dedent("""
    import json, sys, time
    from collections import deque
    from walbatch import Client
    sock, seconds, batch, window = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    item = {"user_id": 1, "action": "login", "ts": 1700000000.123}
    c = Client(sock)
    c.ping()
    payload = [item] * batch
    inflight = deque()
    acked = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        now = time.perf_counter()
        if now < end and len(inflight) < window:
            inflight.append(c.submit_async(item) if batch == 1 else c.submit_many_async(payload))
            continue
        if not inflight:
            break
        resp = inflight.popleft().result(60)
        assert resp["ok"], resp
        acked += resp["count"]
    elapsed = time.perf_counter() - start
    c.close()
    print(json.dumps({"items": acked, "seconds": elapsed}))
""")


def embedded(directory: str, seconds: float) -> float:
    from walbatch import DurableBatcher

    batch = [ITEM] * 1000
    with DurableBatcher(directory, lambda b: None, max_delay=0.05) as b:
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            b.submit_many(batch)
            n += 1000
        elapsed = time.perf_counter() - start
    return n / elapsed


def daemon_run(base: str, seconds: float, clients: int, batch: int, window: int) -> dict:
    data = tempfile.mkdtemp(dir=base)
    sock = os.path.join(tempfile.mkdtemp(dir="/tmp"), "wb.sock")
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen(
        [sys.executable, "-m", "walbatch", "serve", "--data-dir", data, "--socket", sock,
         "--sink", "_nullsink:sink", "--max-delay", "0.05", "--log-level", "warning"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("walbatch serve did not start")
            time.sleep(0.02)
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, sock, str(seconds), str(batch),
                                   str(window)], stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(clients)]
        results = [json.loads(p.communicate(timeout=seconds + 120)[0]) for p in procs]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(os.path.dirname(sock), ignore_errors=True)
    items = sum(r["items"] for r in results)
    elapsed = max(r["seconds"] for r in results)
    return {"clients": clients, "batch": batch, "items_per_s": items / elapsed, "items": items}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per row (default 3)")
    ap.add_argument("--dir", default=".", help="where the logs go (the disk under test)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout)")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    started = now()
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="walbatch-bench-", dir=args.dir)
    rows: list[dict[str, Any]] = []

    def timed(key: str, writer: str, fn: Any) -> dict[str, Any]:
        before = cpu_snapshot()
        r = fn()
        other = other_cpu_cores(before)
        r.update(key=key, writer=writer, other_cores=None if other is None else round(other, 3))
        r["items_per_s"] = round(r["items_per_s"], 1)
        rows.append(r)
        print(f"  {key}: {r['items_per_s']:,.0f} items/s", file=sys.stderr, flush=True)
        return r

    try:
        emb = timed("embedded", "embedded submit_many(1000), 1 thread",
                    lambda: {"items_per_s": embedded(os.path.join(base, "embedded"), args.seconds)})
        for clients in (1, 8):
            for batch in (1, 1000):
                window = ONE_ITEM_WINDOW if batch == 1 else BATCH_WINDOW
                what = "1 item" if batch == 1 else "1,000 items"
                timed(f"daemon-{clients}c-{batch}",
                      f"daemon, {clients} client process{'es' if clients > 1 else ''}, {what} per request "
                      f"(up to {window} in flight)",
                      lambda c=clients, b=batch, w=window: daemon_run(base, args.seconds, c, b, w))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    base_rate = emb["items_per_s"]
    for r in rows:
        r["x_embedded"] = round(r["items_per_s"] / base_rate, 4)
    by_key = {r["key"]: r for r in rows}
    one = by_key["daemon-8c-1"]
    best = max((by_key["daemon-1c-1000"], by_key["daemon-8c-1000"]), key=lambda r: r["items_per_s"])
    targets = [
        Target("daemon, 8 client processes, 1 item per request", one["items_per_s"], ONE_ITEM_RATE, "rate",
               "items/s", detail=f"clients and daemon on the same {os.cpu_count()} cores"),
        Target("daemon, pipelined 1,000-item requests", best["x_embedded"], BATCH_FRACTION, "fraction",
               "of embedded submit_many(1000)",
               detail=f"{best['key']}: {best['items_per_s']:,.0f} vs {base_rate:,.0f} items/s embedded"),
    ]
    print("walbatch daemon vs embedded (no-op sink; every counted item was fsync'd)")
    print(f"{'writer':<72} {'items/s':>12} {'vs embedded':>12}")
    for r in rows:
        print(f"{r['writer']:<72} {r['items_per_s']:>12,.0f} {r['x_embedded']:>11.2f}x")
    for r in rows:
        if r["other_cores"] is not None and r["other_cores"] >= BUSY_CORES:
            print(f"WARNING: other processes kept {r['other_cores']:.2f} CPU cores busy during {r['key']}")
    print_targets(targets)
    write_json(document("daemon", args.dir, rows, targets, started=started, script=__file__,
                        argv=argv and [__file__, *argv],
                        settings={"seconds_per_row": args.seconds, "item": ITEM,
                                  "sink": "no-op (benchmarks/_nullsink.py)"}), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
