"""A real `walbatch serve --http 127.0.0.1:0` subprocess for tests, crash tests and benchmarks.

The daemon logs in JSON (``--log-format json``); its ``started`` line says which
port it bound, and ``events()`` gives every state-change line as a dict. Nothing is
mocked: requests go over loopback TCP into the daemon's one DurableBatcher.

``GATE_SINK`` is the source of a sink module for tests that need a sink that is
down on command: ``gate:write`` fails with a transient SinkError while the file
named by ``$WALBATCH_TEST_GATE`` is absent, and otherwise appends each batch's
``(seq, item)`` pairs as JSON lines to ``$WALBATCH_TEST_OUT``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

WAIT = 30.0
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("WALBATCH_", "LISTEN_", "WATCHDOG_")) and k != "NOTIFY_SOCKET"}

GATE_SINK = textwrap.dedent("""
    import json, os
    from walbatch.errors import SinkError

    def write(batch):
        if not os.path.exists(os.environ["WALBATCH_TEST_GATE"]):
            raise SinkError("the test's gate is closed")
        with open(os.environ["WALBATCH_TEST_OUT"], "a") as f:
            f.write("".join(json.dumps([r.seq, r.item]) + "\\n" for r in batch))
""")


class HttpDaemon:
    """One `walbatch serve` with an HTTP listener on a free loopback port."""

    def __init__(self, data_dir: Path, args: list[str] = (), env: dict[str, str] | None = None,
                 log_path: Path | None = None, prefix: list[str] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.socket_path = str(self.data_dir / "walbatch.sock")
        self.cmd = [*prefix, sys.executable, "-m", "walbatch", "serve", "--data-dir", str(data_dir),
                    "--http", "127.0.0.1:0", "--log-format", "json", "--max-delay", "0.01",
                    "--shutdown-timeout", "10", *args]
        self.env = {**BASE_ENV, **(env or {})}
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    # ------------------------------------------------------------ process

    def start(self, timeout: float = WAIT) -> HttpDaemon:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = len(self.log_lines())
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout
        while True:
            started = [e for e in self.events()[start:] if e.get("event") == "started"]
            if started:
                self.port = int(started[-1]["http"].rsplit(":", 1)[1])
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"walbatch serve exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"walbatch serve did not start in {timeout}s:\n"
                                     f"{self.log_text()[-3000:]}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = WAIT) -> int:
        """Send ``sig`` and wait (SIGKILL after ``timeout``); the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
                raise AssertionError(f"walbatch serve ignored signal {sig} for {timeout}s") from None
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line (other output, e.g. a traceback, is skipped)."""
        out = []
        for line in self.log_lines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out

    def wait_event(self, name: str, timeout: float = WAIT, after: int = 0) -> dict[str, Any]:
        """The first ``event == name`` log line past the first ``after`` lines."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events()[after:] if e.get("event") == name]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} log line in {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)

    # ---------------------------------------------------------------- HTTP

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = WAIT
                ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); an HTTP error status is returned, not raised."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as ex:
            return ex.code, dict(ex.headers), ex.read()

    def post(self, items: list[Any] | Any, ndjson: bool = True, query: str = "",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        """POST items (a list as NDJSON, or one item as JSON); (status, headers, JSON answer)."""
        if ndjson:
            body = "".join(json.dumps(i) + "\n" for i in items).encode()
            ctype = "application/x-ndjson"
        else:
            body, ctype = json.dumps(items).encode(), "application/json"
        status, hdrs, raw = self.request("POST", "/v1/items" + query, body,
                                         {"Content-Type": ctype, **(headers or {})})
        return status, hdrs, json.loads(raw) if raw else None

    def get_json(self, path: str) -> tuple[int, Any]:
        status, _, raw = self.request("GET", path)
        return status, json.loads(raw)

    def metrics(self) -> dict[str, float]:
        """The /metrics answer as {"name{labels}": value} (comments skipped)."""
        status, _, raw = self.request("GET", "/metrics")
        assert status == 200, raw
        out = {}
        for line in raw.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str) -> float:
        return self.metrics()[name]


def write_gate_sink(directory: Path) -> dict[str, str]:
    """Write the gate sink module into ``directory``; the env a daemon needs to load it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gate.py").write_text(GATE_SINK)
    path = [str(directory), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(path),
            "WALBATCH_TEST_GATE": str(directory / "gate.open"),
            "WALBATCH_TEST_OUT": str(directory / "out.jsonl")}
