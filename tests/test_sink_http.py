"""The HTTP bulk sink against a real HTTP server started by the test (http_server.BulkAPI)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from typing import Any

import pytest
from helpers import WAIT, acking_writer, payload_ok, read_acks
from http_server import BulkAPI, Fault, Request

from walbatch import Batch, DeadLettered, DurableBatcher, PermanentSinkError, Record, SinkError, values
from walbatch.sinks import sink_from_url
from walbatch.sinks.http import HTTPSink, from_url, idempotency_key, parse_retry_after
from walbatch.values import equal

zstandard = pytest.importorskip("zstandard")

LOG_ID = "6f1c2a8e-0000-4000-8000-000000000001"


@pytest.fixture
def api():
    server = BulkAPI()
    yield server
    server.stop()


def batch(*items: Any, first_seq: int = 1, attempt: int = 1) -> Batch:
    return Batch([Record(first_seq + i, item) for i, item in enumerate(items)], LOG_ID, "size", attempt)


def values_lines(req: Request) -> list[Any]:
    """The request's lines read back under the value mapping."""
    return [values.loads(line) for line in req.body.split(b"\n")[:-1]]


def check_exactly_once(api: BulkAPI, expected: dict[int, Any]) -> None:
    assert not api.malformed
    assert api.stored() == expected
    assert api.identity_dups == 0 and not api.mismatches


# --------------------------------------------------------------- round trips


ITEMS = [{"user": 1, "action": "login"}, "plain text", 42, 2.5, None, True, [1, "two", None],
         {"nested": {"deep": [1, 2]}, "blob": b"\x00\xffbin"}, b"raw bytes", "unicodé ☃",
         {1: "int key", "1": "str key"}, float("nan"), {"$base64": "not bytes"}, -0.0]


def as_json(item: Any) -> Any:
    """What a plain JSON reader gets for an item: its form under the value mapping."""
    return json.loads(values.dumps(item))


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_round_trip_through_a_durable_batcher(api, make, compress):
    b = make(f"{api.url}/bulk?compress={compress}", max_items=4)
    receipts = [b.submit(item) for item in ITEMS]
    b.flush(timeout=WAIT)
    for r in receipts:
        r.wait(timeout=WAIT)
    expected = {r.seq: as_json(item) for r, item in zip(receipts, ITEMS, strict=True)}
    check_exactly_once(api, expected)
    back = {line["seq"]: line["item"] for req in api.accepted for line in values_lines(req)}
    assert all(equal(back[r.seq], item) for r, item in zip(receipts, ITEMS, strict=True))
    reqs = api.sent()
    assert len(reqs) >= len(ITEMS) // 4
    for req in reqs:
        assert req.headers["content-type"] == "application/x-ndjson"
        assert req.headers.get("content-encoding", "none") == compress
        assert req.headers["walbatch-log-id"] == b.log_id
        for line in req.lines:
            assert line["log_id"] == b.log_id and set(line) == {"log_id", "seq", "item"}
        seqs = [line["seq"] for line in req.lines]
        assert req.key == f"{b.log_id}:{seqs[0]}-{seqs[-1]}"
        assert req.headers["walbatch-first-seq"] == str(seqs[0])
        assert req.headers["walbatch-last-seq"] == str(seqs[-1])
    if compress == "gzip":
        assert reqs[0].wire[:2] == b"\x1f\x8b"
    stats = b.stats()
    assert stats.delivered == len(ITEMS) and stats.dead_lettered == 0


def test_bare_items_without_envelope_carry_identity_in_headers(api, make):
    b = make(f"{api.url}/bulk?envelope=0&compress=none", max_items=100)
    items = [{"n": i} for i in range(10)] + ["text", 7]
    receipts = b.submit_many(items)
    b.flush(timeout=WAIT)
    (req,) = api.sent()
    assert req.body == b"".join(json.dumps(i, separators=(",", ":")).encode() + b"\n" for i in items)
    assert req.headers["walbatch-first-seq"] == str(receipts.first_seq)
    assert req.headers["walbatch-count"] == str(len(items))
    check_exactly_once(api, dict(zip(receipts.seqs, items, strict=True)))


def test_headers_from_the_url_the_environment_a_file_and_the_constructor(api, tmp_path, monkeypatch):
    monkeypatch.setenv("WB_TEST_TOKEN", "Bearer s3cret")
    hfile = tmp_path / "headers"
    hfile.write_text("# comment\nX-Tenant: acme\n")
    sink = sink_from_url(f"{api.url}/bulk?header=X-Api:Key%20x&header=X-Two:2"
                         f"&header_env=Authorization:WB_TEST_TOKEN&headers_file={hfile}"
                         "&content_type=application/json-seq&query.pipeline=p1&query.refresh=true")
    try:
        assert isinstance(sink, HTTPSink)
        assert "s3cret" not in repr(sink)
        sink.write(batch({"a": 1}))
    finally:
        sink.close()
    (req,) = api.sent()
    h = req.headers
    assert (h["x-api"], h["x-two"], h["x-tenant"]) == ("Key x", "2", "acme")
    assert h["authorization"] == "Bearer s3cret"
    assert h["content-type"] == "application/json-seq"
    own = HTTPSink(f"{api.url}/bulk", headers={"Authorization": "Bearer k"}, compress="none")
    try:
        own.write(batch({"b": 2}, first_seq=2))
    finally:
        own.close()
    assert api.sent()[1].headers["authorization"] == "Bearer k"


def test_query_passthrough_and_basic_auth_from_user_info(api):
    seen: list[str] = []
    api.rule = lambda req: seen.append(req.headers["authorization"]) or None
    sink = from_url(f"http://ann:p%40ss@127.0.0.1:{api.server.server_address[1]}/b?query.x=1")
    try:
        assert sink.path == "/b?x=1"
        assert "p@ss" not in repr(sink) and "ann" not in repr(sink)
        sink.write(batch(1))
    finally:
        sink.close()
    import base64
    assert seen == ["Basic " + base64.b64encode(b"ann:p@ss").decode()]


# ------------------------------------------------------- keys and retries


def test_a_retry_sends_the_same_key_and_the_same_bytes(api, make):
    api.faults.append(Fault("status", 503))
    b = make(f"{api.url}/bulk", max_items=50)
    receipts = b.submit_many([{"i": i} for i in range(20)])
    b.flush(timeout=WAIT)
    first, second = api.sent()
    assert first.key == second.key == idempotency_key(b.log_id, list(receipts.seqs))
    assert first.wire == second.wire
    assert (first.headers["walbatch-attempt"], second.headers["walbatch-attempt"]) == ("1", "2")
    assert b.stats().retries == 1
    check_exactly_once(api, {s: {"i": i} for i, s in enumerate(receipts.seqs)})


@pytest.mark.parametrize(("status", "retry_after"), [(429, "0.3"), (503, "0.3"), (429, "1")])
def test_retry_after_is_honoured(api, make, status, retry_after):
    api.faults.append(Fault("status", status, {"Retry-After": retry_after}))
    b = make(f"{api.url}/bulk")
    b.submit({"x": 1})
    b.flush(timeout=WAIT)
    first, second = api.sent()
    assert second.at - first.at >= float(retry_after)
    assert b.stats().delivered == 1


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after(" 0.25 ", now) == 0.25
    assert parse_retry_after(formatdate(now + 120, usegmt=True), now) == pytest.approx(120, abs=1)
    assert parse_retry_after(formatdate(now - 120, usegmt=True), now) == 0.0
    for bad in (None, "", "soon", "-1", "nan", "inf"):
        assert parse_retry_after(bad, now) is None


FAILURES = {
    "503": [Fault("status", 503, {"Retry-After": "0"})],
    "500 after storing": [Fault("status", 500, store=True)],
    "502 twice": [Fault("status", 502), Fault("status", 502, body=b"<html>bad gateway</html>")],
    "408": [Fault("status", 408)],
    "reset before storing": [Fault("reset"), Fault("reset")],
    "reset after storing": [Fault("reset", store=True), Fault("reset", store=True)],
    "slow answer (client timeout)": [Fault("slow", delay=1.0)],
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_transient_failures_then_success_deliver_exactly_once(api, make, failure):
    api.faults.extend(FAILURES[failure])
    b = make(f"{api.url}/bulk?timeout=0.3", max_items=10)
    receipts = b.submit_many([{"i": i} for i in range(25)])
    receipts.wait(timeout=WAIT)
    b.flush(timeout=WAIT)
    stats = b.stats()
    assert stats.delivered == 25 and stats.dead_lettered == 0 and stats.retries >= 1
    check_exactly_once(api, {s: {"i": i} for i, s in enumerate(receipts.seqs)})
    assert all(req.status in (0, 200, 408, 500, 502, 503) for req in api.sent())


def test_a_dropped_keep_alive_connection_is_reopened_without_a_retry(api):
    sink = HTTPSink(f"{api.url}/bulk")
    try:
        api.faults.append(Fault("drop"))
        sink.write(batch({"a": 1}))
        time.sleep(0.05)  # let the server's close arrive
        sink.write(batch({"b": 2}, first_seq=2))  # no SinkError: one quiet reconnect
        assert sink.stats()["stale_reconnects"] == 1
    finally:
        sink.close()
    check_exactly_once(api, {1: {"a": 1}, 2: {"b": 2}})


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_content_status_for_one_item_refuses_it(api, status):
    api.faults.append(Fault("status", status, body=b'{"error": "mapping failed for field x"}'))
    sink = HTTPSink(f"{api.url}/bulk")
    try:
        with pytest.raises(PermanentSinkError, match=f"HTTP {status}.*mapping failed for field x"):
            sink.write(batch({"a": 1}))
    finally:
        sink.close()


@pytest.mark.parametrize("status", [401, 403, 404, 405, 301, 409, 415])
def test_a_status_about_the_endpoint_is_transient(api, status):
    # A wrong URL, a refused credential, a redirect: no item is to blame, and each would
    # be refused alike. The items wait in the log until the endpoint is fixed.
    api.faults.append(Fault("status", status, body=b'{"error": "token expired"}'))
    sink = HTTPSink(f"{api.url}/bulk")
    try:
        with pytest.raises(SinkError, match=f"HTTP {status}.*token expired") as info:
            sink.write(batch({"a": 1}, {"b": 2}))
    finally:
        sink.close()
    assert info.value.retryable
    assert len(api.sent()) == 1  # not split: the items are not to blame


@pytest.mark.parametrize("status", [408, 429, 500, 503, 599])
def test_transient_statuses_raise_retryable_sink_errors(api, status):
    api.faults.append(Fault("status", status, {"Retry-After": "7"}))
    sink = HTTPSink(f"{api.url}/bulk")
    try:
        with pytest.raises(SinkError) as info:
            sink.write(batch({"a": 1}))
    finally:
        sink.close()
    assert info.value.retryable and info.value.retry_after == 7.0
    assert f"HTTP {status}" in str(info.value)


def test_retry_status_makes_a_4xx_transient(api):
    api.faults.append(Fault("status", 401))
    sink = from_url(f"{api.url}/bulk?retry_status=401,403")
    try:
        with pytest.raises(SinkError) as info:
            sink.write(batch({"a": 1}))
        assert info.value.retryable
    finally:
        sink.close()


def test_connection_refused_is_transient():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    sink = HTTPSink(f"http://127.0.0.1:{port}/bulk", timeout=1)
    with pytest.raises(SinkError) as info:
        sink.write(batch({"a": 1}))
    assert info.value.retryable and "ConnectionRefusedError" in str(info.value)


# ---------------------------------------------------------- dead letters


def refuse_users(*bad: int) -> Any:
    """A server rule: 400 for any request holding an item whose "user" is in ``bad``."""
    def rule(req: Request) -> Fault | None:
        if any(isinstance(line, dict) and line.get("item", {}).get("user") in bad
               for line in req.lines):
            return Fault("status", 400, body=b'{"error":"field user must be a string"}')
        return None
    return rule


def test_a_400_for_one_items_content_dead_letters_that_item_alone(api, make):
    api.rule = refuse_users(11, 40)
    b = make(f"{api.url}/bulk", max_items=100)
    receipts = b.submit_many([{"user": i} for i in range(64)])
    b.flush(timeout=WAIT)
    s = list(receipts.seqs)
    with pytest.raises(DeadLettered, match="HTTP 400"):
        receipts[11].wait(timeout=WAIT)
    dead = b.dead_letters.list()
    assert [d.seq for d in dead] == [s[11], s[40]]
    assert "HTTP 400" in dead[0].error and "field user must be a string" in dead[0].error
    assert dead[0].error_type == "PermanentSinkError"
    check_exactly_once(api, {seq: {"user": i} for i, seq in enumerate(s) if i not in (11, 40)})
    # halving: two bad items among 64 cost a few dozen requests, not one per item
    assert len(api.sent()) <= 2 * 2 * 6 + 1


def test_values_json_has_no_form_for_arrive_tagged_and_a_too_deep_item_alone_is_refused(api, make):
    b = make(f"{api.url}/bulk", max_items=100)
    too_deep: object = 0
    for _ in range(600):
        too_deep = [too_deep]
    items = [{"ok": 1}, {"nan": float("nan")}, {b"bytes key": 1}, {"deep": too_deep}, {"ok": 2}]
    receipts = b.submit_many(items)
    b.flush(timeout=WAIT)
    dead = {d.seq: d.error for d in b.dead_letters.list()}
    s = list(receipts.seqs)
    assert set(dead) == {s[3]} and "nested deeper than 512 levels" in dead[s[3]]
    check_exactly_once(api, {seq: as_json(item) for seq, item in zip(s, items, strict=True)
                             if seq != s[3]})


# -------------------------------------------------------------- splitting


def test_a_batch_over_max_body_bytes_is_split_with_a_key_per_part(api, make):
    limit = 1000
    b = make(f"{api.url}/bulk?max_body_bytes={limit}", max_items=200, max_bytes=1 << 20)
    items = [{"i": i, "pad": "p" * (i % 40)} for i in range(120)]
    receipts = b.submit_many(items)
    b.flush(timeout=WAIT)
    reqs = api.sent()
    assert len(reqs) > 5
    assert all(len(req.body) <= limit for req in reqs)
    keys = [req.key for req in reqs]
    assert len(set(keys)) == len(keys)
    for req in reqs:
        seqs = [line["seq"] for line in req.lines]
        assert req.key == idempotency_key(b.log_id, seqs)
    # greedy: each part but the last would have overflowed with the next line
    for req, nxt in zip(reqs, reqs[1:], strict=False):
        assert len(req.body) + len(nxt.body.split(b"\n", 1)[0]) + 1 > limit
    check_exactly_once(api, dict(zip(receipts.seqs, items, strict=True)))


def test_an_item_larger_than_max_body_bytes_is_dead_lettered(api, make):
    b = make(f"{api.url}/bulk?max_body_bytes=500", max_items=100)
    receipts = b.submit_many([{"small": 1}, {"huge": "h" * 1000}, {"small": 2}])
    b.flush(timeout=WAIT)
    with pytest.raises(DeadLettered, match="more than max_body_bytes=500"):
        receipts[1].wait(timeout=WAIT)
    s = list(receipts.seqs)
    check_exactly_once(api, {s[0]: {"small": 1}, s[2]: {"small": 2}})
    assert b.stats().dead_lettered == 1


def test_when_one_part_fails_only_its_items_fail(api, make):
    # Item 7 (in part 2 of ~6) gets a 400: it alone is dead-lettered. The first request
    # holding item 30 gets a 503: that part and the unsent ones after it are retried,
    # the 503'd one under its key with the same bytes.
    failed: list[Request] = []

    def rule(req: Request) -> Fault | None:
        items = [line["item"]["i"] for line in req.lines]
        if 7 in items:
            return Fault("status", 400, body=b"bad item")
        if 30 in items and not failed:
            failed.append(req)
            return Fault("status", 503, {"Retry-After": "0"})
        return None

    api.rule = rule
    b = make(f"{api.url}/bulk?max_body_bytes=600&compress=none", max_items=100)
    items = [{"i": i, "pad": "q" * 20} for i in range(40)]
    receipts = b.submit_many(items)
    b.flush(timeout=WAIT)
    reqs = api.sent()
    bad = {receipts[7].seq}
    retried = [r for r in reqs if r.headers["walbatch-attempt"] == "2"]
    assert retried and retried[0].key == failed[0].key and retried[0].wire == failed[0].wire
    assert {d.seq for d in b.dead_letters.list()} == bad
    expected = {s: it for s, it in zip(receipts.seqs, items, strict=True) if s not in bad}
    check_exactly_once(api, expected)
    stats = b.stats()
    assert stats.delivered == 40 - len(bad) and stats.dead_lettered == len(bad)


def test_retry_after_is_honoured_when_a_refused_item_comes_first(api, make):
    # The first failed record of the batch is a refused one (too deep); the 429 comes later.
    n = {"req": 0}

    def rule(req: Request) -> Fault | None:
        n["req"] += 1
        return Fault("status", 429, {"Retry-After": "0.3"}) if n["req"] == 2 else None

    api.rule = rule
    b = make(f"{api.url}/bulk?max_body_bytes=300&compress=none", max_items=100)
    too_deep: object = 0
    for _ in range(600):
        too_deep = [too_deep]
    items = [{"bad": too_deep}] + [{"i": i, "pad": "w" * 30} for i in range(20)]
    receipts = b.submit_many(items)
    b.flush(timeout=WAIT)
    reqs = api.sent()
    again = [r for r in reqs[2:] if r.key == reqs[1].key]
    assert again and again[0].at - reqs[1].at >= 0.3
    s = list(receipts.seqs)
    assert [d.seq for d in b.dead_letters.list()] == [s[0]]
    check_exactly_once(api, dict(zip(s[1:], items[1:], strict=True)))


def test_a_partial_retry_is_cut_into_the_same_requests(api):
    # Parts 1..n; an item of part 2 gets a 400 (part 2 is halved until it is alone) and
    # part 3 a 503, so 4.. are not sent. The retry holds parts 3.. only: it must be cut
    # exactly as before (same keys, same bytes).
    sink = HTTPSink(f"{api.url}/bulk", max_body_bytes=300, compress="none")
    full = batch(*[{"i": i, "pad": "z" * (5 + (i * 7) % 30)} for i in range(30)])
    planned = [[r.seq for r in part.records] for part in sink._cut(full, LOG_ID, {})]
    assert len(planned) >= 5 and len(planned[1]) >= 2
    bad_seq, first_of_3 = planned[1][-1], planned[2][0]
    answered_503 = []

    def rule(req: Request) -> Fault | None:
        seqs = [line["seq"] for line in req.lines]
        if bad_seq in seqs:
            return Fault("status", 400)
        if first_of_3 in seqs and not answered_503:
            answered_503.append(req)
            return Fault("status", 503, {"Retry-After": "2"})
        return None

    api.rule = rule
    try:
        out = sink.write(full)
        assert out is not None
        by_seq = dict(zip([r.seq for r in full], out, strict=True))
        assert all(by_seq[s] is None for s in planned[0] + planned[1][:-1])
        assert isinstance(by_seq[bad_seq], PermanentSinkError)
        later = [s for part in planned[2:] for s in part]
        assert all(by_seq[s].retryable and by_seq[s].retry_after == 2.0 for s in later)
        sent = api.sent()
        assert sent[-1] is answered_503[0]  # nothing sent after the 503
        retry = Batch([r for r in full if r.seq in set(later)], LOG_ID, "size", 2)
        assert sink.write(retry) is None
    finally:
        sink.close()
    reqs = api.sent()
    assert [[line["seq"] for line in r.lines] for r in reqs[len(sent):]] == planned[2:]
    assert reqs[len(sent)].key == sent[-1].key and reqs[len(sent)].wire == sent[-1].wire
    assert api.stored() == {r.seq: r.item for r in full if r.seq != bad_seq}


# ------------------------------------------------------ connections, options


def test_one_keep_alive_connection_per_delivery_thread(api, make):
    b = make(f"{api.url}/bulk", max_items=5, flush_concurrency=3)
    receipts = b.submit_many([{"i": i} for i in range(200)])
    b.flush(timeout=WAIT)
    reqs = api.sent()
    assert len(reqs) >= 40
    assert len({r.conn for r in reqs}) <= 3
    check_exactly_once(api, {s: {"i": i} for i, s in enumerate(receipts.seqs)})
    b.close(timeout=WAIT)
    deadline = time.monotonic() + WAIT
    while api.closed < api.opened and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.closed == api.opened, "close() left connections open"


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_https_with_a_private_ca_and_a_refused_certificate(tls_cert):
    cert, key = tls_cert
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = BulkAPI(tls=ctx)
    try:
        sink = from_url(f"{server.url}/bulk?ca_file={cert}")
        try:
            assert sink.write(batch({"a": 1}, {"b": 2})) is None
            assert sink.write(batch({"c": 3}, first_seq=3)) is None
        finally:
            sink.close()
        check_exactly_once(server, {1: {"a": 1}, 2: {"b": 2}, 3: {"c": 3}})
        assert len({r.conn for r in server.sent()}) == 1  # keep-alive over TLS too
        untrusting = from_url(f"{server.url}/bulk")  # the system CAs do not know ours
        with pytest.raises(SinkError, match="CERTIFICATE_VERIFY_FAILED") as info:
            untrusting.write(batch({"d": 4}, first_seq=4))
        assert info.value.retryable  # a setup problem: the log keeps the items meanwhile
    finally:
        server.stop()


@pytest.mark.parametrize(("url", "message"), [
    ("http:///bulk", "has no host"),
    ("http://127.0.0.1:99999/bulk", "bad port"),
    ("http://h/bulk?compress=brotli", "compress must be one of"),
    ("http://h/bulk?compress=gzip&compress_level=12", "compress_level for gzip"),
    ("http://h/bulk?compress=none&compress_level=1", "compress_level needs"),
    ("http://h/bulk?envelope=maybe", "envelope='maybe' is not a boolean"),
    ("http://h/bulk?max_body_bytes=5MB", "max_body_bytes='5MB' is not an integer"),
    ("http://h/bulk?max_body_bytes=10", "max_body_bytes must be an integer >= 64"),
    ("http://h/bulk?timeout=0", "timeout must be a number of seconds from 0"),
    ("http://h/bulk?timeout=abc", "timeout='abc' is not a number"),
    ("http://h/bulk?header=NoColon", "must look like header=NAME:VALUE"),
    ("http://h/bulk?header=Bad%20Name:x", "not a valid header name"),
    ("http://h/bulk?header=X-A:a%0D%0Ab", "without CR, LF or NUL"),
    ("http://h/bulk?header=Content-Length:5", "set by the sink itself"),
    ("http://h/bulk?header=Content-Type:x", "use content_type="),
    ("http://h/bulk?header=walbatch-attempt:9", "set by the sink itself"),
    ("http://h/bulk?header_env=Authorization:WB_SURELY_UNSET_VAR", "WB_SURELY_UNSET_VAR is not set"),
    ("http://h/bulk?headers_file=/nonexistent/h", "headers_file"),
    ("http://h/bulk?compres=gzip", "unknown option 'compres'"),
    ("http://h/bulk?pipeline=x", "query.pipeline="),
    ("http://h/bulk?timeout=1&timeout=2", "timeout given more than once"),
    ("http://h/bulk?timeout=inf", "from 0 to 86400"),  # was taken, then every POST failed
    ("http://h/bulk?timeout=1e400", "from 0 to 86400"),
    ("http://h/bulk?timeout=", "option timeout= is empty"),
    ("http://h/bulk?envelope", "option envelope needs a value"),
    ("http://h/bulk?retry_status=4xx", "retry_status: '4xx' is not an HTTP status code"),
    ("http://h/bulk?retry_status=42", "retry_status must hold HTTP status codes"),
    ("http://h/bulk?ca_file=/x.pem", "ca_file needs an https"),
    ("https://h/bulk?ca_file=/nonexistent.pem", "does not exist"),
    ("http://u:p@h/bulk?header=Authorization:x", "use one"),
    ("http://h/bulk#frag", "fragment"),
])
def test_malformed_urls_and_options_name_the_problem(url, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")) as info:
        sink_from_url(url)
    assert "u:p@" not in str(info.value)


def test_the_constructor_checks_its_url_too():
    with pytest.raises(ValueError, match="must start with http") as info:
        HTTPSink("ftp://u:p@h/bulk")
    assert "u:p@" not in str(info.value)
    with pytest.raises(ValueError, match="valid header name"):
        HTTPSink("http://h/", headers={"Bad Name": "x"})


def test_defaults():
    sink = from_url("https://example.com/_bulk")
    assert (sink.compress, sink.compress_level, sink.envelope) == ("gzip", 6, True)
    assert sink.max_body_bytes == 5 << 20 and sink.timeout == 30.0 and sink.port == 443
    assert sink.content_type == "application/x-ndjson"


def test_keys_for_gapped_parts_never_collide_with_contiguous_ones():
    assert idempotency_key("L", [3, 4, 5]) == "L:3-5"
    gapped = idempotency_key("L", [3, 5])
    assert gapped.startswith("L:3-5:2:") and gapped != idempotency_key("L", [3, 4, 5])
    assert idempotency_key("L", [3, 5]) == gapped  # a function of the seqs alone
    assert idempotency_key("L", [1, 2, 5]) != idempotency_key("L", [1, 4, 5])


# ----------------------------------------------------------------- kill -9


CHILD = acking_writer(dict(max_items=64, max_delay=0.005, segment_bytes=16384,
                           checkpoint_interval=0.002, retry_initial_delay=0.002,
                           retry_max_delay=0.02, flush_concurrency=2))


def test_kill_9_mid_delivery_loses_nothing_and_the_server_keeps_one_copy(api, tmp_path):
    seed = random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    rule_rng = random.Random(seed + 1)
    rule_lock = threading.Lock()

    def rule(req: Request) -> Fault | None:
        with rule_lock:
            x = rule_rng.random()
        if x < 0.05:
            return Fault("status", 503, {"Retry-After": "0"})
        if x < 0.08:
            return Fault("reset", store=True)  # landed, but the client cannot know
        if x < 0.10:
            return Fault("status", 500, store=True)
        if x < 0.20:
            return Fault("slow", delay=0.01)
        return None

    api.rule = rule
    directory = str(tmp_path)
    log_dir, acks = os.path.join(directory, "log"), os.path.join(directory, "acks")
    # Small bodies, so most batches are cut into several requests and kills land between them.
    url = f"{api.url}/bulk?max_body_bytes=2048&timeout=2"
    cycles = 10
    for cycle in range(cycles):
        seen = len(api.sent())
        child = subprocess.Popen([sys.executable, "-c", CHILD, log_dir, url, acks, str(cycle)])
        # Kill it once it is delivering (start-up time varies a lot on a busy machine).
        deadline = time.monotonic() + 20
        while len(api.sent()) < seen + 3 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        time.sleep(0.05 + rng.random() * 0.4)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    api.rule = None
    with DurableBatcher(log_dir, url) as b:
        b.flush(timeout=60)
        stats = b.stats()
    acked = read_acks(acks)
    stored = api.stored()
    ids = [item["id"] for item in stored.values()]
    summary = (f"seed={seed} cycles={cycles} acknowledged={len(acked)} stored={len(stored)} "
               f"requests={len(api.sent())} key_duplicates={sum(r.duplicate for r in api.sent())} "
               f"identity_duplicates={api.identity_dups} truncated_requests={api.truncated}")
    print(summary)
    assert len(acked) > 500, summary
    assert not api.malformed and not api.mismatches, summary
    missing = acked - set(ids)
    assert not missing, f"{len(missing)} acknowledged items never arrived: {sorted(missing)[:5]}; {summary}"
    assert len(ids) == len(set(ids)), f"an item was stored under two identities; {summary}"
    assert all(payload_ok(item["id"], item["p"]) for item in stored.values()), summary
    assert stats.submitted == stats.delivered + stats.dead_lettered + stats.pending
    assert stats.pending == 0 and stats.dead_lettered == 0, summary


def test_an_answer_sent_before_the_body_was_read_is_read_not_retried():
    # Servers refuse an oversized body as soon as they have its headers (413) and
    # close without reading it; the sink got ECONNRESET while still sending, took
    # it for a network error and retried the same body forever.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                c.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n"
                          b"Connection: close\r\n\r\ntoo large")
                # closed with the body unread: the client's send fails with a reset

    threading.Thread(target=serve, daemon=True).start()
    sink = HTTPSink(f"http://127.0.0.1:{srv.getsockname()[1]}/bulk", compress="none")
    try:
        with pytest.raises(PermanentSinkError, match="HTTP 413.*too large"):
            sink.write(batch({"i": 0, "pad": "x" * 3_000_000}))
    finally:
        sink.close()
        srv.close()
