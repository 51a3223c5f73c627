"""systemd: the unit files verify clean, and the daemon speaks sd_notify (READY, STATUS, WATCHDOG).

``systemd-analyze verify`` and ``systemd-analyze security --offline`` read the unit
files as systemd would (with ExecStart pointed at this environment's ``walbatch``:
verify insists the program exists); ``systemd-sysusers --root`` creates the user
from the sysusers.d snippet in a scratch root. The notify protocol is tested on a
real datagram socket, as systemd listens to it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import WAIT
from simfs import SimFileSystem

from walbatch import DurableBatcher
from walbatch.errors import LogFailed
from walbatch.server import Server, ServerOptions

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found (apt-get install systemd)")
    return path


@pytest.fixture
def units(tmp_path):
    walbatch = shutil.which("walbatch", path=os.path.dirname(sys.executable)) or shutil.which("walbatch")
    assert walbatch, "the walbatch command is not installed in this environment"
    for name in ("walbatch.service", "walbatch.socket"):
        text = (DOCS / name).read_text().replace("/usr/local/bin/walbatch", walbatch)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_systemd_analyze_verify_is_clean(units):
    out = subprocess.run([tool("systemd-analyze"), "verify", str(units / "walbatch.service"),
                          str(units / "walbatch.socket")], capture_output=True, text=True,
                         timeout=WAIT)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


def test_the_service_is_hardened(units):
    out = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes",
                          str(units / "walbatch.service")], capture_output=True, text=True,
                         timeout=WAIT)
    m = re.search(r"Overall exposure level for walbatch.service: ([\d.]+)", out.stdout)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= 2.0, out.stdout  # systemd's scale: 0 (sealed) .. 10 (exposed)


def test_the_unit_keeps_what_socket_activation_needs():
    service = (DOCS / "walbatch.service").read_text()
    sock = (DOCS / "walbatch.socket").read_text()
    assert re.search(r"^Type=notify$", service, re.M) and re.search(r"^WatchdogSec=\d+", service, re.M)
    assert re.search(r"^RuntimeDirectoryPreserve=yes$", service, re.M)
    path = re.search(r"^ListenStream=(\S+)$", sock, re.M).group(1)
    assert f"--socket {path}" in service  # the daemon and the socket unit agree


def test_sysusers_creates_the_walbatch_user(tmp_path):
    (tmp_path / "etc").mkdir()
    out = subprocess.run([tool("systemd-sysusers"), f"--root={tmp_path}",
                          str(DOCS / "walbatch-sysusers.conf")], capture_output=True, text=True,
                         timeout=WAIT)
    assert out.returncode == 0, out.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^walbatch:x:\d+:\d+:[^:]*:/var/lib/walbatch:/usr/sbin/nologin$", passwd, re.M)
    assert re.search(r"^walbatch:x:\d+:", (tmp_path / "etc" / "group").read_text(), re.M)


# ----------------------------------------------------------- sd_notify

class Notify:
    """A NOTIFY_SOCKET as systemd has one: a datagram socket the daemon writes to."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(WAIT)
        self.path = path

    def next(self) -> dict[str, str]:
        msg = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in msg.split("\n"))

    def close(self) -> None:
        self.sock.close()


def test_ready_status_and_watchdog_then_no_pings_once_the_log_failed(tmp_path, monkeypatch):
    sockdir = Path(f"/tmp/wbsd{os.getpid()}")
    sockdir.mkdir(exist_ok=True)
    notify = Notify(str(sockdir / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: pings every 0.1 s at most
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    fs = SimFileSystem(honour_dsync=False)  # so an fsync can fail on command
    b = DurableBatcher("/log", lambda batch: None, _fs=fs, max_delay=0.01)
    server = Server(b, ServerOptions(socket_path=str(sockdir / "s.sock"), shutdown_timeout=1))
    loop_box: list[asyncio.AbstractEventLoop] = []

    async def run() -> None:
        loop_box.append(asyncio.get_running_loop())
        await server.serve()

    t = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    t.start()
    try:
        ready = notify.next()
        assert ready["READY"] == "1" and ready["STATUS"].startswith("0 pending, log 0% full")
        b.submit("x")
        pings = [notify.next() for _ in range(6)]
        assert all(p.get("WATCHDOG") == "1" for p in pings)
        assert "sink ok" in pings[-1]["STATUS"]
        fs.fail("sync", errno.EIO)
        with pytest.raises(LogFailed):
            b.submit("y")
        t0 = time.monotonic()
        while "LogFailed" not in (note := notify.next())["STATUS"]:
            assert time.monotonic() - t0 < WAIT
        after = [note] + [notify.next() for _ in range(4)]
        assert all("WATCHDOG" not in n for n in after), after  # systemd will restart it
        assert all("refuses writes" in n["STATUS"] for n in after)
    finally:
        loop_box[0].call_soon_threadsafe(server.request_stop)
        t.join(WAIT)
        notify.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert not t.is_alive()


def test_a_too_long_socket_path_names_the_path_and_the_fix(tmp_path):
    long_dir = tmp_path / ("d" * 120)
    out = subprocess.run([sys.executable, "-m", "walbatch", "serve", "--data-dir", str(long_dir)],
                         capture_output=True, text=True, timeout=WAIT,
                         env={k: v for k, v in os.environ.items() if not k.startswith("WALBATCH_")})
    assert out.returncode == 1
    assert str(long_dir / "walbatch.sock") in out.stderr and "at most 107" in out.stderr
    assert "--socket" in out.stderr and out.stderr.count("\n") == 1, out.stderr
