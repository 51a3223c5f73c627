"""The value mapping (walbatch.values, docs/values.md): one encoder, its decoder, its promises."""

from __future__ import annotations

import json
import math
import re
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from value_space import deep, examples, from_log, items

from walbatch import values
from walbatch.codec import unpack_one
from walbatch.keys import KEY_EXT
from walbatch.values import check, dumps, encode, equal, loads


def slow(value: object) -> str:
    """The general encoder alone, without the fast path."""
    out: list[str] = []
    values._emit(value, out, 0)
    return "".join(out)


@settings(max_examples=examples(400), deadline=None)
@given(items())
def test_every_value_reads_back_equal(item):
    text = dumps(item)
    assert equal(loads(text), item)
    assert encode(item) == text.encode("utf-8")
    json.loads(text)  # plain JSON: any reader can parse it


@settings(max_examples=examples(400), deadline=None)
@given(items())
def test_the_fast_path_writes_exactly_what_the_general_encoder_writes(item):
    assert dumps(item) == slow(item)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(items(), max_size=8))
def test_a_batch_encodes_item_for_item_as_dumps_does(batch):
    texts = values.dumps_many(batch)
    if texts is not None:  # None: the caller goes item by item (and meets any refusal)
        assert texts == [dumps(x) for x in batch]


def test_a_batch_of_plain_items_takes_the_fast_path_and_an_odd_one_does_not():
    plain = [{"user_id": i, "action": "login", "ts": 1700000000.123} for i in range(50)]
    assert values.dumps_many(plain) == [dumps(x) for x in plain]
    for odd in ({"$x": 1}, {1: "a"}, float("nan"), -0.0, 1e16, b"x", "caf\udce9",
                {"a": 1, None: 2}, {"a": 1, 1.5: 2}, {"a": 1, True: 2}, {"a": {1: 2}},
                {"a": "{", "b": [{2: 1}]}, {"a": "x", "b$": 1}):
        assert values.dumps_many([*plain, odd]) is None, odd


_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4))


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.dictionaries(st.one_of(st.text(max_size=3), st.integers(), st.booleans(),
                                          st.none(), st.floats()),
                                _scalar | st.lists(_scalar, max_size=2)
                                | st.dictionaries(st.integers() | st.text(max_size=2), _scalar,
                                                  max_size=2), max_size=4), max_size=6))
def test_a_batch_of_flat_dicts_with_any_keys_encodes_as_dumps_does(batch):
    # The shape the batch check reads off the JSON text (dicts of scalars) and its edges.
    texts = values.dumps_many(batch)
    if texts is not None:
        assert texts == [dumps(x) for x in batch]
    if any(not isinstance(k, str) for d in batch for k in d):
        assert texts is None


@settings(max_examples=examples(300), deadline=None)
@given(items(), items())
def test_two_different_values_never_write_the_same_text(a, b):
    if not equal(a, b):
        assert dumps(a) != dumps(b)


# Pairs that JSON (or a careless encoder) merges: each must stay apart.
LOOKALIKES = [
    ({1: "a"}, {"1": "a"}),
    ({True: 1}, {"true": 1}),
    ({None: 1}, {"null": 1}),
    ({1.0: 1}, {1: 1}),
    ({(1, 2): 0}, {"[1, 2]": 0}),
    (b"\x01", "01"),
    (b"ab", {"$base64": "YWI="}),
    ([b"x"], [{"$base64": "eA=="}]),
    (msgpack.ExtType(1, b"x"), [1, b"x"]),
    (-0.0, 0.0),
    (math.nan, None),
    (math.inf, "Infinity"),
    (1.0, 1),
    (True, 1),
    (1e16, 10**16),
    ({"$float": "NaN"}, math.nan),
    ({"$$x": 1}, {"$x": 1}),
    (msgpack.Timestamp(1, 0), {"$timestamp": [1, 0]}),
    (struct.unpack(">d", bytes.fromhex("7ff8000000000001"))[0], math.nan),
]


@pytest.mark.parametrize("a,b", LOOKALIKES, ids=[repr(p) for p in LOOKALIKES])
def test_lookalikes_are_written_apart_and_read_back_as_themselves(a, b):
    assert dumps(a) != dumps(b)
    assert equal(loads(dumps(a)), a) and equal(loads(dumps(b)), b)


def test_colliding_keys_keep_every_value():
    item = {1: "a", "1": "b", 1.5: "c", "1.5": "d", None: "e", "null": "f", b"1": "g", (1,): "h"}
    back = loads(dumps(item))
    assert equal(back, item)
    assert sorted(back.values()) == list("abcdefgh")


def test_the_written_forms():
    assert dumps({"a": 1, "b": [1.5, None, True], "c": "x"}) == '{"a":1,"b":[1.5,null,true],"c":"x"}'
    assert dumps(b"\x00\xff") == '{"$base64":"AP8="}'
    assert dumps(-0.0) == '{"$float":"-0.0"}'
    assert dumps(math.nan) == '{"$float":"NaN"}'
    assert dumps(-math.inf) == '{"$float":"-Infinity"}'
    assert dumps(1e16) == "10000000000000000.0"
    assert dumps(1e-5) == "1e-05"
    assert dumps(2**64 - 1) == "18446744073709551615"
    assert dumps({1: "a", "1": "b"}) == '{"$map":[[1,"a"],["1","b"]]}'
    assert dumps({"$set": {"$": 1}}) == '{"$$set":{"$$":1}}'
    assert dumps(msgpack.ExtType(5, b"\x01")) == '{"$ext":[5,"AQ=="]}'
    assert dumps(msgpack.Timestamp(1, 2)) == '{"$timestamp":[1,2]}'
    assert dumps("é\x00") == '"é\\u0000"'


def test_a_nan_keeps_its_bits():
    (odd,) = struct.unpack(">d", bytes.fromhex("fff4000000000123"))
    text = dumps(odd)
    assert text == '{"$float":"NaN:fff4000000000123"}'
    assert struct.pack(">d", loads(text)) == bytes.fromhex("fff4000000000123")


def test_values_as_deep_as_json_allows_round_trip():
    for item in (deep_list(values.MAX_DEPTH), {"$x": deep_list(values.MAX_DEPTH - 1)}):
        text = dumps(item)
        assert text.count("[") + text.count("{") == values.MAX_DEPTH
        assert equal(loads(text), item)
        assert equal(loads(f'{{"item":{text}}}')["item"], item)  # inside a file sink's line


def deep_list(depth: int) -> list:
    v: list = []
    for _ in range(depth - 1):
        v = [v]
    return v


def test_values_nested_deeper_than_json_allows_are_refused_naming_where():
    with pytest.raises(ValueError, match=r"^item\[0\]\[0\].*nested deeper than 512 levels"):
        dumps(deep_list(values.MAX_DEPTH + 1))
    item = from_log(deep(300))  # 150 dicts with int keys: 3 JSON levels each
    with pytest.raises(ValueError, match="nested deeper than 512 levels"):
        dumps(item)
    item = from_log(deep(200))
    assert equal(loads(dumps(item)), item)


@pytest.mark.parametrize("text,reason", [
    ('{"$x": 1}', "unknown tag"),
    ('{"$a": 1, "b": 2}', "neither a tag alone nor escaped"),
    ('{"a": 1, "a": 2}', "twice"),
    ('{"$map": [[1, 2], [1, 3]]}', "twice"),
    ('{"$map": [[{"a": 1}, 2]]}', "object"),
    ('{"$map": [1]}', "pair"),
    ("NaN", "bare NaN"),
    ('[Infinity]', "bare Infinity"),
    ('{"$float": "1.5"}', "$float"),
    ('{"$float": "NaN:7ff0000000000000"}', "$float"),
    ('{"$base64": "***"}', "$base64"),
    ('{"$ext": [200, ""]}', "$ext"),
    ('{"$timestamp": [1, 2000000000]}', "$timestamp"),
    ("{", "Expecting"),
])
def test_text_the_encoder_never_writes_is_refused(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        loads(text)


def test_what_is_not_a_msgpack_value_is_refused_naming_where_it_is():
    import datetime

    with pytest.raises(TypeError, match=r"^item\['a'\]\[1\]\['at'\]: a value of type datetime"):
        dumps({"a": [0, {"at": datetime.datetime(2024, 1, 1)}]})
    with pytest.raises(ValueError, match=r"^item\[0\]: a str holding a lone surrogate"):
        dumps(["\ud800"])
    with pytest.raises(TypeError, match=r"^row\[\(1, 2\)\]: a value of type set"):
        dumps({(1, 2): {3}}, name="row")


# ------------------------------------------------------------------ submit side


@pytest.mark.parametrize("item,error,message", [
    ({"a": [1, {"n": 2**64}]}, ValueError, r"item\['a'\]\[1\]\['n'\]: the int 18446744073709551616"),
    ({"a": -(2**63) - 1}, ValueError, r"item\['a'\]: the int"),
    ([0, "\udc80"], ValueError, r"item\[1\]: a str holding a lone surrogate"),
    ({"t": {1, 2}}, TypeError, r"item\['t'\]: a value of type set"),
    ({"k": {object(): 1}}, TypeError, r"item\['k'\]: in the key <object"),
    ({"e": msgpack.ExtType(KEY_EXT, b"")}, ValueError, r"item\['e'\]: ExtType code 87 is reserved"),
    (deep(values.MSGPACK_DEPTH + 1), ValueError, "nested deeper than 1024 levels"),
])
def test_check_names_the_path_of_what_the_log_cannot_hold(item, error, message):
    with pytest.raises(error, match=message):
        check(item)


def test_check_refuses_what_msgpack_packs_but_cannot_read_back():
    ok, too_deep = deep_list(values.MSGPACK_DEPTH), deep_list(values.MSGPACK_DEPTH + 1)
    assert equal(unpack_one(msgpack.packb(ok)), ok)
    check(ok)
    packed = msgpack.packb(too_deep)  # msgpack writes it ...
    with pytest.raises(msgpack.StackError):
        unpack_one(packed)  # ... but cannot read it: in the log, it would stop delivery
    with pytest.raises(ValueError, match="nested deeper than 1024 levels"):
        check(too_deep)


@settings(max_examples=examples(200), deadline=None)
@given(items())
def test_check_passes_every_value_the_log_holds(item):
    check(item)


@pytest.mark.parametrize("item", [deep_list(values.MSGPACK_DEPTH + 1),
                                  {"e": [msgpack.ExtType(KEY_EXT, b"")]},
                                  {"e": msgpack.ExtType(KEY_EXT, b"x" * 300)},
                                  msgpack.ExtType(KEY_EXT, b"x" * 70000)])
def test_needs_check_flags_every_packed_value_check_refuses(item):
    assert values.needs_check(msgpack.packb(item))
    with pytest.raises(ValueError):
        check(item)


def test_needs_check_passes_small_plain_items_without_a_walk():
    assert not values.needs_check(msgpack.packb({"user_id": 1, "action": "login", "ts": 1.5}))


@settings(max_examples=examples(200), deadline=None)
@given(st.one_of(st.integers(), st.text(alphabet=st.characters(codec=None)), st.none()))
def test_check_passes_exactly_what_msgpack_packs(value):
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        with pytest.raises((TypeError, ValueError)):
            check(value)
    else:
        check(value)


# ------------------------------------------------------------------- equality


def test_equal_is_strict_about_what_a_value_is():
    assert equal({"a": [1, 2.0]}, {"a": (1, 2.0)})
    assert not equal(1, 1.0) and not equal(1, True) and not equal(0.0, -0.0)
    assert equal(math.nan, math.nan)
    assert not equal({1: 0}, {"1": 0}) and not equal({1: 0}, {True: 0})
    assert equal({1: 0, "a": 1}, {"a": 1, 1: 0})
    assert not equal(b"a", "a")
