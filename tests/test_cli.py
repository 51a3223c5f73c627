"""The `walbatch` command line, run as real processes (docs/cli.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from walbatch import DurableBatcher, values
from walbatch.framing import FRAME_HEADER_SIZE, HEADER_SIZE
from walbatch.values import equal


def test_demo_kills_a_writer_and_finds_every_acknowledged_item(tmp_path):
    directory = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "walbatch", "demo", "--dir", str(directory), "--items", "4000"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "acknowledged but missing: 0" in result.stdout
    assert "duplicated:               0" in result.stdout
    assert "kill -9 after" in result.stdout


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "walbatch", "demo", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "was not made by walbatch demo" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Operator commands, each run as a real `walbatch` process on a log the test builds.

WAIT = 60
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("WALBATCH_", "LISTEN_")) and k != "NOTIFY_SOCKET"}


def wb(*args: str, input: str | None = None, env: dict[str, str] | None = None,
       code: int | None = 0) -> subprocess.CompletedProcess[str]:
    """Run `walbatch ARGS`; check the exit code (unless None); never a traceback."""
    result = subprocess.run([sys.executable, "-m", "walbatch", *map(str, args)], input=input,
                            capture_output=True, text=True, timeout=WAIT,
                            env={**BASE_ENV, **(env or {})})
    assert "Traceback" not in result.stderr, result.stderr
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return result


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """docs/cli.md: errors are one line on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def build_log(path: Path, n: int, segment_bytes: int = 1024) -> str:
    """A writer-only log of ``n`` items {"i": k} (one frame each) over several segments."""
    with DurableBatcher(path, None, segment_bytes=segment_bytes) as b:
        for k in range(n):
            b.submit({"i": k, "pad": "p" * 20})
        return b.log_id


def dump(data_dir: Path, *args: str) -> list[dict]:
    return [json.loads(line) for line in wb("dump", "--data-dir", data_dir, *args).stdout.splitlines()]


def dlq_seqs(data_dir: Path) -> list[int]:
    out = wb("dlq", "list", "--data-dir", data_dir, "--json").stdout
    return [json.loads(line)["seq"] for line in out.splitlines()]


def sqlite_seqs(db: Path, table: str = "items") -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [s for (s,) in conn.execute(f"SELECT _seq FROM {table} ORDER BY _seq")]
    finally:
        conn.close()


def frames_of(segment: Path) -> list[tuple[int, int, int]]:
    """(offset, first_seq, count) of each frame (docs/format.md)."""
    data = segment.read_bytes()
    out, pos = [], HEADER_SIZE
    while pos < len(data):
        _marker, _crc, length, first, count = struct.unpack_from("<4sIIQI", data, pos)
        out.append((pos, first, count))
        pos += FRAME_HEADER_SIZE + length
    return out


def flip_byte_in_frame(segment: Path, index: int) -> int:
    """Flip one payload byte of the ``index``th frame; return that frame's seq."""
    offset, first, count = frames_of(segment)[index]
    assert count == 1
    data = bytearray(segment.read_bytes())
    data[offset + FRAME_HEADER_SIZE + 3] ^= 0x40
    segment.write_bytes(bytes(data))
    return first


@contextmanager
def serving(data_dir: Path, *args: str):
    """A `walbatch serve` subprocess; yields its socket path; always stopped."""
    sockdir = tempfile.mkdtemp(prefix="wbcli", dir="/tmp")
    sock = os.path.join(sockdir, "s.sock")
    proc = subprocess.Popen([sys.executable, "-m", "walbatch", "serve", "--data-dir", str(data_dir),
                             "--socket", sock, "--max-delay", "0.01", "--shutdown-timeout", "5", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=BASE_ENV)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert proc.poll() is None, "walbatch serve exited"
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(sock)
                    break
            except OSError:
                assert time.monotonic() < deadline, "walbatch serve never listened"
                time.sleep(0.02)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
        shutil.rmtree(sockdir, ignore_errors=True)


PERMANENT_SINK = '''
from walbatch.errors import PermanentSinkError

def write(batch):
    # odd "i" is refused for good, per item; the rest is taken
    return [PermanentSinkError(f"odd i={r.item['i']} refused") if r.item["i"] % 2 else None
            for r in batch]
'''


# ------------------------------------------------------------------ submit


def test_submit_stdin_stops_at_a_malformed_line_and_keeps_the_lines_before_it(tmp_path):
    data = tmp_path / "data"
    lines = '{"a": 1}\n\n{"a": 2}\n"three"\n{"a": oops}\n{"a": 5}\n'
    with serving(data) as sock:
        result = wb("submit", "--data-dir", data, "--socket", sock, input=lines, code=1)
        line = one_error_line(result)
        assert "line 5" in line and "3 item(s) before it are acknowledged" in line
        assert "acknowledged 3 item(s)" in result.stdout
        records = dump(data)  # readonly: works beside the running daemon
    assert records == [{"seq": 1, "item": {"a": 1}}, {"seq": 2, "item": {"a": 2}},
                       {"seq": 3, "item": "three"}]


@pytest.mark.parametrize("bad", ["123456789012345678901234", '"\\ud800"'], ids=["int", "surrogate"])
def test_submit_stops_at_valid_json_msgpack_cannot_take_naming_its_line(tmp_path, bad):
    data = tmp_path / "data"
    result = wb("submit", "--direct", "--data-dir", data, "--batch", "1",
                input=f'{{"a": 1}}\n{{"a": 2}}\n{bad}\n{{"a": 4}}\n', code=1)
    line = one_error_line(result)
    assert "line 3: cannot be submitted" in line and "2 item(s) before it" in line
    assert "acknowledged 2 item(s)" in result.stdout
    assert [r["item"] for r in dump(data)] == [{"a": 1}, {"a": 2}]


def test_submit_refuses_a_bad_key_as_a_usage_error(tmp_path):
    result = wb("submit", "--direct", "--data-dir", tmp_path / "data", "--key", "é" * 600, "1", code=2)
    assert "--key" in result.stderr and "1200 bytes" in result.stderr
    assert not (tmp_path / "data").exists()


def test_dump_writes_items_under_the_value_mapping(tmp_path):
    # Tuple, int and bytes keys once became strings ({1: .., "1": ..} printed one key).
    data = tmp_path / "data"
    item = {(1, "a"): "x", "plain": {(2,): 3}, 1: "int", "1": "str", b"k": float("nan")}
    with DurableBatcher(data, None) as b:
        b.submit(item)
    [line] = wb("dump", "--data-dir", data).stdout.splitlines()
    assert equal(values.loads(line), {"seq": 1, "item": item})


def test_submit_through_the_daemon_in_several_requests(tmp_path):
    data = tmp_path / "data"
    lines = "".join(json.dumps({"n": n}) + "\n" for n in range(25))
    with serving(data) as sock:
        result = wb("submit", "--data-dir", data, "--socket", sock, "--batch", "10", input=lines)
        assert result.stdout.strip() == "acknowledged 25 item(s)"
        wb("submit", "--data-dir", data, "--socket", sock, '{"n": 25}', '"arg"')
        live = json.loads(wb("status", "--live", "--json", "--data-dir", data, "--socket", sock).stdout)
        assert live["submitted"] == 27
    assert [r["item"] for r in dump(data)] == [{"n": n} for n in range(26)] + ["arg"]
    assert sqlite_seqs(data / "walbatch.db") == list(range(1, 28))  # delivered by the daemon


def test_submit_direct_writes_into_the_log_for_the_next_replay(tmp_path):
    data = tmp_path / "data"
    result = wb("submit", "--direct", "--data-dir", data, '{"u": 1}', '"s"', "[1, 2]", "null")
    assert result.stdout.strip() == "acknowledged 4 item(s)"
    assert dump(data) == [{"seq": 1, "item": {"u": 1}}, {"seq": 2, "item": "s"},
                          {"seq": 3, "item": [1, 2]}, {"seq": 4, "item": None}]
    status = json.loads(wb("status", "--data-dir", data, "--json").stdout)
    assert (status["backlog"], status["checkpoint"]) == (4, 0)
    result = wb("submit", "--direct", "--data-dir", data, '{"ok": 1}', "{bad", code=1)
    assert "argument 2" in one_error_line(result)
    assert "acknowledged 1 item(s)" in result.stdout
    assert dump(data)[-1] == {"seq": 5, "item": {"ok": 1}}


def test_submit_direct_while_the_log_is_locked_fails_in_one_line(tmp_path):
    data = tmp_path / "data"
    with DurableBatcher(data, None):
        result = wb("submit", "--direct", "--data-dir", data, "1", code=1)
    assert "lock" in one_error_line(result)


def test_submit_without_a_daemon_fails_in_one_line(tmp_path):
    result = wb("submit", "--data-dir", tmp_path, "--socket", tmp_path / "none.sock", "1", code=1)
    assert "cannot connect" in one_error_line(result)


# ------------------------------------------------------------------ status, replay, dump


@pytest.mark.parametrize("command", [["status"], ["verify"], ["dump"], ["replay", "--dry-run",
                                                                      "--sink", "x"]])
def test_readonly_commands_write_nothing_even_into_a_log_without_a_checkpoint(tmp_path, command):
    # A writer's first open makes segments/ and then the checkpoint; a status run
    # in between used to write a checkpoint of its own (another log id), which
    # also made that writer's open fail on the shared checkpoint.tmp.
    d = tmp_path / "log"
    (d / "segments").mkdir(parents=True)
    wb(*command, "--data-dir", d, code=None)
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == ["segments"]


def test_status_json_describes_a_log_built_by_the_test(tmp_path):
    data = tmp_path / "data"
    log_id = build_log(data, 60)
    status = json.loads(wb("status", "--data-dir", data, "--json").stdout)
    assert status["data_dir"] == str(data)
    assert status["log_id"] == log_id
    assert status["segments"] == len(list((data / "segments").iterdir())) > 2
    assert status["bytes"] == sum(p.stat().st_size for p in (data / "segments").iterdir())
    assert (status["first_seq"], status["last_seq"], status["checkpoint"]) == (1, 60, 0)
    assert (status["backlog"], status["delivered"], status["dead_letters"]) == (60, 0, 0)
    assert status["locked_by_a_writer"] is False
    assert status["damage"] == []
    with DurableBatcher(data, None):
        assert json.loads(wb("status", "--data-dir", data, "--json").stdout)["locked_by_a_writer"]
    text = wb("status", "--data-dir", data).stdout
    assert "backlog" in text and "60" in text


def test_replay_dry_run_counts_and_changes_nothing(tmp_path):
    data = tmp_path / "data"
    build_log(data, 40)
    before = sorted((p.name, p.read_bytes()) for p in (data / "segments").iterdir())
    result = wb("replay", "--dry-run", "--data-dir", data, "--sink", "sqlite:///unused.db")
    assert result.stdout.strip() == "would deliver 40 item(s) after checkpoint 0"
    assert sorted((p.name, p.read_bytes()) for p in (data / "segments").iterdir()) == before
    assert json.loads(wb("status", "--data-dir", data, "--json").stdout)["checkpoint"] == 0


def test_replay_delivers_exactly_once_and_a_second_replay_delivers_nothing(tmp_path):
    data, db = tmp_path / "data", tmp_path / "out.db"
    log_id = build_log(data, 45)
    result = wb("replay", "--data-dir", data, "--sink", f"sqlite:///{db}?table=events")
    assert "delivered 45 item(s), dead-lettered 0, 0 left" in result.stdout
    assert "checkpoint 45" in result.stdout
    assert sqlite_seqs(db, "events") == list(range(1, 46))
    result = wb("replay", "--data-dir", data, "--sink", f"sqlite:///{db}?table=events")
    assert "delivered 0 item(s)" in result.stdout
    conn = sqlite3.connect(db)
    rows = list(conn.execute("SELECT _log_id, _seq, i FROM events ORDER BY _seq"))
    conn.close()
    assert rows == [(log_id, s, s - 1) for s in range(1, 46)]
    status = json.loads(wb("status", "--data-dir", data, "--json").stdout)
    assert (status["checkpoint"], status["backlog"], status["delivered"]) == (45, 0, 45)
    # More items later: only they are delivered.
    wb("submit", "--direct", "--data-dir", data, '{"i": 45}')
    assert "delivered 1 item(s)" in wb("replay", "--data-dir", data, "--sink",
                                       f"sqlite:///{db}?table=events").stdout
    assert sqlite_seqs(db, "events") == list(range(1, 47))


def test_dump_from_to_and_pending(tmp_path):
    data = tmp_path / "data"
    build_log(data, 50)
    assert [(r["seq"], r["item"]["i"]) for r in dump(data, "--from", "20", "--to", "23")] == [
        (20, 19), (21, 20), (22, 21), (23, 22)]
    assert [r["seq"] for r in dump(data, "--from", "48")] == [48, 49, 50]
    assert [r["seq"] for r in dump(data, "--to", "2")] == [1, 2]
    assert len(dump(data)) == 50
    wb("replay", "--data-dir", data, "--sink", f"sqlite:///{tmp_path / 'o.db'}")
    wb("submit", "--direct", "--data-dir", data, '"new"')
    assert dump(data, "--pending") == [{"seq": 51, "item": "new"}]
    result = wb("dump", "--data-dir", data, "--from", "0", code=2)  # usage error
    assert "--from" in result.stderr


def test_dump_shows_bytes_as_base64(tmp_path):
    data = tmp_path / "data"
    with DurableBatcher(data, None) as b:
        b.submit({"raw": b"\x00\xff"})
    assert dump(data) == [{"seq": 1, "item": {"raw": {"$base64": "AP8="}}}]


# ------------------------------------------------------------------ verify


def test_verify_an_intact_log_exits_0(tmp_path):
    data = tmp_path / "data"
    build_log(data, 60)
    result = wb("verify", "--data-dir", data)
    assert result.stdout.strip() == "intact: seqs 1..60, checkpoint 0"


def test_verify_finds_a_flipped_byte_in_a_sealed_segment_and_repair_goes_past_it(tmp_path):
    data, db = tmp_path / "data", tmp_path / "out.db"
    build_log(data, 60)
    segments = sorted((data / "segments").iterdir())
    assert len(segments) > 2
    sealed = segments[1]
    offset = frames_of(sealed)[3][0]
    bad_seq = flip_byte_in_frame(sealed, 3)

    result = wb("verify", "--data-dir", data, code=3)
    out = result.stdout + result.stderr
    assert str(sealed) in out and f"offset {offset}" in out
    assert f"seqs {bad_seq}..{bad_seq}" in out
    assert "verify --repair" in result.stderr
    report = json.loads(wb("verify", "--data-dir", data, "--json", code=3).stdout)  # one object
    assert (report["intact"], report["repaired"], report["lost_seqs"]) == (
        False, False, [[bad_seq, bad_seq]])
    [finding] = report["findings"]
    assert (finding["path"], finding["offset"], finding["seqs"], finding["action"]) == (
        str(sealed), offset, [bad_seq, bad_seq], "corrupt")
    assert "damaged" in wb("replay", "--dry-run", "--data-dir", data, "--sink", "x", code=3).stdout
    # The daemon refuses to start on a damaged log, in one line.
    result = wb("serve", "--data-dir", data, "--socket", tmp_path / "s.sock", code=1)
    assert "corrupt" in one_error_line(result).lower()

    result = wb("verify", "--repair", "--data-dir", data)
    assert f"lost seqs: {bad_seq}" in result.stdout
    assert list((data / "quarantine").iterdir())
    assert wb("verify", "--data-dir", data).stdout.strip().splitlines()[-1].startswith("intact")
    assert {"seq": bad_seq, "lost": True} in dump(data)

    result = wb("replay", "--data-dir", data, "--sink", f"sqlite:///{db}", code=4)
    assert "delivered 59 item(s), dead-lettered 1, 0 left" in result.stdout
    assert sqlite_seqs(db) == [s for s in range(1, 61) if s != bad_seq]
    header, *listing = wb("dlq", "list", "--data-dir", data).stdout.splitlines()
    assert header.split("\t") == ["seq", "failed_at", "error", "item"]
    assert len(listing) == 1
    assert listing[0].split("\t")[0] == str(bad_seq) and "(lost)" in listing[0]
    [letter] = [json.loads(x) for x in wb("dlq", "list", "--data-dir", data, "--json").stdout.splitlines()]
    assert (letter["seq"], letter["lost"], letter["item"]) == (bad_seq, True, None)
    # A lost seq has no payload: requeue leaves it where it is.
    assert wb("dlq", "requeue", "--data-dir", data).stdout.strip() == "requeued 0 dead letter(s)"


def test_verify_repair_on_an_intact_log_loses_nothing(tmp_path):
    data = tmp_path / "data"
    build_log(data, 30)
    assert "lost seqs: none" in wb("verify", "--repair", "--data-dir", data).stdout
    assert len(dump(data)) == 30


def test_verify_repair_refuses_a_locked_log_in_one_line(tmp_path):
    data = tmp_path / "data"
    build_log(data, 5)
    with DurableBatcher(data, None):
        result = wb("verify", "--repair", "--data-dir", data, code=1)
    assert "stop the daemon" in one_error_line(result)


# ------------------------------------------------------------------ dead letters


def test_dlq_list_requeue_and_purge(tmp_path):
    data = tmp_path / "data"
    (tmp_path / "permsink.py").write_text(PERMANENT_SINK)
    env = {"PYTHONPATH": str(tmp_path)}
    build_log(data, 12)
    result = wb("replay", "--data-dir", data, "--sink", "permsink:write", env=env, code=4)
    assert "delivered 6 item(s), dead-lettered 6, 0 left" in result.stdout
    assert "6 item(s) were dead-lettered: see `walbatch dlq list" in result.stderr
    dead_seqs = [s for s in range(1, 13) if (s - 1) % 2]  # seq = i + 1
    letters = [json.loads(x) for x in wb("dlq", "list", "--data-dir", data, "--json").stdout.splitlines()]
    assert [d["seq"] for d in letters] == dead_seqs
    assert all(d["error"] == f"PermanentSinkError: odd i={d['item']['i']} refused" for d in letters)
    assert all(not d["lost"] for d in letters)
    text = wb("dlq", "list", "--data-dir", data).stdout.splitlines()[1:]
    assert [line.split("\t")[0] for line in text] == [str(s) for s in dead_seqs]
    assert len(wb("dlq", "list", "--data-dir", data, "--limit", "2").stdout.splitlines()) == 3
    assert json.loads(wb("status", "--data-dir", data, "--json").stdout)["dead_letters"] == 6

    # requeue one: it goes back into the log with a new seq and leaves the store.
    assert wb("dlq", "requeue", "--data-dir", data, "--seq", "4").stdout.strip() == \
        "requeued 1 dead letter(s)"
    assert dump(data, "--pending") == [{"seq": 13, "item": {"i": 3, "pad": "p" * 20}}]
    assert dlq_seqs(data) == [s for s in dead_seqs if s != 4]

    # purge asks first; "no" keeps everything.
    result = wb("dlq", "purge", "--data-dir", data, "--seq", "2", input="n\n", code=1)
    assert "Aborted" in result.stderr
    assert len(wb("dlq", "list", "--data-dir", data).stdout.splitlines()) == 1 + 5
    assert wb("dlq", "purge", "--data-dir", data, "--seq", "2", "--yes").stdout.strip() == \
        "purged 1 dead letter(s)"
    assert wb("dlq", "purge", "--data-dir", data, input="y\n").stdout.strip().endswith(
        "purged 4 dead letter(s)")
    empty = wb("dlq", "list", "--data-dir", data)
    assert empty.stdout == "" and empty.stderr.startswith("no dead letters in ")

    # The requeued item is delivered by the next replay (and refused again: it is odd).
    result = wb("replay", "--data-dir", data, "--sink", "permsink:write", env=env, code=4)
    assert "delivered 0 item(s), dead-lettered 1, 0 left" in result.stdout
    assert dlq_seqs(data) == [13]


def test_dlq_requeue_through_a_running_daemon(tmp_path):
    data = tmp_path / "data"
    (tmp_path / "permsink.py").write_text(PERMANENT_SINK)
    build_log(data, 4)
    wb("replay", "--data-dir", data, "--sink", "permsink:write", env={"PYTHONPATH": str(tmp_path)},
       code=4)
    with serving(data) as sock:
        result = wb("dlq", "requeue", "--data-dir", data, "--socket", sock)
        assert result.stdout.strip() == "requeued 2 dead letter(s)"
        assert wb("dlq", "list", "--data-dir", data).stdout == ""
    assert [r["item"]["i"] for r in dump(data, "--from", "5")] == [1, 3]
    assert sqlite_seqs(data / "walbatch.db") == [5, 6]  # the daemon's sink took them


def test_dlq_requeue_through_a_running_daemon_keeps_each_items_key(tmp_path):
    # The daemon path submitted the dead letters without their keys; requeued
    # directly, they kept them. Both now go through DeadLetterStore.requeue.
    data = tmp_path / "data"
    (tmp_path / "permsink.py").write_text(PERMANENT_SINK)
    with DurableBatcher(data, None) as b:
        b.submit_many([{"i": 0}, {"i": 1}], key="tenant-a")
        b.submit_many([{"i": 2}, {"i": 3}], key=7)
    wb("replay", "--data-dir", data, "--sink", "permsink:write", env={"PYTHONPATH": str(tmp_path)},
       code=4)
    assert dlq_seqs(data) == [2, 4]
    with serving(data) as sock:
        result = wb("dlq", "requeue", "--data-dir", data, "--socket", sock)
        assert result.stdout.strip() == "requeued 2 dead letter(s)"
    assert [(r.get("key"), r["item"]["i"]) for r in dump(data, "--from", "5")] == \
        [("tenant-a", 1), (7, 3)]


# ------------------------------------------------------------------ error paths


@pytest.mark.parametrize("args", [
    ["status", "--data-dir", "{missing}"],
    ["status", "--data-dir", "{empty}"],
    ["dump", "--data-dir", "{missing}"],
    ["verify", "--data-dir", "{missing}"],
    ["replay", "--data-dir", "{log}", "--sink", "bogus"],
    ["replay", "--data-dir", "{log}", "--sink", "no_such_module_xyz:write"],
    ["replay", "--dry-run", "--data-dir", "{missing}", "--sink", "x"],
    ["serve", "--data-dir", "{log}", "--sink", "bogus"],
    ["serve", "--data-dir", "{log}", "--socket", "{empty}"],
    ["dlq", "purge", "--data-dir", "{missing}", "--yes"],
    ["dlq", "requeue", "--data-dir", "{missing}"],
    # A mistyped --data-dir must not become a new, empty log that "repairs" or "delivers" fine.
    ["verify", "--repair", "--data-dir", "{missing}"],
    ["verify", "--repair", "--data-dir", "{empty}"],
    ["replay", "--data-dir", "{missing}", "--sink", "file://{out}"],
    ["replay", "--data-dir", "{empty}", "--sink", "file://{out}"],
    ["replay", "--data-dir", "{log}", "--sink", "os:no_such_function"],
    ["replay", "--data-dir", "{log}", "--sink", "sqlite:///{out}?tabel=events"],
    ["replay", "--data-dir", "{log}", "--sink", "file://{out}?mode=x"],
    ["dlq", "requeue", "--data-dir", "{log}", "--seq", "999"],
    ["dlq", "purge", "--data-dir", "{log}", "--seq", "999", "--yes"],
    ["submit", "--direct", "--data-dir", "{file}/sub", "1"],  # an OSError: one line too
])
def test_every_error_path_prints_one_line_and_no_traceback(tmp_path, args):
    build_log(tmp_path / "log", 3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("")
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "log": tmp_path / "log",
             "out": tmp_path / "out", "file": tmp_path / "afile"}
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = wb(*[a.format(**paths) for a in args], code=1)
    line = one_error_line(result)
    assert line.startswith("Error: ")
    assert not (tmp_path / "missing").exists(), "an error path created the directory it was given"
    if args[0] != "serve":  # serve opens the log before it finds the socket path taken
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, "an error path changed files"


@pytest.mark.parametrize("args", [
    ["dump", "--from", "x"],
    ["serve", "--max-items", "-1"],
    ["serve", "--max-log-bytes", "lots"],
    ["replay", "--data-dir", "d"],
    ["submit", "--batch", "0"],
    ["nosuchcommand"],
    ["dump", "--from", "5", "--to", "2"],
    ["serve", "--socket-mode", "-1"],
    ["serve", "--socket-mode", "7777"],
    ["dlq", "list", "--limit", "99999999999999999999"],
    ["dlq", "list", "--limit", str(1 << 63)],
    ["serve", "--max-items", "0"],
    ["replay", "--max-delay", "100000", "--sink", "x"],
    ["serve", "--segment-bytes", "4096", "--max-log-bytes", "4096"],  # fine alone, not together
])
def test_usage_errors_exit_2_without_a_traceback(tmp_path, args):
    result = wb(*args, code=2)
    assert "Error" in result.stderr


def test_a_bad_value_in_the_config_file_names_the_file_and_key(tmp_path):
    config = tmp_path / "walbatch.toml"
    config.write_text('max_items = "lots"\n')
    result = wb("serve", "--config", config, "--data-dir", tmp_path / "d", code=2)
    assert f"{config}: max_items = 'lots'" in result.stderr
    assert "WALBATCH_MAX_ITEMS" not in result.stderr  # it used to blame the variable
    assert not (tmp_path / "d").exists()


def test_replay_dry_run_needs_no_sink(tmp_path):
    data = tmp_path / "data"
    build_log(data, 5)
    assert "would deliver 5 item(s)" in wb("replay", "--dry-run", "--data-dir", data).stdout


def test_submit_without_a_daemon_says_how_to_start_one_or_go_direct(tmp_path):
    result = wb("submit", "--data-dir", tmp_path / "d", '{"a": 1}', code=1)
    line = one_error_line(result)
    assert "walbatch serve --data-dir" in line and "--direct" in line and "nothing was submitted" in line


@pytest.mark.parametrize("command,variables", [
    (["serve"], ["WALBATCH_DATA_DIR", "WALBATCH_SINK", "WALBATCH_LOG_LEVEL", "WALBATCH_MAX_ITEMS"]),
    (["replay"], ["WALBATCH_DATA_DIR", "WALBATCH_SINK"]),
    (["dlq", "list"], ["WALBATCH_DATA_DIR"]),
])
def test_help_names_the_environment_variables(command, variables):
    text = " ".join(wb(*command, "--help").stdout.split())
    for var in variables:
        assert f"env var: {var}" in text


def test_help_texts_render_their_examples_verbatim():
    text = wb("submit", "--help").stdout
    assert """printf '{"user": 1}\\n{"user": 2}\\n' | walbatch submit""" in text
    limit = " ".join(wb("dlq", "list", "--help").stdout.split())
    assert "--limit N" in limit and "9223372036854775807" not in limit


@pytest.mark.parametrize("line,why", [("NaN", "NaN is not JSON"), ('{"a": 1e999}', "too large"),
                                      ('{"a": 1, "a": 2}', "appears twice")])
def test_submit_reads_json_strictly_and_names_the_line(tmp_path, line, why):
    # Python's json module took these, and the item changed (or lost a value) silently.
    data = tmp_path / "data"
    result = wb("submit", "--direct", "--data-dir", data, input=f'{{"ok": 1}}\n{line}\n', code=1)
    err = one_error_line(result)
    assert "line 2" in err and why in err and "1 item(s) before it" in err

