"""A writer process and a separate flusher (walbatch replay --follow) share one log."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from walbatch import DurableBatcher, LogLocked
from walbatch.follow import Follower
from walbatch.log import Log


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_follower_delivers_what_a_writer_only_batcher_acknowledges(tmp_path):
    got: dict[int, object] = {}

    def sink(batch):
        for r in batch:
            assert got.setdefault(r.seq, r.item) == r.item

    writer = DurableBatcher(tmp_path, None)
    with Follower(str(tmp_path), sink, max_delay=0.005) as follower:
        acked = {writer.submit({"i": i}).seq: {"i": i} for i in range(300)}
        acked.update(zip(writer.submit_many([{"m": i} for i in range(200)]).seqs,
                         [{"m": i} for i in range(200)], strict=True))
        assert wait_for(lambda: len(got) == len(acked)), f"{len(got)} of {len(acked)} delivered"
        assert got == acked
        stats = follower.stats()
    writer.close()
    assert stats.delivered == 500 and stats.pending == 0


def test_follower_never_reads_past_the_last_sync(tmp_path):
    """A written but unsynced frame could still vanish in a power loss: never deliver it."""
    got: list[int] = []
    writer = Log.open(str(tmp_path), role="writer")
    first = writer.append(b"\xa1a", 1)
    writer.sync()
    writer.append(b"\xa1b", 1)  # written, in the page cache, not synced
    with Follower(str(tmp_path), lambda b: got.extend(r.seq for r in b), max_delay=0.005):
        assert wait_for(lambda: got == [first])
    # close() refreshed and delivered everything it could read before it returned: a
    # follower that read past the last sync would have delivered seq 2 by now.
    assert got == [first]
    writer.sync()
    with Follower(str(tmp_path), lambda b: got.extend(r.seq for r in b), max_delay=0.005):
        assert wait_for(lambda: got == [first, first + 1])
    writer.close()


def test_follower_frees_the_writers_quota(tmp_path):
    """Segments the follower delivers and deletes make room for the writer (no LogFull)."""
    writer = DurableBatcher(tmp_path, None, segment_bytes=4096, max_log_bytes=8192,
                            submit_timeout=20)
    delivered = []
    with Follower(str(tmp_path), lambda b: delivered.extend(r.seq for r in b), max_delay=0.001,
                  segment_bytes=4096, max_log_bytes=8192):
        for i in range(400):  # ~40 KB through an 8 KB log
            writer.submit({"i": i, "pad": "x" * 60})
        assert wait_for(lambda: len(delivered) == 400)
    assert sorted(delivered) == list(range(1, 401))
    writer.close()


def test_roles_exclude_each_other(tmp_path):
    owner = DurableBatcher(tmp_path, lambda b: None)
    with pytest.raises(LogLocked, match="delivering"):
        Follower(str(tmp_path), lambda b: None)
    with pytest.raises(LogLocked, match="writing"):
        DurableBatcher(tmp_path, None)
    owner.close()
    writer = DurableBatcher(tmp_path, None)
    follower = Follower(str(tmp_path), lambda b: None)  # writer + follower may share the log
    with pytest.raises(LogLocked):
        DurableBatcher(tmp_path, lambda b: None)  # an owner needs both locks
    follower.close()
    writer.close()


def test_replay_follow_cli_with_a_killed_writer(tmp_path):
    """A writer process killed with SIGKILL mid-stream; the follower delivers every acknowledged item."""
    data = tmp_path / "log"
    db = tmp_path / "out.db"
    acks = tmp_path / "acks"
    writer_code = textwrap.dedent(f"""
        from walbatch import DurableBatcher
        b = DurableBatcher({str(data)!r}, None, segment_bytes=1 << 14, max_log_bytes=1 << 16)
        with open({str(acks)!r}, "a", buffering=1) as f:
            for i in range(100000):
                b.submit({{"i": i}})
                f.write(f"{{i}}\\n")
    """)
    follow = subprocess.Popen(
        [sys.executable, "-m", "walbatch", "replay", "--data-dir", str(data), "--sink",
         f"sqlite:///{db}?table=t", "--follow", "--max-delay", "0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = subprocess.Popen([sys.executable, "-c", writer_code])
    try:
        assert wait_for(lambda: acks.exists() and acks.stat().st_size > 20000, 60)
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        acked = {int(x) for x in acks.read_text().split("\n") if x}

        def landed() -> set[int]:
            if not db.exists():
                return set()
            with sqlite3.connect(db) as c:
                return {row[0] for row in c.execute("SELECT i FROM t")}

        assert wait_for(lambda: acked <= landed(), 60), "an acknowledged item never arrived"
        with sqlite3.connect(db) as c:
            rows, distinct = c.execute("SELECT COUNT(*), COUNT(DISTINCT _seq) FROM t").fetchone()
        assert rows == distinct
    finally:
        for p in (writer, follow):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    assert "stopped: delivered=" in out
    assert os.path.exists(data / "FLUSH.LOCK")


def test_a_follower_delivers_a_dead_letter_past_the_checkpoint_again_not_twice(tmp_path):
    # An open with a sink forgets this log's dead letters past the checkpoint
    # (their batch was never checkpointed, so they are delivered again); the
    # follower did not, so a later requeue delivered such an item twice.
    import threading

    from walbatch import DeadLettered, PermanentSinkError

    healthy = threading.Event()
    got: list[tuple[int, str]] = []

    def sink(batch):
        if not healthy.is_set():
            if batch.key == "A":
                raise ConnectionError("A is down")
            if batch.key == "B":
                raise PermanentSinkError("B refused")
        got.extend((r.seq, r.item) for r in batch)

    b = DurableBatcher(tmp_path, sink, flush_concurrency=2, max_delay=0.005,
                       retry_initial_delay=0.001, retry_max_delay=0.01)
    b.submit("a-item", key="A")
    with pytest.raises(DeadLettered):
        b.submit("b-item", key="B").wait(10)
    assert b.stats().last_checkpoint == 0
    b.close(timeout=0.2)
    healthy.set()
    with Follower(str(tmp_path), sink, max_delay=0.005) as follower:
        assert wait_for(lambda: sorted(got) == [(1, "a-item"), (2, "b-item")]), got
        assert follower.dead_letters.list() == []
        assert wait_for(lambda: follower.stats().pending == 0)
        s = follower.stats()
    assert (s.submitted, s.delivered, s.dead_lettered) == (2, 2, 0)

