"""The daemon's wire protocol, sans I/O: bytes in, requests out; responses to bytes.

docs/protocol.md is the normative text; a client in any language can be written
from it. This module holds no sockets, threads or clocks (h11's rule), so it is
tested by plain function calls.

Frame: a 4-byte big-endian length N, then N bytes holding one msgpack map.

Errors are split as h11 splits them: ``ProtocolError.fatal`` means the byte
stream can no longer be trusted (the length prefix itself is bad), so the
connection must be closed after the error response; a non-fatal error spoils
one request only, and the connection carries on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .codec import unpack_one
from .keys import check_key

DEFAULT_MAX_FRAME = 16 << 20
_LEN = struct.Struct(">I")

OPS = ("submit", "stats", "flush", "ping")

# Stable error codes (docs/protocol.md). Never rename one: clients match on them.
BAD_FRAME = "bad_frame"  # the frame's bytes are not one msgpack value
TOO_LARGE = "too_large"  # the length prefix exceeds the daemon's limit (fatal)
BAD_REQUEST = "bad_request"  # not a map, missing/invalid id, op or fields
UNKNOWN_OP = "unknown_op"
LOG_FULL = "log_full"
SHUTTING_DOWN = "shutting_down"
WRITE_FAILED = "write_failed"  # the disk refused the write; nothing acknowledged
TIMEOUT = "timeout"
FORBIDDEN = "forbidden"  # the peer is not on the allow-list (fatal)
BUSY = "busy"  # the daemon has as many connections as its file limit allows (fatal)
CORRUPT_LOG = "corrupt_log"
INTERNAL = "internal"
DEAD_LETTERED = "dead_lettered"  # per item, in a waiting submit's results: the sink refused it

ERROR_CODES = (BAD_FRAME, TOO_LARGE, BAD_REQUEST, UNKNOWN_OP, LOG_FULL, SHUTTING_DOWN,
               WRITE_FAILED, TIMEOUT, FORBIDDEN, BUSY, CORRUPT_LOG, INTERNAL, DEAD_LETTERED)


class ProtocolError(Exception):
    """A request (or the stream) is malformed. ``request_id`` is echoed when known."""

    def __init__(self, code: str, message: str, *, fatal: bool = False,
                 request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.request_id = request_id
        self.frames: list[tuple[Any, int]] = []
        """For a fatal error from ``FrameDecoder.feed``: the frames completed before it,
        which are still to be served (each request is answered exactly once)."""


def encode(obj: dict[str, Any]) -> bytes:
    """One frame: length prefix + msgpack map.

    Raises TypeError (as ``submit`` does) for a value msgpack cannot encode.
    """
    try:
        body = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, OverflowError, ValueError) as ex:
        raise TypeError(f"cannot send this request: items and keys must be msgpack-serialisable "
                        f"(None, bool, 64-bit int, float, str, bytes, list, tuple, dict): {ex}") from None
    return _LEN.pack(len(body)) + body


@dataclass
class FrameDecoder:
    """Accumulates bytes; yields each complete frame's decoded value.

    ``feed`` raises a fatal ProtocolError for a length above ``max_frame`` (or
    zero); a frame whose body is not msgpack comes out as a ProtocolError value
    in the returned list, so the frames after it are still served.
    """

    max_frame: int = DEFAULT_MAX_FRAME
    with_body: bool = False
    """Return ``(value, frame_size, body)``: the daemon stores a submit's items as sent."""
    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return ``(value, frame_size)`` for each frame now complete."""
        self._buf += data
        out: list[Any] = []
        with_body = self.with_body
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n == 0 or n > self.max_frame:
                del buf[:pos]
                err = ProtocolError(
                    TOO_LARGE,  # docs/protocol.md: also for a length of 0
                    f"frame length {n} is not within 1..{self.max_frame} bytes",
                    fatal=True,
                )
                err.frames = out
                raise err
            if len(buf) - pos - 4 < n:
                break
            body = bytes(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
            try:
                value = unpack_one(body)
            except Exception as ex:  # msgpack raises several unrelated types
                why = f"{type(ex).__name__}: {ex}" if str(ex) else type(ex).__name__
                value = ProtocolError(BAD_FRAME, f"frame body is not valid msgpack ({why})")
            out.append((value, n, body) if with_body else (value, n))
        del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held so far."""
        return len(self._buf)


@dataclass(frozen=True)
class Request:
    id: Any
    op: str
    items: list[Any] | None = None
    """For submit: the items (a single ``item`` becomes a list of one)."""
    single: bool = False
    """For submit: the request used ``item`` rather than ``items``."""
    timeout: float | None = None
    """For flush: seconds to wait (None: the daemon's default)."""
    key: Any = None
    """For submit: the batching key of every item (None: unkeyed)."""
    wait: bool = False
    """For submit: answer once every item is delivered (or dead-lettered), with per-item
    results, instead of once it is fsync'd."""


def parse_request(msg: Any) -> Request:
    """Validate one decoded frame as a request, or raise a non-fatal ProtocolError."""
    if isinstance(msg, ProtocolError):
        raise msg
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_REQUEST, f"a request must be a msgpack map, not {_kind(msg)}")
    rid = msg.get("id")
    if not (isinstance(rid, (int, str)) and not isinstance(rid, bool)) or (
        isinstance(rid, str) and len(rid) > 128
    ):
        raise ProtocolError(BAD_REQUEST, "request 'id' must be an integer or a string of at most "
                            f"128 characters, not {_kind(rid)}", request_id=_echo(rid))
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError(BAD_REQUEST, f"request 'op' must be a string, not {_kind(op)}",
                            request_id=rid)
    if op not in OPS:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {op[:64]!r}; known ops: {', '.join(OPS)}",
                            request_id=rid)
    if op == "submit":
        has_item, has_items = "item" in msg, "items" in msg
        if has_item == has_items:
            raise ProtocolError(BAD_REQUEST, "submit takes exactly one of 'item' or 'items'",
                                request_id=rid)
        key = msg.get("key")
        if key is not None:
            try:
                check_key(key)
            except (TypeError, ValueError) as ex:
                raise ProtocolError(BAD_REQUEST, f"'key': {ex}", request_id=rid) from None
        wait = msg.get("wait", False)
        if not isinstance(wait, bool):
            raise ProtocolError(BAD_REQUEST, f"'wait' must be true or false, not {_kind(wait)}",
                                request_id=rid)
        timeout = _timeout(msg, rid) if wait else None
        if has_items:
            items = msg["items"]
            if not isinstance(items, list):
                raise ProtocolError(BAD_REQUEST, f"'items' must be an array, not {_kind(items)}",
                                    request_id=rid)
            return Request(rid, op, items, key=key, wait=wait, timeout=timeout)
        return Request(rid, op, [msg["item"]], single=True, key=key, wait=wait, timeout=timeout)
    if op == "flush":
        return Request(rid, op, timeout=_timeout(msg, rid))
    return Request(rid, op)


def items_payload(body: bytes) -> bytes | None:
    """A submit frame's ``items``, encoded as sent: the array's bytes without its header.

    The log holds a batch as its items' encodings one after another; when a frame
    already carries them so, the daemon stores these bytes rather than decoding and
    encoding every item again. They were decoded with the frame (so they are whole,
    valid msgpack), and the log's reader decodes them with the same options, so what
    is delivered is exactly the items the daemon read. None when not found (the
    caller then encodes the decoded items).
    """
    unpacker = msgpack.Unpacker(max_buffer_size=len(body))
    unpacker.feed(body)
    found = None
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            start = unpacker.tell()
            unpacker.skip()
            if key == "items":  # a repeated key: the decoded map kept the last one, so do we
                found = (start, unpacker.tell())
    except Exception:  # not a map of simple keys: the slow way
        return None
    if found is None:
        return None
    start, end = found
    head = body[start]
    skip = 1 if 0x90 <= head <= 0x9F else 3 if head == 0xDC else 5 if head == 0xDD else 0
    return body[start + skip:end] if skip else None


def _timeout(msg: dict[str, Any], rid: Any) -> float | None:
    timeout = msg.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                or not 0 <= timeout <= 86400):  # also refuses NaN and inf
        raise ProtocolError(BAD_REQUEST, f"{msg.get('op')} 'timeout' must be a number of seconds "
                            "from 0 to 86400", request_id=rid)
    return None if timeout is None else float(timeout)


def item_result(value: Any) -> dict[str, Any]:
    """One item's entry in a waiting submit's ``results``: delivered, with its result.

    A result msgpack cannot carry is sent as its repr, flagged (``result_repr``).
    """
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, OverflowError, ValueError):
        return {"ok": True, "result": repr(value), "result_repr": True}
    return {"ok": True, "result": value}


def item_error(code: str, message: str) -> dict[str, Any]:
    """One item's entry in ``results`` when it was not delivered (dead_lettered, timeout, ...)."""
    return {"ok": False, "code": code, "message": message}


def ok(request_id: Any, **fields: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, **fields}


def error(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "code": code, "message": message}


def _kind(v: Any) -> str:
    return "nil" if v is None else type(v).__name__


def _echo(rid: Any) -> Any:
    """An invalid id is not echoed back (it may be huge or of any type)."""
    return None
