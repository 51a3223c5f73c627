"""The dead-letter store: items a sink refused for good, with the error.

Lives in ``<data dir>/dlq.db`` (SQLite through sqlite-utils), one row per item
keyed by ``(log_id, seq)``, so recording the same failure twice (after a crash
before the checkpoint moved) keeps one row. A row is committed durably
(``synchronous=FULL``) before the checkpoint moves past its seq. Items lost to
quarantined corruption are recorded here too, with ``item`` NULL.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import sqlite_utils

from .codec import unpack_one
from .datadir import check_sqlite_files
from .errors import CorruptLog

if TYPE_CHECKING:
    from .log import Log


class SubmitMany(Protocol):
    """``submit_many(items, key=None)``: ``DurableBatcher.submit_many`` or ``Client.submit_many``."""

    def __call__(self, items: list[Any], key: Any = None) -> Any: ...

DLQ_FILE = "dlq.db"
TABLE = "dead_letters"


@dataclass(frozen=True)
class DeadLetter:
    log_id: str
    seq: int
    item: Any
    """The item as submitted, or None when ``lost`` is true."""
    error: str
    error_type: str
    failed_at: float
    attempts: int
    lost: bool
    """True for seqs lost to corruption: there is no payload to requeue."""
    key: Any = None
    """The batching key the item was submitted with (None: unkeyed); requeue keeps it."""


# SQLite result codes that say the file could not be used (permissions, locks, the disk),
# not that what it holds is damaged: PERM, BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL,
# CANTOPEN, PROTOCOL, NOLFS, AUTH. Any other database error while reading the schema or
# the table (SQLITE_CORRUPT, NOTADB, a schema that does not decode, the wrong table)
# means the content is unusable.
_ACCESS = frozenset({3, 5, 6, 7, 8, 10, 13, 14, 15, 22, 23})


class DeadLetterStore:
    """Read and write ``dlq.db``. Thread-safe: one connection, one lock."""

    def __init__(self, path: str) -> None:
        import threading

        self.path = path
        self._lock = threading.Lock()
        check_sqlite_files(path)  # SQLite follows symlinks; walbatch does not
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.DatabaseError as ex:
            raise OSError(f"cannot use the dead-letter store {path}: {ex}") from ex
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            self.db = sqlite_utils.Database(conn)
            if TABLE not in self.db.table_names():
                self.db[TABLE].create(
                    {"log_id": str, "seq": int, "item": bytes, "error": str, "error_type": str,
                     "failed_at": float, "attempts": int, "lost": int, "key": bytes},
                    pk=("log_id", "seq"),
                )
            elif "key" not in self.db[TABLE].columns_dict:  # a store from before keys
                self.db[TABLE].add_column("key", bytes)
            conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()
        except sqlite3.DatabaseError as ex:
            conn.close()
            # Classified on SQLite's result code. Errors Python's sqlite3 raises itself
            # (text in the schema that is not UTF-8) carry none: the content is damaged.
            code = getattr(ex, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _ACCESS:
                # Read-only file, no permission, locked: the store is fine, access is not.
                raise OSError(f"cannot use the dead-letter store {path}: {ex}") from ex
            raise CorruptLog(path, 0, f"the dead-letter store is damaged ({ex}); move it aside "
                             "(the log itself is intact) and sqlite3's .recover may salvage it") from ex

    @classmethod
    def for_dir(cls, data_dir: str) -> DeadLetterStore:
        return cls(os.path.join(data_dir, DLQ_FILE))

    def add(self, log_id: str, records: Iterable[tuple[int, Any]], error: BaseException | str,
            attempts: int = 1, lost: bool = False, key: Any = None) -> int:
        """Durably record ``records`` (``(seq, item)`` pairs) as dead with ``error``."""
        now = time.time()
        packed_key = None if key is None else msgpack.packb(key, use_bin_type=True)
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        etype = "Lost" if lost else (type(error).__name__ if not isinstance(error, str) else "")
        rows = []
        for seq, item in records:
            packed, note = (None, "") if lost else _pack_item(item)
            rows.append({"log_id": log_id, "seq": seq, "item": packed, "error": text + note,
                         "error_type": etype, "failed_at": now, "attempts": attempts,
                         "lost": int(lost), "key": packed_key})
        with self._lock, self.db.conn:
            self.db.conn.execute("BEGIN IMMEDIATE")
            self.db[TABLE].insert_all(rows, pk=("log_id", "seq"), replace=True)
        return len(rows)

    def list(self, limit: int | None = None, offset: int = 0) -> list[DeadLetter]:
        sql = f"SELECT * FROM {TABLE} ORDER BY log_id, seq"
        params: list[Any] = []
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params = [limit, offset]
        with self._lock:
            rows = list(self.db.query(sql, params))
        return [_row(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self.db[TABLE].count

    def remove(self, keys: Iterable[tuple[str, int]]) -> int:
        keys = list(keys)
        with self._lock, self.db.conn:
            self.db.conn.execute("BEGIN IMMEDIATE")
            self.db.conn.executemany(
                f"DELETE FROM {TABLE} WHERE log_id = ? AND seq = ?", keys)
        return len(keys)

    def error_of(self, log_id: str, seq: int) -> str | None:
        """The error a dead letter was stored with, or None if ``seq`` is not one."""
        with self._lock:
            row = self.db.conn.execute(f"SELECT error FROM {TABLE} WHERE log_id = ? AND seq = ?",
                                       (log_id, seq)).fetchone()
        return None if row is None else str(row[0])

    def forget_above(self, log_id: str, seq: int) -> int:
        """Delete this log's dead letters past ``seq`` (not lost ones); return how many.

        A batch dead-lettered while an earlier one was still pending lies past the
        checkpoint, so the next open delivers it again; its row must go, or a
        requeue would deliver it a second time.
        """
        with self._lock, self.db.conn:
            self.db.conn.execute("BEGIN IMMEDIATE")
            cur = self.db.conn.execute(
                f"DELETE FROM {TABLE} WHERE log_id = ? AND seq > ? AND lost = 0", (log_id, seq))
            return cur.rowcount

    def purge(self, seqs: Sequence[int] | None = None) -> int:
        """Delete dead letters (all, or those with the given seqs); return how many."""
        victims = [(d.log_id, d.seq) for d in self.list() if seqs is None or d.seq in set(seqs)]
        return self.remove(victims)

    def requeue(self, submit_many: SubmitMany, seqs: Sequence[int] | None = None) -> int:
        """Submit dead letters again (as new items with new seqs), then delete them.

        ``submit_many(items, key=...)`` is how they go back in: a batcher's
        ``submit_many`` in this process, or a daemon client's. Each key's items
        go in one call with their key, so keyed items stay keyed. The submit is
        durable before the rows are deleted, so a crash in between can only
        leave a duplicate, never a loss. Lost-to-corruption rows have no payload
        and are left in place. Returns how many were requeued.
        """
        wanted = None if seqs is None else set(seqs)
        chosen = [d for d in self.list() if not d.lost and (wanted is None or d.seq in wanted)]
        by_key: dict[Any, list[DeadLetter]] = {}
        for d in chosen:
            by_key.setdefault(d.key, []).append(d)
        n = 0
        for key, letters in by_key.items():
            submit_many([d.item for d in letters], key=key)
            # Right after each key's submit: if a later one fails (LogFull), a second
            # requeue must not submit this key's items again.
            n += self.remove((d.log_id, d.seq) for d in letters)
        return n

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()


def record_lost(store: DeadLetterStore, log: Log) -> int:
    """Record the seqs a quarantining open gave up as dead letters (idempotent)."""
    n = 0
    for r in log.lost:
        seqs = range(max(r.first, log.checkpoint.seq + 1), r.last + 1)
        why = (f"lost to corruption in {r.path} at offset {r.offset}: {r.reason} "
               "(bytes kept in quarantine/)")
        if len(seqs) > _MAX_LOST_ROWS:
            # One row stands for the whole range rather than millions of placeholders.
            n += store.add(str(log.log_id), [(seqs[0], None)],
                           f"seqs {seqs[0]}..{seqs[-1]} {why}", lost=True)
        else:
            n += store.add(str(log.log_id), [(s, None) for s in seqs], why, lost=True)
    return n


_MAX_LOST_ROWS = 10_000


def _pack_item(item: Any) -> tuple[bytes, str]:
    """The item for the store, and a note if it had to be stored as its repr.

    Items come from the log, so they pack; but a ``combine`` hook may hand the
    sink items of its own making. A dead letter that cannot be stored must not
    stop delivery (it was retried forever), so such an item is kept as text.
    """
    try:
        return msgpack.packb(item, use_bin_type=True), ""
    except (TypeError, OverflowError, ValueError) as ex:
        return (msgpack.packb(repr(item), use_bin_type=True),
                f" [the item is not msgpack-serialisable ({ex}): stored as its repr]")


def _row(r: dict[str, Any]) -> DeadLetter:
    item = None if r["item"] is None else unpack_one(r["item"])
    key = None if r.get("key") is None else msgpack.unpackb(r["key"], raw=False)
    return DeadLetter(r["log_id"], r["seq"], item, r["error"], r["error_type"],
                      r["failed_at"], r["attempts"], bool(r["lost"]), key)


def list_dead_letters(data_dir: str, limit: int | None = None) -> list[DeadLetter]:
    """The dead letters of the log in ``data_dir`` (works while a batcher runs)."""
    path = os.path.join(data_dir, DLQ_FILE)
    if not os.path.exists(path):
        return []
    store = DeadLetterStore(path)
    try:
        return store.list(limit)
    finally:
        store.close()
