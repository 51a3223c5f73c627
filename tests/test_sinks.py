"""Built-in sinks and sink resolution: sqlite, file, module:function, errors."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading

import msgpack
import pytest
from helpers import WAIT

from walbatch import Batch, DeadLettered, DurableBatcher, PermanentSinkError, Record, SinkError, values
from walbatch.sinks import FunctionSink, resolve_sink, sink_from_url
from walbatch.sinks.file import FileSink, read
from walbatch.sinks.sqlite import SQLiteSink
from walbatch.values import equal

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


def stored(db_path, table: str = "items") -> dict[int, object]:
    """seq -> item, read back from the SQLite sink's item column under the value mapping."""
    return {seq: values.loads(text)
            for seq, text in query(db_path, f"SELECT _seq, item FROM {table} ORDER BY _seq")}


def test_sqlite_sink_stores_each_item_whole_and_shows_fields_as_columns(tmp_path):
    db = tmp_path / "out.db"
    items = [{"name": "ada", "age": 36}, {"name": "bob", "tags": ["x", "y"]}, "text", [1, 2], 7,
             None, {1: "int key", "1": "str key"}]
    sink = SQLiteSink(str(db))
    try:
        assert sink.write(batch(*items)) is None
    finally:
        sink.close()
    assert all(equal(stored(db)[i + 1], item) for i, item in enumerate(items))
    assert columns(db, "items") == {"_log_id", "_seq", "item"}  # what is stored
    rows = query(db, "SELECT _log_id, _seq, name, age, tags FROM items WHERE _seq <= 2")
    assert rows == [(LOG_ID, 1, "ada", 36, None), (LOG_ID, 2, "bob", None, '["x","y"]')]


def test_sqlite_sink_drops_duplicates_by_log_id_and_seq(tmp_path):
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db))
    try:
        # Every write takes its whole batch (None): a duplicate is dropped, not refused,
        # or the redelivered items would become dead letters of delivered ones.
        assert sink.write(batch({"v": 1}, {"v": 2}, {"v": 3})) is None
        assert sink.write(batch({"v": 1}, {"v": 2}, {"v": 3})) is None  # a redelivery
        assert sink.write(batch({"v": 2}, {"v": 3}, {"v": 4}, first_seq=2)) is None  # overlapping
        assert sink.write(batch({"v": 1}, log_id="another-log")) is None  # other log: distinct
    finally:
        sink.close()
    rows = query(db, "SELECT _log_id, _seq, v FROM items ORDER BY _log_id, _seq")
    assert rows == [(LOG_ID, 1, 1), (LOG_ID, 2, 2), (LOG_ID, 3, 3), (LOG_ID, 4, 4),
                    ("another-log", 1, 1)]


def test_sqlite_url_with_table_option(tmp_path):
    db = tmp_path / "events.db"
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
    assert [r[1:] for r in rows] == [(i + 1, i, f'{{"n":{i}}}') for i in range(5)] + [
        (6, None, '"plain"')]
    assert {r[0] for r in rows} == {b.log_id}


# Fields SQLite treats specially (its row id and aliases in any case, the sink's own
# columns in any case, names it cannot make a column of): each was lost, replaced
# another row's identity, or stopped delivery for good. Every one is stored now.
HOSTILE_FIELDS = {
    "rowid": {"rowid": 1, "v": "a"},
    "OID": {"OID": 7, "v": "b"},
    "_RowID_": {"_RowID_": 2, "v": "c"},
    "_SEQ": {"_SEQ": 1, "v": "d"},
    "_seq": {"_seq": 99, "v": "e"},
    "_LOG_ID": {"_LOG_ID": "x", "v": "f"},
    "item": {"item": [1], "ITEM": 2},
    "names equal but for case": {"Name": 1, "name": 2},
    "a NUL in a name": {"a\x00b": 1, "\x00": 2},
    "quotes and brackets": {'q"uote': 1, "a'b": 2, "a.b[0]": 3, "back\\slash": 4},
    "tag-like names": {"$base64": "AA==", "$": 1, "$$x": 2},
    "too many columns": {f"f{i}": i for i in range(2100)},
    "an int beyond 63 bits": {"n": 2**64 - 1},
    "a tuple key in a nested dict": {"nested": {(1, 2): 3}},
}


@pytest.mark.parametrize("case", HOSTILE_FIELDS, ids=list(HOSTILE_FIELDS))
def test_sqlite_sink_stores_items_with_hostile_fields_and_the_rest_of_the_batch(tmp_path, case):
    item = HOSTILE_FIELDS[case]
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db))
    try:
        assert sink.write(batch({"v": 1}, {"v": 2}, item, {"v": 4}, "plain")) is None
        assert sink.write(batch(item, {"v": 7}, first_seq=6)) is None  # columns exist now
    finally:
        sink.close()
    back = stored(db)
    assert sorted(back) == [1, 2, 3, 4, 5, 6, 7]
    assert equal(back[3], item) and equal(back[6], item)
    assert equal([back[s] for s in (1, 2, 4, 5, 7)], [{"v": 1}, {"v": 2}, {"v": 4}, "plain",
                                                      {"v": 7}])


def test_sqlite_sink_a_row_id_field_first_into_a_new_table(tmp_path):
    # Was StopIteration inside the sink, retried forever, holding back every later item.
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db))
    try:
        assert sink.write(batch({"rowid": 5}, {"rowid": 5}, {"ROWID": "x"})) is None
    finally:
        sink.close()
    assert equal(stored(db), {1: {"rowid": 5}, 2: {"rowid": 5}, 3: {"ROWID": "x"}})
    # The table has no row id for a field to pose as (WITHOUT ROWID), and the field
    # gets no column of that name: the items are only in item.
    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        query(db, "SELECT rowid FROM items")


def test_sqlite_sink_columns_never_convert_what_is_stored(tmp_path):
    # A column made for "x" (TEXT) once turned a later 5 into "5", and an INTEGER column
    # turned "007" into 7: affinity. The column is a view; the item is what is stored.
    db = tmp_path / "out.db"
    items = [{"x": "x"}, {"x": 5}, {"x": "007"}, {"x": 1.0}, {"x": True}, {"x": b"\x01"},
             {"x": [1]}, {"x": "[1]"}, {"x": None}, {}, {"x": float("nan")}, {"x": -0.0},
             [b"\x01"], ["01"], msgpack.ExtType(1, b"x"), [1, b"x"], {1: "a", "1": "b"},
             {True: 1, None: 2}, {"true": 1, "null": 2}]
    sink = SQLiteSink(str(db))
    try:
        assert sink.write(batch(*items)) is None
    finally:
        sink.close()
    back = stored(db)
    assert all(equal(back[i + 1], item) for i, item in enumerate(items))
    assert len({values.dumps(i) for i in items}) == len(items)


def test_sqlite_sink_refuses_a_table_of_another_layout(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE items (_log_id TEXT, _seq INTEGER, name TEXT, item TEXT, "
                 "PRIMARY KEY (_log_id, _seq))")
    conn.close()
    with pytest.raises(ValueError, match="one column per field.*table=NAME"):
        SQLiteSink(str(db))
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE nokey (_log_id TEXT, _seq INTEGER, item TEXT)")
    conn.close()
    with pytest.raises(ValueError, match="no primary key or unique index"):
        SQLiteSink(str(db), table="nokey")


def test_sqlite_sink_a_row_sqlite_refuses_is_dead_lettered_alone(tmp_path):
    db = tmp_path / "out.db"
    SQLiteSink(str(db)).close()
    conn = sqlite3.connect(db)
    conn.execute("CREATE TRIGGER no_bad BEFORE INSERT ON items WHEN json_extract(new.item, '$.v') "
                 "= 'bad' BEGIN SELECT RAISE(ABORT, 'v may not be bad'); END")
    conn.commit()
    conn.close()
    sink = SQLiteSink(str(db))
    try:
        outcomes = sink.write(batch({"v": 1}, {"v": "bad"}, {"v": 3}))
    finally:
        sink.close()
    assert outcomes is not None and outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentSinkError) and "v may not be bad" in str(outcomes[1])
    assert sorted(stored(db)) == [1, 3]


def test_sqlite_sink_a_locked_database_fails_the_batch_to_be_retried(tmp_path):
    db = tmp_path / "out.db"
    sink = SQLiteSink(str(db))
    sink._conn.execute("PRAGMA busy_timeout=50")
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            sink.write(batch({"v": 1}))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sink.write(batch({"v": 1})) is None
    sink.close()


def test_sqlite_sink_bad_item_through_a_batcher_is_dead_lettered_and_the_rest_flows(make, tmp_path):
    db = tmp_path / "out.db"
    b = make(f"sqlite:///{db}")
    too_deep: object = 1
    for _ in range(600):
        too_deep = [too_deep]
    receipts = b.submit_many([{"v": 1}, {"v": too_deep}, {"v": 3}])
    with pytest.raises(DeadLettered, match="nested deeper than 512 levels"):
        receipts[1].wait(WAIT)
    b.submit({"v": 4}).wait(WAIT)
    assert query(db, "SELECT v FROM items ORDER BY _seq") == [(1,), (3,), (4,)]
    st = b.stats()
    assert (st.delivered, st.dead_lettered, st.pending) == (3, 1, 0)


@pytest.mark.parametrize("url,message", [
    ("sqlite:///{tmp}/no/such/dir/x.db", "directory .*no/such/dir' does not exist"),
    ("sqlite://relative.db", "names a host 'relative.db'"),
    ("sqlite:///{tmp}/x.db?tabel=x", "unknown option 'tabel'; valid: table"),
    ("sqlite:///{tmp}/x.db?table=", "option table= is empty"),
])
def test_sqlite_url_mistakes_are_refused_and_create_nothing(tmp_path, url, message):
    with pytest.raises(ValueError, match=message):
        sink_from_url(url.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- file


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_file_sink_writes_json_lines_with_identity(tmp_path):
    out = tmp_path / "out.jsonl"
    items = [{"a": 1}, "two", b"\x00\xff", [b"x"], {1: "a", "1": "b"}, float("nan"),
             {"$base64": "AP8="}, msgpack.ExtType(1, b"x"), [1, b"x"], -0.0]
    sink = FileSink(str(out))
    try:
        assert sink.write(batch(*items)) == [None] * len(items)
    finally:
        sink.close()
    lines = read_lines(out)
    assert [(d["log_id"], d["seq"]) for d in lines] == [(LOG_ID, s) for s in range(1, 11)]
    assert lines[0]["item"] == {"a": 1} and lines[1]["item"] == "two"
    assert base64.b64decode(lines[2]["item"]["$base64"]) == b"\x00\xff"
    assert base64.b64decode(lines[3]["item"][0]["$base64"]) == b"x"
    assert lines[6]["item"] == {"$$base64": "AP8="}  # a user's dict is never a tag
    back = [e["item"] for e in read(str(out))]
    assert equal(back, items)


def test_file_sink_appends_across_opens_and_read_keeps_the_first_line_per_identity(tmp_path):
    out = tmp_path / "out.jsonl"
    for seq, item in ((1, "x"), (2, "y"), (1, "x")):  # the last: a redelivery after a crash
        sink = FileSink(str(out))
        sink.write(batch(item, first_seq=seq))
        sink.close()
    assert [d["seq"] for d in read_lines(out)] == [1, 2, 1]
    assert [(e["seq"], e["item"]) for e in read(str(out))] == [(1, "x"), (2, "y")]


def test_file_sink_a_line_cut_short_never_swallows_the_next(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = FileSink(str(out))
    sink.write(batch("a"))
    sink.close()
    with open(out, "ab") as f:  # a power loss in the middle of appending seq 2
        f.write(b'{"log_id":"' + LOG_ID.encode() + b'","seq":2,"it')
    sink = FileSink(str(out))
    sink.write(batch("b", first_seq=2))  # redelivered, since it was never acknowledged
    sink.close()
    assert [(e["seq"], e["item"]) for e in read(str(out), strict=False)] == [(1, "a"), (2, "b")]
    with pytest.raises(ValueError, match="line 2 is not an entry"):
        list(read(str(out)))


def test_file_sink_a_failed_write_is_cut_back_and_retried(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = FileSink(str(out))
    sink.write(batch("a"))
    real_fd = sink._fd
    sink._fd = os.open(os.devnull, os.O_RDONLY)  # every write fails with EBADF
    try:
        with pytest.raises(SinkError, match="file sink") as info:
            sink.write(batch("b", first_seq=2))
        assert info.value.retryable
    finally:
        os.close(sink._fd)
        sink._fd = real_fd
    sink.write(batch("b", first_seq=2))
    sink.close()
    assert [(e["seq"], e["item"]) for e in read(str(out))] == [(1, "a"), (2, "b")]


def test_file_url_through_a_batcher_dead_letters_only_the_unwritable_item(make, tmp_path):
    out = tmp_path / "out.jsonl"
    b = make(f"file://{out}")  # file:///abs/path, as RFC 8089
    too_deep: object = 1
    for _ in range(600):
        too_deep = [too_deep]
    receipts = b.submit_many([{"ok": 1}, {b"bytes key": 1}, too_deep, b"raw"], key="k")
    for i in (0, 1, 3):
        receipts[i].wait(WAIT)
    with pytest.raises(DeadLettered, match="nested deeper"):
        receipts[2].wait(WAIT)
    entries = list(read(str(out)))
    assert [e["seq"] for e in entries] == [receipts[i].seq for i in (0, 1, 3)]
    assert {e["log_id"] for e in entries} == {b.log_id} and {e["key"] for e in entries} == {"k"}
    assert equal([e["item"] for e in entries], [{"ok": 1}, {b"bytes key": 1}, b"raw"])


@pytest.mark.parametrize("url,message", [
    ("file://relative.jsonl", "'relative.jsonl' is read as a host name.*file:///ABSOLUTE"),
    ("file:///{tmp}/no/dir/out.jsonl", "directory .*no/dir' does not exist"),
    ("file:///{tmp}/out.jsonl?fsync=0", "unknown option 'fsync'"),
])
def test_file_url_mistakes_are_refused_and_create_nothing(tmp_path, url, message):
    with pytest.raises(ValueError, match=message):
        sink_from_url(url.format(tmp=str(tmp_path).lstrip("/")))
    assert list(tmp_path.iterdir()) == []


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
    with pytest.raises(AttributeError, match="cannot load the sink .*has no attribute 'no_such_function'"):
        sink_from_url(f"{sink_module}:no_such_function")


def test_module_function_url_naming_a_missing_module_says_what_was_loaded_and_the_forms():
    with pytest.raises(ImportError) as info:
        sink_from_url("nosuchmod:fn")
    message = str(info.value)
    assert "cannot load the sink 'nosuchmod:fn'" in message
    assert "no module 'nosuchmod'" in message and "PYTHONPATH" in message
    assert "sqlite:///" in message and "module:function" in message


def test_module_function_url_whose_module_fails_to_import_says_so(tmp_path, monkeypatch):
    (tmp_path / "broken_sink_for_walbatch_tests.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="importing 'broken_sink_for_walbatch_tests' failed: "
                                          ".*no_such_dependency_xyz"):
        sink_from_url("broken_sink_for_walbatch_tests:fn")


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


def test_module_name_may_name_a_sink_a_factory_or_a_class(tmp_path, monkeypatch):
    # module:function takes the batch; a callable of no arguments builds the sink once.
    from walbatch.sinks import resolve_sink

    (tmp_path / "shapes.py").write_text(
        "seen = []\n"
        "def write(batch):\n"
        "    seen.append('function')\n"
        "class Sink:\n"
        "    def write(self, batch):\n"
        "        seen.append('class')\n"
        "def make():\n"
        "    return Sink()\n"
        "def broken():\n"
        "    raise RuntimeError('no database')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import shapes

    for spec in ("shapes:write", "shapes:Sink", "shapes:make"):
        resolve_sink(spec).write([])
    assert shapes.seen == ["function", "class", "class"]
    with pytest.raises(ValueError, match="building the sink 'shapes:broken' failed: RuntimeError"):
        resolve_sink("shapes:broken")
