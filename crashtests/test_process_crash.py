"""kill -9 under load, again and again: an embedded batcher, and the daemon.

Every cycle starts a writer (a child process with a DurableBatcher, or `walbatch
serve` fed by a client process), lets it run for a random moment and kills it
with SIGKILL: mid-fsync, mid-roll (segments are small), mid-checkpoint (the
interval is tiny), mid-delivery to the real SQLite sink. Writers append each
acknowledged item to their own file *after* the acknowledgement and before
counting it. At the end the log is opened once more and flushed.

The moment of each kill is counted in acknowledgements, not seconds: the writer
must have said it is ready and acknowledged a seeded number of bytes' worth of
items (polling its acks files, with a deadline) before it is killed.

Invariant: every acknowledged item is in SQLite exactly once with its payload;
no duplicates; no dead letters (the SQLite sink refuses none of these items, so
one would be an item refused or lost on the way); the stats tally holds.
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

from helpers import acking_writer, payload_ok, read_acks

from walbatch import DurableBatcher
from walbatch.dlq import list_dead_letters

OPTS = dict(max_delay=0.005, segment_bytes=4096, max_log_bytes=1 << 30, checkpoint_interval=0.001)

EMBEDDED = acking_writer(OPTS, threads=4)

CLIENT = textwrap.dedent("""
    import sys, threading
    from walbatch import Client, WalbatchError
    sock, acks, cycle = sys.argv[1], sys.argv[2], int(sys.argv[3])
    c = Client(sock, connect_timeout=5, timeout=10)
    def work(t):
        with open(f"{acks}.{cycle}.{t}", "a", buffering=1) as f:
            k = 0
            while True:
                try:
                    if k % 5 == 0:
                        # The payloads of tests/helpers.acking_writer, so payload_ok checks both.
                        items = [{"id": f"{cycle}-{t}-{k}-{j}", "p": "x" * (j * 7 % 90)}
                                 for j in range(30)]
                        c.submit_many(items)
                        f.write("".join(i["id"] + "\\n" for i in items))
                    else:
                        item = {"id": f"{cycle}-{t}-{k}", "p": "y" * (k % 80)}
                        c.submit(item)
                        f.write(item["id"] + "\\n")
                except WalbatchError:
                    return  # the daemon died: unanswered items are not acknowledged
                k += 1
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads: th.start()
    for th in threads: th.join()
""")


def check(directory: str, db: str, acks: str, scenario) -> None:
    with DurableBatcher(os.path.join(directory, "log"), f"sqlite:///{db}?table=t", **OPTS) as b:
        b.flush(timeout=120)
        stats = b.stats()
    acked = read_acks(acks)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, p FROM t").fetchall()
    ids = [r[0] for r in rows]
    delivered = set(ids)
    damaged = sum(1 for item_id, p in rows if not payload_ok(item_id, p))
    lost = len(acked - delivered)
    duplicated = len(ids) - len(delivered)
    scenario.add(acknowledged=len(acked), delivered=len(delivered), lost=lost,
                 duplicated=duplicated, damaged=damaged)
    dead = list_dead_letters(os.path.join(directory, "log"))
    scenario.add(dead_lettered=len(dead))
    assert lost == 0, f"{lost} acknowledged items missing, e.g. {sorted(acked - delivered)[:5]}"
    assert duplicated == 0 and damaged == 0, scenario.line()
    assert dead == [] and stats.dead_lettered == 0, f"dead letters: {dead[:3]} ({stats})"
    assert stats.submitted == stats.delivered + stats.dead_lettered + stats.pending
    assert stats.pending == 0


def wait_for_acks(prefix: str, cycle: int, nbytes: int, proc: subprocess.Popen) -> None:
    """Until this cycle's writers have acknowledged ``nbytes`` of ids (or stopped)."""
    deadline = time.monotonic() + 60
    pattern = glob.escape(prefix) + f".{cycle}.*"
    while sum(os.path.getsize(p) for p in glob.glob(pattern)) < nbytes:
        assert proc.poll() is None, f"the writer exited with {proc.returncode} before the kill"
        assert time.monotonic() < deadline, "the writer acknowledged too little in 60 s"
        time.sleep(0.005)


def test_kill_9_an_embedded_batcher_under_load(scenario):
    directory = tempfile.mkdtemp(prefix="walbatch-kill-")
    db, acks = os.path.join(directory, "out.db"), os.path.join(directory, "acks")
    cycles = scenario.iterations(12)
    for cycle in range(cycles):
        child = subprocess.Popen([sys.executable, "-c", EMBEDDED, os.path.join(directory, "log"),
                                  f"sqlite:///{db}?table=t", acks, str(cycle)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            wait_for_acks(acks, cycle, scenario.rng.randint(2_000, 60_000), child)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
    scenario.add(cycles=cycles)
    check(directory, db, acks, scenario)


def test_kill_9_the_daemon_under_load(scenario):
    directory = tempfile.mkdtemp(prefix="walbatch-killd-")
    sockdir = tempfile.mkdtemp(prefix="wbk-", dir="/tmp")
    sock = os.path.join(sockdir, "s")
    db, acks = os.path.join(directory, "out.db"), os.path.join(directory, "acks")
    cycles = scenario.iterations(10)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in OPTS.items()]
    for cycle in range(cycles):
        daemon = subprocess.Popen(
            [sys.executable, "-m", "walbatch", "serve", "--data-dir", os.path.join(directory, "log"),
             "--socket", sock, "--sink", f"sqlite:///{db}?table=t", "--log-level", "error", *flags])
        client = subprocess.Popen([sys.executable, "-c", CLIENT, sock, acks, str(cycle)])
        try:
            # Acknowledgements come only from a daemon that is up and serving.
            wait_for_acks(acks, cycle, scenario.rng.randint(2_000, 60_000), daemon)
        finally:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(30)
        try:
            client.wait(60)
        finally:
            if client.poll() is None:
                client.kill()
    scenario.add(cycles=cycles)
    check(directory, db, acks, scenario)
