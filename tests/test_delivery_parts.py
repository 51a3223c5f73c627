"""The delivery side's parts, each alone: progress, the sink caller, the dispatcher, the intake.

DurableBatcher tests (test_flusher.py, test_keyed.py, test_policies.py) cover them
together; these pin each part's own contract without a flusher thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import msgpack
import pytest
from helpers import WAIT

from walbatch import DurableBatcher
from walbatch.batcher import AdaptiveLimit, ClosedBatch
from walbatch.checkpoint import Checkpoint
from walbatch.dispatch import Dispatcher
from walbatch.dlq import DeadLetterStore
from walbatch.errors import Closed, DeadLettered, PermanentSinkError, SinkError
from walbatch.intake import Intake
from walbatch.log import Log
from walbatch.options import Options
from walbatch.progress import Progress, runs_of
from walbatch.record import Record
from walbatch.sinkcall import Shutdown, SinkCaller

LOG_ID = uuid.UUID(int=7)


def progress(seq: int = 0) -> Progress:
    cv = threading.Condition(threading.Lock())
    return Progress(Checkpoint(LOG_ID, seq, seq, 0, seq), cv, threading.Event(), lambda s: None)


def recs(*seqs: int) -> list[Record]:
    return [Record(s, f"item-{s}") for s in seqs]


# ------------------------------------------------------------------ progress

def test_progress_moves_only_over_a_contiguous_prefix_whatever_the_completion_order():
    p = progress()
    p.complete_records(recs(4, 5, 6), {})
    assert p.done_through == 0 and p.delivered_above == 3
    assert p.completed(5) and not p.completed(2)
    p.complete_records(recs(1, 2, 3), {2: "refused"})
    assert p.done_through == 6
    assert (p.delivered_total, p.dead_total, p.delivered_above, p.dead_above) == (5, 1, 0, 0)


def test_progress_completes_a_keyed_batch_run_by_run():
    p = progress()
    p.complete_records(recs(1, 3, 5), {3: "refused"})  # key A; 2 and 4 belong to key B
    assert p.done_through == 1
    p.complete_records(recs(2, 4), {})
    assert p.done_through == 5
    assert (p.delivered_total, p.dead_total) == (4, 1)


def test_runs_of_consecutive_seqs():
    assert runs_of([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)]
    assert runs_of([]) == []


def test_wait_seq_answers_delivered_dead_timeout_closed_and_fatal():
    p = progress()
    p.complete_records(recs(1, 2), {2: "PermanentSinkError: no"})
    p.wait_seq(1, 0)
    with pytest.raises(DeadLettered, match="no"):
        p.wait_seq(2, 0)
    with pytest.raises(TimeoutError, match="seq 3 not delivered"):
        p.wait_seq(3, 0.01)
    p.exited.set()
    with pytest.raises(Closed):
        p.wait_seq(3, WAIT)
    p.fail(RuntimeError("the flusher died"))
    with pytest.raises(RuntimeError, match="the flusher died"):
        p.wait_seq(3, WAIT)


def test_a_waiter_wakes_when_another_thread_completes_its_seq():
    p = progress()
    threading.Timer(0.05, p.complete_records, (recs(1), {})).start()
    t0 = time.monotonic()
    p.wait_seq(1, WAIT)
    assert time.monotonic() - t0 < WAIT


def test_flush_waits_for_the_checkpoint_not_only_delivery():
    p = progress()
    p.complete_records(recs(1), {})
    with pytest.raises(TimeoutError, match="checkpoint could not be written"):
        p.flush(1, 0.01)
    assert p.flush_waiters == 0
    p.persisted = Checkpoint(LOG_ID, 1, 1, 0, 1)
    p.flush(1, 0.01)


# ------------------------------------------------------------- adaptive limit

def test_adaptive_limit_grows_while_batches_fill_and_halves_on_trouble():
    a = AdaptiveLimit(min_items=10, max_items=100, target_latency=1.0)
    assert a.take_wanted() == 10 and a.take_wanted() is None
    assert a.answered(ok=True, latency=0.01, full=True) and a.limit == 15
    assert not a.answered(ok=True, latency=0.01, full=False)  # not full: no reason to grow
    for _ in range(20):
        a.answered(ok=True, latency=0.01, full=True)
    assert a.limit == 100
    assert a.answered(ok=True, latency=5.0, full=True) and a.limit == 50  # too slow
    assert a.answered(ok=False, latency=None, full=False) and a.limit == 25
    for _ in range(10):
        a.answered(ok=False, latency=None, full=False)
    assert a.limit == 10 and a.take_wanted() == 10


# ---------------------------------------------------------------- sink caller

@pytest.fixture
def store(tmp_path):
    s = DeadLetterStore(str(tmp_path / "dlq.db"))
    yield s
    s.close()


def caller(sink, store, **options) -> tuple[SinkCaller, Progress, Shutdown]:
    opts = Options(**{"retry_initial_delay": 0.001, "retry_max_delay": 0.002, **options})
    p, sd = progress(), Shutdown()
    return SinkCaller(sink, opts, store, str(LOG_ID), p, sd), p, sd


class Sink:
    def __init__(self, answer):
        self.answer = answer
        self.calls: list[list[int]] = []

    def write(self, batch):
        self.calls.append([r.seq for r in batch])
        return self.answer(batch, len(self.calls))


def test_a_refused_item_is_dead_lettered_alone_and_the_rest_completes(store):
    sink = Sink(lambda b, n: [PermanentSinkError("bad") if r.seq == 2 else None for r in b])
    c, p, _ = caller(sink, store)
    c.deliver(ClosedBatch(recs(1, 2, 3), 30, "size"))
    assert sink.calls == [[1, 2, 3]]
    assert p.done_through == 3 and (p.delivered_total, p.dead_total) == (2, 1)
    assert [(d.seq, d.item) for d in store.list()] == [(2, "item-2")]


def test_a_retryable_item_is_retried_alone_until_taken(store):
    sink = Sink(lambda b, n: [SinkError("busy", retryable=True) if r.seq == 2 and n < 3 else None
                              for r in b])
    c, p, _ = caller(sink, store)
    c.deliver(ClosedBatch(recs(1, 2, 3), 30, "size"))
    assert sink.calls == [[1, 2, 3], [2], [2]]
    assert (p.delivered_total, p.dead_total, p.retries) == (3, 0, 2)


def test_retry_limit_sends_a_failing_batch_to_the_dead_letters(store):
    def down(b, n):
        raise ConnectionError("down")
    c, p, _ = caller(Sink(down), store, retry_limit=3)
    c.deliver(ClosedBatch(recs(1, 2), 20, "size"))
    assert (p.delivered_total, p.dead_total, p.retries) == (0, 2, 2)
    assert all("ConnectionError: down" in d.error for d in store.list())


def test_a_batch_failing_at_the_shutdown_deadline_stays_in_the_log(store):
    def down(b, n):
        raise ConnectionError("down")
    c, p, sd = caller(Sink(down), store)
    sd.request(time.monotonic())  # the deadline is now
    c.deliver(ClosedBatch(recs(1, 2), 20, "shutdown"))
    assert sd.abandoned
    assert p.done_through == 0 and not p.completed(1) and store.count() == 0


def test_outcomes_of_the_wrong_length_fail_the_batch_and_it_is_retried(store):
    sink = Sink(lambda b, n: [None] if n == 1 else None)
    c, p, _ = caller(sink, store)
    c.deliver(ClosedBatch(recs(1, 2), 20, "size"))
    assert sink.calls == [[1, 2], [1, 2]]
    assert "1 outcomes for a batch of 2" in (p.last_error or "")
    assert p.delivered_total == 2


def test_the_breaker_opens_after_consecutive_failures(store):
    def flaky(b, n):
        if n <= 2:
            raise ConnectionError("down")
    c, p, _ = caller(Sink(flaky), store, breaker_failures=2, breaker_cooldown=0.05)
    t0 = time.monotonic()
    c.deliver(ClosedBatch(recs(1), 10, "size"))
    assert time.monotonic() - t0 >= 0.05  # the third attempt waited out the cool-down
    assert c.breaker is not None and c.breaker.opened == 1 and c.breaker.state == "closed"
    assert p.delivered_total == 1


def test_a_combine_hook_that_invents_a_seq_is_retried_and_drops_nothing(store):
    calls = []

    def combine(batch):
        calls.append(1)
        return [Record(99, "made up")] if len(calls) == 1 else batch[-1:]

    sink = Sink(lambda b, n: None)
    c, p, _ = caller(sink, store, combine=combine)
    c.deliver(ClosedBatch(recs(1, 2, 3), 30, "size"))
    assert sink.calls == [[3]]
    assert (p.delivered_total, p.coalesced) == (3, 2)
    assert "seq 99" in (p.last_error or "")


# ----------------------------------------------------------------- dispatcher

def test_the_dispatcher_keeps_each_keys_batches_in_order_within_its_slots():
    p, sd = progress(), Shutdown()
    lock = threading.Lock()
    at_sink: set[object] = set()
    seen: list[tuple[object, int]] = []
    most = [0]

    def deliver(closed):
        with lock:
            assert closed.key not in at_sink, "two batches of one key at the sink at once"
            at_sink.add(closed.key)
            most[0] = max(most[0], len(at_sink))
        time.sleep(0.002)
        with lock:
            seen.append((closed.key, closed.items[0].seq))
            at_sink.discard(closed.key)
        p.complete_records(closed.items, {})

    d = Dispatcher(3, deliver, p, sd)
    seq = 0
    for _ in range(10):
        for key in ("a", "b", "c", "d", "e"):
            seq += 1
            d.dispatch(ClosedBatch([Record(seq, None)], 1, "size", key))
    p.wait_seq(seq, WAIT)
    deadline = time.monotonic() + WAIT
    while d.inflight and time.monotonic() < deadline:
        time.sleep(0.001)
    d.close()
    assert len(seen) == 50 and most[0] <= 3
    for key in "abcde":
        order = [s for k, s in seen if k == key]
        assert order == sorted(order), f"key {key} delivered out of order: {order}"


def test_the_dispatcher_delivers_inline_with_one_slot_and_nothing_once_abandoned():
    p, sd = progress(), Shutdown()
    got = []
    d = Dispatcher(1, lambda c: got.append((threading.current_thread(), c.items[0].seq)), p, sd)
    d.dispatch(ClosedBatch([Record(1, None)], 1, "size"))
    sd.abandoned = True
    d.dispatch(ClosedBatch([Record(2, None)], 1, "size"))
    assert got == [(threading.current_thread(), 1)]


# -------------------------------------------------------------------- intake

def test_intake_serves_frames_from_memory_and_falls_back_to_disk_on_a_gap(tmp_path):
    log = Log.open(str(tmp_path), role="owner")
    try:
        cv = threading.Condition(threading.Lock())
        intake = Intake(log, cv, memory_tail_bytes=1 << 20, read_from=1)

        def commit(*items: bytes) -> None:
            first = log.append(b"".join(items), len(items))
            log.sync()
            intake.on_durable(first, len(items), b"".join(items))

        commit(b"\xa1a", b"\xa1b")
        frames = intake.take(1)
        assert [(f.first_seq, f.count) for f in frames] == [(1, 2)]
        assert intake.take(3) == []
        # A frame the committer never handed over (e.g. written by another path):
        # the tail no longer starts where the reader is, so it is read from disk.
        log.append(b"\xa1c", 1)
        log.sync()
        commit(b"\xa1d")
        frames = intake.take(3)
        assert [(f.first_seq, f.count) for f in frames] == [(3, 1), (4, 1)]
        assert intake.take(5) == []
        commit(b"\xa1e")  # caught up with the disk: memory again
        assert [(f.first_seq, f.payload) for f in intake.take(5)] == [(5, b"\xa1e")]
        intake.close()
    finally:
        log.close()


def test_intake_wakes_a_sleeping_flusher_once_enough_items_wait(tmp_path):
    log = Log.open(str(tmp_path), role="owner")
    try:
        cv = threading.Condition(threading.Lock())
        intake = Intake(log, cv, memory_tail_bytes=1 << 20, read_from=1)
        woke = threading.Event()

        def sleeper():
            with cv:
                intake.sleep(WAIT, wake_items=2)
            woke.set()

        t = threading.Thread(target=sleeper)
        t.start()
        deadline = time.monotonic() + WAIT
        while not intake._waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        for item in (b"\xa1a", b"\xa1b"):
            first = log.append(item, 1)
            log.sync()
            intake.on_durable(first, 1, item)
            if item == b"\xa1a":
                assert not woke.wait(0.05)  # one item of the two it waits for
        assert woke.wait(WAIT)
        t.join(WAIT)
        intake.close()
    finally:
        log.close()


def test_intake_keeps_handed_over_items_only_while_its_tail_is_small(tmp_path):
    # Decoded items take about ten times their bytes: a flusher that falls behind
    # must hold bytes, not objects (the tail may grow to memory_tail_bytes).
    log = Log.open(str(tmp_path), role="owner")
    try:
        intake = Intake(log, threading.Condition(threading.Lock()), memory_tail_bytes=64 << 20,
                        read_from=1)
        big = msgpack.packb("x" * (1 << 20))
        first = 1
        for _ in range(6):
            first = log.append(big, 1)
            log.sync()
            intake.on_durable(first, 1, big, ["x" * (1 << 20)])
        frames = intake.take(1)
        assert [f.decoded is not None for f in frames] == [True] * 3 + [False] * 3  # 4 MiB
        assert all(msgpack.unpackb(f.payload) == "x" * (1 << 20) for f in frames)
        intake.close()
    finally:
        log.close()


def test_items_handed_over_decoded_reach_the_sink_in_seq_order_among_others(tmp_path):
    # The daemon's batches come with their items decoded; a commit group joins them with
    # submits that do not: every seq must still get its own item, whichever way it came.
    got: dict[int, object] = {}
    handed: list[object] = []

    def sink(batch):
        for r in batch:
            got[r.seq] = r.item

    async def main(b):
        async def decoded(i):
            items = [{"d": i, "k": k} for k in range(20)]
            handed.extend(items)
            payload = b"".join(msgpack.packb(x) for x in items)
            return await b._asubmit_payload_future(payload, items)

        async def plain(i):
            return await b.asubmit_many([{"p": i, "k": k} for k in range(7)])

        mixed = await asyncio.gather(*(plain(i) if i % 2 else decoded(i) for i in range(60)))
        return [*mixed, await decoded(62)]  # alone in its group: handed over whole

    with DurableBatcher(str(tmp_path), sink, max_delay=0.01) as b:
        receipts = asyncio.run(main(b))
        b.flush(WAIT)
    expect = {}
    for i, rs in [*enumerate(receipts[:-1]), (62, receipts[-1])]:
        for k, seq in enumerate(rs.seqs):
            expect[seq] = {"p": i, "k": k} if i % 2 else {"d": i, "k": k}
    assert got == expect
    assert any(any(x is h for h in handed) for x in got.values())  # the hand-off happened
