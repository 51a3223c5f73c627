"""Everything submit accepts reads back: the log, replay, daemon frames, dead letters.

A dict key that is a tuple is written as a msgpack array, which reads back as a
list and cannot be a key. Before walbatch.codec such an item was acknowledged
and then stopped delivery for good as an "undecodable payload" (CorruptLog).
"""

from __future__ import annotations

from typing import Any

import msgpack
from helpers import WAIT, Collector
from hypothesis import given
from hypothesis import strategies as st

from walbatch import DurableBatcher, PermanentSinkError
from walbatch.codec import unpack_one, unpack_sized, unpack_values
from walbatch.dlq import list_dead_letters
from walbatch.protocol import FrameDecoder, encode

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5)
hashable = st.recursive(scalars, lambda inner: st.tuples(inner, inner), max_leaves=4)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner)
    | st.dictionaries(hashable, inner, max_size=3),
    max_leaves=8,
)


def as_read(value: Any) -> Any:
    """What msgpack gives back: tuples become lists, except in dict keys."""
    if isinstance(value, dict):
        return {k: as_read(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_read(v) for v in value]
    return value


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@given(st.lists(values, min_size=1, max_size=4))
def test_every_packable_value_reads_back(items):
    payload = b"".join(pack(i) for i in items)
    assert unpack_values(payload) == [as_read(i) for i in items]
    sized = unpack_sized(payload)
    assert [v for v, _ in sized] == [as_read(i) for i in items]
    assert [n for _, n in sized] == [len(pack(i)) for i in items]
    assert unpack_one(pack(items[0])) == as_read(items[0])


def test_tuple_keys_come_back_as_tuples_nested_too():
    item = {(1, 2): "a", ((1, "x"), 3): [{(4,): None}], "plain": {(5, 6): True}}
    assert unpack_one(pack(item)) == {(1, 2): "a", ((1, "x"), 3): [{(4,): None}],
                                      "plain": {(5, 6): True}}


ITEMS = [{(1, 2): "x"}, {"ok": 1}, {((1, "a"), 3): [1, 2]}]


def test_tuple_keyed_items_are_delivered_live_keyed_and_after_reopen(make, logdir):
    sink = Collector()
    b = make(sink)
    b.submit(ITEMS[0])
    b.submit_many(ITEMS[1:])
    b.submit({(7, 8): 1}, key="k")
    b.flush(WAIT)
    assert sink.items == [*ITEMS, {(7, 8): 1}]
    assert b.stats().last_error is None
    b.close()

    with DurableBatcher(logdir, None) as w:  # acknowledged now, delivered by the next open
        w.submit_many(ITEMS)
    replayed = Collector()
    b2 = make(replayed)
    b2.flush(WAIT)
    assert replayed.items == ITEMS


def test_tuple_keyed_items_keep_their_keys_in_the_dead_letter_store(make, logdir):
    def refuse(batch):
        return [PermanentSinkError("refused") for _ in batch]

    b = make(refuse)
    b.submit_many(ITEMS)
    b.flush(WAIT)
    assert b.stats().dead_lettered == len(ITEMS)
    b.close()
    assert [d.item for d in list_dead_letters(logdir)] == ITEMS


def test_a_daemon_frame_with_an_array_map_key_decodes():
    decoder = FrameDecoder()
    [(request, _size)] = decoder.feed(encode({"op": "submit", "item": {(1, 2): 3}}))
    assert request == {"op": "submit", "item": {(1, 2): 3}}
