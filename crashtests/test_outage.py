"""A sink that is down for a long stretch: the backlog grows to the quota, submitters
get LogFull (the daemon: log_full) instead of silent drops, and when the sink comes back
everything drains, in order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from walbatch import Client, DurableBatcher, LogFull, SinkError
from walbatch.client import RemoteLogFull

QUOTA = dict(segment_bytes=8192, max_log_bytes=32768, submit_timeout=0.2, max_delay=0.002,
             retry_initial_delay=0.005, retry_max_delay=0.05)


def test_embedded_outage_fills_the_log_then_drains_in_order(scenario):
    rounds = scenario.iterations(3)
    directory = tempfile.mkdtemp(prefix="walbatch-outage-")
    up = threading.Event()
    order: list[int] = []
    items: dict[int, object] = {}

    def sink(batch):
        if not up.is_set():
            raise SinkError("the database is down", retryable=True)
        order.extend(r.seq for r in batch)
        for r in batch:
            assert items[r.seq] == r.item

    full = 0
    with DurableBatcher(directory, sink, **QUOTA) as b:
        for rnd in range(rounds):
            up.clear()
            k = 0
            while True:  # submit until the quota says no
                item = {"round": rnd, "k": k, "pad": "p" * 40}
                try:
                    items[b.submit(item).seq] = item
                except LogFull as ex:
                    assert "did not drain" in str(ex) and "database is down" in str(ex)
                    full += 1
                    break
                k += 1
            stats = b.stats()
            assert stats.log_bytes <= QUOTA["max_log_bytes"] + 4096
            assert stats.retries > 0 and stats.pending > 0
            time.sleep(scenario.rng.random() * 0.2)  # the outage goes on for a while
            up.set()
            b.flush(timeout=60)
    assert order == sorted(order), "delivery out of order"
    assert set(order) == set(items), "an acknowledged item was not delivered"
    scenario.add(cycles=rounds, acknowledged=len(items), delivered=len(set(order)),
                 lost=len(set(items) - set(order)), log_full=full, duplicated=len(order) - len(set(order)))


SINK = textwrap.dedent("""
    import os
    from walbatch import SinkError
    def sink(batch):
        if os.path.exists(os.environ["WB_SINK_DOWN"]):
            raise SinkError("down", retryable=True)
        with open(os.environ["WB_SINK_OUT"], "a") as f:
            f.write("".join(f"{r.seq}\\n" for r in batch))
""")


def test_daemon_outage_answers_log_full_then_drains(scenario, tmp_path):
    (tmp_path / "outage_sink.py").write_text(SINK)
    down, out = tmp_path / "down", tmp_path / "out"
    down.write_text("")
    sock = os.path.join(tempfile.mkdtemp(prefix="wbo-", dir="/tmp"), "s")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "WB_SINK_DOWN": str(down),
           "WB_SINK_OUT": str(out)}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in QUOTA.items()]
    daemon = subprocess.Popen([sys.executable, "-m", "walbatch", "serve", "--data-dir",
                               str(tmp_path / "log"), "--socket", sock, "--sink", "outage_sink:sink",
                               "--log-level", "error", *flags], env=env)
    try:
        with Client(sock, connect_timeout=30) as c:
            acked = []
            with pytest.raises(RemoteLogFull):
                for k in range(100000):
                    acked.append(c.submit({"k": k, "pad": "q" * 40}))
            down.unlink()
            c.flush(timeout=60)
        delivered = [int(x) for x in out.read_text().split()]
        assert delivered == sorted(delivered)
        assert set(acked) <= set(delivered)
        scenario.add(acknowledged=len(acked), delivered=len(set(delivered)),
                     lost=len(set(acked) - set(delivered)), log_full=1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
