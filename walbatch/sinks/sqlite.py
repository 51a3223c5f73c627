"""SQLite sink (sqlite-utils): one row per item, keyed by (log_id, seq).

A dict item's fields become columns (added as new fields appear); any other
item goes to one JSON column ``item``. The key columns are ``_log_id`` and
``_seq``, so a redelivered record is ignored instead of duplicated. Each batch
is one transaction, committed with ``synchronous=FULL`` before write returns.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any

import sqlite_utils

from ..record import Batch


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

    def write(self, batch: Batch) -> None:
        rows = [_row(batch.log_id, r.seq, r.item) for r in batch]
        with self._lock, self.db.conn:
            self.db.conn.execute("BEGIN IMMEDIATE")
            self.db[self.table].insert_all(rows, pk=("_log_id", "_seq"), ignore=True, alter=True)

    def close(self) -> None:
        self.db.conn.close()

    def __repr__(self) -> str:
        return f"SQLiteSink({self.path!r}, table={self.table!r})"


def _row(log_id: str, seq: int, item: Any) -> dict[str, Any]:
    if isinstance(item, dict) and all(isinstance(k, str) for k in item):
        row = {k: _cell(v) for k, v in item.items() if k not in ("_log_id", "_seq")}
    else:
        row = {"item": json.dumps(item, default=_json_default)}
    row["_log_id"] = log_id
    row["_seq"] = seq
    return row


def _cell(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=_json_default)
    return v


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")
