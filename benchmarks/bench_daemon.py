"""Daemon throughput: `walbatch serve` over its Unix socket vs the embedded API, one run.

    python benchmarks/bench_daemon.py [--seconds 3] [--dir DIR] [--json]

Rows: the embedded `submit_many(1000)` baseline (same disk, same process kind), then the
daemon fed by 1 and by 8 client *processes*, with one item per request (pipelined, up to
256 requests in flight per client) and with batches of 1,000 items per request (up to 8 in
flight). Every answer the clients count came after the daemon's fsync. The daemon's sink is
a no-op (`benchmarks/_nullsink.py`): this measures the acknowledged-write path.
Target (issue 3): pipelined 1,000-item batches reach >= 50% of embedded submit_many.
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

HERE = os.path.dirname(os.path.abspath(__file__))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--dir", default=".", help="where the logs go (the disk under test)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="walbatch-bench-", dir=args.dir)
    try:
        base_rate = embedded(os.path.join(base, "embedded"), args.seconds)
        rows = [daemon_run(base, args.seconds, clients, batch, 256 if batch == 1 else 8)
                for clients in (1, 8) for batch in (1, 1000)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps({"embedded_submit_many_1000": base_rate, "daemon": rows}))
        return
    print("walbatch daemon vs embedded (no-op sink; every counted item was fsync'd)")
    print(f"{'writer':<44} {'items/s':>12} {'vs embedded':>12}")
    print(f"{'embedded submit_many(1000), 1 thread':<44} {base_rate:>12,.0f} {1:>11.2f}x")
    for r in rows:
        what = "1 item/request" if r["batch"] == 1 else "1,000 items/request"
        name = f"daemon, {r['clients']} client process{'es' if r['clients'] > 1 else ''}, {what}"
        print(f"{name:<44} {r['items_per_s']:>12,.0f} {r['items_per_s'] / base_rate:>11.2f}x")
    best = max(r["items_per_s"] for r in rows if r["batch"] == 1000)
    verdict = "met" if best >= 0.5 * base_rate else "NOT met"
    print(f"target: pipelined 1,000-item batches >= 50% of embedded submit_many: "
          f"{best / base_rate:.0%} ({verdict})")


if __name__ == "__main__":
    main()
