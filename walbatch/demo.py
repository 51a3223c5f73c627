"""``walbatch demo``: kill -9 a writer mid-stream and show nothing acknowledged was lost.

A child process submits items from several threads to a DurableBatcher whose
sink is SQLite (DIR/demo.db), and appends each item's id to DIR/acks only
after its submit returned. Halfway through, the demo kills it with SIGKILL,
opens the log again (which replays what was not delivered) and compares the
database with what was acknowledged.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from .durable import DurableBatcher

MARKER = ".walbatch-demo"  # a directory the demo made, and may delete again


class NotADemoDirectory(Exception):
    """The demo directory exists and was not made by the demo: it is left alone."""


def _paths(directory: str) -> tuple[str, str, str, str]:
    db_path = os.path.join(directory, "demo.db")
    sink = f"sqlite:///{os.path.abspath(db_path)}?table=events"
    return os.path.join(directory, "log"), db_path, sink, os.path.join(directory, "acks")


def run(directory: str, items: int, threads: int, say: Callable[[str], None] = print) -> bool:
    """Run the demo in ``directory``; True if every acknowledged item landed exactly once."""
    log_dir, db_path, sink, acks_path = _paths(directory)
    if os.path.exists(directory):
        if not os.path.exists(os.path.join(directory, MARKER)):
            raise NotADemoDirectory(
                f"{directory} exists and was not made by walbatch demo; pick another --dir")
        shutil.rmtree(directory)
    os.makedirs(directory)
    open(os.path.join(directory, MARKER), "w").close()

    say(f"1. writer: submitting up to {items:,} items from {threads} threads "
        f"(sink: SQLite {db_path})")
    proc = subprocess.Popen(
        [sys.executable, "-m", "walbatch", "demo", "--child", "--dir", directory,
         "--items", str(items), "--threads", str(threads)],
    )
    target = items // 2
    deadline = time.monotonic() + 120
    while _count_lines(acks_path) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    acked = _read_acks(acks_path)
    say(f"2. kill -9 after {len(acked):,} acknowledged items")

    t0 = time.monotonic()
    with DurableBatcher(log_dir, sink) as b:
        backlog = b.stats().pending
        b.flush(timeout=120)
        stats = b.stats()
    say(f"3. restarted: replayed a backlog of {backlog:,} items in {time.monotonic() - t0:.2f}s")

    conn = sqlite3.connect(db_path)
    rows = dict(conn.execute("SELECT id, COUNT(*) FROM events GROUP BY id"))
    conn.close()
    missing = [i for i in acked if i not in rows]
    duplicated = [i for i, n in rows.items() if n > 1]
    extra = len(set(rows) - set(acked))
    say(f"4. in SQLite: {len(rows):,} distinct items, {sum(rows.values()):,} rows")
    say(f"   acknowledged but missing: {len(missing)}")
    say(f"   duplicated:               {len(duplicated)}")
    if extra:
        say(f"   delivered but not yet recorded by the writer when it died: {extra} "
            "(acknowledged in its last instant)")
    say(f"   stats: submitted={stats.submitted:,} delivered={stats.delivered:,} "
        f"dead_lettered={stats.dead_lettered} pending={stats.pending} fsyncs={stats.fsyncs}")
    if missing or duplicated:
        return False
    say("OK: every acknowledged item landed exactly once.")
    return True


def child(directory: str, items: int, threads: int) -> None:
    """The writer the demo kills: submit, then record each acknowledged id."""
    log_dir, _db, sink, acks_path = _paths(directory)
    lock = threading.Lock()
    acks = open(acks_path, "a", buffering=1)
    per_thread = items // threads

    with DurableBatcher(log_dir, sink, max_delay=0.05) as b:
        def work(t: int) -> None:
            for k in range(per_thread):
                item_id = t * per_thread + k
                b.submit({"id": item_id, "thread": t, "payload": f"event {item_id}"})
                with lock:  # the item is durable now; record it before counting it
                    acks.write(f"{item_id}\n")

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def _read_acks(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []
