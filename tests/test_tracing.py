"""walbatch.tracing with the OpenTelemetry SDK's in-memory exporter: delivery spans and their links."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import pytest
from helpers import WAIT
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import walbatch.tracing
from walbatch.errors import SinkError
from walbatch.observer import _noop


@pytest.fixture
def otel():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    yield tracer, exporter
    provider.shutdown()


def deliveries(exporter):
    return [s for s in exporter.get_finished_spans() if s.name == "walbatch deliver"]


def linked(span) -> set[int]:
    return {link.context.span_id for link in span.links}


def test_the_delivering_span_links_to_every_submitters_span(make, otel):
    tracer, exporter = otel
    b = make(lambda batch: None, max_delay=60, max_items=100)
    walbatch.tracing.trace(b, tracer=tracer, sink="test-sink")
    with tracer.start_as_current_span("request 1") as s1:
        b.submit({"n": 1})
    with tracer.start_as_current_span("request 2") as s2:
        b.submit_many([{"n": 2}, {"n": 3}])
    b.submit({"n": 4})  # outside any span: no link, no cost
    b.flush(timeout=WAIT)
    [span] = deliveries(exporter)
    assert linked(span) == {s1.get_span_context().span_id, s2.get_span_context().span_id}
    assert span.attributes["walbatch.batch.size"] == 4
    assert span.attributes["walbatch.batch.reason"] == "flush"
    assert span.attributes["walbatch.batch.attempt"] == 1
    assert span.attributes["walbatch.sink"] == "test-sink"
    assert span.attributes["walbatch.log_id"] == b.log_id
    assert span.status.status_code == StatusCode.UNSET
    assert span.end_time > span.start_time


def test_each_attempt_is_a_span_and_a_failed_one_says_so(make, otel):
    tracer, exporter = otel
    calls = []

    def sink(batch):
        calls.append(len(batch))
        if len(calls) < 3:
            raise SinkError("not yet")

    b = make(sink)
    obs = walbatch.tracing.trace(b, tracer=tracer)
    with tracer.start_as_current_span("request") as s:
        b.submit("x")
    b.flush(timeout=WAIT)
    spans = deliveries(exporter)
    assert [sp.attributes["walbatch.batch.attempt"] for sp in spans] == [1, 2, 3]
    assert [sp.status.status_code for sp in spans] == [StatusCode.ERROR, StatusCode.ERROR,
                                                       StatusCode.UNSET]
    assert spans[0].events[0].name == "exception"
    assert all(linked(sp) == {s.get_span_context().span_id} for sp in spans)  # every attempt
    assert obs._ranges == {}  # delivered: forgotten
    assert spans[0].attributes["walbatch.sink"] == "FunctionSink"  # the default: its class


def test_keyed_batches_link_to_their_own_items_spans(make, otel):
    tracer, exporter = otel
    b = make(lambda batch: None, max_delay=60)
    walbatch.tracing.trace(b, tracer=tracer)
    spans = {}
    for key in ("a", "b", "a", "b"):
        with tracer.start_as_current_span(f"req {key}") as s:
            b.submit(key, key=key)
            spans.setdefault(key, set()).add(s.get_span_context().span_id)
    b.flush(timeout=WAIT)
    got = sorted(sorted(linked(sp)) for sp in deliveries(exporter))
    assert got == sorted(sorted(ids) for ids in spans.values())  # two batches, two links each


def test_asubmit_links_to_the_awaiting_tasks_span(make, otel):
    tracer, exporter = otel
    b = make(lambda batch: None, max_delay=60)
    walbatch.tracing.trace(b, tracer=tracer)

    async def handler(i: int) -> int:
        with tracer.start_as_current_span(f"task {i}") as s:
            await b.asubmit({"task": i})
            return s.get_span_context().span_id

    async def main() -> list[int]:
        return await asyncio.gather(*(handler(i) for i in range(5)))

    ids = asyncio.run(main())
    b.flush(timeout=WAIT)
    assert set().union(*(linked(sp) for sp in deliveries(exporter))) == set(ids)


def test_remembered_contexts_are_bounded(make, otel, monkeypatch):
    tracer, exporter = otel
    monkeypatch.setattr(walbatch.tracing, "MAX_PENDING", 10)
    gate = threading.Event()

    def sink(batch):
        gate.wait(WAIT)

    b = make(sink, max_delay=60)
    obs = walbatch.tracing.trace(b, tracer=tracer)
    ids = []
    for i in range(25):
        with tracer.start_as_current_span(f"r{i}") as s:
            b.submit(i)
            ids.append(s.get_span_context().span_id)
    assert len(obs._ranges) == 10
    gate.set()
    b.flush(timeout=WAIT)
    assert set().union(*(linked(sp) for sp in deliveries(exporter))) == set(ids[-10:])
    assert obs._ranges == {}


def test_untraced_batchers_pay_nothing(make):
    b = make(lambda batch: None)
    assert b.observers.submitted is _noop  # the only hook on submit's path, a no-op


def test_without_opentelemetry_the_message_names_the_extra(tmp_path):
    blocker = tmp_path / "block"
    (blocker / "opentelemetry").mkdir(parents=True)
    (blocker / "opentelemetry" / "__init__.py").write_text("raise ImportError('blocked')\n")
    code = ("import walbatch, walbatch.tracing as t\n"
            "b = walbatch.DurableBatcher('log', lambda batch: None)\n"
            "try:\n    t.trace(b)\nexcept ImportError as ex:\n    print(ex)\nb.close()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=WAIT, env={**os.environ, "PYTHONPATH": str(blocker)})
    assert "pip install 'walbatch[otel]'" in proc.stdout, proc.stderr


# ------------------------------------------------------------ the daemon

TRACED_DAEMON = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
    out=open(sys.argv.pop(1), "w", buffering=1))))
trace.set_tracer_provider(provider)
from walbatch.cli import main
sys.argv[0] = "walbatch"
main()
"""


def read_spans(path) -> list[dict]:
    import json

    text, spans, i = path.read_text(), [], 0
    decoder = json.JSONDecoder()
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return spans
        span, i = decoder.raw_decode(text, i)
        spans.append(span)


def test_the_daemon_links_deliveries_to_the_http_requests_traceparent(tmp_path):
    import time

    from http_daemon import HttpDaemon

    from walbatch.client import Client

    spans_file = tmp_path / "spans.json"
    d = HttpDaemon(tmp_path / "data", ["--otel", "--sink", f"file://{tmp_path / 'out.jsonl'}"])
    d.cmd = [sys.executable, "-c", TRACED_DAEMON, str(spans_file), *d.cmd[3:]]
    d.start()
    try:
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        status, _, answer = d.post([{"n": 1}, {"n": 2}],
                                   headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        assert status == 200
        with Client(d.socket_path, timeout=WAIT) as c:
            c.flush(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while not [s for s in read_spans(spans_file) if s["name"] == "walbatch deliver"]:
            assert time.monotonic() < deadline, spans_file.read_text()
            time.sleep(0.05)
    finally:
        d.stop()
    spans = read_spans(spans_file)
    [request] = [s for s in spans if s["name"] == "walbatch http submit"]
    assert request["context"]["trace_id"] == "0x" + trace_id  # a child of the caller's span
    assert request["parent_id"] == "0x" + parent_id
    [delivery] = [s for s in spans if s["name"] == "walbatch deliver"]
    assert [link["context"]["span_id"] for link in delivery["links"]] == [
        request["context"]["span_id"]]
    assert delivery["attributes"]["walbatch.batch.size"] == 2
    assert delivery["attributes"]["walbatch.sink"].startswith("file://")
