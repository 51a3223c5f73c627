"""A bulk-ingest HTTP endpoint for tests, started on loopback by the test.

``BulkAPI`` behaves like a bulk-ingest endpoint with idempotency keys: it
decodes each body (gzip, zstd or none), insists on valid NDJSON, stores a
request's lines only the first time it sees its Idempotency-Key, and keeps
every item by its identity ``(log_id, seq)``, counting any identity that came
back under another key (after a crash a batch may be re-cut differently). It
fails on demand: a status with headers, a connection reset (before or after
storing), a slow answer, or a dropped keep-alive connection.
"""

from __future__ import annotations

import gzip
import http.server
import json
import socket
import ssl
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


def _unzstd(data: bytes) -> bytes:
    import zstandard  # only the zstd tests need it

    return zstandard.ZstdDecompressor().decompress(data)


@dataclass
class Fault:
    """What the server does with one request instead of a plain 200."""

    kind: str  # "status", "reset", "slow", "drop" (answer 200, then close the connection)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    store: bool = False  # store the request before failing (the client cannot know it landed)
    delay: float = 0.0


@dataclass
class Request:
    at: float
    headers: dict[str, str]  # lower-cased names
    wire: bytes
    body: bytes
    lines: list[Any]
    conn: int
    status: int = 0
    duplicate: bool = False

    @property
    def key(self) -> str:
        return self.headers.get("idempotency-key", "")


class BulkAPI:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.lock = threading.Lock()
        self.requests: list[Request] = []  # every POST, in arrival order
        self.accepted: list[Request] = []  # stored: the first request with each key
        self.keys: set[str] = set()
        self.items: dict[tuple[str, int], Any] = {}  # identity -> item, first arrival
        self.identity_dups = 0  # lines under a new key whose identity was stored already
        self.mismatches: list[tuple[str, int]] = []  # same identity, different item: a bug
        self.malformed: list[str] = []
        self.truncated = 0
        self.faults: deque[Fault] = deque()
        self.rule: Any = None  # fn(Request) -> Fault | None, when no queued fault is left
        self.opened = 0
        self.closed = 0
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real API
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def setup(self) -> None:
                super().setup()
                with api.lock:
                    api.opened += 1
                    self.conn_id = api.opened

            def finish(self) -> None:
                try:
                    super().finish()
                except (OSError, ValueError):
                    pass  # a connection we reset on purpose
                with api.lock:
                    api.closed += 1

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                api.handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that time out and go away are part of the tests

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- one request

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        at = time.monotonic()
        length = int(h.headers.get("Content-Length", "0"))
        wire = h.rfile.read(length)
        if len(wire) < length:  # the client died mid-request (kill -9): nothing to answer
            with self.lock:
                self.truncated += 1
            h.close_connection = True
            return
        headers = {k.lower(): v for k, v in h.headers.items()}
        try:
            enc = headers.get("content-encoding", "identity")
            body = {"gzip": gzip.decompress, "identity": bytes,
                    "zstd": _unzstd}[enc](wire)
            if body and not body.endswith(b"\n"):
                raise ValueError("body does not end with a newline")
            lines = [json.loads(line) for line in body.split(b"\n")[:-1]]
            if len(lines) != int(headers["walbatch-count"]):
                raise ValueError("Walbatch-Count disagrees with the body")
        except Exception as ex:
            with self.lock:
                self.malformed.append(repr(ex))
            self._answer(h, 400, {}, f"malformed body: {ex}".encode())
            return
        req = Request(at, headers, wire, body, lines, h.conn_id)  # type: ignore[attr-defined]
        with self.lock:
            self.requests.append(req)
            fault = self.faults.popleft() if self.faults else None  # a queued None: plain 200
        if fault is None and self.rule is not None:
            fault = self.rule(req)
        if fault is None or fault.store or fault.kind in ("slow", "drop"):
            self._store(req)
        if fault is None:
            self._answer(h, 200, {}, b'{"ok":true}', req)
        elif fault.kind == "status":
            self._answer(h, fault.status, fault.headers, fault.body, req)
        elif fault.kind == "slow":
            time.sleep(fault.delay)
            self._answer(h, 200, {}, b'{"ok":true}', req)
        elif fault.kind == "drop":
            self._answer(h, 200, {}, b'{"ok":true}', req)
            h.close_connection = True  # no "Connection: close": the client finds out later
        elif fault.kind == "reset":
            # SO_LINGER 0: close() sends RST instead of FIN.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.rfile.close()
            h.wfile.close()
            h.connection.close()
            h.close_connection = True

    def _store(self, req: Request) -> None:
        with self.lock:
            if req.key in self.keys:
                req.duplicate = True
                return
            self.keys.add(req.key)
            self.accepted.append(req)
            for ident, item in identities(req):
                if ident in self.items:
                    self.identity_dups += 1
                    if self.items[ident] != item:
                        self.mismatches.append(ident)
                else:
                    self.items[ident] = item

    def _answer(self, h: Any, status: int, headers: dict[str, str], body: bytes,
                req: Request | None = None) -> None:
        if req is not None:
            req.status = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    # -- what the tests look at

    def stored(self) -> dict[int, Any]:
        """seq -> item of everything stored (one log id per test)."""
        with self.lock:
            return {seq: item for (_, seq), item in self.items.items()}

    def sent(self) -> list[Request]:
        with self.lock:
            return list(self.requests)


def identities(req: Request) -> list[tuple[tuple[str, int], Any]]:
    """(log_id, seq) and item of each line: from the envelope, or from the headers."""
    if req.lines and isinstance(req.lines[0], dict) and set(req.lines[0]) == {"log_id", "seq", "item"}:
        return [((line["log_id"], line["seq"]), line["item"]) for line in req.lines]
    first = int(req.headers["walbatch-first-seq"])  # envelope=0: contiguous seqs, in order
    return [((req.headers["walbatch-log-id"], first + i), line) for i, line in enumerate(req.lines)]


