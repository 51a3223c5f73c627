"""checkpoint.py: the durable "delivered through seq N" marker."""

from __future__ import annotations

import errno
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simfs import SimFileSystem

from walbatch.checkpoint import (
    CHECKPOINT_MAGIC,
    CHECKPOINT_SIZE,
    CHECKPOINT_VERSION,
    Checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from walbatch.checkpoint import crc32c as checkpoint_crc32c
from walbatch.errors import CorruptLog
from walbatch.fileio import OsFileSystem

U64 = st.integers(0, 2**64 - 1)
PATH = "/log/checkpoint"


@settings(max_examples=50, deadline=None)
@given(seq=U64, delivered=U64, dead=U64, raw_id=st.binary(min_size=16, max_size=16))
def test_round_trip(seq: int, delivered: int, dead: int, raw_id: bytes) -> None:
    cp = Checkpoint(uuid.UUID(bytes=raw_id), seq, delivered, dead)
    data = cp.encode()
    assert len(data) == CHECKPOINT_SIZE == 64
    assert Checkpoint.decode(data, PATH) == cp


def test_round_trip_through_real_files(tmp_path) -> None:
    fs = OsFileSystem()
    path = str(tmp_path / "checkpoint")
    cp = Checkpoint(uuid.uuid4(), 42, 40, 2)
    write_checkpoint(fs, path, cp)
    assert read_checkpoint(fs, path) == cp
    assert not (tmp_path / "checkpoint.tmp").exists()
    newer = Checkpoint(cp.log_id, 50, 48, 2)
    write_checkpoint(fs, path, newer)
    assert read_checkpoint(fs, path) == newer


def _reencode(body: bytes) -> bytes:
    return body + struct.pack("<I", checkpoint_crc32c(body))


def _corrupt(kind: str) -> bytes:
    data = bytearray(Checkpoint(uuid.uuid4(), 7, 6, 1).encode())
    if kind == "truncated":
        return bytes(data[:-1])
    if kind == "extended":
        return bytes(data) + b"\0"
    if kind == "empty":
        return b""
    if kind == "bad magic":
        data[0:8] = b"NOTACHKP"
        return _reencode(bytes(data[:-4]))  # a valid crc does not save a wrong magic
    if kind == "bad crc":
        data[20] ^= 0x01  # a bit of the log id
        return bytes(data)
    if kind == "wrong version":
        struct.pack_into("<H", data, 8, CHECKPOINT_VERSION + 1)
        return _reencode(bytes(data[:-4]))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "63 bytes, expected 64"),
        ("extended", "65 bytes, expected 64"),
        ("empty", "0 bytes"),
        ("bad magic", "bad checkpoint magic"),
        ("bad crc", "checksum mismatch"),
        ("wrong version", f"unsupported checkpoint version {CHECKPOINT_VERSION + 1}"),
    ],
)
def test_corruption_raises_corrupt_log_naming_the_file(kind: str, reason: str) -> None:
    with pytest.raises(CorruptLog) as info:
        Checkpoint.decode(_corrupt(kind), PATH)
    assert info.value.path == PATH
    assert reason in info.value.reason
    assert PATH in str(info.value)


def test_read_checkpoint_reports_the_path_it_read(tmp_path) -> None:
    path = tmp_path / "checkpoint"
    path.write_bytes(_corrupt("bad crc"))
    with pytest.raises(CorruptLog) as info:
        read_checkpoint(OsFileSystem(), str(path))
    assert info.value.path == str(path)


def test_magic_is_what_the_format_says() -> None:
    assert Checkpoint(uuid.uuid4()).encode().startswith(CHECKPOINT_MAGIC)


# ----------------------------------------------------------------- atomicity


def _sim_with(cp: Checkpoint) -> SimFileSystem:
    fs = SimFileSystem()
    fs.makedirs("/log")
    fs.fsync_dir("/")  # the directory survives a crash only once its parent is fsync'd
    write_checkpoint(fs, PATH, cp)
    return fs


def test_failed_rename_leaves_the_old_checkpoint() -> None:
    old = Checkpoint(uuid.uuid4(), 10, 10, 0)
    fs = _sim_with(old)
    fs.fail("rename")
    with pytest.raises(OSError):
        write_checkpoint(fs, PATH, Checkpoint(old.log_id, 20, 20, 0))
    assert read_checkpoint(fs, PATH) == old
    fs.crash()
    assert read_checkpoint(fs, PATH) == old


def test_crash_before_the_directory_fsync_leaves_old_or_new_never_a_mix() -> None:
    old = Checkpoint(uuid.uuid4(), 10, 10, 0)
    new = Checkpoint(old.log_id, 20, 19, 1)
    fs = _sim_with(old)
    fs.fail("fsync_dir")
    with pytest.raises(OSError):
        write_checkpoint(fs, PATH, new)
    fs.crash()
    assert read_checkpoint(fs, PATH) in (old, new)


def test_failed_temp_write_leaves_the_old_checkpoint() -> None:
    old = Checkpoint(uuid.uuid4(), 3)
    fs = _sim_with(old)
    fs.fail("write_file", errno.ENOSPC)
    with pytest.raises(OSError):
        write_checkpoint(fs, PATH, Checkpoint(old.log_id, 4))
    fs.crash()
    assert read_checkpoint(fs, PATH) == old


def test_a_completed_write_survives_a_crash() -> None:
    old = Checkpoint(uuid.uuid4(), 1)
    fs = _sim_with(old)
    new = Checkpoint(old.log_id, 2, 2, 0)
    write_checkpoint(fs, PATH, new)
    fs.crash()
    assert read_checkpoint(fs, PATH) == new
    assert not fs.exists(PATH + ".tmp")
