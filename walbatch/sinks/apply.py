"""ApplySink: your SQL, applied exactly once per acknowledged item.

``apply(conn, batch)`` runs inside one database transaction that also records,
in the same database, which of this log's seqs are applied (the *progress
record*, table ``walbatch_applied`` by default). The transaction is the only
thing that makes "once" true (Kafka Connect's JDBC sink, Flink's two-phase
sinks): a position kept anywhere else can disagree with the data after a crash.

The progress record is a set of applied seq ranges per log, not one high-water
mark, so batches may commit in any order: ``flush_concurrency`` > 1 and keyed
batches (whose seqs interleave) need no ordering rule for exactly-once. What is
ordered is the caller's business: batches of one key reach the sink in seq
order, one at a time; use keys when statements depend on order (last write wins).

A redelivered record (after a crash, or ``walbatch replay`` into the same
database) is removed before ``apply`` sees it: twice by walbatch, first before a
``combine`` hook merges records (``applied``), then inside the transaction.

Format of the progress table (changing it breaks existing databases)::

    walbatch_applied(log_id TEXT, first_seq INTEGER, last_seq INTEGER,
                     PRIMARY KEY (log_id, first_seq))    -- disjoint, merged runs

Who owns what: the progress table is this module's; everything else in the
database is the user's.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import PermanentSinkError, SinkError
from ..record import Batch
from .base import isolate, require
from .sqlite import path_of
from .urls import URLOptions

Apply = Callable[[Any, Batch], Sequence[Any] | None]
"""``apply(conn, batch)``: run your statements on ``conn``; return None or per-item outcomes."""

_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class ApplySink:
    """Run ``apply(conn, batch)`` exactly once per acknowledged item, in a transaction.

    ``url`` is ``sqlite:///PATH.db`` or ``postgresql://...`` (the same forms as
    the insert sinks; ``?progress_table=NAME`` names the progress table).
    ``conn`` is a ``sqlite3.Connection`` or a ``psycopg.Connection``, inside an
    open transaction: do not commit or roll back in ``apply``. An exception
    rolls everything back (nothing of the batch is applied) and goes through
    the retry and dead-letter policies; per-item outcomes work as for any sink,
    and the progress record covers the delivered and dead-lettered items alike
    (a retryable per-item error is left out, so its retry is applied).

    An error about one item's data (a constraint, a value the database refuses:
    SQLite CONSTRAINT/MISMATCH/RANGE/TOOBIG, PostgreSQL classes 22, 23, 44, P0;
    or KeyError, TypeError, ValueError raised by ``apply`` on an item) does not
    hold back the rest: the batch is applied again in halves under savepoints
    until each such item is alone, and only those are dead-lettered. Any other
    error (a connection, a lock, a syntax error) fails the whole batch, which
    is retried.
    """

    def __init__(self, url: str, apply: Apply) -> None:
        if not callable(apply):
            raise TypeError(f"apply must be a callable apply(conn, batch), not {type(apply).__name__}")
        self.url = url
        self.apply = apply
        parts = urlsplit(url)
        postgres = parts.scheme in ("postgresql", "postgres")
        if parts.scheme != "sqlite" and not postgres:
            raise ValueError(f"ApplySink takes a sqlite:///PATH or postgresql://... URL, not "
                             f"{parts.scheme or url!r}")
        # PostgreSQL's other parameters go to libpq as written (sslmode, ...).
        options = URLOptions(url, "ApplySink", ("progress_table",),
                             passthrough=(lambda name: True) if postgres else None)
        self.table = options.text("progress_table", "walbatch_applied") or "walbatch_applied"
        if not _TABLE_NAME.match(self.table):
            raise ValueError(f"progress_table={self.table!r}: expected a plain SQL name "
                             "(letters, digits, _)")
        if postgres:
            conninfo = urlunsplit(parts._replace(scheme="postgresql", query="&".join(options.others)))
            self._db: _Database = _PostgreSQL(conninfo, self.table)
        else:
            path = path_of(url)
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ValueError(f"ApplySink: directory {parent!r} does not exist; create it first")
            self._db = _SQLite(path, self.table)

    def applied(self, batch: Batch) -> Container[int]:
        """The seqs of ``batch`` already applied (before a combine hook merges records)."""
        return self._db.applied(batch.log_id, [r.seq for r in batch])

    def write(self, batch: Batch) -> list[Any] | None:
        return self._db.transaction(batch, self.apply)

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"ApplySink({self._db.describe()!r}, {getattr(self.apply, '__qualname__', self.apply)})"


class _Database:
    def applied(self, log_id: str, seqs: list[int]) -> set[int]:
        raise NotImplementedError

    def transaction(self, batch: Batch, apply: Apply) -> list[Any] | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


# Errors about one item's data, not the database or the statement.
_PYTHON_ITEM_ERRORS = (KeyError, TypeError, ValueError, IndexError, OverflowError)
_SQLITE_ITEM_CODES = frozenset({18, 19, 20, 25})  # TOOBIG, CONSTRAINT, MISMATCH, RANGE
_PG_ITEM_CLASSES = ("22", "23", "44", "P0")


def _sqlite_item_error(ex: BaseException) -> bool:
    if isinstance(ex, sqlite3.Error):
        return (getattr(ex, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_ITEM_CODES
    return isinstance(ex, _PYTHON_ITEM_ERRORS)


class _SQLiteSavepoint:
    """``with``: a savepoint, released on success, rolled back to on an exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("SAVEPOINT walbatch_apply")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.conn.execute("ROLLBACK TO walbatch_apply")
        self.conn.execute("RELEASE walbatch_apply")


def _apply_isolating(conn: Any, todo: Batch, apply: Apply, savepoint: Callable[[], Any],
                     item_error: Callable[[BaseException], bool]) -> list[Any] | None:
    """``apply(conn, todo)``; an item-data error is narrowed down to its items (dead letters)."""
    try:
        with savepoint():
            return _check(apply(conn, todo), len(todo))
    except Exception as ex:
        if not item_error(ex):
            raise
        if len(todo) == 1:
            return [PermanentSinkError(f"apply refused seq {todo[0].seq}: {type(ex).__name__}: {ex}")]
    outcomes: list[Any] = [None] * len(todo)

    def store(chunk: list[tuple[int, Any]]) -> None:
        part = Batch([r for _, r in chunk], todo.log_id, todo.reason, todo.attempt, todo.key)
        with savepoint():
            got = _check(apply(conn, part), len(part))
        for (i, _), o in zip(chunk, got or [None] * len(chunk), strict=True):
            outcomes[i] = o

    def refuse(i: int, ex: BaseException) -> None:
        outcomes[i] = PermanentSinkError(f"apply refused seq {todo[i].seq}: {type(ex).__name__}: {ex}")

    rows = list(enumerate(todo))
    mid = len(rows) // 2  # the whole batch just failed: start with its halves
    isolate(rows[:mid], store, item_error, refuse)
    isolate(rows[mid:], store, item_error, refuse)
    return outcomes


def _covered(seqs: Iterable[int], runs: list[tuple[int, int]]) -> set[int]:
    return {s for s in seqs if any(a <= s <= b for a, b in runs)}


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint runs; touching runs are joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    return _merge([(s, s) for s in seqs])


def _plan(batch: Batch, applied_runs: list[tuple[int, int]]) -> tuple[list[int], Batch]:
    """The positions of records still to apply, and the batch ``apply`` sees."""
    done = _covered((r.seq for r in batch), applied_runs)
    keep = [i for i, r in enumerate(batch) if r.seq not in done]
    if len(keep) == len(batch):
        return keep, batch
    todo = Batch([batch[i] for i in keep], batch.log_id, batch.reason, batch.attempt, batch.key,
                 batch.first_seq, batch.last_seq, batch.coalesced, batch.covers)
    return keep, todo


def _check(outcomes: Any, n: int) -> list[Any] | None:
    if outcomes is None:
        return None
    out = list(outcomes)
    if len(out) != n:
        raise TypeError(f"apply returned {len(out)} outcomes for a batch of {n} records")
    return out


def _newly_applied(batch: Batch, todo: Batch, outcomes: list[Any] | None) -> list[tuple[int, int]]:
    """The runs this transaction marks applied: everything the batch stands for, less
    records left to retry (a retryable per-item error)."""
    retry = set()
    if outcomes is not None:
        retry = {r.seq for r, o in zip(todo, outcomes, strict=True)
                 if isinstance(o, SinkError) and o.retryable}
    runs = batch.covers or _runs(r.seq for r in batch)
    if not retry:
        return runs
    return _runs(s for a, b in runs for s in range(a, b + 1) if s not in retry)


def _spread(keep: list[int], n: int, outcomes: list[Any] | None) -> list[Any] | None:
    """Outcomes for the whole batch: None (taken earlier) for records not applied now."""
    if outcomes is None or len(keep) == n:
        return outcomes
    out: list[Any] = [None] * n
    for i, o in zip(keep, outcomes, strict=True):
        out[i] = o
    return out


class _SQLite(_Database):
    def __init__(self, path: str, table: str) -> None:
        self.path = path
        self.table = table
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # committed = durable before write returns
        self.conn.execute("PRAGMA busy_timeout=10000")
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (log_id TEXT NOT NULL, "
                          "first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, "
                          "PRIMARY KEY (log_id, first_seq))")

    def describe(self) -> str:
        return f"sqlite:///{self.path}"

    def _runs_between(self, log_id: str, lo: int, hi: int) -> list[tuple[int, int]]:
        return list(self.conn.execute(
            f"SELECT first_seq, last_seq FROM {self.table} WHERE log_id = ? AND first_seq <= ? "
            "AND last_seq >= ?", (log_id, hi, lo)))

    def applied(self, log_id: str, seqs: list[int]) -> set[int]:
        if not seqs:
            return set()
        with self._lock:
            return _covered(seqs, self._runs_between(log_id, min(seqs), max(seqs)))

    def transaction(self, batch: Batch, apply: Apply) -> list[Any] | None:
        if not batch:
            return None
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                seqs = [r.seq for r in batch]
                keep, todo = _plan(batch, self._runs_between(batch.log_id, min(seqs), max(seqs)))
                outcomes = _apply_isolating(self.conn, todo, apply, self._savepoint,
                                            _sqlite_item_error) if todo else None
                self._mark(batch.log_id, _newly_applied(batch, todo, outcomes))
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        return _spread(keep, len(batch), outcomes)

    def _savepoint(self) -> Any:
        return _SQLiteSavepoint(self.conn)

    def _mark(self, log_id: str, runs: list[tuple[int, int]]) -> None:
        if not runs:
            return
        lo, hi = runs[0][0], runs[-1][1]
        near = self._runs_between(log_id, lo - 1, hi + 1)
        self.conn.executemany(f"DELETE FROM {self.table} WHERE log_id = ? AND first_seq = ?",
                              [(log_id, a) for a, _ in near])
        self.conn.executemany(f"INSERT INTO {self.table} VALUES (?, ?, ?)",
                              [(log_id, a, b) for a, b in _merge(near + runs)])

    def close(self) -> None:
        with self._lock:
            self.conn.close()


class _PostgreSQL(_Database):
    """One connection per delivering thread; the progress rows of a log are updated
    under a transaction-scoped advisory lock, so concurrent batches merge their
    runs one at a time while their ``apply`` calls run in parallel."""

    def __init__(self, conninfo: str, table: str) -> None:
        self.psycopg = require("psycopg", "postgresql", "PostgreSQL")
        self.conninfo = conninfo
        self.table = table
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        conn = self._conn()
        with conn.transaction():
            conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (log_id TEXT NOT NULL, "
                         "first_seq BIGINT NOT NULL, last_seq BIGINT NOT NULL, "
                         "PRIMARY KEY (log_id, first_seq))")

    def describe(self) -> str:
        parts = urlsplit(self.conninfo)
        return f"postgresql://{parts.netloc.rpartition('@')[2]}{parts.path}"

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            try:
                conn = self.psycopg.connect(self.conninfo, autocommit=True)
            except self.psycopg.OperationalError as ex:
                raise SinkError(f"cannot connect to {self.describe()}: {str(ex).strip()}") from ex
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _runs_between(self, conn: Any, log_id: str, lo: int, hi: int) -> list[tuple[int, int]]:
        return list(conn.execute(
            f"SELECT first_seq, last_seq FROM {self.table} WHERE log_id = %s AND first_seq <= %s "
            "AND last_seq >= %s", (log_id, hi, lo)))

    def applied(self, log_id: str, seqs: list[int]) -> set[int]:
        if not seqs:
            return set()
        return _covered(seqs, self._runs_between(self._conn(), log_id, min(seqs), max(seqs)))

    def transaction(self, batch: Batch, apply: Apply) -> list[Any] | None:
        if not batch:
            return None
        conn = self._conn()
        try:
            with conn.transaction():
                seqs = [r.seq for r in batch]
                keep, todo = _plan(batch, self._runs_between(conn, batch.log_id, min(seqs), max(seqs)))
                outcomes = _apply_isolating(conn, todo, apply, conn.transaction,
                                            self._item_error) if todo else None
                runs = _newly_applied(batch, todo, outcomes)
                if runs:
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                 (f"{self.table}:{batch.log_id}",))
                    lo, hi = runs[0][0], runs[-1][1]
                    near = self._runs_between(conn, batch.log_id, lo - 1, hi + 1)
                    with conn.cursor() as cur:
                        cur.executemany(f"DELETE FROM {self.table} WHERE log_id = %s AND first_seq = %s",
                                        [(batch.log_id, a) for a, _ in near])
                        cur.executemany(f"INSERT INTO {self.table} VALUES (%s, %s, %s)",
                                        [(batch.log_id, a, b) for a, b in _merge(near + runs)])
        except self.psycopg.Error as ex:
            if conn.broken or conn.closed:
                # The connection, not the batch: drop it, retry with a new one.
                conn.close()
                raise SinkError(f"PostgreSQL connection failed: {str(ex).strip()}") from ex
            if (getattr(ex, "sqlstate", None) or "")[:2] == "40":
                # A deadlock or serialization failure between concurrent batches: the
                # transaction was rolled back whole, and trying again is the cure.
                raise SinkError(f"PostgreSQL rolled the batch back ({str(ex).strip()}); "
                                "retrying") from ex
            raise
        return _spread(keep, len(batch), outcomes)

    def _item_error(self, ex: BaseException) -> bool:
        sqlstate = getattr(ex, "sqlstate", None)
        if sqlstate:
            return sqlstate[:2] in _PG_ITEM_CLASSES
        return isinstance(ex, (self.psycopg.DataError, *_PYTHON_ITEM_ERRORS))

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

