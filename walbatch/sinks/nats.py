"""NATS JetStream sink: one JetStream message per record, deduplicated by the record's identity.

URL (docs/sinks/nats.md has every option)::

    nats://[user:password@|token@]host[:port][,host[:port]...]?stream=EVENTS&subject=events.in
    tls://...                      # the same over TLS

Every message carries the header ``Nats-Msg-Id: <log_id>:<seq>``. JetStream drops a
message whose id it has seen within the stream's ``duplicate_window``, which turns
walbatch's at-least-once redelivery (a retried batch, a replay after a crash) into
effectively-once in the stream, as long as the redelivery comes within the window.

The transport is nats-py (``pip install 'walbatch[nats]'``), imported when a sink is
built: ``import walbatch`` does not need it.

Ownership: the sink owns one asyncio event loop, run by a private daemon thread. The
nats-py connection, the per-batch ack tables and the stream lookup live on that loop and
are touched only there. ``write`` may be called from several threads at once
(``flush_concurrency > 1``): it encodes, routes and size-checks the items in the calling
thread, then hands the batch to the loop with ``run_coroutine_threadsafe`` and waits for
the acks.

Invariant: a record counts as delivered only after JetStream answered its publish with a
PubAck (a stored or a duplicate message). No ack, for whatever reason, means "retry".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import re
import ssl
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import msgpack

from ..errors import PermanentSinkError, SinkError
from ..record import Batch
from ..values import dumps_many, encode
from .base import Outcomes, require
from .urls import URLOptions, redacted
from .urls import parse_duration as parse_duration  # re-exported: part of this module's API

log = logging.getLogger("walbatch")

DEFAULT_PORT = 4222
_NAME_RE = re.compile(r"^[^\s.*>/\\]+$")
_TOKEN_RE = re.compile(r"^[^\s.*>]+$")
_ENCODINGS = ("json", "msgpack", "raw", "text")


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
    shown = redacted(url)  # messages never show a password or token
    if scheme not in ("nats", "tls"):
        raise ValueError(f"nats sink URL {shown!r}: scheme must be nats:// or tls://")
    if parts.path not in ("", "/"):
        raise ValueError(f"nats sink URL {shown!r}: unexpected path {parts.path!r}; stream and "
                         "subject go in the query (?stream=NAME&subject=SUBJECT)")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ValueError(f"nats sink URL {shown!r}: no server (nats://host:port[,host:port...])")
    servers = _split_hosts(shown, scheme, hosts)
    q = URLOptions(url, "nats", sorted(_QUERY_KEYS))

    user = password = token = None
    if at:
        name, colon, secret = userinfo.partition(":")
        if colon:
            user, password = unquote(name), unquote(secret)
        else:
            token = unquote(name)  # nats://TOKEN@host, the NATS convention
    user = q.text("user", user)
    password = q.text("password", password)
    token = q.text("token", token)
    if (user is None) != (password is None):
        raise ValueError(f"nats sink URL {shown!r}: user and password go together")
    if token is not None and user is not None:
        raise ValueError(f"nats sink URL {shown!r}: give a token or a user and password, not both")

    stream = q.text("stream", "") or ""
    if not stream:
        raise ValueError(f"nats sink URL {shown!r}: missing ?stream=NAME")
    if not _NAME_RE.match(stream):
        raise ValueError(f"nats sink URL {shown!r}: stream name {stream!r} may not contain "
                         "whitespace, '.', '*', '>', '/' or '\\'")
    subject = q.text("subject", "") or ""
    if not subject:
        raise ValueError(f"nats sink URL {shown!r}: missing ?subject=SUBJECT (a literal subject, "
                         "or a template such as events.{type})")
    SubjectTemplate(subject)  # validates; raises ValueError
    if len(subject.encode()) > MAX_SUBJECT_BYTES:
        raise ValueError(f"nats sink URL {shown!r}: subject of {len(subject.encode())} bytes; "
                         f"NATS takes at most {MAX_SUBJECT_BYTES}")

    encoding = q.choice("encoding", "json", _ENCODINGS)
    storage = q.choice("storage", "file", ("file", "memory"))
    replicas = q.integer("replicas", 1, low=1, high=5)  # what JetStream allows
    horizon = q.duration("horizon", 600.0)
    dup_window = q.duration("dup_window", horizon) if "dup_window" in q else None
    if ("tls_cert" in q) != ("tls_key" in q):
        raise ValueError(f"nats sink URL {shown!r}: tls_cert and tls_key go together")
    return NATSOptions(
        servers=servers, stream=stream, subject=subject, encoding=encoding,
        timeout=q.duration("timeout", 5.0), connect_timeout=q.duration("connect_timeout", 5.0),
        horizon=horizon, create=q.flag("create", False), dup_window=dup_window,
        replicas=replicas, storage=storage, user=user, password=password, token=token,
        tls_ca=q.text("tls_ca"), tls_cert=q.text("tls_cert"),
        tls_key=q.text("tls_key"), name=q.text("name", "walbatch") or "walbatch")


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


encode_json = encode  # the value mapping's encoder (walbatch.values)


def encode_msgpack(item: Any) -> bytes:
    return msgpack.packb(item, use_bin_type=True)


def encode_raw(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    raise TypeError(f"encoding=raw publishes bytes items as they are; this item is a "
                    f"{type(item).__name__} (encoding=text publishes str items as UTF-8)")


def encode_text(item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")  # a lone surrogate: UnicodeEncodeError, a ValueError
    raise TypeError(f"encoding=text publishes str items as UTF-8; this item is a "
                    f"{type(item).__name__} (encoding=raw publishes bytes items as they are)")


ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "json": encode_json, "msgpack": encode_msgpack, "raw": encode_raw, "text": encode_text}


# ------------------------------------------------------------------ acks


MSG_ID = "Nats-Msg-Id"
# nats-server drops a connection whose PUB line exceeds max_control_line (4 KiB by
# default): the line holds the subject, the reply subject (< 100 bytes here) and sizes.
MAX_SUBJECT_BYTES = 3840
_OK = object()  # a PubAck without an error: stored, or a duplicate the window dropped


class _Acks:
    """The replies one batch is waiting for, indexed by the record's position in the batch."""

    __slots__ = ("replies", "left", "sending", "done", "lost")

    def __init__(self, n: int, done: asyncio.Future[None]) -> None:
        self.replies: list[Any] = [None] * n  # None: no reply yet; _OK; else the nats-py Msg
        self.left = 0          # published and not yet answered
        self.sending = True    # replies arrive while later messages are still being published
        self.done = done
        self.lost: str | None = None  # why the missing replies will never come

    def add(self, i: int, msg: Any) -> None:
        if self.replies[i] is None:
            data = msg.data
            # A PubAck is {"stream":...,"seq":...[,"duplicate":true]}, an error {"error":{...}}.
            # Names cannot hold quotes, so '"error":' is only ever that key (a stream may be
            # *named* error); the substring test spares a JSON parse per message.
            self.replies[i] = _OK if data and b'"error":' not in data else msg
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


def _ack_outcome(reply: Any, stream: str) -> BaseException | None:
    """None for a PubAck (stored, or a duplicate the window dropped); else the error."""
    if reply is _OK:
        return None
    data = reply.data
    if not data:
        status = (reply.headers or {}).get("Status")
        if status == "503":
            return SinkError(f"no responders: stream {stream!r} has no leader right now (a "
                             "cluster electing one), or JetStream is not available")
        return SinkError(f"empty reply from JetStream (status {status or 'none'})")
    try:
        answer = json.loads(data)
        if "error" not in answer and "stream" in answer and "seq" in answer:
            return None  # a PubAck after all
        err = answer["error"]
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
        self._nats = require("nats", "nats", "NATS")
        require("nats.js", "nats", "NATS")
        self._tls = self._ssl_context() if options.tls else None
        # Loop-owned state (see the module docstring). write() reads _ready, _filters
        # and _max_size without a lock: a stale value costs at most one server-side refusal.
        self._nc: Any = None
        self._ready = False                 # stream looked up on the current connection
        self._lock: asyncio.Lock | None = None
        self._pending: dict[str, _Acks] = {}
        self._inbox = ""
        self._batch_keys = itertools.count()
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
        todo: list[tuple[int, str, bytes, str]] = []
        prefix = batch.log_id + ":"
        encode, template, is_bound, max_size = (
            self._encode, self._template, self._is_bound, self._max_size)
        literal = template.literal
        # Only subjects the stream covers are published: another subject would be stored
        # by another stream (or get "no responders", retried forever).
        literal_bound = literal is None or is_bound(literal)
        # What nats-py adds around the payload: "NATS/1.0\r\nNats-Msg-Id: <id>\r\n\r\n".
        overhead = 10 + len(MSG_ID) + 2 + 2 + 2 + len(prefix)
        texts = dumps_many([r.item for r in batch]) if encode is encode_json else None
        for i, rec in enumerate(batch):
            try:
                payload = texts[i].encode() if texts is not None else encode(rec.item)
            except (TypeError, ValueError, OverflowError, RecursionError) as ex:
                outcomes[i] = PermanentSinkError(
                    f"seq {rec.seq}: cannot encode as {self.options.encoding}: {ex}")
                continue
            if literal is not None:
                subject, bound = literal, literal_bound
            else:
                try:
                    subject = template.render(rec.item)
                except ValueError as ex:
                    outcomes[i] = PermanentSinkError(f"seq {rec.seq}: no subject: {ex}")
                    continue
                bound = is_bound(subject)
            if len(subject) > MAX_SUBJECT_BYTES // 4 and len(subject.encode()) > MAX_SUBJECT_BYTES:
                outcomes[i] = PermanentSinkError(
                    f"seq {rec.seq}: subject of {len(subject.encode())} bytes; NATS takes at most "
                    f"{MAX_SUBJECT_BYTES} (its 4 KiB control line holds the reply subject too)")
                continue
            if not bound:
                outcomes[i] = PermanentSinkError(
                    f"seq {rec.seq}: subject {subject!r} is not bound to stream "
                    f"{self.options.stream!r} (its subjects: {', '.join(self._filters) or 'none'})")
                continue
            seq = str(rec.seq)
            size = overhead + len(seq) + len(payload)
            if 0 <= max_size < size:
                outcomes[i] = PermanentSinkError(
                    f"seq {rec.seq}: message of {size} bytes (with headers) exceeds the limit of "
                    f"{max_size} bytes (stream {self.options.stream!r} max_msg_size / server "
                    "max_payload)")
                continue
            todo.append((i, subject, payload, prefix + seq))
        if todo:
            self._call(self._publish(todo, outcomes))
        failed = [o for o in outcomes if o is not None]
        if not failed:
            return None
        if len(failed) == n and all(isinstance(o, SinkError) and o.retryable for o in failed):
            first = failed[0]
            raise SinkError(f"{n} of {n} messages not acknowledged by JetStream: {first}") from first
        return outcomes

    def close(self, timeout: float = 10.0) -> None:
        """Flush and close the connection, stop the loop thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self._loop).result(timeout + 1)
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

    async def _publish(self, todo: list[tuple[int, str, bytes, str]],
                       outcomes: list[BaseException | None]) -> None:
        """Publish a batch with one reply subject per message, then wait for the PubAcks.

        All replies land on the connection's one wildcard inbox subscription
        (``_on_reply``), which files them in the batch's table: one subscription, no
        per-message future or timer (what ``js.publish`` costs), measured faster in
        benchmarks/bench_nats.py.
        """
        await self._ensure_ready()
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise SinkError("the connection to NATS was lost; the next attempt reconnects")
        key = str(next(self._batch_keys))
        acks = _Acks(len(outcomes), asyncio.get_running_loop().create_future())
        reply = f"{self._inbox}.{key}."
        publish = nc.publish
        self._pending[key] = acks
        try:
            try:
                for i, subject, payload, msg_id in todo:
                    acks.left += 1
                    await publish(subject, payload, reply=reply + str(i), headers={MSG_ID: msg_id})
            except Exception as ex:  # closed, or the connection failed under us
                acks.give_up(f"publish failed: {type(ex).__name__}: {ex}")
            acks.sent_all()
            if not acks.done.done():
                try:
                    await asyncio.wait_for(asyncio.shield(acks.done), self.options.timeout)
                except TimeoutError:
                    acks.give_up(f"no ack within {self.options.timeout:g}s")
                    # A server that vanished without closing the socket (a host gone, a
                    # partition, a stopped process) answers no PING either: drop it so
                    # the retry connects afresh.
                    if nc is self._nc and nc.is_connected:
                        try:
                            await nc.flush(timeout=min(2.0, self.options.timeout))
                        except Exception:
                            self._drop(nc, "no PONG after an ack timeout")
        finally:
            del self._pending[key]
        stream, lost = self.options.stream, None
        for i, *_ in todo:
            r = acks.replies[i]
            if r is None:
                if lost is None:
                    lost = SinkError(f"not acknowledged: {acks.lost or 'no reply'}")
                outcomes[i] = lost
            else:
                outcomes[i] = _ack_outcome(r, stream)

    async def _ensure_ready(self) -> None:
        if self._ready and self._nc is not None and self._nc.is_connected:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._nc is None or not self._nc.is_connected:
                if self._nc is not None:
                    self._drop(self._nc, "not connected")
                self._ready = False
                await self._connect()
            if not self._ready:
                await self._load_stream()
                self._ready = True

    async def _connect(self) -> None:
        """One connection through nats-py; it tries the servers in random order.

        nats-py's own reconnecting is off: a connection that drops is closed (replies to
        what was in flight can never come) and the next write makes a new one, which
        looks the stream up again. So a write never publishes into a half-dead
        connection's buffer, and the flusher's backoff paces the attempts.
        """
        o = self.options
        nc = self._nats.NATS()
        errors: list[BaseException] = []
        kwargs: dict[str, Any] = dict(
            servers=o.servers, name=o.name, connect_timeout=min(o.connect_timeout, 2.0),
            allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.1,
            error_cb=self._on_error(nc, errors), disconnected_cb=self._on_lost(nc, "disconnected"),
            closed_cb=self._on_lost(nc, "closed"),
            # Subjects are validated when the URL is parsed (and per item for templates).
            skip_subject_validation=True)
        if o.user is not None:
            kwargs.update(user=o.user, password=o.password)
        if o.token is not None:
            kwargs["token"] = o.token
        if self._tls is not None:
            kwargs["tls"] = self._tls
        try:
            await asyncio.wait_for(nc.connect(**kwargs), o.connect_timeout)
            if not nc._server_info.get("headers"):  # nats-py has no public accessor
                raise ConnectionError("the server does not support message headers "
                                      "(NATS 2.2+ needed)")
            self._nc = nc
            self._inbox = nc.new_inbox()
            await nc.subscribe(self._inbox + ".>", cb=self._on_reply,
                               pending_msgs_limit=-1, pending_bytes_limit=-1)
        except (Exception, asyncio.CancelledError) as ex:
            self._nc = None
            await self._close_quietly(nc)
            if isinstance(ex, asyncio.CancelledError):
                raise
            causes = [e for e in errors if e is not ex] + [ex]
            text = "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in causes))
            raise SinkError(f"cannot connect to NATS at {', '.join(o.servers)}: {text}") from None
        if self._down_logged:
            log.warning("walbatch: connected to NATS again")
        self._down_logged = False

    async def _load_stream(self) -> None:
        o = self.options
        js = self._nc.jetstream(timeout=o.timeout)
        nats = self._nats
        try:
            try:
                info = await js.stream_info(o.stream)
            except nats.js.errors.NotFoundError:
                if not o.create:
                    raise SinkError(
                        f"JetStream stream {o.stream!r} does not exist; create it (subjects "
                        f"{self._template.filter!r}, see docs/sinks/nats.md) or add ?create=1 "
                        "to the sink URL") from None
                info = await self._create_stream(js)
        except SinkError:
            raise
        except nats.errors.NoRespondersError:
            raise SinkError(f"JetStream is not available (no responders to $JS.API."
                            f"STREAM.INFO.{o.stream}): is the server running with JetStream "
                            "(-js)?") from None
        except Exception as ex:
            raise SinkError(f"cannot look up JetStream stream {o.stream!r}: "
                            f"{type(ex).__name__}: {ex}") from None
        cfg = info.config
        self._filters = list(cfg.subjects or [])
        self._bound.clear()
        limits = [s for s in (self._nc.max_payload, cfg.max_msg_size) if s is not None and s >= 0]
        self._max_size = min(limits) if limits else -1
        if self._template.literal is not None and not self._is_bound(self._template.literal):
            log.error("walbatch: subject %r is not bound to JetStream stream %r (subjects: %s); "
                      "every item will be dead-lettered", self._template.literal, o.stream,
                      ", ".join(self._filters) or "none")
        self._check_window(cfg.duplicate_window or 0.0)

    async def _create_stream(self, js: Any) -> Any:
        o = self.options
        api = self._nats.js.api
        window = o.dup_window if o.dup_window is not None else o.horizon
        config = api.StreamConfig(
            name=o.stream, subjects=[self._template.filter],
            retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.OLD,
            storage=api.StorageType.FILE if o.storage == "file" else api.StorageType.MEMORY,
            num_replicas=o.replicas, duplicate_window=window)
        try:
            info = await js.add_stream(config)
        except self._nats.js.errors.BadRequestError as ex:
            # Another walbatch host may have created it first: use what is there (the
            # window check still applies). Anything else is worth a retry and a log line.
            try:
                return await js.stream_info(o.stream)
            except Exception:
                raise SinkError(f"cannot create JetStream stream {o.stream!r}: {ex}") from None
        log.info("walbatch: created JetStream stream %r (subjects %r, %s, R%d, duplicate window %s)",
                 o.stream, self._template.filter, o.storage, o.replicas, _fmt_duration(window))
        return info

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

    async def _on_reply(self, msg: Any) -> None:
        # <inbox>.<batch key>.<index in batch>
        key, _, index = msg.subject[len(self._inbox) + 1:].partition(".")
        acks = self._pending.get(key)
        if acks is not None:  # else a late ack of a batch that gave up; its retry is deduplicated
            try:
                acks.add(int(index), msg)
            except (ValueError, IndexError):
                pass  # not a reply we asked for

    def _on_error(self, nc: Any, errors: list[BaseException]) -> Callable[[BaseException], Any]:
        async def error_cb(ex: BaseException) -> None:
            if nc is not self._nc:  # still connecting: collected for the SinkError
                errors.append(ex)
            elif not self._closed:  # e.g. a permissions violation on the subject
                log.warning("walbatch: NATS: %s: %s", type(ex).__name__, ex)
        return error_cb

    def _on_lost(self, nc: Any, what: str) -> Callable[[], Any]:
        async def lost_cb() -> None:
            self._drop(nc, what)
        return lost_cb

    def _drop(self, nc: Any, reason: str) -> None:
        """Forget a connection that failed; fail what waits on it; close it in the background."""
        if nc is not self._nc:
            return
        self._nc = None
        self._ready = False
        if not self._closed and not self._down_logged:
            self._down_logged = True
            log.warning("walbatch: lost the connection to NATS (%s); the next write reconnects",
                        reason)
        # Replies to what is in flight will never come on this connection: fail those
        # batches now instead of waiting out the timeout. JetStream may have stored some;
        # the retry carries the same ids and the duplicate window drops them.
        for acks in list(self._pending.values()):
            acks.give_up(f"connection to NATS lost ({reason})")
        if not nc.is_closed:
            asyncio.get_running_loop().create_task(self._close_quietly(nc))

    @staticmethod
    async def _close_quietly(nc: Any, timeout: float = 2.0) -> None:
        try:
            await asyncio.wait_for(nc.close(), timeout)
        except (Exception, asyncio.CancelledError):
            pass

    async def _shutdown(self, timeout: float) -> None:
        for acks in list(self._pending.values()):
            acks.give_up("the NATS sink is closing")
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                if nc.is_connected:
                    await nc.flush(timeout=min(2.0, timeout))
            except Exception:
                pass
            await self._close_quietly(nc, timeout)


def _fmt_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def from_url(url: str) -> NATSSink:
    """Build a NATSSink from ``nats://host:port[,host:port...]?stream=S&subject=T[&...]``."""
    return NATSSink(parse_url(url))
