"""SQLite sink (sqlite-utils): one row per item, keyed by (log_id, seq).

A dict item's fields become columns (added as new fields appear); any other
item goes to one JSON column ``item``. The key columns are ``_log_id`` and
``_seq``, so a redelivered record is ignored instead of duplicated (an item
with a field of either name is refused). Each batch is one transaction,
committed with ``synchronous=FULL`` before write returns. An item SQLite
refuses (an int beyond 64 bits, field names that differ only in case, more
columns than a row may have) is isolated and dead-lettered with SQLite's
message; the rest of its batch is stored.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any

import sqlite_utils

from ..errors import PermanentSinkError
from ..record import Batch
from .base import isolate

_IDENTITY = ("_log_id", "_seq")
# SQLite result codes that blame the statement's rows: ERROR (a column name it cannot
# take, too many columns), TOOBIG, CONSTRAINT, MISMATCH, RANGE. The others (BUSY,
# LOCKED, IOERR, FULL, ...) are about the database and pass when it recovers.
_ROW_ERRORS = frozenset({1, 18, 19, 20, 25})


class SQLiteSink:
    def __init__(self, path: str, table: str = "items") -> None:
        self.path = path
        self.table = table
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.Lock()

    def write(self, batch: Batch) -> list[BaseException | None] | None:
        outcomes: list[BaseException | None] = [None] * len(batch)
        rows: list[tuple[int, dict[str, Any]]] = []
        for i, r in enumerate(batch):
            try:
                rows.append((i, _row(batch.log_id, r.seq, r.item)))
            except (TypeError, ValueError, RecursionError) as ex:
                outcomes[i] = PermanentSinkError(f"SQLite sink cannot store seq {r.seq}: {ex}")
        with self._lock, self.db.conn:
            self.db.conn.execute("BEGIN IMMEDIATE")
            self._place(rows, outcomes)
        return None if all(o is None for o in outcomes) else outcomes

    def _place(self, rows: list[tuple[int, dict[str, Any]]],
               outcomes: list[BaseException | None]) -> None:
        """Insert ``rows``; bisect to isolate the ones SQLite refuses.

        insert_all runs in a savepoint inside our transaction (sqlite-utils'
        ``atomic``), so a refused chunk leaves nothing behind. An error about the
        database rather than the rows (locked, I/O, disk full) fails the batch,
        which is retried as a whole.
        """
        table = self.db[self.table]

        def store(chunk: list[tuple[int, dict[str, Any]]]) -> None:
            table.insert_all([row for _, row in chunk], pk=("_log_id", "_seq"),
                             ignore=True, alter=True)

        def refuse(i: int, ex: BaseException) -> None:
            outcomes[i] = PermanentSinkError(f"SQLite refused the item: {type(ex).__name__}: {ex}")

        # A trigger's RAISE(ROLLBACK) ends the whole transaction: then nothing can be
        # isolated, and the batch is retried.
        isolate(rows, store, lambda ex: _item_level(ex) and self.db.conn.in_transaction, refuse)

    def close(self) -> None:
        self.db.conn.close()

    def __repr__(self) -> str:
        return f"SQLiteSink({self.path!r}, table={self.table!r})"


def _row(log_id: str, seq: int, item: Any) -> dict[str, Any]:
    if isinstance(item, dict) and all(isinstance(k, str) for k in item):
        taken = [k for k in _IDENTITY if k in item]
        if taken:
            raise ValueError(f"field {taken[0]!r} is reserved: the sink keys rows on "
                             "(_log_id, _seq); rename the field")
        row = {k: _cell(v) for k, v in item.items()}
    else:
        row = {"item": json.dumps(item, default=_json_default)}
    row["_log_id"] = log_id
    row["_seq"] = seq
    return row


def _item_level(ex: BaseException) -> bool:
    """Is this error about the rows (retrying cannot help) rather than the database?"""
    if isinstance(ex, sqlite3.Error):
        code = getattr(ex, "sqlite_errorcode", None)
        if code is None:  # raised by the sqlite3 module while binding a value
            return isinstance(ex, (sqlite3.InterfaceError, sqlite3.DataError))
        return code & 0xFF in _ROW_ERRORS
    # sqlite3 binding a too-large int (OverflowError); sqlite-utils refusing a row
    # with too many columns (ValueError).
    return isinstance(ex, (OverflowError, ValueError, TypeError))


def _cell(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=_json_default)
    return v


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")
