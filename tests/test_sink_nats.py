"""The NATS JetStream sink against real nats-server processes (no mocks).

What users rely on: every acknowledged item ends up in the stream exactly once, with
``Nats-Msg-Id: <log_id>:<seq>``, in order; a redelivery is dropped by the duplicate
window; NATS being down (at open, or later) only delays delivery; losing one node of an
R3 cluster loses and duplicates nothing; a kill -9 of the writer loses and duplicates
nothing; items JetStream can never take are dead-lettered, the rest delivered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
from helpers import WAIT, acking_writer, read_acks
from nats_server import NatsCluster, NatsServer, require_binary

from walbatch import Batch, DurableBatcher, PermanentSinkError, Record, SinkError, values
from walbatch.sinks import sink_from_url
from walbatch.sinks.nats import _QUERY_KEYS, NATSSink, parse_duration, parse_url, subject_matches
from walbatch.values import equal

nats = pytest.importorskip("nats")
from nats.js.api import StreamConfig  # noqa: E402

RETRY = {"max_delay": 0.005, "retry_initial_delay": 0.01, "retry_max_delay": 0.2,
         "checkpoint_interval": 0.01}
LOG_ID = "6f1c2a8e-0000-4000-8000-000000000001"


def batch(items, first_seq: int = 1, log_id: str = LOG_ID) -> Batch:
    return Batch([Record(first_seq + i, item) for i, item in enumerate(items)], log_id, "size")


# ------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def server():
    s = NatsServer(require_binary()).start()
    yield s
    s.cleanup()


@pytest.fixture
def own_server():
    """A server this test may stop and restart; not started yet."""
    s = NatsServer(require_binary())
    yield s
    s.cleanup()


_streams = iter(range(1_000_000))


@pytest.fixture
def stream() -> str:
    """A stream name (and subject root) no other test in this module uses."""
    return f"T{next(_streams)}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _connect(servers):
    return await nats.connect(servers, connect_timeout=2, max_reconnect_attempts=2,
                              reconnect_time_wait=0.2)


def add_stream(servers, name: str, subjects: list[str], **config) -> None:
    async def go():
        nc = await _connect(servers)
        try:
            await nc.jetstream().add_stream(StreamConfig(name=name, subjects=subjects, **config))
        finally:
            await nc.close()
    run(go())


def stream_info(servers, name: str):
    async def go():
        nc = await _connect(servers)
        try:
            return await nc.jetstream(timeout=5).stream_info(name)
        finally:
            await nc.close()
    return run(go())


def read_stream(servers, name: str) -> list:
    """Every message in the stream, in stream order: (subject, headers, data).

    Read by sequence number from the stream leader: no consumer to create, so it works
    while a cluster that just lost a node is still electing a new meta leader.
    """
    async def go():
        nc = await _connect(servers)
        try:
            js = nc.jetstream(timeout=5)
            deadline = time.monotonic() + 30
            while True:
                try:
                    info = await js.stream_info(name)
                    out = []
                    seqs = list(range(info.state.first_seq, info.state.last_seq + 1))
                    for i in range(0, len(seqs) if info.state.messages else 0, 500):
                        out += await asyncio.gather(*[js.get_msg(name, q) for q in seqs[i:i + 500]])
                    return [(m.subject, m.headers or {}, m.data) for m in out]
                except nats.errors.TimeoutError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()
    return run(go())


def ids_in(messages) -> list[str]:
    return [json.loads(data)["id"] for _, _, data in messages]


def msg_ids(messages) -> list[str]:
    return [h.get("Nats-Msg-Id") for _, h, _ in messages]


# --------------------------------------------------------------- the URL


def test_url_options_parse():
    o = parse_url("nats://u:p%40ss@10.0.0.1:4223,10.0.0.2,[::1]:5000?stream=EV&subject=ev.{type}"
                  "&encoding=msgpack&timeout=2s&horizon=1h&create=1&dup_window=90m&replicas=3"
                  "&storage=memory&connect_timeout=500ms")
    assert o.servers == ["nats://10.0.0.1:4223", "nats://10.0.0.2:4222", "nats://[::1]:5000"]
    assert (o.user, o.password, o.token) == ("u", "p@ss", None)
    assert (o.stream, o.subject, o.encoding, o.storage, o.replicas) == (
        "EV", "ev.{type}", "msgpack", "memory", 3)
    assert (o.timeout, o.horizon, o.dup_window, o.connect_timeout, o.create) == (
        2.0, 3600.0, 5400.0, 0.5, True)
    t = parse_url("tls://s3cret@nats.example.com?stream=EV&subject=ev.in")
    assert t.servers == ["tls://nats.example.com:4222"] and t.token == "s3cret" and t.tls
    d = parse_url("nats://h?stream=EV&subject=ev.in")
    assert (d.encoding, d.timeout, d.horizon, d.dup_window, d.create) == ("json", 5.0, 600.0, None, False)
    assert [parse_duration(x, "t") for x in ("250ms", "3", "1.5m", "2h", "1d")] == [
        0.25, 3.0, 90.0, 7200.0, 86400.0]


@pytest.mark.parametrize("url, problem", [
    ("nats://h:4222?subject=ev.in", "missing ?stream"),
    ("nats://h:4222?stream=EV", "missing ?subject"),
    ("nats://h:99999?stream=EV&subject=ev.in", "bad port"),
    ("nats://h:abc?stream=EV&subject=ev.in", "bad port"),
    ("nats://h1,,h2?stream=EV&subject=ev.in", "empty host"),
    ("nats://?stream=EV&subject=ev.in", "no server"),
    ("nats://h/EV?stream=EV&subject=ev.in", "unexpected path"),
    ("nats://h?stream=EV&subject=ev.in&stream_name=x", "unknown option"),
    ("nats://h?stream=E.V&subject=ev.in", "stream name"),
    ("nats://h?stream=EV&subject=ev.*", "wildcard"),
    ("nats://h?stream=EV&subject=ev..in", "empty"),
    ("nats://h?stream=EV&subject=ev.x{type}", "whole token"),
    ("nats://h?stream=EV&subject=ev.{a[0]}", "plain item key"),
    ("nats://h?stream=EV&subject=ev.in&timeout=soon", "not a duration"),
    ("nats://h?stream=EV&subject=ev.in&timeout=0", "positive"),
    ("nats://h?stream=EV&subject=ev.in&encoding=xml", "encoding"),
    ("nats://h?stream=EV&subject=ev.in&create=maybe", "not a boolean"),
    ("nats://h?stream=EV&subject=ev.in&replicas=7", "replicas"),
    ("nats://h?stream=EV&subject=ev.in&user=u", "user and password"),
    ("nats://tok@h?stream=EV&subject=ev.in&user=u&password=p", "not both"),
    ("nats://h?stream=EV&subject=ev.in&tls_cert=/c.pem", "tls_cert and tls_key"),
    ("nats://h?stream=EV&stream=OTHER&subject=ev.in", "stream given more than once"),
    ("nats://h?stream=EV&subject=" + "x" * 4000, "NATS takes at most"),
])
def test_malformed_url_is_a_value_error_naming_the_problem(url, problem):
    with pytest.raises(ValueError, match=problem.replace("?", r"\?").replace("*", r"\*")):
        sink_from_url(url)


def test_a_bad_url_never_shows_the_password_or_token():
    for url in ("nats://alice:hunter2@h:4222?strem=x", "nats://s3cr3t@h:4222?strem=x",
                "nats://h:4222?stream=EV&subject=ev.in&user=u&password=hunter2&bad=1"):
        with pytest.raises(ValueError) as info:
            sink_from_url(url)
        assert "hunter2" not in str(info.value) and "s3cr3t" not in str(info.value)


def test_every_url_option_is_documented():
    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "sinks" / "nats.md").read_text()
    for key in sorted(_QUERY_KEYS):
        assert re.search(rf"^\| `{key}` \|", doc, re.M), f"?{key}= missing from docs/sinks/nats.md"


def test_subject_matching_follows_nats_wildcards():
    assert subject_matches("a.*", "a.b") and not subject_matches("a.*", "a.b.c")
    assert subject_matches("a.>", "a.b.c") and not subject_matches("a.>", "a")
    assert subject_matches("a.b", "a.b") and not subject_matches("a.b", "a.c")


def test_no_nats_server_skips_with_the_install_hint(monkeypatch):
    import nats_server

    monkeypatch.setattr(nats_server, "find_binary", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="nats-server not found.*apt-get install"):
        nats_server.require_binary()


def test_sink_from_url_builds_without_connecting_and_closes():
    sink = sink_from_url("nats://127.0.0.1:1?stream=EV&subject=ev.in")  # nothing listens there
    assert isinstance(sink, NATSSink)
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(SinkError, match="closed"):
        sink.write(batch([1]))


# ---------------------------------------------------------- against a server


def test_round_trip_in_order_with_msg_id(server, stream, make):
    b = make(f"{server.url}?stream={stream}&subject={stream.lower()}.in&create=1")
    items = [{"id": f"i{k}", "n": k, "blob": bytes([k % 256])} for k in range(300)]
    for k in range(0, 100):
        b.submit(items[k])
    b.submit_many(items[100:])
    b.flush(timeout=WAIT)
    msgs = read_stream(server.url, stream)
    assert ids_in(msgs) == [i["id"] for i in items]  # all there, once, in submit order
    assert msg_ids(msgs) == [f"{b.log_id}:{seq}" for seq in range(1, 301)]
    assert json.loads(msgs[7][2]) == {"id": "i7", "n": 7, "blob": {"$base64": "Bw=="}}
    assert all(equal(values.loads(data), item) for (_, _, data), item in zip(msgs, items, strict=True))
    assert {subj for subj, _, _ in msgs} == {f"{stream.lower()}.in"}
    s = b.stats()
    assert (s.delivered, s.dead_lettered, s.pending) == (300, 0, 0)


def test_redelivered_batch_is_dropped_by_the_duplicate_window(server, stream):
    sink = sink_from_url(f"{server.url}?stream={stream}&subject={stream.lower()}.in&create=1")
    try:
        items = [{"id": f"r{k}"} for k in range(50)]
        assert sink.write(batch(items)) is None
        assert sink.write(batch(items)) is None          # a retry after a lost ack
        assert sink.write(batch(items[10:20], first_seq=11)) is None  # a partial replay
        assert sink.write(batch(items, log_id="another-log")) is None  # another log: new ids
    finally:
        sink.close()
    msgs = read_stream(server.url, stream)
    assert len(msgs) == 100 and len(set(msg_ids(msgs))) == 100


def test_concurrent_writes_from_many_threads(server, stream, make):
    """write() is thread-safe: flush_concurrency batches and direct callers at once."""
    sink = sink_from_url(f"{server.url}?stream={stream}&subject={stream.lower()}.in&create=1")
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for j in range(10):
                first = 1 + (t * 10 + j) * 100
                assert sink.write(batch([{"id": f"{first + k}"} for k in range(100)],
                                        first_seq=first)) is None
        except BaseException as ex:
            errors.append(ex)
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT * 3)
    sink.close()
    assert not errors
    b = make(f"{server.url}?stream={stream}&subject={stream.lower()}.in", flush_concurrency=4,
             max_items=50)
    b.submit_many([{"id": f"b{k}"} for k in range(1000)])
    b.flush(timeout=WAIT)
    ids = ids_in(read_stream(server.url, stream))
    assert len(ids) == len(set(ids)) == 5000


def test_encodings_json_msgpack_raw_text(server, stream):
    base = f"{server.url}?stream={stream}&subject={stream.lower()}.in&create=1"
    item = {"s": "é", "i": -3, "f": 1.5, "b": b"\xff\x00", "l": [1, None, True], "d": {"k": "v"},
            1: float("nan")}
    for enc, seq in (("json", 1), ("msgpack", 2)):
        sink = sink_from_url(f"{base}&encoding={enc}")
        assert sink.write(batch([item], first_seq=seq)) is None
        sink.close()
    sink = sink_from_url(f"{base}&encoding=raw")
    out = sink.write(batch([b"\x00raw", "text", {"not": "bytes"}], first_seq=3))
    sink.close()
    assert out[0] is None and all(isinstance(o, PermanentSinkError) for o in out[1:])
    assert "encoding=text" in str(out[1])
    sink = sink_from_url(f"{base}&encoding=text")
    out = sink.write(batch(["text é", b"bytes"], first_seq=6))
    sink.close()
    assert out[0] is None and "encoding=raw" in str(out[1])
    data = [d for _, _, d in read_stream(server.url, stream)]
    assert equal(values.loads(data[0]), item)
    assert equal(msgpack.unpackb(data[1], strict_map_key=False), item)
    assert data[2:] == [b"\x00raw", "text é".encode()]


def test_values_json_has_no_form_for_are_tagged_and_a_too_deep_item_is_dead_lettered_alone(
        server, stream, make):
    b = make(f"{server.url}?stream={stream}&subject={stream.lower()}.in&create=1")
    too_deep: object = "x"
    for _ in range(600):
        too_deep = [too_deep]
    items = [{"id": "a", "x": float("nan"), 1: b"\x00"}, {"id": "deep", "x": too_deep}, {"id": "c"}]
    b.submit_many(items)
    b.flush(timeout=WAIT)
    stored = [values.loads(data) for _, _, data in read_stream(server.url, stream)]
    assert equal(stored, [items[0], items[2]])
    [dead] = b.dead_letters.list()
    assert dead.seq == 2 and "nested deeper than 512 levels" in dead.error


def test_window_shorter_than_the_horizon_warns(server, stream, caplog):
    url = f"{server.url}?stream={stream}&subject={stream.lower()}.in&create=1&dup_window=30s"
    caplog.set_level(logging.WARNING, logger="walbatch")
    sink = sink_from_url(url)  # horizon: the default 10 minutes
    try:
        sink.write(batch([{"id": "w"}]))
        sink.write(batch([{"id": "w2"}], first_seq=2))
    finally:
        sink.close()
    warnings = [r for r in caplog.records if r.name == "walbatch" and "duplicate_window" in r.message]
    assert len(warnings) == 1  # once, at the first connect
    assert "30s" in warnings[0].message and "10m" in warnings[0].message
    assert stream_info(server.url, stream).config.duplicate_window == 30
    caplog.clear()
    sink = sink_from_url(url.replace("&create=1", "") + "&horizon=20s")
    try:
        sink.write(batch([{"id": "w3"}], first_seq=3))
    finally:
        sink.close()
    assert not [r for r in caplog.records if "duplicate_window" in r.message]


def test_created_stream_window_defaults_to_the_horizon(server, stream, caplog):
    caplog.set_level(logging.WARNING, logger="walbatch")
    sink = sink_from_url(f"{server.url}?stream={stream}&subject={stream.lower()}.in&create=1"
                         "&horizon=45m")
    try:
        sink.write(batch([{"id": "x"}]))
    finally:
        sink.close()
    assert stream_info(server.url, stream).config.duplicate_window == 45 * 60
    assert not [r for r in caplog.records if "duplicate_window" in r.message]


def test_missing_stream_is_a_retryable_error_naming_it(server, stream):
    sink = sink_from_url(f"{server.url}?stream={stream}&subject={stream.lower()}.in")
    try:
        with pytest.raises(SinkError, match=f"{stream}.*does not exist.*create=1") as info:
            sink.write(batch([{"id": "x"}]))
        assert info.value.retryable  # the log keeps the items until an operator creates it
    finally:
        sink.close()


def test_too_large_for_the_stream_is_permanent_the_rest_delivered(server, stream, make):
    subject = f"{stream.lower()}.in"
    add_stream(server.url, stream, [subject], max_msg_size=1024, duplicate_window=600)
    b = make(f"{server.url}?stream={stream}&subject={subject}")
    b.submit_many([{"id": "small1"}, {"id": "big", "p": "x" * 2000}, {"id": "small2"}])
    b.flush(timeout=WAIT)
    assert ids_in(read_stream(server.url, stream)) == ["small1", "small2"]
    [dead] = b.dead_letters.list()
    assert dead.item["id"] == "big" and "exceeds" in dead.error


def test_subject_template_routes_and_refuses_what_it_cannot_route(server, stream, make):
    root = stream.lower()
    add_stream(server.url, stream, [f"{root}.a", f"{root}.b"], duplicate_window=600)
    b = make(f"{server.url}?stream={stream}&subject={root}.{{type}}")
    b.submit_many([{"id": "1", "type": "a"}, {"id": "2", "type": "b"},
                   {"id": "3", "type": "c"},            # not bound to the stream
                   {"id": "4", "type": "x.y"},          # would be two tokens
                   {"id": "5"},                         # no field
                   {"id": "6", "type": "a"}])
    b.flush(timeout=WAIT)
    msgs = read_stream(server.url, stream)
    assert [(s, json.loads(d)["id"]) for s, _, d in msgs] == [
        (f"{root}.a", "1"), (f"{root}.b", "2"), (f"{root}.a", "6")]
    dead = {d.item["id"]: d.error for d in b.dead_letters.list()}
    assert set(dead) == {"3", "4", "5"}
    assert "not bound" in dead["3"] and "'.'" in dead["4"] and "no field" in dead["5"]


def test_a_subject_too_long_for_nats_is_refused_alone(server, stream, make):
    # The server drops a connection whose PUB line passes 4 KiB; the sink reconnected
    # and sent the same batch again forever, and the items after it never went out.
    root = stream.lower()
    add_stream(server.url, stream, [f"{root}.*"], duplicate_window=600)
    b = make(f"{server.url}?stream={stream}&subject={root}.{{t}}")
    b.submit_many([{"id": "1", "t": "a"}, {"id": "2", "t": "x" * 5000}, {"id": "3", "t": "b"}])
    b.flush(timeout=WAIT)
    assert [json.loads(d)["id"] for _, _, d in read_stream(server.url, stream)] == ["1", "3"]
    [dead] = b.dead_letters.list()
    assert dead.item["id"] == "2" and "NATS takes at most" in dead.error


def test_a_stream_named_error_is_acknowledged_like_any_other(server, make):
    # Its PubAck holds "error" ({"stream":"error",...}): it was taken for a refusal.
    add_stream(server.url, "error", ["errs.in"], duplicate_window=600)
    try:
        b = make(f"{server.url}?stream=error&subject=errs.in")
        b.submit_many([{"id": "1"}, {"id": "2"}])
        b.flush(timeout=WAIT)
        assert b.stats().delivered == 2
        assert [json.loads(d)["id"] for _, _, d in read_stream(server.url, "error")] == ["1", "2"]
    finally:
        run(_delete_stream(server.url, "error"))


async def _delete_stream(servers, name: str) -> None:
    nc = await _connect(servers)
    try:
        await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


def test_literal_subject_outside_the_stream_is_refused_not_published(server, stream, caplog):
    root = stream.lower()
    add_stream(server.url, stream, [f"{root}.a"], duplicate_window=600)
    sink = sink_from_url(f"{server.url}?stream={stream}&subject={root}.b")
    try:
        out = sink.write(batch([{"id": "1"}, {"id": "2"}]))
    finally:
        sink.close()
    assert all(isinstance(o, PermanentSinkError) and "not bound" in str(o) for o in out)
    assert any("not bound" in r.message and r.levelno == logging.ERROR for r in caplog.records)
    assert read_stream(server.url, stream) == []


def test_server_down_at_open_and_later_only_delays_delivery(own_server, tmp_path):
    url = f"{own_server.url}?stream=DOWN&subject=down.in&create=1&timeout=2s"
    with DurableBatcher(tmp_path / "log", url, **RETRY) as b:
        # NATS is not running yet: the first connect fails, the items wait in the log.
        b.submit_many([{"id": f"a{k}"} for k in range(50)])
        deadline = time.monotonic() + WAIT
        while b.stats().retries < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert b.stats().pending == 50 and "cannot connect" in b.stats().last_error
        own_server.start()
        b.flush(timeout=WAIT)
        # Now it goes away while connected (SIGTERM), and comes back on the same port.
        own_server.stop()
        retries = b.stats().retries
        for k in range(50):
            b.submit({"id": f"b{k}"})
        while b.stats().retries < retries + 2:
            assert time.monotonic() < deadline + WAIT
            time.sleep(0.01)
        assert b.stats().pending > 0
        own_server.start()
        b.flush(timeout=WAIT)
        assert b.stats().delivered == 100
    ids = ids_in(read_stream(own_server.url, "DOWN"))
    assert sorted(ids) == sorted([f"a{k}" for k in range(50)] + [f"b{k}" for k in range(50)])


def test_a_hung_server_times_out_then_delivers_when_it_wakes(own_server, tmp_path):
    """SIGSTOP: no FIN, no RST, no answers. Acks time out, PING gets no PONG, the
    connection is dropped and reconnects fail until the server runs again."""
    own_server.start()
    url = f"{own_server.url}?stream=HUNG&subject=hung.in&create=1&timeout=300ms&connect_timeout=300ms"
    with DurableBatcher(tmp_path / "log", url, **RETRY) as b:
        b.submit_many([{"id": f"a{k}"} for k in range(50)])
        b.flush(timeout=WAIT)
        own_server.pause()
        try:
            b.submit_many([{"id": f"b{k}"} for k in range(50)])
            deadline = time.monotonic() + WAIT
            while b.stats().retries < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert b.stats().pending == 50
        finally:
            own_server.resume()
        b.flush(timeout=WAIT)
    ids = ids_in(read_stream(own_server.url, "HUNG"))
    assert sorted(ids) == sorted([f"a{k}" for k in range(50)] + [f"b{k}" for k in range(50)])


def test_user_password_and_token_auth(tmp_path):
    binary = require_binary()
    with_user = NatsServer(binary, extra_args=["--user", "wb", "--pass", "p@ss word"]).start()
    with_token = NatsServer(binary, extra_args=["--auth", "s3cret"]).start()
    try:
        for url in (f"nats://wb:p%40ss%20word@{with_user.hostport}?",
                    f"nats://{with_user.hostport}?user=wb&password=p%40ss%20word&",
                    f"nats://s3cret@{with_token.hostport}?"):
            sink = sink_from_url(url + "stream=AUTH&subject=auth.in&create=1")
            try:
                assert sink.write(batch([{"id": "x"}])) is None
            finally:
                sink.close()
        for url in (f"nats://wb:wrong@{with_user.hostport}", f"nats://nope@{with_token.hostport}"):
            sink = sink_from_url(f"{url}?stream=AUTH&subject=auth.in")
            try:
                with pytest.raises(SinkError, match="(?i)authorization violation") as info:
                    sink.write(batch([{"id": "x"}]))
                assert info.value.retryable  # fix the credentials; the log keeps the items
            finally:
                sink.close()
    finally:
        with_user.cleanup()
        with_token.cleanup()


def test_tls_with_a_private_ca(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    binary = require_binary()
    server = NatsServer(binary, extra_args=["--tls", "--tlscert", str(cert), "--tlskey", str(key)]).start()
    # This one also wants a client certificate signed by the CA (the same self-signed one).
    verifying = NatsServer(binary, extra_args=["--tlsverify", "--tlscert", str(cert), "--tlskey",
                                               str(key), "--tlscacert", str(cert)]).start()
    try:
        for url in (f"tls://localhost:{server.port}?tls_ca={cert}",
                    f"tls://localhost:{verifying.port}?tls_ca={cert}&tls_cert={cert}&tls_key={key}"):
            sink = sink_from_url(f"{url}&stream=TLS&subject=tls.in&create=1")
            try:
                assert sink.write(batch([{"id": "secret"}])) is None
            finally:
                sink.close()
        # Without the CA the server's certificate is not trusted; without a client
        # certificate the verifying server hangs up. Both clear and retryable.
        for url, problem in ((f"tls://localhost:{server.port}?", "certificate verify failed"),
                             (f"tls://localhost:{verifying.port}?tls_ca={cert}&", "")):
            sink = sink_from_url(f"{url}stream=TLS&subject=tls.in")
            try:
                with pytest.raises(SinkError, match=f"(?i)cannot connect.*{problem}") as info:
                    sink.write(batch([{"id": "x"}]))
                assert info.value.retryable
            finally:
                sink.close()
    finally:
        server.cleanup()
        verifying.cleanup()


def test_r3_cluster_loses_a_node_mid_delivery_nothing_lost_or_duplicated(tmp_path):
    cluster = NatsCluster(require_binary()).start()
    try:
        url = f"{cluster.url}?stream=C3&subject=c3.in&create=1&replicas=3&timeout=2s"
        n, killed = 3000, []
        with DurableBatcher(tmp_path / "log", url, flush_concurrency=2, max_items=200,
                            **RETRY) as b:
            b.submit({"id": "warmup"})
            b.flush(timeout=WAIT * 2)  # the stream exists, R3, with a leader
            leader = stream_info(cluster.urls, "C3").cluster.leader
            for k in range(n):
                b.submit({"id": f"c{k}"}) if k % 10 else b.submit_many(
                    [{"id": f"c{k}"}])
                if k == n // 3:
                    # Kill the stream's leader: the worst node to lose. Items are in
                    # flight; JetStream elects a new leader among the other two.
                    node = next(x for x in cluster.nodes if x.name == leader)
                    node.kill()
                    killed.append(node.name)
                if k % 100 == 0:
                    time.sleep(0.01)
            b.flush(timeout=WAIT * 3)
            stats = b.stats()
        assert killed and (stats.delivered, stats.dead_lettered, stats.pending) == (n + 1, 0, 0)
        alive = [x.url for x in cluster.nodes if x.running]
        msgs = read_stream(alive, "C3")
        ids = ids_in(msgs)
        assert len(ids) == n + 1, f"{len(ids) - len(set(ids))} duplicates"  # nothing duplicated
        assert set(ids) == {"warmup"} | {f"c{k}" for k in range(n)}  # nothing lost
        assert len(set(msg_ids(msgs))) == n + 1
    finally:
        cluster.cleanup()


CHILD = acking_writer(RETRY)


def test_kill_9_mid_delivery_every_acked_item_in_the_stream_once(server, tmp_path):
    url = f"{server.url}?stream=KILL&subject=kill.in&create=1"
    log_dir, acks = str(tmp_path / "log"), str(tmp_path / "acks")
    rng = __import__("random").Random()
    for cycle in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, log_dir, url, acks, str(cycle)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(0.3 + rng.random() * 0.4)  # submitting and delivering by now
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(WAIT)
    with DurableBatcher(log_dir, url, **RETRY) as b:
        b.flush(timeout=WAIT * 2)
        stats = b.stats()
    acked = read_acks(acks)
    msgs = read_stream(server.url, "KILL")
    ids = ids_in(msgs)
    assert len(acked) > 500  # the children got real work done
    assert acked <= set(ids), f"lost: {sorted(acked - set(ids))[:5]}"
    assert len(ids) == len(set(ids)), "an item is in the stream twice"
    assert len(set(msg_ids(msgs))) == len(msgs)
    assert stats.pending == 0 and stats.submitted == stats.delivered + stats.dead_lettered


def test_connect_refused_is_retryable_and_fast():
    sink = sink_from_url("nats://127.0.0.1:1?stream=EV&subject=ev.in&connect_timeout=300ms")
    try:
        started = time.monotonic()
        with pytest.raises(SinkError, match="cannot connect to NATS") as info:
            sink.write(batch([{"id": "x"}]))
        assert info.value.retryable and time.monotonic() - started < 3
    finally:
        sink.close()


def test_importing_walbatch_does_not_import_nats():
    code = "import sys, walbatch, walbatch.sinks; print('nats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

