"""Delivery policies any sink gets: circuit breaker, retry by elapsed time and Retry-After,
coalescing (combine), adaptive batch size."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import WAIT, Collector

from walbatch import DeadLettered, Record, SinkError
from walbatch.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from walbatch.combine import last_by
from walbatch.dlq import list_dead_letters

# ----------------------------------------------------------- circuit breaker


def test_breaker_opens_after_n_failures_in_a_row_then_probes_once():
    cb = CircuitBreaker(failures=3, cooldown=10)
    for t in range(2):
        assert cb.wait_time(t) == 0
        cb.failure(t)
    assert cb.state == CLOSED
    cb.success()  # a success resets the run of failures
    for t in range(3):
        assert cb.wait_time(t) == 0
        cb.failure(t)
    assert cb.state == OPEN and cb.opened == 1
    assert cb.wait_time(5) == pytest.approx(7)
    assert cb.wait_time(12.5) == 0 and cb.state == HALF_OPEN  # the probe goes
    assert cb.wait_time(12.5) > 0  # nobody else while the probe is out
    cb.failure(13)  # the probe failed: open for another cool-down
    assert cb.state == OPEN and cb.opened == 2
    assert cb.wait_time(20) == pytest.approx(3)
    assert cb.wait_time(23) == 0
    cb.success()
    assert cb.state == CLOSED and cb.wait_time(23) == 0


class Outage:
    """A sink that is down until ``up`` is set; records when each call came."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.calls: list[float] = []
        self.taken = Collector()

    def write(self, batch) -> None:
        self.calls.append(time.monotonic())
        if not self.up.is_set():
            raise SinkError("connection refused")
        self.taken.write(batch)


def test_an_open_breaker_stops_calling_the_sink_then_a_probe_closes_it(make):
    sink = Outage()
    b = make(sink, breaker_failures=3, breaker_cooldown=0.4, retry_initial_delay=0.001,
             retry_max_delay=0.001)
    r = b.submit("x")
    deadline = time.monotonic() + WAIT
    while b.stats().breaker_state != "open" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert b.stats().breaker_state == "open"
    calls = len(sink.calls)  # the last of them failed and opened the circuit
    sink.up.set()
    r.wait(WAIT)
    # Nothing called the sink while the circuit was open: the next call is the probe,
    # a cool-down after the failure that opened it (times the sink itself recorded).
    assert sink.calls[calls] - sink.calls[calls - 1] >= 0.4, "called while the circuit was open"
    s = b.stats()
    assert s.breaker_state == "closed" and s.breaker_opens == 1
    assert sink.taken.items == ["x"] and s.delivered == 1


def test_close_does_not_wait_out_an_open_breaker(make):
    sink = Outage()
    b = make(sink, breaker_failures=1, breaker_cooldown=3600)
    b.submit("kept")
    deadline = time.monotonic() + WAIT
    while b.stats().breaker_state != "open" and time.monotonic() < deadline:
        time.sleep(0.005)
    closer = threading.Thread(target=b.close, kwargs={"timeout": 0.5})
    closer.start()
    closer.join(WAIT)  # a close that waited out the cool-down would take an hour
    assert not closer.is_alive(), "close() waited for the open circuit's cool-down"
    assert b.stats().pending == 1  # still in the log for the next open


# ------------------------------------------------------------------- retry


def test_retry_max_elapsed_dead_letters_a_batch_that_keeps_failing(make, logdir):
    sink = Outage()
    b = make(sink, retry_max_elapsed=0.3, retry_initial_delay=0.02, retry_max_delay=0.05)
    t0 = time.monotonic()
    r = b.submit({"n": 1})
    with pytest.raises(DeadLettered, match="connection refused"):
        r.wait(WAIT)
    assert time.monotonic() - t0 >= 0.3
    assert len(sink.calls) >= 2
    assert [d.item for d in list_dead_letters(str(logdir))] == [{"n": 1}]


def test_retry_after_from_the_sink_is_the_least_wait_before_the_next_attempt(make):
    calls: list[float] = []

    def sink(batch):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise SinkError("429 Too Many Requests", retry_after=0.4)

    b = make(sink, retry_initial_delay=0.001, retry_max_delay=0.001)
    b.submit("x").wait(WAIT)
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.4


# ----------------------------------------------------------------- combine


def test_last_by_keeps_the_last_update_per_user_and_counts_the_rest_delivered(make):
    got: list[tuple[int, int, int, list[tuple[int, object]]]] = []

    def sink(batch):
        got.append((batch.first_seq, batch.last_seq, batch.coalesced,
                    [(r.seq, r.item) for r in batch]))

    b = make(sink, combine=last_by("user_id"), max_items=6, max_delay=10)
    b.submit_many([{"user_id": u, "at": t} for t, u in enumerate([1, 2, 1, 3, 2, 1])])
    b.flush(WAIT)
    assert got == [(1, 6, 3, [(4, {"user_id": 3, "at": 3}), (5, {"user_id": 2, "at": 4}),
                              (6, {"user_id": 1, "at": 5})])]
    s = b.stats()
    assert s.delivered == 6 and s.coalesced == 3 and s.pending == 0
    assert s.submitted == s.delivered + s.dead_lettered + s.pending


def test_last_by_keeps_items_without_the_field():
    combine = last_by("id")
    from walbatch import Batch

    batch = Batch([Record(1, {"id": 1}), Record(2, "plain"), Record(3, {"id": 1}), Record(4, {})],
                  "log", "size")
    assert [r.seq for r in combine(batch)] == [2, 3, 4]


def test_a_combine_hook_that_fails_or_invents_seqs_is_retried_not_dropping_anything(make):
    attempts = []
    sink = Collector()

    def bad_then_good(batch):
        attempts.append(len(batch))
        if len(attempts) == 1:
            raise RuntimeError("bug in the hook")
        if len(attempts) == 2:
            return [Record(999, "invented")]
        return list(batch)

    b = make(sink, combine=bad_then_good)
    r = b.submit("x")
    r.wait(WAIT)
    assert sink.items == ["x"] and len(attempts) == 3
    s = b.stats()
    assert s.retries == 2 and s.delivered == 1 and s.coalesced == 0


def test_combine_applies_per_key(make):
    got: list[tuple[object, list[object]]] = []

    def sink(batch):
        got.append((batch.key, [r.item["v"] for r in batch]))

    b = make(sink, combine=last_by("id"), max_delay=10, max_items=100)
    for v in range(6):
        b.submit({"id": 1, "v": v}, key="even" if v % 2 == 0 else "odd")
    b.flush(WAIT)
    assert sorted(got, key=str) == sorted([("even", [4]), ("odd", [5])], key=str)
    assert b.stats().coalesced == 4


# ---------------------------------------------------------------- adaptive


def test_adaptive_batching_grows_while_fast_and_shrinks_when_slow(make):
    slow = threading.Event()
    sizes: list[int] = []

    def sink(batch):
        sizes.append(len(batch))
        if slow.is_set():
            time.sleep(0.06)

    b = make(sink, adaptive_batching=True, adaptive_min_items=2, max_items=64,
             adaptive_target_latency=0.03, max_delay=0.005)
    assert b.stats().batch_limit == 2
    for _ in range(40):
        b.submit_many(list(range(16)))
    b.flush(WAIT)
    assert b.stats().batch_limit == 64
    assert max(sizes) == 64 and sizes[0] <= 2
    slow.set()
    for _ in range(4):
        b.submit_many(list(range(64)))
    b.flush(WAIT)
    assert b.stats().batch_limit < 64


def test_adaptive_batching_is_off_by_default(make):
    b = make(Collector(), max_items=50)
    assert b.stats().batch_limit == 50


def test_per_item_retry_after_is_taken_from_the_retryable_failures(make):
    from walbatch import PermanentSinkError

    calls: list[float] = []

    def sink(batch):
        calls.append(time.monotonic())
        if len(calls) == 1:
            return [PermanentSinkError("refused"), SinkError("busy", retry_after=0.4)]
        return None

    b = make(sink, retry_initial_delay=0.001, retry_max_delay=0.001)
    rs = b.submit_many(["bad", "later"])
    b.flush(WAIT)
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.4
    assert b.stats().dead_lettered == 1 and b.stats().delivered == 1
    assert rs.count == 2
