"""What the log cannot hold or would not give back is refused at submit, naming where.

Before these checks an item nested 1,025 levels deep was acknowledged and then
stopped delivery for good ("undecodable payload"), and an ExtType with code 87
(the log's own marker for keyed items) came back as a keyed item.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from helpers import WAIT, Collector


def nested(levels: int) -> list:
    """A list ``levels`` deep (msgpack reads back at most 1,024)."""
    x: list = []
    for _ in range(levels - 1):
        x = [x]
    return x


@pytest.mark.parametrize("bad,where,error", [
    (nested(1025), "[0][0]", ValueError),
    ({"a": [1, msgpack.ExtType(87, b"x")]}, "['a'][1]", ValueError),
    (msgpack.ExtType(87, b"zz"), "", ValueError),
    ({"when": {1, 2}}, "['when']", TypeError),
    ({"n": 1 << 64}, "['n']", TypeError),
], ids=["1024-deep", "nested-ext-87", "ext-87", "set", "int-65-bits"])
def test_refused_at_every_submit_entry_nothing_written(make, bad, where, error):
    sink = Collector()
    b = make(sink)
    calls = [lambda: b.submit(bad), lambda: b.submit(bad, key="k"),
             lambda: b.submit_many([1, bad]), lambda: b.submit_many([1, bad], key="k"),
             lambda: asyncio.run(b.asubmit(bad))]
    for call in calls:
        with pytest.raises(error) as info:
            call()
        assert where in str(info.value), str(info.value)[:300]
    assert b.stats().submitted == 0
    b.submit("after")  # the batcher goes on
    b.flush(WAIT)
    assert sink.items == ["after"]


def test_values_close_to_the_limits_go_through_and_read_back_equal(make):
    sink = Collector()
    b = make(sink)
    fine = [nested(1024), msgpack.ExtType(86, b"W\x57"), {"text": "Welcome to the World Wide Web"},
            {"\u00c7W": b"\xc7\x01W\xd4W"}]
    b.submit_many(fine)
    for item in fine:
        b.submit(item, key="k")
    b.flush(WAIT)
    packed = [msgpack.packb(x) for x in fine]  # == on a 1,024-deep list would recurse too deep
    assert [msgpack.packb(x) for x in sink.items] == packed + packed
