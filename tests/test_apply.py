"""ApplySink: any SQL, exactly once per acknowledged item, in SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading
import uuid

import pytest
from helpers import FAST, WAIT
from pg_server import postgres_fixture  # noqa: F401 - the `postgres` fixture

from walbatch import ApplySink, Batch, DeadLettered, DurableBatcher, Record, SinkError
from walbatch.combine import last_by

LOG_ID = str(uuid.UUID(int=42))


# ------------------------------------------------------------------ databases

class SQLiteDB:
    """A SQLite database with a counters table, as the user's application has it."""

    def __init__(self, path):
        self.url = f"sqlite:///{path}"
        self.path = path
        with sqlite3.connect(path) as c:
            c.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL "
                      "CHECK (n < 1000000))")
            c.executemany("INSERT INTO counters VALUES (?, 0)", [(i,) for i in range(10)])
        self.param = "?"

    def counters(self) -> dict[int, int]:
        with sqlite3.connect(self.path) as c:
            return dict(c.execute("SELECT id, n FROM counters"))

    def progress(self) -> list[tuple]:
        with sqlite3.connect(self.path) as c:
            return list(c.execute("SELECT log_id, first_seq, last_seq FROM walbatch_applied "
                                  "ORDER BY log_id, first_seq"))


class PostgresDB:
    def __init__(self, server):
        import psycopg

        self.psycopg = psycopg
        self.dbname = f"apply_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(server.url("postgres"), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {self.dbname}")
        self.url = server.url(self.dbname)
        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL "
                      "CHECK (n < 1000000))")
            c.execute("INSERT INTO counters SELECT g, 0 FROM generate_series(0, 9) g")
        self.param = "%s"

    def counters(self) -> dict[int, int]:
        with self.psycopg.connect(self.url) as c:
            return dict(c.execute("SELECT id, n FROM counters").fetchall())

    def progress(self) -> list[tuple]:
        with self.psycopg.connect(self.url) as c:
            return c.execute("SELECT log_id, first_seq, last_seq FROM walbatch_applied "
                             "ORDER BY log_id, first_seq").fetchall()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        return SQLiteDB(tmp_path / "app.db")
    return PostgresDB(request.getfixturevalue("postgres"))


def incrementer(db):
    sql = f"UPDATE counters SET n = n + {db.param} WHERE id = {db.param}"

    def apply(conn, batch):
        # One UPDATE per id, in id order: concurrent batches lock rows in the same
        # order, so they wait for each other instead of deadlocking.
        by_id: dict[int, int] = {}
        for r in batch:
            by_id[r.item["id"]] = by_id.get(r.item["id"], 0) + r.item.get("by", 1)
        conn.cursor().executemany(sql, [(n, i) for i, n in sorted(by_id.items())])
    return apply


def expected(items) -> dict[int, int]:
    out = dict.fromkeys(range(10), 0)
    for it in items:
        out[it["id"]] += it.get("by", 1)
    return out


def raw(*items, first_seq=1, log_id=LOG_ID) -> Batch:
    return Batch([Record(first_seq + i, it) for i, it in enumerate(items)], log_id, "replay")


# --------------------------------------------------------------------- tests

def test_increments_apply_once_per_item_and_a_redelivered_batch_is_a_no_op(db):
    sink = ApplySink(db.url, incrementer(db))
    try:
        items = [{"id": i % 3} for i in range(7)]
        sink.write(raw(*items))
        sink.write(raw(*items))                   # a crash before the checkpoint: again
        sink.write(raw(*items[4:], first_seq=5))  # or again, batched differently
        assert db.counters() == expected(items)
        assert db.progress() == [(LOG_ID, 1, 7)]
        sink.write(raw({"id": 1}, first_seq=8, log_id=str(uuid.UUID(int=43))))  # another log
        assert db.counters()[1] == expected(items)[1] + 1
    finally:
        sink.close()


@pytest.mark.parametrize("concurrency,keyed", [(1, False), (4, False), (4, True)])
def test_through_a_batcher_with_concurrency_and_keys(db, logdir, concurrency, keyed):
    sink = ApplySink(db.url, incrementer(db))
    items = [{"id": i % 10, "by": 1 + i % 4} for i in range(2000)]
    with DurableBatcher(logdir, sink, max_items=37, flush_concurrency=concurrency, **FAST) as b:
        threads = []
        for t in range(4):
            part = items[t::4]

            def work(part=part, t=t):
                for k in range(0, len(part), 25):
                    b.submit_many(part[k:k + 25], key=f"k{(t + k) % 5}" if keyed else None)
            threads.append(threading.Thread(target=work))
        for th in threads:
            th.start()
        for th in threads:
            th.join(WAIT)
        b.flush(WAIT)
    assert db.counters() == expected(items)
    [(log_id, first, last)] = db.progress()  # out-of-order completions merged into one run
    assert (first, last) == (1, 2000)


def test_a_redelivery_after_a_crash_is_skipped_even_with_combine(db, logdir):
    # The first process applied seqs 1..6 and died before its checkpoint moved. The next
    # open redelivers them: they must not reach the combine hook, which would otherwise
    # fold them into a record that is new to the database.
    items = [{"id": 1, "by": 1}] * 6 + [{"id": 1, "by": 10}, {"id": 2, "by": 5}]
    with DurableBatcher(logdir, None) as writer:
        writer.submit_many(items)
        log_id = writer.log_id

    def summing(batch):
        total: dict[int, int] = {}
        for r in batch:
            total[r.item["id"]] = total.get(r.item["id"], 0) + r.item["by"]
        last = {r.item["id"]: r for r in batch}
        return [Record(r.seq, {"id": i, "by": total[i]}) for i, r in sorted(last.items())]

    sink = ApplySink(db.url, incrementer(db))
    sink.write(raw(*items[:6], log_id=log_id))  # "the first process"
    with DurableBatcher(logdir, sink, combine=summing, **FAST) as b:
        b.flush(WAIT)
        assert b.stats().delivered == 8
    assert db.counters() == expected(items)
    assert db.progress() == [(log_id, 1, 8)]


def test_a_refused_item_is_dead_lettered_alone_and_counted_once(db, logdir):
    sink = ApplySink(db.url, incrementer(db))
    items = [{"id": 3}, {"id": 4, "by": 5_000_000}, {"id": 5}, {"id": 4}]  # CHECK (n < 1000000)
    with DurableBatcher(logdir, sink, **FAST) as b:
        rs = b.submit_many(items)
        b.flush(WAIT)
        with pytest.raises(DeadLettered, match="apply refused seq 2"):
            rs[1].wait(WAIT)
        assert [d.seq for d in b.dead_letters.list()] == [2]
    assert db.counters() == expected([items[0], items[2], items[3]])
    assert db.progress()[0][1:] == (1, 4)  # the dead letter is covered too: not applied later


def test_a_failing_apply_rolls_back_and_is_retried_without_applying_twice(db, logdir):
    calls = []
    inc = incrementer(db)

    def flaky(conn, batch):
        calls.append(len(batch))
        inc(conn, batch)  # applied, then...
        if len(calls) < 3:
            raise ConnectionError("the network blinked after the UPDATE")  # ... rolled back

    items = [{"id": 7}] * 5
    with DurableBatcher(logdir, ApplySink(db.url, flaky), **FAST) as b:
        b.submit_many(items)
        b.flush(WAIT)
    assert len(calls) == 3 and db.counters()[7] == 5


def test_a_retryable_item_is_retried_alone_and_applied_once(db, logdir):
    seen = []
    inc = incrementer(db)

    def picky(conn, batch):
        seen.append([r.seq for r in batch])
        inc(conn, [r for r in batch if not (r.seq == 2 and len(seen) == 1)])
        return [SinkError("later", retryable=True) if r.seq == 2 and len(seen) == 1 else None
                for r in batch]

    with DurableBatcher(logdir, ApplySink(db.url, picky), **FAST) as b:
        b.submit_many([{"id": 8}] * 3)
        b.flush(WAIT)
    assert seen == [[1, 2, 3], [2]]
    assert db.counters()[8] == 3


def test_results_come_back_through_receipts(db, logdir):
    def ids(conn, batch):
        return [r.item["id"] * 100 for r in batch]

    with DurableBatcher(logdir, ApplySink(db.url, ids), **FAST) as b:
        assert b.submit_many([{"id": 1}, {"id": 2}]).results(WAIT) == [100, 200]


def test_upsert_with_last_by_keeps_the_newest_value(db, logdir):
    # The seeds' example: UPDATE ... SET last_active_at = ... WHERE id IN (...), coalesced.
    sql = (f"UPDATE counters SET n = {db.param} WHERE id = {db.param}")

    def touch(conn, batch):
        conn.cursor().executemany(sql, [(r.item["at"], r.item["id"]) for r in batch])

    with DurableBatcher(logdir, ApplySink(db.url, touch), combine=last_by("id"), **FAST) as b:
        b.submit_many([{"id": i % 3, "at": i} for i in range(30)])
        b.flush(WAIT)
    c = db.counters()
    assert (c[0], c[1], c[2]) == (27, 28, 29)


@pytest.mark.parametrize("url,message", [
    ("file:///tmp/x.jsonl", "sqlite:///PATH or postgresql://"),
    ("sqlite:///{tmp}/nodir/x.db", "does not exist"),
    ("sqlite:///{tmp}/x.db?table=t", "unknown option"),
    ("sqlite:///{tmp}/x.db?progress_table=a;b", "plain SQL name"),
])
def test_bad_urls_are_refused_clearly(tmp_path, url, message):
    with pytest.raises(ValueError, match=message):
        ApplySink(url.format(tmp=tmp_path), lambda conn, batch: None)


def test_walbatch_replay_takes_a_function_that_builds_an_apply_sink(tmp_path):
    import subprocess
    import sys

    db = SQLiteDB(tmp_path / "app.db")
    (tmp_path / "counting.py").write_text(
        "from walbatch import ApplySink\n"
        "def apply(conn, batch):\n"
        "    conn.executemany('UPDATE counters SET n = n + 1 WHERE id = ?',"
        " [(r.item['id'],) for r in batch])\n"
        f"def make_sink():\n"
        f"    return ApplySink({db.url!r}, apply)\n")
    logdir = tmp_path / "log"
    with DurableBatcher(logdir, None) as writer:
        writer.submit_many([{"id": i % 2} for i in range(5)])
    import shutil

    backup = tmp_path / "backup"
    shutil.copytree(logdir, backup)  # the same log, before it was delivered
    for directory in (logdir, backup):  # replaying the restored copy applies nothing again
        out = subprocess.run([sys.executable, "-m", "walbatch", "replay", "--data-dir", str(directory),
                              "--sink", "counting:make_sink"], capture_output=True, text=True,
                             env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
        assert out.returncode == 0, out.stderr
        assert "delivered 5 item(s)" in out.stdout
    assert db.counters()[0] == 3 and db.counters()[1] == 2
