"""The ``walbatch`` command line: a thin click layer over the library.

Errors from the library become one clear line (``click.ClickException``), never
a traceback; exit codes are documented in docs/cli.md.
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

import click

from . import __version__
from .durable import DurableBatcher
from .errors import WalbatchError

_DEMO_MARKER = ".walbatch-demo"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="walbatch")
def cli() -> None:
    """walbatch: fsync each item to a log, batch it to a sink, never lose it."""


@cli.command()
@click.option("--dir", "directory", default="walbatch-demo", show_default=True,
              type=click.Path(file_okay=False), help="Where the demo keeps its log and database.")
@click.option("--items", default=20000, show_default=True, type=click.IntRange(100),
              help="How many items the writer tries to submit before it is killed.")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Submitting threads in the writer.")
@click.option("--child", is_flag=True, hidden=True)
def demo(directory: str, items: int, threads: int, child: bool) -> None:
    """Kill -9 a writer mid-stream, restart, and show every acknowledged item landed once.

    A child process submits items from several threads to a DurableBatcher whose
    sink is SQLite (DIR/demo.db), recording each acknowledged item in DIR/acks.
    Halfway through, the demo kills it with SIGKILL, opens the log again
    (which replays what was not delivered) and compares the database with
    what was acknowledged.

    \b
    Example:
        walbatch demo --items 50000
    """
    log_dir = os.path.join(directory, "log")
    db_path = os.path.join(directory, "demo.db")
    sink = f"sqlite:///{os.path.abspath(db_path)}?table=events"
    if child:
        _demo_child(log_dir, sink, os.path.join(directory, "acks"), items, threads)
        return
    if os.path.exists(directory):
        if not os.path.exists(os.path.join(directory, _DEMO_MARKER)):
            raise click.ClickException(
                f"{directory} exists and was not made by walbatch demo; pick another --dir")
        shutil.rmtree(directory)
    os.makedirs(directory)
    open(os.path.join(directory, _DEMO_MARKER), "w").close()
    acks_path = os.path.join(directory, "acks")

    click.echo(f"1. writer: submitting up to {items:,} items from {threads} threads "
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
    click.echo(f"2. kill -9 after {len(acked):,} acknowledged items")

    t0 = time.monotonic()
    with DurableBatcher(log_dir, sink) as b:
        backlog = b.stats().pending
        b.flush(timeout=120)
        stats = b.stats()
    click.echo(f"3. restarted: replayed a backlog of {backlog:,} items in "
               f"{time.monotonic() - t0:.2f}s")

    conn = sqlite3.connect(db_path)
    rows = dict(conn.execute("SELECT id, COUNT(*) FROM events GROUP BY id"))
    conn.close()
    missing = [i for i in acked if i not in rows]
    duplicated = [i for i, n in rows.items() if n > 1]
    extra = len(set(rows) - set(acked))
    click.echo(f"4. in SQLite: {len(rows):,} distinct items, {sum(rows.values()):,} rows")
    click.echo(f"   acknowledged but missing: {len(missing)}")
    click.echo(f"   duplicated:               {len(duplicated)}")
    if extra:
        click.echo(f"   delivered but not yet recorded by the writer when it died: {extra} "
                   "(acknowledged in its last instant)")
    click.echo(f"   stats: submitted={stats.submitted:,} delivered={stats.delivered:,} "
               f"dead_lettered={stats.dead_lettered} pending={stats.pending} "
               f"fsyncs={stats.fsyncs}")
    if missing or duplicated:
        raise click.ClickException("the demo found lost or duplicated items: please report this")
    click.echo("OK: every acknowledged item landed exactly once.")


def _demo_child(log_dir: str, sink: str, acks_path: str, items: int, threads: int) -> None:
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


def main() -> None:
    try:
        cli(standalone_mode=True)
    except WalbatchError as ex:  # pragma: no cover - click handles most paths
        click.echo(f"walbatch: {ex}", err=True)
        sys.exit(1)

