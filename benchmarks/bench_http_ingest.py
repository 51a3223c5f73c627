"""HTTP ingest (`walbatch serve --http`, POST /v1/items) next to the Unix socket, one run.

    python benchmarks/bench_http_ingest.py [--seconds 3] [--dir DIR] [--json FILE]

Rows, each against a fresh `walbatch serve` (no-op sink, `benchmarks/_nullsink.py`) fed by
8 client *processes*:

- socket, 1,000 items per request, pipelined (up to 8 in flight per client): the reference;
- HTTP, NDJSON bodies of 1,000 items (`application/x-ndjson`), 4 keep-alive connections
  per client, one request in flight on each (HTTP/1.1 does not pipeline);
- HTTP, one JSON item per request, 16 connections per client;
- socket, one item per request, pipelined (up to 256 in flight per client), for scale.

Every counted item was answered 200 (or `ok`) after the daemon's fsync. HTTP clients use
aiohttp (walbatch[http]). Target (issue 12): NDJSON batches reach >= 50% of the socket's
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


ROWS = [("socket", 1000, 8), ("http", 1000, 4), ("http", 1, 16), ("socket", 1, 256)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--dir", default=".", help="where the logs go (the disk under test)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="walbatch-bench-", dir=args.dir)
    try:
        rows = [run_row(base, args.seconds, t, b, k) for t, b, k in ROWS]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    reference = rows[0]["items_per_s"]
    ratio = rows[1]["items_per_s"] / reference
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "http_ingest", "seconds": args.seconds, "rows": rows,
                       "ndjson_vs_socket_batches": ratio, "target": 0.5}, f, indent=2)
    print("walbatch serve: HTTP ingest next to the Unix socket (8 client processes, no-op sink; "
          "every counted item was fsync'd)")
    print(f"{'writer':<58} {'items/s':>12} {'vs socket batches':>18}")
    for r in rows:
        what = "1,000 items/request" if r["batch"] == 1000 else "1 item/request"
        how = (f"{r['per_client']} in flight" if r["transport"] == "socket"
               else f"{r['per_client']} connections")
        name = f"{r['transport']}, {what}, {how} per client"
        print(f"{name:<58} {r['items_per_s']:>12,.0f} {r['items_per_s'] / reference:>17.2f}x")
    verdict = "met" if ratio >= 0.5 else "NOT met"
    print(f"target: HTTP NDJSON 1,000-item POSTs >= 50% of the socket's pipelined batches: "
          f"{ratio:.0%} ({verdict})")


if __name__ == "__main__":
    main()
