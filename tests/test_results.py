"""Per-item results: what a sink returns for an item reaches that item's waiter."""

from __future__ import annotations

import asyncio
import threading

import pytest
from helpers import WAIT

from walbatch import Closed, DeadLettered, PermanentSinkError, ResultDropped


def doubling(batch):
    """Answers each item with a value only that item could have produced."""
    return [{"seq": r.seq, "twice": r.item["n"] * 2} for r in batch]


def test_each_receipt_gets_its_own_result(make):
    b = make(doubling, max_items=7)
    r = b.submit({"n": 21})
    assert r.wait(WAIT) == {"seq": r.seq, "twice": 42}
    assert r.wait(WAIT) == {"seq": r.seq, "twice": 42}  # collected once, kept by the receipt
    rs = b.submit_many([{"n": i} for i in range(50)])
    assert rs.results(WAIT) == [{"seq": s, "twice": 2 * i} for i, s in enumerate(rs.seqs)]
    assert rs[3].wait(WAIT) == {"seq": rs.first_seq + 3, "twice": 6}  # after results(): still there
    rs.wait(WAIT)


def test_a_sink_returning_nothing_gives_none(make):
    b = make(lambda batch: None)
    assert b.submit("x").wait(WAIT) is None
    assert b.submit_many(["a", "b"]).results(WAIT) == [None, None]


def test_values_errors_and_nones_mix_in_one_batch(make):
    def sink(batch):
        return [PermanentSinkError("odd") if r.item % 2 else (None if r.item == 0 else r.item * 10)
                for r in batch]

    b = make(sink)
    rs = b.submit_many(list(range(5)))
    b.flush(WAIT)
    assert rs[0].wait(WAIT) is None and rs[2].wait(WAIT) == 20 and rs[4].wait(WAIT) == 40
    for i in (1, 3):
        with pytest.raises(DeadLettered, match="odd"):
            rs[i].wait(WAIT)
    with pytest.raises(DeadLettered):
        rs.results(WAIT)


def test_results_reach_the_right_waiters_from_16_threads(make):
    b = make(doubling, max_items=64, max_delay=0.002)
    wrong: list[str] = []

    def work(t: int) -> None:
        for k in range(100):
            n = t * 1000 + k
            r = b.submit({"n": n})
            got = r.wait(WAIT)
            if got != {"seq": r.seq, "twice": 2 * n}:
                wrong.append(f"thread {t} item {n}: {got}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 3)
    assert not wrong, wrong[:5]
    assert b.stats().delivered == 1600


def test_results_reach_the_right_waiters_from_1000_asyncio_tasks(make):
    b = make(doubling, max_items=200, max_delay=0.002)

    async def one(n: int) -> bool:
        r = await b.asubmit({"n": n})
        return await r == {"seq": r.seq, "twice": 2 * n}

    async def main() -> list[bool]:
        return await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(1000))), WAIT * 3)

    assert all(asyncio.run(main()))


def test_awaiting_receipts_of_a_submit_many(make):
    b = make(doubling)

    async def main():
        rs = await b.asubmit_many([{"n": 1}, {"n": 2}])
        return rs.first_seq, await rs

    first, got = asyncio.run(main())
    assert got == [{"seq": first, "twice": 2}, {"seq": first + 1, "twice": 4}]


def test_a_cancelled_await_only_stops_the_wait(make):
    release = threading.Event()
    seen: list[int] = []

    def slow(batch):
        release.wait(WAIT)
        seen.extend(r.seq for r in batch)
        return [r.seq for r in batch]

    b = make(slow)

    async def main():
        r = await b.asubmit("x")
        waiter = asyncio.ensure_future(r)
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        release.set()
        return r, await asyncio.wait_for(r, WAIT)  # a fresh wait still gets it

    r, result = asyncio.run(main())
    assert result == r.seq and seen == [r.seq]
    assert b.stats().delivered == 1


def test_awaiting_a_dead_letter_raises(make):
    b = make(lambda batch: [PermanentSinkError("no")] * len(batch))

    async def main():
        r = await b.asubmit("x")
        await r

    with pytest.raises(DeadLettered, match="no"):
        asyncio.run(main())


def test_an_await_ends_when_the_batcher_closes(make):
    def down(batch):
        raise ConnectionError("down")

    b = make(down)

    async def main():
        r = await b.asubmit("x")
        closer = threading.Timer(0.05, b.close, kwargs={"timeout": 0.05})
        closer.start()
        try:
            await asyncio.wait_for(r, WAIT)
        finally:
            closer.join()

    with pytest.raises(Closed):
        asyncio.run(main())


def test_uncollected_results_past_the_cap_are_dropped_loudly(make, monkeypatch):
    import walbatch.progress

    monkeypatch.setattr(walbatch.progress, "MAX_RESULTS", 10)
    b = make(lambda batch: [r.seq for r in batch])
    old = b.submit_many(list(range(5)))
    b.flush(WAIT)
    b.submit_many(list(range(20)))  # nobody collects these: the oldest results go
    b.flush(WAIT)
    with pytest.raises(ResultDropped, match="was delivered"):
        old[0].wait(WAIT)
    assert b.stats().delivered == 25
