"""NATS JetStream sink: one JetStream message per record, deduplicated by the record's identity.

URL (docs/sinks/nats.md has every option)::

    nats://[user:password@|token@]host[:port][,host[:port]...]?stream=EVENTS&subject=events.in
    tls://...                      # the same over TLS

Every message carries the header ``Nats-Msg-Id: <log_id>:<seq>``. JetStream drops a
message whose id it has seen within the stream's ``duplicate_window``, which turns
walbatch's at-least-once redelivery (a retried batch, a replay after a crash) into
effectively-once in the stream, as long as the redelivery comes within the window.

The sink speaks the publisher's subset of the NATS client protocol itself (``_Conn``:
CONNECT, SUB, HPUB, PING/PONG, MSG/HMSG) rather than through nats-py, whose per-message
reply handling was the bottleneck; see ``_Conn`` and benchmarks/bench_nats.py. So it
needs no third-party package.

Ownership: the sink owns one asyncio event loop, run by a private daemon thread. The
connection, the per-batch ack tables and the API requests live on that loop and are
touched only there. ``write`` may be called from several threads at once
(``flush_concurrency > 1``): it encodes the items and builds the whole batch's protocol
bytes in the calling thread, then hands them to the loop with
``run_coroutine_threadsafe`` and waits for the acks.

Invariant: a record counts as delivered only after JetStream answered its publish with a
PubAck (a stored or a duplicate message). No ack, for whatever reason, means "retry".
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import itertools
import json
import json.encoder
import logging
import random
import re
import ssl
import string
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import msgpack

from ..errors import PermanentSinkError, SinkError
from ..record import Batch
from .base import Outcomes

log = logging.getLogger("walbatch")

DEFAULT_PORT = 4222
_MAX_CONTROL_LINE = 1 << 16  # the server's default is 4 KiB; an INFO can grow with a cluster
_NAME_RE = re.compile(r"^[^\s.*>/\\]+$")
_TOKEN_RE = re.compile(r"^[^\s.*>]+$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENCODINGS = ("json", "msgpack", "raw")


# ------------------------------------------------------------------ options


@dataclass(frozen=True)
class NATSOptions:
    """Everything a ``nats://`` URL says; the defaults are the documented ones."""

    servers: list[str]
    stream: str
    subject: str
    encoding: str = "json"
    timeout: float = 5.0            # seconds to wait for a batch's acks after its last publish
    connect_timeout: float = 5.0    # seconds for one (re)connect attempt, all servers included
    horizon: float = 600.0          # the longest redelivery delay the stream must recognise
    create: bool = False
    dup_window: float | None = None  # for ?create=1; None: the horizon
    replicas: int = 1
    storage: str = "file"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    name: str = "walbatch"

    @property
    def tls(self) -> bool:
        return any(s.startswith("tls://") for s in self.servers) or bool(
            self.tls_ca or self.tls_cert)


_QUERY_KEYS = {"stream", "subject", "encoding", "timeout", "connect_timeout", "horizon", "create",
               "dup_window", "replicas", "storage", "user", "password", "token", "tls_ca",
               "tls_cert", "tls_key", "name"}


def parse_duration(text: str, what: str) -> float:
    """``"10m"``, ``"30s"``, ``"500ms"``, ``"2h"``, ``"1d"`` or plain seconds -> seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"nats sink URL: {what}={text!r} is not a duration "
                         "(e.g. 500ms, 30s, 10m, 2h, 1d, or seconds)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _parse_bool(text: str, what: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"nats sink URL: {what}={text!r} is not a boolean (1/0, true/false)")


def _split_hosts(url: str, scheme: str, hosts: str) -> list[str]:
    servers = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"nats sink URL {url!r}: empty host in the server list")
        if part.startswith("["):  # [IPv6]:port
            host, sep, rest = part[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"nats sink URL {url!r}: bad IPv6 host {part!r}")
            host, port_text = f"[{host}]", rest[1:]
        else:
            host, _, port_text = part.partition(":")
        if not host:
            raise ValueError(f"nats sink URL {url!r}: no host in {part!r}")
        port = DEFAULT_PORT
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"nats sink URL {url!r}: bad port {port_text!r} in {part!r}")
            port = int(port_text)
        servers.append(f"{scheme}://{host}:{port}")
    return servers


def parse_url(url: str) -> NATSOptions:
    """A ``nats://`` (or ``tls://``) sink URL -> options; ValueError naming what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in ("nats", "tls"):
        raise ValueError(f"nats sink URL {url!r}: scheme must be nats:// or tls://")
    if parts.path not in ("", "/"):
        raise ValueError(f"nats sink URL {url!r}: unexpected path {parts.path!r}; stream and "
                         "subject go in the query (?stream=NAME&subject=SUBJECT)")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ValueError(f"nats sink URL {url!r}: no server (nats://host:port[,host:port...])")
    servers = _split_hosts(url, scheme, hosts)
    try:
        raw = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as ex:
        raise ValueError(f"nats sink URL {url!r}: malformed query: {ex}") from None
    unknown = sorted(set(raw) - _QUERY_KEYS)
    if unknown:
        raise ValueError(f"nats sink URL {url!r}: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_QUERY_KEYS))}")
    q = {k: v[-1] for k, v in raw.items()}

    user = password = token = None
    if at:
        name, colon, secret = userinfo.partition(":")
        if colon:
            user, password = unquote(name), unquote(secret)
        else:
            token = unquote(name)  # nats://TOKEN@host, the NATS convention
    user = q.get("user", user)
    password = q.get("password", password)
    token = q.get("token", token)
    if (user is None) != (password is None):
        raise ValueError(f"nats sink URL {url!r}: user and password go together")
    if token is not None and user is not None:
        raise ValueError(f"nats sink URL {url!r}: give a token or a user and password, not both")

    stream = q.get("stream", "")
    if not stream:
        raise ValueError(f"nats sink URL {url!r}: missing ?stream=NAME")
    if not _NAME_RE.match(stream):
        raise ValueError(f"nats sink URL {url!r}: stream name {stream!r} may not contain "
                         "whitespace, '.', '*', '>', '/' or '\\'")
    subject = q.get("subject", "")
    if not subject:
        raise ValueError(f"nats sink URL {url!r}: missing ?subject=SUBJECT (a literal subject, "
                         "or a template such as events.{type})")
    SubjectTemplate(subject)  # validates; raises ValueError

    encoding = q.get("encoding", "json").lower()
    if encoding not in _ENCODINGS:
        raise ValueError(f"nats sink URL {url!r}: encoding={encoding!r}; expected one of "
                         + ", ".join(_ENCODINGS))
    storage = q.get("storage", "file").lower()
    if storage not in ("file", "memory"):
        raise ValueError(f"nats sink URL {url!r}: storage={storage!r}; expected file or memory")
    try:
        replicas = int(q.get("replicas", "1"))
    except ValueError:
        raise ValueError(f"nats sink URL {url!r}: replicas={q['replicas']!r} is not a number") from None
    if not 1 <= replicas <= 5:
        raise ValueError(f"nats sink URL {url!r}: replicas={replicas}; JetStream allows 1 to 5")

    def duration(key: str, default: float) -> float:
        if key not in q:
            return default
        value = parse_duration(q[key], key)
        if value <= 0:
            raise ValueError(f"nats sink URL {url!r}: {key} must be positive")
        return value

    horizon = duration("horizon", 600.0)
    dup_window = duration("dup_window", horizon) if "dup_window" in q else None
    if (q.get("tls_cert") is None) != (q.get("tls_key") is None):
        raise ValueError(f"nats sink URL {url!r}: tls_cert and tls_key go together")
    return NATSOptions(
        servers=servers, stream=stream, subject=subject, encoding=encoding,
        timeout=duration("timeout", 5.0), connect_timeout=duration("connect_timeout", 5.0),
        horizon=horizon,
        create=_parse_bool(q.get("create", "0"), "create"), dup_window=dup_window,
        replicas=replicas, storage=storage, user=user, password=password, token=token,
        tls_ca=q.get("tls_ca"), tls_cert=q.get("tls_cert"),
        tls_key=q.get("tls_key"), name=q.get("name", "walbatch"))


# ------------------------------------------------------------- subjects


class SubjectTemplate:
    """``events.in`` (literal) or ``events.{type}``: a field of a dict item fills a token.

    A field must be a whole token (``events.{type}``, not ``events.x{type}``), so the
    stream's subject filter for a template is simply the template with ``*`` per field.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        tokens = template.split(".")
        self.fields: list[tuple[int, str]] = []  # (token index, item field)
        for i, tok in enumerate(tokens):
            try:
                parsed = list(string.Formatter().parse(tok))
            except ValueError as ex:
                raise ValueError(f"nats sink subject {template!r}: {ex}") from None
            has_field = any(f is not None for _, f, _, _ in parsed)
            if not has_field:
                if not tok or not _TOKEN_RE.match(tok):
                    raise ValueError(f"nats sink subject {template!r}: token {tok!r} is empty or "
                                     "holds whitespace or a wildcard ('*', '>'); publish subjects "
                                     "are literal")
                continue
            if len(parsed) != 1 or parsed[0][0] or parsed[0][2] or parsed[0][3]:
                raise ValueError(f"nats sink subject {template!r}: a template field must be a "
                                 f"whole token like {{type}}; got {tok!r}")
            name = parsed[0][1]
            if not name or not name.isidentifier():
                raise ValueError(f"nats sink subject {template!r}: field {name!r} must be a "
                                 "plain item key (letters, digits, _)")
            self.fields.append((i, name))
        self.tokens = tokens
        self.literal = template if not self.fields else None
        self.filter = ".".join(
            "*" if any(i == j for j, _ in self.fields) else t for i, t in enumerate(tokens))

    def render(self, item: Any) -> str:
        """The subject for one item; ValueError (permanent for that item) if it cannot be made."""
        if self.literal is not None:
            return self.literal
        if not isinstance(item, dict):
            raise ValueError(f"subject template {self.template!r} needs a dict item, "
                             f"got {type(item).__name__}")
        tokens = list(self.tokens)
        for i, name in self.fields:
            if name not in item:
                raise ValueError(f"subject template {self.template!r}: item has no field {name!r}")
            value = item[name]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ValueError(f"subject template {self.template!r}: field {name!r} is "
                                 f"{type(value).__name__}; expected str or int")
            text = str(value)
            if not _TOKEN_RE.match(text):
                raise ValueError(f"subject template {self.template!r}: field {name!r}={text!r} "
                                 "is empty or holds '.', whitespace or a wildcard")
            tokens[i] = text
        return ".".join(tokens)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


# ------------------------------------------------------------- encoding


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_encoder() -> Callable[[Any], bytes]:
    """Strict, compact JSON to UTF-8 bytes; NaN and Infinity refused (other parsers reject them).

    JSONEncoder.encode builds a new C encoder on every call; building it once saves about
    40% per item, which shows at 100k items/s. Items come from msgpack, so they cannot be
    circular and the cycle check (markers=None) is not needed: a self-referencing value
    handed to write() directly ends in RecursionError, refused like any unencodable item.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        slow = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                                default=_json_default)
        return lambda item: slow.encode(item).encode("utf-8")
    chunks = make(None, _json_default, json.encoder.encode_basestring, None, ":", ",",
                  False, False, False)
    return lambda item: "".join(chunks(item, 0)).encode("utf-8")


encode_json = _json_encoder()


def encode_msgpack(item: Any) -> bytes:
    return msgpack.packb(item, use_bin_type=True)


def encode_raw(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    raise TypeError(f"encoding=raw takes bytes or str items, got {type(item).__name__}")


ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "json": encode_json, "msgpack": encode_msgpack, "raw": encode_raw}


# ------------------------------------------------------------- protocol


class _Conn:
    """One connection speaking the publisher's subset of the NATS client protocol.

    Why not nats-py: its reader matches a regex and deletes the front of a bytearray per
    message, then builds a Msg and queues it to a task per subscription; with one PubAck
    per published message that capped the whole sink near 56k messages/s on our 2-core
    VM, below what walbatch can feed it (benchmarks/bench_nats.py measures both). This
    class writes a batch as one buffer and matches each ack with one compiled regex.

    Lives on the sink's loop. Writes CONNECT, PING, PONG, SUB, PUB and HPUB; reads MSG and
    HMSG (everything arrives on the sink's inbox), PING, PONG, +OK, -ERR and INFO.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 info: dict[str, Any], server: str, inbox: str, pending: dict[bytes, _Acks],
                 on_msg: Callable[[bytes, bytes | None, bytes], None],
                 on_lost: Callable[[_Conn, str], None]) -> None:
        self.reader = reader
        self.writer = writer
        self.info = info
        self.server = server
        self.max_payload = int(info.get("max_payload") or 1 << 20)
        self.closed = False
        self.error: str | None = None  # the server's last -ERR
        # The hot path: a PubAck is "MSG <inbox>.<batch key>.<index> <sid> <size>" (the server
        # leaves an empty reply field: two spaces before the size) and goes
        # straight into its batch's table (one C regex match instead of splitting the line,
        # a quarter of the reply-handling time). Anything else takes the general path.
        self._ack_line = re.compile(rb"MSG " + re.escape(inbox.encode()) +
                                    rb"\.(\d+)\.(\d+) \d+ +(\d+)\r\n").match
        self._pending = pending
        self._on_msg = on_msg
        self._on_lost = on_lost
        self._pongs: deque[asyncio.Future[None]] = deque()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("the connection is closed")
        self.writer.write(data)

    async def ping(self, timeout: float) -> bool:
        """True when the server answers a PING within ``timeout``: the connection is alive."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(fut)
        try:
            self.send(b"PING\r\n")
            await asyncio.wait_for(fut, timeout)
            return True
        except (TimeoutError, ConnectionError, OSError):
            return False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()  # sends what is buffered, then closes
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _read_loop(self) -> None:
        reason = "the server closed the connection"
        buf = b""
        try:
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    break
                buf = buf + data if buf else data
                buf = buf[self._parse(buf):]
        except asyncio.CancelledError:
            reason = "closed"
        except (OSError, ValueError) as ex:  # ValueError: a malformed protocol line
            reason = f"{type(ex).__name__}: {ex}"
        finally:
            if self.error and reason != "closed":
                reason = f"{reason} (the server said: {self.error})"
            self.closed = True
            self.writer.close()
            for fut in self._pongs:
                if not fut.done():
                    fut.cancel()
            self._on_lost(self, reason)

    def _parse(self, buf: bytes) -> int:
        """Handle every complete protocol message in ``buf``; return the bytes consumed."""
        pos, end, on_msg = 0, len(buf), self._on_msg
        ack_line, pending = self._ack_line, self._pending
        while pos < end:
            m = ack_line(buf, pos)
            if m is not None:
                start = m.end()
                stop = start + int(m[3])
                if stop + 2 > end:
                    return pos
                acks = pending.get(m[1])
                if acks is not None:  # else a late ack of a batch that gave up; its retry is deduplicated
                    acks.add(int(m[2]), buf, start, stop)
                pos = stop + 2
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > _MAX_CONTROL_LINE:
                    raise ValueError(f"protocol line longer than {_MAX_CONTROL_LINE} bytes")
                return pos
            op = buf[pos:pos + 4]
            if op == b"MSG ":  # MSG <subject> <sid> [reply] <size>
                args = buf[pos + 4:eol].split()
                start = eol + 2
                stop = start + int(args[-1])
                if stop + 2 > end:
                    return pos
                on_msg(args[0], None, buf[start:stop])
                pos = stop + 2
            elif op == b"HMSG":  # HMSG <subject> <sid> [reply] <header size> <total size>
                args = buf[pos + 5:eol].split()
                start = eol + 2
                split, stop = start + int(args[-2]), start + int(args[-1])
                if stop + 2 > end:
                    return pos
                on_msg(args[0], buf[start:split], buf[split:stop])
                pos = stop + 2
            else:
                if op == b"PING":
                    self.writer.write(b"PONG\r\n")
                elif op == b"PONG":
                    while self._pongs:
                        fut = self._pongs.popleft()
                        if not fut.done():
                            fut.set_result(None)
                            break
                elif op == b"-ERR":
                    self.error = buf[pos + 4:eol].strip(b" '").decode("utf-8", "replace")
                    log.warning("walbatch: NATS server %s: %s", self.server, self.error)
                # +OK, INFO (cluster changes, lame duck mode): nothing to do for a publisher.
                pos = eol + 2
        return pos


async def _open(server: str, o: NATSOptions, tls: ssl.SSLContext | None, inbox: str,
                timeout: float, pending: dict[bytes, _Acks],
                on_msg: Callable[[bytes, bytes | None, bytes], None],
                on_lost: Callable[[_Conn, str], None]) -> _Conn:
    """Connect, upgrade to TLS if asked, authenticate, subscribe to the inbox."""
    scheme, _, hostport = server.partition("://")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port), limit=1 << 20), timeout)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line.startswith(b"INFO "):
            raise ConnectionError(f"not a NATS server (it said {line[:60]!r})")
        info = json.loads(line[5:])
        if tls is None and info.get("tls_required"):
            tls = ssl.create_default_context()  # as other NATS clients do for nats://
        if tls is not None:
            await asyncio.wait_for(writer.start_tls(tls, server_hostname=host), timeout)
        if not info.get("headers"):
            raise ConnectionError("the server does not support message headers (NATS 2.2+ needed)")
        connect: dict[str, Any] = {
            "verbose": False, "pedantic": False, "tls_required": tls is not None,
            "name": o.name, "lang": "python-walbatch", "version": "1", "protocol": 1,
            "headers": True, "no_responders": True}
        if o.user is not None:
            connect.update(user=o.user, **{"pass": o.password})
        if o.token is not None:
            connect["auth_token"] = o.token
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        await asyncio.wait_for(writer.drain(), timeout)
        while True:  # the answer is PONG, or -ERR (bad credentials...) and a close
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise ConnectionError("the server closed the connection after CONNECT")
            if line.startswith(b"PONG"):
                break
            if line.startswith(b"-ERR"):
                raise ConnectionError("the server refused the connection: "
                                      + line[4:].strip(b" '\r\n").decode("utf-8", "replace"))
            if line.startswith(b"PING"):
                writer.write(b"PONG\r\n")
        writer.write(f"SUB {inbox}.> 1\r\n".encode())
    except BaseException:
        writer.close()
        raise
    return _Conn(reader, writer, info, server, inbox, pending, on_msg, on_lost)


# ------------------------------------------------------------------ acks


_OK = object()  # a PubAck without an error: stored, or a duplicate the window dropped


class _Acks:
    """The replies one batch is waiting for, indexed by the record's position in the batch."""

    __slots__ = ("replies", "left", "ok", "sending", "done", "lost")

    def __init__(self, n: int, left: int, done: asyncio.Future[None]) -> None:
        # None: no reply yet; _OK; the payload of an error reply (MSG); (header, payload) (HMSG)
        self.replies: list[Any] = [None] * n
        self.left = left       # published and not yet answered
        self.ok = 0            # _OK replies: when all are, write() need not look at each
        self.sending = True    # replies arrive while the batch is still being written
        self.done = done
        self.lost: str | None = None  # why the missing replies will never come

    def add(self, i: int, buf: bytes, start: int, stop: int) -> None:
        """A MSG reply, ``buf[start:stop]``, for message ``i``."""
        if i < len(self.replies) and self.replies[i] is None:
            # A PubAck is {"stream":...,"seq":...[,"duplicate":true]} and stream names
            # cannot hold quotes, so looking for "error" is exact; it spares a JSON parse
            # (and a copy) per message.
            if buf.find(b'"error"', start, stop) < 0 and stop > start:
                self.replies[i] = _OK
                self.ok += 1
            else:
                self.replies[i] = buf[start:stop]
            self._answered()

    def add_with_header(self, i: int, header: bytes, payload: bytes) -> None:
        if i < len(self.replies) and self.replies[i] is None:
            self.replies[i] = (header, payload)
            self._answered()

    def _answered(self) -> None:
        self.left -= 1
        if self.left <= 0 and not self.sending and not self.done.done():
            self.done.set_result(None)

    def sent_all(self) -> None:
        self.sending = False
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)

    def give_up(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        if not self.done.done():
            self.done.set_result(None)


def _status(header: bytes | None) -> str:
    """``NATS/1.0 503\\r\\n...`` -> ``503``; '' when there is no status."""
    if not header:
        return ""
    first = header.split(b"\r\n", 1)[0].split()
    return first[1].decode("ascii", "replace") if len(first) > 1 else ""


def _ack_outcome(reply: Any, stream: str) -> BaseException | None:
    """None for a PubAck (stored, or a duplicate the window dropped); else the error."""
    if reply is _OK:
        return None
    if type(reply) is bytes:
        header, data = None, reply
    else:
        header, data = reply
    if not data:
        if _status(header) == "503":
            return SinkError(f"no responders: stream {stream!r} has no leader right now (a "
                             "cluster electing one), or JetStream is not available")
        return SinkError(f"empty reply from JetStream (status {_status(header) or 'none'})")
    try:
        err = json.loads(data)["error"]
        code, err_code, desc = err.get("code"), err.get("err_code"), err.get("description")
    except (ValueError, TypeError, KeyError, AttributeError):
        return SinkError(f"unreadable reply from JetStream: {data[:200]!r}")
    text = f"JetStream refused the message: {desc} (code {code}, err_code {err_code})"
    # 400 is about the message itself (too large for the stream, a sealed stream, a
    # header conflict): sending it again gets the same answer. 503 and the rest (no
    # quorum, store failure, limits with discard=new) can pass.
    if code == 400:
        return PermanentSinkError(text)
    return SinkError(text)


# ------------------------------------------------------------------ sink


class NATSSink:
    """Publishes each record to a JetStream stream with ``Nats-Msg-Id: <log_id>:<seq>``."""

    def __init__(self, options: NATSOptions) -> None:
        self.options = options
        self._template = SubjectTemplate(options.subject)
        self._encode = ENCODERS[options.encoding]
        self._tls = self._ssl_context() if options.tls else None
        # Fixed for the sink's life, so write() can build reply subjects in its own thread
        # whatever connection the batch then goes out on.
        self._inbox = f"_INBOX.{uuid.uuid4().hex}"
        self._inbox_len = len(self._inbox) + 1
        self._batch_keys = itertools.count()   # next() is atomic under the GIL
        # Loop-owned state (see the module docstring). write() reads _ready, _filters
        # and _max_size without a lock: a stale value costs at most one server-side refusal.
        self._conn: _Conn | None = None
        self._ready = False                 # stream looked up on the current connection
        self._lock: asyncio.Lock | None = None
        self._pending: dict[bytes, _Acks] = {}
        self._requests: dict[int, asyncio.Future[tuple[bytes | None, bytes]]] = {}
        self._request_ids = itertools.count()
        self._filters: list[str] = []
        self._max_size = -1                 # bytes incl. headers a message may have; -1: no limit
        self._bound: dict[str, bool] = {}
        self._warned_window = False
        self._down_logged = False
        # Thread-side state.
        self._closed = False
        self._close_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="walbatch-nats", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return (f"NATSSink({','.join(self.options.servers)!r}, stream={self.options.stream!r}, "
                f"subject={self.options.subject!r})")

    # ------------------------------------------------------------ thread side

    def write(self, batch: Batch) -> Outcomes:
        """Publish every record and wait for its PubAck; thread-safe.

        Returns None when all were acked; raises SinkError (retryable) when none was and
        the cause is transient; otherwise one outcome per record.
        """
        if self._closed:
            raise SinkError("the NATS sink is closed")
        if not self._ready:
            self._call(self._ensure_ready())  # the stream's limits, for the checks below
        n = len(batch)
        outcomes: list[BaseException | None] = [None] * n
        parts: list[bytes] = []
        sent: list[int] = []
        reply = f"{self._inbox}.{next(self._batch_keys)}.".encode()
        id_prefix = (batch.log_id + ":").encode()
        encode, template, is_bound, max_size = (
            self._encode, self._template, self._is_bound, self._max_size)
        literal = template.literal.encode() if template.literal is not None else None
        # Only subjects the stream covers are published: another subject would be stored
        # by another stream (or get "no responders", retried forever).
        literal_bound = literal is None or is_bound(template.literal or "")
        for i, rec in enumerate(batch):
            try:
                payload = encode(rec.item)
            except (TypeError, ValueError, OverflowError, RecursionError) as ex:
                outcomes[i] = PermanentSinkError(
                    f"seq {rec.seq}: cannot encode as {self.options.encoding}: {ex}")
                continue
            if literal is not None:
                subject, subject_str, bound = literal, template.literal, literal_bound
            else:
                try:
                    subject_str = template.render(rec.item)
                except ValueError as ex:
                    outcomes[i] = PermanentSinkError(f"seq {rec.seq}: no subject: {ex}")
                    continue
                subject, bound = subject_str.encode(), is_bound(subject_str)
            if not bound:
                outcomes[i] = PermanentSinkError(
                    f"seq {rec.seq}: subject {subject_str!r} is not bound to stream "
                    f"{self.options.stream!r} (its subjects: {', '.join(self._filters) or 'none'})")
                continue
            header = b"NATS/1.0\r\nNats-Msg-Id: %s%d\r\n\r\n" % (id_prefix, rec.seq)
            size = len(header) + len(payload)
            if 0 <= max_size < size:
                outcomes[i] = PermanentSinkError(
                    f"seq {rec.seq}: message of {size} bytes (with headers) exceeds the limit of "
                    f"{max_size} bytes (stream {self.options.stream!r} max_msg_size / server "
                    "max_payload)")
                continue
            parts.append(b"HPUB %s %s%d %d %d\r\n" % (subject, reply, i, len(header), size))
            parts.append(header)
            parts.append(payload)
            parts.append(b"\r\n")
            sent.append(i)
        if sent:
            acks = self._call(self._send(reply.split(b".")[-2], b"".join(parts), n, len(sent)))
            if acks.ok == len(sent) and len(sent) == n:
                return None  # the common case: every message stored (or a known duplicate)
            stream = self.options.stream
            lost: BaseException | None = None
            for i in sent:
                r = acks.replies[i]
                if r is None:
                    if lost is None:
                        lost = SinkError(f"not acknowledged: {acks.lost or 'no reply'}")
                    outcomes[i] = lost
                else:
                    outcomes[i] = _ack_outcome(r, stream)
        failed = [o for o in outcomes if o is not None]
        if not failed:
            return None
        if len(failed) == n and all(isinstance(o, SinkError) and o.retryable for o in failed):
            first = failed[0]
            raise SinkError(f"{n} of {n} messages not acknowledged by JetStream: {first}") from first
        return outcomes

    def close(self, timeout: float = 10.0) -> None:
        """Close the connection and stop the loop thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
        except Exception as ex:
            log.warning("walbatch: closing the NATS connection failed: %s", ex)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def _call(self, coro: Any) -> Any:
        """Run a coroutine on the sink's loop and wait for it, with a bound against bugs."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        bound = self.options.connect_timeout + 3 * self.options.timeout + 30.0
        try:
            return fut.result(bound)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise SinkError(f"the NATS sink did not finish in {bound:.0f}s") from None

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            tasks = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    def _ssl_context(self) -> ssl.SSLContext:
        o = self.options
        ctx = ssl.create_default_context(cafile=o.tls_ca)
        if o.tls_cert:
            ctx.load_cert_chain(o.tls_cert, o.tls_key)
        return ctx

    def _is_bound(self, subject: str) -> bool:
        known = self._bound.get(subject)
        if known is None:
            known = any(subject_matches(f, subject) for f in self._filters)
            if len(self._bound) > 10_000:  # a template over an unbounded field
                self._bound.clear()
            self._bound[subject] = known
        return known

    # -------------------------------------------------------------- loop side

    async def _send(self, key: bytes, data: bytes, n: int, count: int) -> _Acks:
        """Write one batch's HPUBs at once, then wait for all the PubAcks (or give up)."""
        await self._ensure_ready()
        conn = self._conn
        assert conn is not None
        acks = _Acks(n, count, asyncio.get_running_loop().create_future())
        self._pending[key] = acks
        try:
            try:
                conn.send(data)
                await conn.writer.drain()  # back-pressure: a slow server slows us down
            except (ConnectionError, OSError, RuntimeError) as ex:
                acks.give_up(f"the connection failed while publishing: {ex}")
            acks.sent_all()
            if not acks.done.done():
                try:
                    await asyncio.wait_for(asyncio.shield(acks.done), self.options.timeout)
                except TimeoutError:
                    acks.give_up(f"no ack within {self.options.timeout:g}s")
                    # A server that vanished without closing the socket (a host gone, a
                    # partition) answers no PING either: drop it so the retry reconnects.
                    if not conn.closed and not await conn.ping(min(2.0, self.options.timeout)):
                        self._lost(conn, "no PONG after an ack timeout")
                        await conn.close()
        finally:
            del self._pending[key]
        return acks

    async def _ensure_ready(self) -> None:
        if self._ready and self._conn is not None and not self._conn.closed:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._ready = False
                self._conn = await self._connect()
            if not self._ready:
                await self._load_stream(self._conn)
                self._ready = True

    async def _connect(self) -> _Conn:
        """One pass over the servers (in random order, to spread many hosts over a cluster)."""
        o = self.options
        servers = random.sample(o.servers, len(o.servers))
        deadline = asyncio.get_running_loop().time() + o.connect_timeout
        errors = []
        for server in servers:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                errors.append(f"{server}: no time left (connect_timeout={o.connect_timeout:g}s)")
                continue
            try:
                conn = await _open(server, o, self._tls, self._inbox, min(left, 2.0),
                                   self._pending, self._on_msg, self._lost)
            except (OSError, ConnectionError, TimeoutError, ValueError, ssl.SSLError) as ex:
                errors.append(f"{server}: {type(ex).__name__}: {ex}")
                continue
            if self._down_logged:
                log.warning("walbatch: connected to NATS at %s again", server)
            self._down_logged = False
            return conn
        raise SinkError("cannot connect to NATS: " + "; ".join(errors))

    async def _request(self, conn: _Conn, subject: str, payload: bytes) -> tuple[bytes | None, bytes]:
        """A JetStream API request on our inbox; the reply as (header, payload)."""
        n = next(self._request_ids)
        fut: asyncio.Future[tuple[bytes | None, bytes]] = asyncio.get_running_loop().create_future()
        self._requests[n] = fut
        try:
            conn.send(b"PUB %s %s.r.%d %d\r\n%s\r\n" % (
                subject.encode(), self._inbox.encode(), n, len(payload), payload))
            return await asyncio.wait_for(fut, self.options.timeout)
        except TimeoutError:
            raise SinkError(f"no answer from JetStream to {subject} within "
                            f"{self.options.timeout:g}s") from None
        except ConnectionError as ex:
            raise SinkError(f"{subject}: {ex}") from None
        finally:
            self._requests.pop(n, None)

    async def _api(self, conn: _Conn, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        header, data = await self._request(conn, subject, json.dumps(body).encode() if body else b"")
        if not data and _status(header) == "503":
            raise SinkError(f"JetStream is not available at {conn.server} (no responders to "
                            f"{subject}): is the server running with JetStream (-js)?")
        try:
            resp = json.loads(data)
        except ValueError:
            raise SinkError(f"unreadable JetStream reply to {subject}: {data[:200]!r}") from None
        return resp

    async def _load_stream(self, conn: _Conn) -> None:
        o = self.options
        resp = await self._api(conn, f"$JS.API.STREAM.INFO.{o.stream}")
        err = resp.get("error")
        if err and err.get("code") == 404:
            if not o.create:
                raise SinkError(
                    f"JetStream stream {o.stream!r} does not exist; create it (subjects "
                    f"{self._template.filter!r}, see docs/sinks/nats.md) or add ?create=1 to "
                    "the sink URL")
            resp = await self._create_stream(conn)
            err = resp.get("error")
        if err:
            raise SinkError(f"cannot look up JetStream stream {o.stream!r}: "
                            f"{err.get('description')} (code {err.get('code')})")
        cfg = resp.get("config") or {}
        self._filters = list(cfg.get("subjects") or [])
        self._bound.clear()
        limits = [s for s in (conn.max_payload, cfg.get("max_msg_size", -1)) if s is not None and s >= 0]
        self._max_size = min(limits) if limits else -1
        if self._template.literal is not None and not self._is_bound(self._template.literal):
            log.error("walbatch: subject %r is not bound to JetStream stream %r (subjects: %s); "
                      "every item will be dead-lettered", self._template.literal, o.stream,
                      ", ".join(self._filters) or "none")
        self._check_window((cfg.get("duplicate_window") or 0) / 1e9)

    async def _create_stream(self, conn: _Conn) -> dict[str, Any]:
        o = self.options
        window = o.dup_window if o.dup_window is not None else o.horizon
        config = {"name": o.stream, "subjects": [self._template.filter], "retention": "limits",
                  "storage": o.storage, "num_replicas": o.replicas, "discard": "old",
                  "max_msgs": -1, "max_bytes": -1, "max_age": 0, "max_msg_size": -1,
                  "max_consumers": -1, "duplicate_window": int(window * 1e9)}
        resp = await self._api(conn, f"$JS.API.STREAM.CREATE.{o.stream}", config)
        err = resp.get("error")
        if err:
            # Another walbatch host may have created it first: use what is there (the
            # window check still applies). Anything else is worth a retry and a log line.
            info = await self._api(conn, f"$JS.API.STREAM.INFO.{o.stream}")
            if not info.get("error"):
                return info
            raise SinkError(f"cannot create JetStream stream {o.stream!r}: "
                            f"{err.get('description')} (code {err.get('code')})")
        log.info("walbatch: created JetStream stream %r (subjects %r, %s, R%d, duplicate window %s)",
                 o.stream, self._template.filter, o.storage, o.replicas, _fmt_duration(window))
        return resp

    def _check_window(self, window: float) -> None:
        horizon = self.options.horizon
        if window >= horizon or self._warned_window:
            return
        self._warned_window = True
        log.warning(
            "walbatch: JetStream stream %r remembers message ids for %s (duplicate_window), less "
            "than the sink's redelivery horizon of %s: a record redelivered later than that "
            "after its first publish (e.g. replayed when walbatch restarts after a longer "
            "outage) is stored twice. Raise the window (nats stream edit %s --dupe-window=%s) "
            "or set ?horizon= to the longest outage you accept duplicates after.",
            self.options.stream, _fmt_duration(window), _fmt_duration(horizon),
            self.options.stream, _fmt_duration(horizon))

    def _on_msg(self, subject: bytes, header: bytes | None, payload: bytes) -> None:
        """Replies off the hot path: API answers, and acks with a header (no responders)."""
        # <inbox>.<batch key>.<index in batch>, or <inbox>.r.<request id>
        key, _, index = subject[self._inbox_len:].partition(b".")
        try:
            if key == b"r":
                fut = self._requests.get(int(index))
                if fut is not None and not fut.done():
                    fut.set_result((header, payload))
                return
            acks = self._pending.get(key)
            if acks is not None:
                if header is None:
                    acks.add(int(index), payload, 0, len(payload))
                else:
                    acks.add_with_header(int(index), header, payload)
        except ValueError:
            pass  # not a reply we asked for

    def _lost(self, conn: _Conn, reason: str) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._ready = False
        if not self._closed and not self._down_logged:
            self._down_logged = True
            log.warning("walbatch: lost the connection to NATS at %s: %s; the next write "
                        "reconnects", conn.server, reason)
        # Replies to what is in flight will never come on this connection: fail those
        # batches now instead of waiting out the timeout. JetStream may have stored some;
        # the retry carries the same ids and the duplicate window drops them.
        for acks in list(self._pending.values()):
            acks.give_up(f"connection to NATS lost ({reason})")
        for fut in list(self._requests.values()):
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection to NATS lost ({reason})"))

    async def _shutdown(self) -> None:
        for acks in list(self._pending.values()):
            acks.give_up("the NATS sink is closing")
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def _fmt_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def from_url(url: str) -> NATSSink:
    """Build a NATSSink from ``nats://host:port[,host:port...]?stream=S&subject=T[&...]``."""
    return NATSSink(parse_url(url))
