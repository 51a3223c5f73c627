"""A segment scanned a window at a time finds exactly what a scan of the whole file finds.

Recovery reads every segment at each open; it now reads them through a bounded
window (``walbatch.segment.SegmentBytes``) instead of whole, and reports runs of
contiguous frames as one. Both must change nothing about what is found.
"""

from __future__ import annotations

import os
import uuid

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

import walbatch.segment as segment
from walbatch.fileio import OsFileSystem
from walbatch.framing import encode_frame_header, encode_header
from walbatch.segment import SegmentBytes, scan_segment

LOG_ID = uuid.UUID(int=5)


@st.composite
def segment_files(draw) -> bytes:
    """A header (maybe damaged), frames of 1..40 items, seq gaps, repeats, garbage, a torn end."""
    out = bytearray(encode_header(LOG_ID))
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        out[draw(st.integers(0, len(out) - 1))] ^= 0xFF
    seq = draw(st.integers(1, 1000))
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.sampled_from(["frame"] * 6 + ["gap", "repeat", "garbage", "flip"]))
        if kind == "garbage":
            out += draw(st.binary(min_size=1, max_size=50))
            continue
        count = draw(st.integers(1, 40))
        if kind == "gap":
            seq += draw(st.integers(1, 5))
        elif kind == "repeat":
            seq = max(1, seq - draw(st.integers(1, 5)))
        payload = b"".join(msgpack.packb({"i": seq + i, "p": "x" * draw(st.integers(0, 30))})
                           for i in range(count))
        frame = bytearray(encode_frame_header(seq, count, payload) + payload)
        if kind == "flip":
            frame[draw(st.integers(0, len(frame) - 1))] ^= 0x01
        out += frame
        seq += count
    if out and draw(st.booleans()):
        out = out[: len(out) - draw(st.integers(0, min(60, len(out))))]
    return bytes(out)


def flattened(scan) -> tuple:
    return (scan.size, scan.log_id, scan.header_error, [(d.offset, d.end, d.reason) for d in scan.damage],
            scan.tail_at, scan.tail_reason)


@settings(max_examples=150, deadline=None)
@given(data=segment_files(), window=st.sampled_from([8, 64, 1000, 1 << 20]))
def test_a_windowed_scan_finds_what_a_whole_scan_finds(tmp_path_factory, data, window):
    path = os.path.join(tmp_path_factory.mktemp("seg"), "00000000000000000001.wal")
    with open(path, "wb") as f:
        f.write(data)
    old = segment.SCAN_WINDOW
    segment.SCAN_WINDOW = window
    try:
        with SegmentBytes(OsFileSystem(), path) as lazy:
            for merge in (False, True):
                whole = scan_segment(path, data, merge=merge)
                windowed = scan_segment(path, lazy, merge=merge)
                assert flattened(windowed) == flattened(whole)
                assert windowed.frames == whole.frames
    finally:
        segment.SCAN_WINDOW = old


@given(data=segment_files())
@settings(max_examples=100, deadline=None)
def test_merged_runs_cover_exactly_the_frames(data):
    frames = scan_segment("x", data, merge=False).frames
    runs = scan_segment("x", data, merge=True).frames
    assert sum(f.count for f in frames) == sum(r.count for r in runs)
    for r in runs:  # each run is a contiguous stretch of the frames, in bytes and in seqs
        inside = [f for f in frames if r.offset <= f.offset and f.end <= r.end]
        assert inside and inside[0].offset == r.offset and inside[-1].end == r.end
        assert inside[0].first_seq == r.first_seq and sum(f.count for f in inside) == r.count
        assert all(a.end == b.offset and a.first_seq + a.count == b.first_seq
                   for a, b in zip(inside, inside[1:], strict=False))
