"""HTTP bulk sink: NDJSON POSTs with an Idempotency-Key per request.

URL: ``http(s)://[user:password@]host[:port]/path?OPTIONS`` (see docs/sinks/http.md).

Wire format. One request per batch (or per part of a batch, see below), body of
newline-delimited JSON (UTF-8), one line per item. By default each line is an
envelope ``{"log_id": ..., "seq": ..., "item": ...}`` (the file sink's format), so
any receiver can drop duplicates per item; ``envelope=0`` sends the bare item and
leaves the identity to the headers. Items are written under walbatch's value
mapping (walbatch.values, docs/values.md): what JSON has no form for (bytes, NaN,
non-str keys, ...) is a tagged object, and ``values.loads`` reads any line back.

Identity. Every request carries ``Idempotency-Key: <log_id>:<first_seq>-<last_seq>``
(for a part whose seqs are not contiguous, e.g. keyed batching, a digest of
its seqs is appended so two different sets of seqs never share a key), plus
``Walbatch-Log-Id``, ``Walbatch-First-Seq``, ``Walbatch-Last-Seq``,
``Walbatch-Count`` and ``Walbatch-Attempt``. The key depends only on the
records in the request, so a retry sends the same key and the same bytes.

Size. ``max_body_bytes`` bounds the uncompressed body: a batch that encodes to
more is split into several requests, greedily in seq order, each with its own
key. An item whose line alone exceeds the limit is refused (dead-lettered).

Outcomes. 2xx: delivered. 400, 413 and 422 are about the content: a request of
several items that gets one is split in halves, sent again, and so on until the
offending items are alone; each of those is refused (``PermanentSinkError`` with
the status and a snippet of the response) and the rest are delivered. Every other
status (401, 403, 404, 408, 429, 5xx, ...), connection errors and timeouts are
about the endpoint, not the items: transient (``SinkError(retryable=True,
retry_after=...)`` from ``Retry-After``), retried until the endpoint takes them.
When only some requests of a batch fail, ``write`` returns per-item outcomes.
After a transient failure the rest of the batch is not sent; the flusher retries
the failed request and everything after it, and because cutting is greedy from the
first line, that suffix is cut into the very same requests (same bytes, same keys).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import os
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, unquote_plus, urlencode, urlsplit

from ..errors import PermanentSinkError, SinkError
from ..record import Batch, Record
from ..values import dumps, encode
from .base import require
from .urls import URLOptions

DEFAULT_MAX_BODY_BYTES = 5 << 20
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONTENT_TYPE = "application/x-ndjson"
COMPRESSIONS = ("gzip", "zstd", "none")
_DEFAULT_LEVEL = {"gzip": 6, "zstd": 3, "none": 0}
_LEVELS = {"gzip": range(0, 10), "zstd": range(-7, 23)}

_SNIPPET_CHARS = 300
_SNIPPET_BYTES = 64 << 10
_MAX_DRAIN = 16 << 20  # past this, drop the connection rather than read the rest of a reply

# Set by the sink itself: a user header of the same name would contradict the body.
_RESERVED = {"content-length", "content-encoding", "transfer-encoding", "host", "idempotency-key",
             "connection", "content-type"}
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_URL_OPTIONS = ("compress", "compress_level", "envelope", "max_body_bytes", "timeout", "header",
                "header_env", "headers_file", "content_type", "retry_status", "ca_file")
_REPEATABLE = ("header", "header_env")
# Statuses that blame the request's content: the items in it, not the endpoint.
CONTENT_STATUSES = frozenset({400, 413, 422})


def encode_line(log_id: str, rec: Record, envelope: bool = True) -> bytes:
    """One NDJSON line, UTF-8, with its newline."""
    if envelope:
        return (b'{"log_id":%s,"seq":%d,"item":%s}\n'
                % (_quoted_id(log_id), rec.seq, dumps(rec.item).encode()))
    return dumps(rec.item).encode() + b"\n"


@functools.lru_cache(maxsize=64)
def _quoted_id(log_id: str) -> bytes:
    return encode(log_id)


def idempotency_key(log_id: str, seqs: list[int]) -> str:
    """``<log_id>:<first>-<last>``, plus a digest of the seqs when they have gaps."""
    first, last = seqs[0], seqs[-1]
    key = f"{log_id}:{first}-{last}"
    if last - first + 1 != len(seqs):
        digest = hashlib.blake2b(",".join(map(str, seqs)).encode(), digest_size=8).hexdigest()
        key += f":{len(seqs)}:{digest}"
    return key


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        # RFC 9110 says an integer; some servers send "0.5", which means what it says.
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 850/asctime forms parse as naive; HTTP dates are GMT
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return None
    return seconds


class _ContentRefused(PermanentSinkError):
    """The endpoint refused a request for its content (400, 413, 422)."""


class _Part:
    """One request's worth of records: their seqs and encoded lines."""

    __slots__ = ("records", "lines", "nbytes")

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.lines: list[bytes] = []
        self.nbytes = 0

    def add(self, rec: Record, line: bytes) -> None:
        self.records.append(rec)
        self.lines.append(line)
        self.nbytes += len(line)

    def halves(self) -> tuple[_Part, _Part]:
        mid = len(self.records) // 2
        first, second = _Part(), _Part()
        for i, (rec, line) in enumerate(zip(self.records, self.lines, strict=True)):
            (first if i < mid else second).add(rec, line)
        return first, second


class HTTPSink:
    """POST batches as NDJSON to ``url`` (sent as given, query included).

    Thread-safe: ``write`` may run on several flusher threads at once
    (``flush_concurrency``); each thread keeps its own keep-alive connection.
    ``close()`` closes them all.
    """

    def __init__(self, url: str, *, headers: Mapping[str, str] | None = None,
                 compress: str = "gzip", compress_level: int | None = None,
                 envelope: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 timeout: float = DEFAULT_TIMEOUT, content_type: str = DEFAULT_CONTENT_TYPE,
                 retry_status: Iterable[int] = (), ca_file: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"HTTP sink URL must start with http:// or https://, got {_safe(url)!r}")
        if parts.fragment:
            raise ValueError(f"HTTP sink URL {_safe(url)!r} has a #fragment; remove it")
        if not parts.hostname:
            raise ValueError(f"HTTP sink URL {_safe(url)!r} has no host")
        try:
            port = parts.port
        except ValueError as ex:
            raise ValueError(f"HTTP sink URL {_safe(url)!r}: bad port ({ex})") from None
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        # For messages and repr: never the credentials or the query (it may hold an API key).
        self.display_url = f"{parts.scheme}://{host}:{self.port}{parts.path or '/'}"

        if compress not in COMPRESSIONS:
            raise ValueError(f"HTTP sink: compress must be one of {', '.join(COMPRESSIONS)}; "
                             f"got {compress!r}")
        self.compress = compress
        if compress == "none":
            if compress_level is not None:
                raise ValueError("HTTP sink: compress_level needs compress=gzip or compress=zstd")
            self.compress_level = 0
        else:
            level = _DEFAULT_LEVEL[compress] if compress_level is None else compress_level
            if level not in _LEVELS[compress]:
                allowed = _LEVELS[compress]
                raise ValueError(f"HTTP sink: compress_level for {compress} must be in "
                                 f"{allowed.start}..{allowed.stop - 1}; got {compress_level!r}")
            self.compress_level = level
        if compress == "zstd":
            self._zstd = require("zstandard", "zstd", "HTTP (zstd)")
        self.envelope = bool(envelope)
        if not isinstance(max_body_bytes, int) or max_body_bytes < 64:
            raise ValueError(f"HTTP sink: max_body_bytes must be an integer >= 64; got {max_body_bytes!r}")
        self.max_body_bytes = max_body_bytes
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise ValueError(f"HTTP sink: timeout must be a number of seconds from 0 to 86400 "
                             f"(a day); got {timeout!r}")
        self.timeout = float(timeout)
        _check_header("Content-Type", content_type, what="content_type")
        self.retry_status = frozenset(retry_status)
        for s in self.retry_status:
            if not isinstance(s, int) or not 100 <= s <= 599:
                raise ValueError(f"HTTP sink: retry_status must hold HTTP status codes; got {s!r}")
        self._ssl: ssl.SSLContext | None = None
        if self.scheme == "https":
            if ca_file is not None and not os.path.isfile(ca_file):
                raise ValueError(f"HTTP sink: ca_file {ca_file!r} does not exist")
            self._ssl = ssl.create_default_context(cafile=ca_file)
        elif ca_file is not None:
            raise ValueError("HTTP sink: ca_file needs an https:// URL")

        fixed: dict[str, str] = {}
        for name, value in (headers or {}).items():
            _check_header(name, value)
            fixed[name] = value
        if parts.username is not None:
            if any(n.lower() == "authorization" for n in fixed):
                raise ValueError("HTTP sink: the URL has user:password and an Authorization header "
                                 "is given too; use one")
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            fixed["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode("ascii")
        if not any(n.lower() == "user-agent" for n in fixed):
            fixed["User-Agent"] = "walbatch"
        fixed["Content-Type"] = content_type
        if compress != "none":
            fixed["Content-Encoding"] = compress
        self.content_type = content_type
        self._headers = fixed
        self._header_names = sorted(fixed)  # for repr: names only, values may be secrets

        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: set[http.client.HTTPConnection] = set()
        self._generation = 0  # bumped by close(): threads drop connections from before it
        self.counters = {"requests": 0, "ok": 0, "transient": 0, "permanent": 0,
                         "stale_reconnects": 0, "items_sent": 0, "bytes_raw": 0, "bytes_sent": 0}

    # ------------------------------------------------------------------ write

    def write(self, batch: Batch) -> list[BaseException | None] | None:
        log_id = batch.log_id
        outcomes: dict[int, BaseException] = {}  # seq -> failure
        parts = self._cut(batch, log_id, outcomes)
        parts.reverse()  # a stack: the next part to send is last
        delivered = 0
        stop: SinkError | None = None
        while parts:
            part = parts.pop()
            seqs = [r.seq for r in part.records]
            if stop is not None:
                # An earlier request was refused for now (429, 503, down): sending more
                # would only add load; these go again with the failed one.
                err = SinkError(f"not sent: {stop}", retry_after=stop.retry_after)
                for s in seqs:
                    outcomes[s] = err
                continue
            try:
                self._send(part, log_id, seqs, batch.attempt)
            except _ContentRefused as ex:
                if len(seqs) > 1:
                    # Some item in it is refused: send each half on its own until the
                    # refused ones are alone, so the others are delivered.
                    parts += reversed(part.halves())
                    continue
                outcomes[seqs[0]] = PermanentSinkError(str(ex))
                continue
            except SinkError as ex:
                for s in seqs:
                    outcomes[s] = ex
                if ex.retryable:
                    # Stop here rather than skip ahead: the retry then holds this part
                    # and all after it (a suffix of the lines), which cuts the same way.
                    stop = ex
                continue
            delivered += len(seqs)
        if not outcomes:
            return None
        if not delivered and len(outcomes) == len(batch):
            # One failure for the whole batch: raise it, so the flusher retries (or
            # dead-letters) the batch as a whole and says so once.
            if stop is not None and all(getattr(o, "retryable", False) for o in outcomes.values()):
                raise stop
            if len({id(o) for o in outcomes.values()}) == 1:
                raise next(iter(outcomes.values()))
        if stop is not None and stop.retry_after is not None:
            # The flusher takes the retry delay from the first failed record, which may
            # be a refused one (a 400'd part, an item with no JSON form): let every
            # failure here carry the server's Retry-After so it is honoured anyway.
            for o in outcomes.values():
                if isinstance(o, SinkError) and o.retry_after is None:
                    o.retry_after = stop.retry_after
        return [outcomes.get(r.seq) for r in batch]

    def _cut(self, batch: Batch, log_id: str,
             outcomes: dict[int, BaseException]) -> list[_Part]:
        """Encode every record and cut the lines, greedily, into parts under max_body_bytes."""
        limit = self.max_body_bytes
        envelope = self.envelope
        parts: list[_Part] = []
        cur = _Part()
        for rec in batch:
            try:
                line = encode_line(log_id, rec, envelope)
            except (TypeError, ValueError, RecursionError) as ex:
                outcomes[rec.seq] = PermanentSinkError(
                    f"seq {rec.seq}: item has no JSON form ({type(ex).__name__}: {ex})")
                continue
            size = len(line)
            if size > limit:
                outcomes[rec.seq] = PermanentSinkError(
                    f"seq {rec.seq}: item encodes to {size} bytes of NDJSON, more than "
                    f"max_body_bytes={limit}; it can never be sent")
                continue
            if cur.records and cur.nbytes + size > limit:
                parts.append(cur)
                cur = _Part()
            cur.add(rec, line)
        if cur.records:
            parts.append(cur)
        return parts

    # ------------------------------------------------------------------- send

    def _send(self, part: _Part, log_id: str, seqs: list[int], attempt: int) -> None:
        raw = b"".join(part.lines)
        body = self._compress(raw)
        key = idempotency_key(log_id, seqs)
        headers = dict(self._headers)
        headers["Idempotency-Key"] = key
        headers["Walbatch-Log-Id"] = log_id
        headers["Walbatch-First-Seq"] = str(seqs[0])
        headers["Walbatch-Last-Seq"] = str(seqs[-1])
        headers["Walbatch-Count"] = str(len(seqs))
        headers["Walbatch-Attempt"] = str(attempt)
        what = f"POST {self.display_url} (Idempotency-Key {key}, {len(seqs)} items)"
        status, reason, data, retry_after = self._post(body, headers, what)
        with self._lock:
            c = self.counters
            c["requests"] += 1
            c["bytes_raw"] += len(raw)
            c["bytes_sent"] += len(body)
            if 200 <= status < 300:
                c["ok"] += 1
                c["items_sent"] += len(seqs)
        if 200 <= status < 300:
            return
        message = f"HTTP {status} {reason} from {what}: {_snippet(data)}"
        if status in CONTENT_STATUSES and status not in self.retry_status:
            with self._lock:
                self.counters["permanent"] += 1
            raise _ContentRefused(message)
        with self._lock:
            self.counters["transient"] += 1
        raise SinkError(message, retryable=True, retry_after=parse_retry_after(retry_after))

    def _compress(self, raw: bytes) -> bytes:
        if self.compress == "gzip":
            # mtime 0 (zlib's gzip wrapper): the same batch compresses to the same bytes.
            return zlib.compress(raw, self.compress_level, wbits=31)
        if self.compress == "zstd":
            z = getattr(self._local, "zstd", None)
            if z is None:  # a ZstdCompressor must not be shared between threads
                z = self._local.zstd = self._zstd.ZstdCompressor(level=self.compress_level)
            return z.compress(raw)
        return raw

    def _post(self, body: bytes, headers: dict[str, str],
              what: str) -> tuple[int, str, bytes, str | None]:
        for tries in (1, 2):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                try:
                    conn.request("POST", self.path, body=body, headers=headers)
                except (ConnectionResetError, BrokenPipeError):
                    # Many servers answer early (413 for a body over their limit, 401)
                    # and close without reading the rest: that answer may be waiting.
                    if not self._early_answer(conn):
                        raise
                resp = conn.getresponse()
                data = _drain(resp)
                if not resp.isclosed():
                    conn.close()  # an endless reply: a fresh connection is cheaper
                return resp.status, resp.reason, data, resp.getheader("Retry-After")
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionAbortedError) as ex:
                conn.close()
                if reused and tries == 1:
                    # A keep-alive connection the server had already closed (idle
                    # timeout). Once more on a fresh one; the key makes it safe even if
                    # the server did see the first request.
                    with self._lock:
                        self.counters["stale_reconnects"] += 1
                    continue
                raise self._transient(what, ex) from ex
            except Exception as ex:  # noqa: BLE001 - OSError, HTTPException, or close() racing us
                # Whatever broke, the connection's state is unknown: drop it. The key
                # makes a resend safe, so every failure to get an answer is transient.
                conn.close()
                raise self._transient(what, ex) from ex
        raise AssertionError("unreachable")

    @staticmethod
    def _early_answer(conn: http.client.HTTPConnection) -> bool:
        """Did the server send a response before cutting our request off? (Then read it.)"""
        sock = conn.sock
        if sock is None:
            return False
        try:
            sock.settimeout(0.5)
            return bool(sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False

    def _transient(self, what: str, ex: BaseException) -> SinkError:
        with self._lock:
            self.counters["transient"] += 1
        kind = "timed out" if isinstance(ex, TimeoutError) else "failed"
        return SinkError(f"{what} {kind}: {type(ex).__name__}: {ex}", retryable=True)

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.generation != self._generation:
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                   context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            with self._lock:
                self._conns.add(conn)
                self._local.generation = self._generation
            self._local.conn = conn
        return conn

    # ------------------------------------------------------------- lifecycle

    def stats(self) -> dict[str, int]:
        """Counters since open: requests, ok, transient, permanent, bytes_raw, bytes_sent, ..."""
        with self._lock:
            return dict(self.counters)

    def close(self) -> None:
        """Close every thread's connection; a later write opens new ones."""
        with self._lock:
            conns, self._conns = self._conns, set()
            self._generation += 1
        for conn in conns:
            conn.close()

    def __repr__(self) -> str:
        return (f"HTTPSink({self.display_url!r}, compress={self.compress!r}, "
                f"envelope={self.envelope}, max_body_bytes={self.max_body_bytes}, "
                f"headers={self._header_names})")


def _drain(resp: http.client.HTTPResponse) -> bytes:
    """Read the reply so the connection can be reused; keep its head for messages."""
    head = resp.read(_SNIPPET_BYTES)
    total = len(head)
    while not resp.isclosed() and total < _MAX_DRAIN:
        chunk = resp.read(_SNIPPET_BYTES)
        if not chunk:
            break
        total += len(chunk)
    return head


def _snippet(data: bytes) -> str:
    text = " ".join(data.decode("utf-8", "replace").split())
    if not text:
        return "(empty body)"
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "..."


def _safe(url: str) -> str:
    """The URL without user:password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl()


def _check_header(name: str, value: Any, what: str | None = None) -> None:
    label = what or f"header {name!r}"
    if not isinstance(name, str) or not _TOKEN.match(name):
        raise ValueError(f"HTTP sink: {name!r} is not a valid header name")
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise ValueError(f"HTTP sink: {label} must be a string without CR, LF or NUL")
    if what is None and (name.lower() in _RESERVED or name.lower().startswith("walbatch-")):
        hint = "; use content_type=" if name.lower() == "content-type" else ""
        raise ValueError(f"HTTP sink: header {name!r} is set by the sink itself{hint}")
    if what is not None and not value.strip():
        raise ValueError(f"HTTP sink: {label} is empty")


def _split_header(option: str, spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"HTTP sink: {option}={spec!r} must look like {option}=NAME:VALUE")
    return name.strip(), value.strip()


def _read_headers_file(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as ex:
        raise ValueError(f"HTTP sink: headers_file {path!r}: {ex.strerror or ex}") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"HTTP sink: headers_file {path!r} line {n}: expected 'Name: value'")
        out[name.strip()] = value.strip()
    return out


def from_url(url: str) -> HTTPSink:
    """Build an HTTPSink from a sink URL; options are query parameters.

    ``?query.NAME=VALUE`` passes ``NAME=VALUE`` through to the endpoint's own
    query string; every other parameter must be one of the options below, so a
    typo is an error instead of something silently sent to the server.
    """
    parts = urlsplit(url)
    options = URLOptions(url, "HTTP", _URL_OPTIONS, repeatable=_REPEATABLE,
                         passthrough=lambda name: name.startswith("query."),
                         hint=lambda name: (f". To send a query parameter to the server, write "
                                            f"query.{name}=..."))
    passthrough: list[tuple[str, str]] = []
    for pair in options.others:
        name, _, value = pair.partition("=")
        name, value = unquote_plus(name)[6:], unquote_plus(value)
        if not name:
            raise options.error("query.NAME=VALUE needs a NAME")
        passthrough.append((name, value))
    headers: dict[str, str] = {}
    if "headers_file" in options:
        headers.update(_read_headers_file(options.text("headers_file") or ""))
    for spec in options.values("header"):
        name, value = _split_header("header", spec)
        headers[name] = value
    for spec in options.values("header_env"):
        name, var = _split_header("header_env", spec)
        if var not in os.environ:
            raise ValueError(f"HTTP sink: header_env={name}:{var}: environment variable {var} "
                             "is not set")
        headers[name] = os.environ[var]
    kwargs: dict[str, Any] = {"headers": headers}
    if "compress" in options:
        kwargs["compress"] = (options.text("compress") or "").lower()
    if "compress_level" in options:
        kwargs["compress_level"] = options.integer("compress_level", 0)
    kwargs["envelope"] = options.flag("envelope", True)
    if "max_body_bytes" in options:
        kwargs["max_body_bytes"] = options.integer("max_body_bytes", 0)
    if "timeout" in options:
        kwargs["timeout"] = options.number("timeout", 0.0)
    if "content_type" in options:
        kwargs["content_type"] = options.text("content_type")
    if "retry_status" in options:
        codes = []
        for code in (options.text("retry_status") or "").split(","):
            if not code.strip().isdigit():
                raise options.error(f"retry_status: {code.strip()!r} is not an HTTP status code")
            codes.append(int(code))
        kwargs["retry_status"] = codes
    if "ca_file" in options:
        kwargs["ca_file"] = options.text("ca_file")
    endpoint = parts._replace(query=urlencode(passthrough), fragment=parts.fragment).geturl()
    return HTTPSink(endpoint, **kwargs)
