"""The data directory turned against the daemon: a deleted lock, planted links, open modes.

Each test plays the other user: it deletes or replaces the lock under a running
writer, plants symbolic links (and a FIFO) where walbatch keeps its files, or
opens the directory's modes, and checks that walbatch neither lets a second
writer in, nor writes through a link, nor starts on a directory others can
write to without being told to, and that every refusal says what to fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import FAST, Collector

from walbatch import Client, DurableBatcher, LogFailed, LogLocked, UnsafeDataDir, WalbatchError
from walbatch.datadir import check_private
from walbatch.dlq import DeadLetterStore
from walbatch.log import Log

WAIT = 60
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("WALBATCH_", "LISTEN_"))}


def precious(tmp_path: Path) -> Path:
    """A file outside the data directory that walbatch must never write (root's, say)."""
    p = tmp_path / "precious"
    p.write_bytes(b"root's file\n")
    return p


# ------------------------------------------------------------------- the lock


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_lock_file_deleted_or_replaced_under_a_writer_lets_no_second_writer_in(tmp_path, how):
    d = tmp_path / "log"
    first = DurableBatcher(d, None)
    try:
        acked = first.submit_many(list(range(300))).seqs
        lock = d / "LOCK"
        if how == "deleted":
            lock.unlink()
        else:
            (d / "LOCK.new").write_bytes(b"")
            os.replace(d / "LOCK.new", lock)
        with pytest.raises(LogLocked):
            DurableBatcher(d, None)
        with pytest.raises(LogLocked):
            Log.open(str(d), role="writer")
        # The running writer finds its lock gone and stops acknowledging, loudly.
        with pytest.raises(LogFailed, match="deleted or replaced"):
            first.submit("after")
        with pytest.raises(LogFailed):
            first.submit("again")
    finally:
        first.close()
    sink = Collector()
    with DurableBatcher(d, sink, **FAST) as b:
        b.flush(timeout=30)
    assert set(acked) <= set(sink.seqs)
    assert [i for s, i in sink.records if s in set(acked)] == list(range(300))


def test_a_deleted_flush_lock_lets_no_second_deliverer_in(tmp_path):
    d = tmp_path / "log"
    with DurableBatcher(d, Collector(), **FAST):
        (d / "FLUSH.LOCK").unlink()
        with pytest.raises(LogLocked, match="for delivery"):
            Log.open(str(d), role="flusher")


def wait_for_socket(proc: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        assert proc.poll() is None, "walbatch serve exited"
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            return
        assert time.monotonic() < deadline, "walbatch serve never listened"
        time.sleep(0.02)


def test_a_second_daemon_cannot_start_after_the_lock_file_is_deleted(tmp_path):
    # Reproduced on the old code: the second daemon started, and half of 600
    # acknowledged items were lost.
    d = tmp_path / "data"
    sockdir = Path(tempfile.mkdtemp(prefix="wbdd", dir="/tmp"))
    out = tmp_path / "out.db"
    cmd = [sys.executable, "-m", "walbatch", "serve", "--data-dir", str(d), "--sink",
           f"sqlite:///{out}", "--max-delay", "0.01", "--shutdown-timeout", "5"]
    first = subprocess.Popen([*cmd, "--socket", str(sockdir / "a.sock")], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(first, str(sockdir / "a.sock"))
        with Client(str(sockdir / "a.sock")) as c:
            acked = c.submit_many([{"n": n} for n in range(300)])
            (d / "LOCK").unlink()
            second = subprocess.run([*cmd, "--socket", str(sockdir / "b.sock")], env=ENV,
                                    capture_output=True, text=True, timeout=WAIT)
            assert second.returncode == 1, second.stderr
            assert "failed to lock" in second.stderr
            with pytest.raises(WalbatchError, match="deleted or replaced"):
                c.submit_many([{"n": n} for n in range(300, 600)])
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(WAIT)
        shutil.rmtree(sockdir, ignore_errors=True)
    sink = Collector()
    with DurableBatcher(d, sink, **FAST) as b:
        b.flush(timeout=30)
    conn = sqlite3.connect(out)
    delivered = {s for (s,) in conn.execute("SELECT _seq FROM items")} | set(sink.seqs)
    conn.close()
    assert set(acked) <= delivered


# ------------------------------------------------------------ planted links


def test_a_planted_checkpoint_tmp_link_is_replaced_not_written_through(tmp_path):
    d = tmp_path / "log"
    target = precious(tmp_path)
    DurableBatcher(d, None).close()
    (d / "checkpoint.tmp").symlink_to(target)
    sink = Collector()
    with DurableBatcher(d, sink, **FAST) as b:
        b.submit("x")
        b.flush(timeout=30)  # writes the checkpoint through checkpoint.tmp
    assert target.read_bytes() == b"root's file\n"
    assert sink.items == ["x"]
    assert not (d / "checkpoint.tmp").is_symlink()


@pytest.mark.parametrize("name", ["checkpoint.tmp", "synced.tmp", "quarantine/report.jsonl.tmp"])
def test_a_temporary_file_planted_as_a_link_is_replaced_not_written_through(tmp_path, name):
    d = tmp_path / "log"
    target = precious(tmp_path)
    with DurableBatcher(d, None) as w:
        for k in range(3):
            w.submit(k)
    (d / "quarantine").mkdir()
    (d / name).symlink_to(target)
    seg = d / "segments" / "00000000000000000001.wal"
    data = bytearray(seg.read_bytes())
    data[40] ^= 0xFF  # damage the first record: a repair writes its report
    seg.write_bytes(bytes(data))
    Log.open(str(d), on_corruption="quarantine").close()  # report.jsonl, synced
    sink = Collector()
    with DurableBatcher(d, sink, **FAST) as b:  # synced, then checkpoint
        b.flush(timeout=30)
    assert target.read_bytes() == b"root's file\n"
    assert sink.items == [1, 2]
    assert (d / "quarantine" / "report.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("name", ["LOCK", "FLUSH.LOCK", "checkpoint", "synced"])
def test_a_link_where_walbatch_keeps_a_file_is_refused_with_what_to_do(tmp_path, name):
    d = tmp_path / "log"
    target = tmp_path / "not-there-yet"  # a dangling link: following it would create a file
    DurableBatcher(d, Collector()).close()
    (d / name).unlink()
    (d / name).symlink_to(target)
    with pytest.raises(UnsafeDataDir, match="symbolic link.*remove it"):
        DurableBatcher(d, Collector())
    assert not target.exists()


def test_a_link_in_place_of_the_segments_directory_is_refused(tmp_path):
    d = tmp_path / "log"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    d.mkdir()
    (d / "segments").symlink_to(elsewhere)
    with pytest.raises(UnsafeDataDir, match="segments"):
        DurableBatcher(d, None)
    assert list(elsewhere.iterdir()) == []


def test_a_fifo_in_place_of_the_checkpoint_is_refused_not_waited_on(tmp_path):
    d = tmp_path / "log"
    DurableBatcher(d, None).close()
    (d / "checkpoint").unlink()
    os.mkfifo(d / "checkpoint")
    result: list[BaseException] = []

    def open_it():
        try:
            DurableBatcher(d, None).close()
        except BaseException as ex:  # noqa: BLE001 - handed to the test thread
            result.append(ex)

    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening a log whose checkpoint is a FIFO hung"
    assert isinstance(result[0], UnsafeDataDir) and "not a regular file" in str(result[0])


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-journal"])
def test_the_dead_letter_store_does_not_let_sqlite_follow_a_planted_link(tmp_path, suffix):
    d = tmp_path / "log"
    target = precious(tmp_path)
    DurableBatcher(d, None).close()
    (d / ("dlq.db" + suffix)).unlink(missing_ok=True)
    (d / ("dlq.db" + suffix)).symlink_to(target)
    with pytest.raises(UnsafeDataDir, match=r"dlq\.db.*symbolic link"):
        DurableBatcher(d, None)
    with pytest.raises(UnsafeDataDir):
        DeadLetterStore.for_dir(str(d))
    assert target.read_bytes() == b"root's file\n"


# ----------------------------------------------------------------- modes


def test_check_private_refuses_directories_others_can_write_and_says_what_to_fix(tmp_path):
    d = tmp_path / "data"
    d.mkdir(mode=0o755)
    check_private(str(d))  # tmp_path is private; /tmp above it is sticky: fine
    for mode, who in ((0o775, "its group"), (0o757, "everyone")):
        d.chmod(mode)
        with pytest.raises(UnsafeDataDir, match=f"writable by {who}") as info:
            check_private(str(d))
        assert f"chmod go-w {d}" in str(info.value)
    d.chmod(0o1777)  # the sticky bit does not help the directory itself: others add files
    with pytest.raises(UnsafeDataDir):
        check_private(str(d))
    d.chmod(0o755)
    (d / "segments").mkdir(mode=0o777)
    (d / "segments").chmod(0o777)
    with pytest.raises(UnsafeDataDir, match=f"chmod go-w {d / 'segments'}"):
        check_private(str(d))  # and the directories walbatch keeps inside
    (d / "segments").chmod(0o755)
    sub = d / "deeper" / "log"  # not there yet: where it would be made decides
    check_private(str(sub))
    d.chmod(0o777)
    with pytest.raises(UnsafeDataDir, match=f"{d} above it"):
        check_private(str(sub))
    d.chmod(0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_check_private_refuses_a_directory_another_user_owns(tmp_path):
    d = tmp_path / "data"
    d.mkdir(mode=0o755)
    os.chown(d, 65534, 65534)
    with pytest.raises(UnsafeDataDir, match="belongs to"):
        check_private(str(d))
    with pytest.raises(UnsafeDataDir):
        DurableBatcher(d, None, strict_modes=True)
    DurableBatcher(d, None).close()  # the library's default: not strict


def serve(data: Path, sock: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    """Run `walbatch serve`: its result if it exits at once, None if it came up (then stopped)."""
    proc = subprocess.Popen([sys.executable, "-m", "walbatch", "serve", "--data-dir", str(data),
                             "--socket", str(sock), "--shutdown-timeout", "2", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT
    try:
        while proc.poll() is None:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                return None
            assert time.monotonic() < deadline
            time.sleep(0.02)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=WAIT)


def test_directories_walbatch_makes_are_not_group_writable_whatever_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        with DurableBatcher(tmp_path / "log", None, strict_modes=True) as b:
            b.submit(1)
    finally:
        os.umask(old)
    for p in (tmp_path / "log", tmp_path / "log" / "segments"):
        assert not p.stat().st_mode & 0o022, oct(p.stat().st_mode)
    check_private(str(tmp_path / "log"))


def test_the_daemon_does_not_let_its_default_sqlite_sink_follow_a_planted_link(tmp_path):
    data, sockdir = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    sockdir.mkdir()
    target = tmp_path / "anywhere.db"  # SQLite would create it, as root, wherever it points
    (data / "walbatch.db").symlink_to(target)
    result = serve(data, sockdir / "s.sock")
    assert result is not None and result.returncode == 1
    assert "walbatch.db is a symbolic link" in result.stderr
    assert not target.exists()


def test_the_daemon_refuses_a_data_or_socket_directory_others_can_write(tmp_path):
    data, sockdir = tmp_path / "data", tmp_path / "run"
    data.mkdir(mode=0o770)
    data.chmod(0o770)
    sockdir.mkdir(mode=0o700)
    result = serve(data, sockdir / "s.sock")
    assert result is not None and result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert f"chmod go-w {data}" in line and "--no-strict-modes" in line
    assert sorted(os.listdir(data)) == []  # refused before anything was written
    assert serve(data, sockdir / "s.sock", "--no-strict-modes") is None

    data.chmod(0o700)
    sockdir.chmod(0o777)
    result = serve(data, sockdir / "s.sock")
    assert result is not None and result.returncode == 1
    assert "socket directory" in result.stderr and f"chmod go-w {sockdir}" in result.stderr
    sockdir.chmod(0o1777)  # sticky, as /tmp: others could still take the socket's name first
    result = serve(data, sockdir / "s.sock")
    assert result is not None and result.returncode == 1
    assert f"mkdir -m 700 {sockdir / 'walbatch'}" in result.stderr and "chmod" not in result.stderr
    sockdir.chmod(0o700)
    assert serve(data, sockdir / "s.sock") is None
    data.chmod(0o1777)  # a data directory must not be shared, sticky or not
    result = serve(data, sockdir / "s.sock")
    assert result is not None and result.returncode == 1
    assert f"mkdir -m 700 {data / 'walbatch'}" in result.stderr and "chmod" not in result.stderr
