"""Built-in sinks and sink resolution: sqlite, file, module:function, errors."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading

import pytest
from helpers import WAIT

from walbatch import Batch, DeadLettered, DurableBatcher, Record
from walbatch.sinks import FunctionSink, resolve_sink, sink_from_url
from walbatch.sinks.file import FileSink
from walbatch.sinks.sqlite import SQLiteSink

LOG_ID = "6f1c2a8e-0000-4000-8000-000000000001"


def batch(*items, first_seq: int = 1, log_id: str = LOG_ID) -> Batch:
    return Batch([Record(first_seq + i, item) for i, item in enumerate(items)], log_id, "size")


def query(db_path, sql: str, params=()) -> list[tuple]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def columns(db_path, table: str) -> set[str]:
    return {row[1] for row in query(db_path, f"PRAGMA table_info({table})")}


# ----------------------------------------------------------------- sqlite


def test_sqlite_sink_dict_items_become_columns(tmp_path):
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db))
    try:
        sink.write(batch({"name": "ada", "age": 36}, {"name": "bob", "tags": ["x", "y"]}))
    finally:
        sink.close()
    assert {"_log_id", "_seq", "name", "age", "tags"} <= columns(db, "items")
    rows = query(db, "SELECT _log_id, _seq, name, age, tags FROM items ORDER BY _seq")
    assert rows == [(LOG_ID, 1, "ada", 36, None), (LOG_ID, 2, "bob", None, '["x", "y"]')]


def test_sqlite_sink_non_dict_items_go_to_one_json_column(tmp_path):
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db))
    try:
        sink.write(batch("text", [1, 2], 7, None, {1: "int key"}))
    finally:
        sink.close()
    assert columns(db, "items") == {"_log_id", "_seq", "item"}
    values = [json.loads(v) for (v,) in query(db, "SELECT item FROM items ORDER BY _seq")]
    assert values == ["text", [1, 2], 7, None, {"1": "int key"}]


def test_sqlite_sink_drops_duplicates_by_log_id_and_seq(tmp_path):
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db))
    try:
        sink.write(batch({"v": 1}, {"v": 2}, {"v": 3}))
        sink.write(batch({"v": 1}, {"v": 2}, {"v": 3}))  # a redelivery of the same batch
        sink.write(batch({"v": 2}, {"v": 3}, {"v": 4}, first_seq=2))  # overlapping
        sink.write(batch({"v": 1}, log_id="another-log"))  # same seq, other log: distinct
    finally:
        sink.close()
    rows = query(db, "SELECT _log_id, _seq, v FROM items ORDER BY _log_id, _seq")
    assert rows == [(LOG_ID, 1, 1), (LOG_ID, 2, 2), (LOG_ID, 3, 3), (LOG_ID, 4, 4),
                    ("another-log", 1, 1)]


def test_sqlite_url_with_table_option(tmp_path):
    db = tmp_path / "sub" / "events.db"
    sink = sink_from_url(f"sqlite:///{db}?table=events")
    try:
        assert isinstance(sink, SQLiteSink)
        assert sink.table == "events"
        sink.write(batch({"kind": "click"}))
    finally:
        sink.close()
    assert query(db, "SELECT _seq, kind FROM events") == [(1, "click")]
    assert "items" not in {r[0] for r in query(db, "SELECT name FROM sqlite_master")}


def test_sqlite_url_through_a_batcher(make, tmp_path):
    db = tmp_path / "out.db"
    b = make(f"sqlite:///{db}?table=things")
    b.submit_many([{"n": i} for i in range(5)] + ["plain"])
    b.flush(WAIT)
    rows = query(db, "SELECT _log_id, _seq, n, item FROM things ORDER BY _seq")
    assert [r[1:] for r in rows] == [(i + 1, i, None) for i in range(5)] + [(6, None, '"plain"')]
    assert {r[0] for r in rows} == {b.log_id}


# Each was retried forever (one bad item held back every later one) or, for the
# reserved field, stored without that field.
REFUSED = {
    "int beyond 64 bits": ({"n": 2**64 - 1}, "too large"),
    "names equal but for case": ({"Name": 1, "name": 2}, "duplicate column"),
    "too many columns": ({f"f{i}": i for i in range(2100)}, "columns"),
    "a field named _seq": ({"_seq": 5, "x": 1}, "reserved"),
    "a tuple key in a nested dict": ({"nested": {(1, 2): 3}}, "keys must be"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_sqlite_sink_refuses_only_the_bad_item_and_stores_the_rest(tmp_path, case):
    bad, message = REFUSED[case]
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db))
    try:
        outcomes = sink.write(batch({"v": 1}, {"v": 2}, bad, {"v": 4}, "plain"))
    finally:
        sink.close()
    assert outcomes is not None
    assert [type(o).__name__ if o else None for o in outcomes] == [
        None, None, "PermanentSinkError", None, None]
    assert message in str(outcomes[2])
    assert query(db, "SELECT _seq FROM items ORDER BY _seq") == [(1,), (2,), (4,), (5,)]


def test_sqlite_sink_bad_item_through_a_batcher_is_dead_lettered_and_the_rest_flows(make, tmp_path):
    db = tmp_path / "out.db"
    b = make(f"sqlite:///{db}")
    receipts = b.submit_many([{"v": 1}, {"v": 2**64 - 1}, {"v": 3}])
    with pytest.raises(DeadLettered, match="too large"):
        receipts[1].wait(WAIT)
    b.submit({"v": 4}).wait(WAIT)
    assert query(db, "SELECT v FROM items ORDER BY _seq") == [(1,), (3,), (4,)]
    st = b.stats()
    assert (st.delivered, st.dead_lettered, st.pending) == (3, 1, 0)


# ------------------------------------------------------------------- file


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_file_sink_writes_json_lines_with_identity(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = FileSink(str(out))
    try:
        assert sink.write(batch({"a": 1}, "two", b"\x00\xff", [b"x"])) == [None] * 4
    finally:
        sink.close()
    lines = read_lines(out)
    assert [(d["log_id"], d["seq"]) for d in lines] == [(LOG_ID, s) for s in (1, 2, 3, 4)]
    assert lines[0]["item"] == {"a": 1}
    assert lines[1]["item"] == "two"
    assert base64.b64decode(lines[2]["item"]["$base64"]) == b"\x00\xff"
    assert base64.b64decode(lines[3]["item"][0]["$base64"]) == b"x"


def test_file_sink_appends_across_opens(tmp_path):
    out = tmp_path / "out.jsonl"
    for seq in (1, 2):
        sink = FileSink(str(out))
        sink.write(batch("x", first_seq=seq))
        sink.close()
    assert [d["seq"] for d in read_lines(out)] == [1, 2]


def test_file_url_through_a_batcher_dead_letters_only_the_unwritable_item(make, tmp_path):
    out = tmp_path / "out.jsonl"
    b = make(f"file://{out}")  # file:///abs/path, as RFC 8089
    receipts = b.submit_many([{"ok": 1}, {b"bytes key": 1}, b"raw"])
    receipts[0].wait(WAIT)
    receipts[2].wait(WAIT)
    with pytest.raises(DeadLettered, match="bytes"):
        receipts[1].wait(WAIT)
    lines = read_lines(out)
    assert [d["seq"] for d in lines] == [receipts[0].seq, receipts[2].seq]
    assert {d["log_id"] for d in lines} == {b.log_id}
    assert lines[0]["item"] == {"ok": 1}
    assert base64.b64decode(lines[1]["item"]["$base64"]) == b"raw"


# -------------------------------------------------------- module:function


SINK_MODULE = '''
received = []


def take(batch):
    received.extend((r.seq, r.item) for r in batch)


not_callable = 42
'''


@pytest.fixture
def sink_module(tmp_path, monkeypatch):
    (tmp_path / "mysinks_for_walbatch_tests.py").write_text(SINK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mysinks_for_walbatch_tests"
    import sys

    sys.modules.pop("mysinks_for_walbatch_tests", None)


def test_module_function_url_loads_the_callable(sink_module, make):
    import importlib

    sink = sink_from_url(f"{sink_module}:take")
    assert isinstance(sink, FunctionSink)
    mod = importlib.import_module(sink_module)
    assert sink.fn is mod.take

    b = make(f"{sink_module}:take")
    b.submit_many(["a", "b"])
    b.flush(WAIT)
    assert mod.received == [(1, "a"), (2, "b")]


def test_module_attribute_that_is_not_callable_raises_type_error(sink_module):
    with pytest.raises(TypeError, match="int"):
        sink_from_url(f"{sink_module}:not_callable")


def test_module_function_url_naming_a_missing_function_raises(sink_module):
    with pytest.raises(AttributeError, match="no_such_function"):
        sink_from_url(f"{sink_module}:no_such_function")


# ------------------------------------------------------------- resolution


@pytest.mark.parametrize("url", ["ftp://host/out", "kafka://broker/topic", "out.db", "sqlite"])
def test_unknown_sink_url_raises_value_error_listing_what_is_valid(url, tmp_path):
    with pytest.raises(ValueError) as info:
        DurableBatcher(tmp_path / "log", url)
    message = str(info.value)
    assert repr(url) in message
    assert "sqlite:///" in message and "module:function" in message
    DurableBatcher(tmp_path / "log", lambda b: None).close(0)  # no lock left behind


def test_sqlite_url_without_a_path_raises_value_error():
    with pytest.raises(ValueError, match="no path"):
        sink_from_url("sqlite://")


@pytest.mark.parametrize("spec", [42, 1.5, {"write": "no"}, ["a"]])
def test_a_sink_that_is_not_callable_raises_type_error(spec, tmp_path):
    with pytest.raises(TypeError, match=type(spec).__name__):
        DurableBatcher(tmp_path / "log", spec)


def test_an_object_whose_write_is_not_callable_raises_type_error():
    class Odd:
        write = "not a method"

    with pytest.raises(TypeError, match="Odd"):
        resolve_sink(Odd())


def test_objects_with_write_and_close_are_used_and_closed(make):
    class Sink:
        def __init__(self) -> None:
            self.items: list[object] = []
            self.closed = threading.Event()

        def write(self, batch) -> None:
            self.items.extend(r.item for r in batch)

        def close(self) -> None:
            self.closed.set()

    sink = Sink()
    assert resolve_sink(sink) is sink
    b = make(sink)
    b.submit("x")
    b.close(timeout=WAIT)
    assert sink.items == ["x"]
    assert sink.closed.is_set()


def test_plain_callables_are_wrapped():
    def fn(batch):
        return None

    sink = resolve_sink(fn)
    assert isinstance(sink, FunctionSink) and sink.fn is fn
