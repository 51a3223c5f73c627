"""The daemon's HTTP listener (``walbatch serve --http ADDR``): metrics, health, ingest.

A thin aiohttp application over the daemon's one ``DurableBatcher``: ``POST
/v1/items`` goes through the same ``asubmit``/``asubmit_many`` as the Unix
socket, so a 200 means exactly what the socket's ``ok`` means: the items are in
the log and fdatasync'd. The routes (docs/operations.md has the reference):

- ``GET /metrics``: Prometheus text format (walbatch.metrics, prometheus-client)
- ``GET /healthz``: 200 while the process serves
- ``GET /readyz``: 200, or 503 naming why not (walbatch.health)
- ``POST /v1/items``: ``application/json`` (one item) or ``application/x-ndjson``
  (one item per line, all in one group commit); ``?key=`` for keyed batching.
  200 ``{"first_seq": N, "count": M}`` after fsync. All or nothing: 400 (bad JSON,
  naming the line), 413 (over ``max_body``), 415 (another content type) write
  nothing. 429 + ``Retry-After`` between the high- and low-water marks, 503 +
  ``Retry-After`` while shutting down, 401 without the bearer token when one is set.

Hostile clients: aiohttp parses HTTP (no hand-written parsing here) and refuses
oversized request lines and headers with 400; a connection that sends no
complete request within ``idle_timeout`` is closed; a body is read within
``read_timeout`` (408) and never past ``max_body`` (413), chunked or compressed.

aiohttp is the optional extra ``walbatch[http]``, imported only when the
listener starts.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import values
from .errors import Closed, LogFailed, LogFull, LogWriteError
from .health import Backpressure, not_ready

if TYPE_CHECKING:
    from .durable import DurableBatcher

log = logging.getLogger("walbatch.http")

JSON = "application/json"
NDJSON = "application/x-ndjson"
ROUTES = ("/metrics", "/healthz", "/readyz", "/v1/items")


@dataclass(frozen=True)
class HttpOptions:
    address: str
    """``HOST:PORT`` to listen on (``[::1]:9464`` for IPv6; port 0 picks a free one)."""
    max_body: int = 16 << 20
    """The largest request body read (after decompression); past it, 413."""
    token: str | None = None
    """When set, ``POST /v1/items`` needs ``Authorization: Bearer <token>`` (else 401)."""
    high_water: float = 0.8
    """Fraction of ``max_log_bytes`` from which submits get 429 ..."""
    low_water: float = 0.6
    """... until the log is back below this fraction."""
    retry_after: int = 1
    """Seconds in the ``Retry-After`` of a 429 or 503."""
    ready_sink_grace: float = 60.0
    """``/readyz`` turns 503 once the sink has been failing for longer than this."""
    idle_timeout: float = 15.0
    """A connection with no complete request for this long is closed (slow headers too)."""
    read_timeout: float = 30.0
    """A request body not received within this many seconds gets 408."""
    traced: bool = False
    """Honour a W3C ``traceparent``: each POST is a span, which its items' delivery
    spans link to (walbatch.tracing; needs walbatch[otel])."""


class _Busy(asyncio.Protocol):
    """A connection past the limit: one 503 (with ``Retry-After``), then closed, unread."""

    def __init__(self, retry_after: int) -> None:
        body = b'{"error": "the daemon has no room for another connection; retry later"}'
        self.answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                       b"Retry-After: %d\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                       % (retry_after, len(body), body))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.answer)
        transport.close()


def require() -> Any:
    """The aiohttp.web module, or ImportError naming the extra to install."""
    try:
        from aiohttp import web
    except ImportError as ex:
        raise ImportError("walbatch serve --http needs aiohttp and prometheus-client: "
                          "pip install 'walbatch[http]'") from ex
    return web


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6]:PORT``) as (host, port); ValueError naming the problem."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (examples: 127.0.0.1:9464, [::1]:9464, "
                         "0.0.0.0:9464 for every interface)")
    return host, int(port)


class HttpListener:
    """The aiohttp application of one daemon. ``start()``, then ``stop()``."""

    def __init__(self, batcher: DurableBatcher, opts: HttpOptions, registry: Any,
                 backpressure: Backpressure, room: Callable[[int], bool] | None = None) -> None:
        self.batcher = batcher
        self.room = room
        """``room(http_connections)``: may one more connection be served? The daemon's
        file descriptors are shared with its socket, log and sink (None: no limit)."""
        self._listener: asyncio.base_events.Server | None = None
        self._busy_logged = 0.0
        self._open = 0  # connections handed to aiohttp and not yet lost
        self.opts = opts
        self.registry = registry
        self.backpressure = backpressure
        self.stopping = False
        """Set when the daemon begins to shut down: submits get 503, /readyz 503."""
        self.address = ""
        self._runner: Any = None
        from prometheus_client import Counter

        self.requests = Counter("walbatch_http_requests", "HTTP requests answered, by status "
                                "code and route.", ["code", "path"], registry=registry)
        self._token = opts.token.encode() if opts.token else None

    async def start(self) -> str:
        """Listen; return the address bound (``host:port``)."""
        web = require()

        @web.middleware
        async def count(request: Any, handler: Any) -> Any:
            return await self._count(request, handler)

        app = web.Application(client_max_size=self.opts.max_body, middlewares=[count])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_post("/v1/items", self._items)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.opts.idle_timeout,
                                     shutdown_timeout=5.0, logger=_server_log())
        await self._runner.setup()
        server = self._runner.server
        lost = server.connection_lost

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self._open -= 1
            lost(handler, exc)

        # Counted here, not with server.connections: asyncio creates a burst of accepted
        # connections' protocols before any of them is registered there.
        server.connection_lost = connection_lost
        host, port = parse_address(self.opts.address)
        # aiohttp's low-level server is the protocol factory (as its docs show with
        # loop.create_server); ours asks for room first, so that a flood of HTTP
        # connections cannot take the descriptors the log and the sink need.
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                self._protocol, host, port, backlog=1024)
        except OSError as ex:
            await self._runner.cleanup()
            raise OSError(ex.errno, f"cannot listen for HTTP on {self.opts.address}: "
                          f"{ex.strerror or ex}") from None
        bound = self._listener.sockets[0].getsockname()
        self.address = (f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}")
        return self.address

    def connections(self) -> int:
        """HTTP connections open now (and accepted ones about to be)."""
        return self._open

    def _protocol(self) -> asyncio.BaseProtocol:
        if self.room is None or self.room(self._open):
            self._open += 1
            return self._runner.server()
        now = time.monotonic()
        if now - self._busy_logged > 10:
            self._busy_logged = now
            log.warning("walbatch: refusing HTTP connections: the daemon holds as many "
                        "connections as its file descriptor limit allows (raise it with "
                        "ulimit -n / LimitNOFILE)", extra={"event": "connections_full"})
        return _Busy(self.opts.retry_after)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; the open ones are shut down below
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ routes

    async def _count(self, request: Any, handler: Any) -> Any:
        from aiohttp import web

        path = request.path if request.path in ROUTES else "other"
        try:
            response = await handler(request)
        except web.HTTPException as ex:
            self.requests.labels(str(ex.status), path).inc()
            raise
        except Exception:
            self.requests.labels("500", path).inc()
            raise
        self.requests.labels(str(response.status), path).inc()
        return response

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: Any) -> Any:
        return _json(200, {"status": "ok"})

    async def _readyz(self, request: Any) -> Any:
        reasons = not_ready(self.batcher, self.backpressure, self.opts.ready_sink_grace,
                            self.stopping)
        if reasons:
            return _json(503, {"ready": False, "reasons": reasons})
        return _json(200, {"ready": True})

    async def _items(self, request: Any) -> Any:
        if self._token is not None and not self._authorized(request):
            return _json(401, {"error": "missing or wrong bearer token (Authorization: Bearer "
                                        "<token>); nothing was written"},
                         {"WWW-Authenticate": 'Bearer realm="walbatch"'})
        if self.stopping or self.batcher.closed:
            return self._unavailable("the daemon is shutting down; nothing was written")
        ctype = request.content_type
        if ctype not in (JSON, NDJSON) or (request.charset or "utf-8").lower() != "utf-8":
            return _json(415, {"error": f"Content-Type {request.headers.get('Content-Type')!r} "
                                        f"is not taken: send {JSON} (one item) or {NDJSON} (one "
                                        "item per line), UTF-8; nothing was written"})
        if request.content_length is not None and request.content_length > self.opts.max_body:
            return self._too_large(request.content_length)
        key = request.query.getall("key", [])
        if len(key) > 1:
            return _json(400, {"error": "give ?key= at most once; nothing was written"})
        if self.backpressure.check():
            return _json(429, {"error": f"the log is above its high-water mark "
                                        f"({self.backpressure.log_bytes} of "
                                        f"{self.backpressure.capacity} bytes): retry after "
                                        f"{self.opts.retry_after}s; nothing was written"},
                         {"Retry-After": str(self.opts.retry_after)})
        try:
            async with asyncio.timeout(self.opts.read_timeout):
                body = await request.read()
        except TimeoutError:
            return _json(408, {"error": f"the body did not arrive within "
                                        f"{self.opts.read_timeout:g}s; nothing was written"},
                         {"Connection": "close"})
        except _too_large_error() as ex:
            return self._too_large(getattr(ex, "actual_size", None))
        except _bad_body_errors() as ex:  # e.g. a Content-Encoding that does not decode
            why = " ".join(str(getattr(ex, "message", None) or ex).split())
            return _json(400, {"error": f"the body could not be read ({why}); nothing was "
                                        "written"}, {"Connection": "close"})
        try:
            items = parse_items(body, ctype == NDJSON)
        except ValueError as ex:
            return _json(400, {"error": f"{ex}; nothing was written"})
        if not self.opts.traced:
            return await self._submit(items, ctype, key[0] if key else None)
        from opentelemetry import propagate, trace

        with trace.get_tracer("walbatch").start_as_current_span(
                "walbatch http submit", context=propagate.extract(request.headers),
                kind=trace.SpanKind.SERVER, attributes={"walbatch.items": len(items)}):
            return await self._submit(items, ctype, key[0] if key else None)

    async def _submit(self, items: list[Any], ctype: str, key: str | None) -> Any:
        b = self.batcher
        try:
            if ctype == JSON:
                r = await b.asubmit(items[0], key=key)
                first, count = r.seq, 1
            else:
                # Parsed here and held by nobody else: delivery takes them as they are.
                rs = await (b._asubmit_many_owned(items) if key is None
                            else b.asubmit_many(items, key=key))
                first, count = rs.first_seq, rs.count
        except (TypeError, ValueError) as ex:  # a value msgpack cannot hold, a bad key
            return _json(400, {"error": str(ex)})
        except LogFull as ex:
            return _json(429, {"error": str(ex)}, {"Retry-After": str(self.opts.retry_after)})
        except Closed as ex:
            return self._unavailable(str(ex))
        except LogWriteError as ex:  # e.g. a full disk: rolled back, the log still works
            return self._unavailable(str(ex))
        except LogFailed as ex:
            return _json(500, {"error": str(ex)})
        return _json(200, {"first_seq": first, "count": count})

    # ----------------------------------------------------------- helpers

    def _authorized(self, request: Any) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        assert self._token is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self._token)

    def _unavailable(self, why: str) -> Any:
        return _json(503, {"error": why}, {"Retry-After": str(self.opts.retry_after)})

    def _too_large(self, size: int | None) -> Any:
        got = f" ({size} bytes)" if size is not None else ""
        return _json(413, {"error": f"the body{got} is larger than the limit of "
                                    f"{self.opts.max_body} bytes (--http-max-body); split it; "
                                    "nothing was written"}, {"Connection": "close"})


def _too_large_error() -> type[Exception]:
    from aiohttp import web

    return web.HTTPRequestEntityTooLarge


def _bad_body_errors() -> tuple[type[Exception], ...]:
    from aiohttp.http_exceptions import HttpProcessingError
    from aiohttp.web import RequestPayloadError

    return HttpProcessingError, RequestPayloadError


class _ClientFaults(logging.Filter):
    """aiohttp logs a malformed request as an error with a traceback; it is the client's
    fault, not ours: one warning line without the traceback, at most every 10 s (with
    how many were left out), so a hostile client cannot fill the log. Anything else
    (a bug in a handler) passes unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._last = -1e18
        self._quiet = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, _bad_body_errors()):
            return True
        now = record.created
        if now - self._last < 10.0:
            self._quiet += 1
            return False
        self._last, quiet, self._quiet = now, self._quiet, 0
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "walbatch: refused a malformed HTTP request (%s: %s)%s"
        record.args = (type(exc).__name__, " ".join(str(getattr(exc, "message", None) or exc).split()),
                       f"; {quiet} more in the last 10 s" if quiet else "")
        record.exc_info = record.exc_text = None
        record.event = "http_bad_request"
        return True


def _server_log() -> logging.Logger:
    logger = logging.getLogger("walbatch.http.server")
    if not any(isinstance(f, _ClientFaults) for f in logger.filters):
        logger.addFilter(_ClientFaults())
    return logger


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    from aiohttp import web

    return web.json_response(body, status=status, headers=headers)


# ------------------------------------------------------------------ parsing

def parse_items(body: bytes, ndjson: bool) -> list[Any]:
    """The items of a request body; ValueError naming the line (and column) of a problem.

    Strict JSON: NaN and Infinity, a number too large for a float (it would
    become infinity) and a repeated member name (which value would be "the"
    item?) are refused rather than changed.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as ex:
        line = body.count(b"\n", 0, ex.start) + 1
        raise ValueError(f"line {line}: not valid UTF-8 (byte {ex.start} of the body)") from None
    if not ndjson:
        if not text.strip():
            raise ValueError("the body is empty: send one JSON value")
        return [_loads(text, "the body")]
    items = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            items.append(_loads(line, f"line {n}"))
    if not items:
        raise ValueError("the body holds no items: send one JSON value per line")
    return items


def _loads(text: str, where: str) -> Any:
    return values.parse_json(text, where)
