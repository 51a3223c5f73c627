"""A submit that waits for delivery: per-item results and errors through the daemon."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import WAIT
from test_server import daemons, raw_connect, read_frame, sockdir  # noqa: F401 - fixtures

from walbatch import AsyncClient, Client, DeadLettered, protocol
from walbatch.client import BadRequest, RemoteTimeout

SINK = '''
import time
from walbatch import PermanentSinkError

class Answering:
    """Answers {"n": N} with N * 10; refuses odd N for good; {"slow": S} sleeps S seconds."""
    def write(self, batch):
        out = []
        for r in batch:
            if "slow" in r.item:
                time.sleep(r.item["slow"])
                out.append("slept")
            elif "set" in r.item:
                out.append({1, 2})  # not msgpack: sent as its repr
            elif r.item["n"] % 2:
                out.append(PermanentSinkError(f"odd n={r.item['n']}"))
            else:
                out.append(r.item["n"] * 10)
        return out
'''


@pytest.fixture
def answering(daemons, tmp_path):  # noqa: F811
    (tmp_path / "answering.py").write_text(SINK)
    return daemons("data", "--sink", "answering:Answering", "--max-delay", "0.005",
                   env={"PYTHONPATH": str(tmp_path)})


def test_a_waiting_submit_returns_the_sinks_result_or_raises_why_not(answering):
    with Client(answering.socket_path, timeout=WAIT) as c:
        assert c.submit({"n": 4}, wait=True) == 40
        with pytest.raises(DeadLettered, match="odd n=3") as info:
            c.submit({"n": 3}, wait=True)
        assert info.value.seq == 2
        got = c.submit_many([{"n": 2}, {"n": 5}, {"n": 6}], wait=True, key="k")
        assert got[0] == 20 and got[2] == 60
        assert isinstance(got[1], DeadLettered) and got[1].seq == 4 and "odd n=5" in str(got[1])
        assert c.submit({"n": 8}) == 6  # without wait: the seq, as before
        assert c.submit({"set": 1}, wait=True) == "{1, 2}"


def test_the_async_client_waits_the_same_way(answering):
    async def main():
        async with AsyncClient(answering.socket_path) as c:
            results = await asyncio.gather(*(c.submit({"n": n}, wait=True) for n in (0, 2, 4)))
            many = await c.submit_many([{"n": 1}, {"n": 2}], wait=True)
            return results, many

    results, many = asyncio.run(main())
    assert results == [0, 20, 40]
    assert isinstance(many[0], DeadLettered) and many[1] == 20


def test_a_wait_that_times_out_leaves_the_item_acknowledged(answering):
    with Client(answering.socket_path, timeout=WAIT) as c:
        t0 = time.monotonic()
        with pytest.raises(RemoteTimeout, match="acknowledged and stays in the log"):
            c.submit({"slow": 1.0}, wait=True, timeout=0.1)
        assert time.monotonic() - t0 < 0.9
        c.flush(timeout=WAIT)  # delivered all the same
        assert c.stats()["delivered"] == 1


@pytest.mark.parametrize("bad", [{"wait": 1}, {"wait": True, "timeout": -1},
                                 {"wait": True, "timeout": "soon"}])
def test_bad_wait_fields_are_bad_requests_and_write_nothing(answering, bad):
    with raw_connect(answering.socket_path, timeout=WAIT) as s:
        s.sendall(protocol.encode({"id": 1, "op": "submit", "item": {"n": 2}, **bad}))
        answer = read_frame(s)
    assert answer["ok"] is False and answer["code"] == "bad_request"
    with Client(answering.socket_path, timeout=WAIT) as c:
        assert c.stats()["submitted"] == 0
        with pytest.raises(BadRequest):
            c.request({"op": "submit", "item": 1, "wait": "yes"})
