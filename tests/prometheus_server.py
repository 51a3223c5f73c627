"""A real Prometheus server for tests: on a free loopback port, its data in a temp dir.

Debian's ``prometheus`` package provides the server and ``promtool`` (CI installs it,
.ci/run). Without them the tests skip, which CI's WALBATCH_NO_SKIP=1 turns into a
failure.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

WAIT = 30.0


def find(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/local/bin/{name}") if Path(p).is_file()), None)


def require(name: str) -> str:
    import pytest

    path = find(name)
    if path is None:
        pytest.skip(f"{name} not found (apt-get install prometheus)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """``prometheus`` scraping ``targets`` every ``interval_ms`` as job ``walbatch``."""

    def __init__(self, binary: str, targets: list[str], rule_files: list[str] = (),
                 interval_ms: int = 1000) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="wb-prom-"))
        self.port = free_port()
        config = {
            "global": {"scrape_interval": f"{interval_ms}ms", "evaluation_interval": f"{interval_ms}ms"},
            "rule_files": [str(Path(r).resolve()) for r in rule_files],
            "scrape_configs": [{"job_name": "walbatch", "static_configs": [{"targets": targets}]}],
        }
        # JSON is YAML: no YAML library needed to write the config.
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while True:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_text()}"
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{self.log_text()}"
            time.sleep(0.05)

    def log_text(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH?params; the ``data`` of a successful answer."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=WAIT) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as ex:
            raise AssertionError(f"{path} {params}: {ex.code} {ex.read()[:500]!r}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
