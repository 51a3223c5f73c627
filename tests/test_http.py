"""`walbatch serve --http`: every status code of POST /v1/items, health, metrics, hostile HTTP.

Each daemon is a real subprocess on a free loopback port (tests/http_daemon.py);
items go through the log into a real file or SQLite sink, and what a test
asserts is what a client relies on: a 200 means the items are in the log (and
reach the sink equal), a refusal writes nothing, and a hostile client costs
nobody else their service.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from helpers import answered
from http_daemon import WAIT, HttpDaemon, write_gate_sink

from walbatch.client import Busy, Client
from walbatch.sinks.file import read as read_file_sink

NDJSON = {"Content-Type": "application/x-ndjson"}


def wait_until(cond, timeout: float = WAIT, what: str = "the condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout}s"
        time.sleep(0.02)
    return value


@pytest.fixture
def daemons(tmp_path):
    made: list[HttpDaemon] = []

    def make(name: str = "data", *args: str, env: dict[str, str] | None = None,
             start: bool = True, prefix: list[str] = ()) -> HttpDaemon:
        d = HttpDaemon(tmp_path / name, list(args), env, prefix=prefix)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        if d.running:
            d.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon with a file sink, for the tests that only need it to answer."""
    tmp = tmp_path_factory.mktemp("shared")
    out = tmp / "out.jsonl"
    d = HttpDaemon(tmp / "data", ["--sink", f"file://{out}", "--http-max-body", "64KiB",
                                  "--http-idle-timeout", "1", "--http-read-timeout", "1"]).start()
    d.out = out  # type: ignore[attr-defined]
    yield d
    d.stop()


def sink_items(d: HttpDaemon) -> dict[int, object]:
    out = d.out  # type: ignore[attr-defined]
    return {e["seq"]: e["item"] for e in read_file_sink(str(out))} if out.exists() else {}


def submitted(d: HttpDaemon) -> float:
    return d.metric("walbatch_items_submitted_total")


def flush(d: HttpDaemon) -> None:
    with Client(d.socket_path, timeout=WAIT) as c:
        c.flush(timeout=WAIT)


# ------------------------------------------------------------ ingest: 200

def test_a_json_post_is_one_item_acknowledged_after_fsync_and_delivered_equal(shared):
    before = submitted(shared)
    item = {"user": 7, "tags": ["a", "é", "😀"], "n": None, "f": 1.5, "big": 2**63}
    status, _, answer = shared.post(item, ndjson=False)
    assert status == 200, answer
    assert answer["count"] == 1 and answer["first_seq"] == before + 1
    assert submitted(shared) == before + 1  # acknowledged means in the log
    flush(shared)
    assert sink_items(shared)[answer["first_seq"]] == item


def test_an_ndjson_post_is_one_group_commit_and_every_line_arrives_in_order(shared):
    groups = shared.metric("walbatch_commit_groups_total")
    items = [{"i": i, "text": "x" * (i % 50)} for i in range(1000)]
    status, _, answer = shared.post(items)
    assert status == 200, answer
    assert answer["count"] == 1000
    assert shared.metric("walbatch_commit_groups_total") == groups + 1  # one write, one fsync
    flush(shared)
    got = sink_items(shared)
    first = answer["first_seq"]
    assert [got[s] for s in range(first, first + 1000)] == items


def test_ndjson_skips_blank_lines_and_takes_crlf(shared):
    body = b'{"a": 1}\r\n\r\n  \n{"a": 2}\r\n'
    status, _, raw = shared.request("POST", "/v1/items", body, NDJSON)
    assert status == 200 and json.loads(raw)["count"] == 2


def test_key_puts_the_items_in_that_keys_batches(tmp_path, daemons):
    out = tmp_path / "keyed.jsonl"
    d = daemons("keyed", "--sink", f"file://{out}")
    assert d.post([{"k": 1}, {"k": 2}], query="?key=tenant-7")[0] == 200
    assert d.post({"k": 3}, ndjson=False, query="?key=tenant-8")[0] == 200
    flush(d)
    entries = list(read_file_sink(str(out)))
    assert [(e["key"], e["item"]) for e in entries] == [
        ("tenant-7", {"k": 1}), ("tenant-7", {"k": 2}), ("tenant-8", {"k": 3})]


def test_socket_and_http_feed_the_same_batcher(shared):
    before = submitted(shared)
    with Client(shared.socket_path, timeout=WAIT) as c:
        a = c.submit({"via": "socket"})
        status, _, answer = shared.post({"via": "http"}, ndjson=False)
        b = c.submit({"via": "socket"})
    assert status == 200
    assert (a, answer["first_seq"], b) == (before + 1, before + 2, before + 3)  # one seq space


# ------------------------------------------------------- ingest: refusals

def refused_nothing_written(d: HttpDaemon, status_wanted: int, body: bytes, headers: dict,
                            path: str = "/v1/items") -> dict:
    before = submitted(d)
    status, hdrs, raw = d.request("POST", path, body, headers)
    assert status == status_wanted, raw
    answer = json.loads(raw)
    assert "nothing was written" in answer["error"] or status_wanted == 400
    assert submitted(d) == before
    return answer


@pytest.mark.parametrize("body, where", [
    (b'{"a": 1}\n{"a": \n{"a": 3}\n', "line 2: not valid JSON"),
    (b'{"a": 1}\nNaN\n', "line 2: NaN is not JSON"),
    (b'{"a": 1e999}\n', "line 1: the number 1e999 is too large"),
    (b'{"a": 1, "a": 2}\n', "line 1: the member name 'a' appears twice"),
    (b'{"a": 1}\n{"a": "\xff"}\n', "line 2: not valid UTF-8"),
    (b'[' * 30_000 + b']' * 30_000 + b'\n', "line 1: nested too deeply"),
    (b"\n\n", "the body holds no items"),
    (b'{"a": 1}\n{"n": 18446744073709551616}\n', "items[1]"),  # msgpack holds no such int
    (b'"\\ud800"\n', "surrogate"),
])
def test_bad_ndjson_is_400_naming_the_line_and_nothing_is_written(shared, body, where):
    answer = refused_nothing_written(shared, 400, body, NDJSON)
    assert where in answer["error"], answer


def test_a_bad_json_body_is_400(shared):
    answer = refused_nothing_written(shared, 400, b'{"a": ', {"Content-Type": "application/json"})
    assert "the body: not valid JSON" in answer["error"]
    answer = refused_nothing_written(shared, 400, b"", {"Content-Type": "application/json"})
    assert "empty" in answer["error"]


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "",
                                   "application/json; charset=latin-1"])
def test_another_content_type_is_415(shared, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    answer = refused_nothing_written(shared, 415, b'{"a": 1}', headers)
    assert "application/x-ndjson" in answer["error"]


def test_a_body_over_the_limit_is_413_by_length_chunked_or_compressed(shared):
    big = b'{"a": "' + b"x" * (70 << 10) + b'"}\n'
    answer = refused_nothing_written(shared, 413, big, NDJSON)
    assert "65536 bytes" in answer["error"]
    # Chunked: no Content-Length; the limit holds as the body arrives.
    chunks = iter([big[i:i + 8192] for i in range(0, len(big), 8192)])
    refused_nothing_written(shared, 413, chunks, NDJSON)  # type: ignore[arg-type]
    # A small gzip body that inflates past the limit (a zip bomb) is measured inflated.
    bomb = gzip.compress(b'{"a": "' + b"0" * (1 << 20) + b'"}\n')
    assert len(bomb) < 4096
    refused_nothing_written(shared, 413, bomb, {**NDJSON, "Content-Encoding": "gzip"})
    assert shared.post([{"after": "413"}])[0] == 200  # and it still serves


def test_a_duplicate_key_parameter_is_400(shared):
    answer = refused_nothing_written(shared, 400, b'{"a": 1}\n', NDJSON, "/v1/items?key=a&key=b")
    assert "key" in answer["error"]


def test_a_bad_key_is_400(shared):
    answer = refused_nothing_written(shared, 400, b'{"a": 1}\n', NDJSON, "/v1/items?key=" + "k" * 5000)
    assert "key" in answer["error"]


def test_bearer_token(tmp_path, daemons):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    d = daemons("auth", "--http-token-file", str(token))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"},
                    {"Authorization": "Bearer s3cret-token-and-more"}):
        before = submitted(d)
        status, hdrs, answer = d.post([{"a": 1}], headers=headers)
        assert status == 401 and hdrs["WWW-Authenticate"].startswith("Bearer"), answer
        assert submitted(d) == before
    status, _, answer = d.post([{"a": 1}], headers={"Authorization": "Bearer s3cret-token"})
    assert status == 200 and answer["count"] == 1
    # Probes and scrapes need no token.
    assert d.get_json("/healthz")[0] == 200 and d.get_json("/readyz")[0] == 200
    assert d.metrics()["walbatch_http_requests_total{code=\"401\",path=\"/v1/items\"}"] == 4


def test_an_empty_token_file_is_a_usage_error(tmp_path):
    import subprocess
    import sys

    token = tmp_path / "token"
    token.write_text("\n")
    proc = subprocess.run([sys.executable, "-m", "walbatch", "serve", "--data-dir",
                           str(tmp_path / "d"), "--http", "127.0.0.1:0", "--http-token-file",
                           str(token)], capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 2 and "must hold one token" in proc.stderr


# ------------------------------------------------- backpressure: 429, 503

SMALL_LOG = ["--max-log-bytes", "128KiB", "--segment-bytes", "16KiB"]


def fill_until_429(d: HttpDaemon) -> int:
    """POST 1 KiB items until a 429; how many were acknowledged before it."""
    acked = 0
    for _ in range(400):
        status, hdrs, answer = d.post([{"p": "x" * 1000}])
        if status == 429:
            assert hdrs["Retry-After"] == "1"
            assert "high-water mark" in answer["error"] and "nothing was written" in answer["error"]
            return acked
        assert status == 200, answer
        acked += 1
    raise AssertionError("no 429 although the sink takes nothing")


def test_429_from_the_high_water_mark_until_the_log_drains_below_the_low_one(tmp_path, daemons):
    env = write_gate_sink(tmp_path / "gate")
    d = daemons("bp", "--sink", "gate:write", *SMALL_LOG, "--retry-max-delay", "0.05", env=env)
    acked = fill_until_429(d)
    capacity = d.metric("walbatch_log_capacity_bytes")
    assert d.metric("walbatch_log_bytes") >= 0.8 * capacity
    assert acked < 128  # 1 KiB items: refused well before the quota itself
    crossed = d.wait_event("high_water_crossed")
    assert crossed["capacity_bytes"] == capacity and crossed["log_bytes"] >= 0.8 * capacity
    status, reasons = d.get_json("/readyz")
    assert status == 503 and any("high-water" in r for r in reasons["reasons"])
    before = submitted(d)
    assert d.post([{"p": "refused"}])[0] == 429 and submitted(d) == before
    Path(env["WALBATCH_TEST_GATE"]).touch()  # the sink comes back; the log drains
    wait_until(lambda: d.post([{"p": "after"}])[0] == 200, what="a 200 after draining")
    assert d.metric("walbatch_log_bytes") < 0.6 * capacity
    assert d.wait_event("high_water_cleared")["log_bytes"] < 0.6 * capacity
    assert d.get_json("/readyz")[0] == 200
    flush(d)
    delivered = [json.loads(line)[1] for line in open(env["WALBATCH_TEST_OUT"])]
    assert len(delivered) == acked + 1 and "refused" not in [i["p"] for i in delivered]


def test_the_water_marks_have_hysteresis(tmp_path):
    """Between the marks, the state is whatever it was: no flapping at a mark."""
    from walbatch import DurableBatcher
    from walbatch.health import Backpressure
    from walbatch.observer import Observer

    crossings = []

    class Spy(Observer):
        def high_water(self, above, log_bytes, capacity):
            crossings.append((above, log_bytes))

    with DurableBatcher(tmp_path / "log", None, max_log_bytes=1000, segment_bytes=100) as b:
        b.observers.add(Spy())
        bp = Backpressure(b, high=0.8, low=0.6)
        readings = [500, 700, 799, 800, 790, 700, 600, 599, 700, 799, 850]
        states = [bp.update(n) for n in readings]
    assert states == [False, False, False, True, True, True, True, False, False, False, True]
    assert crossings == [(True, 800), (False, 599), (True, 850)]


def test_503_with_retry_after_while_shutting_down(tmp_path, daemons):
    env = write_gate_sink(tmp_path / "gate")  # the gate stays closed: the drain takes its time
    d = daemons("stop", "--sink", "gate:write", "--shutdown-timeout", "3",
                "--http-retry-after", "7", env=env)
    assert d.post([{"a": 1}])[0] == 200
    lines = len(d.log_lines())
    d.proc.send_signal(15)
    d.wait_event("stopping", after=lines)
    status, hdrs, answer = d.post([{"a": 2}])
    assert status == 503 and hdrs["Retry-After"] == "7", answer
    assert "shutting down" in answer["error"] and "nothing was written" in answer["error"]
    status, ready = d.get_json("/readyz")
    assert status == 503 and "shutting down" in ready["reasons"]
    assert d.get_json("/healthz")[0] == 200  # alive while it drains
    assert d.stop() == 0
    closed = d.wait_event("closed")
    assert closed == {**closed, "drained_items": 0, "left_items": 1}
    assert not Path(env["WALBATCH_TEST_OUT"]).exists()


# ---------------------------------------------------------------- health

def test_healthz_and_readyz(shared):
    assert shared.get_json("/healthz") == (200, {"status": "ok"})
    assert shared.get_json("/readyz") == (200, {"ready": True})


def test_readyz_turns_503_once_the_sink_fails_longer_than_the_grace(tmp_path, daemons):
    env = write_gate_sink(tmp_path / "gate")
    d = daemons("ready", "--sink", "gate:write", "--ready-sink-grace", "0.5",
                "--retry-max-delay", "0.05", env=env)
    assert d.get_json("/readyz")[0] == 200
    assert d.post([{"a": 1}])[0] == 200
    failing = d.wait_event("sink_failing")
    assert "gate is closed" in failing["error"]
    status, body = wait_until(lambda: (r := d.get_json("/readyz"))[0] == 503 and r,
                              what="/readyz 503")
    assert any("sink failing for" in r and "gate is closed" in r for r in body["reasons"]), body
    assert d.metric("walbatch_sink_failing_seconds") > 0.5
    assert d.metric('walbatch_sink_errors_total{kind="transient"}') >= 1
    Path(env["WALBATCH_TEST_GATE"]).touch()
    recovered = d.wait_event("sink_recovered")
    assert recovered["failed_attempts"] >= 1 and recovered["down_seconds"] > 0.5
    wait_until(lambda: d.get_json("/readyz")[0] == 200, what="/readyz 200 again")
    assert d.metric("walbatch_sink_failing_seconds") == 0
    # One line when the sink started failing, one when it recovered: not one per retry.
    events = [e.get("event") for e in d.events()]
    assert events.count("sink_failing") == 1 and events.count("sink_recovered") == 1


# -------------------------------------------------------------- metrics

def test_metrics_count_what_happened(tmp_path, daemons):
    out = tmp_path / "m.jsonl"
    d = daemons("metrics", "--sink", f"file://{out}", "--max-items", "10")
    assert d.post([{"i": i} for i in range(25)])[0] == 200
    flush(d)
    m = d.metrics()
    assert m["walbatch_items_submitted_total"] == 25
    assert m["walbatch_items_delivered_total"] == 25
    assert m["walbatch_items_pending"] == 0 and m["walbatch_oldest_pending_age_seconds"] == 0
    assert m["walbatch_batch_items_sum"] == 25 and m["walbatch_batch_items_count"] >= 3
    assert m['walbatch_flushes_total{reason="size"}'] == 2
    assert m["walbatch_commit_group_items_sum"] == 25
    assert m["walbatch_fsync_duration_seconds_count"] == m["walbatch_commit_groups_total"] == 1
    assert m["walbatch_sink_write_duration_seconds_count"] == m["walbatch_batch_items_count"]
    assert m['walbatch_http_requests_total{code="200",path="/v1/items"}'] == 1
    assert m["walbatch_log_capacity_bytes"] == 1 << 30
    assert m["walbatch_failed"] == 0 and m["walbatch_breaker_open"] == 0


# ------------------------------------------------------------ hostile HTTP

def raw(d: HttpDaemon) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", d.port), timeout=WAIT)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def test_slow_headers_are_cut_off_and_others_are_served_meanwhile(shared):
    slow = [raw(shared) for _ in range(20)]
    for s in slow:
        s.sendall(b"POST /v1/items HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
    t0 = time.monotonic()
    assert shared.post([{"during": "slowloris"}])[0] == 200
    assert shared.get_json("/healthz")[0] == 200
    for s in slow:
        assert read_all(s) == b""  # closed (idle timeout 1 s), nothing taken
        s.close()
    assert time.monotonic() - t0 < 10


def test_a_slow_body_gets_408_and_nothing_is_written(shared):
    before = submitted(shared)
    s = raw(shared)
    s.sendall(b"POST /v1/items HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
              b"Content-Length: 100\r\n\r\n{\"a\":")
    answer = read_all(s)
    s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert submitted(shared) == before


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",  # one huge header
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500))
    + b"\r\n",  # too many headers
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a huge request line
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # TLS to a plain port
    b"POST /v1/items HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/x-ndjson\r\n\r\nzz\r\n",  # a bad chunk size
])
def test_malformed_requests_get_400_or_a_closed_connection(shared, request_bytes):
    before = submitted(shared)
    s = raw(shared)
    try:
        s.sendall(request_bytes)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = read_all(s)
    s.close()
    assert answer == b"" or answer.split(b" ")[1][:1] == b"4", answer[:200]
    assert submitted(shared) == before
    assert shared.get_json("/healthz")[0] == 200


def test_a_body_that_does_not_decode_is_400(shared):
    answer = refused_nothing_written(shared, 400, b"this is not gzip",
                                     {**NDJSON, "Content-Encoding": "gzip"})
    assert "could not be read" in answer["error"] and "gzip" in answer["error"]


def test_a_flood_of_malformed_requests_is_a_few_log_lines_without_tracebacks(tmp_path, daemons):
    d = daemons("flood")
    before = len(d.log_lines())
    for i in range(50):
        s = raw(d)
        s.sendall(b"POST /v1/items HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                  b"Content-Encoding: br\r\nContent-Length: 2\r\n\r\n{}" if i % 2 else
                  b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert read_all(s).split(b" ")[1][:1] == b"4"
        s.close()
    assert d.get_json("/healthz")[0] == 200
    new = d.events()[before:]
    assert 1 <= len([e for e in new if e.get("event") == "http_bad_request"]) <= 2
    assert not [e for e in new if "exception" in e or e.get("level") == "error"], new


def test_many_clients_at_once_all_get_their_answers(shared):
    answers: list[int] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(10):
            status = shared.post([{"c": i, "j": j}])[0]
            with lock:
                answers.append(status)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert answers == [200] * 160


def test_unknown_routes_and_methods(shared):
    assert shared.request("GET", "/v1/items")[0] == 405
    assert shared.request("GET", "/nope")[0] == 404
    assert shared.metrics()['walbatch_http_requests_total{code="404",path="other"}'] >= 1


# ---------------------------------------------------------------- misc

def test_the_start_line_names_the_sink_without_credentials(tmp_path, daemons):
    env = write_gate_sink(tmp_path / "gate")
    d = daemons("start", "--sink", "gate:write", env=env)
    started = d.wait_event("started")
    assert started["sink"] == "gate:write" and started["backlog"] == 0
    assert started["log_id"] and started["http"].startswith("127.0.0.1:")
    d.stop()
    # An HTTP sink URL with a password: the start line shows neither it nor the query.
    d2 = daemons("start2", "--sink", "http://user:pa55word@127.0.0.1:9/bulk?query.token=qX7sEcReTzz",
                 start=False)
    d2.start()
    text = d2.log_text()
    assert "pa55word" not in text and "qX7sEcReTzz" not in text
    assert d2.wait_event("started")["sink"] == "http://127.0.0.1:9/bulk"


def test_without_aiohttp_the_message_names_the_extra(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "aiohttp.py").write_text("raise ImportError('blocked by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    proc = subprocess.run([sys.executable, "-m", "walbatch", "serve", "--data-dir",
                           str(tmp_path / "d"), "--http", "127.0.0.1:0"], capture_output=True,
                          text=True, timeout=WAIT, env=env)
    assert proc.returncode == 1 and "pip install 'walbatch[http]'" in proc.stderr


def test_a_bad_http_address_is_a_usage_error(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "walbatch", "serve", "--data-dir",
                           str(tmp_path / "d"), "--http", "9464"], capture_output=True, text=True,
                          timeout=WAIT)
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr


def test_http_from_the_config_file_and_the_environment(tmp_path, daemons):
    config = tmp_path / "walbatch.toml"
    config.write_text('http = "127.0.0.1:0"\nhttp_max_body = "1KiB"\nlog_format = "json"\n')
    d = daemons("toml", start=False)
    d.cmd = [c for c in d.cmd if c not in ("--http", "127.0.0.1:0")] + ["--config", str(config)]
    d.start()
    assert d.post([{"a": "x" * 2000}])[0] == 413  # the file's limit is in force
    d.stop()
    d2 = daemons("env", start=False, env={"WALBATCH_HTTP": "127.0.0.1:0"})
    d2.cmd = [c for c in d2.cmd if c not in ("--http", "127.0.0.1:0")]
    d2.start()
    assert d2.post([{"a": 1}])[0] == 200


def test_sqlite_default_sink_over_http(tmp_path, daemons):
    d = daemons("sqlite")
    assert d.post([{"user": 1}, {"user": 2}])[0] == 200
    flush(d)
    conn = sqlite3.connect(d.data_dir / "walbatch.db")
    try:
        assert list(conn.execute("SELECT user FROM items ORDER BY _seq")) == [(1,), (2,)]
    finally:
        conn.close()


def test_http_connections_past_the_descriptor_limit_get_503_and_the_log_keeps_working(daemons):
    # An HTTP flood must not take the descriptors the log (new segments) and the sink
    # need: HTTP and the socket share the daemon's budget, as the socket alone did.
    d = daemons("fds", "--segment-bytes", "4096", "--max-log-bytes", "1MiB",
                prefix=["prlimit", "--nofile=128:128", "--"])
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.ping()["pong"] is True  # connected before the flood
        idle = [socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) for _ in range(100)]
        try:
            ready = answered(idle, 100 - 64)
            refused = [s.recv(4096) for s in ready]
            assert len(refused) >= 100 - (128 - 64), len(refused)
            assert all(r.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in r
                       for r in refused), {r[:60] for r in refused}
            with pytest.raises(Busy):  # the socket shares the budget
                Client(d.socket_path, timeout=WAIT).ping()
            # The client that was there first goes on, across several new segments.
            seqs = [c.submit({"n": n, "pad": "x" * 500}) for n in range(40)]
            c.flush(timeout=WAIT)
        finally:
            for s in idle:
                s.close()
    assert seqs == list(range(1, 41))
    deadline = time.monotonic() + WAIT
    while True:  # room again once the daemon saw them go
        try:
            if d.post([{"after": 1}])[0] == 200:
                break
        except OSError:  # a refused connection may be reset rather than answered
            pass
        assert time.monotonic() < deadline, "still refusing after every idle connection left"
        time.sleep(0.05)
    assert [e for e in d.events() if e.get("event") == "connections_full"]
    assert "Traceback" not in d.log_text(), d.log_text()[-2000:]
