"""HTTP ingest (`walbatch serve --http`, POST /v1/items) next to the Unix socket, one run.

    python benchmarks/bench_http_ingest.py [--seconds 3] [--dir DIR] [--json FILE]

(run_all.py does not run it yet; its JSON follows benchmarks/_run.py like the others.)

Rows, each against a fresh `walbatch serve` (no-op sink, `benchmarks/_nullsink.py`) fed by
8 client *processes*:

- socket, 1,000 items per request, pipelined (up to 8 in flight per client): the reference;
- HTTP, NDJSON bodies of 1,000 items (`application/x-ndjson`), 4 keep-alive connections
  per client, one request in flight on each (HTTP/1.1 does not pipeline);
- HTTP, one JSON item per request, 16 connections per client;
- socket, one item per request, pipelined (up to 256 in flight per client), for scale.

Every counted item was answered 200 (or `ok`) after the daemon's fsync. HTTP clients use
aiohttp (walbatch[http]). Target: NDJSON batches reach >= 50% of the socket's
pipelined batches.
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
ITEM = {"user_id": 1, "action": "login", "ts": 1700000000.123}

SOCKET_CLIENT = textwrap.dedent("""
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
        if time.perf_counter() < end and len(inflight) < window:
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

HTTP_CLIENT = textwrap.dedent("""
    import asyncio, json, sys, time
    import aiohttp
    url, seconds, batch, conns = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    item = {"user_id": 1, "action": "login", "ts": 1700000000.123}
    if batch == 1:
        body, ctype = json.dumps(item).encode(), "application/json"
    else:
        body, ctype = "".join(json.dumps(item) + "\\n" for _ in range(batch)).encode(), "application/x-ndjson"
    headers = {"Content-Type": ctype}

    async def worker(session, end, counts):
        while time.perf_counter() < end:
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer
                counts[0] += answer["count"]

    async def main():
        counts = [0]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as s:
            async with s.get(url.replace("/v1/items", "/healthz")) as r:
                await r.read()
            start = time.perf_counter()
            await asyncio.gather(*(worker(s, start + seconds, counts) for _ in range(conns)))
            return counts[0], time.perf_counter() - start

    items, elapsed = asyncio.run(main())
    print(json.dumps({"items": items, "seconds": elapsed}))
""")


def run_row(base: str, seconds: float, transport: str, batch: int, per_client: int,
            clients: int = 8) -> dict:
    data = tempfile.mkdtemp(dir=base)
    sockdir = tempfile.mkdtemp(dir="/tmp")
    sock = os.path.join(sockdir, "wb.sock")
    log = os.path.join(sockdir, "serve.log")
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as logf:
        server = subprocess.Popen(
            [sys.executable, "-m", "walbatch", "serve", "--data-dir", data, "--socket", sock,
             "--sink", "_nullsink:sink", "--max-delay", "0.05", "--http", "127.0.0.1:0",
             "--log-format", "json", "--max-log-bytes", "8GiB"],
            env=env, stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            for line in open(log, errors="replace"):
                if '"event": "started"' in line:
                    port = int(json.loads(line)["http"].rsplit(":", 1)[1])
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"walbatch serve did not start:\n{open(log).read()[-2000:]}")
            time.sleep(0.02)
        if transport == "socket":
            cmd = [SOCKET_CLIENT, sock, str(seconds), str(batch), str(per_client)]
        else:
            cmd = [HTTP_CLIENT, f"http://127.0.0.1:{port}/v1/items", str(seconds), str(batch),
                   str(per_client)]
        procs = [subprocess.Popen([sys.executable, "-c", *cmd], stdout=subprocess.PIPE, text=True,
                                  env=env) for _ in range(clients)]
        results = [json.loads(p.communicate(timeout=seconds + 120)[0]) for p in procs]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(sockdir, ignore_errors=True)
    items = sum(r["items"] for r in results)
    elapsed = max(r["seconds"] for r in results)
    return {"transport": transport, "clients": clients, "batch": batch, "per_client": per_client,
            "items_per_s": items / elapsed, "items": items}



BATCH_FRACTION = 0.5  # NDJSON batches >= 50% of the socket's pipelined batches
ROWS = [  # (key, transport, items per request, in flight or connections per client)
    ("socket-8c-1000", "socket", 1000, 8),
    ("http-8c-ndjson-1000", "http", 1000, 4),
    ("http-8c-json-1", "http", 1, 16),
    ("socket-8c-1", "socket", 1, 256),
]


def describe(transport: str, batch: int, per_client: int) -> str:
    if transport == "socket":
        what = "1,000 items" if batch > 1 else "1 item"
        return f"Unix socket, 8 client processes, {what} per request (up to {per_client} in flight)"
    what = "NDJSON 1,000 items" if batch > 1 else "JSON 1 item"
    return f"HTTP, 8 client processes, {what} per POST ({per_client} connections each)"


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
    try:
        for key, transport, batch, per_client in ROWS:
            before = cpu_snapshot()
            r = run_row(base, args.seconds, transport, batch, per_client)
            other = other_cpu_cores(before)
            r.update(key=key, writer=describe(transport, batch, per_client),
                     other_cores=None if other is None else round(other, 3),
                     items_per_s=round(r["items_per_s"], 1))
            rows.append(r)
            print(f"  {key}: {r['items_per_s']:,.0f} items/s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    reference = rows[0]["items_per_s"]
    for r in rows:
        r["x_socket_batches"] = round(r["items_per_s"] / reference, 4)
    ndjson = rows[1]
    targets = [Target("HTTP NDJSON 1,000-item POSTs", ndjson["x_socket_batches"], BATCH_FRACTION,
                      "fraction", "of the socket's pipelined 1,000-item requests",
                      detail=f"{ndjson['items_per_s']:,.0f} vs {reference:,.0f} items/s; clients "
                             f"and daemon on the same {os.cpu_count()} cores")]
    print("walbatch serve: HTTP ingest next to the Unix socket (no-op sink; every counted item "
          "was fsync'd)")
    print(f"{'writer':<80} {'items/s':>12} {'vs socket':>10}")
    for r in rows:
        print(f"{r['writer']:<80} {r['items_per_s']:>12,.0f} {r['x_socket_batches']:>9.2f}x")
    for r in rows:
        if r["other_cores"] is not None and r["other_cores"] >= BUSY_CORES:
            print(f"WARNING: other processes kept {r['other_cores']:.2f} CPU cores busy during {r['key']}")
    print_targets(targets)
    write_json(document("http_ingest", args.dir, rows, targets, started=started, script=__file__,
                        argv=argv and [__file__, *argv],
                        settings={"seconds_per_row": args.seconds, "item": ITEM,
                                  "sink": "no-op (benchmarks/_nullsink.py)"}), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
