"""`walbatch serve` as a real process on a real Unix socket (docs/protocol.md).

Every daemon is a subprocess started by the ``daemons`` fixture, which waits for
its socket to answer ``ping`` and always stops it (SIGTERM, then SIGKILL).
Nothing is mocked: items go through the log into the real SQLite sink.
"""

from __future__ import annotations

import collections
import grp
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import answered
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walbatch
from walbatch import codec, protocol, values
from walbatch.client import Client, DaemonUnavailable, Forbidden

WALBATCH = [sys.executable, "-m", "walbatch"]
WAIT = 30.0  # the most any single wait in this file may take before it counts as a failure
# The daemons get a clean environment: no settings or systemd variables from outside the test.
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("WALBATCH_", "LISTEN_")) and k != "NOTIFY_SOCKET"}


# ------------------------------------------------------------------ helpers


class Daemon:
    """One `walbatch serve` subprocess."""

    def __init__(self, data_dir: Path, socket_path: str | None, args: list[str],
                 env: dict[str, str] | None, log_path: Path, cmd: list[str] | None = None,
                 pass_fds: tuple[int, ...] = (), connect_path: str | None = None) -> None:
        self.data_dir = data_dir
        self.socket_path = connect_path or socket_path or str(data_dir / "walbatch.sock")
        base = [*WALBATCH, "serve", "--data-dir", str(data_dir), "--max-delay", "0.01",
                "--shutdown-timeout", "10"]
        if socket_path:
            base += ["--socket", socket_path]
        self.cmd = (cmd or []) + base + args
        self.env = {**BASE_ENV, **(env or {})}
        self.log_path = log_path
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def db(self) -> Path:
        return self.data_dir / "walbatch.db"

    def start(self, wait: bool = True) -> Daemon:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         pass_fds=self.pass_fds)
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = WAIT) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"walbatch serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with raw_connect(self.socket_path, timeout=2) as s:
                    s.sendall(protocol.encode({"id": 0, "op": "ping"}))
                    if (read_frame(s) or {}).get("pong"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"walbatch serve did not answer ping in {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = WAIT) -> int:
        """Send ``sig`` and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
                raise AssertionError(f"walbatch serve ignored signal {sig} for {timeout}s:\n"
                                     f"{self.log()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def sockdir():
    """A short directory for sockets (AF_UNIX paths are limited to 108 bytes)."""
    d = tempfile.mkdtemp(prefix="wb", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemons(tmp_path, sockdir):
    """``daemons(name, *args, env=..., start=True)`` -> a started Daemon; all stopped at teardown."""
    made: list[Daemon] = []

    def make(name: str = "data", *args: str, env: dict[str, str] | None = None, start: bool = True,
             socket_path: str | None = "default", **kw: Any) -> Daemon:
        if socket_path == "default":
            socket_path = str(sockdir / f"{name}.sock")
        d = Daemon(tmp_path / name, socket_path, list(args), env,
                   tmp_path / f"{name}.{len(made)}.log", **kw)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait(WAIT)


def raw_connect(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None at a clean EOF before the first byte."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            if not buf:
                return None
            raise AssertionError(f"EOF inside a frame after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_frame(s: socket.socket) -> dict[str, Any] | None:
    head = recv_exactly(s, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    body = recv_exactly(s, n)
    assert body is not None
    value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    assert isinstance(value, dict), value
    return value


def read_until_eof(s: socket.socket) -> list[dict[str, Any]]:
    out = []
    while (frame := read_frame(s)) is not None:
        out.append(frame)
    return out


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def db_rows(db: Path, columns: str = "_seq") -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.execute(f"SELECT {columns} FROM items ORDER BY _seq"))
    finally:
        conn.close()


def run_threads(target, n: int, timeout: float = WAIT) -> None:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as ex:  # re-raised in the test thread
            errors.append(ex)

    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread did not finish in time"
    if errors:
        raise errors[0]


# ------------------------------------------------------------ basic ops


def test_ping_stats_and_flush(daemons):
    d = daemons()
    with Client(d.socket_path, timeout=WAIT) as c:
        pong = c.ping()
        assert pong["ok"] is True and pong["pong"] is True
        assert pong["version"] == walbatch.__version__
        assert c.stats()["submitted"] == 0
        assert c.submit_many([{"n": 1}, {"n": 2}, {"n": 3}]) == range(1, 4)
        c.flush(timeout=WAIT)
        s = c.stats()
    for key in ("submitted", "delivered", "dead_lettered", "pending", "batches_by_reason",
                "log_bytes", "segments", "fsyncs", "commit_groups", "last_checkpoint", "retries",
                "last_error"):
        assert key in s, key
    assert (s["submitted"], s["delivered"], s["dead_lettered"], s["pending"]) == (3, 3, 0, 0)
    assert s["last_checkpoint"] == 3
    assert s["last_error"] is None
    assert db_rows(d.db, "_seq, n") == [(1, 1), (2, 2), (3, 3)]


def test_raw_requests_get_answers_in_order_with_their_ids(daemons):
    d = daemons()
    with raw_connect(d.socket_path) as s:
        s.sendall(b"".join(protocol.encode(m) for m in [
            {"id": "a", "op": "ping"},
            {"id": 2, "op": "submit", "item": "x"},
            {"id": 3, "op": "submit", "items": ["y", "z"]},
            {"id": 4, "op": "stats"},
        ]))
        answers = [read_frame(s) for _ in range(4)]
        # flush covers what was acknowledged when it arrived: the submits above are.
        s.sendall(protocol.encode({"id": 5, "op": "flush", "timeout": WAIT}))
        flushed = read_frame(s)
        s.sendall(protocol.encode({"id": 6, "op": "stats"}))
        after = read_frame(s)
    assert [a["id"] for a in answers] == ["a", 2, 3, 4]
    assert all(a["ok"] for a in answers), answers
    assert (answers[1]["first_seq"], answers[1]["count"]) == (1, 1)
    assert (answers[2]["first_seq"], answers[2]["count"]) == (2, 2)
    assert flushed == {"id": 5, "ok": True}
    assert after is not None and after["stats"]["delivered"] == 3
    assert after["stats"]["last_checkpoint"] == 3


def test_a_flush_pipelined_behind_submits_covers_them(daemons):
    """flush and stats wait for the requests before them on the same connection."""
    d = daemons()
    with raw_connect(d.socket_path) as s:
        s.sendall(b"".join(protocol.encode(m) for m in [
            *({"id": i, "op": "submit", "items": [{"n": i}] * 50} for i in range(20)),
            {"id": "flush", "op": "flush", "timeout": WAIT},
            {"id": "stats", "op": "stats"},
        ]))
        answers = [read_frame(s) for _ in range(22)]
    assert all(a is not None and a["ok"] for a in answers), answers
    assert answers[-1]["stats"]["delivered"] == 1000
    assert answers[-1]["stats"]["pending"] == 0
    assert len(db_rows(d.db)) == 1000


def test_long_flushes_neither_starve_other_clients_nor_hold_up_shutdown(daemons, tmp_path):
    # Each waiting flush used to hold a thread of the daemon's small executor: a
    # dozen long ones made another client's flush(timeout=1) wait far longer, and
    # SIGTERM waited behind them too (closing the batcher needs that executor).
    (tmp_path / "downsink.py").write_text("def write(batch):\n    raise ConnectionError('down')\n")
    d = daemons("data", "--sink", "downsink:write", "--shutdown-timeout", "1",
                env={"PYTHONPATH": str(tmp_path)})
    with Client(d.socket_path, timeout=WAIT) as c:
        c.submit("stays in the log")
    long_ones = [raw_connect(d.socket_path) for _ in range(12)]
    try:
        for s in long_ones:
            s.sendall(protocol.encode({"id": 1, "op": "flush", "timeout": 3600}))
        time.sleep(0.5)
        with Client(d.socket_path, timeout=WAIT) as c:
            t0 = time.monotonic()
            with pytest.raises(walbatch.client.RemoteError) as info:
                c.flush(timeout=1)
            took = time.monotonic() - t0
        assert info.value.code == "timeout"
        assert took < 10, f"flush(timeout=1) answered after {took:.1f}s"
        t0 = time.monotonic()
        assert d.stop(signal.SIGTERM, timeout=WAIT) == 0
        assert time.monotonic() - t0 < 15
        answers = [read_frame(s) for s in long_ones]  # answered, not cut off
        assert all(a is not None and a["code"] == "shutting_down" for a in answers), answers
    finally:
        for s in long_ones:
            s.close()
    with walbatch.DurableBatcher(d.data_dir, None) as w:
        assert w.stats().pending == 1  # still in the log for the next start


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_connections_beyond_the_fd_limit_get_busy_and_everyone_else_is_served(daemons):
    # With 128 descriptors, 100 idle connections used to leave none for a new
    # segment or the SQLite sink (write_failed for every client) while asyncio
    # logged a traceback per second for the accepts it could not make.
    d = daemons("data", "--segment-bytes", "4096", "--max-log-bytes", "1MiB",
                cmd=["prlimit", "--nofile=128:128", "--"])
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.ping()["pong"] is True  # connected before the others
        idle = [raw_connect(d.socket_path) for _ in range(100)]
        try:
            # The refused ones are answered at once; the served ones stay silent.
            ready = answered(idle, 100 - 64)
            busy = [read_frame(s) for s in ready]
            assert busy and all(a is not None and a["code"] == "busy" for a in busy), busy
            assert len(busy) >= 100 - (128 - 64)
            # The client that was there first goes on, across several new segments.
            seqs = [c.submit({"n": n, "pad": "x" * 500}) for n in range(40)]
            c.flush(timeout=WAIT)
        finally:
            for s in idle:
                s.close()
    assert seqs == list(range(1, 41))
    assert len(db_rows(d.db)) == 40
    # Room again once the daemon has seen them leave (busy until then: retry later).
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with Client(d.socket_path, timeout=WAIT) as c:
                assert c.ping()["pong"] is True
            break
        except walbatch.client.Busy:
            assert time.monotonic() < deadline, "still busy after every idle client left"
            time.sleep(0.05)
    assert d.log().count("Traceback") == 0, d.log()[-2000:]


def test_requests_unread_at_sigterm_are_answered_shutting_down_not_cut_off(daemons):
    # They used to be cut off with the connection: the client could not tell
    # whether they took effect, so a retry could duplicate an item.
    d = daemons()
    n = 3000
    with raw_connect(d.socket_path, timeout=WAIT) as s:
        s.sendall(b"".join(protocol.encode({"id": i, "op": "submit", "item": {"i": i}})
                           for i in range(n)))
        d.proc.send_signal(signal.SIGTERM)
        answers = []
        while len(answers) < n:
            a = read_frame(s)
            if a is None:
                break
            answers.append(a)
    assert d.proc.wait(WAIT) == 0  # (d.stop() would signal again: the default action by then)
    assert [a["id"] for a in answers] == list(range(n)), "every request was answered, in order"
    ok = [a for a in answers if a["ok"]]
    assert all(a["code"] == "shutting_down" for a in answers if not a["ok"])
    log = walbatch.log.Log.open(str(d.data_dir), readonly=True, on_corruption="report")
    try:
        assert log.synced_seq == len(ok)  # acknowledged means written, refused means not
    finally:
        log.close()


def test_submit_one_and_many_reach_sqlite(daemons):
    d = daemons()
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.submit({"user": 1}) == 1
        assert c.submit_many([{"user": 2}, {"user": 3}]) == range(2, 4)
        assert c.submit_many([]) == range(4, 4)
        assert c.submit("plain string") == 4
        c.flush(timeout=WAIT)
    rows = db_rows(d.db, "_seq, user, item")  # item: the whole item as JSON (docs/values.md)
    assert rows == [(1, 1, '{"user":1}'), (2, 2, '{"user":2}'), (3, 3, '{"user":3}'),
                    (4, None, '"plain string"')]
    with Client(d.socket_path, timeout=WAIT) as c:
        log_id = c.stats()["log_id"]
    assert {r[0] for r in db_rows(d.db, "_log_id")} == {log_id}


def test_pipelined_submits_from_8_threads_sharing_one_client(daemons):
    d = daemons()
    per_thread = 60
    seqs: list[int] = []
    lock = threading.Lock()
    with Client(d.socket_path, timeout=WAIT) as c:
        def work(t: int) -> None:
            futs = [c.submit_async({"t": t, "k": k}) for k in range(per_thread)]
            got = [f.result(WAIT) for f in futs]
            assert all(r["ok"] and r["count"] == 1 for r in got)
            with lock:
                seqs.extend(r["first_seq"] for r in got)

        run_threads(work, 8)
        c.flush(timeout=WAIT)
    assert sorted(seqs) == list(range(1, 8 * per_thread + 1))
    rows = db_rows(d.db, "_seq, t, k")
    assert len(rows) == 8 * per_thread
    assert len({(t, k) for _s, t, k in rows}) == 8 * per_thread


def test_concurrent_clients_get_unique_dense_seqs(daemons):
    d = daemons()
    seqs: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        mine = []
        with Client(d.socket_path, timeout=WAIT) as c:
            for k in range(30):
                if k % 3 == 0:
                    mine.extend(c.submit_many([{"c": i, "k": k, "j": j} for j in range(3)]))
                else:
                    mine.append(c.submit({"c": i, "k": k, "j": 0}))
        with lock:
            seqs.extend(mine)

    run_threads(work, 6)
    assert sorted(seqs) == list(range(1, len(seqs) + 1))
    assert len(seqs) == 6 * (20 + 10 * 3)


# ------------------------------------------------------ durability


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_delivers_what_was_acknowledged_and_exits_0(daemons, sig):
    # A long max_delay: nothing would be delivered by the timer; shutdown must do it.
    d = daemons("data", "--max-delay", "60")
    with Client(d.socket_path, timeout=WAIT) as c:
        seqs = [c.submit({"i": i}) for i in range(50)]
        seqs += c.submit_many([{"i": i} for i in range(50, 120)])
    assert d.stop(sig) == 0, d.log()
    assert not os.path.exists(d.socket_path), "the daemon left its socket behind"
    assert seqs == list(range(1, 121))
    assert db_rows(d.db, "_seq, i") == [(s, s - 1) for s in seqs]

    d.start()
    with Client(d.socket_path, timeout=WAIT) as c:
        c.flush(timeout=WAIT)
        s = c.stats()
        assert c.submit({"i": 120}) == 121  # seqs are never reused across restarts
        c.flush(timeout=WAIT)
    assert (s["submitted"], s["delivered"], s["pending"]) == (120, 120, 0)
    assert d.stop() == 0
    rows = db_rows(d.db, "_seq, i")
    assert rows == [(s, s - 1) for s in range(1, 122)]


def test_sigkill_mid_load_then_restart_loses_nothing_acknowledged(daemons):
    d = daemons("data", "--max-delay", "0.05")
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def work(t: int) -> None:
        with Client(d.socket_path, timeout=WAIT, connect_timeout=1) as c:
            k = 0
            while not stop.is_set():
                ident = f"{t}-{k}"
                try:
                    c.submit({"ident": ident, "pad": "x" * (k % 50)})
                except DaemonUnavailable:
                    return
                with lock:  # acknowledged: record it before counting it
                    acked.append(ident)
                k += 1

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + WAIT
        while len(acked) < 400 and time.monotonic() < deadline and d.running:
            time.sleep(0.005)
        assert len(acked) >= 400, d.log()
        d.kill()
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
    assert not any(t.is_alive() for t in threads)

    d.start()  # replays the backlog; also replaces the stale socket of the killed daemon
    with Client(d.socket_path, timeout=WAIT) as c:
        c.flush(timeout=WAIT)
        s = c.stats()
    assert d.stop() == 0
    rows = db_rows(d.db, "_seq, ident")
    idents = collections.Counter(ident for _seq, ident in rows)
    missing = set(acked) - set(idents)
    assert not missing, f"{len(missing)} acknowledged item(s) lost, e.g. {sorted(missing)[:5]}"
    assert [i for i, n in idents.items() if n > 1] == []
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
    assert s["pending"] == 0 and s["delivered"] == s["submitted"] == len(rows)


# ------------------------------------------------------------ hostile input


_IDS = st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none(), st.booleans(), st.floats())
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
_OPS = st.sampled_from([*protocol.OPS, "", "nope", "SUBMIT"]) | st.text(max_size=6) | _VALUES


def _packed(obj: Any) -> bytes:
    return frame(msgpack.packb(obj, use_bin_type=True))


HOSTILE = st.lists(st.one_of(
    st.binary(max_size=64),  # raw garbage
    st.binary(min_size=1, max_size=64).map(frame),  # a frame of (mostly) non-msgpack
    _VALUES.map(_packed),  # well-framed, not a request
    st.builds(lambda rid, op: _packed({"id": rid, "op": op}), _IDS, _OPS),
    st.builds(lambda rid, extra: _packed({"id": rid, "op": "submit", **extra}), _IDS,
              st.dictionaries(st.sampled_from(["item", "items"]), _VALUES, max_size=2)),
    st.builds(lambda rid, t: _packed({"id": rid, "op": "flush", "timeout": t}), _IDS,
              _VALUES | st.floats(0, 0.5)),
    st.integers(4097, 2**32 - 1).map(lambda n: struct.pack(">I", n) + b"x" * 8),  # too large
    st.just(b"\x00\x00\x00\x00"),  # zero length
    st.integers(5, 4096).map(lambda n: struct.pack(">I", n) + b"\x81"),  # cut off by the EOF
), min_size=1, max_size=4).map(b"".join)


def test_hostile_input_never_stops_the_daemon_serving_others(daemons):
    d = daemons("data", "--max-frame-bytes", "4096")
    good = Client(d.socket_path, timeout=WAIT)
    acked: list[int] = []

    @settings(max_examples=30, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(HOSTILE)
    def check(data: bytes) -> None:
        with raw_connect(d.socket_path) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon already closed a connection it cannot trust
            try:
                answers = read_until_eof(s)  # the daemon must answer and then close
            except ConnectionResetError:
                answers = []
        for a in answers:
            assert set(a) >= {"id", "ok"}, a
            if not a["ok"]:
                assert a["code"] in protocol.ERROR_CODES, a
                assert a["code"] != protocol.INTERNAL, a
                assert isinstance(a["message"], str) and a["message"]
        assert good.ping()["pong"] is True
        acked.append(good.submit({"after": len(acked)}))

    try:
        check()
        good.flush(timeout=WAIT)
    finally:
        good.close()
    assert d.running, d.log()
    assert acked == sorted(acked) and len(set(acked)) == len(acked)
    delivered = {seq for (seq,) in db_rows(d.db)}
    assert set(acked) <= delivered


def test_a_request_that_is_not_a_map_gets_bad_request_and_the_connection_goes_on(daemons):
    d = daemons()
    with raw_connect(d.socket_path) as s:
        s.sendall(_packed([1, 2]) + frame(b"\xc1") + _packed({"id": 7, "op": "nope"})
                  + _packed({"id": True, "op": "ping"}) + _packed({"id": 8, "op": "ping"}))
        answers = [read_frame(s) for _ in range(5)]
    assert [(a["id"], a["ok"], a.get("code")) for a in answers] == [
        (None, False, "bad_request"), (None, False, "bad_frame"), (7, False, "unknown_op"),
        (None, False, "bad_request"), (8, True, None)]


def test_an_oversized_frame_gets_too_large_and_the_connection_is_closed(daemons):
    d = daemons("data", "--max-frame-bytes", "1024")
    with raw_connect(d.socket_path) as s:
        # A good request first, in the same write: it is still answered, then too_large.
        s.sendall(protocol.encode({"id": 1, "op": "ping"}) + struct.pack(">I", 2048) + b"x" * 100)
        first = read_frame(s)
        second = read_frame(s)
        assert read_frame(s) is None, "the connection stayed open after too_large"
    assert first is not None and first["id"] == 1 and first["pong"] is True
    assert second is not None and second["ok"] is False
    assert (second["id"], second["code"]) == (None, "too_large")
    assert "2048" in second["message"]
    # A frame of exactly the limit is accepted; the daemon still serves everyone.
    body = msgpack.packb({"id": 2, "op": "submit", "item": "y" * 900})
    body = msgpack.packb({"id": 2, "op": "submit", "item": "y" * (900 + 1024 - len(body))})
    assert len(body) == 1024
    with raw_connect(d.socket_path) as s:
        s.sendall(frame(body))
        answer = read_frame(s)
    assert answer is not None and answer["ok"] is True and answer["first_seq"] == 1


def test_a_zero_length_frame_gets_too_large_and_the_connection_is_closed(daemons):
    d = daemons()
    with raw_connect(d.socket_path) as s:
        s.sendall(b"\x00\x00\x00\x00")
        answers = read_until_eof(s)
    assert [(a["id"], a["code"]) for a in answers] == [(None, "too_large")]


def test_a_client_that_disconnects_mid_frame_does_not_hurt_others(daemons):
    d = daemons()
    with Client(d.socket_path, timeout=WAIT) as good:
        assert good.submit("before") == 1
        body = msgpack.packb({"id": 1, "op": "submit", "item": "never acknowledged" * 10})
        for cut in (1, 3, 4, 10, len(body) // 2, len(body) + 3):
            with raw_connect(d.socket_path) as s:
                s.sendall(frame(body)[:cut])
            assert good.ping()["pong"] is True
        assert good.submit("after") == 2  # the cut-off submits were never written
        good.flush(timeout=WAIT)
    assert db_rows(d.db, "_seq, item") == [(1, '"before"'), (2, '"after"')]


def test_a_client_that_never_reads_does_not_block_another(daemons):
    d = daemons()
    n = 20000
    requests = b"".join(protocol.encode({"id": i, "op": "stats"}) for i in range(n))
    hog = raw_connect(d.socket_path, timeout=WAIT)
    sent = threading.Event()

    def flood() -> None:
        try:
            hog.sendall(requests)  # blocks once the daemon stops reading from us
        finally:
            sent.set()

    flooder = threading.Thread(target=flood, daemon=True)
    try:
        flooder.start()
        time.sleep(0.2)  # let the flood build up (not a timing assertion)
        with Client(d.socket_path, timeout=WAIT) as good:
            assert good.ping()["pong"] is True
            seqs = [good.submit({"k": k}) for k in range(20)]
            good.flush(timeout=WAIT)
        assert seqs == list(range(1, 21))
        # The hog starts reading: every one of its requests is answered, in order.
        ids = []
        while len(ids) < n:
            answer = read_frame(hog)
            assert answer is not None and answer["ok"] is True
            ids.append(answer["id"])
        assert ids == list(range(n))
        assert sent.wait(WAIT)
    finally:
        hog.close()
        flooder.join(WAIT)


# ------------------------------------------------------------ access control


def test_socket_is_created_with_mode_0600_by_default(daemons):
    d = daemons()
    mode = os.stat(d.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_socket_mode_0660_and_socket_group(daemons):
    others = [g for g in grp.getgrall() if g.gr_gid != os.getgid()]
    if os.getuid() != 0 or not others:
        pytest.skip("needs root and a second group to chown the socket to")
    group = others[0]
    d = daemons("data", "--socket-mode", "0660", "--socket-group", group.gr_name)
    st = os.stat(d.socket_path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == group.gr_gid
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.ping()["pong"] is True


def test_a_bad_socket_mode_is_a_usage_error(daemons):
    d = daemons("data", "--socket-mode", "rw-rw----", start=False)
    result = subprocess.run(d.cmd, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "not an octal mode" in result.stderr


def test_allow_uid_refuses_a_peer_with_another_uid(daemons):
    other = os.getuid() + 4242
    d = daemons("data", "--allow-uid", str(other), start=False)
    d.start(wait=False)
    deadline = time.monotonic() + WAIT
    while not os.path.exists(d.socket_path):
        assert d.running and time.monotonic() < deadline, d.log()
        time.sleep(0.02)
    with raw_connect(d.socket_path) as s:
        answers = read_until_eof(s)  # answered and closed without our sending anything
    assert len(answers) == 1
    assert answers[0]["ok"] is False and answers[0]["code"] == "forbidden"
    assert f"uid {os.getuid()}" in answers[0]["message"]
    with Client(d.socket_path, timeout=WAIT) as c, pytest.raises(Forbidden):
        c.ping()
    assert d.running


def test_allow_uid_serves_our_own_uid(daemons):
    d = daemons("data", "--allow-uid", str(os.getuid() + 4242), "--allow-uid", str(os.getuid()))
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.submit("mine") == 1


def test_allow_gid_serves_a_peer_in_that_group(daemons):
    d = daemons("data", "--allow-uid", str(os.getuid() + 4242), "--allow-gid", str(os.getgid()))
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.ping()["pong"] is True


# ------------------------------------------------------------ one daemon per directory


def test_a_second_daemon_on_the_same_data_dir_exits_with_one_line_about_the_lock(daemons, sockdir):
    first = daemons()
    second = daemons("data", start=False, socket_path=str(sockdir / "other.sock"))
    result = subprocess.run(second.cmd, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "lock" in lines[0].lower()
    assert not os.path.exists(sockdir / "other.sock")
    with Client(first.socket_path, timeout=WAIT) as c:  # the first daemon is untouched
        assert c.submit("still here") == 1


def test_a_second_daemon_on_the_same_socket_does_not_steal_it(daemons):
    first = daemons("one")
    second = daemons("two", start=False, socket_path=first.socket_path)
    result = subprocess.run(second.cmd, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "INFO" not in line]
    assert len(lines) == 1 and "already listening" in lines[0], result.stderr
    with Client(first.socket_path, timeout=WAIT) as c:
        assert c.submit("first daemon") == 1
    assert first.stop() == 0
    assert db_rows(first.db, "_seq, item") == [(1, '"first daemon"')]


# ------------------------------------------------------------ settings precedence


RECORDING_SINK = '''
import json, os

def write(batch):
    with open(os.environ["RECSINK_OUT"], "a") as f:
        f.write(json.dumps([len(batch), batch.reason]) + "\\n")
'''


@pytest.mark.parametrize(("flag", "env", "config", "expected"), [
    (None, None, None, 20),  # the default (500) holds all 20
    (None, None, 3, 3),
    (None, 5, 3, 5),
    (7, 5, 3, 7),
    (7, None, None, 7),
])
def test_settings_precedence_flag_over_env_over_config_over_default(
        daemons, tmp_path, flag, env, config, expected):
    (tmp_path / "recsink.py").write_text(RECORDING_SINK)
    out = tmp_path / "batches.jsonl"
    args = ["--sink", "recsink:write"]
    envs = {"PYTHONPATH": str(tmp_path), "RECSINK_OUT": str(out)}
    if flag is not None:
        args += ["--max-items", str(flag)]
    if env is not None:
        envs["WALBATCH_MAX_ITEMS"] = str(env)
    if config is not None:
        cfg = tmp_path / "walbatch.toml"
        cfg.write_text(f"max_items = {config}\nmax-delay = 0.01\n")
        args += ["--config", str(cfg)]
    d = daemons("data", *args, env=envs)
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.submit_many([{"i": i} for i in range(20)]) == range(1, 21)
        c.flush(timeout=WAIT)
    sizes = [json.loads(line)[0] for line in out.read_text().splitlines()]
    assert sum(sizes) == 20
    assert max(sizes) == expected, sizes


def test_config_file_sets_the_max_frame_bytes_and_a_flag_overrides_it(daemons, tmp_path):
    cfg = tmp_path / "walbatch.toml"
    cfg.write_text('max_frame_bytes = "1KiB"\n')
    d = daemons("a", "--config", str(cfg))
    big = protocol.encode({"id": 1, "op": "submit", "item": "z" * 2000})
    with raw_connect(d.socket_path) as s:
        s.sendall(big)
        assert [a["code"] for a in read_until_eof(s)] == ["too_large"]
    d2 = daemons("b", "--config", str(cfg), "--max-frame-bytes", "64KiB",
                 env={"WALBATCH_MAX_FRAME_BYTES": "100"})
    with raw_connect(d2.socket_path) as s:
        s.sendall(big)
        answer = read_frame(s)
    assert answer is not None and answer["ok"] is True


def test_an_unknown_config_key_is_a_usage_error(daemons, tmp_path):
    cfg = tmp_path / "walbatch.toml"
    cfg.write_text("max_itemz = 3\n")
    d = daemons("data", "--config", str(cfg), start=False)
    result = subprocess.run(d.cmd, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2
    assert "max_itemz" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------ systemd


def _notify_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.settimeout(WAIT)
    s.bind(path)
    return s


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_socket_gets_ready_and_stopping(daemons, sockdir, abstract):
    if abstract:
        name = f"walbatch-test-{os.getpid()}-{time.monotonic_ns()}"
        addr, env_value = "\0" + name, "@" + name
    else:
        addr = env_value = str(sockdir / "notify")
    with _notify_socket(addr) as notify:
        d = daemons("data", env={"NOTIFY_SOCKET": env_value}, start=False).start(wait=False)
        ready = notify.recv(4096).split(b"\n")
        assert ready[0] == b"READY=1" and ready[1].startswith(b"STATUS=0 pending")
        with raw_connect(d.socket_path) as s:  # READY means serving: no retry needed
            s.sendall(protocol.encode({"id": 1, "op": "submit", "item": "x"}))
            answer = read_frame(s)
        assert answer is not None and answer["ok"] is True
        d.proc.send_signal(signal.SIGTERM)
        while (note := notify.recv(4096)).startswith(b"STATUS="):
            pass  # the monitor's once-a-second status lines
        assert note == b"STOPPING=1"
        assert d.stop() == 0


def test_socket_activation_with_listen_fds(daemons, sockdir):
    path = str(sockdir / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    fd = listener.fileno()
    # Like systemd: the socket is fd 3 and LISTEN_PID is the daemon's own pid.
    wrapper = [sys.executable, "-c",
               "import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1])); "
               "os.environ['LISTEN_PID'] = str(os.getpid()); "
               "os.execv(sys.argv[2], sys.argv[2:])", str(fd)]
    try:
        d = daemons("data", socket_path=None, cmd=wrapper, pass_fds=(fd,), connect_path=path,
                    env={"LISTEN_FDS": "1"})
        listener.close()  # the daemon holds its own copy now
        with Client(path, timeout=WAIT) as c:
            assert c.submit({"via": "systemd"}) == 1
            c.flush(timeout=WAIT)
        assert not (d.data_dir / "walbatch.sock").exists()
        assert d.stop() == 0
    finally:
        listener.close()
    assert db_rows(d.db, "_seq, via") == [(1, "systemd")]


def test_a_batch_is_stored_as_sent_and_delivered_exactly_as_the_daemon_read_it(daemons):
    # A submit of many items is logged from the frame's own bytes, not decoded and
    # encoded again: whatever encoding a client chose (float32, str8 for short
    # strings, a repeated 'items' key) the sink gets what the frame decoded to.
    d = daemons()
    items = [{"n": i, "f": 0.5 + i, "s": "x" * (i % 3), "b": bytes([i]), "l": [i, None]}
             for i in range(40)]
    odd = msgpack.Packer(use_bin_type=True, use_single_float=True)
    decoy = msgpack.packb([{"decoy": True}] * 20, use_bin_type=True)
    body = (b"\x84" + msgpack.packb("id") + msgpack.packb(1) + msgpack.packb("op")
            + msgpack.packb("submit") + msgpack.packb("items") + decoy
            + msgpack.packb("items") + b"\xdc" + struct.pack(">H", len(items))
            + b"".join(odd.pack(x) for x in items))
    sent = codec.unpack_one(body)["items"]
    assert len(sent) == 40 and values.equal(sent, items)  # the last 'items' counts, as decoded
    poisoned = ([{"n": i} for i in range(20)] + [{"n": msgpack.ExtType(87, b"\x01")}])
    with raw_connect(d.socket_path) as s:
        s.sendall(frame(body) + _packed({"id": 2, "op": "submit", "items": poisoned}))
        first, second = read_frame(s), read_frame(s)
    assert first == {"id": 1, "ok": True, "first_seq": 1, "count": 40}, first
    assert second["ok"] is False and second["code"] == protocol.BAD_REQUEST, second
    assert "items[20]" in second["message"], second  # refused whole, naming the item
    with Client(d.socket_path, timeout=WAIT) as c:
        c.flush(timeout=WAIT)
    stored = [values.loads(text) for (text,) in db_rows(d.db, "item")]
    assert values.equal(stored, sent), stored[:2]
