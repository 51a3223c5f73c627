#!/usr/bin/env python
"""End-to-end throughput into PostgreSQL: walbatch's sink vs one INSERT + COMMIT per item.

    python benchmarks/bench_postgresql.py [--seconds 10] [--dir DIR] [--methods-seconds 3] [--json FILE]

Starts its own PostgreSQL (tests/pg_server.py) with the server's durable defaults
(fsync=on, synchronous_commit=on, full_page_writes=on), its data directory next to
the walbatch logs under ``--dir`` (default: the current directory; avoid a tmpfs),
and measures, one after the other in the same run:

* ``per-item``: one connection, one ``INSERT ... ON CONFLICT DO NOTHING`` per item in
  autocommit (an INSERT + COMMIT each): the baseline every ratio is to. Also with 16
  threads, each with its own connection, where the server's commits share WAL flushes.
* ``walbatch``: DurableBatcher with the ``postgresql://`` sink URL (mode=columns, typed
  columns): items are fsync'd to the log, acknowledged, then COPYed in batches. The
  clock runs from the first submit until ``flush()`` returns, i.e. until every
  acknowledged item is committed in PostgreSQL, and the table's row count is checked.
  The log is kept small (``max_log_bytes``), so submitters block when the sink falls
  behind: the rate is the sustained end-to-end rate, not a burst into the log.

Then (``--methods-seconds``, 0 to skip) the write methods themselves, without the log:
500-row transactions into the same table (whose primary key is (_log_id, _seq)), each
method converting the same records: a bare COPY, COPY through a staging table into
INSERT ... ON CONFLICT DO NOTHING, unnest() and executemany; the sink on a first delivery
(a bare COPY) and on a retry (the staging path); and the sink's pool (1 vs 4
connections) under 4 writer threads.
Target: walbatch end-to-end >= 40x the per-item baseline (the best walbatch row).
"""

from __future__ import annotations

import argparse
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

import psycopg  # noqa: E402
from _e2e import BUSY_CORES, cpu_snapshot, drive, log_batcher, other_cpu_cores, threads_label  # noqa: E402
from _run import Target, document, now, print_targets, write_json  # noqa: E402
from pg_server import PostgresServer, require_bindir  # noqa: E402

from walbatch import Batch, Record  # noqa: E402
from walbatch.sinks.postgresql import PostgreSQLSink  # noqa: E402

TS = 1700000000.123
COLUMNS = "user_id:bigint,action:text,ts:double precision"
TARGET = 40.0
METHOD_BATCH = 500


def item(i: int) -> dict:
    return {"user_id": i, "action": "login", "ts": TS}


def create_table(conninfo: str, table: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f"CREATE TABLE {table} (_log_id uuid NOT NULL, _seq bigint NOT NULL, "
                  "user_id bigint, action text, ts double precision, PRIMARY KEY (_log_id, _seq))")


def count(conninfo: str, table: str) -> int:
    with psycopg.connect(conninfo) as c:
        return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# -------------------------------------------------------------- per item


def per_item(server: PostgresServer, seconds: float, threads: int) -> dict:
    table = f"per_item_{threads}"
    create_table(server.conninfo, table)
    log_id = str(uuid.uuid4())
    counts = [0] * threads
    sql = (f"INSERT INTO {table} (_log_id, _seq, user_id, action, ts) VALUES (%s, %s, %s, %s, %s) "
           "ON CONFLICT (_log_id, _seq) DO NOTHING")
    start = threading.Barrier(threads + 1)
    end_at = [0.0]

    def run(t: int) -> None:
        with psycopg.connect(server.conninfo, autocommit=True) as c:  # each INSERT commits
            cur = c.cursor()
            start.wait()
            n, seq = 0, t << 40
            while time.perf_counter() < end_at[0]:
                it = item(n)
                cur.execute(sql, (log_id, seq + n, it["user_id"], it["action"], it["ts"]))
                n += 1
            counts[t] = n

    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    end_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for th in ths:
        th.join()
    elapsed = time.perf_counter() - t0
    n = sum(counts)
    assert count(server.conninfo, table) == n
    return {"writer": f"per-item INSERT + COMMIT, {threads} thread{'s' if threads > 1 else ''}",
            "items": n, "seconds": elapsed, "items_per_s": n / elapsed}


# -------------------------------------------------------------- walbatch


def walbatch_run(server: PostgresServer, base: str, seconds: float, *, threads: int, many: int,
                 flush_concurrency: int, max_items: int, jsonb: bool = False) -> dict:
    table = f"wb_{threads}t_{many}_{flush_concurrency}c_{max_items}{'_jsonb' if jsonb else ''}"
    mode = {"mode": "jsonb"} if jsonb else {"columns": COLUMNS}
    url = server.url(table=table, create="1", pool=str(flush_concurrency), **mode)
    with log_batcher(base, url, max_items=max_items, max_delay=0.05,
                     flush_concurrency=flush_concurrency) as b:
        d = drive(b, seconds, threads=threads, many=many, make_item=item)
    stored = count(server.conninfo, table)
    assert stored == d.items == d.stats.delivered, (stored, d.items, d.stats)
    how = (f"submit_many({many})" if many > 1 else "submit()") + f", {threads_label(threads)}"
    how += f", max_items={max_items}, flush_concurrency={flush_concurrency}"
    return {"writer": f"walbatch {how}{', mode=jsonb' if jsonb else ''}",
            "items": d.items, "seconds": d.seconds, "items_per_s": d.items_per_s,
            "drain_s": d.drain}


# ------------------------------------------------------- write methods


def methods(server: PostgresServer, seconds: float) -> list[dict]:
    """500-row transactions with (_log_id, _seq) dedup: rows/s per method, same table shape."""
    out = []

    def measure(name: str, make: Callable[[str], Callable[[Batch], None]],
                writers: int = 1) -> None:
        table = f"m_{len(out)}"
        create_table(server.conninfo, table)
        write = make(table)
        log_id = str(uuid.uuid4())
        counts = [0] * writers
        end_at = time.perf_counter() + seconds

        def run(t: int) -> None:
            seq = (t << 40) + 1
            while time.perf_counter() < end_at:
                # What the flusher hands a sink; every method converts it itself (timed).
                write(Batch([Record(seq + i, item(i)) for i in range(METHOD_BATCH)], log_id, "size"))
                seq += METHOD_BATCH
                counts[t] += METHOD_BATCH

        t0 = time.perf_counter()
        ths = [threading.Thread(target=run, args=(t,)) for t in range(writers)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        elapsed = time.perf_counter() - t0
        assert count(server.conninfo, table) == sum(counts), name
        out.append({"method": name, "rows_per_s": sum(counts) / elapsed})

    def tuples(batch: Batch) -> list[tuple]:
        log_id = batch.log_id
        return [(log_id, r.seq, r.item.get("user_id"), r.item.get("action"), r.item.get("ts"))
                for r in batch]

    def conn() -> psycopg.Connection:
        return psycopg.connect(server.conninfo, autocommit=True)

    def sink_write(pool: int, attempt: int = 1) -> Callable[[str], Callable[[Batch], None]]:
        def make(table: str) -> Callable[[Batch], None]:
            sink = PostgreSQLSink(server.conninfo, table=table, columns="user_id,action,ts",
                                  pool=pool)

            def write(batch: Batch) -> None:
                batch.attempt = attempt
                assert sink.write(batch) is None
            return write
        return make

    def copy_direct(table: str) -> Callable[[Batch], None]:
        c = conn()

        def write(batch: Batch) -> None:
            rows = tuples(batch)
            with c.transaction(), c.cursor().copy(f"COPY {table} FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
        return write

    def via_staging(move: str) -> Callable[[str], Callable[[Batch], None]]:
        """COPY into a temp staging table, then ``move`` (SQL with {table}) into the target."""
        def make(table: str) -> Callable[[Batch], None]:
            c = conn()
            c.execute(f"CREATE TEMP TABLE st ON COMMIT DELETE ROWS AS SELECT * FROM {table} "
                      "WITH NO DATA")

            def write(batch: Batch) -> None:
                rows = tuples(batch)
                with c.transaction():
                    cur = c.cursor()
                    with cur.copy("COPY st FROM STDIN") as cp:
                        for r in rows:
                            cp.write_row(r)
                    cur.execute(move.format(table=table))
            return write
        return make

    copy_stage = via_staging("INSERT INTO {table} SELECT * FROM st "
                             "ON CONFLICT (_log_id, _seq) DO NOTHING")
    copy_move = via_staging("WITH m AS (DELETE FROM st RETURNING *) INSERT INTO {table} "
                            "SELECT * FROM m ON CONFLICT (_log_id, _seq) DO NOTHING")

    def unnest(table: str) -> Callable[[Batch], None]:
        c = conn()

        def write(batch: Batch) -> None:
            rows = tuples(batch)
            cols = [list(col) for col in zip(*rows, strict=True)]
            with c.transaction():
                c.execute(f"INSERT INTO {table} SELECT * FROM unnest(%s::uuid[], %s::bigint[], "
                          "%s::bigint[], %s::text[], %s::float8[]) "
                          "ON CONFLICT (_log_id, _seq) DO NOTHING", cols)
        return write

    def executemany(table: str) -> Callable[[Batch], None]:
        c = conn()

        def write(batch: Batch) -> None:
            rows = tuples(batch)
            with c.transaction():
                c.cursor().executemany(f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s) "
                                       "ON CONFLICT (_log_id, _seq) DO NOTHING", rows)
        return write

    measure("COPY straight into the table (the key rejects duplicates)", copy_direct)
    measure("COPY to staging + INSERT..SELECT ON CONFLICT DO NOTHING", copy_stage)
    measure("COPY to staging + DELETE..RETURNING into INSERT ON CONFLICT", copy_move)
    measure("INSERT..SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING", unnest)
    measure("executemany INSERT ON CONFLICT DO NOTHING (pipelined)", executemany)
    measure("PostgreSQLSink.write, first delivery (COPY straight in)", sink_write(1))
    measure("PostgreSQLSink.write, a retry (staging, DELETE..RETURNING)", sink_write(1, 2))
    measure("PostgreSQLSink.write, 4 writer threads, pool=1 (one connection)", sink_write(1),
            writers=4)
    measure("PostgreSQLSink.write, 4 writer threads, pool=4", sink_write(4), writers=4)
    return out


# ---------------------------------------------------------------- main


WALBATCH_ROWS = (  # key, threads, many, flush_concurrency, max_items, jsonb
    ("walbatch-many", 1, 1000, 1, 500, False),
    ("walbatch-many-c4", 1, 1000, 4, 500, False),
    ("walbatch-many-5000", 1, 1000, 1, 5000, False),
    ("walbatch-many-jsonb", 1, 1000, 1, 500, True),
    ("walbatch-16t", 16, 1, 1, 500, False),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per row (default 10)")
    ap.add_argument("--methods-seconds", type=float, default=3.0,
                    help="per write-method row (0: skip that table)")
    ap.add_argument("--dir", default=".", help="where the server's data and the logs go")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.methods_seconds < 0:
        ap.error("--seconds must be positive and --methods-seconds not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    started = now()
    args = parse_args(argv)
    bindir = require_bindir()
    os.makedirs(args.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="walbatch-bench-", dir=args.dir)
    os.chmod(base, 0o755)  # the server may run as another user (root cannot run it)
    server = PostgresServer(bindir, base_dir=base, fsync=True)
    try:
        server.start()
        pm = server.proc.pid if server.proc else None

        def timed(key: str, fn: Callable[[], dict]) -> dict:
            before = cpu_snapshot(pm, session=True)
            row = fn()
            other = other_cpu_cores(before, pm, session=True)
            row.update(key=key, other_cores=None if other is None else round(other, 3))
            print(f"  {key}: {row['items_per_s']:,.0f} items/s", file=sys.stderr, flush=True)
            return row

        baseline = timed("per-item", partial(per_item, server, args.seconds, 1))
        rows = [baseline, timed("per-item-16t", partial(per_item, server, args.seconds, 16))]
        for key, threads, many, conc, max_items, jsonb in WALBATCH_ROWS:
            rows.append(timed(key, partial(
                walbatch_run, server, base, args.seconds, threads=threads, many=many,
                flush_concurrency=conc, max_items=max_items, jsonb=jsonb)))
        table = methods(server, args.methods_seconds) if args.methods_seconds > 0 else []
        version = psycopg.connect(server.conninfo).execute("SHOW server_version").fetchone()[0]
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    for r in rows:
        r["x_per_item"] = round(r["items_per_s"] / baseline["items_per_s"], 3)
        r["items_per_s"] = round(r["items_per_s"], 1)
    best = max((r for r in rows if r["key"].startswith("walbatch")), key=lambda r: r["x_per_item"])
    targets = [Target("PostgreSQL sink end to end", best["x_per_item"], TARGET, "ratio",
                      "per-item INSERT+COMMIT",
                      detail=f"best row {best['key']}: {best['items_per_s']:,.0f} vs "
                             f"{baseline['items_per_s']:,.0f} items/s")]
    print(f"PostgreSQL {version}, fsync=on, synchronous_commit=on; {args.seconds:g} s per row; "
          f"every counted item is committed in PostgreSQL")
    print(f"| {'writer':<86} | {'items/s':>9} | {'x per-item':>10} | {'drain s':>7} |")
    print(f"|{'-' * 88}|{'-' * 10}:|{'-' * 11}:|{'-' * 8}:|")
    for r in rows:
        drain = f"{r['drain_s']:.1f}" if "drain_s" in r else "—"
        print(f"| {r['writer']:<86} | {r['items_per_s']:>9,.0f} | {r['x_per_item']:>9.1f}x | "
              f"{drain:>7} |")
    for r in rows:
        if r["other_cores"] is not None and r["other_cores"] >= BUSY_CORES:
            print(f"WARNING: other processes kept {r['other_cores']:.2f} CPU cores busy during "
                  f"'{r['writer']}': rerun on an idle machine")
    print_targets(targets)
    if table:
        print()
        print(f"Write methods, {METHOD_BATCH}-row transactions, primary key (_log_id, _seq), "
              f"{args.methods_seconds:g} s each:")
        print(f"| {'method':<64} | {'rows/s':>9} |")
        print(f"|{'-' * 66}|{'-' * 10}:|")
        for m in table:
            print(f"| {m['method']:<64} | {m['rows_per_s']:>9,.0f} |")
    write_json(document("postgresql", args.dir, rows, targets, started=started, script=__file__,
                        argv=argv and [__file__, *argv], postgresql=version, methods=table,
                        settings={"seconds_per_row": args.seconds, "methods_seconds": args.methods_seconds,
                                  "item": item(0), "columns": COLUMNS, "method_batch": METHOD_BATCH}),
               args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
