"""kill -9 mid-delivery into ApplySink: increments apply exactly once, in SQLite and PostgreSQL.

Each cycle starts a child whose threads submit increments ``{"id", "token"}``
(one by one and in small submit_many groups, keyed or not) to a DurableBatcher
whose sink is an ApplySink: ``apply`` adds each item's count to its counter and
records its token in a ``seen`` table with no unique constraint, so applying
an item twice would show. A thread writes a token to its intent file before
the submit and to its acks file after the acknowledgement. The child is killed
with SIGKILL at a random moment (mid-fsync, mid-transaction, between the
database commit and the checkpoint); at the end the log is opened once more
and flushed.

Invariant: every acknowledged token was applied exactly once, every applied
token was submitted (intended), none twice, and each counter equals the number
of its applied tokens.
"""

from __future__ import annotations

import glob
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest
from pg_server import postgres_fixture  # noqa: F401 - the `postgres` fixture

from walbatch import ApplySink, DurableBatcher

OPTS = dict(max_delay=0.003, max_items=40, segment_bytes=8192, checkpoint_interval=0.002)

APPLY = textwrap.dedent("""
    def make_apply(param):
        inc = f"UPDATE counters SET n = n + {param} WHERE id = {param}"
        see = f"INSERT INTO seen (token, id) VALUES ({param}, {param})"
        def apply(conn, batch):
            by_id = {}
            for r in batch:
                by_id[r.item["id"]] = by_id.get(r.item["id"], 0) + 1
            cur = conn.cursor()
            cur.executemany(inc, [(n, i) for i, n in sorted(by_id.items())])  # ordered: no deadlocks
            cur.executemany(see, [(r.item["token"], r.item["id"]) for r in batch])
        return apply
""")

CHILD = APPLY + textwrap.dedent("""
    import logging, sys, threading
    from walbatch import ApplySink, DurableBatcher
    logging.getLogger("walbatch").setLevel(logging.ERROR)
    log_dir, url, param, files, cycle, conc, keyed = sys.argv[1:8]
    b = DurableBatcher(log_dir, ApplySink(url, make_apply(param)),
                       flush_concurrency=int(conc), **OPTIONS)
    def work(t):
        with open(f"{files}.intent.{cycle}.{t}", "a", buffering=1) as intent, \\
             open(f"{files}.ack.{cycle}.{t}", "a", buffering=1) as ack:
            k = 0
            while True:
                n = 1 if k % 3 else 7
                items = [{"id": (t * 31 + k * 7 + j) % 10, "token": f"{cycle}-{t}-{k}-{j}"}
                         for j in range(n)]
                intent.write("".join(i["token"] + "\\n" for i in items))
                b.submit_many(items, key=f"k{k % 3}" if keyed == "1" else None)
                ack.write("".join(i["token"] + "\\n" for i in items))
                k += 1
    for t in range(4):
        threading.Thread(target=work, args=(t,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""").replace("**OPTIONS", "**" + repr(OPTS))

namespace: dict = {}
exec(APPLY, namespace)
make_apply = namespace["make_apply"]


def tokens(pattern: str) -> list[str]:
    out = []
    for path in glob.glob(pattern):
        with open(path) as f:
            out += [line[:-1] for line in f if line.endswith("\n")]
    return out


class Sqlite:
    param = "?"

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "app.db")
        self.url = f"sqlite:///{self.path}"
        with sqlite3.connect(self.path) as c:
            c.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            c.execute("CREATE TABLE seen (token TEXT NOT NULL, id INTEGER NOT NULL)")
            c.executemany("INSERT INTO counters VALUES (?, 0)", [(i,) for i in range(10)])

    def read(self) -> tuple[dict[int, int], list[tuple[str, int]]]:
        with sqlite3.connect(self.path) as c:
            return dict(c.execute("SELECT id, n FROM counters")), c.execute(
                "SELECT token, id FROM seen").fetchall()


class Postgres:
    param = "%s"

    def __init__(self, server) -> None:
        import psycopg

        self.psycopg = psycopg
        name = f"crash_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(server.url("postgres"), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        self.url = server.url(name)
        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            c.execute("CREATE TABLE seen (token TEXT NOT NULL, id INTEGER NOT NULL)")
            c.execute("INSERT INTO counters SELECT g, 0 FROM generate_series(0, 9) g")

    def read(self) -> tuple[dict[int, int], list[tuple[str, int]]]:
        with self.psycopg.connect(self.url) as c:
            return (dict(c.execute("SELECT id, n FROM counters").fetchall()),
                    c.execute("SELECT token, id FROM seen").fetchall())


@pytest.mark.parametrize("kind,concurrency,keyed", [
    ("sqlite", 1, False), ("sqlite", 4, True), ("postgresql", 1, False), ("postgresql", 4, True),
], ids=["sqlite-1", "sqlite-4-keyed", "postgresql-1", "postgresql-4-keyed"])
def test_kill_9_mid_delivery_applies_each_increment_once(scenario, request, kind, concurrency,
                                                         keyed):
    directory = tempfile.mkdtemp(prefix="walbatch-apply-")
    db = Sqlite(directory) if kind == "sqlite" else Postgres(request.getfixturevalue("postgres"))
    log_dir, files = os.path.join(directory, "log"), os.path.join(directory, "t")
    cycles = scenario.iterations(4)
    for cycle in range(cycles):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, log_dir, db.url, db.param, files, str(cycle),
             str(concurrency), "1" if keyed else "0"], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(0.2 + scenario.rng.random() * 0.4)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    sink = ApplySink(db.url, make_apply(db.param))
    with DurableBatcher(log_dir, sink, flush_concurrency=concurrency, **OPTS) as b:
        b.flush(timeout=120)
        stats = b.stats()
    counters, seen = db.read()
    acked, intended = tokens(files + ".ack.*"), set(tokens(files + ".intent.*"))
    applied = [t for t, _ in seen]
    twice = len(applied) - len(set(applied))
    lost = set(acked) - set(applied)
    invented = set(applied) - intended
    by_id: dict[int, int] = dict.fromkeys(range(10), 0)
    for _t, i in seen:
        by_id[i] += 1
    scenario.add(cycles=cycles, acknowledged=len(acked), applied=len(applied), twice=twice,
                 lost=len(lost), invented=len(invented))
    assert not lost, f"{len(lost)} acknowledged increments never applied, e.g. {sorted(lost)[:3]}"
    assert twice == 0, f"{twice} increments applied twice"
    assert not invented, sorted(invented)[:3]
    assert counters == by_id, "a counter disagrees with the increments it recorded"
    assert stats.pending == 0 and stats.dead_lettered == 0
    assert len(acked) > 0, "the writers never got an acknowledgement: the test proved nothing"


def test_power_loss_mid_delivery_applies_each_increment_once(scenario, tmp_path):
    """The same promise when the machine loses power: the log on the crash-simulating
    file system loses whatever was not synced, the database (on its own disk) keeps
    what it committed. Items synced but not yet acknowledged may apply, at most once."""
    from simfs import SimFileSystem

    from walbatch import WalbatchError

    rng, fs = scenario.rng, SimFileSystem()
    db = Sqlite(str(tmp_path))
    log_dir = tempfile.mkdtemp(prefix="walbatch-apply-power-")
    acked: list[str] = []
    tried: set[str] = set()
    cycles = scenario.iterations(30)
    apply = make_apply(db.param)

    def alive_only(conn, batch):  # a machine without power applies nothing
        if not fs.alive():
            raise ConnectionError("the machine is down")
        apply(conn, batch)

    for cycle in range(cycles):
        b = DurableBatcher(log_dir, ApplySink(db.url, alive_only), _fs=fs,
                           flush_concurrency=rng.choice([1, 4]), max_delay=0.001, max_items=20,
                           segment_bytes=rng.choice([512, 1 << 20]), max_log_bytes=1 << 30,
                           checkpoint_interval=rng.choice([0.0, 0.002, 0.05]))
        generation = fs.generation
        fs.crash_after(rng.randint(1, 60), rng, "random")
        try:
            for k in range(300):
                items = [{"id": rng.randrange(10), "token": f"{cycle}-{k}-{j}"}
                         for j in range(rng.choice([1, 1, 5]))]
                tried.update(i["token"] for i in items)
                b.submit_many(items, key=rng.choice([None, "a", "b"]))
                acked += [i["token"] for i in items]
        except (OSError, WalbatchError):
            pass  # the machine died under us
        if fs.generation == generation:
            fs.crash(rng, "random")
        b.close(timeout=0)
    b = DurableBatcher(log_dir, ApplySink(db.url, make_apply(db.param)), _fs=fs, max_delay=0.001)
    b.flush(timeout=60)
    b.close()
    counters, seen = db.read()
    applied = [t for t, _ in seen]
    by_id: dict[int, int] = dict.fromkeys(range(10), 0)
    for _t, i in seen:
        by_id[i] += 1
    lost = set(acked) - set(applied)
    twice = len(applied) - len(set(applied))
    scenario.add(cycles=cycles, acknowledged=len(acked), applied=len(applied), twice=twice,
                 lost=len(lost))
    assert not lost and twice == 0, scenario.line()
    assert set(applied) <= tried and counters == by_id, scenario.line()
    assert acked, "nothing was acknowledged: the test proved nothing"
