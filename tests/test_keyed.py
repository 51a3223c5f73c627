"""Keyed batching: submit(item, key=...): batches never mix keys, each key has its own
triggers, one key's batches arrive in order, a stuck key does not stop the others."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import msgpack
import pytest
from helpers import WAIT

from walbatch import DeadLettered, PermanentSinkError
from walbatch.batcher import KeyedPolicies
from walbatch.dlq import list_dead_letters
from walbatch.protocol import ProtocolError, parse_request


class KeyRecorder:
    """Records (key, reason, [(seq, item)]) per batch; optionally slow for one key."""

    def __init__(self, slow_key=None, delay: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[object, str, list[tuple[int, object]]]] = []
        self.slow_key = slow_key
        self.delay = delay
        self.at_sink: dict[object, int] = {}
        self.overlap = False  # two batches of one key at the sink at once

    def write(self, batch) -> None:
        with self.lock:
            self.at_sink[batch.key] = self.at_sink.get(batch.key, 0) + 1
            if batch.key is not None and self.at_sink[batch.key] > 1:
                self.overlap = True
        try:
            if batch.key == self.slow_key:
                time.sleep(self.delay)
            with self.lock:
                self.batches.append((batch.key, batch.reason, [(r.seq, r.item) for r in batch]))
        finally:
            with self.lock:
                self.at_sink[batch.key] -= 1

    def seqs_of(self, key) -> list[int]:
        with self.lock:
            return [s for k, _, recs in self.batches if k == key for s, _ in recs]


def test_batches_never_mix_keys_and_carry_their_key(make):
    sink = KeyRecorder()
    b = make(sink, max_items=4, max_delay=0.05)
    for i in range(30):
        key = ["a", 7, b"\x00k", None][i % 4]
        b.submit({"i": i, "key": key if not isinstance(key, bytes) else key.hex()}, key=key)
    b.flush(WAIT)
    assert len(sink.batches) >= 8
    for key, _reason, recs in sink.batches:
        expected = key.hex() if isinstance(key, bytes) else key
        assert {item["key"] for _, item in recs} == {expected}
    delivered = sorted(s for _, _, recs in sink.batches for s, _ in recs)
    assert delivered == list(range(1, 31))


def test_each_key_has_its_own_size_trigger(make):
    sink = KeyRecorder()
    b = make(sink, max_items=3, max_delay=3600)  # no batch closes on its timer here
    for i in range(3):
        b.submit(i, key="full")
    b.submit("lonely", key="other")
    full = b.submit_many([10, 11, 12], key="full")
    full.wait(WAIT)  # a full batch that waited for another key's timer would wait an hour
    assert sink.seqs_of("other") == []  # the lonely key's batch is not full: it stays open
    b.flush(WAIT)
    reasons = {(k, r) for k, r, _ in sink.batches}
    assert ("full", "size") in reasons
    assert sink.seqs_of("other") == [4]


def test_one_keys_batches_arrive_in_order_one_at_a_time_with_concurrency(make):
    sink = KeyRecorder(slow_key="slow", delay=0.02)
    b = make(sink, max_items=5, max_delay=0.01, flush_concurrency=4)
    for i in range(200):
        b.submit(i, key="slow" if i % 2 else i % 3)
    b.flush(WAIT)
    slow = sink.seqs_of("slow")
    assert slow == sorted(slow) and len(slow) == 100
    for k in (0, 1, 2):
        assert sink.seqs_of(k) == sorted(sink.seqs_of(k))
    assert not sink.overlap, "two batches of one key were at the sink at the same time"


def test_a_stuck_key_holds_the_checkpoint_but_not_the_other_keys(make):
    gate = threading.Event()
    taken: list[tuple[object, int]] = []

    def sink(batch):
        if batch.key == "stuck" and not gate.wait(WAIT):
            raise RuntimeError("gate never opened")
        taken.extend((batch.key, r.seq) for r in batch)

    b = make(sink, max_items=10, max_delay=0.01, flush_concurrency=2)
    stuck = b.submit("s", key="stuck")
    others = [b.submit(i, key="fine") for i in range(50)]
    for r in others:
        r.wait(WAIT)  # delivered while the stuck key's first batch is still at the sink
    s = b.stats()
    assert s.last_checkpoint < stuck.seq
    assert s.delivered == 50 and s.pending == 1
    gate.set()
    b.flush(WAIT)
    assert b.stats().last_checkpoint == 51
    assert sorted(seq for _, seq in taken) == list(range(1, 52))


def test_max_open_keys_closes_the_oldest_open_batch():
    kp: KeyedPolicies[int] = KeyedPolicies(max_items=100, max_bytes=1 << 20, max_delay=10,
                                           max_keys=2)
    assert kp.add("a", 1, 1, now=0) == []
    assert kp.add("b", 2, 1, now=0) == []
    closed = kp.add("c", 3, 1, now=0)
    assert [(c.key, c.reason, c.items) for c in closed] == [("a", "keys", [1])]
    assert kp.keys_open == 2 and len(kp) == 2
    assert sorted((c.key, c.items) for c in kp.poll(now=11)) == [("b", [2]), ("c", [3])]
    assert len(kp) == 0 and kp.keys_open == 0


def test_replay_after_reopen_batches_by_key_again(make, logdir):
    writer = make(None, directory=logdir)
    for i in range(20):
        writer.submit(i, key=f"k{i % 3}")
    writer.submit_many(["x", "y"], key="k9")
    writer.close()
    sink = KeyRecorder()
    b = make(sink, directory=logdir, max_items=100)
    b.flush(WAIT)
    assert {k for k, _, _ in sink.batches} == {"k0", "k1", "k2", "k9"}
    assert all(r == "replay" for _, r, _ in sink.batches)
    assert [i for k, _, recs in sink.batches if k == "k1" for _, i in recs] == list(range(1, 20, 3))
    assert sink.seqs_of("k9") == [21, 22]


@pytest.mark.parametrize("key, error", [(True, TypeError), (1.5, TypeError), ({"a": 1}, TypeError),
                                        ("x" * 1025, ValueError), (1 << 64, ValueError),
                                        ("é" * 513, ValueError),  # 1,026 bytes: the limit is bytes
                                        ("\ud800", ValueError)])
def test_a_bad_key_is_refused_before_anything_is_written(make, key, error):
    b = make(KeyRecorder())
    with pytest.raises(error):
        b.submit("item", key=key)
    with pytest.raises(error):
        b.submit_many(["a", "b"], key=key)
    assert b.stats().submitted == 0


def test_asubmit_and_asubmit_many_take_a_key(make):
    sink = KeyRecorder()
    b = make(sink)

    async def go():
        await b.asubmit("one", key="aio")
        await b.asubmit_many(["two", "three"], key="aio")

    asyncio.run(go())
    b.flush(WAIT)
    assert [i for k, _, recs in sink.batches if k == "aio" for _, i in recs] == ["one", "two", "three"]


def test_the_reserved_extension_code_is_refused_and_others_pass_through(make):
    # Code 87 marks keyed items in the log: a user's ExtType(87) would come back as a
    # keyed item (or as garbage), so submit refuses it (tests/test_submit_refusals.py).
    sink = KeyRecorder()
    b = make(sink)
    with pytest.raises(ValueError, match="code 87 is reserved"):
        b.submit(msgpack.ExtType(87, b"\xc1"))
    b.submit({"nested": msgpack.ExtType(5, b"abc")}, key="k")
    b.flush(WAIT)
    items = {k: [i for _, i in recs] for k, _, recs in sink.batches}
    assert items == {"k": [{"nested": msgpack.ExtType(5, b"abc")}]}


def test_dead_letters_keep_their_key_and_requeue_restores_it(make, logdir):
    strict = threading.Event()
    strict.set()
    sink = KeyRecorder()

    def picky(batch):
        if strict.is_set():
            raise PermanentSinkError("schema says no")
        sink.write(batch)

    b = make(picky)
    r = b.submit({"v": 1}, key="tenant-1")
    with pytest.raises(DeadLettered):
        r.wait(WAIT)
    [dl] = list_dead_letters(str(logdir))
    assert dl.key == "tenant-1" and dl.item == {"v": 1}
    strict.clear()
    assert b.dead_letters.requeue(b.submit_many) == 1
    b.flush(WAIT)
    assert [(k, [i for _, i in recs]) for k, _, recs in sink.batches] == [("tenant-1", [{"v": 1}])]


def test_protocol_submit_takes_a_key_and_refuses_a_bad_one():
    req = parse_request({"id": 1, "op": "submit", "items": [1, 2], "key": "k"})
    assert req.key == "k" and req.items == [1, 2]
    assert parse_request({"id": 2, "op": "submit", "item": 1}).key is None
    with pytest.raises(ProtocolError) as ei:
        parse_request({"id": 3, "op": "submit", "item": 1, "key": [1]})
    assert ei.value.code == "bad_request" and "key" in str(ei.value)


def test_daemon_keyed_submits_reach_the_sink_with_their_key(tmp_path):
    import signal
    import subprocess
    import sys
    import tempfile

    from walbatch import Client

    out = tmp_path / "out.jsonl"
    sock = tempfile.mkdtemp(prefix="wb", dir="/tmp") + "/k.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "walbatch", "serve", "--data-dir", str(tmp_path / "data"),
         "--socket", sock, "--sink", f"file://{out}", "--max-delay", "0.01"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with Client(sock, connect_timeout=WAIT, timeout=WAIT) as c:
            c.submit({"a": 1}, key="left")
            c.submit_many([{"a": 2}, {"a": 3}], key=9)
            c.submit({"a": 4})
            c.flush(timeout=WAIT)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=WAIT)
    assert daemon.returncode == 0, err
    lines = sorted((json.loads(x) for x in out.read_text().splitlines()), key=lambda x: x["seq"])
    assert [(x["seq"], x.get("key"), x["item"]["a"]) for x in lines] == [
        (1, "left", 1), (2, 9, 2), (3, 9, 3), (4, None, 4)]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 6, 14, 250, 251, 252, 65530, 65531, 65540])
@pytest.mark.parametrize("key", ["k", 7, b"\x00" * 5, "é" * 10])
def test_keyed_submit_many_reads_back_at_every_ext_length(make, key, size):
    # submit_many writes keyed items with hand-made ext headers (ext 8/16/32 by length);
    # the sizes put the ext body (key + item) on each side of 255 and 65535 bytes.
    sink = KeyRecorder()
    b = make(sink)
    items = ["x" * size, {"n": size}, None]
    b.submit_many(items, key=key)
    b.flush(WAIT)
    assert [(k, [i for _, i in recs]) for k, _, recs in sink.batches] == [(key, items)]
