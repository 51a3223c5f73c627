"""walbatch.metrics for an embedded DurableBatcher, in a real prometheus-client registry."""

from __future__ import annotations

import threading

import pytest
from helpers import WAIT
from prometheus_client import CollectorRegistry, generate_latest

from walbatch import metrics
from walbatch.errors import PermanentSinkError, SinkError
from walbatch.metrics import AckClock


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_counters_gauges_and_histograms(make):
    calls = {"n": 0}

    def sink(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise SinkError("once")
        if any(r.item == "bad" for r in batch):
            raise PermanentSinkError("bad item")

    b = make(sink, max_items=4)
    reg = CollectorRegistry()
    metrics.register(b, reg)
    b.submit_many(["a", "b", "c", "d", "e"])
    b.flush(timeout=WAIT)
    b.submit("bad")
    b.flush(timeout=WAIT)
    m = scrape(reg)
    assert m["walbatch_items_submitted_total"] == 6
    assert m["walbatch_items_delivered_total"] == 5
    assert m["walbatch_items_dead_lettered_total"] == 1
    assert m["walbatch_items_pending"] == 0
    assert m['walbatch_sink_errors_total{kind="transient"}'] == 1
    assert m['walbatch_sink_errors_total{kind="permanent"}'] == 1
    assert m["walbatch_sink_retries_total"] == 1
    assert m["walbatch_commit_group_items_sum"] == 6 and m["walbatch_commit_group_items_count"] == 2
    assert m["walbatch_fsync_duration_seconds_count"] == 2
    assert m['walbatch_fsync_duration_seconds_bucket{le="+Inf"}'] == 2
    assert m["walbatch_batch_items_sum"] == 6
    assert m['walbatch_flushes_total{reason="size"}'] == 1
    assert m["walbatch_sink_write_duration_seconds_count"] == calls["n"]
    assert m["walbatch_log_capacity_bytes"] == b.options.max_log_bytes
    assert m["walbatch_log_bytes"] == b.stats().log_bytes > 0


def test_oldest_pending_age_grows_while_the_sink_is_down_and_is_0_after(make):
    gate = threading.Event()

    def sink(batch):
        if not gate.is_set():
            raise SinkError("down")

    b = make(sink)
    reg = CollectorRegistry()
    metrics.register(b, reg)
    assert scrape(reg)["walbatch_oldest_pending_age_seconds"] == 0
    b.submit("old")
    threading.Event().wait(0.3)
    b.submit("young")
    m = scrape(reg)
    assert m["walbatch_items_pending"] == 2
    assert 0.3 <= m["walbatch_oldest_pending_age_seconds"] < 0.3 + 0.1 + 5  # grain 0.1 s
    gate.set()
    b.flush(timeout=WAIT)
    assert scrape(reg)["walbatch_oldest_pending_age_seconds"] == 0


def test_one_batcher_per_registry(make, tmp_path):
    reg = CollectorRegistry()
    metrics.register(make(lambda batch: None), reg)
    with pytest.raises(ValueError, match="own prometheus_client.CollectorRegistry"):
        metrics.register(make(lambda batch: None, directory=tmp_path / "other"), reg)
    assert scrape(reg)["walbatch_items_submitted_total"] == 0  # the first one's, still whole


def test_unregister_takes_the_metrics_and_the_observer_out(make):
    b = make(lambda batch: None)
    reg = CollectorRegistry()
    m = metrics.register(b, reg)
    m.unregister()
    assert "walbatch_items_submitted_total" not in scrape(reg)
    b.submit("x")  # the observer is gone: nothing observes into unregistered histograms
    assert m.fsync_seconds._sum.get() == 0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ack_clock_ages_are_never_too_young():
    clock = Clock()
    acks = AckClock(synced_at_open=0, grain=0.1, clock=clock)
    for seq in range(1, 11):  # seq N acknowledged at 100 + N
        clock.now = 100.0 + seq
        acks.acked(seq)
    clock.now = 200.0
    assert acks.oldest_age(done_through=10, synced=10) == 0.0
    assert acks.oldest_age(done_through=0, synced=10) == pytest.approx(99.0)
    assert acks.oldest_age(done_through=4, synced=10) == pytest.approx(95.0)


def test_ack_clock_counts_the_backlog_found_at_open_from_the_open():
    clock = Clock()
    acks = AckClock(synced_at_open=50, clock=clock)
    clock.now = 160.0
    acks.acked(51)
    clock.now = 170.0
    assert acks.oldest_age(done_through=10, synced=51) == pytest.approx(70.0)
    assert acks.oldest_age(done_through=50, synced=51) == pytest.approx(10.0)


def test_ack_clock_memory_is_bounded_and_ages_only_grow_when_thinned():
    clock = Clock()
    acks = AckClock(synced_at_open=0, grain=0.1, max_marks=64, clock=clock)
    for seq in range(1, 1001):
        clock.now = 100.0 + seq
        acks.acked(seq)
    assert len(acks._marks) <= 64 and acks.grain > 0.1
    clock.now = 2000.0
    for done in (0, 100, 500, 999):
        true_age = 2000.0 - (100.0 + done + 1)
        got = acks.oldest_age(done_through=done, synced=1000)
        assert true_age <= got < true_age + acks.grain


def test_without_prometheus_client_the_message_names_the_extra(tmp_path):
    import os
    import subprocess
    import sys

    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "prometheus_client.py").write_text("raise ImportError('blocked by the test')\n")
    code = ("import walbatch, walbatch.metrics as m\n"
            "b = walbatch.DurableBatcher('log', None)\n"
            "try:\n    m.register(b)\nexcept ImportError as ex:\n    print(ex)\nb.close()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=WAIT, env={**os.environ, "PYTHONPATH": str(blocker)})
    assert "pip install 'walbatch[metrics]'" in proc.stdout, proc.stderr


def test_histogram_values_wait_for_the_scrape_and_none_is_lost_across_threads(monkeypatch):
    # The data path only appends; a scrape (or FOLD_AT waiting values) folds them into
    # prometheus-client's histogram, from whichever thread, each value exactly once.
    from prometheus_client import Histogram

    monkeypatch.setattr(metrics, "FOLD_AT", 100)
    reg = CollectorRegistry()
    h = Histogram("t_seconds", "test", buckets=(1.0, 2.0), registry=None)
    d = metrics._Deferred(h)
    reg.register(metrics._Fold([d]))
    reg.register(h)
    d.add(0.5)
    assert scrape(reg)["t_seconds_count"] == 1  # the scrape folded it first
    threads = [threading.Thread(target=lambda: [d.add(1.5) for _ in range(5000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(d.values) <= 100 + 8  # folded along the way, by the threads themselves
    m = scrape(reg)
    assert m["t_seconds_count"] == 40001 and m["t_seconds_sum"] == 0.5 + 1.5 * 40000
    assert m['t_seconds_bucket{le="1.0"}'] == 1
