"""The seeds' example: every request touches users.last_active_at; write it in batches.

A web app handles thousands of requests a second, and each one wants
``UPDATE users SET last_active_at = now WHERE id = ?``. One UPDATE and one
commit per request is what the database cannot keep up with. Here each request
hands walbatch one small item (fsync'd before the handler goes on); walbatch
coalesces a batch to the newest timestamp per user (``combine=last_by``) and one
transaction updates all of them, exactly once (``ApplySink``), however often the
process is killed.

Run it: ``python examples/last_active_at.py [DIR]``. It simulates 16 request
threads, then checks every user's last_active_at is the newest it was sent.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import threading
import time

from walbatch import ApplySink, DurableBatcher
from walbatch.combine import last_by


def apply(conn, batch):
    # One statement for the whole batch. The seq guard keeps an older request from
    # overwriting a newer one: later requests have higher seqs, whatever the clock says.
    conn.executemany(
        "UPDATE users SET last_active_at = ?, last_seq = ? WHERE id = ? AND last_seq < ?",
        [(r.item["at"], r.seq, r.item["user_id"], r.seq) for r in batch])


last_touch = last_by("user_id")  # for walbatch serve --combine last_active_at:last_touch


def make_sink() -> ApplySink:
    """For ``walbatch serve --sink last_active_at:make_sink`` (the database in $LAST_ACTIVE_DB)."""
    return ApplySink(f"sqlite:///{os.environ['LAST_ACTIVE_DB']}", apply)


def create_users(db_path: str) -> None:
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, "
                   "last_active_at REAL NOT NULL DEFAULT 0, last_seq INTEGER NOT NULL DEFAULT 0)")
        db.executemany("INSERT OR IGNORE INTO users (id) VALUES (?)", [(i,) for i in range(100)])


def main(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    db_path = os.path.join(directory, "app.db")
    create_users(db_path)

    newest: dict[int, tuple[int, float]] = {}  # user -> (seq, at) of their last request
    lock = threading.Lock()
    sink = ApplySink(f"sqlite:///{db_path}", apply)
    with DurableBatcher(os.path.join(directory, "log"), sink, combine=last_touch,
                        max_items=1000, max_delay=0.05) as batcher:

        def handle_requests(worker: int) -> None:
            rng = random.Random(worker)
            for _ in range(500):
                user, at = rng.randrange(100), time.time()
                seq = batcher.submit({"user_id": user, "at": at}).seq  # returns once fsync'd
                with lock:
                    newest[user] = max(newest.get(user, (0, 0.0)), (seq, at))

        workers = [threading.Thread(target=handle_requests, args=(w,)) for w in range(16)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        batcher.flush(timeout=30)
        stats = batcher.stats()

    with sqlite3.connect(db_path) as db:
        stored = dict(db.execute("SELECT id, last_active_at FROM users"))
    wrong = [u for u, (_seq, at) in newest.items() if stored[u] != at]
    print(f"{stats.submitted} requests, {stats.delivered} delivered "
          f"({stats.coalesced} coalesced away), {sum(stats.batches_by_reason.values())} batches; "
          f"users checked: {len(newest)}, wrong: {len(wrong)}")
    if wrong:
        raise SystemExit(f"last_active_at is not the newest for users {wrong[:5]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "last-active-at-demo")
