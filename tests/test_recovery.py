"""Recovery of a log whose segment files are out of place, and tools that agree about it.

Segments duplicated, swapped or restored from a backup under another name;
damage to records already delivered; a checkpoint put back from a backup. Each
case is built on real files, then checked through every door: the open
(``DurableBatcher``, in both corruption modes), ``walbatch verify`` (with and
without ``--repair``, text and ``--json``), ``dump`` and ``status``. What must
hold: they agree, a repair gives up exactly the seqs that then do not arrive
(none when nothing is missing), delivery goes on, and no acknowledged record is
ever called "never acknowledged".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import msgpack
import pytest
from helpers import FAST, Collector

from walbatch import CorruptLog, DurableBatcher
from walbatch.dlq import list_dead_letters
from walbatch.framing import HEADER_SIZE, encode_frame_header, encode_header
from walbatch.segment import parse_segment_name, scan_segment, segment_name

WAIT = 60
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("WALBATCH_", "LISTEN_"))}


def wb(*args: object, code: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "walbatch", *map(str, args)],
                            capture_output=True, text=True, timeout=WAIT, env=ENV)
    assert "Traceback" not in result.stderr, result.stderr
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return result


def build(d: Path, n: int = 40, segment_bytes: int = 300) -> dict[int, object]:
    """A writer-only log of ``n`` items over several segments; seq -> item."""
    items = {}
    with DurableBatcher(d, None, segment_bytes=segment_bytes) as b:
        for k in range(n):
            item = {"i": k, "pad": "p" * 20}
            items[b.submit(item).seq] = item
    return items


def segments(d: Path) -> list[Path]:
    return sorted(p for p in (d / "segments").iterdir() if parse_segment_name(p.name))


def seqs_in(path: Path) -> tuple[int, int]:
    frames = scan_segment(str(path), path.read_bytes()).frames
    return frames[0].first_seq, frames[-1].last_seq


def deliver(d: Path, **options) -> Collector:
    sink = Collector()
    with DurableBatcher(d, sink, **{**FAST, **options}) as b:
        b.flush(timeout=30)
    return sink


def verify_json(d: Path, code: int, *args: str) -> dict:
    return json.loads(wb("verify", "--data-dir", d, "--json", *args, code=code).stdout)


def dump(d: Path, code: int = 0) -> list[dict]:
    return [json.loads(line) for line in wb("dump", "--data-dir", d, code=code).stdout.splitlines()]


# ------------------------------------------------------- misplaced segments


def test_a_duplicated_segment_is_reported_and_repair_moves_it_aside_losing_nothing(tmp_path):
    d = tmp_path / "log"
    items = build(d)
    segs = segments(d)
    copy = d / "segments" / segment_name(99999)  # restored from a backup under a later name
    shutil.copy(segs[1], copy)

    with pytest.raises(CorruptLog) as info:
        DurableBatcher(d, Collector())
    assert info.value.path == str(copy)
    report = verify_json(d, 3)
    assert (report["intact"], report["lost_seqs"]) == (False, [])
    assert [f["path"] for f in report["findings"] if f["action"] == "corrupt"] == [str(copy)]
    assert "duplicate" in wb("verify", "--data-dir", d, code=3).stdout

    result = wb("verify", "--repair", "--data-dir", d)
    assert "lost seqs: none" in result.stdout
    assert not copy.exists()
    assert (d / "quarantine" / (copy.name + ".duplicate")).exists()
    assert verify_json(d, 0)["intact"]
    sink = deliver(d)
    assert dict(sink.records) == items and sink.seqs == sorted(items)
    assert list_dead_letters(str(d)) == []


def test_a_duplicated_segment_does_not_stop_a_quarantining_open(tmp_path):
    d = tmp_path / "log"
    items = build(d)
    shutil.copy(segments(d)[0], d / "segments" / segment_name(5000))
    sink = deliver(d, on_corruption="quarantine")
    assert dict(sink.records) == items
    assert list_dead_letters(str(d)) == []


def test_swapped_segments_are_put_back_under_their_right_names(tmp_path):
    d = tmp_path / "log"
    items = build(d)
    a, b = segments(d)[1:3]
    first_a, first_b = seqs_in(a)[0], seqs_in(b)[0]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)

    with pytest.raises(CorruptLog):
        DurableBatcher(d, None)
    report = verify_json(d, 3)
    assert report["lost_seqs"] == []  # a repair loses nothing
    assert sorted(f["path"] for f in report["findings"] if f["action"] == "corrupt") == [
        str(a), str(b)]
    # dump reads the records where a repair will put them, and says the log needs one.
    assert dump(d, code=3) == [{"seq": s, "item": items[s]} for s in sorted(items)]
    assert json.loads(wb("status", "--data-dir", d, "--json").stdout)["intact"] is False

    result = wb("verify", "--repair", "--data-dir", d)
    assert "lost seqs: none" in result.stdout
    assert seqs_in(d / "segments" / segment_name(first_a))[0] == first_a
    assert seqs_in(d / "segments" / segment_name(first_b))[0] == first_b
    assert (d / "segments" / segment_name(first_a)).read_bytes() == data_a
    sink = deliver(d)
    assert sink.records == sorted(items.items())
    assert list_dead_letters(str(d)) == []


def test_swapped_newest_segments_are_put_back_and_the_log_goes_on(tmp_path):
    d = tmp_path / "log"
    items = build(d)
    a, b = segments(d)[-2:]  # the active segment is one of them
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    assert verify_json(d, 0, "--repair")["lost_seqs"] == []
    with DurableBatcher(d, None) as w:
        items[w.submit("after").seq] = "after"
    sink = deliver(d)
    assert sink.records == sorted(items.items())


def test_a_segment_holding_other_records_for_the_same_seqs_yields_to_the_log(tmp_path):
    d = tmp_path / "log"
    items = build(d)
    log_id = json.loads(wb("status", "--data-dir", d, "--json").stdout)["log_id"]
    first, _last = seqs_in(segments(d)[1])
    payload = msgpack.packb({"not": "the log's"})
    stray = encode_header(uuid.UUID(log_id)) + encode_frame_header(first, 1, payload) + payload
    (d / "segments" / segment_name(first + 1)).write_bytes(stray)  # another name, same seq

    report = verify_json(d, 3)
    assert report["lost_seqs"] == []
    assert verify_json(d, 0, "--repair")["lost_seqs"] == []
    assert dict(deliver(d).records) == items  # the log's own record, not the stray one


def test_a_misplaced_segment_that_fits_nowhere_loses_exactly_the_seqs_it_alone_held(tmp_path):
    d = tmp_path / "log"
    items = build(d)
    segs = segments(d)
    gone = seqs_in(segs[1])
    # Its records, plus the next segment's first frame: overlaps the log, so it cannot
    # go back; and its own segment is gone.
    nxt = scan_segment(str(segs[2]), segs[2].read_bytes()).frames[0]
    data = segs[1].read_bytes() + segs[2].read_bytes()[nxt.offset:nxt.end]
    (d / "segments" / segment_name(99999)).write_bytes(data)
    segs[1].unlink()

    report = verify_json(d, 3)
    assert report["lost_seqs"] == [list(gone)]
    result = verify_json(d, 0, "--repair")
    assert result["lost_seqs"] == [list(gone)]
    sink = deliver(d)
    lost = set(range(gone[0], gone[1] + 1))
    assert dict(sink.records) == {s: i for s, i in items.items() if s not in lost}
    assert {x.seq for x in list_dead_letters(str(d)) if x.lost} == lost


def test_a_segment_under_the_wrong_name_comes_back_after_a_crash_mid_repair(tmp_path):
    # A repair moves misplaced segments to quarantine/ and then back under their right
    # names; a crash in between leaves them in quarantine/, where the next repair finds them.
    d = tmp_path / "log"
    items = build(d)
    seg = segments(d)[1]
    (d / "quarantine").mkdir()
    seg.rename(d / "quarantine" / (segment_name(77777) + ".misplaced"))
    report = verify_json(d, 3)
    assert report["lost_seqs"] == []
    assert verify_json(d, 0, "--repair")["lost_seqs"] == []
    assert seg.exists()
    assert dict(deliver(d).records) == items


# ----------------------------------------- damage to records already delivered


def deliver_all_then_damage_the_last_record(d: Path) -> tuple[dict[int, object], int]:
    items = build(d, n=30)
    deliver(d)
    last = segments(d)[-1]
    frames = scan_segment(str(last), last.read_bytes()).frames
    data = bytearray(last.read_bytes())
    data[frames[-1].end - 1] ^= 0xFF  # the last (delivered) record's checksum fails
    last.write_bytes(bytes(data))
    return items, frames[-1].first_seq


def test_damage_to_the_last_delivered_record_is_never_called_unacknowledged(tmp_path, caplog):
    d = tmp_path / "log"
    items, bad = deliver_all_then_damage_the_last_record(d)
    # Before any open: the tools agree that nothing undelivered is hurt.
    before = verify_json(d, 0)
    assert before["intact"] and before["lost_seqs"] == []
    assert dump(d)[-1] == {"seq": bad, "lost": True}

    caplog.set_level(logging.WARNING, logger="walbatch")
    sink = Collector()
    with DurableBatcher(d, sink, **FAST) as b:
        new = b.submit("new").seq
        b.flush(timeout=30)
    assert new == bad + 1  # the delivered seq is not handed out again
    assert sink.records == [(new, "new")]
    text = caplog.text
    assert "never acknowledged" not in text
    assert "delivered" in text

    report = verify_json(d, 0)
    assert report["intact"] and report["lost_seqs"] == []
    assert "harmless" in wb("verify", "--data-dir", d).stdout
    records = dump(d)  # every record still in the log, the damaged one as lost
    assert records[-2:] == [{"seq": bad, "lost": True}, {"seq": new, "item": "new"}]
    assert records[:-2] == [{"seq": s, "item": items[s]} for s in range(records[0]["seq"], bad)]
    status = json.loads(wb("status", "--data-dir", d, "--json").stdout)
    assert (status["intact"], status["first_seq"], status["last_seq"]) == (
        True, report["first_seq"], new)
    assert "lost seqs: none" in wb("verify", "--repair", "--data-dir", d).stdout
    assert list_dead_letters(str(d)) == []


def test_an_older_checkpoint_put_back_makes_no_delivered_item_look_lost(tmp_path):
    d = tmp_path / "log"
    items = build(d, n=150, segment_bytes=400)
    old = (d / "checkpoint").read_bytes()  # a backup from before any delivery
    deliver(d, checkpoint_interval=0)  # delivered: covered segments are deleted
    assert segments(d)[0].name != segment_name(1)
    (d / "checkpoint").write_bytes(old)

    report = verify_json(d, 0)
    assert report["lost_seqs"] == [] and report["intact"]
    assert all(f["action"] != "corrupt" for f in report["findings"])
    assert [r for r in dump(d) if "lost" not in r] == [
        {"seq": s, "item": items[s]} for s in sorted(items) if s >= report["first_seq"]]
    assert "lost seqs: none" in wb("verify", "--repair", "--data-dir", d).stdout
    sink = Collector()
    with DurableBatcher(d, sink, **FAST) as b:
        b.flush(timeout=30)
        stats = b.stats()
    assert stats.dead_lettered == 0
    assert list_dead_letters(str(d)) == []
    assert set(sink.seqs) <= set(items)  # what was still in the log, at most, again


def test_a_damaged_header_write_of_a_new_segment_past_delivered_records(tmp_path):
    # The newest segment's header half written (a crash at creation), everything
    # before it delivered: a torn create, removed; no record is called lost.
    d = tmp_path / "log"
    items = build(d, n=20)
    deliver(d)
    nxt = max(items) + 1
    (d / "segments" / segment_name(nxt)).write_bytes(encode_header(uuid.uuid4())[:HEADER_SIZE - 5])
    assert verify_json(d, 0)["lost_seqs"] == []
    with DurableBatcher(d, None) as w:
        assert w.submit("x").seq == nxt


def test_the_quarantine_directory_survives_a_power_loss_right_after_a_repair() -> None:
    # quarantine/ was made but its entry in the data directory never fsync'd: a power
    # loss could take the directory, and the segments a repair had moved into it.
    from simfs import SimFileSystem

    from walbatch.quarantine import Quarantine

    fs = SimFileSystem()
    fs.makedirs("/d/segments")
    fs.fsync_dir("/d")
    seg = "/d/segments/00000000000000000005.wal"
    handle = fs.open_append(seg)
    handle.write(b"some records")
    handle.sync()
    handle.close()
    fs.fsync_dir("/d/segments")
    q = Quarantine(fs, "/d")
    moved = q.move_in(seg, ".misplaced")
    q.add([({"kind": "test", "bytes_file": "x.bin"}, b"raw")])
    fs.crash()
    assert fs.exists(moved) and fs.read_file(moved) == b"some records"
    assert fs.exists(os.path.join(q.dir, "x.bin"))
