"""walbatch.admin: status, verify and dump as library calls, and their --json forms.

The command line only prints what these return, so the library is tested here
directly, and the command line for its documented JSON shapes (docs/cli.md):
one JSON object, nothing else on stdout, the same keys whatever the log holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from walbatch import DurableBatcher, LogLocked, admin
from walbatch.segment import scan_segment

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("WALBATCH_", "LISTEN_"))}

STATUS_KEYS = {"data_dir", "log_id", "segments", "bytes", "first_seq", "last_seq", "checkpoint",
               "backlog", "delivered", "dead_letters", "dead_letters_error", "locked_by_a_writer",
               "intact", "damage", "findings"}
VERIFY_KEYS = {"data_dir", "intact", "repaired", "first_seq", "last_seq", "checkpoint",
               "lost_seqs", "findings", "error"}
FINDING_KEYS = {"path", "offset", "length", "reason", "seqs", "action", "text"}


def wb(*args: object, code: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "walbatch", *map(str, args)],
                            capture_output=True, text=True, timeout=WAIT, env=ENV)
    assert "Traceback" not in result.stderr, result.stderr
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return result


def build(d: Path, n: int = 30) -> None:
    with DurableBatcher(d, None, segment_bytes=300) as b:
        for k in range(n):
            b.submit({"i": k})


def damage_a_middle_record(d: Path) -> int:
    """Flip a byte in the second segment's first record; return its seq."""
    seg = sorted((d / "segments").iterdir())[1]
    frame = scan_segment(str(seg), seg.read_bytes()).frames[0]
    data = bytearray(seg.read_bytes())
    data[frame.end - 1] ^= 0x01
    seg.write_bytes(bytes(data))
    return frame.first_seq


def test_status_describes_the_log(tmp_path):
    d = tmp_path / "log"
    build(d)
    s = admin.status(str(d))
    assert (s.first_seq, s.last_seq, s.checkpoint, s.backlog) == (1, 30, 0, 30)
    assert (s.intact, s.dead_letters, s.locked_by_a_writer) == (True, 0, False)
    assert s.segments == len(list((d / "segments").iterdir()))
    with DurableBatcher(d, None):
        assert admin.status(str(d)).locked_by_a_writer


def test_verify_reports_damage_and_repair_gives_up_exactly_those_seqs(tmp_path):
    d = tmp_path / "log"
    build(d)
    assert admin.verify(str(d)).exit_code == 0
    bad = damage_a_middle_record(d)
    report = admin.verify(str(d))
    assert (report.intact, report.exit_code, report.lost) == (False, 3, [(bad, bad)])
    assert [f.action for f in report.findings] == ["corrupt"]
    assert not admin.status(str(d)).intact
    with admin.dump(str(d)) as records:
        assert not records.intact
        assert [r.seq for r in records if r.lost] == [bad]
    repaired = admin.verify(str(d), repair=True)
    assert (repaired.repaired, repaired.intact, list(repaired.lost_seqs())) == (True, True, [bad])
    again = admin.verify(str(d))
    assert again.intact and again.lost == [(bad, bad)]  # already given up: reported, not blocking


def test_verify_repair_refuses_a_log_in_use_and_a_directory_without_a_log(tmp_path):
    d = tmp_path / "log"
    build(d, 3)
    with DurableBatcher(d, None), pytest.raises(LogLocked, match="stop the daemon"):
        admin.verify(str(d), repair=True)
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match="not a walbatch log directory"):
            admin.verify(str(path), repair=True)
    assert not (tmp_path / "missing").exists()
    assert os.listdir(tmp_path / "empty") == []


def test_dump_reads_ranges_keys_and_pending_records(tmp_path):
    d = tmp_path / "log"
    with DurableBatcher(d, None) as b:
        b.submit({"a": 1})
        b.submit("keyed", key="k1")
        b.submit(b"\x00")
    with admin.dump(str(d), 2, 3) as records:
        assert [r.to_dict() for r in records] == [
            {"seq": 2, "key": "k1", "item": "keyed"}, {"seq": 3, "item": b"\x00"}]
    with admin.dump(str(d), pending=True) as records:
        assert [r.seq for r in records] == [1, 2, 3]
    with pytest.raises(ValueError):
        admin.dump(str(d), 3, 2)


@pytest.mark.parametrize("state", ["intact", "damaged", "repaired"])
def test_verify_json_is_one_object_of_the_documented_shape(tmp_path, state):
    d = tmp_path / "log"
    build(d)
    code = 0
    args = ["--repair"] if state == "repaired" else []
    if state != "intact":
        damage_a_middle_record(d)
        code = 3 if state == "damaged" else 0
    result = wb("verify", "--data-dir", d, "--json", *args, code=code)
    report = json.loads(result.stdout)  # one object: anything else on stdout fails here
    assert set(report) == VERIFY_KEYS  # (stderr may carry the repair's log lines)
    for f in report["findings"]:
        assert set(f) == FINDING_KEYS
    assert report["intact"] is (state != "damaged")
    assert report["repaired"] is (state == "repaired")
    assert bool(report["lost_seqs"]) is (state != "intact")


def test_status_json_is_one_object_of_the_documented_shape(tmp_path):
    d = tmp_path / "log"
    build(d)
    damage_a_middle_record(d)
    status = json.loads(wb("status", "--data-dir", d, "--json").stdout)
    assert set(status) == STATUS_KEYS
    assert status["intact"] is False
    assert [set(f) for f in status["findings"]] == [FINDING_KEYS]
    assert status["damage"] == [f["text"] for f in status["findings"]]


def test_the_documented_shapes_are_the_real_ones():
    text = (ROOT / "docs" / "cli.md").read_text()  # (its example runs in test_doc_examples)
    for name, keys in (("verify", VERIFY_KEYS), ("status", STATUS_KEYS)):
        block = re.search(rf"`walbatch {name} --json` prints.*?```json\n(.*?)```", text, re.S)
        assert block, f"docs/cli.md does not show the shape of {name} --json"
        assert set(json.loads(block.group(1))) == keys
