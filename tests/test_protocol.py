"""protocol.py without sockets (h11's way): bytes in, frames and requests out.

docs/protocol.md is the reference for every code checked here; the codes are
stable, so a test names the exact one a client would match on.
"""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walbatch import protocol
from walbatch.protocol import FrameDecoder, ProtocolError, Request, parse_request


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def packed(obj: object) -> bytes:
    return frame(msgpack.packb(obj, use_bin_type=True))


MESSAGES = [
    {"id": 1, "op": "ping"},
    {"id": "b", "op": "submit", "items": [1, "two", b"\x03", None, {"k": [1.5, True]}]},
    {"id": 3, "op": "submit", "item": {"user": 7, "tags": ["x", "y"]}},
    {"id": 4, "op": "flush", "timeout": 2.5},
]
STREAM = b"".join(protocol.encode(m) for m in MESSAGES)


def values(out: list[tuple[object, int]]) -> list[object]:
    return [v for v, _size in out]


# ------------------------------------------------------------------ framing


def test_encode_is_a_big_endian_length_then_one_msgpack_map():
    data = protocol.encode({"id": 1, "op": "ping"})
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4
    assert msgpack.unpackb(data[4:], raw=False) == {"id": 1, "op": "ping"}


def test_bytes_and_str_stay_distinct_on_the_wire():
    data = protocol.encode({"id": 1, "op": "submit", "item": [b"raw", "text"]})
    (value, _size), = FrameDecoder().feed(data)
    assert value["item"] == [b"raw", "text"]


def test_whole_stream_in_one_chunk_yields_every_frame_with_its_size():
    out = FrameDecoder().feed(STREAM)
    assert values(out) == MESSAGES
    assert [size for _v, size in out] == [len(protocol.encode(m)) - 4 for m in MESSAGES]


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_frames_split_at_every_byte_boundary_reassemble(cut):
    dec = FrameDecoder()
    out = dec.feed(STREAM[:cut])
    out += dec.feed(STREAM[cut:])
    assert values(out) == MESSAGES
    assert dec.buffered == 0


def test_frames_fed_one_byte_at_a_time_reassemble():
    dec = FrameDecoder()
    out = []
    for i in range(len(STREAM)):
        out += dec.feed(STREAM[i : i + 1])
    assert values(out) == MESSAGES
    assert dec.buffered == 0


def test_an_incomplete_frame_is_held_until_the_rest_arrives():
    dec = FrameDecoder()
    data = protocol.encode(MESSAGES[1])
    assert dec.feed(data[:-1]) == []
    assert dec.buffered == len(data) - 1
    assert values(dec.feed(data[-1:])) == [MESSAGES[1]]
    assert dec.buffered == 0


def test_empty_feed_yields_nothing():
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.buffered == 0


def test_zero_length_prefix_is_fatal_too_large():
    # docs/protocol.md: too_large is "the length prefix exceeds --max-frame-bytes (or is 0)".
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(b"\x00\x00\x00\x00")
    assert info.value.fatal
    assert info.value.code == protocol.TOO_LARGE
    assert info.value.request_id is None


def test_length_above_max_frame_is_fatal_too_large():
    with pytest.raises(ProtocolError) as info:
        FrameDecoder(max_frame=100).feed(struct.pack(">I", 101))
    assert info.value.fatal
    assert info.value.code == protocol.TOO_LARGE
    assert "101" in info.value.message


def test_oversized_length_is_refused_before_its_body_arrives():
    # Only the 4-byte prefix has arrived: the decoder must not wait for 4 GiB.
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(b"\xff\xff\xff\xff")
    assert info.value.code == protocol.TOO_LARGE


def test_length_equal_to_max_frame_is_accepted():
    body = msgpack.packb({"id": 1, "op": "ping", "pad": "x" * 50})
    dec = FrameDecoder(max_frame=len(body))
    assert values(dec.feed(frame(body))) == [msgpack.unpackb(body)]


def test_default_max_frame_is_16_mib():
    assert FrameDecoder().max_frame == protocol.DEFAULT_MAX_FRAME == 16 << 20


def test_frames_before_a_fatal_length_are_not_lost():
    # A well-formed request pipelined ahead of an oversized frame must still be answered
    # (docs: the daemon answers every request exactly once, in order).
    dec = FrameDecoder(max_frame=1000)
    with pytest.raises(ProtocolError) as info:
        dec.feed(protocol.encode(MESSAGES[0]) + struct.pack(">I", 5000) + b"xx")
    assert info.value.fatal
    assert values(info.value.frames) == [MESSAGES[0]]


def test_a_non_msgpack_body_is_a_non_fatal_bad_frame_value_and_later_frames_decode():
    bad = frame(b"\xc1")  # 0xc1 is "never used" in msgpack
    truncated = frame(b"\x92\x01")  # an array of 2 with one element
    trailing = frame(msgpack.packb({"id": 9, "op": "ping"}) + b"\x01")  # two values, not one
    data = protocol.encode(MESSAGES[0]) + bad + truncated + trailing + protocol.encode(MESSAGES[2])
    out = values(FrameDecoder().feed(data))
    assert len(out) == 5
    assert out[0] == MESSAGES[0]
    assert out[4] == MESSAGES[2]
    for err in out[1:4]:
        assert isinstance(err, ProtocolError)
        assert err.code == protocol.BAD_FRAME
        assert not err.fatal
        # msgpack's message for 0xc1 is empty: the error's type must still say something.
        assert not str(err).rstrip().endswith(("(", ":")) and "()" not in str(err), str(err)


def test_invalid_utf8_in_a_str_is_a_bad_frame():
    body = b"\x81\xa2id\xa2\xff\xfe"  # {"id": <str with invalid UTF-8>}
    (err,) = values(FrameDecoder().feed(frame(body)))
    assert isinstance(err, ProtocolError) and err.code == protocol.BAD_FRAME


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(1, 1 << 20))
def test_arbitrary_chunks_raise_nothing_but_protocol_error(chunks, max_frame):
    dec = FrameDecoder(max_frame=max_frame)
    for chunk in chunks:
        try:
            out = dec.feed(chunk)
        except ProtocolError as ex:
            assert ex.fatal
            assert ex.code == protocol.TOO_LARGE
            return
        for value, size in out:
            assert 1 <= size <= max_frame
            if isinstance(value, ProtocolError):
                assert value.code == protocol.BAD_FRAME and not value.fatal


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.builds(protocol.encode, st.dictionaries(
    st.text(max_size=5), st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.none()),
    max_size=3))),
    max_size=8), st.data())
def test_any_mix_of_valid_and_garbage_frames_is_split_anywhere_consistently(bodies, data):
    # Whatever the bodies are, how the stream is cut into chunks never changes what comes out.
    stream = b"".join(b if _is_frame(b) else frame(b) for b in bodies if b)
    expected = _decode_outcome(FrameDecoder(), [stream])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert _decode_outcome(FrameDecoder(), pieces) == expected


def _is_frame(b: bytes) -> bool:
    return len(b) >= 4 and struct.unpack(">I", b[:4])[0] == len(b) - 4


def _decode_outcome(dec: FrameDecoder, pieces: list[bytes]) -> list[object]:
    out: list[object] = []
    for p in pieces:
        for value, size in dec.feed(p):
            out.append(("err", value.code, size) if isinstance(value, ProtocolError) else (value, size))
    return out


# ------------------------------------------------------------ parse_request


def code_of(msg: object) -> tuple[str, object]:
    with pytest.raises(ProtocolError) as info:
        parse_request(msg)
    assert not info.value.fatal
    return info.value.code, info.value.request_id


def test_ping_stats_flush_parse():
    assert parse_request({"id": 1, "op": "ping"}) == Request(1, "ping")
    assert parse_request({"id": "s", "op": "stats"}) == Request("s", "stats")
    assert parse_request({"id": 2, "op": "flush"}) == Request(2, "flush", timeout=None)
    assert parse_request({"id": 2, "op": "flush", "timeout": 3}) == Request(2, "flush", timeout=3.0)
    assert parse_request({"id": 2, "op": "flush", "timeout": 0}).timeout == 0.0


def test_submit_item_and_items_parse():
    r = parse_request({"id": 5, "op": "submit", "item": {"a": 1}})
    assert (r.id, r.op, r.items, r.single) == (5, "submit", [{"a": 1}], True)
    r = parse_request({"id": 6, "op": "submit", "items": [1, 2, 3]})
    assert (r.items, r.single) == ([1, 2, 3], False)
    assert parse_request({"id": 7, "op": "submit", "item": None}).items == [None]
    assert parse_request({"id": 8, "op": "submit", "items": []}).items == []


def test_extra_keys_are_ignored():
    assert parse_request({"id": 1, "op": "ping", "future": "field"}) == Request(1, "ping")


def test_id_may_be_any_integer_or_a_string_up_to_128_characters():
    for rid in (0, -1, 2**64 - 1, -(2**63), "", "x" * 128, "é" * 128):
        assert parse_request({"id": rid, "op": "ping"}).id == rid


def test_a_bad_frame_value_is_reraised_with_its_code():
    err = ProtocolError(protocol.BAD_FRAME, "nope")
    assert code_of(err) == (protocol.BAD_FRAME, None)


@pytest.mark.parametrize("msg", [[1, 2], "ping", 7, None, b"\x00", 1.5, True])
def test_a_request_that_is_not_a_map_is_bad_request(msg):
    assert code_of(msg) == (protocol.BAD_REQUEST, None)


@pytest.mark.parametrize("rid", [None, True, False, 1.0, 2.5, "x" * 129, b"bytes", [1], {"a": 1}])
def test_a_missing_or_invalid_id_is_bad_request_and_not_echoed(rid):
    msg = {"op": "ping"} if rid is None else {"id": rid, "op": "ping"}
    assert code_of(msg) == (protocol.BAD_REQUEST, None)


@pytest.mark.parametrize("op", [None, 1, b"ping", ["ping"], True])
def test_a_missing_or_non_string_op_is_bad_request_with_the_id(op):
    msg = {"id": 3} if op is None else {"id": 3, "op": op}
    assert code_of(msg) == (protocol.BAD_REQUEST, 3)


@pytest.mark.parametrize("op", ["", "PING", "submit ", "delete", "x" * 1000])
def test_an_unknown_op_is_unknown_op_with_the_id(op):
    with pytest.raises(ProtocolError) as info:
        parse_request({"id": "r", "op": op})
    assert (info.value.code, info.value.request_id) == (protocol.UNKNOWN_OP, "r")
    assert len(info.value.message) < 200  # a huge op is not echoed whole


def test_submit_with_both_item_and_items_is_bad_request():
    assert code_of({"id": 1, "op": "submit", "item": 1, "items": [1]}) == (protocol.BAD_REQUEST, 1)


def test_submit_with_neither_item_nor_items_is_bad_request():
    assert code_of({"id": 1, "op": "submit"}) == (protocol.BAD_REQUEST, 1)


@pytest.mark.parametrize("items", [None, 1, "abc", {"a": 1}, b"\x01\x02"])
def test_submit_items_that_is_not_an_array_is_bad_request(items):
    assert code_of({"id": 2, "op": "submit", "items": items}) == (protocol.BAD_REQUEST, 2)


@pytest.mark.parametrize("timeout", [-1, -0.001, "5", True, [1], b"1", math.nan, -math.inf])
def test_a_bad_flush_timeout_is_bad_request(timeout):
    # docs/protocol.md: "a non-negative number" (NaN is not one).
    assert code_of({"id": 4, "op": "flush", "timeout": timeout}) == (protocol.BAD_REQUEST, 4)


def test_flush_timeout_none_means_the_daemons_default():
    assert parse_request({"id": 4, "op": "flush", "timeout": None}).timeout is None


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8) | st.sampled_from(["id", "op", "item", "items", "timeout", *protocol.OPS]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "op", "item", "items", "timeout"]) | st.text(max_size=4), inner,
        max_size=5),
    max_leaves=12))
def test_parse_request_raises_nothing_but_non_fatal_protocol_errors(msg):
    try:
        req = parse_request(msg)
    except ProtocolError as ex:
        assert not ex.fatal
        assert ex.code in (protocol.BAD_REQUEST, protocol.UNKNOWN_OP)
        return
    assert req.op in protocol.OPS
    assert isinstance(req.id, (int, str)) and not isinstance(req.id, bool)


def test_ok_and_error_shapes():
    assert protocol.ok(3, pong=True) == {"id": 3, "ok": True, "pong": True}
    assert protocol.error(None, protocol.TOO_LARGE, "m") == {
        "id": None, "ok": False, "code": "too_large", "message": "m"}


def test_error_codes_are_the_documented_stable_set():
    assert set(protocol.ERROR_CODES) == {
        "bad_frame", "too_large", "bad_request", "unknown_op", "log_full", "shutting_down",
        "write_failed", "timeout", "corrupt_log", "forbidden", "busy", "internal", "dead_lettered"}
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    table = doc[doc.index("| code | meaning |"):]
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == set(protocol.ERROR_CODES)
