"""framing.py: the segment header and frame layout (docs/format.md)."""

from __future__ import annotations

import mmap
import struct
import uuid

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walbatch.framing import (
    BAD,
    FORMAT_VERSION,
    FRAME_HEADER_SIZE,
    FRAME_MARKER,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    SEGMENT_MAGIC,
    SHORT,
    Frame,
    decode_header,
    decode_items,
    encode_frame_header,
    encode_header,
    find_next_frame,
    parse_frame,
)
from walbatch.framing import crc32c as framing_crc32c

ITEMS = st.lists(
    st.one_of(
        st.integers(-(2**63), 2**64 - 1),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.booleans(),
        st.none(),
        st.lists(st.integers(0, 9), max_size=3),
    ),
    min_size=1,
    max_size=6,
)


def pack(items: list[object]) -> bytes:
    return b"".join(msgpack.packb(i, use_bin_type=True) for i in items)


def frame(first_seq: int, items: list[object]) -> bytes:
    payload = pack(items)
    return encode_frame_header(first_seq, len(items), payload) + payload


# ----------------------------------------------------------------- header


def test_header_round_trip() -> None:
    log_id = uuid.uuid4()
    header = encode_header(log_id)
    assert len(header) == HEADER_SIZE == 32
    assert header.startswith(SEGMENT_MAGIC)
    assert decode_header(header) == (log_id, "")


def test_header_too_short_is_refused() -> None:
    header = encode_header(uuid.uuid4())
    log_id, reason = decode_header(header[:-1])
    assert log_id is None
    assert "31 bytes" in reason


def test_header_with_bad_magic_is_refused() -> None:
    header = bytearray(encode_header(uuid.uuid4()))
    header[0] ^= 0xFF
    assert decode_header(bytes(header)) == (None, "bad segment magic")


@pytest.mark.parametrize("at", [8, 12, 20, 28, 31])
def test_header_with_flipped_bit_is_refused(at: int) -> None:
    header = bytearray(encode_header(uuid.uuid4()))
    header[at] ^= 0x04
    log_id, reason = decode_header(bytes(header))
    assert log_id is None
    assert reason


def test_header_of_another_version_is_refused_even_with_a_valid_crc() -> None:
    head = struct.pack("<8sHH16s", SEGMENT_MAGIC, FORMAT_VERSION + 1, 0, uuid.uuid4().bytes)
    header = head + struct.pack("<I", framing_crc32c(head))
    log_id, reason = decode_header(header)
    assert log_id is None
    assert f"version {FORMAT_VERSION + 1}" in reason


# ------------------------------------------------------------------ frames


@settings(max_examples=60, deadline=None)
@given(first_seq=st.integers(1, 2**63), items=ITEMS, lead=st.binary(max_size=8))
def test_frame_round_trip(first_seq: int, items: list[object], lead: bytes) -> None:
    data = lead + frame(first_seq, items)
    found = parse_frame(data, len(lead))
    assert found == Frame(len(lead), len(data), first_seq, len(items))
    assert found.last_seq == first_seq + len(items) - 1
    decoded = list(decode_items(found.payload(data), found.count))
    assert [item for item, _ in decoded] == items
    assert [size for _, size in decoded] == [len(msgpack.packb(i, use_bin_type=True)) for i in items]


def test_frame_header_layout() -> None:
    payload = pack(["a", "b"])
    header = encode_frame_header(7, 2, payload)
    assert len(header) == FRAME_HEADER_SIZE == 24
    marker, _crc, length, first_seq, count = struct.unpack("<4sIIQI", header)
    assert (marker, length, first_seq, count) == (FRAME_MARKER, len(payload), 7, 2)


@settings(max_examples=30, deadline=None)
@given(items=ITEMS, data=st.data())
def test_every_strict_prefix_of_a_frame_is_short(items: list[object], data: st.DataObject) -> None:
    whole = frame(5, items)
    cut = data.draw(st.integers(0, len(whole) - 1))
    assert parse_frame(whole[:cut], 0) == SHORT


def test_every_strict_prefix_is_short_at_a_nonzero_offset() -> None:
    whole = frame(1, ["x"]) + frame(2, ["hello", "world"])
    at = len(frame(1, ["x"]))
    for cut in range(at, len(whole)):
        assert parse_frame(whole[:cut], at) == SHORT, cut


@settings(max_examples=80, deadline=None)
@given(items=ITEMS, first_seq=st.integers(1, 2**40), data=st.data())
def test_a_flipped_bit_never_parses_as_a_frame(
    items: list[object], first_seq: int, data: st.DataObject
) -> None:
    whole = frame(first_seq, items)
    trailer = data.draw(st.sampled_from([b"", frame(first_seq + len(items), [1])]))
    buf = bytearray(whole + trailer)
    bit = data.draw(st.integers(0, len(whole) * 8 - 1))
    buf[bit // 8] ^= 1 << (bit % 8)
    found = parse_frame(bytes(buf), 0)
    assert not isinstance(found, Frame)
    in_length = 8 <= bit // 8 < 12
    grown = int.from_bytes(buf[8:12], "little") > len(whole) - FRAME_HEADER_SIZE
    if not (in_length and grown):
        assert found == BAD
    else:
        # A longer length may run past the end of the buffer: that looks torn.
        assert found in (SHORT, BAD)


def test_frame_with_zero_count_or_seq_zero_is_bad() -> None:
    payload = pack([1])
    for first_seq, count in ((0, 1), (1, 0)):
        data = encode_frame_header(first_seq, count, payload) + payload
        assert parse_frame(data, 0) == BAD


def test_frame_with_more_items_than_bytes_is_bad() -> None:
    payload = pack([1])
    data = encode_frame_header(1, 2, payload) + payload
    assert parse_frame(data, 0) == BAD


def test_length_beyond_the_frame_limit_is_bad_not_short() -> None:
    # A corrupt length field must not make a reader wait for (or read) 4 GiB.
    tail = struct.pack("<IQI", MAX_FRAME_PAYLOAD + 1, 1, 1)
    data = FRAME_MARKER + struct.pack("<I", framing_crc32c(tail)) + tail + b"\x01"
    assert parse_frame(data, 0) == BAD


def test_garbage_that_is_no_marker_prefix_is_bad_even_when_short() -> None:
    assert parse_frame(b"\x00\x01", 0) == BAD
    assert parse_frame(FRAME_MARKER[:3], 0) == SHORT


def test_frame_larger_than_the_limit_is_refused() -> None:
    try:
        big = mmap.mmap(-1, MAX_FRAME_PAYLOAD + 1)  # untouched pages: costs no memory
    except (OSError, OverflowError, ValueError):
        pytest.skip("cannot map 2 GiB of address space here")
    try:
        with pytest.raises(ValueError, match="exceeds the frame limit"):
            encode_frame_header(1, 1, memoryview(big))
    finally:
        big.close()


# ----------------------------------------------------------- find_next_frame


def test_find_next_frame_skips_garbage() -> None:
    good1 = frame(1, ["a"])
    garbage = b"\x00garbage" + FRAME_MARKER + b"not a frame" + FRAME_MARKER[:2]
    good2 = frame(2, ["b", "c"])
    data = good1 + garbage + good2
    found = find_next_frame(data, 0)
    assert found == Frame(len(good1) + len(garbage), len(data), 2, 2)
    # From inside the first frame it also lands on the next intact one.
    assert find_next_frame(data, 3) == found


def test_find_next_frame_starts_strictly_after_pos() -> None:
    data = frame(1, ["a"]) + frame(2, ["b"])
    assert find_next_frame(data, -1) == parse_frame(data, 0)
    second = find_next_frame(data, 0)
    assert isinstance(second, Frame) and second.first_seq == 2


def test_find_next_frame_returns_none_without_an_intact_frame() -> None:
    torn = frame(3, ["x", "y"])[:-1]
    assert find_next_frame(b"junk" + torn, 0) is None
    assert find_next_frame(b"", 0) is None


def test_find_next_frame_ignores_a_marker_inside_a_payload() -> None:
    inner = frame(9, ["decoy"])  # a whole valid frame, hidden inside an item's bytes
    outer = frame(1, [inner])
    data = b"\xff" + outer
    found = find_next_frame(data, 0)
    assert found == Frame(1, len(data), 1, 1)


@settings(max_examples=40, deadline=None)
@given(items=ITEMS, garbage=st.binary(max_size=64))
def test_find_next_frame_accepts_a_memoryview(items: list[object], garbage: bytes) -> None:
    good = frame(4, items)
    data = b"\x00" + garbage + good
    assert find_next_frame(memoryview(data), 0) == Frame(1 + len(garbage), len(data), 4, len(items))


# -------------------------------------------------------------- decode_items


@pytest.mark.parametrize("count", [1, 3])
def test_decode_items_rejects_a_count_that_disagrees(count: int) -> None:
    payload = pack(["a", "b"])
    with pytest.raises(ValueError, match="frame says"):
        list(decode_items(payload, count))


def test_decode_items_rejects_a_truncated_item() -> None:
    payload = pack(["a", "bcdef"])[:-2]
    with pytest.raises(ValueError):
        list(decode_items(payload, 2))


def test_decode_items_rejects_invalid_msgpack() -> None:
    with pytest.raises(ValueError, match="undecodable"):
        list(decode_items(b"\xc1", 1))  # 0xc1 is never used in msgpack


def test_decode_items_keeps_str_and_bytes_apart() -> None:
    payload = pack(["s", b"b", {1: "int key"}])
    assert [i for i, _ in decode_items(payload, 3)] == ["s", b"b", {1: "int key"}]
