"""The PostgreSQL sink against a real server (started by tests/pg_server.py).

Round trips in both modes, effectively-once on redelivery, table creation, bad
items dead-lettered alone, a server outage survived by retrying, the pool's
bound, the CLI, and kill -9 of a writer mid-delivery.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import msgpack
import pytest
from click.testing import CliRunner
from helpers import WAIT, acking_writer, payload_ok, read_acks
from pg_server import postgres_fixture  # noqa: F401 - the `postgres` fixture

from walbatch import Batch, DeadLettered, DurableBatcher, PermanentSinkError, Record, SinkError, values
from walbatch.sinks import sink_from_url
from walbatch.sinks.postgresql import PostgreSQLSink
from walbatch.values import equal

psycopg = pytest.importorskip("psycopg", reason="pip install 'walbatch[postgresql]'")

LOG_ID = "6f1c2a8e-0000-4000-8000-000000000001"
OTHER_LOG = "6f1c2a8e-0000-4000-8000-000000000002"
RETRY = {"retry_initial_delay": 0.01, "retry_max_delay": 0.1}


def batch(*items, first_seq: int = 1, log_id: str = LOG_ID, reason: str = "size",
          attempt: int = 1) -> Batch:
    return Batch([Record(first_seq + i, item) for i, item in enumerate(items)], log_id, reason,
                 attempt)


@pytest.fixture
def query(postgres):
    """Run SQL on the test server in autocommit; returns the rows (or [] for a command)."""
    conn = [psycopg.connect(postgres.conninfo, autocommit=True)]

    def _query(sql: str, params=()) -> list[tuple]:
        if conn[0].closed:  # a test restarted the server
            conn[0] = psycopg.connect(postgres.conninfo, autocommit=True)
        try:
            cur = conn[0].execute(sql, params)
        except psycopg.OperationalError:
            conn[0] = psycopg.connect(postgres.conninfo, autocommit=True)
            cur = conn[0].execute(sql, params)
        return cur.fetchall() if cur.description else []

    yield _query
    conn[0].close()


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def sinks():
    """Sinks made by a test, closed at teardown even when it fails."""
    made: list[PostgreSQLSink] = []

    def _make(url: str) -> PostgreSQLSink:
        sink = sink_from_url(url)
        made.append(sink)
        return sink

    yield _make
    for s in made:
        s.close()


def wait_for(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------- round trips


def test_any_item_goes_whole_to_a_jsonb_column(postgres, sinks, query, table):
    sink = sinks(postgres.url(table=table, create="1"))
    items = [{"name": "ada", "tags": ["x", {"y": 1}]}, "text", [1, 2.5], 7, None, True,
             b"\x00\xff", {"k": b"\x01"}]
    assert sink.write(batch(*items)) is None
    cols = query("SELECT column_name, data_type FROM information_schema.columns "
                 "WHERE table_name = %s ORDER BY ordinal_position", (table,))
    assert cols == [("_log_id", "uuid"), ("_seq", "bigint"), ("item", "jsonb")]
    rows = query(f"SELECT _log_id::text, _seq, item FROM {table} ORDER BY _seq")
    assert [(r[0], r[1]) for r in rows] == [(LOG_ID, s) for s in range(1, 9)]
    assert [r[2] for r in rows] == [
        {"name": "ada", "tags": ["x", {"y": 1}]}, "text", [1, 2.5], 7, None, True,
        {"$base64": "AP8="}, {"k": {"$base64": "AQ=="}}]


def test_dict_fields_go_to_typed_columns(postgres, sinks, query, table):
    sink = sinks(postgres.url(table=table, create="1", rest="extra",
                              columns="user_id:bigint,action:text,amount:numeric(10,2),"
                                      "at=ts:double precision,meta:jsonb"))
    assert sink.write(batch(
        {"user_id": 1, "action": "login", "amount": 2.5, "ts": 1.25, "meta": {"a": [1]}},
        {"user_id": 2, "meta": "plain string", "other": 3, "more": [None]},  # missing -> NULL
    )) is None
    rows = query(f"SELECT _seq, user_id, action, amount::text, at, meta, extra FROM {table} "
                 "ORDER BY _seq")
    assert rows == [(1, 1, "login", "2.50", 1.25, {"a": [1]}, None),
                    (2, 2, None, None, None, "plain string", {"other": 3, "more": [None]})]


def test_jsonb_reads_back_equal_under_the_value_mapping(postgres, sinks, query, table):
    # jsonb kept one of {1: .., "1": ..}, turned -0.0 into 0.0 and 1e16 into an int, and
    # stored bytes and a user's {"$base64": ...} alike: each reads back as itself now.
    items = [{1: "a", "1": "b"}, -0.0, 1e16, 10**16, b"ab", {"$base64": "YWI="}, float("nan"),
             {"big": 2**64 - 1, "small": 5e-324, "x": 1e-05}, msgpack.ExtType(3, b"\x00")]
    sink = sinks(postgres.url(table=table, create="1"))
    assert sink.write(batch(*items)) is None
    texts = [t for (t,) in query(f"SELECT item::text FROM {table} ORDER BY _seq")]
    assert equal([values.loads(t) for t in texts], items)
    assert len(set(texts)) == len(items)
    conn = psycopg.connect(postgres.conninfo)  # psycopg can read jsonb under the mapping too
    try:
        psycopg.types.json.set_json_loads(values.loads, conn)
        got = [v for (v,) in conn.execute(f"SELECT item FROM {table} ORDER BY _seq").fetchall()]
    finally:
        conn.close()
    assert equal(got, items)


def test_columns_take_only_their_own_kind_of_value(postgres, sinks, query, table):
    query(f"CREATE TABLE {table} (_log_id uuid, _seq bigint, t text, b bytea, f boolean, "
          f"n int, ts timestamptz, a int[], j jsonb, PRIMARY KEY (_log_id, _seq))")
    sink = sinks(postgres.url(table=table, mode="columns"))
    good = {"t": "5", "b": b"\x01", "f": True, "n": 7, "ts": "2024-01-01T00:00:00Z",
            "a": [1, None, 3], "j": None}
    refused = [{"t": 5}, {"t": True}, {"t": {"x": 1}}, {"t": [1]}, {"b": "bytes?"},
               {"f": 1}, {"n": [1]}, {"a": [{"x": 1}]}, {"t": b"\x01"}]
    outcomes = sink.write(batch(good, *refused, {"n": "12"}, {}))
    assert outcomes is not None and outcomes[0] is None and outcomes[-2:] == [None, None]
    for item, out in zip(refused, outcomes[1:-2], strict=True):
        assert isinstance(out, PermanentSinkError), item
        assert "which takes" in str(out) or "array type" in str(out), out
    rows = query(f"SELECT _seq, t, b, f, n, ts IS NOT NULL, a, j::text IS NULL, j::text "
                 f"FROM {table} ORDER BY _seq")
    # A present None in a jsonb column is JSON null; a missing field is SQL NULL.
    assert rows == [(1, "5", b"\x01", True, 7, True, [1, None, 3], False, "null"),
                    (11, None, None, None, 12, False, None, True, None),
                    (12, None, None, None, None, False, None, True, None)]


def test_mode_columns_takes_the_tables_own_columns(postgres, sinks, query, table):
    query(f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY, _log_id uuid, "
          f"_seq bigint, name text, score int, created timestamptz NOT NULL DEFAULT now(), "
          f"PRIMARY KEY (_log_id, _seq))")
    sink = sinks(postgres.url(table=table, mode="columns"))
    assert sink.write(batch({"name": "ada", "score": 3, "ignored": 1}, {"name": "bob"})) is None
    rows = query(f"SELECT id, _seq, name, score, created IS NOT NULL FROM {table} ORDER BY _seq")
    # The identity and the defaulted column fill themselves: no NULL forced into them.
    assert rows == [(1, 1, "ada", 3, True), (2, 2, "bob", None, True)]


def test_a_redelivery_inserts_nothing_twice(postgres, sinks, query, table):
    sink = sinks(postgres.url(table=table, create="1", columns="v:int"))
    sink.write(batch({"v": 1}, {"v": 2}, {"v": 3}))
    sink.write(batch({"v": 1}, {"v": 2}, {"v": 3}))  # the same batch again
    sink.write(batch({"v": 20}, {"v": 30}, {"v": 4}, first_seq=2))  # overlapping: first wins
    sink.write(batch({"v": 1}, log_id=OTHER_LOG))  # same seq, another log: a distinct record
    sink.write(batch({"v": 40}, {"v": 5}, first_seq=4, reason="replay"))
    sink.write(batch({"v": 50}, {"v": 6}, first_seq=5, attempt=3))
    outcomes = sink.write(batch({"v": 60}, {"v": "bad"}, {"v": 8}, first_seq=6))
    assert outcomes is not None and [o is None for o in outcomes] == [True, False, True]
    rows = query(f"SELECT _log_id::text, _seq, v FROM {table} ORDER BY _log_id, _seq")
    assert rows == [(LOG_ID, 1, 1), (LOG_ID, 2, 2), (LOG_ID, 3, 3), (LOG_ID, 4, 4),
                    (LOG_ID, 5, 5), (LOG_ID, 6, 6), (LOG_ID, 8, 8), (OTHER_LOG, 1, 1)]


def test_create_makes_the_table_with_its_key(postgres, sinks, query, table):
    sink = sinks(postgres.url(table=f"public.{table}", create="1", columns="a:text"))
    sink.write(batch({"a": "x"}))
    key = query("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary "
                "ORDER BY a.attnum", (table,))
    assert key == [("_log_id",), ("_seq",)]
    # A second sink with create=1 finds the table there and uses it.
    sinks(postgres.url(table=table, create="1", columns="a:text")).write(batch({"a": "y"}, first_seq=2))
    assert query(f"SELECT _seq, a FROM {table} ORDER BY _seq") == [(1, "x"), (2, "y")]


def test_a_missing_table_is_transient_and_the_next_write_finds_it(postgres, sinks, query, table):
    sink = sinks(postgres.url(table=table))
    with pytest.raises(SinkError, match=f"table {table} does not exist") as err:
        sink.write(batch("x"))
    assert err.value.retryable
    query(f"CREATE TABLE {table} (_log_id uuid, _seq bigint, item jsonb, PRIMARY KEY (_log_id, _seq))")
    assert sink.write(batch("x")) is None
    assert query(f"SELECT item FROM {table}") == [("x",)]


@pytest.mark.parametrize("key", [
    "",                                                         # no key at all
    "CREATE UNIQUE INDEX ON {t} (_log_id, _seq, item)",         # wider: duplicates get in
    "CREATE UNIQUE INDEX ON {t} (_log_id, _seq) WHERE _seq > 5",  # partial
    "ALTER TABLE {t} ADD UNIQUE (_log_id, _seq) DEFERRABLE",    # ON CONFLICT cannot use it
])
def test_a_table_without_the_key_is_a_clear_transient_error(postgres, sinks, query, table, key):
    query(f"CREATE TABLE {table} (_log_id uuid, _seq bigint, item jsonb)")
    if key:
        query(key.format(t=table))
    with pytest.raises(SinkError, match=r"primary key or unique index on \(_log_id, _seq\)") as err:
        sinks(postgres.url(table=table)).write(batch("x"))
    assert err.value.retryable
    assert query(f"SELECT count(*) FROM {table}") == [(0,)]


def test_a_unique_index_in_either_column_order_is_the_key(postgres, sinks, query, table):
    query(f"CREATE TABLE {table} (_log_id text, _seq bigint, item jsonb)")
    query(f"CREATE UNIQUE INDEX ON {table} (_seq, _log_id)")
    sink = sinks(postgres.url(table=table))
    sink.write(batch("x", "y"))
    sink.write(batch("x", "y"))
    assert query(f"SELECT _seq, item FROM {table} ORDER BY _seq") == [(1, "x"), (2, "y")]


# ------------------------------------------------------------------ errors


def test_bad_items_are_refused_one_by_one_and_the_rest_commit(postgres, sinks, query, table):
    query(f"CREATE TABLE {table} (_log_id text, _seq bigint, n int CHECK (n >= 0), "
          f"s text NOT NULL, u text UNIQUE, PRIMARY KEY (_log_id, _seq))")
    sink = sinks(postgres.url(table=table, columns="n,s,u"))
    items = [{"n": i, "s": "ok", "u": f"u{i}"} for i in range(40)]
    bad = {3: {"n": "three", "s": "x"},            # not an int
           7: {"n": -1, "s": "x"},                 # CHECK
           8: {"n": 1},                            # NOT NULL
           20: {"n": 1, "s": "nul\x00"},           # psycopg refuses NUL
           21: {"n": 2**40, "s": "x"},             # out of range
           30: {"n": 1, "s": "x", "u": "u29"},     # UNIQUE against an item in the batch
           31: "not a dict"}
    items = [bad.get(i, it) for i, it in enumerate(items)]
    outcomes = sink.write(batch(*items))
    assert outcomes is not None and len(outcomes) == 40
    refused = {i: str(o) for i, o in enumerate(outcomes) if o is not None}
    assert set(refused) == set(bad)
    assert all(isinstance(outcomes[i], PermanentSinkError) for i in bad)
    assert "invalid input syntax for type integer" in refused[3] and "column n" in refused[3]
    assert "check constraint" in refused[7]
    assert "not-null" in refused[8] or "null value" in refused[8]
    assert "NUL" in refused[20]
    assert "out of range" in refused[21]
    assert "duplicate key" in refused[30]
    assert "dict" in refused[31]
    stored = query(f"SELECT _seq FROM {table} ORDER BY _seq")
    assert [s for (s,) in stored] == [i + 1 for i in range(40) if i not in bad]


def test_a_deferred_constraint_refuses_only_its_items(postgres, sinks, query, table):
    query(f"CREATE TABLE {table}_p (id int PRIMARY KEY); INSERT INTO {table}_p VALUES (1), (2)")
    query(f"CREATE TABLE {table} (_log_id uuid, _seq bigint, p int REFERENCES {table}_p "
          f"DEFERRABLE INITIALLY DEFERRED, PRIMARY KEY (_log_id, _seq))")
    sink = sinks(postgres.url(table=table, columns="p"))
    outcomes = sink.write(batch({"p": 1}, {"p": 9}, {"p": 2}))  # the FK fails only at COMMIT
    assert outcomes is not None and outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentSinkError) and "foreign key" in str(outcomes[1])
    assert query(f"SELECT _seq, p FROM {table} ORDER BY _seq") == [(1, 1), (3, 2)]


def test_a_trigger_that_raises_refuses_only_its_items(postgres, sinks, query, table):
    # A validation trigger's RAISE EXCEPTION is SQLSTATE P0001: about the row, like a
    # CHECK. It used to be retried forever, holding back every later item.
    query(f"CREATE TABLE {table} (_log_id text, _seq bigint, n int, PRIMARY KEY (_log_id, _seq))")
    query(f"CREATE FUNCTION {table}_check() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
          f"IF NEW.n < 0 THEN RAISE EXCEPTION 'n must not be negative, got %%', NEW.n; END IF; "
          f"RETURN NEW; END $$")
    query(f"CREATE TRIGGER {table}_check BEFORE INSERT ON {table} "
          f"FOR EACH ROW EXECUTE FUNCTION {table}_check()")
    sink = sinks(postgres.url(table=table, columns="n"))
    outcomes = sink.write(batch({"n": 1}, {"n": -5}, {"n": 3}))
    assert outcomes is not None and outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentSinkError)
    assert "n must not be negative, got -5" in str(outcomes[1])
    assert query(f"SELECT _seq, n FROM {table} ORDER BY _seq") == [(1, 1), (3, 3)]


def test_a_trigger_pausing_writes_with_a_transient_sqlstate_is_retried(postgres, sinks, query, table):
    query(f"CREATE TABLE {table} (_log_id text, _seq bigint, n int, PRIMARY KEY (_log_id, _seq))")
    query(f"CREATE FUNCTION {table}_pause() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
          f"RAISE EXCEPTION 'paused for maintenance' USING ERRCODE = 'object_not_in_prerequisite_state';"
          f" END $$")
    query(f"CREATE TRIGGER {table}_pause BEFORE INSERT ON {table} "
          f"FOR EACH ROW EXECUTE FUNCTION {table}_pause()")
    sink = sinks(postgres.url(table=table, columns="n"))
    with pytest.raises(SinkError, match="paused for maintenance") as info:
        sink.write(batch({"n": 1}, {"n": 2}))
    assert info.value.retryable
    query(f"DROP TRIGGER {table}_pause ON {table}")
    assert sink.write(batch({"n": 1}, {"n": 2})) is None
    assert query(f"SELECT n FROM {table} ORDER BY _seq") == [(1,), (2,)]


def test_an_item_too_deep_for_json_is_refused_alone(postgres, sinks, query, table):
    deep: object = 1
    for _ in range(1000):  # msgpack holds it; JSON sinks take 512 levels (docs/values.md)
        deep = [deep]
    sink = sinks(postgres.url(table=table, create="1"))
    outcomes = sink.write(batch({"n": 1}, deep, {"n": 3}))
    assert outcomes is not None and outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentSinkError) and "nested deeper" in str(outcomes[1])
    assert [s for (s,) in query(f"SELECT _seq FROM {table} ORDER BY _seq")] == [1, 3]


def test_through_a_batcher_only_bad_items_reach_the_dead_letters(make, postgres, query, table):
    query(f"CREATE TABLE {table} (_log_id uuid, _seq bigint, n int CHECK (n >= 0), "
          f"PRIMARY KEY (_log_id, _seq))")
    b = make(postgres.url(table=table, columns="n"))
    items = [{"n": i} for i in range(30)]
    items[5], items[17] = {"n": "five"}, {"n": -17}
    receipts = b.submit_many(items)
    for i in (5, 17):
        with pytest.raises(DeadLettered):
            receipts[i].wait(WAIT)
    b.flush(WAIT)
    dead = b.dead_letters.list()
    assert [(d.seq, d.item) for d in dead] == [(receipts[5].seq, {"n": "five"}),
                                              (receipts[17].seq, {"n": -17})]
    assert "invalid input syntax" in dead[0].error and "check constraint" in dead[1].error
    assert all(d.error_type == "PermanentSinkError" for d in dead)
    stats = b.stats()
    assert (stats.delivered, stats.dead_lettered, stats.pending) == (28, 2, 0)
    rows = query(f"SELECT _log_id::text, _seq, n FROM {table} ORDER BY _seq")
    assert [r[1:] for r in rows] == [(receipts[i].seq, i) for i in range(30) if i not in (5, 17)]
    assert {r[0] for r in rows} == {b.log_id}


def test_a_stopped_server_is_waited_out_and_nothing_is_lost(make, postgres, query, table):
    b = make(postgres.url(table=table, create="1", columns="i:int"), **RETRY)
    b.submit_many([{"i": i} for i in range(50)])
    b.flush(WAIT)
    postgres.stop()
    try:
        before = b.stats().retries
        receipts = [b.submit({"i": i}) for i in range(50, 80)]  # acknowledged: the log has them
        b.submit_many([{"i": i} for i in range(80, 100)])
        wait_for(lambda: b.stats().retries >= before + 3, "retries against the stopped server")
        assert not any(r.delivered for r in receipts)
        assert "PostgreSQL" in (b.stats().last_error or "")
    finally:
        postgres.start()
    b.flush(WAIT)
    stats = b.stats()
    assert (stats.delivered, stats.dead_lettered, stats.pending) == (100, 0, 0)
    rows = query(f"SELECT i FROM {table} ORDER BY _seq")
    assert [i for (i,) in rows] == list(range(100))


def test_a_connection_killed_by_the_server_is_replaced(postgres, sinks, query, table):
    sink = sinks(postgres.url(table=table, create="1", application_name=table))
    sink.write(batch("a"))
    (killed,) = query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = %s", (table,))
    assert killed == (True,)
    with pytest.raises(SinkError) as err:  # the first write learns that the connection is gone
        sink.write(batch("b", first_seq=2))
    assert err.value.retryable and isinstance(err.value.__cause__, psycopg.OperationalError)
    assert sink.write(batch("b", first_seq=2)) is None  # and the next one reconnects
    assert query(f"SELECT _seq, item FROM {table} ORDER BY _seq") == [(1, "a"), (2, "b")]


# ------------------------------------------------------------ concurrency


def connections(query, app: str) -> int:
    return query("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,))[0][0]


def test_concurrent_writes_share_a_bounded_pool(postgres, sinks, query, table):
    sink = sinks(postgres.url(table=table, create="1", pool="3", application_name=table))
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(t: int) -> None:
        try:
            start.wait()
            for k in range(10):
                first = 1 + (t * 10 + k) * 50
                sink.write(batch(*[{"t": t, "k": k}] * 50, first_seq=first))
        except BaseException as ex:  # reported by the main thread
            errors.append(ex)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT * 3)
    assert not errors
    assert query(f"SELECT count(*), count(DISTINCT _seq), min(_seq), max(_seq) FROM {table}") == [
        (4000, 4000, 1, 4000)]
    assert 2 <= connections(query, table) <= 3  # several in use at once, never past the bound
    sink.close()
    wait_for(lambda: connections(query, table) == 0, "close() to close the connections")


def test_a_batcher_with_flush_concurrency_delivers_everything_once(make, postgres, query, table):
    b = make(postgres.url(table=table, create="1", columns="t:int,k:int"), flush_concurrency=4,
             max_items=50)

    def submitter(t: int) -> None:
        for k in range(100):
            b.submit({"t": t, "k": k})

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT * 3)
    b.submit_many([{"t": 9, "k": k} for k in range(1000)])
    b.flush(WAIT)
    rows = query(f"SELECT t, count(*), count(DISTINCT k) FROM {table} GROUP BY t ORDER BY t")
    assert rows == [(0, 100, 100), (1, 100, 100), (2, 100, 100), (3, 100, 100), (9, 1000, 1000)]
    assert b.stats().delivered == 1400


# -------------------------------------------------------------- URL, CLI


@pytest.mark.parametrize("query_string, message", [
    ("mode=csv", "bad mode 'csv'"),
    ("create=maybe", "create='maybe'"),
    ("pool=0", "pool=0 is out of range"),
    ("table=", "table= is empty"),
    ("table=a.b.c", "bad table 'a.b.c'"),
    ("columns=a,,b", "bad column ''"),
    ("columns=a:", "bad column 'a:'"),
    ("columns=_seq", "identity"),
    ("columns=a,a", "named twice"),
    ("columns=a:text;drop", "bad type"),
    ("create=1&columns=a,b:int", "no type for a"),
    ("mode=jsonb&columns=a", "mode=jsonb"),
    ("mode=jsonb&rest=x", "mode=jsonb"),
    ("mode=columns&item_column=x", "item_column= is for mode=jsonb"),
    ("create=1&mode=columns", "create=1 with mode=columns"),
    ("bogus=1", "bogus"),
    ("table=events&table=other", "table given more than once"),
])
def test_a_bad_url_option_is_a_value_error_naming_it(query_string, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        sink_from_url(f"postgresql://u@localhost:5432/db?{query_string}")


def test_a_bad_port_is_a_value_error():
    with pytest.raises(ValueError, match="bad PostgreSQL URL"):
        sink_from_url("postgres://u@localhost:port/db")


def test_the_url_passes_libpq_parameters_through_and_hides_the_password(postgres, sinks, query,
                                                                        table):
    url = postgres.url(table=table, create="1", application_name=table,
                       options="-c search_path=walbatch_s")
    query("CREATE SCHEMA IF NOT EXISTS walbatch_s")
    sink = sinks(url.replace("walbatch@", "walbatch:s3cret@"))
    sink.write(batch("x"))
    assert query(f"SELECT item FROM walbatch_s.{table}") == [("x",)]
    assert "s3cret" not in repr(sink) and str(postgres.port) in repr(sink)


def test_importing_walbatch_does_not_import_psycopg():
    code = "import sys, walbatch, walbatch.sinks, walbatch.cli; print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_walbatch_replay_delivers_a_log_to_postgresql(postgres, query, table, tmp_path):
    from walbatch.cli import cli

    with DurableBatcher(tmp_path / "log", None) as writer:  # a writer only: no sink
        writer.submit_many([{"n": i} for i in range(25)])
    url = postgres.url(table=table, create="1", columns="n:int")
    for _ in range(2):  # a second replay finds nothing new to deliver
        result = CliRunner().invoke(cli, ["replay", "--data-dir", str(tmp_path / "log"),
                                          "--sink", url])
        assert result.exit_code == 0, result.output
    assert "delivered 0 item(s)" in result.output
    assert query(f"SELECT n FROM {table} ORDER BY _seq") == [(i,) for i in range(25)]


# ------------------------------------------------------------------ kill -9

KILL_OPTS = dict(max_delay=0.005, max_items=50, checkpoint_interval=0.001, flush_concurrency=2,
                 retry_initial_delay=0.01, retry_max_delay=0.1)

WRITER = acking_writer(KILL_OPTS)


def test_kill_9_mid_delivery_loses_and_duplicates_nothing(postgres, query, table, tmp_path):
    log_dir, acks = str(tmp_path / "log"), str(tmp_path / "acks")
    url = postgres.url(table=table, create="1", columns="id:text,p:text")
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    for cycle in range(5):
        child = subprocess.Popen([sys.executable, "-c", WRITER, log_dir, url, acks, str(cycle)])
        try:
            # Wait until this child delivers, so the kill lands mid-stream and not at start-up.
            wait_for(lambda cycle=cycle: os.path.exists(f"{acks}.{cycle}.0") and query(
                f"SELECT to_regclass('{table}') IS NOT NULL")[0][0] and query(
                f"SELECT 1 FROM {table} WHERE id LIKE %s LIMIT 1", (f"{cycle}-%",)),
                f"cycle {cycle} to deliver (seed {seed})", timeout=30)
            time.sleep(rng.random() * 0.4)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
    with DurableBatcher(log_dir, url, **KILL_OPTS) as b:
        b.flush(60)
        stats = b.stats()
    acked = read_acks(acks)
    rows = query(f"SELECT id, p FROM {table}")
    ids = [r[0] for r in rows]
    assert len(acked) > 500, f"too little load to mean anything (seed {seed})"
    assert acked <= set(ids), f"acknowledged but missing (seed {seed}): {sorted(acked - set(ids))[:5]}"
    assert len(ids) == len(set(ids)), f"duplicated rows (seed {seed})"
    assert all(payload_ok(item_id, p) for item_id, p in rows)  # each row has its own payload
    assert stats.submitted == stats.delivered + stats.dead_lettered + stats.pending
    assert stats.pending == 0 and stats.dead_lettered == 0
