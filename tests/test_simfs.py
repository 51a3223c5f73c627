"""tests/simfs.py: the power-loss simulator models what the real file system does.

The crash tests are only as good as this model, so it is tested on its own:
O_DSYNC writes are durable when they return, write_file only after its fsync,
names and directories once their directory is fsync'd, a database as of its
last commit. And the log, run the same way on the simulator and on the real
file system (under strace), makes the same durability points: if production
stopped syncing where the simulator assumes it does, the count would differ.
"""

from __future__ import annotations

import os
import random
import sqlite3

import msgpack
import pytest
from simfs import SimFileSystem
from systrace import STRACE, traced

from walbatch.checkpoint import Checkpoint
from walbatch.fileio import OsFileSystem
from walbatch.log import Log


def test_an_o_dsync_write_is_durable_when_it_returns():
    fs = SimFileSystem()
    fs.makedirs("/d")
    fs.fsync_dir("/")
    fh = fs.open_append("/d/f", dsync=True)
    fs.fsync_dir("/d")
    fh.write(b"abc")
    assert fh.dsync
    fs.crash()
    assert fs.read_file("/d/f") == b"abc"


def test_a_write_without_dsync_is_durable_only_after_sync():
    fs = SimFileSystem()
    fs.makedirs("/d")
    fs.fsync_dir("/")
    fh = fs.open_append("/d/f")
    fs.fsync_dir("/d")
    fh.write(b"abc")
    fh.sync()
    fh.write(b"def")
    assert not getattr(fh, "dsync", False)
    fs.crash()
    assert fs.read_file("/d/f") == b"abc"


def test_a_crash_inside_an_o_dsync_write_leaves_none_or_part_of_it():
    kept = set()
    for seed in range(40):
        fs = SimFileSystem()
        fs.makedirs("/d")
        fs.fsync_dir("/")
        fh = fs.open_append("/d/f", dsync=True)
        fs.fsync_dir("/d")
        fh.write(b"head")
        fs.crash_after(1, random.Random(seed), "prefix")
        with pytest.raises(OSError):
            fh.write(b"0123456789")  # the crash comes before it returns: not acknowledged
        data = fs.read_file("/d/f")
        assert data.startswith(b"head") and b"head0123456789".startswith(data)
        kept.add(len(data))
    assert min(kept) == 4 and max(kept) > 4


def test_write_file_replaces_the_file_durably_only_after_its_fsync_and_the_directorys():
    fs = SimFileSystem()
    fs.makedirs("/d")
    fs.fsync_dir("/")
    fs.write_file("/d/f", b"old")
    fs.fsync_dir("/d")
    fs.crash_after(2, random.Random(0), "none")  # between its write and its fsync
    with pytest.raises(OSError):
        fs.write_file("/d/f", b"new")
    assert fs.read_file("/d/f") == b"old"
    fs.write_file("/d/f", b"new")  # a new file under the old name (as on disk: unlink, create)
    fs.crash()
    assert fs.read_file("/d/f") == b"old"  # the new name was never fsync'd into /d
    fs.write_file("/d/f", b"new")
    fs.fsync_dir("/d")
    fs.crash()
    assert fs.read_file("/d/f") == b"new"


def test_a_directory_and_its_names_are_durable_once_the_parent_is_fsynced():
    fs = SimFileSystem()
    fs.makedirs("/a/b")
    fs.write_file("/a/b/f", b"x")
    fs.fsync_dir("/a/b")
    fs.crash()  # /a/b itself was never fsync'd into /a
    assert not fs.exists("/a/b") and not fs.exists("/a/b/f")
    assert fs.exists("/a")  # what makedirs found missing above it counts as made before
    fs.makedirs("/a/b")
    fs.write_file("/a/b/f", b"x")
    fs.fsync_dir("/a/b")
    fs.fsync_dir("/a")
    fs.crash()
    assert fs.read_file("/a/b/f") == b"x"


def test_a_database_goes_back_to_its_last_commit():
    fs = SimFileSystem()
    path = fs.local_path("/d/dlq.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (2)")  # in flight at the power loss
    fs.crash()
    conn.execute("COMMIT")  # the dead process's commit reaches nothing that survives
    conn.close()
    after = sqlite3.connect(fs.local_path("/d/dlq.db"))
    try:
        assert after.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        after.close()


def test_the_dead_process_cannot_deliver():
    fs = SimFileSystem()
    seen = []
    import threading

    def old_process():
        fs.crash()  # the power fails while this thread runs
        seen.append(fs.alive())

    t = threading.Thread(target=old_process)
    t.start()
    t.join()
    assert seen == [False] and fs.alive()  # the main thread is the next "boot"


def _drive(log: Log) -> None:
    """Commits that fill and roll segments, then a checkpoint that deletes two of them."""
    for n in range(12):
        log.append(msgpack.packb([n, "x" * 40]), 1)
        log.sync()
    log.commit_checkpoint(Checkpoint(log.log_id, 8, 8, 0, log.synced_seq))


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian: apt-get install strace)")
def test_the_simulator_makes_the_durability_points_the_real_file_system_makes(tmp_path):
    fs = SimFileSystem()
    sim = Log.open("/data/log", fs=fs, segment_bytes=200)
    _drive(sim)
    sim.close()
    assert fs.syncs > 12 and fs.dir_syncs > 3

    real_dir = str(tmp_path / "log")
    with traced(str(tmp_path / "trace")) as trace:
        real = Log.open(real_dir, fs=OsFileSystem(), segment_bytes=200)
        _drive(real)
        real.close()
    points = trace.durability_points(real_dir)
    parent = trace.durability_points(str(tmp_path))
    on_dirs = sum(n for p, n in parent.items() if os.path.isdir(p))
    on_files = sum(n for p, n in points.items() if not os.path.isdir(p))
    assert (on_files, on_dirs) == (fs.syncs, fs.dir_syncs), (
        f"real: {on_files} file and {on_dirs} directory durability points ({dict(parent)}); "
        f"simulated: {fs.syncs} and {fs.dir_syncs}")
