#!/usr/bin/env python
"""Exactly once for your own SQL: ApplySink with the seeds' UPDATE vs one UPDATE + COMMIT per item.

    python benchmarks/bench_apply.py [--seconds 10] [--users 100000] [--backends sqlite,postgresql]
                                     [--dir DIR] [--json FILE]

The seeds' statement, ``UPDATE users SET last_active_at = ? WHERE id = ?``, over a table
of ``--users`` users, each item naming a user spread over the whole table. For each
backend, on the same database, one row after the other in the same run:

* ``<backend>-per-item``: one UPDATE + COMMIT per item, 1 thread (SQLite: WAL,
  synchronous=FULL, as ApplySink sets it; PostgreSQL: its durable defaults, fsync=on,
  in autocommit): the baseline.
* ``<backend>-walbatch-many``: DurableBatcher with ``ApplySink(url, apply)``, where
  ``apply`` runs the same UPDATE with ``executemany`` for the whole batch (exactly once:
  the progress record commits in the same transaction); ``submit_many(1000)`` from 1
  thread for ``--seconds``, the clock stopping when ``flush()`` returns (every
  acknowledged item applied and committed). The log is small (16 MiB): the sustained rate.
* ``<backend>-walbatch-many-5000``: the same with ``max_items=5000``: fewer, larger
  transactions (each commit waits for the database's fsync).
* ``<backend>-walbatch-16t``: the same with ``submit()`` from 16 threads (a web app's
  request threads), bound by the log's group commit rather than the database.

PostgreSQL is started by the benchmark (tests/pg_server.py, fsync on) under ``--dir``.
Target: the better ``walbatch-many`` row >= 20x the per-item baseline on each backend.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from _e2e import BUSY_CORES, cpu_snapshot, drive, log_batcher, other_cpu_cores  # noqa: E402
from _run import Target, busy, document, now, print_targets, write_json  # noqa: E402

from walbatch import ApplySink  # noqa: E402

TS = 1700000000.123
TARGET = 20.0
BACKENDS = ("sqlite", "postgresql")
UPDATE_SQLITE = "UPDATE users SET last_active_at = ? WHERE id = ?"
UPDATE_PG = "UPDATE users SET last_active_at = %s WHERE id = %s"


class Workload:
    """Items ``{"user_id", "at"}`` spread over ``users`` ids (a multiplicative hash of i)."""

    def __init__(self, users: int) -> None:
        self.users = users

    def user(self, i: int) -> int:
        return (i * 2654435761) % self.users + 1

    def item(self, i: int) -> dict[str, Any]:
        return {"user_id": self.user(i), "at": TS + i}


def apply_sqlite(conn: Any, batch: Any) -> None:
    conn.executemany(UPDATE_SQLITE, [(r.item["at"], r.item["user_id"]) for r in batch])


def apply_postgresql(conn: Any, batch: Any) -> None:
    with conn.cursor() as cur:
        cur.executemany(UPDATE_PG, [(r.item["at"], r.item["user_id"]) for r in batch])


# ----------------------------------------------------------------- the databases


class SQLiteDB:
    name = "sqlite"

    def __init__(self, base: str, users: int) -> None:
        self.path = os.path.join(base, "app.db")
        with sqlite3.connect(self.path) as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, last_active_at REAL NOT NULL DEFAULT 0)")
            c.executemany("INSERT INTO users (id) VALUES (?)", [(i,) for i in range(1, users + 1)])
        self.url = f"sqlite:///{self.path}"
        self.apply = apply_sqlite

    def per_item(self, w: Workload, seconds: float) -> int:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            it = w.item(n)
            conn.execute("BEGIN")
            if conn.execute(UPDATE_SQLITE, (it["at"], it["user_id"])).rowcount != 1:
                raise RuntimeError("the UPDATE matched no user")
            conn.execute("COMMIT")
            n += 1
        conn.close()
        return n

    def close(self) -> None:
        pass


class PostgreSQLDB:
    name = "postgresql"

    def __init__(self, base: str, users: int) -> None:
        from pg_server import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("PostgreSQL server binaries not found (Debian: apt-get install postgresql); "
                             "or run with --backends sqlite")
        os.chmod(base, 0o755)  # the server may run as another user
        self.server = PostgresServer(bindir, base_dir=base, fsync=True)
        self.server.start()
        import psycopg

        self.psycopg = psycopg
        with psycopg.connect(self.server.conninfo, autocommit=True) as c:
            c.execute("CREATE TABLE users (id bigint PRIMARY KEY, last_active_at double precision NOT NULL "
                      "DEFAULT 0)")
            c.execute("INSERT INTO users (id) SELECT generate_series(1, %s)", (users,))
            c.execute("VACUUM ANALYZE users")
        self.url = self.server.url()
        self.apply = apply_postgresql

    def per_item(self, w: Workload, seconds: float) -> int:
        n = 0
        with self.psycopg.connect(self.server.conninfo, autocommit=True) as c:  # each UPDATE commits
            cur = c.cursor()
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                it = w.item(n)
                cur.execute(UPDATE_PG, (it["at"], it["user_id"]))
                if cur.rowcount != 1:
                    raise RuntimeError("the UPDATE matched no user")
                n += 1
        return n

    def close(self) -> None:
        self.server.cleanup()


# ----------------------------------------------------------------- the rows


def walbatch_run(db: Any, base: str, w: Workload, seconds: float, *, threads: int,
                 many: int, **opts: Any) -> dict[str, Any]:
    sink = ApplySink(db.url, db.apply)
    with log_batcher(base, sink, close_timeout=120, **{"max_delay": 0.05, **opts}) as b:
        d = drive(b, seconds, threads=threads, many=many, make_item=w.item, stride=1_000_000_000,
                  fresh=True)
    if d.stats.delivered != d.items or d.stats.dead_lettered:
        raise RuntimeError(f"{d.items} acknowledged but {d.stats.delivered} applied, "
                           f"{d.stats.dead_lettered} dead-lettered")
    how = f"submit_many({many}), 1 thread" if many > 1 else f"submit(), {threads} threads"
    how += "".join(f", {k}={v}" for k, v in opts.items())
    return {"writer": f"walbatch {how}, ApplySink (executemany of the UPDATE)", "items": d.items,
            "seconds": d.seconds, "drain_s": round(d.drain, 3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="per row (default 10)")
    p.add_argument("--users", type=int, default=100_000, help="rows in the users table (default 100000)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated: sqlite, postgresql (default both)")
    p.add_argument("--dir", default=".", help="where the logs and databases go (not a tmpfs)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.users < 1:
        p.error("--seconds and --users must be positive")
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backend_list if b not in BACKENDS]
    if unknown or not args.backend_list:
        p.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    return args


def run_backend(backend: str, args: argparse.Namespace, w: Workload) -> tuple[list[dict[str, Any]], Target]:
    """The three rows of one backend, on a fresh database; and its target."""
    base = tempfile.mkdtemp(prefix=f"walbatch-bench-apply-{backend}-", dir=args.dir)
    db: Any = None
    done: dict[str, dict[str, Any]] = {}
    try:
        db = SQLiteDB(base, args.users) if backend == "sqlite" else PostgreSQLDB(base, args.users)
        pid = db.server.proc.pid if backend == "postgresql" and db.server.proc else None

        def timed(key: str, fn: Callable[[], dict[str, Any]]) -> None:
            before = cpu_snapshot(pid, session=pid is not None)
            r = fn()
            other = other_cpu_cores(before, pid, session=pid is not None)
            r.update(key=key, backend=backend, other_cores=None if other is None else round(other, 3))
            r["items_per_s"] = round(r["items"] / r["seconds"], 1)
            done[key] = r
            print(f"  {key}: {r['items_per_s']:,.0f} items/s", file=sys.stderr, flush=True)

        def per_item() -> dict[str, Any]:
            t0 = time.perf_counter()
            n = db.per_item(w, args.seconds)
            return {"writer": "per item: UPDATE + COMMIT, 1 thread", "items": n,
                    "seconds": time.perf_counter() - t0}

        timed(f"{backend}-per-item", per_item)
        for key, threads, many, opts in (("walbatch-many", 1, 1000, {}),
                                         ("walbatch-many-5000", 1, 1000, {"max_items": 5000}),
                                         ("walbatch-16t", 16, 1, {})):
            timed(f"{backend}-{key}", lambda t=threads, m=many, o=opts: walbatch_run(
                db, base, w, args.seconds, threads=t, many=m, **o))
    finally:
        if db is not None:
            db.close()
        shutil.rmtree(base, ignore_errors=True)
    baseline = done[f"{backend}-per-item"]["items_per_s"]
    for r in done.values():
        r["x_per_item"] = round(r["items_per_s"] / baseline, 3)
    many = max((r for k, r in done.items() if k.startswith(f"{backend}-walbatch-many")),
               key=lambda r: r["items_per_s"])
    target = Target(f"ApplySink on {backend}, submit_many(1000)", many["x_per_item"], TARGET, "ratio",
                    "per-item UPDATE+COMMIT",
                    detail=f"best row {many['key']}: {many['items_per_s']:,.0f} vs {baseline:,.0f} items/s")
    return list(done.values()), target


def main(argv: list[str] | None = None) -> int:
    started = now()
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    w = Workload(args.users)
    rows: list[dict[str, Any]] = []
    targets: list[Target] = []
    for backend in args.backend_list:
        more, target = run_backend(backend, args, w)
        rows += more
        targets.append(target)

    print(f"| {'backend':<10} | {'writer':<76} | {'items/s':>9} | {'x per-item':>10} |")
    print(f"|{'-' * 12}|{'-' * 78}|{'-' * 10}:|{'-' * 11}:|")
    for r in rows:
        print(f"| {r['backend']:<10} | {r['writer']:<76} | {r['items_per_s']:>9,.0f} | "
              f"{r['x_per_item']:>9.1f}x |")
    for r in rows:
        if r["other_cores"] is not None and r["other_cores"] >= BUSY_CORES:
            print(f"WARNING: other processes kept {r['other_cores']:.2f} CPU cores busy during {r['key']}")
    print_targets(targets)
    doc = document("apply", args.dir, rows, targets, started=started, script=__file__,
                   argv=argv and [__file__, *argv],
                   settings={"seconds_per_row": args.seconds, "users": args.users,
                             "statement": UPDATE_SQLITE, "item": w.item(0)})
    doc["busy"] = busy(rows)
    write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
