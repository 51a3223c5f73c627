"""Every built-in sink against the value space (docs/values.md), through DurableBatcher.

For each sink, against the real thing (SQLite, a file, PostgreSQL, nats-server and an
HTTP endpoint, all started here): hypothesis draws items over every value msgpack
holds, hostile field names included; they are submitted in one call with an item
every sink refuses (nested too deep for JSON) at a random place; each item is then
read back from where the sink put it. An item must read back equal under the
mapping, or be refused alone, and only for the reason the sink documents; every
item after a refused one is delivered.

``WALBATCH_VALUE_EXAMPLES=500 pytest tests/test_sink_values.py`` runs more examples.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from helpers import FAST, WAIT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_server import postgres_fixture  # noqa: F401 - the `postgres` fixture
from value_space import dict_items, examples, items

from walbatch import DeadLettered, DurableBatcher, values
from walbatch.sinks.file import read
from walbatch.values import equal

TOO_DEEP: Any = 0
for _ in range(values.MAX_DEPTH + 1):
    TOO_DEEP = [TOO_DEEP]

SETTINGS = settings(max_examples=examples(25), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
batches = st.tuples(
    st.lists(st.one_of(items(), dict_items()), min_size=1, max_size=6),
    st.integers(0, 6),  # where the refused item goes
    st.one_of(st.none(), st.text(max_size=5), st.integers(-5, 5), st.binary(max_size=3)),
)


def too_deep_for_json(item: Any) -> bool:
    try:
        values.dumps(item)
    except ValueError as ex:
        return "nested deeper" in str(ex)
    return False


def holds_nul(v: Any) -> bool:
    if isinstance(v, str):
        return "\0" in v
    if isinstance(v, dict):
        return any(holds_nul(k) or holds_nul(x) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return any(holds_nul(x) for x in v)
    return False


def deliver(b: DurableBatcher, drawn: tuple, read_back: Callable[[str, list[int]], dict[int, Any]],
            refuses: Callable[[Any], bool]) -> list[int]:
    """Submit the drawn items, wait for each, check the promise; return the delivered seqs."""
    batch_items, at, key = drawn
    submitted = list(batch_items)
    submitted.insert(min(at, len(submitted)), TOO_DEEP)
    before = b.stats()
    receipts = b.submit_many(submitted, key=key)
    refused: dict[int, str] = {}
    for r in receipts:
        try:
            r.wait(WAIT)
        except DeadLettered as ex:
            refused[r.seq] = ex.error
    seqs = list(receipts.seqs)
    back = read_back(b.log_id, [s for s in seqs if s not in refused])
    for seq, item in zip(seqs, submitted, strict=True):
        if refuses(item):
            assert seq in refused, f"seq {seq} should have been refused: {item!r}"
            assert refused[seq], "a refusal says why"
        else:
            assert seq not in refused, f"seq {seq} refused: {refused.get(seq)}: {item!r}"
            assert equal(back[seq], item), f"seq {seq}: stored {back[seq]!r}, submitted {item!r}"
    after = b.stats()
    assert after.delivered - before.delivered == len(submitted) - len(refused)
    assert after.dead_lettered - before.dead_lettered == len(refused)
    return [s for s in seqs if s not in refused]


@pytest.fixture(scope="module")
def batchers(tmp_path_factory):
    made: list[DurableBatcher] = []

    def make(sink: Any, **options: Any) -> DurableBatcher:
        b = DurableBatcher(tmp_path_factory.mktemp("log"), sink, **{**FAST, **options})
        made.append(b)
        return b

    yield make
    for b in made:
        b.close(timeout=WAIT)


# ------------------------------------------------------------------- SQLite


@pytest.fixture(scope="module")
def sqlite_target(batchers, tmp_path_factory):
    db = tmp_path_factory.mktemp("sqlite") / "out.db"
    return batchers(f"sqlite:///{db}?table=items"), db


@SETTINGS
@given(batches)
def test_sqlite(sqlite_target, drawn):
    b, db = sqlite_target

    def read_back(log_id: str, seqs: list[int]) -> dict[int, Any]:
        conn = sqlite3.connect(db)
        try:
            rows = conn.execute("SELECT _seq, item FROM items WHERE _log_id = ? AND _seq >= ?",
                                (log_id, min(seqs, default=0))).fetchall()
        finally:
            conn.close()
        return {seq: values.loads(text) for seq, text in rows}

    deliver(b, drawn, read_back, too_deep_for_json)


# --------------------------------------------------------------------- file


@pytest.fixture(scope="module")
def file_target(batchers, tmp_path_factory):
    out = tmp_path_factory.mktemp("file") / "out.jsonl"
    return batchers(f"file://{out}"), out


@SETTINGS
@given(batches)
def test_file(file_target, drawn):
    b, out = file_target
    entries: dict[int, dict] = {}

    def read_back(log_id: str, seqs: list[int]) -> dict[int, Any]:
        entries.update({e["seq"]: e for e in read(str(out)) if e["log_id"] == log_id})
        return {seq: entries[seq]["item"] for seq in seqs if seq in entries}

    delivered = deliver(b, drawn, read_back, too_deep_for_json)
    assert all(equal(entries[seq].get("key"), drawn[2]) for seq in delivered)


# --------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def postgresql_target(batchers, postgres):
    psycopg = pytest.importorskip("psycopg")
    conn = psycopg.connect(postgres.conninfo, autocommit=True)
    yield batchers(postgres.url(table="value_space", create="1")), conn
    conn.close()


@SETTINGS
@given(batches)
def test_postgresql_jsonb(postgresql_target, drawn):
    b, conn = postgresql_target

    def read_back(log_id: str, seqs: list[int]) -> dict[int, Any]:
        rows = conn.execute("SELECT _seq, item::text FROM value_space WHERE _log_id = %s "
                            "AND _seq = ANY(%s)", (log_id, seqs)).fetchall()
        return {seq: values.loads(text) for seq, text in rows}

    # PostgreSQL text cannot hold NUL: jsonb refuses "\u0000" (the sink's own message).
    deliver(b, drawn, read_back, lambda item: too_deep_for_json(item) or holds_nul(item))


# --------------------------------------------------------------------- NATS


@pytest.fixture(scope="module")
def nats_target(batchers):
    from nats_server import NatsServer, require_binary

    nats = pytest.importorskip("nats")
    server = NatsServer(require_binary()).start()
    try:
        b = batchers(f"{server.url}?stream=VALUES&subject=values.in&create=1")
        yield b, server, nats, {"seen": 0}
        b.close(timeout=WAIT)  # before the server goes
    finally:
        server.cleanup()


def read_nats(server: Any, nats: Any, after: int) -> tuple[dict[str, bytes], int]:
    """Messages of the VALUES stream after stream seq ``after``: Nats-Msg-Id -> data."""
    async def go() -> tuple[dict[str, bytes], int]:
        nc = await nats.connect(server.url, connect_timeout=2)
        try:
            js = nc.jetstream(timeout=5)
            last = (await js.stream_info("VALUES")).state.last_seq
            msgs = await asyncio.gather(*[js.get_msg("VALUES", q) for q in range(after + 1, last + 1)])
            return {m.headers["Nats-Msg-Id"]: m.data for m in msgs}, last
        finally:
            await nc.close()
    return asyncio.run(asyncio.wait_for(go(), 60))


@SETTINGS
@given(batches)
def test_nats_json(nats_target, drawn):
    b, server, nats, state = nats_target

    def read_back(log_id: str, seqs: list[int]) -> dict[int, Any]:
        messages, state["seen"] = read_nats(server, nats, state["seen"])
        return {int(msg_id.rpartition(":")[2]): values.loads(data)
                for msg_id, data in messages.items() if msg_id.startswith(log_id + ":")}

    deliver(b, drawn, read_back, too_deep_for_json)


# --------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def http_target(batchers):
    from http_server import BulkAPI

    api = BulkAPI()
    try:
        yield batchers(f"{api.url}/bulk?compress=none"), api
    finally:
        api.stop()


@SETTINGS
@given(batches)
def test_http(http_target, drawn):
    b, api = http_target

    def read_back(log_id: str, seqs: list[int]) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for req in list(api.accepted):
            for line in req.body.split(b"\n")[:-1]:
                entry = values.loads(line)
                if entry["log_id"] == log_id:
                    out.setdefault(entry["seq"], entry["item"])
        return out

    deliver(b, drawn, read_back, too_deep_for_json)
    assert not api.malformed and not api.mismatches
