"""SQLite sink: one row per item, the whole item in one JSON column, keyed by (log_id, seq).

The table (made if missing)::

    CREATE TABLE items (_log_id TEXT NOT NULL, _seq INTEGER NOT NULL, item TEXT NOT NULL,
                        PRIMARY KEY (_log_id, _seq)) WITHOUT ROWID

``item`` holds the item's JSON under walbatch's value mapping (walbatch.values,
docs/values.md), so it reads back equal (``values.loads(item)``) whatever it holds:
no field name can collide with a column, SQLite's row id or its case folding, and no
value is converted by a column's type affinity. For convenience each top-level field
of a dict item also gets a column, as a VIRTUAL generated column
``json_extract(item, '$."field"')`` added when the field first appears: queries read
``SELECT user_id, action FROM items`` as before, and the columns cost no storage.
A field whose name SQLite cannot carry as such a column (it holds a quote, backslash
or control character, equals another column's name but for ASCII case, is a row id
alias, or comes after the first 1000 columns) gets none; it is in ``item`` all the same.

A redelivered record is dropped by the key (``ON CONFLICT DO NOTHING``). With
``upsert=FIELD[,FIELD]`` the table keeps one row per value of those fields instead:
a record replaces its key's row unless the row holds a later record of the same log
(docs/sinks.md). Each batch
is one transaction, committed with ``synchronous=FULL`` before write returns. An item
the value mapping refuses, or a row SQLite refuses (a trigger, a CHECK, too big), is
dead-lettered alone; errors about the database (locked, I/O, disk full) fail the
batch, which is retried.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import PermanentSinkError
from ..record import Batch
from ..values import dumps, dumps_many
from .base import isolate
from .urls import URLOptions

KEY = ("_log_id", "_seq")
ITEM = "item"
MAX_COLUMNS = 1000
_ROW_ID_NAMES = frozenset({"rowid", "oid", "_rowid_"})
# SQLite result codes that blame the rows: TOOBIG, CONSTRAINT (a CHECK, a trigger's
# RAISE(ABORT)), MISMATCH, RANGE. The others (BUSY, LOCKED, IOERR, FULL, READONLY,
# ERROR such as a table dropped under us, ...) are about the database.
_ROW_ERRORS = frozenset({18, 19, 20, 25})
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _folded(name: str) -> str:
    """SQLite compares identifiers ignoring ASCII case only."""
    return name.translate(_ASCII_LOWER)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SQLiteSink:
    """Writes batches to one SQLite table; thread-safe (one connection, one write at a time)."""

    def __init__(self, path: str, table: str = "items", upsert: Sequence[str] | None = None) -> None:
        if not table or "\0" in table:
            raise ValueError(f"SQLite sink: bad table name {table!r}")
        self.upsert = tuple(upsert or ())
        for field in self.upsert:
            if not _path_safe(field):
                raise ValueError(f"SQLite sink: upsert field {field!r} must be a non-empty name "
                                 "without quotes, backslashes or control characters")
        if len(set(self.upsert)) != len(self.upsert):
            raise ValueError(f"SQLite sink: upsert names a field twice: {', '.join(self.upsert)}")
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ValueError(f"SQLite sink: directory {parent!r} does not exist; create it "
                                 "first (the sink makes the database file, not directories)")
        self.path = path
        self.table = table
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._create()
            self._columns = self._read_columns()
            self._insert = self._insert_sql()
            self._conn.execute("EXPLAIN " + self._insert, ("", 0, "null"))  # the index matches
        except sqlite3.IntegrityError as ex:
            self._conn.close()
            raise ValueError(f"SQLite sink: table {table!r} in {path} holds several rows per "
                             f"upsert key ({', '.join(self.upsert)}): {ex}") from None
        except BaseException:
            self._conn.close()
            raise
        # Field names given a column or refused one; cleared when large (items with
        # ever new field names must not grow it without bound), then rebuilt.
        self._seen: set[Any] = set()
        self._lock = threading.Lock()

    def _create(self) -> None:
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS {_quoted(self.table)} (_log_id TEXT NOT NULL, "
            f"_seq INTEGER NOT NULL, {ITEM} TEXT NOT NULL, PRIMARY KEY (_log_id, _seq)) "
            # One B-tree keyed by (log_id, seq), not a rowid table plus an index of the
            # key: a sixth faster to insert and a quarter smaller (measured).
            "WITHOUT ROWID")
        if self.upsert:
            # Named after the key, so another key's index is never taken for this one.
            digest = hashlib.blake2b("\0".join(self.upsert).encode(), digest_size=4).hexdigest()
            self._conn.execute(
                f"CREATE UNIQUE INDEX IF NOT EXISTS {_quoted(f'{self.table}_upsert_{digest}')} "
                f"ON {_quoted(self.table)} ({self._key_exprs()})")

    def _key_exprs(self) -> str:
        return ", ".join(_extract(field) for field in self.upsert)

    def _insert_sql(self) -> str:
        insert = (f"INSERT INTO {_quoted(self.table)} ({', '.join(KEY)}, {ITEM}) VALUES (?, ?, ?) ")
        if not self.upsert:
            return insert + f"ON CONFLICT ({', '.join(KEY)}) DO NOTHING"
        # One row per key: a record replaces the row unless the row holds a later record
        # of the same log (a redelivered older item never overwrites a newer one). Seqs of
        # different logs say nothing about order: a record of another log replaces it.
        t = _quoted(self.table)
        return insert + (
            f"ON CONFLICT ({self._key_exprs()}) DO UPDATE SET _log_id = excluded._log_id, "
            f"_seq = excluded._seq, {ITEM} = excluded.{ITEM} "
            f"WHERE excluded._log_id <> {t}._log_id OR excluded._seq > {t}._seq "
            "ON CONFLICT DO NOTHING")

    def _read_columns(self) -> set[str]:
        """The table's column names (folded), after checking it is a table this sink writes."""
        info = self._conn.execute(f"PRAGMA table_xinfo({_quoted(self.table)})").fetchall()
        stored = {_folded(name) for _, name, _, _, _, _, hidden in info if hidden not in (2, 3)}
        where = f"SQLite sink: table {self.table!r} in {self.path}"
        if stored != {*KEY, ITEM}:
            other = sorted(stored - {*KEY, ITEM}) or sorted({*KEY, ITEM} - stored)
            raise ValueError(
                f"{where} has columns {sorted(stored)}, not (_log_id, _seq, item) ({other[0]!r} "
                "differs): this sink stores each item whole in the JSON column 'item' and shows "
                "its fields as generated columns (docs/sinks.md). A table written by an older "
                "walbatch keeps one column per field; use another table (?table=NAME) or file")
        keyed = False
        for _, index, unique, _, partial in self._conn.execute(
                f"PRAGMA index_list({_quoted(self.table)})").fetchall():
            cols = {_folded(r[2]) for r in self._conn.execute(
                f"PRAGMA index_info({_quoted(index)})").fetchall() if r[2] is not None}
            keyed = keyed or (bool(unique) and not partial and cols == set(KEY))
        if not keyed:
            raise ValueError(f"{where} has no primary key or unique index on (_log_id, _seq): "
                             "the sink relies on it to drop redelivered records")
        return {_folded(r[1]) for r in info}

    def write(self, batch: Batch) -> list[BaseException | None] | None:
        outcomes: list[BaseException | None] = [None] * len(batch)
        rows: list[tuple[int, tuple[str, int, str]]] = []
        log_id = batch.log_id
        seen = self._seen
        fields: set[Any] = set()
        upsert = self.upsert
        items = [r.item for r in batch]
        texts = dumps_many(items)  # the batch at once, when every item is plain
        for i, r in enumerate(batch):
            item = items[i]
            try:
                if upsert:
                    _check_key(item, upsert)
                rows.append((i, (log_id, r.seq, texts[i] if texts is not None else dumps(item))))
            except (TypeError, ValueError) as ex:
                outcomes[i] = PermanentSinkError(f"seq {r.seq}: the SQLite sink cannot store the "
                                                 f"item: {ex}")
                continue
            if type(item) is dict and not item.keys() <= seen:
                fields |= item.keys() - seen
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if fields:
                    self._add_columns(fields)
                isolate(rows, self._store, lambda ex: _row_level(ex) and conn.in_transaction,
                        lambda i, ex: outcomes.__setitem__(i, PermanentSinkError(
                            f"SQLite refused the item: {type(ex).__name__}: {ex}")))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return None if all(o is None for o in outcomes) else outcomes

    def _store(self, chunk: list[tuple[int, tuple[str, int, str]]]) -> None:
        # A savepoint: a refused chunk leaves nothing behind, the rest of the
        # transaction stands.
        conn = self._conn
        conn.execute("SAVEPOINT walbatch_rows")
        try:
            conn.executemany(self._insert, [row for _, row in chunk])
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO walbatch_rows")
                conn.execute("RELEASE walbatch_rows")
            raise
        conn.execute("RELEASE walbatch_rows")

    def _add_columns(self, fields: set[Any]) -> None:
        """Give each new top-level field a generated column, if SQLite can carry it."""
        if len(self._seen) > 100_000:
            self._seen = set()
        self._seen |= fields
        self._columns = self._read_columns()  # another writer may have added some
        for name in sorted(f for f in fields if isinstance(f, str)):
            folded = _folded(name)
            if (folded in self._columns or folded in _ROW_ID_NAMES
                    or len(self._columns) >= MAX_COLUMNS or not _path_safe(name)):
                continue
            try:
                self._conn.execute(
                    f"ALTER TABLE {_quoted(self.table)} ADD COLUMN {_quoted(name)} GENERATED "
                    f"ALWAYS AS ({_extract(name)}) VIRTUAL")
            except sqlite3.Error as ex:
                if getattr(ex, "sqlite_errorcode", None) != sqlite3.SQLITE_ERROR:
                    raise
                continue  # a name SQLite will not take: the field is in item all the same
            self._columns.add(folded)

    def close(self) -> None:
        self._conn.close()

    def __repr__(self) -> str:
        return f"SQLiteSink({self.path!r}, table={self.table!r})"


def _path_safe(name: str) -> bool:
    """Can json_extract name this member? (SQLite's JSON path has no escapes.)"""
    return bool(name) and name.isprintable() and not any(c in name for c in '"\\')


def _extract(name: str) -> str:
    """SQL for the value of the top-level field ``name`` of the item."""
    member = "$" + name if name.startswith("$") else name  # as values.dumps writes it
    path = '$."' + member + '"'
    return f"json_extract({ITEM}, '{path.replace(chr(39), chr(39) * 2)}')"


def _check_key(item: Any, fields: tuple[str, ...]) -> None:
    """An upsert key must be there and be a str or an int SQLite holds exactly."""
    if type(item) is not dict or not all(type(k) is str for k in item):
        raise ValueError(f"upsert={','.join(fields)} needs a dict item with str keys")
    for f in fields:
        if f not in item:
            raise ValueError(f"the upsert key {f!r} is missing")
        v = item[f]
        # Not bool (true is 1 to SQLite), float (1.0 is 1) or a container (its JSON
        # text would equal a str): keys that are not equal would share a row.
        if not (type(v) is str or (type(v) is int and -(1 << 63) <= v < (1 << 63))):
            raise ValueError(f"the upsert key {f!r} is {v!r}: a key must be a str or an int "
                             "from -2**63 to 2**63-1")


def _row_level(ex: BaseException) -> bool:
    """Is this error about the rows (retrying cannot help) rather than the database?"""
    code = getattr(ex, "sqlite_errorcode", None)
    return isinstance(ex, sqlite3.Error) and code is not None and code & 0xFF in _ROW_ERRORS


def path_of(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``."""
    parts = urlsplit(url)
    if parts.netloc:
        raise ValueError(f"SQLite sink URL {url.split('?')[0]!r} names a host {parts.netloc!r}: "
                         "write sqlite:///relative/path.db or sqlite:////absolute/path.db")
    path = unquote(parts.path)
    if path.startswith("/"):
        path = path[1:]
    if not path:
        raise ValueError(f"SQLite sink URL {url!r} has no path (sqlite:///PATH.db)")
    return path


def from_url(url: str) -> SQLiteSink:
    """``sqlite:///relative.db?table=NAME&upsert=FIELD[,FIELD]`` or ``sqlite:////abs/path.db``."""
    options = URLOptions(url, "SQLite", ("table", "upsert"))
    upsert = options.text("upsert")
    return SQLiteSink(path_of(url), table=options.text("table", "items") or "items",
                      upsert=upsert.split(",") if upsert else None)
