#!/usr/bin/env python
"""End-to-end throughput into an HTTP bulk API: walbatch's http sink vs one POST per item.

    python benchmarks/bench_http.py [--seconds 10] [--dir DIR] [--only KEYS] [--json FILE]

Starts a local bulk endpoint in a separate process (so it does not share the
GIL with the client): Python's ThreadingHTTPServer speaking HTTP/1.1 keep-alive,
which for every POST decompresses the body (gzip or zstd), parses every NDJSON
line with json.loads, and counts the lines of each Idempotency-Key once. Then,
one after the other in the same run:

* ``per-item-1t``: one thread, one keep-alive connection, one POST (one JSON line,
  its own Idempotency-Key) per item, answered 2xx before the next: the baseline
  every ratio is to. ``per-item-16t``: the same from 16 threads, a connection each.
* ``walbatch-*``: DurableBatcher with the ``http://`` sink URL: items are fsync'd to
  the log, acknowledged, then POSTed in batches (default options: 500 items,
  1 MiB, 200 ms). The clock runs from the first submit until ``flush()`` returns,
  i.e. until the server has answered 2xx for every acknowledged item, and the
  server's count is checked. The log is kept small (``max_log_bytes``), so
  submitters block when the sink falls behind: the rate is the sustained
  end-to-end rate, not a burst into the log.

Items are small dicts, ``{"user_id": i, "action": "login", "ts": 1700000000.123}``.
Run it on an otherwise idle machine; rows that another process disturbed get a
WARNING (same check as bench_submit.py).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _e2e import BUSY_CORES, cpu_snapshot, drive, log_batcher, other_cpu_cores, threads_label  # noqa: E402
from _run import document, fs_type, now, write_json  # noqa: E402

TS = 1700000000.123


def make_item(i: int) -> dict[str, Any]:
    return {"user_id": i, "action": "login", "ts": TS}


# ------------------------------------------------------------------- the server


def serve() -> None:
    """Run the bulk endpoint on 127.0.0.1 (port printed on stdout) until stdin closes."""
    lock = threading.Lock()
    keys: set[str] = set()
    totals = {"items": 0, "requests": 0, "duplicates": 0, "wire_bytes": 0}
    local = threading.local()

    def decompress(enc: str | None, body: bytes) -> bytes:
        if enc == "gzip":
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if enc == "zstd":
            d = getattr(local, "zstd", None)
            if d is None:
                import zstandard

                d = local.zstd = zstandard.ZstdDecompressor()
            return d.decompress(body)
        return body

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes

        def do_POST(self) -> None:  # noqa: N802
            wire = self.rfile.read(int(self.headers["Content-Length"]))
            body = decompress(self.headers.get("Content-Encoding"), wire)
            lines = body.splitlines()
            for line in lines:
                json.loads(line)  # a real API parses what it takes
            key = self.headers.get("Idempotency-Key", "")
            with lock:
                totals["requests"] += 1
                totals["wire_bytes"] += len(wire)
                if key in keys:
                    totals["duplicates"] += 1
                else:
                    keys.add(key)
                    totals["items"] += len(lines)
            self._reply(b'{"ok":true}')

        def do_GET(self) -> None:  # noqa: N802
            with lock:
                self._reply(json.dumps(totals).encode())

        def _reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # the default 5 resets some of 16 simultaneous connects

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()  # the parent closes it (or dies): stop


class Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def totals(self) -> dict[str, int]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def cpu_seconds(self) -> float | None:
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return None

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


# ----------------------------------------------------------------------- rows


def per_item(server: Server, seconds: float, threads: int, base: str) -> dict[str, Any]:
    counts = [0] * threads
    errors: list[BaseException] = []
    clock: dict[str, float] = {}
    barrier = threading.Barrier(threads, action=lambda: clock.setdefault("start", time.perf_counter()))
    path = f"/per-item/{threads}"

    def run(tid: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        n = 0
        try:
            barrier.wait()
            deadline = clock["start"] + seconds
            while time.perf_counter() < deadline:
                i = tid * 1_000_000_000 + n
                body = json.dumps(make_item(i), separators=(",", ":")).encode() + b"\n"
                conn.request("POST", path, body=body, headers={
                    "Content-Type": "application/x-ndjson", "Idempotency-Key": f"{base}:{i}"})
                resp = conn.getresponse()
                resp.read()
                if not 200 <= resp.status < 300:
                    raise RuntimeError(f"HTTP {resp.status}")
                n += 1
        except BaseException as ex:
            errors.append(ex)
            barrier.abort()
        finally:
            counts[tid] = n
            conn.close()

    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    elapsed = time.perf_counter() - clock["start"]
    if errors:
        raise errors[0]
    n = sum(counts)
    return {"writer": f"one POST per item, {threads} thread{'s' if threads > 1 else ''}",
            "items": n, "seconds": elapsed, "requests": n, "wire_bytes": None}


def walbatch_run(server: Server, workdir: str, seconds: float, *, threads: int, many: int,
                 query: str = "", flush_concurrency: int = 1, label: str = "") -> dict[str, Any]:
    url = f"{server.url}/bulk{query}"
    before = server.totals()["items"]
    with log_batcher(workdir, url, close_timeout=60, flush_concurrency=flush_concurrency) as b:
        d = drive(b, seconds, threads=threads, many=many, make_item=make_item,
                  stride=1_000_000_000, fresh=True)
        sink_stats = b._sink.stats() if hasattr(b, "_sink") else None
    n = d.items
    got = server.totals()["items"] - before
    if got != n:
        raise RuntimeError(f"the server counted {got} items, {n} were acknowledged")
    how = (f"submit_many({many})" if many > 1 else "submit()") + f", {threads_label(threads)}"
    return {"writer": f"walbatch {how}, http sink{label}", "items": n, "seconds": d.seconds,
            "requests": sink_stats["requests"] if sink_stats else None,
            "wire_bytes": sink_stats["bytes_sent"] if sink_stats else None,
            "raw_bytes": sink_stats["bytes_raw"] if sink_stats else None,
            "retries": d.stats.retries, "batches": sum(d.stats.batches_by_reason.values()),
            "drain": d.drain}


ROWS: dict[str, Callable[[Server, argparse.Namespace, str], dict[str, Any]]] = {
    "per-item-1t": lambda s, a, w: per_item(s, a.seconds, 1, "p1"),
    "per-item-16t": lambda s, a, w: per_item(s, a.seconds, 16, "p16"),
    "walbatch-16t": lambda s, a, w: walbatch_run(s, w, a.seconds, threads=16, many=1,
                                                 label=" (gzip)"),
    "walbatch-many": lambda s, a, w: walbatch_run(s, w, a.seconds, threads=1, many=1000,
                                                  label=" (gzip)"),
    "walbatch-many-zstd": lambda s, a, w: walbatch_run(s, w, a.seconds, threads=1, many=1000,
                                                       query="?compress=zstd", label=" (zstd)"),
    "walbatch-many-none": lambda s, a, w: walbatch_run(s, w, a.seconds, threads=1, many=1000,
                                                       query="?compress=none",
                                                       label=" (no compression)"),
    "walbatch-many-c2": lambda s, a, w: walbatch_run(s, w, a.seconds, threads=1, many=1000,
                                                     flush_concurrency=2,
                                                     label=" (gzip, flush_concurrency=2)"),
}


def main(argv: list[str] | None = None) -> int:
    started = now()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each row (default 10)")
    p.add_argument("--dir", default=".", help="where to make the temp directory for the logs "
                   "(default: the current directory; avoid a tmpfs)")
    p.add_argument("--only", default="", help="comma-separated row keys (per-item-1t always runs): "
                   + ", ".join(ROWS))
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-' for stdout)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    keys = list(ROWS)
    if args.only:
        wanted = {k.strip() for k in args.only.split(",") if k.strip()}
        unknown = wanted - set(ROWS)
        if unknown:
            p.error(f"unknown rows: {', '.join(sorted(unknown))}")
        keys = [k for k in ROWS if k in wanted or k == "per-item-1t"]
    os.makedirs(args.dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="walbatch-bench-http-", dir=args.dir)
    print(f"# bench_http: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, logs on "
          f"{fs_type(workdir)}, {args.seconds:g} s per row", flush=True)
    server = Server()
    results: list[dict[str, Any]] = []
    try:
        for key in keys:
            before = cpu_snapshot()
            server_cpu = server.cpu_seconds()
            r = ROWS[key](server, args, workdir)
            r["key"] = key
            r["rate"] = r["items"] / r["seconds"]
            after_cpu = server.cpu_seconds()
            if server_cpu is not None and after_cpu is not None:
                r["server_cpu"] = (after_cpu - server_cpu) / r["seconds"]
            # The server is another process doing its share of the work: not a disturbance.
            other = other_cpu_cores(before)
            if other is not None and r.get("server_cpu") is not None:
                other -= r["server_cpu"]
            r["other_cores"] = None if other is None else round(other, 3)
            results.append(r)
            print(f"  {key}: {r['rate']:,.0f} items/s", flush=True)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    base = next(r["rate"] for r in results if r["key"] == "per-item-1t")
    print()
    print("| writer | items/s (2xx) | requests | items/request | wire bytes/item | server CPU "
          "| drain s | x per-item |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        reqs = r.get("requests")
        per_req = f"{r['items'] / reqs:,.0f}" if reqs else "—"
        wire = f"{r['wire_bytes'] / r['items']:.1f}" if r.get("wire_bytes") and r["items"] else "—"
        cpu = f"{r['server_cpu']:.2f}" if r.get("server_cpu") is not None else "—"
        drain = f"{r['drain']:.2f}" if r.get("drain") is not None else "—"
        ratio = r["rate"] / base
        name = r["writer"] if not r["key"].startswith("walbatch") else f"**{r['writer']}**"
        print(f"| {name} | {r['rate']:,.0f} | {reqs or 0:,} | {per_req} | {wire} | {cpu} | {drain} | "
              f"{'**' if ratio >= 2 else ''}{ratio:,.2f}x{'**' if ratio >= 2 else ''} |")
    print()
    print("items/s: acknowledged items the server answered 2xx for / seconds from the first submit "
          "until flush() returned (per-item rows: until the last POST's answer). server CPU: cores "
          "the server process used. drain s: how long the final flush() took after the submitting "
          "stopped. x per-item: ratio to one POST per item from one thread.")
    for r in results:
        if r.get("other_cores") is not None and r["other_cores"] >= BUSY_CORES:
            print(f"WARNING: {r['key']}: other processes kept {r['other_cores']:.2f} CPU cores busy "
                  "during this row; its number is low")
    for r in results:
        r["items_per_s"] = round(r.pop("rate"), 1)
        r["x_per_item"] = round(r["items_per_s"] / base, 3)
        r["wire_bytes_per_item"] = round(r["wire_bytes"] / r["items"], 2) if r.get("wire_bytes") else None
    write_json(document("http", args.dir, results, [], started=started, script=__file__,
                        argv=argv and [__file__, *argv],
                        settings={"seconds_per_row": args.seconds, "item": make_item(0)}), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
