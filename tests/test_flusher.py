"""Delivery: batch triggers, flush, retries, dead letters, per-item outcomes, concurrency, shutdown."""

from __future__ import annotations

import random
import threading
import time

import pytest
from helpers import WAIT, Collector

from walbatch import (
    DeadLettered,
    DurableBatcher,
    PermanentSinkError,
    SinkError,
)
from walbatch.dlq import list_dead_letters


class Flaky(Collector):
    """Raises ``error`` on the first ``failures`` calls, then takes everything."""

    def __init__(self, failures: int, error: BaseException) -> None:
        super().__init__()
        self.failures = failures
        self.error = error
        self.calls = 0

    def write(self, batch) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        super().write(batch)


class Failing:
    """Raises ``error`` on every call; counts the calls."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    def write(self, batch) -> None:
        self.calls += 1
        raise self.error


def wait_until(predicate, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# --------------------------------------------------------------- triggers


def test_time_trigger_delivers_a_batch_smaller_than_max_items(make):
    sink = Collector()
    b = make(sink, max_items=1000, max_delay=0.02)
    receipts = b.submit_many(["a", "b", "c"])
    receipts.wait(WAIT)  # no flush(): only the timer can have sent it
    assert sink.items == ["a", "b", "c"]
    assert sink.reasons() == ["time"]
    assert b.stats().batches_by_reason["time"] == 1


def test_size_trigger_closes_a_batch_at_max_items(make):
    sink = Collector()
    b = make(sink, max_items=10, max_delay=3600)
    receipts = b.submit_many(range(25))
    receipts[19].wait(WAIT)  # the first two full batches go without any timer
    assert sink.sizes() == [10, 10]
    assert sink.reasons() == ["size", "size"]
    assert not receipts[20].delivered  # the open batch of 5 waits for its timer (an hour)
    b.flush(WAIT)
    assert sink.sizes() == [10, 10, 5]
    assert sink.reasons() == ["size", "size", "flush"]
    assert sink.items == list(range(25))


def test_bytes_trigger_closes_a_batch_before_max_bytes(make):
    sink = Collector()
    b = make(sink, max_items=1000, max_bytes=1000, max_delay=3600)
    item = "x" * 297  # 300 bytes encoded: three fit in 1000, a fourth would not
    receipts = b.submit_many([item] * 10)
    receipts[8].wait(WAIT)
    assert sink.sizes() == [3, 3, 3]
    assert sink.reasons() == ["bytes", "bytes", "bytes"]
    b.flush(WAIT)
    assert sink.sizes() == [3, 3, 3, 1]
    assert len(sink.items) == 10


def test_an_item_larger_than_max_bytes_travels_alone(make):
    sink = Collector()
    b = make(sink, max_items=1000, max_bytes=100, max_delay=3600)
    b.submit_many(["small", "L" * 500, "small too"])
    b.flush(WAIT)
    assert ["L" * 500] in [[item for _, item in recs] for _, _, recs in sink.batches]
    assert sink.items == ["small", "L" * 500, "small too"]


# ------------------------------------------------------------------ flush


def test_flush_delivers_everything_acknowledged_and_checkpoints_it(make):
    sink = Collector()
    b = make(sink, max_delay=3600, checkpoint_interval=3600)
    b.submit_many(range(7))
    b.submit("eight")
    b.flush(WAIT)
    assert sink.items == [0, 1, 2, 3, 4, 5, 6, "eight"]
    s = b.stats()
    assert s.last_checkpoint == 8 and s.pending == 0 and s.delivered == 8


def test_flush_raises_timeout_naming_the_last_sink_error(make):
    sink = Failing(SinkError("database is down"))
    b = make(sink)
    b.submit_many(range(3))
    wait_until(lambda: sink.calls > 0)
    with pytest.raises(TimeoutError) as info:
        b.flush(0.2)
    assert "database is down" in str(info.value)
    assert b.stats().pending == 3
    assert "database is down" in b.stats().last_error


# ---------------------------------------------------------------- retries


def test_transient_errors_are_retried_until_delivered(make):
    sink = Flaky(3, ConnectionError("connection refused"))
    b = make(sink)
    receipts = b.submit_many(["a", "b"])
    receipts.wait(WAIT)
    assert sink.items == ["a", "b"]  # once each, after the failures
    assert sink.calls == 4
    assert sink.batches[0][1] == 4  # Batch.attempt counts the tries
    s = b.stats()
    assert s.retries == 3
    assert "connection refused" in s.last_error
    assert s.dead_lettered == 0 and s.delivered == 2


def test_retryable_sink_error_is_retried(make):
    sink = Flaky(2, SinkError("try later", retryable=True))
    b = make(sink)
    b.submit("x").wait(WAIT)
    assert sink.items == ["x"]
    assert b.stats().retries == 2


@pytest.mark.parametrize("error", [
    SinkError("bad data", retryable=False),
    PermanentSinkError("bad data"),
])
def test_permanent_sink_errors_go_straight_to_dead_letters(make, logdir, error):
    sink = Failing(error)
    b = make(sink)
    r = b.submit({"bad": True})
    with pytest.raises(DeadLettered, match="bad data") as info:
        r.wait(WAIT)
    assert info.value.seq == r.seq
    assert sink.calls == 1
    s = b.stats()
    assert s.retries == 0 and s.dead_lettered == 1 and s.pending == 0
    (dead,) = list_dead_letters(str(logdir))
    assert dead.item == {"bad": True} and "bad data" in dead.error
    assert dead.error_type == type(error).__name__


def test_types_in_permanent_errors_go_straight_to_dead_letters(make, logdir):
    sink = Failing(KeyError("no such column"))
    b = make(sink, permanent_errors=(LookupError,))
    receipts = b.submit_many(["a", "b"])
    for r in receipts:
        with pytest.raises(DeadLettered, match="no such column"):
            r.wait(WAIT)
    assert sink.calls == 1
    assert b.stats().retries == 0
    assert [(d.item, d.error_type) for d in list_dead_letters(str(logdir))] == [
        ("a", "KeyError"), ("b", "KeyError")]


def test_other_errors_are_not_made_permanent_by_permanent_errors(make):
    sink = Flaky(2, ConnectionError("flaky"))
    b = make(sink, permanent_errors=(LookupError,))
    b.submit("x").wait(WAIT)
    assert sink.items == ["x"]


def test_retry_limit_dead_letters_after_that_many_attempts(make, logdir):
    sink = Failing(ConnectionError("still down"))
    b = make(sink, retry_limit=3)
    r = b.submit("doomed")
    with pytest.raises(DeadLettered, match="still down"):
        r.wait(WAIT)
    assert sink.calls == 3
    (dead,) = list_dead_letters(str(logdir))
    assert dead.attempts == 3 and dead.item == "doomed"
    # the flusher goes on with later items
    later = b.submit("next")
    with pytest.raises(DeadLettered):
        later.wait(WAIT)
    assert b.stats().dead_lettered == 2


# ------------------------------------------------------- per-item outcomes


def test_per_item_outcomes_dead_letter_only_the_failed_item(make, logdir):
    taken: list[object] = []

    def sink(batch):
        out = []
        for r in batch:
            if r.item == "poison":
                out.append(ValueError("cannot parse poison"))
            else:
                taken.append(r.item)
                out.append(None)
        return out

    b = make(sink)
    receipts = b.submit_many(["a", "poison", "c"])
    receipts[0].wait(WAIT)
    receipts[2].wait(WAIT)
    with pytest.raises(DeadLettered, match="cannot parse poison"):
        receipts[1].wait(WAIT)
    assert taken == ["a", "c"]
    assert [(d.seq, d.item) for d in list_dead_letters(str(logdir))] == [(receipts[1].seq, "poison")]
    s = b.stats()
    assert (s.delivered, s.dead_lettered, s.pending) == (2, 1, 0)


def test_retryable_per_item_outcome_retries_that_item_alone(make):
    calls: list[list[object]] = []
    lock = threading.Lock()

    def sink(batch):
        with lock:
            calls.append([r.item for r in batch])
            first_call = len(calls) == 1
        return [SinkError("busy") if first_call and r.item == "b" else None for r in batch]

    b = make(sink)
    b.submit_many(["a", "b", "c"]).wait(WAIT)
    assert calls == [["a", "b", "c"], ["b"]]
    s = b.stats()
    assert s.retries == 1 and s.delivered == 3 and s.dead_lettered == 0


def test_wrong_number_of_outcomes_is_an_error_not_a_silent_crash(make):
    calls = []

    def sink(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            return [None]  # one outcome for a batch of three: a sink bug
        return None

    b = make(sink)
    b.submit_many(["a", "b", "c"]).wait(WAIT)
    s = b.stats()
    assert "1 outcomes for a batch of 3" in s.last_error
    assert s.retries == 1 and s.delivered == 3
    b.submit("the flusher is still alive").wait(WAIT)


def test_outcomes_that_are_not_exceptions_are_results_not_errors(make):
    # A value other than None or an exception is that item's result (tests/test_results.py).
    b = make(lambda batch: ["ok"] * len(batch))
    assert b.submit("x").wait(WAIT) == "ok"
    assert b.stats().last_error is None and b.stats().delivered == 1


# ------------------------------------------------------------ concurrency


def test_flush_concurrency_with_out_of_order_completions_delivers_everything(make):
    sink = Collector()

    def slow_sink(batch):
        time.sleep(random.uniform(0, 0.005))
        sink.write(batch)

    b = make(slow_sink, flush_concurrency=4, max_items=5)
    receipts = [b.submit_many([{"n": n} for n in range(i, i + 10)]) for i in range(0, 200, 10)]
    b.flush(WAIT)
    for rs in receipts:
        assert all(r.delivered for r in rs)
    assert sorted(sink.seqs) == list(range(1, 201))
    assert len(set(sink.seqs)) == 200
    s = b.stats()
    assert s.last_checkpoint == 200 and s.delivered == 200 and s.pending == 0


def test_checkpoint_never_covers_a_batch_still_at_the_sink(make, logdir):
    blocked_seq = 23
    release = threading.Event()
    first = Collector()

    def sink(batch):
        if any(r.seq == blocked_seq for r in batch):
            release.wait(WAIT)  # this batch is stuck at the sink while the others complete
            return
        time.sleep(random.uniform(0, 0.003))
        first.write(batch)

    b = make(sink, flush_concurrency=4, max_items=5)
    try:
        b.submit_many(range(1, 61))
        wait_until(lambda: len(first.seqs) == 55)  # every batch but the blocked one
        with pytest.raises(TimeoutError):
            b.flush(0.2)
        cp = b.stats().last_checkpoint
        assert cp < blocked_seq
        assert set(range(1, cp + 1)) <= set(first.seqs)  # everything under it was delivered
        b.close(timeout=0.2)
    finally:
        release.set()

    # Reopen with a held sink to read the final checkpoint the close left behind.
    go = threading.Event()
    again = Collector()

    def held(batch):
        go.wait(WAIT)
        again.write(batch)

    b2 = make(held)
    final_cp = b2.stats().last_checkpoint
    assert cp <= final_cp < blocked_seq
    go.set()
    b2.flush(WAIT)
    # everything above the checkpoint is redelivered, the stuck batch included ...
    assert sorted(set(again.seqs)) == list(range(final_cp + 1, 61))
    assert b2.stats().batches_by_reason["replay"] > 0
    # ... and everything under it had really been delivered by the first run
    assert set(range(1, final_cp + 1)) <= set(first.seqs)


# --------------------------------------------------------------- shutdown


def test_close_with_a_sink_that_keeps_failing_returns_and_keeps_the_items(make):
    sink = Failing(SinkError("unreachable"))
    b = make(sink)
    b.submit_many(range(10))
    wait_until(lambda: sink.calls > 0)
    started = time.monotonic()
    b.close(timeout=0.5)
    assert time.monotonic() - started < 0.5 + 5  # generous: it gives up, it does not hang
    good = Collector()
    b2 = make(good)
    b2.flush(WAIT)
    assert good.items == list(range(10))


def test_close_cuts_a_long_retry_backoff_short(make):
    sink = Failing(SinkError("unreachable"))
    b = make(sink, retry_initial_delay=60, retry_max_delay=60)
    b.submit("x")
    wait_until(lambda: sink.calls > 0)
    started = time.monotonic()
    b.close(timeout=0.2)
    assert time.monotonic() - started < 0.2 + 5
    good = Collector()
    make(good).flush(WAIT)
    assert good.items == ["x"]


def test_close_delivers_the_open_batch_with_reason_shutdown(make):
    sink = Collector()
    b = make(sink, max_delay=3600)
    b.submit_many(["a", "b"])
    b.close(timeout=WAIT)
    assert sink.items == ["a", "b"]
    assert sink.reasons() == ["shutdown"]


def test_fully_delivered_segments_are_deleted(make, logdir):
    release = threading.Event()
    sink = Collector()

    def gated(batch):
        release.wait(WAIT)
        sink.write(batch)

    b = make(gated, segment_bytes=4096)
    try:
        for i in range(100):
            b.submit_many([f"{i:03d}-" + "z" * 100] * 3)
        before = b.stats()
        assert before.segments >= 5
    finally:
        release.set()
    b.flush(WAIT)
    after = b.stats()
    assert after.segments == 1  # only the active segment is left
    assert after.log_bytes < before.log_bytes
    assert len(list((logdir / "segments").iterdir())) == 1
    assert len(sink.items) == 300


def test_a_checkpoint_that_cannot_be_written_is_retried_once_a_second_and_flush_says_so(tmp_path):
    # A full disk made the checkpoint write fail at every loop turn while a flush
    # waited (a warning each time, ~10/s), and the flush's timeout said "0 item(s)
    # not delivered" after everything had been delivered.
    import errno

    from simfs import SimFileSystem

    fs = SimFileSystem()
    sink = Collector()
    b = DurableBatcher(str(tmp_path), sink, _fs=fs, max_delay=0.01)  # dlq.db: a real file
    try:
        b.submit_many(["a", "b"])
        fs.fail("write_file", errno.ENOSPC, times=1000, path_contains="checkpoint")
        with pytest.raises(TimeoutError, match="delivered, but the checkpoint could not be written"):
            b.flush(timeout=2.5)
        assert sink.items == ["a", "b"]
        with fs._mu:
            left = sum(1 for op, _, _ in fs._faults if op == "write_file")
        assert 1000 - left <= 5, f"{1000 - left} checkpoint writes in 2.5 s"
        with fs._mu:
            fs._faults.clear()  # space again
        b.flush(timeout=WAIT)
        assert b.stats().last_checkpoint == 2
    finally:
        b.close(timeout=1)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()],
                         ids=["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
def test_a_sink_raising_a_base_exception_is_retried_like_any_failure(make, exc):
    # It used to stop delivery for the rest of the process and re-raise SystemExit
    # in every thread calling flush() or Receipt.wait().
    calls = []

    def sink(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise exc
        return None

    b = make(sink)
    b.submit("a")
    b.flush(WAIT)
    b.submit("b").wait(WAIT)
    assert b.stats().delivered == 2 and b.stats().retries >= 1


def test_wait_reports_a_dead_letter_even_past_what_memory_remembers(make, monkeypatch):
    # Past 100,000 remembered dead seqs, wait() returned as if delivered.
    import walbatch.progress

    monkeypatch.setattr(walbatch.progress, "MAX_REMEMBERED_DEAD", 3)

    def refuse_odd(batch):
        return [PermanentSinkError("odd") if r.item % 2 else None for r in batch]

    b = make(refuse_odd, max_items=4)  # five batches: the later ones past the cap
    receipts = b.submit_many(list(range(20)))
    b.flush(WAIT)
    for r, item in zip(receipts, range(20), strict=True):
        if item % 2:
            with pytest.raises(DeadLettered, match="odd"):
                r.wait(WAIT)
        else:
            r.wait(WAIT)
