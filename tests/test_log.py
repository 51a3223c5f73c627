"""log.py and segment.py: recovery, append/sync/roll, truncation and reading.

One named test per error path, in the style of leveldb's log_test.cc. Corruption
is made by editing real segment files in ``tmp_path``; faults and power losses
use ``SimFileSystem`` (tests/simfs.py).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import uuid

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simfs import SimFileSystem

from walbatch.checkpoint import Checkpoint
from walbatch.errors import CorruptLog, LogFailed, LogLocked, LogWriteError
from walbatch.framing import FRAME_HEADER_SIZE, HEADER_SIZE, decode_items, encode_frame_header, encode_header
from walbatch.log import (
    CHECKPOINT_FILE,
    QUARANTINE_DIR,
    QUARANTINE_REPORT,
    SEGMENTS_DIR,
    Log,
    RawFrame,
)
from walbatch.segment import parse_segment_name, scan_segment, segment_name

SIM_DIR = "/data/log"


# ------------------------------------------------------------------ helpers


def pack(items: list[object]) -> bytes:
    return b"".join(msgpack.packb(i, use_bin_type=True) for i in items)


def commit(log: Log, *items: object) -> int:
    """Append one frame holding ``items`` and make it durable; return its first seq."""
    first = log.append(pack(list(items)), len(items))
    log.sync()
    return first


def read_all(log: Log, from_seq: int = 1) -> list[RawFrame]:
    reader = log.reader(from_seq)
    out: list[RawFrame] = []
    try:
        while batch := reader.read():
            out += batch
    finally:
        reader.close()
    return out


def items_by_seq(frames: list[RawFrame]) -> dict[int, object]:
    """seq -> item for every record a reader handed out (lost seqs map to None)."""
    out: dict[int, object] = {}
    for f in frames:
        if f.payload is None:
            out.update({s: None for s in range(f.first_seq, f.first_seq + f.count)})
            continue
        for n, (item, _) in enumerate(decode_items(f.payload, f.count)):
            if n >= f.skip:
                out[f.first_seq + n] = item
    return out


def seg_paths(directory) -> list[str]:
    segdir = os.path.join(directory, SEGMENTS_DIR)
    return [os.path.join(segdir, n) for n in sorted(os.listdir(segdir)) if parse_segment_name(n)]


def frames_in(path: str):
    with open(path, "rb") as f:
        return scan_segment(path, f.read()).frames


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def write_log(directory, frames: list[list[object]], **kw) -> Log:
    log = Log.open(str(directory), **kw)
    for items in frames:
        commit(log, *items)
    return log


def make_log(directory, frames: list[list[object]], **kw) -> None:
    write_log(directory, frames, **kw).close()


def sim_log(fs: SimFileSystem, **kw) -> Log:
    return Log.open(SIM_DIR, fs=fs, **kw)


# ------------------------------------------------------------- basics


def test_segment_names_sort_in_log_order_and_parse_back() -> None:
    names = [segment_name(s) for s in (1, 9, 10, 123456789, 2**63)]
    assert names == sorted(names)
    assert [parse_segment_name(n) for n in names] == [1, 9, 10, 123456789, 2**63]
    assert parse_segment_name("00000000000000000001.wal.tmp") is None
    assert parse_segment_name("0001.wal") is None
    assert parse_segment_name("checkpoint") is None


def test_new_log_starts_at_seq_one_with_a_durable_checkpoint(tmp_path) -> None:
    log = Log.open(str(tmp_path / "log"))
    try:
        assert log.next_seq == 1
        assert log.checkpoint.seq == 0
        assert (tmp_path / "log" / CHECKPOINT_FILE).exists()
        assert commit(log, "a") == 1
        assert commit(log, "b", "c") == 2
        assert log.next_seq == 4
    finally:
        log.close()


def test_records_survive_close_and_reopen(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], [{"k": [1, 2]}]])
    log = Log.open(str(tmp_path))
    try:
        assert log.next_seq == 5
        assert log.recovery_notes == []
        assert items_by_seq(read_all(log)) == {1: "a", 2: "b", 3: "c", 4: {"k": [1, 2]}}
        log_id = log.log_id
    finally:
        log.close()
    with open(seg_paths(tmp_path)[0], "rb") as f:
        assert f.read(HEADER_SIZE) == encode_header(log_id)


def test_open_rejects_an_unknown_corruption_policy(tmp_path) -> None:
    with pytest.raises(ValueError, match="on_corruption"):
        Log.open(str(tmp_path), on_corruption="ignore")


# ----------------------------------------------------------- torn tails


def test_recovery_lines_carry_an_event_and_the_finding_as_fields(tmp_path, caplog) -> None:
    # Operators filter structured logs by event (docs/operations.md), not by message text.
    make_log(tmp_path, [["a"], ["b", "c"]])
    path = seg_paths(tmp_path)[0]
    size = os.path.getsize(path)
    payload = pack(["lost1"])
    with open(path, "ab") as f:
        f.write((encode_frame_header(4, 1, payload) + payload)[:-1])
    caplog.set_level(logging.INFO, logger="walbatch")
    Log.open(str(tmp_path)).close()
    found = [r for r in caplog.records if getattr(r, "event", None) == "recovery"]
    assert len(found) == 1, caplog.text
    r = found[0]
    assert (r.action, r.path, r.offset) == ("trimmed", path, size)
    assert r.length == len(encode_frame_header(4, 1, payload) + payload) - 1 and r.reason


@pytest.mark.parametrize("keep", [1, 3, 4, 10, FRAME_HEADER_SIZE, FRAME_HEADER_SIZE + 2, -1])
def test_torn_trailing_frame_is_trimmed_on_open(tmp_path, keep: int) -> None:
    make_log(tmp_path, [["a"], ["b", "c"]])
    path = seg_paths(tmp_path)[0]
    good_size = os.path.getsize(path)
    payload = pack(["lost1", "lost2"])
    torn = (encode_frame_header(4, 2, payload) + payload)[:keep]
    with open(path, "ab") as f:
        f.write(torn)

    log = Log.open(str(tmp_path))
    try:
        assert os.path.getsize(path) == good_size
        assert log.next_seq == 4
        assert any("trimmed torn tail" in n for n in log.recovery_notes)
        # The seqs of the torn (never acknowledged) frame are handed out again.
        assert commit(log, "d") == 4
        assert items_by_seq(read_all(log)) == {1: "a", 2: "b", 3: "c", 4: "d"}
    finally:
        log.close()
    log = Log.open(str(tmp_path))
    try:
        assert log.next_seq == 5
        assert log.recovery_notes == []
    finally:
        log.close()


def test_trailing_garbage_is_trimmed_like_a_torn_write(tmp_path) -> None:
    make_log(tmp_path, [["a"]])
    path = seg_paths(tmp_path)[0]
    good_size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(bytes(random.Random(1).getrandbits(8) for _ in range(100)))
    log = Log.open(str(tmp_path))
    try:
        assert os.path.getsize(path) == good_size
        assert log.next_seq == 2
    finally:
        log.close()


def test_unsynced_frame_lost_in_a_power_cut_leaves_a_consistent_log() -> None:
    for seed in range(20):
        fs = SimFileSystem()
        log = sim_log(fs)
        commit(log, "a")
        commit(log, "b")
        log.append(pack(["unsynced"] * 3), 3)
        fs.crash(random.Random(seed), torn="random")
        log = sim_log(fs)
        got = items_by_seq(read_all(log))
        # An unsynced frame survives whole or not at all, never in part.
        assert got in ({1: "a", 2: "b"}, {1: "a", 2: "b", 3: "unsynced", 4: "unsynced", 5: "unsynced"})
        assert log.next_seq == len(got) + 1
        assert commit(log, "c") == len(got) + 1
        log.close()


@pytest.mark.parametrize("size", [0, 1, 8, HEADER_SIZE - 1])
def test_torn_header_of_a_just_created_last_segment_is_removed(tmp_path, size: int) -> None:
    make_log(tmp_path, [["a"], ["b"]])
    first = seg_paths(tmp_path)[0]
    torn = os.path.join(tmp_path, SEGMENTS_DIR, segment_name(3))
    with open(torn, "wb") as f:
        f.write(encode_header(uuid.uuid4())[:size])
    log = Log.open(str(tmp_path))
    try:
        assert not os.path.exists(torn)
        assert seg_paths(tmp_path) == [first]
        assert any("incomplete segment header" in n for n in log.recovery_notes)
        assert log.next_seq == 3
        assert commit(log, "c") == 3
        assert items_by_seq(read_all(log)) == {1: "a", 2: "b", 3: "c"}
    finally:
        log.close()


def test_segment_created_but_header_lost_in_a_power_cut() -> None:
    fs = SimFileSystem()
    log = sim_log(fs, segment_bytes=1)
    commit(log, "a")
    new = os.path.join(SIM_DIR, SEGMENTS_DIR, segment_name(2))
    fs.fail("sync", path_contains=segment_name(2))  # the new segment's header never syncs
    with pytest.raises(LogWriteError):
        log.append(pack(["b"]), 1)
    assert not fs.exists(new)
    fs.crash()
    log = sim_log(fs, segment_bytes=1)
    assert log.next_seq == 2
    assert items_by_seq(read_all(log)) == {1: "a"}
    log.close()


# --------------------------------------------------------------- corruption


def test_checksum_mismatch_in_the_middle_raises_with_path_offset_and_seqs(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c", "d"], ["e"]])
    path = seg_paths(tmp_path)[0]
    frames = frames_in(path)
    assert [(f.first_seq, f.count) for f in frames] == [(1, 1), (2, 3), (5, 1)]
    flip_byte(path, frames[1].end - 2)  # inside the middle frame's payload
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    err = info.value
    assert err.path == path
    assert err.offset == frames[1].offset
    assert err.seqs == (2, 4)
    assert path in str(err) and "2..4" in str(err)
    # The lock was released: the directory can be opened again (and fails the same way).
    with pytest.raises(CorruptLog):
        Log.open(str(tmp_path))


def test_damaged_frame_header_in_the_middle_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b"], ["c"]])
    path = seg_paths(tmp_path)[0]
    frames = frames_in(path)
    flip_byte(path, frames[1].offset)  # the marker itself
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert (info.value.path, info.value.offset, info.value.seqs) == (path, frames[1].offset, (2, 2))


def test_a_damaged_synced_marker_makes_damage_at_the_tail_corruption_not_a_torn_write(tmp_path) -> None:
    # The marker is what tells damage to acknowledged records from a torn write.
    # With it garbage, the damaged last record used to be trimmed as torn: silently lost.
    make_log(tmp_path, [["a"], ["b"], ["c"]])
    (tmp_path / "synced").write_bytes(os.urandom(48))
    path = seg_paths(tmp_path)[0]
    flip_byte(path, os.path.getsize(path) - 1)
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.seqs is not None and info.value.seqs[0] == 3
    assert "synced" in str(info.value)
    log = Log.open(str(tmp_path), on_corruption="quarantine")
    try:
        assert [(r.first, r.last >= 3) for r in log.lost] == [(3, True)]
        assert log.next_seq > log.lost[0].last  # no seq that may be acknowledged is reused
    finally:
        log.close()


@pytest.mark.parametrize("marker", [b"", os.urandom(48)], ids=["empty", "garbage"])
def test_a_marker_that_says_nothing_costs_nothing_on_an_intact_log(tmp_path, marker) -> None:
    make_log(tmp_path, [["a"], ["b"], ["c"]])
    (tmp_path / "synced").write_bytes(marker)
    log = Log.open(str(tmp_path))
    try:
        assert [f.first_seq for f in read_all(log)] == [1, 2, 3] and not log.findings
    finally:
        log.close()


def test_an_empty_marker_still_lets_a_torn_tail_be_trimmed(tmp_path) -> None:
    # A crash right after the marker file was created leaves it empty: that is no evidence.
    make_log(tmp_path, [["a"], ["b"]])
    (tmp_path / "synced").write_bytes(b"")
    path = seg_paths(tmp_path)[0]
    with open(path, "ab") as f:
        f.write(b"\xc7\xfa\x57\xb1" + b"\x01" * 9)  # the start of a frame, cut short
    log = Log.open(str(tmp_path))
    try:
        assert [f.action for f in log.findings] == ["trimmed"]
        assert log.synced_seq == 2
    finally:
        log.close()


def test_another_logs_segment_is_corruption_that_quarantine_moves_aside(tmp_path) -> None:
    # It used to raise CorruptLog in every mode, so `verify --repair`, which the
    # error recommends, could not get past it.
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    make_log(ours, [["a"], ["b"], ["c"], ["d"]], segment_bytes=1)  # one segment per record
    make_log(theirs, [["x"], ["y"]], segment_bytes=1)
    foreign = seg_paths(ours)[1]  # seq 2's segment, replaced by another log's file
    with open(seg_paths(theirs)[0], "rb") as src, open(foreign, "wb") as dst:
        dst.write(src.read())
    with pytest.raises(CorruptLog, match="belongs to log") as info:
        Log.open(str(ours))
    assert info.value.seqs == (2, 2)
    log = Log.open(str(ours), on_corruption="quarantine")
    try:
        assert [(r.first, r.last) for r in log.lost] == [(2, 2)]
        frames = read_all(log)  # seq 2 is read as lost, and nothing of theirs is read
        assert [(f.first_seq, f.payload is None) for f in frames] == [
            (1, False), (2, True), (3, False), (4, False)]
        assert [msgpack.unpackb(f.payload) for f in frames if f.payload] == ["a", "c", "d"]
        assert log.next_seq == 5
    finally:
        log.close()
    assert not os.path.exists(foreign)
    assert os.path.exists(os.path.join(ours, QUARANTINE_DIR, os.path.basename(foreign) + ".foreign"))
    Log.open(str(ours)).close()  # repaired: opens without complaint


def test_garbage_inserted_between_intact_frames_raises_without_lost_seqs(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b"]])
    path = seg_paths(tmp_path)[0]
    frames = frames_in(path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: frames[1].offset] + b"\x00" * 7 + data[frames[1].offset :])
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.offset == frames[1].offset
    assert info.value.seqs is None


def test_damage_at_the_end_of_a_sealed_segment_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], ["d"]], segment_bytes=1)
    paths = seg_paths(tmp_path)
    assert [os.path.basename(p) for p in paths] == [segment_name(1), segment_name(2), segment_name(4)]
    flip_byte(paths[1], os.path.getsize(paths[1]) - 1)  # the only (so last) frame of a sealed segment
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.path == paths[1]
    assert info.value.offset == HEADER_SIZE
    assert info.value.seqs == (2, 3)


def test_torn_end_of_a_sealed_segment_is_corruption_not_a_torn_tail(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], ["d"]], segment_bytes=1)
    paths = seg_paths(tmp_path)
    with open(paths[1], "r+b") as f:
        f.truncate(os.path.getsize(paths[1]) - 3)
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert (info.value.path, info.value.seqs) == (paths[1], (2, 3))


def test_damage_in_the_middle_of_a_sealed_segment_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b"], ["c"], ["d"]], segment_bytes=100)
    paths = seg_paths(tmp_path)
    assert len(paths) == 2
    frames = frames_in(paths[0])
    assert [f.first_seq for f in frames] == [1, 2, 3]
    flip_byte(paths[0], frames[1].offset + FRAME_HEADER_SIZE)
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert (info.value.path, info.value.offset, info.value.seqs) == (paths[0], frames[1].offset, (2, 2))


def test_damaged_header_of_a_sealed_segment_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], ["d"]], segment_bytes=1)
    paths = seg_paths(tmp_path)
    with open(paths[1], "r+b") as f:
        f.write(b"\0" * (HEADER_SIZE + 8))  # the header and the start of its only frame
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.path == paths[1]
    assert info.value.seqs == (2, 3)


def test_damaged_header_before_intact_frames_is_still_corruption(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], ["d"]], segment_bytes=1)
    paths = seg_paths(tmp_path)
    flip_byte(paths[1], 3)  # the magic; the frame after it is intact
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert (info.value.path, info.value.offset, info.value.seqs) == (paths[1], 0, None)


def test_damaged_header_of_the_last_segment_is_not_a_torn_create(tmp_path) -> None:
    # The header is synced before any frame goes in, so a full-length bad header
    # with (damaged) frames after it is corruption, not a crash during creation.
    make_log(tmp_path, [["a"], ["b", "c"]], segment_bytes=1)
    paths = seg_paths(tmp_path)
    with open(paths[1], "r+b") as f:
        f.write(b"\0" * (HEADER_SIZE + 8))
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.path == paths[1]
    assert os.path.exists(paths[1])


def test_missing_segment_in_the_middle_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], ["d"]], segment_bytes=1)
    paths = seg_paths(tmp_path)
    os.unlink(paths[1])
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.seqs == (2, 3)
    assert "missing" in info.value.reason


def test_missing_first_segment_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], ["d"]], segment_bytes=1)
    paths = seg_paths(tmp_path)
    os.unlink(paths[0])
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.seqs == (1, 1)
    assert "missing" in info.value.reason


def test_segment_from_another_log_raises(tmp_path) -> None:
    make_log(tmp_path / "mine", [["a"], ["b"]], segment_bytes=1)
    make_log(tmp_path / "other", [["x"], ["y"], ["z"]], segment_bytes=1)
    other = seg_paths(tmp_path / "other")[2]  # holds seq 3, the next one "mine" expects
    stranger = os.path.join(tmp_path, "mine", SEGMENTS_DIR, os.path.basename(other))
    with open(other, "rb") as src, open(stranger, "wb") as dst:
        dst.write(src.read())
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path / "mine"))
    assert info.value.path == stranger
    assert "belongs to log" in info.value.reason


def test_segment_header_rewritten_with_another_log_id_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"]])
    path = seg_paths(tmp_path)[0]
    with open(path, "r+b") as f:
        f.write(encode_header(uuid.uuid4()))
    with pytest.raises(CorruptLog, match="belongs to log"):
        Log.open(str(tmp_path))


def test_missing_checkpoint_with_segments_present_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"]])
    os.unlink(tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.path == str(tmp_path / CHECKPOINT_FILE)
    assert "missing" in info.value.reason
    assert not (tmp_path / CHECKPOINT_FILE).exists()  # open did not paper over it


def test_corrupt_checkpoint_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"]])
    flip_byte(str(tmp_path / CHECKPOINT_FILE), 30)
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.path == str(tmp_path / CHECKPOINT_FILE)


def test_frame_that_repeats_seqs_raises(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b"]])
    path = seg_paths(tmp_path)[0]
    payload = pack(["again"])
    with open(path, "ab") as f:
        f.write(encode_frame_header(2, 1, payload) + payload)
        f.write(encode_frame_header(3, 1, payload) + payload)  # so the repeat is not a torn tail
    with pytest.raises(CorruptLog, match="repeats seqs 2..2"):
        Log.open(str(tmp_path))


def test_damage_at_or_below_the_checkpoint_is_ignored(tmp_path) -> None:
    log = write_log(tmp_path, [["a"], ["b", "c"], ["d"], ["e"]])
    log.commit_checkpoint(Checkpoint(log.log_id, 3, 3, 0))
    log.close()
    path = seg_paths(tmp_path)[0]
    frames = frames_in(path)
    flip_byte(path, frames[1].end - 1)  # seqs 2..3, both delivered
    log = Log.open(str(tmp_path))
    try:
        assert any("already delivered" in n for n in log.recovery_notes)
        assert log.lost == []
        assert log.next_seq == 6
        assert items_by_seq(read_all(log, 4)) == {4: "d", 5: "e"}
    finally:
        log.close()


def test_damage_straddling_the_checkpoint_still_raises_for_the_undelivered_seqs(tmp_path) -> None:
    log = write_log(tmp_path, [["a"], ["b", "c", "d"], ["e"]])
    log.commit_checkpoint(Checkpoint(log.log_id, 2, 2, 0))
    log.close()
    path = seg_paths(tmp_path)[0]
    frames = frames_in(path)
    flip_byte(path, frames[1].end - 1)
    with pytest.raises(CorruptLog) as info:
        Log.open(str(tmp_path))
    assert info.value.seqs == (3, 4)


# --------------------------------------------------------------- quarantine


def test_quarantine_reports_lost_seqs_and_reader_hands_out_the_gap(tmp_path) -> None:
    make_log(tmp_path, [["a", "b"], ["c", "d", "e"], ["f"], ["g", "h"]])
    path = seg_paths(tmp_path)[0]
    frames = frames_in(path)
    damaged = frames[1]
    flip_byte(path, damaged.offset + FRAME_HEADER_SIZE + 1)
    with open(path, "rb") as f:
        raw = f.read()[damaged.offset : damaged.end]

    log = Log.open(str(tmp_path), on_corruption="quarantine")
    try:
        assert len(log.lost) == 1
        lost = log.lost[0]
        assert (lost.first, lost.last, lost.path, lost.offset) == (3, 5, path, damaged.offset)

        qdir = tmp_path / QUARANTINE_DIR
        (line,) = (qdir / QUARANTINE_REPORT).read_text().splitlines()
        report = json.loads(line)
        assert report["segment"] == os.path.basename(path)
        assert report["offset"] == damaged.offset
        assert report["length"] == len(raw)
        assert report["lost_seqs"] == [3, 5]
        assert report["reason"]
        assert isinstance(report["time"], float)
        assert (qdir / report["bytes_file"]).read_bytes() == raw

        frames_read = read_all(log)
        assert [(f.first_seq, f.count, f.payload is None) for f in frames_read] == [
            (1, 2, False), (3, 3, True), (6, 1, False), (7, 2, False)
        ]
        assert items_by_seq(frames_read) == {1: "a", 2: "b", 3: None, 4: None, 5: None,
                                             6: "f", 7: "g", 8: "h"}
        # The log goes on after the quarantined range.
        assert log.next_seq == 9
        assert commit(log, "i") == 9
        assert items_by_seq(read_all(log, 7)) == {7: "g", 8: "h", 9: "i"}
    finally:
        log.close()


def test_quarantine_reopen_does_not_duplicate_the_report(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b"], ["c"]])
    path = seg_paths(tmp_path)[0]
    flip_byte(path, frames_in(path)[1].end - 1)
    for _ in range(2):
        Log.open(str(tmp_path), on_corruption="quarantine").close()
    lines = (tmp_path / QUARANTINE_DIR / QUARANTINE_REPORT).read_text().splitlines()
    assert len(lines) == 1


def test_quarantine_of_a_damaged_sealed_segment_tail_reads_on_into_the_next_segment(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], ["d"], ["e"]], segment_bytes=1)
    paths = seg_paths(tmp_path)
    flip_byte(paths[1], os.path.getsize(paths[1]) - 1)
    log = Log.open(str(tmp_path), on_corruption="quarantine")
    try:
        assert [(r.first, r.last, r.path) for r in log.lost] == [(2, 3, paths[1])]
        assert items_by_seq(read_all(log)) == {1: "a", 2: None, 3: None, 4: "d", 5: "e"}
    finally:
        log.close()


def test_quarantine_of_a_damaged_sealed_segment_header_loses_each_seq_once(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], ["d"]], segment_bytes=1)
    paths = seg_paths(tmp_path)
    with open(paths[1], "r+b") as f:
        f.write(b"\0" * (HEADER_SIZE + 8))
    log = Log.open(str(tmp_path), on_corruption="quarantine")
    try:
        lost = sorted(s for r in log.lost for s in range(r.first, r.last + 1))
        assert lost == [2, 3]
        assert items_by_seq(read_all(log)) == {1: "a", 2: None, 3: None, 4: "d"}
    finally:
        log.close()


def test_quarantine_of_a_missing_segment(tmp_path) -> None:
    make_log(tmp_path, [["a"], ["b", "c"], ["d"]], segment_bytes=1)
    os.unlink(seg_paths(tmp_path)[1])
    log = Log.open(str(tmp_path), on_corruption="quarantine")
    try:
        assert [(r.first, r.last) for r in log.lost] == [(2, 3)]
        assert items_by_seq(read_all(log)) == {1: "a", 2: None, 3: None, 4: "d"}
    finally:
        log.close()


def test_reader_refuses_damage_it_was_not_told_about(tmp_path) -> None:
    log = write_log(tmp_path, [["a"], ["b"], ["c"]])
    try:
        path = seg_paths(tmp_path)[0]
        frame = frames_in(path)[1]
        flip_byte(path, frame.end - 1)  # damage after open: the reader checks checksums again
        reader = log.reader(1)
        with pytest.raises(CorruptLog) as info:
            while reader.read(max_bytes=1):
                pass
        reader.close()
        assert (info.value.path, info.value.offset, info.value.seqs) == (path, frame.offset, (2, 2))
    finally:
        log.close()


# ------------------------------------------------------- roll and truncation


def test_roll_at_segment_bytes_names_the_new_segment_by_its_first_seq(tmp_path) -> None:
    log = Log.open(str(tmp_path), segment_bytes=120)
    try:
        seqs = [commit(log, f"item-{n:03d}", "x" * 20) for n in range(10)]
        assert seqs == list(range(1, 20, 2))
        infos = log.segments()
        assert len(infos) > 2
        assert [os.path.basename(s.path) for s in infos] == [segment_name(s.first_seq) for s in infos]
        assert seg_paths(tmp_path) == [s.path for s in infos]
        for info, nxt in zip(infos, infos[1:], strict=False):
            assert info.size >= 120  # rolled only once full
            assert nxt.first_seq == info.last_seq + 1
            with open(info.path, "rb") as f:
                data = f.read()
            scan = scan_segment(info.path, data)
            assert scan.frames[0].first_seq == info.first_seq
            assert scan.frames[-1].last_seq == info.last_seq
            assert scan.damage == [] and scan.tail_at is None
        assert items_by_seq(read_all(log)) == {
            s + k: v for n, s in enumerate(seqs) for k, v in enumerate([f"item-{n:03d}", "x" * 20])
        }
    finally:
        log.close()


def test_roll_fsyncs_the_directory_before_records_go_in() -> None:
    fs = SimFileSystem()
    log = sim_log(fs, segment_bytes=1)
    for n in range(5):
        commit(log, n)
    assert len(log.segments()) == 5
    fs.crash()  # drops every name whose directory was not fsync'd
    log = sim_log(fs, segment_bytes=1)
    assert items_by_seq(read_all(log)) == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    assert log.next_seq == 6
    log.close()


def test_failed_directory_fsync_on_roll_is_a_write_error_not_an_ack() -> None:
    fs = SimFileSystem()
    log = sim_log(fs, segment_bytes=1)
    commit(log, "a")
    fs.fail("fsync_dir", path_contains=SEGMENTS_DIR)
    with pytest.raises(LogWriteError):
        log.append(pack(["b"]), 1)
    assert not fs.exists(os.path.join(SIM_DIR, SEGMENTS_DIR, segment_name(2)))
    assert commit(log, "b") == 2
    fs.crash()
    log = sim_log(fs)
    assert items_by_seq(read_all(log)) == {1: "a", 2: "b"}
    log.close()


def test_appends_across_a_roll_are_all_durable_after_one_sync() -> None:
    # append() twice, then sync(): sync promises every appended record is durable,
    # including the one left in the segment the second append sealed.
    fs = SimFileSystem()
    log = sim_log(fs, segment_bytes=1)
    log.append(pack(["a"]), 1)
    log.append(pack(["b"]), 1)  # rolls: "a" is now in a sealed segment
    log.sync()
    assert items_by_seq(read_all(log)) == {1: "a", 2: "b"}
    fs.crash()
    log = sim_log(fs, segment_bytes=1)
    assert items_by_seq(read_all(log)) == {1: "a", 2: "b"}
    log.close()


def test_reopen_appends_to_the_last_segment_until_it_is_full(tmp_path) -> None:
    make_log(tmp_path, [["a"]], segment_bytes=1000)
    make_log(tmp_path, [["b"]], segment_bytes=1000)
    assert len(seg_paths(tmp_path)) == 1
    make_log(tmp_path, [["c"]], segment_bytes=1)  # now "full": the next frame rolls
    assert [os.path.basename(p) for p in seg_paths(tmp_path)] == [segment_name(1), segment_name(3)]


def _three_sealed_segments(directory, fs=None) -> Log:
    log = Log.open(str(directory), fs=fs, segment_bytes=1)
    commit(log, "a", "b")  # segment 1: seqs 1..2
    commit(log, "c")  # segment 3: seq 3
    commit(log, "d", "e")  # segment 4: seqs 4..5
    commit(log, "f")  # segment 6 (active): seq 6
    assert [s.first_seq for s in log.segments()] == [1, 3, 4, 6]
    return log


def test_truncate_front_deletes_only_sealed_segments_fully_covered(tmp_path) -> None:
    log = _three_sealed_segments(tmp_path)
    try:
        log.truncate_front(1)  # segment 1 still holds seq 2
        assert [s.first_seq for s in log.segments()] == [1, 3, 4, 6]
        log.truncate_front(2)
        assert [s.first_seq for s in log.segments()] == [3, 4, 6]
        assert [os.path.basename(p) for p in seg_paths(tmp_path)] == [segment_name(s) for s in (3, 4, 6)]
        log.truncate_front(4)  # segment 4 still holds seq 5
        assert [s.first_seq for s in log.segments()] == [4, 6]
        log.truncate_front(10**6)  # the active segment is never deleted
        assert [s.first_seq for s in log.segments()] == [6]
        assert seg_paths(tmp_path) == [log.segments()[0].path]
        assert log.bytes == os.path.getsize(log.segments()[0].path)
        assert commit(log, "g") == 7
    finally:
        log.close()


def test_commit_checkpoint_deletes_covered_segments_durably() -> None:
    fs = SimFileSystem()
    log = _three_sealed_segments(SIM_DIR, fs)
    log.commit_checkpoint(Checkpoint(log.log_id, 3, 3, 0))
    assert [s.first_seq for s in log.segments()] == [4, 6]
    fs.crash()
    log = sim_log(fs)
    assert log.checkpoint == Checkpoint(log.log_id, 3, 3, 0)
    assert [s.first_seq for s in log.segments()] == [4, 6]
    assert items_by_seq(read_all(log, 4)) == {4: "d", 5: "e", 6: "f"}
    log.close()


def test_open_finishes_deleting_segments_a_durable_checkpoint_covers(tmp_path) -> None:
    log = _three_sealed_segments(tmp_path)
    log.close()
    # As if the process died between the checkpoint write and the unlinks.
    cp = Checkpoint(log.log_id, 5, 5, 0)
    with open(tmp_path / CHECKPOINT_FILE, "wb") as f:
        f.write(cp.encode())
    log = Log.open(str(tmp_path))
    try:
        assert [s.first_seq for s in log.segments()] == [6]
        assert [os.path.basename(p) for p in seg_paths(tmp_path)] == [segment_name(6)]
        assert items_by_seq(read_all(log, 6)) == {6: "f"}
    finally:
        log.close()


def test_commit_checkpoint_refuses_to_move_backwards(tmp_path) -> None:
    log = write_log(tmp_path, [["a"], ["b"], ["c"]])
    try:
        log.commit_checkpoint(Checkpoint(log.log_id, 2, 2, 0))
        with pytest.raises(ValueError, match="move back"):
            log.commit_checkpoint(Checkpoint(log.log_id, 1, 1, 0))
        assert log.checkpoint.seq == 2
    finally:
        log.close()
    log = Log.open(str(tmp_path))
    try:
        assert log.checkpoint.seq == 2
    finally:
        log.close()


def test_next_seq_stays_above_the_checkpoint_even_with_no_records(tmp_path) -> None:
    log = write_log(tmp_path, [["a"], ["b"]])
    log.commit_checkpoint(Checkpoint(log.log_id, 2, 2, 0))
    log.close()
    for p in seg_paths(tmp_path):
        os.unlink(p)
    log = Log.open(str(tmp_path))
    try:
        assert log.next_seq == 3
        assert commit(log, "c") == 3
    finally:
        log.close()


# -------------------------------------------------------------- ownership


def test_second_open_of_the_same_directory_raises_log_locked(tmp_path) -> None:
    log = Log.open(str(tmp_path))
    try:
        with pytest.raises(LogLocked, match="another process"):
            Log.open(str(tmp_path))
        commit(log, "still mine")
    finally:
        log.close()
    log = Log.open(str(tmp_path))  # released on close
    log.close()


def test_failed_open_releases_the_lock(tmp_path) -> None:
    make_log(tmp_path, [["a"]])
    os.unlink(tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CorruptLog):
        Log.open(str(tmp_path))
    with pytest.raises(CorruptLog):  # not LogLocked
        Log.open(str(tmp_path))


# --------------------------------------------------------------- I/O faults


def test_fsync_failure_poisons_the_log_until_reopened() -> None:
    # On a file system that does not honour O_DSYNC, where Log.sync() calls fdatasync.
    fs = SimFileSystem(honour_dsync=False)
    log = sim_log(fs)
    commit(log, "a")
    fs.fail("sync")
    log.append(pack(["b"]), 1)
    with pytest.raises(LogFailed):
        log.sync()
    assert log.failed is not None
    for _ in range(3):  # every later write is refused, though the disk works again
        with pytest.raises(LogFailed, match="reopen"):
            log.append(pack(["c"]), 1)
        with pytest.raises(LogFailed):
            log.sync()
    assert log.synced_seq == 1  # the failed record was never made visible
    assert items_by_seq(read_all(log)) == {1: "a"}
    log.close()

    log = sim_log(fs)
    assert log.failed is None
    # "b" was not acknowledged; it may or may not have survived, but seqs never collide.
    survivors = items_by_seq(read_all(log))
    assert survivors in ({1: "a"}, {1: "a", 2: "b"})
    first = commit(log, "c")
    assert first == len(survivors) + 1
    assert items_by_seq(read_all(log)) == {**survivors, first: "c"}
    log.close()


def test_write_failure_raises_log_write_error_and_the_log_stays_usable() -> None:
    fs = SimFileSystem()
    log = sim_log(fs)
    commit(log, "a")
    path = log.segments()[-1].path
    size = len(fs.read_file(path))
    fs.fail("write", errno.ENOSPC)
    with pytest.raises(LogWriteError, match="No space"):
        log.append(pack(["b", "c"]), 2)
    assert len(fs.read_file(path)) == size  # no bytes of the failed write remain
    assert log.failed is None
    assert log.next_seq == 2
    assert commit(log, "d") == 2
    assert items_by_seq(read_all(log)) == {1: "a", 2: "d"}
    fs.crash()
    log = sim_log(fs)
    assert items_by_seq(read_all(log)) == {1: "a", 2: "d"}
    log.close()


def test_an_io_error_on_a_synchronous_write_poisons_the_log_like_a_failed_fsync() -> None:
    # With O_DSYNC segments the write is the sync: EIO from it leaves the file in an
    # unknown state, so it must be treated as a failed fdatasync, not undone and forgotten.
    fs = SimFileSystem()
    log = sim_log(fs)
    commit(log, "a")
    fs.fail("write", errno.EIO)
    with pytest.raises(LogFailed, match="refuses writes until reopened"):
        log.append(pack(["b"]), 1)
    assert log.failed is not None
    with pytest.raises(LogFailed):
        log.append(pack(["c"]), 1)
    log.close()
    log = sim_log(fs)
    assert log.failed is None and commit(log, "c") in (2, 3)
    log.close()


def test_failure_to_create_a_segment_is_a_write_error_and_the_log_stays_usable() -> None:
    fs = SimFileSystem()
    log = sim_log(fs, segment_bytes=1)
    commit(log, "a")
    fs.fail("create", errno.ENOSPC)
    with pytest.raises(LogWriteError, match="No space"):
        log.append(pack(["b"]), 1)
    assert log.failed is None
    assert commit(log, "b") == 2
    fs.crash()
    log = sim_log(fs)
    assert items_by_seq(read_all(log)) == {1: "a", 2: "b"}
    log.close()


def test_write_failure_that_cannot_be_undone_fails_the_log() -> None:
    fs = SimFileSystem()
    log = sim_log(fs)
    commit(log, "a")
    fs.fail("write", errno.EIO)
    fs.fail("truncate", errno.EIO)
    with pytest.raises(LogFailed):
        log.append(pack(["b"]), 1)
    with pytest.raises(LogFailed):
        log.append(pack(["c"]), 1)
    log.close()


def test_closed_log_refuses_writes(tmp_path) -> None:
    log = Log.open(str(tmp_path))
    log.close()
    log.close()  # idempotent
    with pytest.raises(LogFailed, match="closed"):
        log.append(pack(["a"]), 1)


# ------------------------------------------------------------------ reader


def test_reader_starts_in_the_middle_of_a_frame(tmp_path) -> None:
    log = write_log(tmp_path, [["a"], ["b", "c", "d"], ["e"]])
    try:
        frames = read_all(log, 3)
        assert [(f.first_seq, f.count, f.skip) for f in frames] == [(2, 3, 1), (5, 1, 0)]
        assert items_by_seq(frames) == {3: "c", 4: "d", 5: "e"}
        assert [(f.first_seq, f.skip) for f in read_all(log, 4)] == [(2, 2), (5, 0)]
        assert read_all(log, 6) == []
    finally:
        log.close()


def test_reader_reads_across_segments_in_order(tmp_path) -> None:
    log = Log.open(str(tmp_path), segment_bytes=100)
    try:
        expected = {}
        for n in range(30):
            items = [f"{n}-{k}" for k in range(n % 3 + 1)]
            first = commit(log, *items)
            expected.update({first + k: v for k, v in enumerate(items)})
        assert len(log.segments()) > 5
        frames = read_all(log)
        assert [f.first_seq for f in frames] == sorted(f.first_seq for f in frames)
        assert items_by_seq(frames) == expected
        mid = len(expected) // 2
        assert items_by_seq(read_all(log, mid)) == {s: v for s, v in expected.items() if s >= mid}
    finally:
        log.close()


@pytest.mark.parametrize("segment_bytes", [1 << 20, 1])
def test_reader_sees_only_synced_records(tmp_path, segment_bytes: int) -> None:
    log = Log.open(str(tmp_path), segment_bytes=segment_bytes)
    try:
        commit(log, "a")
        reader = log.reader(1)
        assert items_by_seq(reader.read()) == {1: "a"}
        log.append(pack(["b"]), 1)  # written (the bytes are in the file) but not synced
        log.append(pack(["c"]), 1)
        # (With tiny segments the second append seals, and so syncs, the segment holding "b".)
        early = items_by_seq(reader.read())
        assert early == ({} if segment_bytes > 1 else {2: "b"})
        log.sync()
        assert {**early, **items_by_seq(reader.read())} == {2: "b", 3: "c"}
        assert reader.read() == []
        reader.close()
    finally:
        log.close()


def test_reader_keeps_up_with_a_growing_log_and_truncation(tmp_path) -> None:
    log = Log.open(str(tmp_path), segment_bytes=60)
    try:
        reader = log.reader(1)
        got: dict[int, object] = {}
        for n in range(20):
            commit(log, n)
            got.update(items_by_seq(reader.read()))
            if n % 5 == 4:
                log.commit_checkpoint(Checkpoint(log.log_id, n + 1, n + 1, 0))
        reader.close()
        assert got == {n + 1: n for n in range(20)}
    finally:
        log.close()


def test_reader_limits_each_read_to_about_max_bytes(tmp_path) -> None:
    log = write_log(tmp_path, [[n] for n in range(10)])
    try:
        reader = log.reader(1)
        sizes = []
        while batch := reader.read(max_bytes=1):
            sizes.append(len(batch))
        reader.close()
        assert sizes == [1] * 10
    finally:
        log.close()


@settings(max_examples=25, deadline=None)
@given(
    commits=st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=4), min_size=1, max_size=12),
    segment_bytes=st.sampled_from([1, 80, 200, 1 << 20]),
    synced_prefix=st.integers(0, 12),
    data=st.data(),
)
def test_crash_keeps_every_synced_record_and_reuses_no_seq(
    commits: list[list[int]], segment_bytes: int, synced_prefix: int, data: st.DataObject
) -> None:
    fs = SimFileSystem()
    log = sim_log(fs, segment_bytes=segment_bytes)
    expected: dict[int, int] = {}
    for n, items in enumerate(commits):
        first = log.append(pack(items), len(items))
        if n < synced_prefix:
            log.sync()
            expected.update({first + k: v for k, v in enumerate(items)})
    fs.crash(random.Random(data.draw(st.integers(0, 2**32))), torn="random")
    log = sim_log(fs, segment_bytes=segment_bytes)
    got = items_by_seq(read_all(log))
    # Every synced record is there; anything more is a prefix of the unsynced ones.
    assert {s: got.get(s) for s in expected} == expected
    assert sorted(got) == list(range(1, len(got) + 1))
    assert log.next_seq == len(got) + 1
    log.close()



def test_the_active_segment_is_written_with_o_dsync_so_sync_may_skip_fdatasync(tmp_path):
    """Log.sync() issues no fdatasync for an O_DSYNC handle: that is only sound if the
    kernel syncs each write, so check the flag on the open file, first and after a roll."""
    import fcntl

    log = Log.open(str(tmp_path / "log"), segment_bytes=256)
    try:
        for i in range(20):
            log.append(msgpack.packb({"i": i, "pad": "x" * 40}), 1)
            log.sync()
            assert fcntl.fcntl(log._fh.fd, fcntl.F_GETFL) & os.O_DSYNC, f"after append {i}"
        assert len(log.segments()) > 1  # rolled at least once
        assert log.synced_seq == 20
    finally:
        log.close()
