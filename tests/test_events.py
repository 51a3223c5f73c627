"""The data path's observers (walbatch.observer) and the state log they drive (walbatch.events).

Embedded batchers with real sinks: the log lines an operator relies on come
once per change of state, with their numbers as record fields, never once per
batch or per retry.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest
from helpers import FAST, WAIT

from walbatch import DurableBatcher
from walbatch.errors import LogFull, PermanentSinkError, SinkError
from walbatch.logfmt import JsonFormatter
from walbatch.observer import Observer, Observers, _noop


def events(caplog, name: str | None = None) -> list[logging.LogRecord]:
    found = [r for r in caplog.records if getattr(r, "event", None)]
    return [r for r in found if name is None or r.event == name]


def wait_until(cond, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Gate:
    """A sink that fails (transient) until opened; records what it took."""

    def __init__(self, fail_first: int | None = None) -> None:
        self.open = threading.Event()
        self.calls = 0
        self.fail_first = fail_first
        self.items: list[object] = []

    def write(self, batch) -> None:
        self.calls += 1
        if self.fail_first is not None and self.calls > self.fail_first:
            self.open.set()
        if not self.open.is_set():
            raise SinkError("the gate is closed")
        self.items.extend(r.item for r in batch)


# ------------------------------------------------------------ observers

def test_hooks_nobody_overrides_cost_one_noop_call():
    obs = Observers()
    assert all(getattr(obs, name) is _noop for name in ("fsynced", "sink_called", "submitted"))

    class OnlyBatches(Observer):
        def __init__(self):
            self.seen = []

        def batch_closed(self, reason, items):
            self.seen.append((reason, items))

    o = OnlyBatches()
    obs.add(o)
    assert obs.fsynced is _noop and obs.batch_closed is not _noop
    obs.batch_closed("size", 3)
    assert o.seen == [("size", 3)]
    obs.remove(o)
    assert obs.batch_closed is _noop


def test_every_hook_fires_with_what_happened(make):
    calls: dict[str, list] = {}

    class Everything(Observer):
        def fsynced(self, *args):
            calls.setdefault("fsynced", []).append(args)

        def submitted(self, *args):
            calls.setdefault("submitted", []).append(args)

        def batch_closed(self, *args):
            calls.setdefault("batch_closed", []).append(args)

        def sink_called(self, *args):
            calls.setdefault("sink_called", []).append(args)

        def closed(self, *args):
            calls.setdefault("closed", []).append(args)

    b = make(lambda batch: None, max_items=3)
    b.observers.add(Everything())
    b.submit_many(["a", "b", "c", "d"])
    b.submit("e")
    b.flush(timeout=WAIT)
    b.close()
    assert [(first, n) for _, first, n in calls["fsynced"]] == [(1, 4), (5, 1)]
    assert calls["submitted"] == [(1, 4), (5, 1)]
    assert sorted(n for _, n in calls["batch_closed"]) == [2, 3]
    assert all(err is None for _, _, err, _ in calls["sink_called"])
    assert calls["closed"] == [(0, 0)]


def test_a_failing_observer_never_fails_a_submit_and_is_logged_once(make, caplog):
    class Broken(Observer):
        def fsynced(self, seconds, first_seq, count):
            raise RuntimeError("observer bug")

    got = []
    b = make(lambda batch: got.extend(r.item for r in batch))
    b.observers.add(Broken())
    with caplog.at_level(logging.ERROR, "walbatch"):
        for i in range(5):
            b.submit(i)
        b.flush(timeout=WAIT)
    assert got == [0, 1, 2, 3, 4]
    assert len([r for r in caplog.records if "observer" in r.getMessage()]) == 1


# ------------------------------------------------------------ state log

def test_sink_failing_then_recovered_one_line_each_with_counts(make, caplog):
    sink = Gate()
    b = make(sink)
    b.state_log.summary_interval = 0.05
    with caplog.at_level(logging.INFO, "walbatch"):
        b.submit_many(list(range(10)))
        wait_until(lambda: sink.calls >= 8)
        assert b.state_log.sink_failing_for() > 0
        time.sleep(0.1)
        sink.open.set()
        b.flush(timeout=WAIT)
    assert sink.items == list(range(10))
    assert b.state_log.sink_failing_for() == 0
    failing = events(caplog, "sink_failing")
    assert len(failing) == 1 and failing[0].levelno == logging.WARNING
    assert failing[0].error == "SinkError: the gate is closed" and failing[0].batch_items == 10
    summaries = events(caplog, "sink_still_failing")
    assert 1 <= len(summaries) < sink.calls - 1  # a summary per interval, not per attempt
    recovered = events(caplog, "sink_recovered")
    assert len(recovered) == 1
    assert recovered[0].failed_attempts == sink.calls - 1 and recovered[0].down_seconds > 0.1
    assert recovered[0].waiting_items == 10
    # No line per retry at INFO or above.
    assert not [r for r in caplog.records if "retrying in" in r.getMessage()
                and r.levelno >= logging.INFO]


def test_a_dead_lettered_batch_is_one_error_line_with_its_seqs(make, caplog):
    def refuse(batch):
        raise PermanentSinkError("no such table")

    b = make(refuse)
    with caplog.at_level(logging.INFO, "walbatch"):
        b.submit_many(["a", "b", "c"])
        b.flush(timeout=WAIT)
    (line,) = events(caplog, "dead_lettered")
    assert line.levelno == logging.ERROR
    assert (line.items, line.first_seq, line.last_seq) == (3, 1, 3)
    assert "no such table" in line.error


def test_breaker_opened_and_closed(make, caplog):
    sink = Gate(fail_first=3)
    b = make(sink, breaker_failures=2, breaker_cooldown=0.05)
    with caplog.at_level(logging.INFO, "walbatch"):
        b.submit("x")
        b.flush(timeout=WAIT)
    opened = events(caplog, "breaker_opened")
    assert len(opened) >= 1 and opened[0].failures == 2
    assert [r.event for r in events(caplog) if r.event.startswith("breaker")][-1] == "breaker_closed"
    assert b.stats().breaker_opens == len(opened)


def test_log_full_is_logged_once_per_interval(tmp_path, caplog):
    with DurableBatcher(tmp_path / "log", None, max_log_bytes=8192, segment_bytes=4096,
                        submit_timeout=0.05) as b, caplog.at_level(logging.WARNING, "walbatch"):
        with pytest.raises(LogFull):
            for _ in range(100):
                b.submit("x" * 500)
        with pytest.raises(LogFull):
            b.submit("x" * 500)
    full = events(caplog, "log_full")
    assert len(full) == 1 and full[0].capacity_bytes == 8192 and full[0].log_bytes > 4096


def test_close_summary_says_what_the_drain_delivered_and_what_is_left(tmp_path, caplog):
    got = []
    b = DurableBatcher(tmp_path / "a", lambda batch: got.extend(batch), max_delay=60)
    b.submit_many(list(range(7)))
    with caplog.at_level(logging.INFO, "walbatch"):
        b.close()
    closed = events(caplog, "closed")
    assert [(r.drained_items, r.left_items) for r in closed] == [(7, 0)] and len(got) == 7
    caplog.clear()
    sink = Gate()
    b = DurableBatcher(tmp_path / "b", sink, **FAST)
    b.submit_many(list(range(5)))
    with caplog.at_level(logging.INFO, "walbatch"):
        b.close(timeout=0.1)
    assert [(r.drained_items, r.left_items) for r in events(caplog, "closed")] == [(0, 5)]


def test_corruption_found_while_delivering_is_one_error_line(tmp_path, caplog):
    sink = Gate()
    b = DurableBatcher(tmp_path / "log", sink, memory_tail_bytes=1, **FAST)
    try:
        b.submit("first")
        wait_until(lambda: sink.calls >= 1)  # the flusher holds batch 1 and retries it
        for i in range(10):
            b.submit(f"item-{i}-CORRUPTME")
        seg = os.path.join(b.directory, "segments", sorted(os.listdir(
            os.path.join(b.directory, "segments")))[0])
        data = open(seg, "rb").read()
        at = data.index(b"item-5-CORRUPTME")
        with open(seg, "r+b") as f:  # bit rot after the acknowledgement
            f.seek(at)
            f.write(b"X")
        with caplog.at_level(logging.INFO, "walbatch"):
            sink.open.set()
            wait_until(lambda: b.broken is not None)
        assert sink.items[:1] == ["first"] and not any("item-5" in str(i) for i in sink.items)
        stopped = events(caplog, "delivery_stopped")
        assert len(stopped) == 1 and stopped[0].levelno == logging.ERROR
        assert "CorruptLog" in stopped[0].error and "verify --repair" in stopped[0].error
        assert stopped[0].exc_info is None  # our own error: one line, no traceback
    finally:
        b.close(timeout=0.5)


# ---------------------------------------------------------- json format

def test_json_lines_carry_the_extra_fields():
    record = logging.LogRecord("walbatch", logging.WARNING, __file__, 1, "sink failing: %s",
                               ("boom",), None)
    record.event = "sink_failing"
    record.batch_items = 3
    line = JsonFormatter().format(record)
    assert "\n" not in line
    value = json.loads(line)
    assert value["message"] == "sink failing: boom" and value["level"] == "warning"
    assert value["event"] == "sink_failing" and value["batch_items"] == 3
    assert value["logger"] == "walbatch" and value["time"].endswith("Z")
    assert "args" not in value and "msg" not in value


def test_json_lines_carry_a_traceback_as_one_field():
    try:
        raise ValueError("bug")
    except ValueError:
        import sys

        record = logging.LogRecord("walbatch", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    value = json.loads(JsonFormatter().format(record))
    assert "ValueError: bug" in value["exception"]


def test_a_delivery_stop_nobody_observes_is_still_logged(caplog):
    obs = Observers()
    with caplog.at_level(logging.ERROR, "walbatch"):
        obs.delivery_stopped(RuntimeError("flusher bug"))
    assert "delivery stopped: RuntimeError: flusher bug" in caplog.text
