#!/usr/bin/env python
"""Does the default sink keep up? End to end into ``sqlite:`` vs one INSERT + COMMIT per item.

    python benchmarks/bench_sqlite.py [--seconds 10] [--dir DIR] [--only KEYS] [--json FILE]

One run, one disk (``--dir``; avoid a tmpfs), one row after the other:

* ``per-item``: stdlib sqlite3 with the sink's settings (WAL, synchronous=FULL), the
  sink's table (``_log_id, _seq, item`` JSON, primary key ``(_log_id, _seq)``), one
  ``INSERT .. ON CONFLICT DO NOTHING`` + ``COMMIT`` per item, 1 thread: the baseline.
* ``walbatch-many``: DurableBatcher with the default sink URL ``sqlite:///…?table=items``,
  ``submit_many(1000)`` from 1 thread (each list built inside the clock) for
  ``--seconds``; the clock stops when ``flush()`` returns, i.e. every acknowledged item
  is committed in SQLite (the row count is checked). The log is small (16 MiB), so the
  submitter blocks when the sink falls behind: the sustained rate, not a burst.
* ``walbatch-16t``: the same with ``submit()`` from 16 threads.

Target: walbatch-many >= 30x per-item.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from _e2e import BUSY_CORES, cpu_snapshot, drive, log_batcher, other_cpu_cores
from _run import Target, document, now, print_targets, write_json

from walbatch.values import dumps

TS = 1700000000.123
TARGET = 30.0


def make_item(i: int) -> dict[str, Any]:
    return {"user_id": i, "action": "login", "ts": TS}


def per_item(base: str, seconds: float) -> dict[str, Any]:
    path = os.path.join(base, "per-item.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE items (_log_id TEXT NOT NULL, _seq INTEGER NOT NULL, item TEXT NOT NULL, "
                 "PRIMARY KEY (_log_id, _seq))")
    log_id = str(uuid.uuid4())
    sql = "INSERT INTO items VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        n += 1
        conn.execute("BEGIN")
        conn.execute(sql, (log_id, n, dumps(make_item(n))))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    stored = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    conn.close()
    assert stored == n, (stored, n)
    return {"writer": "per item: INSERT + COMMIT (WAL, synchronous=FULL), 1 thread",
            "items": n, "seconds": elapsed}


def walbatch_run(base: str, seconds: float, *, threads: int, many: int) -> dict[str, Any]:
    db = os.path.join(base, f"wb-{threads}-{many}.db")
    url = f"sqlite:///{db}?table=items"
    with log_batcher(base, url, close_timeout=120) as b:
        d = drive(b, seconds, threads=threads, many=many, make_item=make_item,
                  stride=1_000_000_000, fresh=True)
    with sqlite3.connect(db) as c:
        stored = c.execute("SELECT count(*) FROM items").fetchone()[0]
    assert stored == d.items == d.stats.delivered, (stored, d.items, d.stats)
    how = f"submit_many({many}), 1 thread" if many > 1 else f"submit(), {threads} threads"
    return {"writer": f"walbatch {how}, sqlite: sink (default options)", "items": d.items,
            "seconds": d.seconds, "drain_s": round(d.drain, 3)}


ROWS: dict[str, Callable[[argparse.Namespace, str], dict[str, Any]]] = {
    "per-item": lambda a, base: per_item(base, a.seconds),
    "walbatch-many": lambda a, base: walbatch_run(base, a.seconds, threads=1, many=1000),
    "walbatch-16t": lambda a, base: walbatch_run(base, a.seconds, threads=16, many=1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="per row (default 10)")
    p.add_argument("--dir", default=".", help="where the logs and databases go (not a tmpfs)")
    p.add_argument("--only", default="",
                   help="comma-separated rows (per-item always runs): " + ", ".join(ROWS))
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout)")
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    args.keys = list(ROWS)
    if args.only:
        wanted = {k.strip() for k in args.only.split(",") if k.strip()}
        if wanted - set(ROWS):
            p.error(f"unknown rows: {', '.join(sorted(wanted - set(ROWS)))}; choose from {', '.join(ROWS)}")
        args.keys = [k for k in ROWS if k in wanted or k == "per-item"]
    return args


def main(argv: list[str] | None = None) -> int:
    started = now()
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="walbatch-bench-sqlite-", dir=args.dir)
    rows: list[dict[str, Any]] = []
    try:
        for key in args.keys:
            before = cpu_snapshot()
            r = ROWS[key](args, base)
            r["key"] = key
            r["items_per_s"] = round(r["items"] / r["seconds"], 1)
            other = other_cpu_cores(before)
            r["other_cores"] = None if other is None else round(other, 3)
            rows.append(r)
            print(f"  {key}: {r['items_per_s']:,.0f} items/s", file=sys.stderr, flush=True)
    finally:
        doc_dir = base
        shutil.rmtree(base, ignore_errors=True)
    baseline = rows[0]["items_per_s"]
    for r in rows:
        r["x_per_item"] = round(r["items_per_s"] / baseline, 3)
    many = next((r for r in rows if r["key"] == "walbatch-many"), None)
    targets = [Target("sqlite: sink end to end, submit_many(1000)", many and many["x_per_item"], TARGET,
                      "ratio", "per-item INSERT+COMMIT",
                      detail=f"{many['items_per_s']:,.0f} vs {baseline:,.0f} items/s" if many else "")]
    print(f"| {'writer':<72} | {'items/s':>9} | {'x per-item':>10} | {'drain s':>7} |")
    print(f"|{'-' * 74}|{'-' * 10}:|{'-' * 11}:|{'-' * 8}:|")
    for r in rows:
        drain = f"{r['drain_s']:.2f}" if "drain_s" in r else "—"
        print(f"| {r['writer']:<72} | {r['items_per_s']:>9,.0f} | {r['x_per_item']:>9.1f}x | {drain:>7} |")
    for r in rows:
        if r["other_cores"] is not None and r["other_cores"] >= BUSY_CORES:
            print(f"WARNING: other processes kept {r['other_cores']:.2f} CPU cores busy during {r['key']}")
    print_targets(targets)
    write_json(document("sqlite", doc_dir, rows, targets, started=started, script=__file__,
                        argv=argv and [__file__, *argv],
                        settings={"seconds_per_row": args.seconds, "item": make_item(0)}), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
