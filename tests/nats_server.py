"""Real nats-server processes for tests and benchmarks: one JetStream node or a 3-node cluster.

Each server listens on free loopback ports and keeps its JetStream store in its own
directory, so it can be stopped (SIGTERM), killed (SIGKILL) and started again on the same
port with its data, the way an operator's restart looks to a client.

When no nats-server binary is found the tests are skipped; under CI's
WALBATCH_NO_SKIP=1 the root conftest turns that skip into a failure, so a CI machine
that lost its NATS install cannot go green by skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

CANDIDATES = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server")


def find_binary() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def require_binary() -> str:
    """The nats-server path, or skip the test."""
    import pytest

    path = find_binary()
    if path is None:
        reason = ("nats-server not found on PATH or in " + ", ".join(CANDIDATES)
                  + " (apt-get install nats-server)")
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One `nats-server -js` on loopback; optionally a member of a cluster."""

    def __init__(self, binary: str, store_dir: str | None = None, name: str = "n1",
                 cluster_port: int | None = None, routes: list[int] | None = None,
                 cluster_name: str = "walbatch-test", extra_args: list[str] | None = None) -> None:
        self.binary = binary
        self.extra_args = extra_args or []
        self.name = name
        self.port = free_port()
        self.http_port = free_port()
        self.store_dir = store_dir or tempfile.mkdtemp(prefix=f"walbatch-nats-{name}-")
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.cluster_name = cluster_name
        self.log_path = os.path.join(self.store_dir, "server.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.http_port),
                "-sd", os.path.join(self.store_dir, "js"), "--server_name", self.name,
                "-l", self.log_path]
        if self.cluster_port is not None:
            args += ["--cluster_name", self.cluster_name,
                     "--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            if self.routes:
                args += ["--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        return args + self.extra_args

    def start(self, wait: float = 20.0) -> NatsServer:
        """Start (or restart, same ports and store) and wait until the client port answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_listening(wait)
        return self

    def wait_listening(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited with {self.proc.returncode}; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {self.name} not listening after {wait}s:\n"
                                   + self.log_tail())
            time.sleep(0.02)

    def healthy(self) -> bool:
        """True once /healthz says ok (JetStream ready; in a cluster, meta leader known)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful: flushes the store), SIGKILL if it does not exit in time."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def pause(self) -> None:
        """SIGSTOP: sockets stay open (the kernel even accepts new ones), nobody answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the node vanishes mid-whatever, as in a crash."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(15)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.store_dir, ignore_errors=True)


class NatsCluster:
    """Three JetStream nodes on loopback, fully routed, one cluster name."""

    def __init__(self, binary: str, size: int = 3) -> None:
        ports = [free_port() for _ in range(size)]
        self.nodes = [NatsServer(binary, name=f"n{i + 1}", cluster_port=ports[i],
                                 routes=[p for j, p in enumerate(ports) if j != i])
                      for i in range(size)]

    @property
    def url(self) -> str:
        """All members in one sink URL: nats://h:p1,h:p2,h:p3."""
        return "nats://" + ",".join(n.hostport for n in self.nodes)

    @property
    def urls(self) -> list[str]:
        """The members as a server list for nats-py (which takes no comma-separated URL)."""
        return [n.url for n in self.nodes]

    def start(self, wait: float = 30.0) -> NatsCluster:
        for n in self.nodes:
            n.proc = subprocess.Popen(n.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n in self.nodes:
            n.wait_listening(wait)
        self.wait_healthy(wait)
        return self

    def wait_healthy(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while not all(n.healthy() for n in self.nodes if n.running):
            if time.monotonic() > deadline:
                raise RuntimeError("JetStream cluster not healthy:\n"
                                   + "\n".join(n.log_tail(5) for n in self.nodes))
            time.sleep(0.1)

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()
