"""Every ```python block in README.md and docs/ runs, so the docs cannot rot.

Each block runs in a fresh Python process, in an empty temporary directory (so
``"./data"`` is a new log), and must exit 0 within a minute. Placeholders are
filled by fixtures that a block asks for in an HTML comment right above it
(invisible on GitHub):

    <!-- example: needs=postgresql -->     a real server on loopback; every
    <!-- example: needs=nats -->           postgresql://..., nats://... or
    <!-- example: needs=http -->           https://ingest.example.com/... URL in
                                           the block points at it
    <!-- example: needs=daemon -->         `walbatch serve --data-dir walbatch-data`
                                           runs in the block's directory
    <!-- example: needs=batcher -->        ``b`` (an open DurableBatcher on ./data)
                                           and ``rows`` (a list of dicts) exist
    <!-- example: continue -->             runs after the previous block of the
                                           same file, in the same process

A block that only shows a shape and cannot run is a bug in the docs: make it
runnable, with a fixture if it needs a server.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pg_server import postgres_fixture  # noqa: F401 - the `postgres` fixture

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!--\s*example:\s*(.*?)\s*-->\s*\n*$", re.S)
FIXTURES = {"postgresql", "nats", "http", "daemon", "batcher"}


@dataclass
class Example:
    path: Path
    line: int
    code: str
    needs: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def examples() -> list[Example]:
    out: list[Example] = []
    for path in DOCS:
        text = path.read_text()
        previous: Example | None = None
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            mark = MARK.search(text[:m.start()])
            words = mark.group(1).split() if mark else []
            needs: set[str] = set()
            for w in words:
                if w.startswith("needs="):
                    needs |= set(w[len("needs="):].split(","))
            unknown = needs - FIXTURES
            assert not unknown, f"{path}:{line}: unknown fixture(s) {sorted(unknown)}"
            if "continue" in words:
                assert previous is not None, f"{path}:{line}: nothing to continue"
                previous.code += "\n" + m.group(1)
                previous.needs |= needs
                continue
            previous = Example(path, line, m.group(1), needs)
            out.append(previous)
    return out


EXAMPLES = examples()


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_the_example_runs(example: Example, request: pytest.FixtureRequest) -> None:
    code = example.code
    workdir = Path(tempfile.mkdtemp(prefix="wbdoc-"))
    try:
        with _servers(example.needs, request, workdir) as replace:
            for pattern, value in replace:
                code = re.sub(pattern, lambda _m, v=value: v, code)
            if "batcher" in example.needs:
                code = BATCHER_PRELUDE + code + "\nb.close()\n"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
            proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env,
                                  capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (
            f"{example.name} failed:\n{textwrap.indent(code, '    ')}\n--- stderr:\n{proc.stderr[-3000:]}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


BATCHER_PRELUDE = """\
from walbatch import DurableBatcher
b = DurableBatcher("./data", lambda batch: None)
rows = [{"user": i, "page": "/"} for i in range(10)]
"""


class _servers:
    """Start what the example needs; yield (regex, replacement) pairs for its source."""

    def __init__(self, needs: set[str], request: pytest.FixtureRequest, workdir: Path) -> None:
        self.needs, self.request, self.workdir = needs, request, workdir
        self._stop: list = []

    def __enter__(self) -> list[tuple[str, str]]:
        replace: list[tuple[str, str]] = []
        if "postgresql" in self.needs:
            pg = self.request.getfixturevalue("postgres")
            replace.append((r"postgresql://[^?\"'\s]*", pg.url("postgres")))
        if "nats" in self.needs:
            nats = self.request.getfixturevalue("doc_nats")
            replace.append((r"nats://[^?\"'\s]*", nats.url))
        if "http" in self.needs:
            url = self._http()
            replace.append((r"https?://ingest\.example\.com[^?\"'\s]*", url))
        if "daemon" in self.needs:
            self._daemon()
        return replace

    def __exit__(self, *exc: object) -> None:
        for stop in reversed(self._stop):
            stop()

    def _http(self) -> str:
        class Bulk(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bulk)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._stop.append(lambda: (server.shutdown(), server.server_close()))
        return f"http://127.0.0.1:{server.server_address[1]}/v1/bulk"

    def _daemon(self) -> None:
        data = self.workdir / "walbatch-data"
        proc = subprocess.Popen([sys.executable, "-m", "walbatch", "serve", "--data-dir", str(data)],
                                cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def stop() -> None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._stop.append(stop)
        sock = str(data / "walbatch.sock")
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"walbatch serve exited: {proc.stderr.read().decode()[-2000:]}"
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                return
            except OSError:
                assert time.monotonic() < deadline, "walbatch serve never listened"
                time.sleep(0.02)


@pytest.fixture(scope="module")
def doc_nats(tmp_path_factory) -> Iterator[object]:
    from nats_server import NatsServer, require_binary

    server = NatsServer(require_binary(), store_dir=str(tmp_path_factory.mktemp("nats"))).start()
    yield server
    server.stop()


def test_the_collector_finds_blocks_and_their_fixtures() -> None:
    assert any(e.path.name == "README.md" for e in EXAMPLES)
    assert all(e.needs <= FIXTURES for e in EXAMPLES)
