"""batcher.py: the batching policy, driven by plain calls with the time passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walbatch.batcher import REASONS, BatchPolicy, ClosedBatch


def test_size_trigger_closes_at_max_items() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=3, max_bytes=1000, max_delay=10)
    assert p.add("a", 1, 0.0) == []
    assert p.add("b", 1, 0.0) == []
    assert p.add("c", 1, 0.0) == [ClosedBatch(["a", "b", "c"], 3, "size")]
    assert len(p) == 0
    assert p.deadline() is None


def test_bytes_trigger_closes_before_the_item_that_would_overflow() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=100, max_bytes=10, max_delay=10)
    assert p.add("a", 4, 0.0) == []
    assert p.add("b", 4, 0.0) == []
    # 4 + 4 + 4 > 10: the open batch closes without "c", which starts the next one.
    assert p.add("c", 4, 0.0) == [ClosedBatch(["a", "b"], 8, "bytes")]
    assert len(p) == 1
    assert p.take("flush") == ClosedBatch(["c"], 4, "flush")


def test_bytes_trigger_closes_a_batch_that_is_exactly_full() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=100, max_bytes=10, max_delay=10)
    assert p.add("a", 6, 0.0) == []
    assert p.add("b", 4, 0.0) == [ClosedBatch(["a", "b"], 10, "bytes")]
    assert len(p) == 0


def test_an_oversized_item_travels_alone() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=100, max_bytes=10, max_delay=10)
    assert p.add("big", 50, 0.0) == [ClosedBatch(["big"], 50, "bytes")]
    assert p.add("small", 2, 0.0) == []
    # The open batch is closed first, then the big item goes out on its own.
    assert p.add("big2", 50, 1.0) == [
        ClosedBatch(["small"], 2, "bytes"),
        ClosedBatch(["big2"], 50, "bytes"),
    ]
    assert len(p) == 0


def test_size_wins_when_both_limits_are_reached_by_one_item() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=2, max_bytes=4, max_delay=10)
    p.add("a", 2, 0.0)
    assert [b.reason for b in p.add("b", 2, 0.0)] == ["size"]


def test_time_trigger_fires_max_delay_after_the_first_item() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=100, max_bytes=1000, max_delay=0.2)
    assert p.deadline() is None
    assert p.poll(100.0) is None  # nothing open: nothing to close
    p.add("a", 1, 10.0)
    assert p.deadline() == pytest.approx(10.2)
    p.add("b", 1, 10.15)  # a later item does not push the deadline out
    assert p.deadline() == pytest.approx(10.2)
    assert p.poll(10.19) is None
    assert p.poll(10.2) == ClosedBatch(["a", "b"], 2, "time")
    assert p.poll(11.0) is None


def test_timer_starts_at_each_batchs_first_item_not_a_fixed_ticker() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=100, max_bytes=1000, max_delay=1.0)
    p.add("a", 1, 0.0)
    assert p.poll(1.0) is not None
    # Idle for a while; a fixed 1 s ticker would fire at 3.0, 4.0, ...
    p.add("b", 1, 3.7)
    assert p.deadline() == pytest.approx(4.7)
    assert p.poll(4.0) is None
    assert p.poll(4.69) is None
    assert p.poll(4.7) == ClosedBatch(["b"], 1, "time")


def test_timer_restarts_after_a_size_close() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=2, max_bytes=1000, max_delay=1.0)
    p.add("a", 1, 0.0)
    p.add("b", 1, 0.5)  # closes by size
    p.add("c", 1, 0.9)
    assert p.deadline() == pytest.approx(1.9)
    assert p.poll(1.0) is None


def test_timer_of_the_item_that_overflowed_starts_at_its_arrival() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=100, max_bytes=10, max_delay=1.0)
    p.add("a", 8, 0.0)
    p.add("b", 8, 0.6)  # closes ["a"] by bytes; "b" opens a new batch at 0.6
    assert p.deadline() == pytest.approx(1.6)


def test_zero_delay_closes_at_the_first_poll() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=100, max_bytes=1000, max_delay=0)
    p.add("a", 1, 5.0)
    assert p.poll(5.0) == ClosedBatch(["a"], 1, "time")


@pytest.mark.parametrize("reason", [r for r in REASONS if r not in ("size", "bytes", "time")])
def test_take_closes_the_open_batch_with_the_given_reason(reason: str) -> None:
    p: BatchPolicy[int] = BatchPolicy(max_items=100, max_bytes=1000, max_delay=10)
    p.add(1, 3, 0.0)
    p.add(2, 4, 0.0)
    assert p.take(reason) == ClosedBatch([1, 2], 7, reason)
    assert len(p) == 0
    assert p.deadline() is None
    assert p.take(reason) is None


def test_take_on_an_empty_batch_returns_none() -> None:
    assert BatchPolicy().take("shutdown") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_items": 0},
        {"max_items": -1},
        {"max_bytes": 0},
        {"max_delay": -0.001},
    ],
)
def test_invalid_parameters_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BatchPolicy(**kwargs)


def test_closed_batches_do_not_share_lists() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_items=1, max_bytes=1000, max_delay=10)
    (first,) = p.add("a", 1, 0.0)
    p.add("b", 1, 0.0)
    assert first.items == ["a"]


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 40), st.floats(0, 2)),
        st.tuples(st.just("poll"), st.just(0), st.floats(0, 2)),
        st.tuples(st.just("take"), st.just(0), st.just(0.0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    events=EVENTS,
    max_items=st.integers(1, 6),
    max_bytes=st.integers(1, 60),
    max_delay=st.floats(0, 3),
)
def test_every_item_goes_out_once_in_order_and_batches_respect_limits(
    events: list[tuple[str, int, float]], max_items: int, max_bytes: int, max_delay: float
) -> None:
    p: BatchPolicy[int] = BatchPolicy(max_items=max_items, max_bytes=max_bytes, max_delay=max_delay)
    now = 0.0
    sizes: dict[int, int] = {}
    closed: list[ClosedBatch[int]] = []
    started: float | None = None
    for n, (op, size, dt) in enumerate(events):
        now += dt
        if op == "add":
            sizes[n] = size
            out = p.add(n, size, now)
            closed += out
            if out or started is None:
                started = now if len(p) else None
            if len(p) == 0:
                started = None
        elif op == "poll":
            batch = p.poll(now)
            if started is not None and now >= started + max_delay:
                assert batch is not None and batch.reason == "time"
                started = None
            else:
                assert batch is None
            if batch:
                closed.append(batch)
        else:
            batch = p.take("flush")
            assert (batch is None) == (started is None)
            started = None
            if batch:
                closed.append(batch)
        if len(p):
            assert p.deadline() == started + max_delay
        else:
            assert p.deadline() is None
    rest = p.take("shutdown")
    if rest:
        closed.append(rest)

    assert [i for b in closed for i in b.items] == sorted(sizes)
    for b in closed:
        assert b.items
        assert b.nbytes == sum(sizes[i] for i in b.items)
        assert len(b.items) <= max_items
        assert b.nbytes <= max_bytes or len(b.items) == 1
        assert b.reason in REASONS
        if b.reason == "size":
            assert len(b.items) == max_items
