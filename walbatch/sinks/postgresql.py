"""PostgreSQL sink (psycopg 3): COPY each batch in, keyed by (log_id, seq).

A batch's first delivery is COPYed straight into the table. If that fails on
the (_log_id, _seq) key (some rows were stored already) or on a bad row, and for
every retry or replay, the batch is COPYed into a per-connection temporary
staging table and moved into the target with ``INSERT ... SELECT ... ON
CONFLICT (_log_id, _seq) DO NOTHING``, so a redelivered record is dropped
instead of duplicated. Each batch is one transaction, committed before
``write`` returns. See docs/sinks/postgresql.md
for the URL, the two modes (``jsonb``: the whole item in one column;
``columns``: a dict item's fields in columns) and the measurements behind the
choices.

Errors: a lost connection, a missing table or any other problem that is not
about particular items is transient (``SinkError``, retried; the connection is
dropped and a new one made on the next write). A data or constraint error
(SQLSTATE classes 22, 23 and 54) is about items: the batch is split in halves
inside savepoints until the offending items are alone, the good ones are
committed and each bad one is returned as a ``PermanentSinkError`` carrying the
database's message, so it goes to the dead letters by itself.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import PermanentSinkError, SinkError
from ..record import Batch
from ..values import dumps
from .base import isolate, require
from .urls import URLOptions

KEY_COLUMNS = ("_log_id", "_seq")
MODES = ("jsonb", "columns")
OPTIONS = ("table", "columns", "mode", "item_column", "rest", "create", "pool", "upsert")
STAGE = "_walbatch_stage"
# Item-level SQLSTATE classes: data exception, integrity constraint violation,
# WITH CHECK OPTION violation (a view), program limit exceeded (e.g. an index row
# too big), PL/pgSQL errors (a validation trigger's RAISE EXCEPTION). Anything else
# is about the connection, the schema or the server, and retrying the batch is the cure.
ITEM_CLASSES = ("22", "23", "44", "54", "P0")
_TYPE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?(\s*\[\d*\])*$")


@dataclass(frozen=True)
class Column:
    """One target column: its name, the item field it takes, its type (for ``create``)."""

    name: str
    field: str
    type: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Column:
        """``COLUMN[=FIELD][:TYPE]``, e.g. ``user_id:bigint`` or ``uid=user_id:bigint``."""
        left, colon, type_ = spec.partition(":")
        name, eq, field = left.partition("=")
        name, field, type_ = name.strip(), field.strip(), type_.strip()
        if not name or (eq and not field) or (colon and not type_):
            raise ValueError(f"bad column {spec!r}: expected COLUMN, COLUMN:TYPE or "
                             "COLUMN=FIELD[:TYPE]")
        return cls(name, field if eq else name, type_ or None)


def parse_columns(spec: str) -> list[Column]:
    """Split ``a:int,b:numeric(10,2)`` on the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [Column.parse(p) for p in parts]


class PostgreSQLSink:
    """Writes batches to one PostgreSQL table; thread-safe (a small connection pool).

    ``conninfo`` is anything libpq takes (a ``postgresql://`` URL without walbatch's
    options, or ``key=value`` pairs). ``columns`` (spec strings, ``Column`` objects,
    or a mapping ``{column: field}``) selects ``mode="columns"``; without them the
    mode is ``"jsonb"``. Connections are opened on demand, at most ``pool`` at once
    (one per concurrent ``write``), so nothing is contacted before the first batch.
    """

    def __init__(self, conninfo: str, *, table: str = "items",
                 columns: str | Sequence[str | Column] | Mapping[str, str] | None = None,
                 mode: str | None = None, item_column: str = "item", rest: str | None = None,
                 create: bool = False, pool: int = 4,
                 upsert: str | Sequence[str] | None = None) -> None:
        self._psycopg = require("psycopg", "postgresql", "PostgreSQL")
        from psycopg import sql
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(conninfo)
        except self._psycopg.Error as ex:
            raise ValueError(f"bad PostgreSQL connection string: {ex}".strip()) from None
        # A server that never answers must not hang the flusher at connect.
        params.setdefault("connect_timeout", 10)
        params.setdefault("application_name", "walbatch")  # visible in pg_stat_activity
        self._params = params
        self._where = _describe(params)

        parts = table.split(".")
        if not table or len(parts) > 2 or not all(parts):
            raise ValueError(f"bad table {table!r}: expected NAME or SCHEMA.NAME")
        self.table = table
        self._table = sql.Identifier(*parts)
        self._table_name = parts[-1]

        if isinstance(columns, str):
            cols = parse_columns(columns)
        elif isinstance(columns, Mapping):
            cols = [Column(str(c), str(f)) for c, f in columns.items()]
        elif columns is not None:
            cols = [c if isinstance(c, Column) else Column.parse(c) for c in columns]
        else:
            cols = None
        if mode is None:
            mode = "columns" if cols is not None else "jsonb"
        if mode not in MODES:
            raise ValueError(f"bad mode {mode!r}: expected one of {', '.join(MODES)}")
        if mode == "jsonb" and (cols is not None or rest is not None):
            raise ValueError("mode=jsonb puts the whole item in one column; columns= and rest= "
                             "are for mode=columns")
        if mode == "columns" and item_column != "item":
            raise ValueError("item_column= is for mode=jsonb; mode=columns writes fields "
                             "(rest= names a jsonb column for the other fields)")
        if cols is not None:
            if not cols:
                raise ValueError("columns= lists no column")
            names = [c.name for c in cols] + ([rest] if rest else [])
            if len(set(names)) != len(names):
                raise ValueError(f"a column is named twice in {names}")
            clash = set(names) & set(KEY_COLUMNS)
            if clash:
                raise ValueError(f"{', '.join(sorted(clash))} hold the record's identity; "
                                 "they cannot be item columns")
            for c in cols:
                if c.type is not None and not _TYPE_RE.match(c.type):
                    raise ValueError(f"bad type {c.type!r} for column {c.name!r}")
        if not item_column or item_column in KEY_COLUMNS:
            raise ValueError(f"bad item_column {item_column!r}")
        if create and mode == "columns":
            untyped = [c.name for c in cols or [] if c.type is None]
            if cols is None or untyped:
                raise ValueError(
                    "create=1 with mode=columns needs every column's type, e.g. "
                    "columns=user_id:bigint,action:text"
                    + (f" (no type for {', '.join(untyped)})" if untyped else ""))
        if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
            raise ValueError(f"pool must be a positive integer, not {pool!r}")
        keys = tuple(k.strip() for k in upsert.split(",")) if isinstance(upsert, str) else \
            tuple(upsert or ())
        if any(not k for k in keys) or len(set(keys)) != len(keys):
            raise ValueError(f"bad upsert {upsert!r}: expected COLUMN[,COLUMN] (each once)")
        if keys and mode == "columns" and cols is not None:
            unknown = [k for k in keys if k not in {c.name for c in cols}]
            if unknown:
                raise ValueError(f"upsert column {unknown[0]!r} is not one of columns= "
                                 f"({', '.join(c.name for c in cols)})")
        self.upsert = keys
        self.mode = mode
        self.columns = cols
        self.item_column = item_column
        self.rest = rest
        self.create = create
        self.pool = pool

        self._cv = threading.Condition()
        self._idle: list[_Session] = []
        self._open = 0  # sessions idle or in use
        self._closed = False
        self._setup_lock = threading.Lock()  # one CREATE TABLE at a time

    # ------------------------------------------------------------ writing

    def write(self, batch: Batch) -> list[BaseException | None] | None:
        psycopg = self._psycopg
        session = self._acquire()
        keep = False
        try:
            rows, outcomes = session.rows(batch)
            # A first delivery is almost never in the table yet: COPY it straight in,
            # which costs the server half what staging + INSERT ... ON CONFLICT does.
            # If any row is already there (a commit whose answer was lost) or bad, the
            # key or the constraint fails the COPY, nothing of it stays, and the
            # careful path below runs. Retries and replays, which are likely to
            # overlap what is stored, take the careful path at once.
            direct = batch.attempt == 1 and batch.reason != "replay" and not self.upsert
            if rows and direct:
                try:
                    with session.conn.transaction():
                        session.copy(rows, session.direct_sql)
                    rows = []
                except (psycopg.Error, ValueError, TypeError) as ex:
                    if not _item_level(ex):
                        raise
            if rows:
                # Deferred constraints are checked per statement here, or they would
                # only fail the final COMMIT, where no savepoint can isolate the culprit.
                with session.conn.transaction():
                    session.cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
                    self._place(session, rows, outcomes)
            keep = True
        except psycopg.Error as ex:
            raise SinkError(f"PostgreSQL {self._where}: {_message(ex)}{_hint(ex)}") from ex
        finally:
            self._release(session, keep)
        return None if all(o is None for o in outcomes) else outcomes

    def _place(self, session: _Session, rows: list[tuple[int, tuple]],
               outcomes: list[BaseException | None]) -> None:
        """Insert ``rows`` skipping stored keys; bisect in savepoints to isolate bad rows.

        The whole batch goes first: when nothing is wrong with it but some rows
        were stored already, this one statement is all it takes.
        """
        def store(chunk: list[tuple[int, tuple]]) -> None:
            with session.conn.transaction():  # a savepoint: a failure undoes only the chunk
                session.copy(chunk, session.stage_sql)
                session.cur.execute(session.move_sql)

        def refuse(i: int, ex: BaseException) -> None:
            outcomes[i] = PermanentSinkError(f"PostgreSQL refused the item: {_item_message(ex)}")

        isolate(rows, store, _item_level, refuse)

    # ----------------------------------------------------------- the pool

    def _acquire(self) -> _Session:
        with self._cv:
            while True:
                if self._closed:
                    raise SinkError(f"PostgreSQL {self._where}: the sink is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self.pool:
                    self._open += 1
                    break
                self._cv.wait()
        try:
            return self._connect()
        except BaseException:
            with self._cv:
                self._open -= 1
                self._cv.notify()
            raise

    def _release(self, session: _Session, keep: bool) -> None:
        # After any unexpected error the session's state is unknown (a half-done
        # COPY, a changed table under the staging copy): start afresh next time.
        keep = keep and session.healthy()
        with self._cv:
            if keep and not self._closed:
                self._idle.append(session)
                self._cv.notify()
                return
            self._open -= 1
            self._cv.notify()
        session.close()

    def _connect(self) -> _Session:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(**self._params, autocommit=True)
        except psycopg.Error as ex:
            raise SinkError(f"PostgreSQL {self._where}: cannot connect: {_message(ex)}") from ex
        try:
            with self._setup_lock:
                return _Session(self, conn)
        except BaseException as ex:
            conn.close()
            if isinstance(ex, psycopg.Error):
                raise SinkError(f"PostgreSQL {self._where}: {_message(ex)}{_hint(ex)}") from ex
            raise

    def close(self) -> None:
        with self._cv:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cv.notify_all()
        for s in idle:
            s.close()

    def __repr__(self) -> str:
        return f"PostgreSQLSink({self._where!r}, table={self.table!r}, mode={self.mode!r})"


class _Session:
    """One connection with its staging table and statements, made for one sink."""

    def __init__(self, sink: PostgreSQLSink, conn: Any) -> None:
        from psycopg import sql

        self.conn = conn
        self.cur = conn.cursor()
        if sink.create:
            self._create_table(sink)
        types = self._column_types(sink)
        if sink.mode == "jsonb":
            plan = [(sink.item_column, None, "json")]
        else:
            cols = sink.columns
            if cols is None:
                # mode=columns without a list: the table's own columns, but not those
                # that fill themselves (a default, identity or generated value), which
                # an item without that field would otherwise overwrite with NULL.
                cols = [Column(n, n) for n, (_, own) in types.items()
                        if not own and n not in KEY_COLUMNS and n != sink.rest]
                if not cols:
                    raise SinkError(f"table {sink.table} has no column besides "
                                    f"{', '.join(KEY_COLUMNS)} for mode=columns")
            plan = [(c.name, c.field, _kind(types.get(c.name, ("",))[0])) for c in cols]
            if sink.rest:
                plan.append((sink.rest, None, "json"))
        wanted = [*KEY_COLUMNS, *(name for name, _, _ in plan)]
        missing = [n for n in wanted if n not in types]
        if missing:
            raise SinkError(f"table {sink.table} has no column {', '.join(missing)}"
                            + (" (create=1 makes the table)" if not sink.create else ""))
        self.mode = sink.mode
        self.fields = [(field, kind, types[name][0])
                       for name, field, kind in plan if field is not None]
        self.rest_fields = {f for f, _, _ in self.fields} if sink.rest else None
        plain = not sink.rest and not any(kind == "json" for _, kind, _ in self.fields)
        self.fast_fields = [f for f, _, _ in self.fields] if plain else None
        # What each column takes as it is (None is NULL in any column).
        self.fast_types = [_TAKES[kind] | {type(None)} for _, kind, _ in self.fields]
        names = sql.SQL(", ").join(sql.Identifier(n) for n in wanted)
        stage = sql.Identifier(STAGE)
        # The staging table has the target's column types and nothing else (no
        # constraint, index or trigger), so a row fails there only for its own
        # values. Every use empties it again; ON COMMIT DELETE ROWS is the backstop.
        self.cur.execute(sql.SQL(
            "CREATE TEMPORARY TABLE {stage} ON COMMIT DELETE ROWS AS "
            "SELECT {names} FROM {table} WITH NO DATA").format(
                stage=stage, names=names, table=sink._table))
        self.direct_sql = sql.SQL("COPY {table} ({names}) FROM STDIN").format(
            table=sink._table, names=names)
        self.stage_sql = sql.SQL("COPY {stage} ({names}) FROM STDIN").format(
            stage=stage, names=names)
        self.key_fields: list[str] = []
        self.key_json = False
        if not sink.upsert:
            conflict = sql.SQL("ON CONFLICT ({keys}) DO NOTHING").format(
                keys=sql.SQL(", ").join(map(sql.Identifier, KEY_COLUMNS)))
            select = sql.SQL("SELECT {names} FROM moved").format(names=names)
        else:
            keys = self._upsert_keys(sink, plan)
            if sink.create:
                digest = hashlib.blake2b("\0".join(sink.upsert).encode(), digest_size=4).hexdigest()
                self.cur.execute(sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {name} ON {table} "
                                         "({keys})").format(
                    name=sql.Identifier(f"{sink._table_name[:40]}_upsert_{digest}"),
                    table=sink._table, keys=keys))
            # One row per key: DISTINCT ON keeps a batch's last record per key (one
            # statement may not update a row twice); a stored row is replaced unless it
            # holds a later record of the same log, so a redelivered older item never
            # overwrites a newer one. Seqs of different logs say nothing about order.
            select = sql.SQL("SELECT DISTINCT ON ({keys}) {names} FROM moved "
                             "ORDER BY {keys}, _seq DESC").format(keys=keys, names=names)
            conflict = sql.SQL(
                "ON CONFLICT ({keys}) DO UPDATE SET {sets} WHERE {table}._log_id <> "
                "EXCLUDED._log_id OR {table}._seq < EXCLUDED._seq").format(
                    keys=keys, table=sink._table, sets=sql.SQL(", ").join(
                        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(n)) for n in wanted))
        # Several chunks may share one transaction: each takes its rows out of the
        # staging table, or the next chunk would insert them again.
        self.move_sql = sql.SQL(
            "WITH moved AS (DELETE FROM {stage} RETURNING {names}) "
            "INSERT INTO {table} ({names}) {select} {conflict}").format(
                table=sink._table, names=names, stage=stage, select=select, conflict=conflict)

    def _upsert_keys(self, sink: PostgreSQLSink, plan: list[tuple[str, str | None, str]]) -> Any:
        """The key expressions, and the item fields that must hold the key (key_fields)."""
        from psycopg import sql

        if sink.mode == "jsonb":
            self.key_fields = list(sink.upsert)
            self.key_json = True
            return sql.SQL(", ").join(
                sql.SQL("({} -> {})").format(sql.Identifier(sink.item_column),
                                             sql.Literal("$" + k if k.startswith("$") else k))
                for k in sink.upsert)
        fields = {name: field for name, field, _ in plan if field is not None}
        missing = [k for k in sink.upsert if k not in fields]
        if missing:
            raise SinkError(f"upsert column {missing[0]!r} is not a column the sink writes "
                            f"({', '.join(fields)})")
        self.key_fields = [fields[k] for k in sink.upsert]
        self.key_json = False
        return sql.SQL(", ").join(sql.Identifier(k) for k in sink.upsert)

    def _create_table(self, sink: PostgreSQLSink) -> None:
        from psycopg import sql

        if sink.mode == "jsonb":
            defs = [sql.SQL("{} jsonb").format(sql.Identifier(sink.item_column))]
        else:
            assert sink.columns is not None
            defs = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type or ""))
                    for c in sink.columns]
            if sink.rest:
                defs.append(sql.SQL("{} jsonb").format(sql.Identifier(sink.rest)))
        self.cur.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {table} ("
            "_log_id uuid NOT NULL, _seq bigint NOT NULL, {defs}, "
            "PRIMARY KEY (_log_id, _seq))").format(table=sink._table, defs=sql.SQL(", ").join(defs)))

    def _column_types(self, sink: PostgreSQLSink) -> dict[str, tuple[str, bool]]:
        """``{column: (type name, fills itself)}`` of the target table, in column order."""
        from psycopg import sql

        name = sink._table.as_string(self.conn)
        (oid,) = self.cur.execute("SELECT to_regclass(%s)::oid", (name,)).fetchone()
        if oid is None:
            raise SinkError(f"table {sink.table} does not exist (create it, or add create=1 "
                            "to the sink URL)")
        rows = self.cur.execute(sql.SQL(
            "SELECT a.attname, t.typname, a.atthasdef OR a.attidentity <> '' "
            "OR a.attgenerated <> '' FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"),
            (oid,)).fetchall()
        # Duplicates are kept out by this key alone (the first COPY of a batch has no
        # ON CONFLICT): without it, refuse to write rather than duplicate.
        (keyed,) = self.cur.execute(
            "SELECT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = %s AND i.indisunique "
            "AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL "
            "AND i.indnkeyatts = 2 AND (SELECT array_agg(a.attname::text ORDER BY a.attname) "
            "FROM pg_attribute a WHERE a.attrelid = i.indrelid "
            "AND a.attnum = ANY((i.indkey::int2[])[0:1])) = ARRAY['_log_id', '_seq'])",
            (oid,)).fetchone()
        if not keyed:
            raise SinkError(f"table {sink.table} has no primary key or unique index on "
                            "(_log_id, _seq): walbatch relies on it to drop redelivered records "
                            "(ALTER TABLE ... ADD PRIMARY KEY (_log_id, _seq))")
        return {name: (typname, own) for name, typname, own in rows}

    # ---------------------------------------------------------------- rows

    def rows(self, batch: Batch) -> tuple[list[tuple[int, tuple]], list[BaseException | None]]:
        """``(index, row)`` for every record that converts, and the outcomes so far."""
        rows, outcomes = self._rows(batch)
        if self.key_fields:
            keep = []
            for i, row in rows:
                problem = _key_problem(batch[i].item, self.key_fields, self.key_json)
                if problem is None:
                    keep.append((i, row))
                else:
                    outcomes[i] = PermanentSinkError(f"seq {batch[i].seq}: {problem}")
            rows = keep
        return rows, outcomes

    def _rows(self, batch: Batch) -> tuple[list[tuple[int, tuple]], list[BaseException | None]]:
        log_id = batch.log_id
        outcomes: list[BaseException | None] = [None] * len(batch)
        rows: list[tuple[int, tuple]] = []
        if self.mode == "jsonb":
            for i, r in enumerate(batch):
                try:
                    rows.append((i, (log_id, r.seq, dumps(r.item))))
                except (TypeError, ValueError) as ex:
                    outcomes[i] = PermanentSinkError(f"seq {r.seq}: item cannot be stored: {ex}")
            return rows, outcomes
        fields = self.fields
        # The common case first (flat dicts of scalars into non-JSON columns): this
        # loop runs in the flusher, under the GIL the submitters need too.
        fast, fast_types = self.fast_fields, self.fast_types
        for i, r in enumerate(batch):
            item = r.item
            if fast is not None and type(item) is dict:
                values = [item.get(f) for f in fast]
                if all(type(v) in ok for v, ok in zip(values, fast_types, strict=True)):
                    rows.append((i, (log_id, r.seq, *values)))
                    continue
            if not isinstance(item, dict):
                outcomes[i] = PermanentSinkError(
                    f"mode=columns takes dict items; this one is a {type(item).__name__}")
                continue
            try:
                row = [log_id, r.seq]
                for field, kind, typname in fields:
                    row.append(_cell(item, field, kind, typname))
                if self.rest_fields is not None:
                    extra = {k: v for k, v in item.items() if k not in self.rest_fields}
                    row.append(dumps(extra, "item (the rest)") if extra else None)
            except (TypeError, ValueError) as ex:
                outcomes[i] = PermanentSinkError(f"seq {r.seq}: item cannot be stored: {ex}")
                continue
            rows.append((i, tuple(row)))
        return rows, outcomes

    def copy(self, rows: list[tuple[int, tuple]], statement: Any) -> None:
        with self.cur.copy(statement) as copy:
            write_row = copy.write_row
            for _, row in rows:
                write_row(row)

    def healthy(self) -> bool:
        from psycopg.pq import TransactionStatus

        return not self.conn.closed and self.conn.info.transaction_status == TransactionStatus.IDLE

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # closing a broken connection must not mask the real error
            pass


# ------------------------------------------------------------------ values


# Columns whose type stands for one kind of value take only that kind, as it is:
# PostgreSQL would otherwise take the text form of another (True as 't', 5 as '5', bytes
# as '\\x..', a list as JSON text) and read back something else. Other types
# (numbers, timestamps, uuid, enums, ...) take scalars for PostgreSQL to convert by
# the column's type, which is what mode=columns is for.
_TAKES: dict[str, frozenset[type]] = {
    "text": frozenset({str}),
    "bytes": frozenset({bytes}),
    "bool": frozenset({bool}),
    "array": frozenset({list, str}),
    "other": frozenset({str, int, float, bool}),
    "json": frozenset(),
}
_KINDS = {"json": "json", "jsonb": "json", "text": "text", "varchar": "text", "bpchar": "text",
          "citext": "text", "name": "text", "bytea": "bytes", "bool": "bool"}


def _kind(typname: str) -> str:
    return _KINDS.get(typname) or ("array" if typname.startswith("_") else "other")


def _cell(item: dict[Any, Any], field: str, kind: str, typname: str) -> Any:
    if field not in item:
        return None  # an absent field is NULL, in every kind of column
    v = item[field]
    if kind == "json":
        return dumps(v, f"item[{field!r}]")  # a present None is JSON null
    if v is None or type(v) in _TAKES[kind]:
        if kind == "array" and type(v) is list:
            _check_array(v, field, typname)
        return v
    raise TypeError(f"item[{field!r}] is a {type(v).__name__}; column {field!r} has type "
                    f"{typname}, which takes {' or '.join(sorted(t.__name__ for t in _TAKES[kind]))}"
                    " (a json or jsonb column, or rest=, takes any value)")


def _check_array(values: list[Any], field: str, typname: str) -> None:
    for v in values:
        if type(v) is list:
            _check_array(v, field, typname)
        elif v is not None and type(v) not in _TAKES["other"]:
            raise TypeError(f"item[{field!r}] holds a {type(v).__name__}; column {field!r} has "
                            f"the array type {typname}")


def _key_problem(item: Any, fields: list[str], json_key: bool) -> str | None:
    """Why this item has no upsert key, or None. NULL keys never conflict (a row each)."""
    if type(item) is not dict or (json_key and not all(type(k) is str for k in item)):
        return f"upsert={','.join(fields)} needs a dict item" + (" with str keys" if json_key else "")
    for f in fields:
        v = item.get(f)
        if v is None:
            return f"the upsert key {f!r} is missing or None"
        # In jsonb, true is not 1 but 1.0 is, and a container's JSON could equal
        # another's: keys are str or int, so that different keys never share a row.
        if json_key and not (type(v) is str or type(v) is int):
            return f"the upsert key {f!r} is {v!r}: in mode=jsonb a key must be a str or an int"
    return None


# ------------------------------------------------------------------ errors


def _item_level(ex: BaseException) -> bool:
    """Is this error about the rows (retrying them cannot help) rather than the connection?"""
    import psycopg

    sqlstate = getattr(ex, "sqlstate", None)
    if sqlstate:
        return sqlstate[:2] in ITEM_CLASSES
    # Raised by psycopg itself while dumping a row (a NUL in a string, a value its
    # dumper cannot write): about that row.
    return isinstance(ex, (psycopg.DataError, ValueError, TypeError))


def _message(ex: BaseException) -> str:
    text = str(ex).strip()
    return f"{type(ex).__name__}: {text}" if text else type(ex).__name__


def _item_message(ex: BaseException) -> str:
    """The server's message about one row, without the staging table's line numbers."""
    diag = getattr(ex, "diag", None)
    primary = diag.message_primary if diag is not None else None
    if not primary:
        return _message(ex)
    text = f"{type(ex).__name__}: {primary}"
    if diag.message_detail:
        text += f" ({diag.message_detail})"
    copy_column = re.search(r"^COPY [^,]+, line \d+, column ([^:]+):", diag.context or "")
    if copy_column and f"column {copy_column[1]}" not in text:
        text += f" [column {copy_column[1]}]"
    return text


def _hint(ex: BaseException) -> str:
    if getattr(ex, "sqlstate", None) == "42P10":
        return (" (the table needs a unique index on (_log_id, _seq), which walbatch relies on "
                "to drop redelivered records, and with upsert= one on the upsert key: create=1 "
                "makes it)")
    return ""


def _describe(params: Mapping[str, Any]) -> str:
    """``host:port/dbname`` for messages and repr: never the password."""
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port")
    db = params.get("dbname") or params.get("user") or ""
    return f"{host}{':' + str(port) if port else ''}/{db}"


# --------------------------------------------------------------------- URL


def from_url(url: str) -> PostgreSQLSink:
    """``postgresql://user@host:port/db?table=events&columns=a:int,b:text&create=1``.

    walbatch's options (table, columns, mode, item_column, rest, create, pool) are
    taken out of the query; every other parameter goes to libpq (sslmode,
    connect_timeout, options, host=/socket/dir, ...).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError as ex:
        raise ValueError(f"bad PostgreSQL URL: {ex}") from None
    # walbatch's options are taken out; every other parameter goes to libpq verbatim
    # (libpq decodes %XX itself and, unlike a form, keeps "+" as "+").
    options = URLOptions(url, "PostgreSQL", OPTIONS, passthrough=lambda name: True)
    libpq = options.others
    create = options.flag("create", False)
    pool = options.integer("pool", 4, low=1)
    conninfo = urlunsplit(parts._replace(scheme="postgresql", query="&".join(libpq)))
    psycopg = require("psycopg", "postgresql", "PostgreSQL")
    try:
        psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error as ex:
        raise ValueError(f"bad PostgreSQL URL: {str(ex).strip()} (walbatch's own options are "
                         f"{', '.join(OPTIONS)}; the others go to libpq)") from None
    return PostgreSQLSink(conninfo, table=options.text("table", "items") or "items",
                          columns=options.text("columns"), mode=options.text("mode"),
                          item_column=options.text("item_column", "item") or "item",
                          rest=options.text("rest"), create=create, pool=pool,
                          upsert=options.text("upsert"))
