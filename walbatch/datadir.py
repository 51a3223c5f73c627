"""The data directory: the names of what walbatch keeps there, and who may write to it.

docs/format.md describes each file. Ownership: walbatch is the only writer in its
data directory (docs/guarantees.md, "What it relies on"); this module states the
names and checks that no one else *can* write there.

The strict-modes check (as ssh's ``StrictModes``): a directory that another user
can write to lets that user replace the files walbatch keeps, delete its lock, or
plant symbolic links for a daemon running as root to write through. The daemon
refuses such a data or socket directory unless told otherwise
(``check_private``). Independently of it, walbatch never follows a symbolic link
in its data directory (``walbatch.fileio``), and ``check_sqlite_files`` extends
that to the SQLite files the dead-letter store keeps there.
"""

from __future__ import annotations

import os
import stat

from .errors import UnsafeDataDir

SEGMENTS_DIR = "segments"
CHECKPOINT_FILE = "checkpoint"
LOCK_FILE = "LOCK"
FLUSH_LOCK_FILE = "FLUSH.LOCK"
SYNCED_FILE = "synced"
QUARANTINE_DIR = "quarantine"
QUARANTINE_REPORT = "report.jsonl"

_SQLITE_SUFFIXES = ("", "-journal", "-wal", "-shm")


def is_log_dir(directory: str) -> bool:
    """True if ``directory`` holds a walbatch log (a checkpoint or a segments directory)."""
    return any(os.path.lexists(os.path.join(directory, n)) for n in (CHECKPOINT_FILE, SEGMENTS_DIR))


def check_private(directory: str, what: str = "data directory") -> None:
    """Refuse ``directory`` if a user other than this process's (or root) can write to it.

    Checks the directory itself, every directory above it and the directories
    walbatch keeps in it: each must be owned by root or by the effective user,
    and writable by no one else. A directory
    above it that others can write to is allowed only with the sticky bit set
    (``/tmp``): others can then not rename or delete what is in it. The
    directory itself must not be writable by others even with the sticky bit:
    they could still create files in it (for a socket: take its name first, and
    have clients talk to theirs). A directory that does not exist yet is checked
    where it would be created. Raises ``UnsafeDataDir`` naming the directory and
    the command that fixes it.
    """
    uid = os.geteuid()
    path = os.path.abspath(directory)
    paths = [path]
    real = os.path.realpath(path)
    if real != path:
        paths.append(real)  # the symlink's directory and the target's both matter
    for p in paths:
        _check_chain(p, what, uid)
    for sub in (SEGMENTS_DIR, QUARANTINE_DIR):  # where walbatch keeps its files, inside
        p = os.path.join(real, sub)
        if os.path.isdir(p) and not os.path.islink(p):
            _check_one(p, os.lstat(p), what, uid, p)


def _check_chain(path: str, what: str, uid: int) -> None:
    current = path
    while not os.path.lexists(current) and os.path.dirname(current) != current:
        current = os.path.dirname(current)  # not created yet: its would-be parent decides
    while True:
        st = os.lstat(current)
        if stat.S_ISDIR(st.st_mode):
            _check_one(current, st, what, uid, path)
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _check_one(path: str, st: os.stat_result, what: str, uid: int, target: str) -> None:
    where = "it" if path == target else f"{path} above it"
    hint = ("or start the daemon with --no-strict-modes (strict_modes=False) if every user "
            "who can write there is trusted")
    if st.st_uid not in (0, uid):
        raise UnsafeDataDir(
            f"the {what} {target} is not safe: {where} belongs to {_user_name(st.st_uid)}, who "
            f"could replace what walbatch keeps there; chown {path} to {_user_name(uid)} (the "
            f"user walbatch runs as) or to root, {hint}")
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky = st.st_mode & stat.S_ISVTX
    if writable and not (sticky and path != target):
        who = " and ".join(n for bit, n in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "everyone"))
                           if writable & bit)
        # A shared sticky directory (/tmp) is meant to be writable by all: use one of
        # your own inside it rather than taking that from everyone.
        fix = (f"use a directory of your own inside it (`mkdir -m 700 {os.path.join(path, 'walbatch')}`)"
               if sticky else f"run `chmod go-w {path}`")
        raise UnsafeDataDir(
            f"the {what} {target} is not safe: {where} is writable by {who} (mode "
            f"{stat.filemode(st.st_mode)}), who could delete its lock or plant links for "
            f"walbatch to write through; {fix}, {hint}")


def _user_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_sqlite_files(path: str) -> None:
    """Refuse a SQLite database at ``path`` whose file or journal is a symlink or not a file.

    SQLite follows symbolic links when it opens a database and creates its
    journal files (``-journal``, ``-wal``, ``-shm``) without ``O_NOFOLLOW``; a
    link planted there would make walbatch write into another file. Called
    before every connect to a database in the data directory.
    """
    for suffix in _SQLITE_SUFFIXES:
        p = path + suffix
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeDataDir(f"{p} is a symbolic link; walbatch never makes one in its data "
                                "directory and does not let SQLite follow it (someone else can "
                                "write there?): remove it")
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            # A FIFO would hang the open; a directory SQLite refuses by itself.
            raise UnsafeDataDir(f"{p} is not a regular file (mode {stat.filemode(st.st_mode)}); "
                                "remove it")
