"""client.py: Client and AsyncClient against a real `walbatch serve` subprocess."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from walbatch import protocol
from walbatch.client import (
    AsyncClient,
    BadRequest,
    Client,
    DaemonUnavailable,
    Forbidden,
    RemoteClosed,
    RemoteError,
    RemoteLogFull,
    RemoteTimeout,
)
from walbatch.errors import Closed, LogFull, WalbatchError
from walbatch.log import Log

WAIT = 30.0
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("WALBATCH_", "LISTEN_")) and k != "NOTIFY_SOCKET"}

FAILING_SINK = '''
def write(batch):
    raise RuntimeError("sink is down (test)")
'''

BLOCKING_SINK = '''
import os, time

def write(batch):
    open(os.environ["BLOCKSINK_MARKER"], "w").close()
    time.sleep(600)
'''


class Daemon:
    """One `walbatch serve` subprocess; ``start`` waits until it answers ping."""

    def __init__(self, data_dir: Path, sock: str, args: list[str], env: dict[str, str]) -> None:
        self.data_dir, self.socket_path = data_dir, sock
        self.cmd = [sys.executable, "-m", "walbatch", "serve", "--data-dir", str(data_dir),
                    "--socket", sock, "--max-delay", "0.01", "--shutdown-timeout", "5", *args]
        self.env = {**BASE_ENV, **env}
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + WAIT
        while True:
            assert self.proc.poll() is None, f"serve exited:\n{self.log_path.read_text()}"
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(self.socket_path)
                    s.sendall(protocol.encode({"id": 0, "op": "ping"}))
                    if s.recv(4096):
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"serve never answered:\n{self.log_path.read_text()}"
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
                raise AssertionError("the daemon ignored SIGTERM") from None
        return self.proc.returncode


@pytest.fixture
def daemons(tmp_path):
    sockdir = tempfile.mkdtemp(prefix="wbc", dir="/tmp")
    made: list[Daemon] = []

    def make(name: str = "data", *args: str, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(tmp_path / name, os.path.join(sockdir, f"{name}.sock"), list(args), env or {})
        made.append(d)
        return d.start()

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(WAIT)
    shutil.rmtree(sockdir, ignore_errors=True)


def with_sink(tmp_path: Path, name: str, source: str) -> dict[str, str]:
    (tmp_path / f"{name}.py").write_text(source)
    return {"PYTHONPATH": str(tmp_path)}


def wait_for(path: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert proc is None or proc.poll() is None, "the daemon died"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def db_items(d: Daemon) -> dict[int, Any]:
    conn = sqlite3.connect(d.data_dir / "walbatch.db")
    try:
        cur = conn.execute("SELECT * FROM items")  # the fields are generated columns
        cols = [d[0] for d in cur.description]
        return {row[cols.index("_seq")]: dict(zip(cols, row, strict=True)) for row in cur}
    finally:
        conn.close()


# ------------------------------------------------------------------ typed errors


def test_an_unknown_op_raises_bad_request_and_the_client_goes_on(daemons):
    d = daemons()
    with Client(d.socket_path, timeout=WAIT) as c:
        with pytest.raises(BadRequest) as info:
            c.request({"op": "explode"})
        assert info.value.code == "unknown_op"
        assert isinstance(info.value, ValueError) and isinstance(info.value, RemoteError)
        assert isinstance(info.value, WalbatchError)
        assert "explode" in str(info.value)
        with pytest.raises(BadRequest) as info:
            c.request({"op": "submit", "item": 1, "items": [2]})
        assert info.value.code == "bad_request"
        with pytest.raises(BadRequest) as info:
            c.request({"op": "flush", "timeout": -1})
        assert info.value.code == "bad_request"
        assert c.submit("fine") == 1  # the same connection still works


def test_a_frame_above_max_frame_bytes_raises_bad_request_then_the_client_reconnects(daemons):
    d = daemons("data", "--max-frame-bytes", "1KiB")
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.submit("small") == 1
        with pytest.raises(BadRequest) as info:
            c.submit("x" * 5000)
        assert info.value.code == "too_large"
        # The daemon closed that connection; the next call uses a new one.
        assert c.submit("small again") == 2


def test_log_full_raises_remote_log_full_and_keeps_everything_acknowledged(daemons, tmp_path):
    env = with_sink(tmp_path, "failsink", FAILING_SINK)
    d = daemons("data", "--sink", "failsink:write", "--segment-bytes", "4096",
                "--max-log-bytes", "8192", "--submit-timeout", "0.2", "--retry-max-delay", "0.2",
                "--shutdown-timeout", "1", env=env)
    acked: list[int] = []
    with Client(d.socket_path, timeout=WAIT) as c:
        with pytest.raises(RemoteLogFull) as info:
            for i in range(200):
                acked.append(c.submit({"i": i, "pad": "p" * 300}))
        err = info.value
        assert isinstance(err, LogFull) and err.code == "log_full"
        assert "full" in err.message
        assert 10 < len(acked) < 200
        assert acked == list(range(1, len(acked) + 1))
        with pytest.raises(RemoteLogFull):  # still full, still a clean answer
            c.submit_many([{"more": True, "pad": "p" * 300}])
        with pytest.raises(RemoteTimeout) as tinfo:
            c.flush(timeout=0.2)
        assert isinstance(tinfo.value, TimeoutError) and tinfo.value.code == "timeout"
        s = c.stats()
        assert c.ping()["pong"] is True
    assert s["submitted"] == s["pending"] == len(acked)
    assert s["delivered"] == 0 and s["retries"] > 0
    assert "sink is down (test)" in (s["last_error"] or "")
    assert d.stop() == 0

    log = Log.open(str(d.data_dir), readonly=True, on_corruption="report")
    try:
        assert log.synced_seq == len(acked)
        assert [seq for seq, _item, _lost in log.records()] == acked
    finally:
        log.close()
    # With a working sink the whole backlog is delivered, exactly once.
    d2 = Daemon(d.data_dir, d.socket_path, [], {})
    try:
        d2.start()
        with Client(d2.socket_path, timeout=WAIT) as c:
            c.flush(timeout=WAIT)
        assert d2.stop() == 0
    finally:
        if d2.proc is not None and d2.proc.poll() is None:
            d2.proc.kill()
            d2.proc.wait(WAIT)
    rows = db_items(d2)
    assert sorted(rows) == acked
    assert [rows[s]["i"] for s in acked] == list(range(len(acked)))


def test_a_peer_not_on_the_allow_list_raises_forbidden(daemons):
    d = daemons("data", "--allow-uid", str(os.getuid() + 4242))
    with Client(d.socket_path, timeout=WAIT) as c:
        with pytest.raises(Forbidden) as info:
            c.ping()
    assert isinstance(info.value, PermissionError) and info.value.code == "forbidden"


def test_no_daemon_raises_daemon_unavailable(tmp_path):
    with Client(str(tmp_path / "nothing.sock"), connect_timeout=0.2) as c:
        with pytest.raises(DaemonUnavailable) as info:
            c.submit(1)
    assert isinstance(info.value, ConnectionError)
    assert "nothing.sock" in str(info.value)


def test_a_closed_client_refuses_calls(daemons):
    d = daemons()
    c = Client(d.socket_path, timeout=WAIT)
    assert c.submit(1) == 1
    c.close()
    c.close()  # idempotent
    with pytest.raises(Closed):
        c.submit(2)


def test_requests_during_shutdown_get_shutting_down_or_unavailable(daemons, tmp_path):
    env = with_sink(tmp_path, "failsink", FAILING_SINK)
    d = daemons("data", "--sink", "failsink:write", "--shutdown-timeout", "2", env=env)
    with Client(d.socket_path, timeout=WAIT, connect_timeout=0.5) as c:
        assert c.submit("before") == 1
        d.proc.send_signal(signal.SIGTERM)
        acked = 1
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                c.submit("during")
                acked += 1
            except RemoteClosed as ex:
                assert ex.code == "shutting_down" and isinstance(ex, Closed)
            except DaemonUnavailable:
                break
        else:
            raise AssertionError("the daemon kept taking items after SIGTERM")
    assert d.stop() == 0
    log = Log.open(str(d.data_dir), readonly=True, on_corruption="report")
    try:
        assert log.synced_seq == acked  # everything acknowledged before the stop is kept
    finally:
        log.close()


# ------------------------------------------------------------------ reconnect and crashes


def test_the_client_reconnects_after_the_daemon_restarts(daemons):
    d = daemons()
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.submit("one") == 1
        assert d.stop() == 0
        d.start()
        assert c.submit("two") == 2
        c.flush(timeout=WAIT)
    assert [r["item"] for _s, r in sorted(db_items(d).items())] == ['"one"', '"two"']


def test_a_request_in_flight_when_the_daemon_is_killed_raises_daemon_unavailable(daemons, tmp_path):
    env = with_sink(tmp_path, "blocksink", BLOCKING_SINK)
    marker = tmp_path / "in-sink"
    d = daemons("data", "--sink", "blocksink:write", env={**env, "BLOCKSINK_MARKER": str(marker)})
    with Client(d.socket_path, timeout=WAIT, connect_timeout=0.5) as c:
        assert c.submit("stuck") == 1
        fut = c.send({"op": "flush"})  # cannot finish: the sink never returns
        wait_for(marker, d.proc)
        assert not fut.done()
        d.stop(signal.SIGKILL)
        with pytest.raises(DaemonUnavailable) as info:
            fut.result(WAIT)  # a hang would raise TimeoutError here instead
        assert "may or may not" in str(info.value)
        with pytest.raises(DaemonUnavailable):
            c.ping()  # nobody is listening any more


def test_eight_threads_share_one_client_and_every_answer_matches_its_request(daemons):
    d = daemons()
    got: dict[int, tuple[int, int]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    with Client(d.socket_path, timeout=WAIT) as c:
        def work(t: int) -> None:
            try:
                for k in range(40):
                    if k % 10 == 3:
                        seqs = c.submit_many([{"t": t, "k": k, "j": j} for j in range(4)])
                        mine = {seq: (t, k * 10 + j) for j, seq in enumerate(seqs)}
                    elif k % 10 == 5:
                        assert isinstance(c.stats()["submitted"], int)
                        continue
                    elif k % 10 == 7:
                        assert c.ping()["pong"] is True
                        continue
                    else:
                        mine = {c.submit({"t": t, "k": k, "j": 0}): (t, k * 10)}
                    with lock:
                        assert not set(mine) & set(got), "a seq was handed out twice"
                        got.update(mine)
            except BaseException as ex:
                errors.append(ex)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[0]
        c.flush(timeout=WAIT)
    assert sorted(got) == list(range(1, len(got) + 1))
    rows = db_items(d)
    assert {seq: (r["t"], r["k"] * 10 + r["j"]) for seq, r in rows.items()} == got


def test_threads_pipelining_more_than_the_socket_buffers_hold_do_not_deadlock(daemons):
    # A sender blocked in sendall used to hold the lock the reader thread needs to
    # hand out answers; the daemon, its answers unread, stopped reading: both hung.
    d = daemons()
    per_thread = 20_000
    with Client(d.socket_path, timeout=WAIT) as c:
        futures: list[list[Any]] = [[] for _ in range(4)]

        def work(t: int) -> None:
            futures[t] = [c.submit_async({"t": t, "i": i}) for i in range(per_thread)]

        threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads), "the senders hung"
        seqs = [f.result(WAIT)["first_seq"] for fs in futures for f in fs]
    assert sorted(seqs) == list(range(1, 4 * per_thread + 1))


@pytest.mark.parametrize("bad", [{1, 2}, 2**64, "\ud800"], ids=["set", "int", "surrogate"])
def test_both_clients_refuse_an_unencodable_item_and_stay_in_step(daemons, bad):
    # AsyncClient queued the request before encoding it: the failed one stayed
    # pending and every later answer went to the request before it.
    d = daemons()
    with Client(d.socket_path, timeout=WAIT) as c:
        assert c.submit("a") == 1
        with pytest.raises(TypeError, match="msgpack"):
            c.submit(bad)
        assert c.submit("b") == 2

    async def main() -> tuple[int, int, dict[str, Any]]:
        async with AsyncClient(d.socket_path) as ac:
            first = await ac.submit("c")
            with pytest.raises(TypeError, match="msgpack"):
                await ac.submit(bad)
            second, stats = await asyncio.gather(ac.submit("d"), ac.stats())
            return first, second, stats

    first, second, stats = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert (first, second, stats["submitted"]) == (3, 4, 4)


# ------------------------------------------------------------------ AsyncClient


def test_async_client_submits_concurrently_with_dense_seqs(daemons):
    d = daemons()

    async def main() -> tuple[list[int], range, dict[str, Any], dict[str, Any]]:
        async with AsyncClient(d.socket_path) as c:
            seqs = await asyncio.gather(*(c.submit({"n": n}) for n in range(200)))
            many = await c.submit_many([{"n": n} for n in range(200, 210)])
            await c.flush(timeout=WAIT)
            return list(seqs), many, await c.stats(), await c.ping()

    seqs, many, stats, pong = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert sorted(seqs) == list(range(1, 201))
    assert many == range(201, 211)
    assert pong["pong"] is True
    assert stats["delivered"] == 210 and stats["pending"] == 0
    rows = db_items(d)
    assert {seq: r["n"] for seq, r in rows.items() if seq <= 200} == {s: n for n, s in enumerate(seqs)}


def test_async_client_typed_errors(daemons):
    d = daemons("data", "--max-frame-bytes", "1KiB")

    async def main() -> None:
        async with AsyncClient(d.socket_path) as c:
            with pytest.raises(BadRequest) as info:
                await c.request({"op": "explode"})
            assert info.value.code == "unknown_op"
            assert await c.submit("ok") == 1
            with pytest.raises(BadRequest) as info:
                await c.submit("x" * 5000)
            assert info.value.code == "too_large"
            assert await c.submit("ok again") == 2

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_async_client_reconnects_after_the_daemon_restarts(daemons):
    d = daemons()

    async def main() -> tuple[int, int]:
        async with AsyncClient(d.socket_path) as c:
            first = await c.submit("one")
            await asyncio.to_thread(d.stop)
            await asyncio.to_thread(d.start)
            return first, await c.submit("two")

    assert asyncio.run(asyncio.wait_for(main(), WAIT)) == (1, 2)


def test_async_request_in_flight_when_the_daemon_is_killed_raises(daemons, tmp_path):
    env = with_sink(tmp_path, "blocksink", BLOCKING_SINK)
    marker = tmp_path / "in-sink"
    d = daemons("data", "--sink", "blocksink:write", env={**env, "BLOCKSINK_MARKER": str(marker)})

    async def main() -> None:
        c = AsyncClient(d.socket_path, connect_timeout=0.5)
        try:
            assert await c.submit("stuck") == 1
            flush = asyncio.ensure_future(c.flush())
            await asyncio.to_thread(wait_for, marker, d.proc)
            assert not flush.done()
            await asyncio.to_thread(d.stop, signal.SIGKILL)
            with pytest.raises(DaemonUnavailable):
                await asyncio.wait_for(flush, WAIT)  # a hang raises TimeoutError instead
            with pytest.raises(DaemonUnavailable):
                await c.ping()
        finally:
            await c.close()

    asyncio.run(main())


def test_async_client_sends_a_request_larger_than_the_socket_buffer(daemons):
    d = daemons()

    async def main() -> list[int]:
        async with AsyncClient(d.socket_path) as c:
            big = [{"blob": "b" * 50_000, "n": n} for n in range(20)]
            return list(await c.submit_many(big))

    assert asyncio.run(asyncio.wait_for(main(), WAIT)) == list(range(1, 21))
