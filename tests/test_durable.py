"""DurableBatcher, the embedded API: submit, receipts, group commit, close, reopen, quota."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from helpers import FAST, WAIT, Collector
from systrace import STRACE, traced

from walbatch import (
    Closed,
    DurableBatcher,
    LogFull,
    LogLocked,
    SinkError,
)


class Switch:
    """A sink that is down (raises a transient SinkError) until ``up`` is set."""

    def __init__(self, up: bool = False) -> None:
        self.up = threading.Event()
        if up:
            self.up.set()
        self.taken = Collector()
        self.failures = 0

    def write(self, batch) -> None:
        if not self.up.is_set():
            self.failures += 1
            raise SinkError("sink is down for maintenance")
        self.taken.write(batch)


class Gate:
    """A sink that holds every batch until ``release()``: nothing completes before that."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.taken = Collector()

    def write(self, batch) -> None:
        if not self.open.wait(WAIT):
            raise SinkError("gate never opened")
        self.taken.write(batch)

    def release(self) -> None:
        self.open.set()


def assert_tally(b: DurableBatcher) -> None:
    s = b.stats()
    assert s.submitted == s.delivered + s.dead_lettered + s.pending, s


def run_with_timeout(fn, timeout: float = WAIT) -> None:
    """Run ``fn`` in a thread; fail (instead of hanging) if it does not return in time."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as ex:  # reported to the test thread
            errors.append(ex)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} did not return within {timeout}s (deadlock?)"
    if errors:
        raise errors[0]


def reopen_when_unlocked(directory, sink, **options) -> DurableBatcher:
    """Reopen ``directory``, retrying while a close that is finishing still holds the lock."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return DurableBatcher(directory, sink, **{**FAST, **options})
        except LogLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# ------------------------------------------------------------------ submit


def test_submit_returns_receipts_with_dense_increasing_seqs(make):
    b = make(Collector())
    receipts = [b.submit({"n": i}) for i in range(20)]
    assert [r.seq for r in receipts] == list(range(1, 21))
    more = b.submit_many(["a", "b", "c"])
    assert list(more.seqs) == [21, 22, 23]
    assert [r.seq for r in more] == [21, 22, 23]
    assert b.submit("d").seq == 24


def test_receipt_wait_returns_after_the_item_reached_the_sink(make):
    sink = Collector()
    b = make(sink)
    r = b.submit({"hello": "world"})
    r.wait(WAIT)
    assert r.delivered
    assert (r.seq, {"hello": "world"}) in sink.records


def test_receipt_wait_raises_closed_when_the_batcher_closes_first(make):
    b = make(Switch())
    r = b.submit("stuck")
    b.close(timeout=0.1)
    with pytest.raises(Closed):
        r.wait(WAIT)


def test_receipt_wait_times_out_while_the_sink_is_down(make):
    down = Switch()
    b = make(down)
    r = b.submit("stuck")
    deadline = time.monotonic() + WAIT
    while down.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(TimeoutError, match="sink is down for maintenance"):
        r.wait(0.2)
    assert not r.delivered


def test_items_arrive_in_submit_order_and_intact(make):
    sink = Collector()
    b = make(sink)
    items = [None, True, 1, -(2**63), 2**64 - 1, 1.5, "text", b"\x00\xff", [1, [2]], {"k": {"n": [1]}}]
    for item in items:
        b.submit(item)
    b.flush(WAIT)
    assert sink.items == items
    assert sink.seqs == list(range(1, len(items) + 1))


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian: apt-get install strace)")
def test_submit_many_is_one_commit_and_one_fsync(make, logdir, tmp_path):
    gate = Gate()  # nothing completes, so no checkpoint write adds fsyncs meanwhile
    b = make(gate)
    try:
        b.submit("first")  # creates the segment (its own fsyncs)
        before = b.stats()
        with traced(str(tmp_path / "trace")) as trace:
            receipts = b.submit_many([{"i": i} for i in range(100)])
        after = b.stats()
        assert len(receipts) == 100
        assert after.commit_groups == before.commit_groups + 1
        # One durability point at the operating system: the frame's O_DSYNC write.
        assert sum(trace.durability_points(str(logdir)).values()) == 1, trace.durability_points(str(logdir))
        assert after.submitted == before.submitted + 100
    finally:
        gate.release()
    receipts.wait(WAIT)
    assert gate.taken.items == ["first"] + [{"i": i} for i in range(100)]


@pytest.mark.parametrize("bad", [2**64, {3, 4}, "\ud800"], ids=["int", "set", "surrogate"])
def test_a_threads_first_submit_many_of_a_bad_item_raises_the_documented_type_error(make, bad):
    # The per-thread Packer is made on a thread's first call; an item that failed
    # that very call used to escape as msgpack's own OverflowError/ValueError.
    b = make(Collector())
    errors: list[BaseException] = []

    def first_call() -> None:
        try:
            b.submit_many(["ok", bad])
        except BaseException as ex:
            errors.append(ex)

    t = threading.Thread(target=first_call)
    t.start()
    t.join()
    assert len(errors) == 1 and type(errors[0]) is TypeError
    assert "items[1]" in str(errors[0])
    assert b.stats().submitted == 0


def test_submit_many_is_all_or_nothing_when_an_item_cannot_be_encoded(make):
    sink = Collector()
    b = make(sink)
    b.submit("before")
    before = b.stats()
    with pytest.raises(TypeError) as info:
        b.submit_many([1, 2, {3, 4}, 5])
    message = str(info.value)
    assert "set" in message and "items[2]" in message
    after = b.stats()
    assert after.submitted == before.submitted
    assert after.log_bytes == before.log_bytes
    assert after.commit_groups == before.commit_groups
    assert b.submit("after").seq == before.submitted + 1  # the seqs were not consumed
    b.flush(WAIT)
    assert sink.items == ["before", "after"]


def test_submit_of_an_unserialisable_item_raises_type_error_naming_its_type(make):
    sink = Collector()
    b = make(sink)
    with pytest.raises(TypeError, match="object"):
        b.submit(object())
    assert b.stats().submitted == 0
    assert b.submit("ok").seq == 1
    b.flush(WAIT)
    assert sink.items == ["ok"]


@pytest.mark.parametrize("one_item", ["abc", b"abc", {"a": 1, "b": 2}], ids=["str", "bytes", "dict"])
def test_submit_many_of_a_single_str_bytes_or_dict_is_a_type_error(make, one_item):
    # Each is iterable: "abc" used to become three items, a dict its keys.
    b = make(Collector())
    with pytest.raises(TypeError, match="use submit for one item"):
        b.submit_many(one_item)
    assert b.stats().submitted == 0


def test_submit_many_of_nothing_writes_nothing(make):
    b = make(Collector())
    receipts = b.submit_many([])
    assert len(receipts) == 0
    assert b.stats().submitted == 0
    assert b.submit("x").seq == 1


def test_submit_after_close_raises_closed(make):
    b = make(Collector())
    b.submit("x")
    b.close(timeout=WAIT)
    assert b.closed
    with pytest.raises(Closed):
        b.submit("y")
    with pytest.raises(Closed):
        b.submit_many(["y", "z"])
    with pytest.raises(Closed):
        asyncio.run(b.asubmit("y"))


# ----------------------------------------------------------------- asyncio


def test_asubmit_from_200_tasks_gives_dense_unique_seqs_and_delivers_all(make):
    sink = Collector()
    b = make(sink)

    async def main():
        return await asyncio.gather(*(b.asubmit({"task": i}) for i in range(200)))

    receipts = asyncio.run(main())
    seqs = [r.seq for r in receipts]
    assert sorted(seqs) == list(range(1, 201))
    for r in receipts:
        r.wait(WAIT)
    assert sorted(sink.seqs) == list(range(1, 201))
    by_seq = dict(sink.records)
    for i, r in enumerate(receipts):  # each receipt's seq carries that task's own item
        assert by_seq[r.seq] == {"task": i}


def test_asubmit_many_mixed_with_asubmit(make):
    sink = Collector()
    b = make(sink)

    async def main():
        return await asyncio.gather(
            b.asubmit_many(["a1", "a2", "a3"]),
            b.asubmit("b"),
            b.asubmit_many(["c1", "c2"]),
            b.asubmit_many([]),
        )

    many_a, one_b, many_c, empty = asyncio.run(main())
    assert len(many_a) == 3 and len(many_c) == 2 and len(empty) == 0
    all_seqs = list(many_a.seqs) + [one_b.seq] + list(many_c.seqs)
    assert sorted(all_seqs) == list(range(1, 7))
    many_a.wait(WAIT)
    many_c.wait(WAIT)
    one_b.wait(WAIT)
    by_seq = dict(sink.records)
    assert [by_seq[s] for s in many_a.seqs] == ["a1", "a2", "a3"]
    assert [by_seq[s] for s in many_c.seqs] == ["c1", "c2"]
    assert by_seq[one_b.seq] == "b"


def test_asubmit_many_is_all_or_nothing(make):
    b = make(Collector())
    with pytest.raises(TypeError, match=r"items\[1\]"):
        asyncio.run(b.asubmit_many(["ok", object()]))
    assert b.stats().submitted == 0


# ----------------------------------------------------------- group commit


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian: apt-get install strace)")
def test_sixteen_threads_share_fsyncs(make, logdir, tmp_path):
    sink = Gate()  # nothing is delivered meanwhile: no checkpoint adds fsyncs
    b = make(sink)
    per_thread = 100
    seqs: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker(t: int) -> None:
        start.wait(WAIT)
        mine = [b.submit({"t": t, "i": i}).seq for i in range(per_thread)]
        with lock:
            seqs.extend(mine)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    with traced(str(tmp_path / "trace")) as trace:
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 3)
            assert not t.is_alive()
    total = 16 * per_thread
    assert sorted(seqs) == list(range(1, total + 1))
    s = b.stats()
    assert s.commit_groups < total / 2, s
    # Counted at the operating system: O_DSYNC writes, fdatasyncs, directory fsyncs.
    syncs = sum(trace.durability_points(str(logdir)).values())
    assert syncs < total / 2, (syncs, s)
    sink.release()
    b.flush(WAIT)
    assert sorted(sink.taken.seqs) == list(range(1, total + 1))


# ------------------------------------------------------------------ reopen


def test_reopen_replays_what_was_not_delivered(make, logdir):
    down = Switch()
    b = make(down)
    acked = [b.submit({"n": i}).seq for i in range(30)]
    acked += list(b.submit_many([{"n": i} for i in range(30, 50)]).seqs)
    b.close(timeout=0.2)
    assert down.failures > 0 and down.taken.records == []

    good = Collector()
    b2 = make(good)
    b2.flush(WAIT)
    assert good.seqs == acked
    assert good.items == [{"n": i} for i in range(50)]
    s = b2.stats()
    assert s.batches_by_reason["replay"] > 0
    assert s.submitted == 50 and s.delivered == 50 and s.pending == 0
    # new items continue the sequence after the replayed ones
    assert b2.submit("new").seq == 51


def test_reopen_does_not_redeliver_what_was_delivered_and_checkpointed(make, logdir):
    first = Collector()
    b = make(first)
    b.submit_many(range(10))
    b.flush(WAIT)
    b.close(timeout=WAIT)
    second = Collector()
    b2 = make(second)
    b2.submit("eleven")
    b2.flush(WAIT)
    assert first.seqs == list(range(1, 11))
    assert second.records == [(11, "eleven")]


def test_stats_tally_at_quiescent_points_across_reopen(make, logdir):
    def picky(batch):
        return [ValueError("odd") if r.item % 2 else None for r in batch]

    b = make(picky)
    assert_tally(b)
    b.submit_many(range(10))
    b.flush(WAIT)
    s = b.stats()
    assert (s.submitted, s.delivered, s.dead_lettered, s.pending) == (10, 5, 5, 0)
    assert_tally(b)
    b.close(timeout=WAIT)

    down = Switch()
    b2 = make(down)
    s = b2.stats()
    assert (s.submitted, s.delivered, s.dead_lettered, s.pending) == (10, 5, 5, 0)
    b2.submit_many(range(10, 14))
    with pytest.raises(TimeoutError):
        b2.flush(0.1)
    s = b2.stats()
    assert s.pending == 4
    assert_tally(b2)
    b2.close(timeout=0.1)

    gate = Gate()
    b3 = make(gate)
    s = b3.stats()
    assert (s.submitted, s.delivered, s.dead_lettered, s.pending) == (14, 5, 5, 4)
    gate.release()
    b3.flush(WAIT)
    assert sorted(gate.taken.items) == [10, 11, 12, 13]
    s = b3.stats()
    assert (s.submitted, s.delivered, s.dead_lettered, s.pending) == (14, 9, 5, 0)
    assert_tally(b3)


# -------------------------------------------------------------- ownership


def test_second_batcher_on_the_same_directory_raises_log_locked(make, logdir):
    b = make(Collector())
    with pytest.raises(LogLocked, match=str(logdir)):
        DurableBatcher(logdir, Collector())
    b.submit("still works")  # the failed open did not disturb the first one
    b.close(timeout=WAIT)
    make(Collector()).close(timeout=WAIT)  # the lock is released by close


# ------------------------------------------------------------------- close


def test_close_is_idempotent(make):
    sink = Collector()
    b = make(sink)
    b.submit("x")
    b.close(timeout=WAIT)
    b.close(timeout=WAIT)
    b.close(timeout=0)
    assert sink.items == ["x"]  # close delivered what was acknowledged


def test_close_from_another_thread(make):
    sink = Collector()
    b = make(sink)
    b.submit_many(range(5))
    run_with_timeout(lambda: b.close(timeout=WAIT))
    assert b.closed
    assert sorted(sink.items) == list(range(5))
    with pytest.raises(Closed):
        b.submit(5)


def test_close_from_two_threads_at_once(make):
    b = make(Collector())
    b.submit_many(range(100))
    threads = [threading.Thread(target=b.close, args=(WAIT,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
        assert not t.is_alive()
    assert b.stats().delivered == 100


@pytest.mark.parametrize("concurrency", [1, 4])
def test_close_from_inside_the_sink_does_not_deadlock(make, logdir, concurrency):
    holder: dict[str, DurableBatcher] = {}
    calls = Collector()
    closed_in_sink = threading.Event()

    def sink(batch):
        calls.write(batch)
        if any(r.item == "stop" for r in batch):
            holder["b"].close()  # the default close_timeout: a minute
            closed_in_sink.set()

    def scenario() -> None:
        b = holder["b"] = make(sink, close_timeout=60, flush_concurrency=concurrency)
        b.submit_many(["a", "b"])
        b.submit("stop")
        assert closed_in_sink.wait(WAIT), "the sink's close() did not return"
        with pytest.raises(Closed):
            b.submit("late")

    run_with_timeout(scenario)
    assert holder["b"].closed
    assert sorted(calls.seqs) == [1, 2, 3]
    # Once the close finished, the directory can be reopened; the batch that called
    # close() completed normally, so the final checkpoint covers it: nothing is replayed.
    again = Collector()
    b2 = reopen_when_unlocked(logdir, again)
    try:
        b2.flush(WAIT)
        assert again.seqs == []
        s = b2.stats()
        assert (s.submitted, s.delivered, s.pending) == (3, 3, 0)
    finally:
        b2.close(timeout=WAIT)


def test_context_manager_closes_and_delivers(logdir):
    sink = Collector()
    with DurableBatcher(logdir, sink, **FAST) as b:
        b.submit_many(range(3))
    assert b.closed
    assert sink.items == [0, 1, 2]


# ------------------------------------------------------------------- quota


def test_log_full_blocks_then_raises_and_recovers_without_losing_anything(make):
    sink = Switch()
    b = make(sink, segment_bytes=4096, max_log_bytes=8192, submit_timeout=0.3)
    acked: dict[int, str] = {}
    full = None
    for i in range(2000):
        item = f"item-{i:05d}-" + "x" * 80
        try:
            acked[b.submit(item).seq] = item
        except LogFull as ex:
            full = ex
            break
    assert full is not None, "the log never filled up"
    assert "max_log_bytes=8192" in str(full)
    assert "sink is down for maintenance" in str(full)  # the likely cause is named
    assert len(acked) > 10
    assert list(acked) == list(range(1, len(acked) + 1))
    with pytest.raises(LogFull):  # still full, and it says so every time
        b.submit(f"item-{99999:05d}-" + "x" * 80)

    sink.up.set()
    # once the sink is back, space frees up and submit works again
    r = b.submit("after recovery")
    acked[r.seq] = "after recovery"
    assert r.seq == len(acked)  # failed submits consumed no seq
    b.flush(WAIT)
    delivered = dict(sink.taken.records)
    assert delivered == acked
    assert_tally(b)


def test_log_full_then_reopen_delivers_every_acknowledged_item(make, logdir):
    b = make(Switch(), segment_bytes=4096, max_log_bytes=8192, submit_timeout=0.3)
    acked: dict[int, str] = {}
    with pytest.raises(LogFull):
        for i in range(2000):
            item = f"item-{i:05d}-" + "y" * 80
            acked[b.submit(item).seq] = item
    b.close(timeout=0.2)

    good = Collector()
    b2 = make(good, segment_bytes=4096, max_log_bytes=8192, submit_timeout=0.3)
    b2.flush(WAIT)
    assert dict(good.records) == acked
    assert b2.submit("room again").seq == len(acked) + 1


def test_an_item_larger_than_the_quota_raises_log_full_at_once(make):
    b = make(Collector(), segment_bytes=4096, max_log_bytes=8192, submit_timeout=WAIT)
    with pytest.raises(LogFull, match="never fit"):
        b.submit("z" * 10_000)
    assert b.stats().submitted == 0


# ----------------------------------------------------------------- options


def test_unknown_option_raises_type_error_naming_it(logdir):
    with pytest.raises(TypeError, match="max_itmes"):
        DurableBatcher(logdir, Collector(), max_itmes=10)
    DurableBatcher(logdir, Collector()).close(0)  # the failed open left no lock behind


@pytest.mark.parametrize("options", [
    {"max_items": 0},
    {"max_items": 1.5},
    {"max_bytes": -1},
    {"flush_concurrency": 0},
    {"max_delay": -0.1},
    {"submit_timeout": "soon"},
    {"segment_bytes": 4096, "max_log_bytes": 4096},
    {"on_corruption": "ignore"},
    {"retry_limit": 0},
    # Each of these was accepted and then killed the flusher (inf: a deadline past
    # time_t), hung (NaN compares false with everything) or ran with a wrong type.
    {"max_delay": float("inf")},
    {"checkpoint_interval": float("inf")},
    {"retry_max_delay": float("inf")},
    {"breaker_cooldown": float("inf")},
    {"close_timeout": float("inf")},
    {"max_delay": float("nan")},
    {"submit_timeout": float("nan")},
    {"close_timeout": float("nan")},
    {"retry_max_elapsed": float("nan")},
    {"retry_limit": "3"},
    {"retry_limit": 2.5},
    {"retry_limit": True},
    {"breaker_failures": True},
    {"adaptive_min_items": 1000, "max_items": 10, "adaptive_batching": True},
])
def test_invalid_option_values_raise_value_error(logdir, options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=name):
        DurableBatcher(logdir, Collector(), **options)
    DurableBatcher(logdir, Collector()).close(0)  # the failed open left no lock behind


@pytest.mark.parametrize("errors", [[ValueError], "x", (ValueError, 3)])
def test_permanent_errors_must_be_a_tuple_of_exception_classes(logdir, errors):
    with pytest.raises(TypeError, match="permanent_errors"):
        DurableBatcher(logdir, Collector(), permanent_errors=errors)


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 1e300])
def test_close_takes_any_timeout_and_closes(make, logdir, timeout):
    sink = Collector()
    b = make(sink)
    b.submit("x")
    b.close(timeout)
    assert sink.items == ["x"]
    DurableBatcher(logdir, None).close()  # the lock was released


# ------------------------------------------------------------- sqlite URL


def _rows(db_path) -> list[tuple]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT _seq, name FROM items ORDER BY _seq").fetchall()
    finally:
        conn.close()


def test_sqlite_url_sink_delivers_rows(make, tmp_path):
    db = tmp_path / "out.db"
    b = make(f"sqlite:///{db}")
    b.submit_many([{"name": f"n{i}"} for i in range(5)])
    b.flush(WAIT)
    assert _rows(db) == [(i + 1, f"n{i}") for i in range(5)]


CRASHER = """
import os, sqlite3, sys, time
from walbatch import DurableBatcher
logdir, db = sys.argv[1], sys.argv[2]
b = DurableBatcher(logdir, "sqlite:///" + db, max_delay=0.01, checkpoint_interval=3600)
b.submit_many([{"name": "n%d" % i} for i in range(20)])
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        if sqlite3.connect(db).execute("SELECT count(*) FROM items").fetchone()[0] == 20:
            break
    except sqlite3.OperationalError:
        pass
    time.sleep(0.01)
os._exit(0)  # a crash: delivered, but the checkpoint never moved
"""


def test_sqlite_url_sink_redelivery_after_a_crash_does_not_duplicate_rows(make, tmp_path, logdir):
    db = tmp_path / "out.db"
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    subprocess.run([sys.executable, str(script), str(logdir), str(db)], check=True, timeout=60,
                   cwd=os.getcwd())
    assert len(_rows(db)) == 20

    b = make(f"sqlite:///{db}")
    b.flush(WAIT)
    s = b.stats()
    assert s.batches_by_reason["replay"] > 0  # the 20 were delivered again ...
    assert s.delivered == 20
    assert _rows(db) == [(i + 1, f"n{i}") for i in range(20)]  # ... and dropped as duplicates


# ------------------------------------------------------------- writer only


def test_a_batcher_without_a_sink_only_writes_the_log(logdir, make):
    writer = DurableBatcher(logdir, None, **FAST)
    try:
        assert [writer.submit(i).seq for i in range(3)] == [1, 2, 3]
        with pytest.raises(Closed, match="no sink"):
            writer.flush(WAIT)
        assert writer.stats().pending == 3
    finally:
        writer.close(timeout=WAIT)
    sink = Collector()
    make(sink).flush(WAIT)
    assert sink.records == [(1, 0), (2, 1), (3, 2)]


def test_a_caught_up_log_whose_active_segment_fills_the_quota_takes_more(make, logdir):
    # Only sealed segments were freed, and only an append sealed one: with the active
    # segment past half the quota, a caught-up log refused every submit for good,
    # also after a reopen.
    sink = Collector()
    opts = {"segment_bytes": 1 << 20, "max_log_bytes": 2 << 20, "submit_timeout": 2}
    b = make(sink, **opts)
    items = [b"x" * 1000] * 700  # ~0.7 MB per call
    b.submit_many(items)
    b.submit_many(items)
    b.flush(WAIT)
    assert b.stats().pending == 0 and b.stats().log_bytes > (1 << 20)
    b.submit_many(items)
    b.flush(WAIT)
    b.close()
    b2 = make(Collector(), **opts)
    b2.submit_many(items)
    b2.flush(WAIT)
    assert len(sink.items) == 2100 and b2.stats().delivered == 2800


def test_asubmit_groups_stay_within_max_group_bytes_and_the_quota(make):
    # A whole event loop's queue went into one payload: 100 items of 300 bytes were
    # refused as "an item of 30356 bytes can never fit in max_log_bytes=16384".
    sink = Collector()
    b = make(sink, segment_bytes=8192, max_log_bytes=16384, max_group_bytes=4096,
             submit_timeout=WAIT)

    async def main() -> list:
        return await asyncio.gather(*(b.asubmit(f"{i:03d}" + "x" * 297) for i in range(100)))

    receipts = asyncio.run(main())
    assert sorted(r.seq for r in receipts) == list(range(1, 101))
    b.flush(WAIT)
    assert sorted(sink.items) == [f"{i:03d}" + "x" * 297 for i in range(100)]
    assert b.stats().commit_groups >= 100 * 304 // 4096


def test_submit_many_of_nothing_after_close_raises_closed(make):
    b = make(Collector())
    b.close()
    with pytest.raises(Closed):
        b.submit_many([])
    with pytest.raises(Closed):
        asyncio.run(b.asubmit_many([]))


def test_aflush_from_inside_the_sink_refuses_at_once(make):
    errors: list[BaseException] = []
    box: list[DurableBatcher] = []

    def sink(batch):
        try:
            asyncio.run(box[0].aflush(WAIT))
        except BaseException as ex:
            errors.append(ex)

    b = make(sink)
    box.append(b)
    t0 = time.monotonic()
    b.submit("x")
    b.flush(WAIT)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert time.monotonic() - t0 < WAIT / 2
