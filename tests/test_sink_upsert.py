"""``?upsert=KEY[,KEY]`` on SQLite and PostgreSQL: one row per key, the highest seq wins.

A record replaces its key's row unless the row holds a later record of the same log,
so redeliveries (a retry, a replay after a crash, batches finishing out of order
under flush_concurrency) never bring an older item back.
"""

from __future__ import annotations

import sqlite3
import uuid

import pytest
from helpers import WAIT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_server import postgres_fixture  # noqa: F401 - the `postgres` fixture
from value_space import examples

from walbatch import Batch, DeadLettered, PermanentSinkError, Record, values
from walbatch.sinks import sink_from_url
from walbatch.sinks.sqlite import SQLiteSink
from walbatch.values import equal

LOG = "6f1c2a8e-0000-4000-8000-000000000001"
OTHER = "6f1c2a8e-0000-4000-8000-000000000002"


def batch(records: list[tuple[int, object]], log_id: str = LOG, attempt: int = 1) -> Batch:
    return Batch([Record(seq, item) for seq, item in records], log_id, "size", attempt)


def sqlite_rows(db, table: str = "items") -> dict:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(f"SELECT _log_id, _seq, item FROM {table}").fetchall()
    finally:
        conn.close()
    return {(log_id, seq): values.loads(item) for log_id, seq, item in rows}


# ------------------------------------------------------------------- SQLite


def test_sqlite_one_row_per_key_and_the_highest_seq_wins(tmp_path):
    db = tmp_path / "out.db"
    sink = sink_from_url(f"sqlite:///{db}?upsert=user")
    try:
        assert sink.write(batch([(1, {"user": 1, "v": "a"}), (2, {"user": 2, "v": "b"}),
                                 (3, {"user": 1, "v": "c"})])) is None
        # a retry of an older batch, then a replay overlapping both
        assert sink.write(batch([(1, {"user": 1, "v": "a"})], attempt=2)) is None
        assert sink.write(batch([(2, {"user": 2, "v": "b"}), (3, {"user": 1, "v": "c"})])) is None
        assert sink.write(batch([(4, {"user": "1", "v": "str key"})])) is None  # "1" is not 1
    finally:
        sink.close()
    assert sqlite_rows(db) == {(LOG, 3): {"user": 1, "v": "c"}, (LOG, 2): {"user": 2, "v": "b"},
                               (LOG, 4): {"user": "1", "v": "str key"}}


def test_sqlite_a_later_batch_finishing_first_is_not_undone(tmp_path):
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db), upsert=["tenant", "user"])
    try:
        sink.write(batch([(9, {"tenant": "t", "user": 1, "v": 9})]))
        sink.write(batch([(5, {"tenant": "t", "user": 1, "v": 5}), (6, {"tenant": "u", "user": 1})]))
        sink.write(batch([(7, {"tenant": "t", "user": 1, "v": 7})], log_id=OTHER))  # another log
    finally:
        sink.close()
    assert sqlite_rows(db) == {(OTHER, 7): {"tenant": "t", "user": 1, "v": 7},
                               (LOG, 6): {"tenant": "u", "user": 1}}


@pytest.mark.parametrize("item", [{"v": 1}, {"user": None}, {"user": True}, {"user": 1.0},
                                  {"user": [1]}, {"user": b"1"}, {"user": 2**63}, "text",
                                  {1: "int key", "user": 1}])
def test_sqlite_an_item_without_a_usable_key_is_refused_alone(tmp_path, item):
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db), upsert=["user"])
    try:
        outcomes = sink.write(batch([(1, {"user": 1}), (2, item), (3, {"user": 3})]))
    finally:
        sink.close()
    assert outcomes is not None and outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentSinkError) and "upsert" in str(outcomes[1])
    assert sorted(seq for _, seq in sqlite_rows(db)) == [1, 3]


def test_sqlite_upsert_refuses_a_table_with_several_rows_per_key(tmp_path):
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db))
    sink.write(batch([(1, {"user": 1}), (2, {"user": 1})]))
    sink.close()
    with pytest.raises(ValueError, match="several rows per upsert key"):
        SQLiteSink(str(db), upsert=["user"])


@pytest.mark.parametrize("url,message", [
    ("upsert=", "upsert= is empty"),
    ("upsert=a,a", "names a field twice"),
    ('upsert=a"b', "without quotes"),
])
def test_sqlite_bad_upsert_options(tmp_path, url, message):
    with pytest.raises(ValueError, match=message):
        sink_from_url(f"sqlite:///{tmp_path}/x.db?{url}")


def test_sqlite_upsert_through_a_batcher(make, tmp_path):
    db = tmp_path / "out.db"
    b = make(f"sqlite:///{db}?upsert=user", max_items=3, flush_concurrency=3)
    receipts = b.submit_many([{"user": i % 4, "n": i} for i in range(40)] + [{"n": "no key"}])
    with pytest.raises(DeadLettered, match="upsert key 'user' is missing"):
        receipts[40].wait(WAIT)
    b.flush(WAIT)
    assert {item["user"]: item["n"] for item in sqlite_rows(db).values()} == {
        0: 36, 1: 37, 2: 38, 3: 39}


# A model: deliveries of (seq, key, value) in any order and grouping, with repeats, as
# retries, replays and concurrent batches produce them. The table must end holding, per
# key, the item of the highest seq delivered.
records = st.lists(st.tuples(st.sampled_from(["a", "b", 1, 2, "1"]), st.integers(0, 9)),
                   min_size=1, max_size=12)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[tuple[int, dict]], list[list[int]]]:
    recs = [(seq + 1, {"k": key, "v": v}) for seq, (key, v) in enumerate(draw(records))]
    rounds = draw(st.lists(st.lists(st.sampled_from(range(len(recs))), min_size=1, max_size=6),
                           min_size=1, max_size=6))
    return recs, rounds


def expected(recs: list[tuple[int, dict]], rounds: list[list[int]]) -> dict:
    best: dict = {}
    for r in rounds:
        for i in r:
            seq, item = recs[i]
            if item["k"] not in best or best[item["k"]][0] < seq:
                best[item["k"]] = (seq, item)
    return {(LOG, seq): item for seq, item in best.values()}


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries())
def test_sqlite_model_the_highest_delivered_seq_wins(tmp_path_factory, drawn):
    recs, rounds = drawn
    db = tmp_path_factory.mktemp("upsert") / "out.db"
    sink = SQLiteSink(str(db), upsert=["k"])
    try:
        for r in rounds:
            # a batch holds its records in seq order, each once
            assert sink.write(batch([recs[i] for i in sorted(set(r))])) is None
    finally:
        sink.close()
    assert sqlite_rows(db) == expected(recs, rounds)


# --------------------------------------------------------------- PostgreSQL

psycopg = pytest.importorskip("psycopg", reason="pip install 'walbatch[postgresql]'")


@pytest.fixture
def pg(postgres):
    conn = psycopg.connect(postgres.conninfo, autocommit=True)
    made = []

    def sink(**params: str):
        s = sink_from_url(postgres.url(**params))
        made.append(s)
        return s

    yield sink, conn
    for s in made:
        s.close()
    conn.close()


def pg_rows(conn, table: str) -> dict:
    rows = conn.execute(f"SELECT _log_id::text, _seq, item::text FROM {table}").fetchall()
    return {(log_id, seq): values.loads(item) for log_id, seq, item in rows}


def test_postgresql_jsonb_one_row_per_key_and_the_highest_seq_wins(pg):
    sink, conn = pg
    table = f"u_{uuid.uuid4().hex[:10]}"
    s = sink(table=table, create="1", upsert="user")
    # the first delivery of a batch with one key twice: one statement, one row
    assert s.write(batch([(1, {"user": 1, "v": "a"}), (2, {"user": 2, "v": "b"}),
                          (3, {"user": 1, "v": "c"})])) is None
    assert s.write(batch([(1, {"user": 1, "v": "a"})], attempt=2)) is None
    assert s.write(batch([(2, {"user": 2, "v": "b"}), (3, {"user": 1, "v": "c"})])) is None
    assert s.write(batch([(4, {"user": "1", "v": "str key"}), (5, {"user": 2, "v": "e"})],
                         log_id=OTHER)) is None
    assert pg_rows(conn, table) == {(LOG, 3): {"user": 1, "v": "c"},
                                    (OTHER, 5): {"user": 2, "v": "e"},
                                    (OTHER, 4): {"user": "1", "v": "str key"}}


def test_postgresql_columns_upsert_and_refused_keys(pg):
    sink, conn = pg
    table = f"u_{uuid.uuid4().hex[:10]}"
    s = sink(table=table, create="1", columns="user_id:bigint,name:text", upsert="user_id")
    outcomes = s.write(batch([(1, {"user_id": 7, "name": "a"}), (2, {"name": "no key"}),
                              (3, {"user_id": 7, "name": "b"}), (4, {"user_id": None}),
                              (5, {"user_id": 8, "name": "c"})]))
    assert outcomes is not None and [o is None for o in outcomes] == [True, False, True, False, True]
    assert all("upsert key 'user_id' is missing or None" in str(outcomes[i]) for i in (1, 3))
    assert s.write(batch([(1, {"user_id": 7, "name": "a"})], attempt=2)) is None  # older: kept out
    rows = conn.execute(f"SELECT _seq, user_id, name FROM {table} ORDER BY user_id").fetchall()
    assert rows == [(3, 7, "b"), (5, 8, "c")]


def test_postgresql_upsert_without_its_index_says_how_to_make_it(pg):
    sink, conn = pg
    table = f"u_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE TABLE {table} (_log_id uuid, _seq bigint, item jsonb, "
                 "PRIMARY KEY (_log_id, _seq))")
    s = sink(table=table, upsert="user")
    with pytest.raises(Exception, match="create=1 makes it") as info:
        s.write(batch([(1, {"user": 1})]))
    assert getattr(info.value, "retryable", False)


@settings(max_examples=examples(30), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries())
def test_postgresql_model_the_highest_delivered_seq_wins(pg, drawn):
    sink, conn = pg
    recs, rounds = drawn
    table = f"u_{uuid.uuid4().hex[:10]}"
    s = sink(table=table, create="1", upsert="k")
    for n, r in enumerate(rounds):
        assert s.write(batch([recs[i] for i in sorted(set(r))], attempt=1 + n % 2)) is None
    assert equal(pg_rows(conn, table), expected(recs, rounds))
