"""Clients for ``walbatch serve``: ``Client`` (threads) and ``AsyncClient`` (asyncio).

Both pipeline: requests are written as they come and answers matched in order
(the daemon answers in request order). Both connect lazily and reconnect on the
next call after the daemon restarts. A request whose answer was lost with the
connection raises ``DaemonUnavailable``: its item may or may not have been
acknowledged, so resubmitting it can duplicate it (with a new seq). An answered
submit may be forgotten by the program: the daemon owns the item from then on.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from . import protocol
from .errors import Closed, DeadLettered, LogFull, WalbatchError


class RemoteError(WalbatchError):
    """The daemon answered with an error. ``code`` is the stable protocol code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BadRequest(RemoteError, ValueError):
    """The request was malformed (bad_frame, too_large, bad_request, unknown_op)."""


class RemoteLogFull(RemoteError, LogFull):
    """The daemon's log is full (log_full); the item was not written."""


class RemoteClosed(RemoteError, Closed):
    """The daemon is shutting down (shutting_down); the item was not written."""


class RemoteWriteFailed(RemoteError):
    """The daemon's disk refused the write (write_failed); nothing acknowledged."""


class RemoteTimeout(RemoteError, TimeoutError):
    """A flush, or a waiting submit's delivery, did not finish in time (timeout).

    For a waiting submit the items are acknowledged all the same and stay in the log.
    """


class Forbidden(RemoteError, PermissionError):
    """This peer is not on the daemon's allow-list (forbidden)."""


class Busy(RemoteError, ConnectionRefusedError):
    """The daemon has no room for another connection (busy); nothing was sent. Retry later."""


class RemoteCorruptLog(RemoteError):
    """The daemon's log is damaged (corrupt_log); see ``walbatch verify``."""


class DaemonUnavailable(WalbatchError, ConnectionError):
    """No daemon answered, or the connection broke before the answer arrived."""


_BY_CODE: dict[str, type[RemoteError]] = {
    protocol.BAD_FRAME: BadRequest,
    protocol.TOO_LARGE: BadRequest,
    protocol.BAD_REQUEST: BadRequest,
    protocol.UNKNOWN_OP: BadRequest,
    protocol.LOG_FULL: RemoteLogFull,
    protocol.SHUTTING_DOWN: RemoteClosed,
    protocol.WRITE_FAILED: RemoteWriteFailed,
    protocol.TIMEOUT: RemoteTimeout,
    protocol.FORBIDDEN: Forbidden,
    protocol.BUSY: Busy,
    protocol.CORRUPT_LOG: RemoteCorruptLog,
}


# Codes after which the daemon closes the connection (docs/protocol.md): the client drops it
# before handing out the answer, so the next call reconnects instead of writing into a dead socket.
_CLOSING_CODES = (protocol.TOO_LARGE, protocol.FORBIDDEN, protocol.BUSY)


def _closes(value: Any) -> bool:
    return isinstance(value, dict) and value.get("code") in _CLOSING_CODES


def _fail_unanswered(pending: Any, cause: BaseException | None) -> None:
    """Fail the requests a broken connection will never answer (sync or asyncio futures)."""
    for _rid, fut in pending:
        if not fut.done():
            fut.set_exception(DaemonUnavailable(
                "connection to the daemon lost before the answer arrived "
                f"({cause or 'closed by the daemon'}); the request may or may not "
                "have taken effect"))


def _raise_for(resp: dict[str, Any]) -> dict[str, Any]:
    if resp.get("ok"):
        return resp
    code = str(resp.get("code", protocol.INTERNAL))
    raise _BY_CODE.get(code, RemoteError)(code, str(resp.get("message", "")))


class Client:
    """A thread-safe, pipelining client. ``submit`` returns the item's seq."""

    def __init__(self, socket_path: str, *, connect_timeout: float = 10.0,
                 timeout: float | None = 60.0) -> None:
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pending: deque[tuple[Any, Future[dict[str, Any]]]] = deque()
        self._ids = itertools.count(1)
        self._reader: threading.Thread | None = None
        self._closed = False

    # --------------------------------------------------------------- calls

    def submit(self, item: Any, key: str | int | bytes | None = None, *, wait: bool = False,
               timeout: float | None = None) -> Any:
        """Submit one item; return its seq once the daemon fsync'd it.

        ``wait=True``: return the item's result once it is *delivered* (what the sink
        returned for it; None if nothing), raising ``DeadLettered`` if the sink refused
        it, ``RemoteTimeout`` if it was not delivered within ``timeout`` seconds (the
        daemon's flush timeout by default; the item stays acknowledged).
        """
        if not wait:
            return int(self.request(_submit(item, key))["first_seq"])
        resp = self.request(_submit(item, key, timeout), wait=self._answer_wait(timeout))
        return _outcome(resp["first_seq"], resp["results"][0], raise_it=True)

    def submit_many(self, items: list[Any], key: str | int | bytes | None = None, *,
                    wait: bool = False, timeout: float | None = None) -> Any:
        """Submit items in one frame and fsync; return their seqs as a range.

        ``wait=True``: return one outcome per item once delivered: its result, or the
        exception saying why not (``DeadLettered``, ``RemoteTimeout``, ...), in order.
        """
        if not wait:
            resp = self.request(_submit_many(items, key))
            return range(resp["first_seq"], resp["first_seq"] + resp["count"])
        resp = self.request(_submit_many(items, key, timeout), wait=self._answer_wait(timeout))
        return [_outcome(resp["first_seq"] + i, r, raise_it=False)
                for i, r in enumerate(resp["results"])]

    def _answer_wait(self, timeout: float | None) -> float | None:
        # A waiting submit answers after delivery: give it the daemon's wait and more.
        if self.timeout is None:
            return None
        return max(self.timeout, (timeout if timeout is not None else 30.0) + 5.0)

    def submit_async(self, item: Any, key: str | int | bytes | None = None
                     ) -> Future[dict[str, Any]]:
        """Send a submit without waiting; the Future yields the raw ``ok`` response."""
        return self.send(_submit(item, key))

    def submit_many_async(self, items: list[Any], key: str | int | bytes | None = None
                          ) -> Future[dict[str, Any]]:
        return self.send(_submit_many(items, key))

    def stats(self) -> dict[str, Any]:
        return dict(self.request({"op": "stats"})["stats"])

    def flush(self, timeout: float | None = None) -> None:
        """Return once everything the daemon acknowledged so far is delivered."""
        msg: dict[str, Any] = {"op": "flush"}
        if timeout is not None:
            msg["timeout"] = timeout
        wait = None if timeout is None or self.timeout is None else max(self.timeout, timeout + 5)
        self.request(msg, wait=wait)

    def ping(self) -> dict[str, Any]:
        return self.request({"op": "ping"})

    def request(self, msg: dict[str, Any], wait: float | None = None) -> dict[str, Any]:
        fut = self.send(msg)
        try:
            resp = fut.result(wait if wait is not None else self.timeout)
        except TimeoutError:
            raise DaemonUnavailable(f"no answer from {self.socket_path} within "
                                    f"{wait or self.timeout}s") from None
        return _raise_for(resp)

    def send(self, msg: dict[str, Any]) -> Future[dict[str, Any]]:
        """Pipeline one request; its Future yields the response map (ok or not)."""
        fut: Future[dict[str, Any]] = Future()
        # _send_lock keeps frames whole and in the order of _pending; _lock guards
        # _pending alone, so the reader thread can take answers while a sender is
        # blocked in sendall (holding one lock for both deadlocked: the daemon stops
        # reading when we stop reading its answers).
        with self._send_lock:
            with self._lock:
                if self._closed:
                    raise Closed("the client is closed")
                sock = self._connect()
                rid = next(self._ids)
                frame = protocol.encode({**msg, "id": rid})
                self._pending.append((rid, fut))
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon closed the connection: the reader thread hands out what it
                #       answered before closing (e.g. forbidden), then fails the rest
            except OSError as ex:
                with self._lock:
                    self._broken(sock, ex)
        return fut

    # ---------------------------------------------------------- connection

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.01
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket_path)
                break
            except OSError as ex:
                s.close()
                if time.monotonic() + delay > deadline:
                    raise DaemonUnavailable(f"cannot connect to walbatch daemon at "
                                            f"{self.socket_path}: {ex}") from ex
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        self._sock = s
        self._reader = threading.Thread(target=self._read_loop, args=(s,), daemon=True,
                                        name="walbatch-client-reader")
        self._reader.start()
        return s

    def _read_loop(self, sock: socket.socket) -> None:
        decoder = protocol.FrameDecoder(max_frame=1 << 30)
        error: BaseException | None = None
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    break
                for value, _size in decoder.feed(data):
                    with self._lock:
                        if not self._pending:
                            raise DaemonUnavailable("the daemon sent an answer nobody asked for")
                        rid, fut = self._pending.popleft()
                    if isinstance(value, dict) and value.get("id") not in (rid, None):
                        raise DaemonUnavailable(f"answer for id {value.get('id')!r} arrived "
                                                f"while waiting for {rid!r}")
                    if _closes(value):
                        with self._lock:
                            self._broken(sock, None)
                        fut.set_result(value)
                        return
                    fut.set_result(value if isinstance(value, dict) else
                                   protocol.error(rid, protocol.INTERNAL, "malformed answer"))
        except (OSError, WalbatchError, protocol.ProtocolError) as ex:
            error = ex
        with self._lock:
            self._broken(sock, error)

    def _broken(self, sock: socket.socket, cause: BaseException | None) -> None:
        """Fail every unanswered request of this connection (caller holds _lock)."""
        if self._sock is sock:
            self._sock = None
            pending, self._pending = self._pending, deque()
            _fail_unanswered(pending, cause)
        try:
            sock.close()
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            with self._lock:
                self._broken(sock, None)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio client: ``await c.submit(item)``; pipelined; reconnects."""

    def __init__(self, socket_path: str, *, connect_timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self._writer: asyncio.StreamWriter | None = None
        self._pending: deque[tuple[Any, asyncio.Future[dict[str, Any]]]] = deque()
        self._ids = itertools.count(1)
        self._connecting = asyncio.Lock()
        self._reader_task: asyncio.Task[None] | None = None

    async def submit(self, item: Any, key: str | int | bytes | None = None, *,
                     wait: bool = False, timeout: float | None = None) -> Any:
        """As ``Client.submit``: the seq, or with ``wait=True`` the delivered item's result."""
        if not wait:
            return int((await self.request(_submit(item, key)))["first_seq"])
        resp = await self.request(_submit(item, key, timeout))
        return _outcome(resp["first_seq"], resp["results"][0], raise_it=True)

    async def submit_many(self, items: list[Any], key: str | int | bytes | None = None, *,
                          wait: bool = False, timeout: float | None = None) -> Any:
        """As ``Client.submit_many``: a range of seqs, or with ``wait=True`` the outcomes."""
        if not wait:
            resp = await self.request(_submit_many(items, key))
            return range(resp["first_seq"], resp["first_seq"] + resp["count"])
        resp = await self.request(_submit_many(items, key, timeout))
        return [_outcome(resp["first_seq"] + i, r, raise_it=False)
                for i, r in enumerate(resp["results"])]

    async def stats(self) -> dict[str, Any]:
        return dict((await self.request({"op": "stats"}))["stats"])

    async def flush(self, timeout: float | None = None) -> None:
        msg: dict[str, Any] = {"op": "flush"}
        if timeout is not None:
            msg["timeout"] = timeout
        await self.request(msg)

    async def ping(self) -> dict[str, Any]:
        return await self.request({"op": "ping"})

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        writer = await self._connect()
        rid = next(self._ids)
        frame = protocol.encode({**msg, "id": rid})  # before _pending: a bad item sends nothing
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((rid, fut))
        try:
            writer.write(frame)
            await writer.drain()
        except (OSError, RuntimeError) as ex:
            self._broken(writer, ex)
        return _raise_for(await fut)

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None:
            return self._writer
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            deadline = time.monotonic() + self.connect_timeout
            delay = 0.01
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(self.socket_path)
                    break
                except OSError as ex:
                    if time.monotonic() + delay > deadline:
                        raise DaemonUnavailable(f"cannot connect to walbatch daemon at "
                                                f"{self.socket_path}: {ex}") from ex
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
            self._writer = writer
            self._reader_task = asyncio.ensure_future(self._read_loop(reader, writer))
            return writer

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = protocol.FrameDecoder(max_frame=1 << 30)
        error: BaseException | None = None
        try:
            while data := await reader.read(1 << 16):
                for value, _size in decoder.feed(data):
                    if not self._pending:
                        raise DaemonUnavailable("the daemon sent an answer nobody asked for")
                    _rid, fut = self._pending.popleft()
                    if _closes(value):
                        self._broken(writer, None)
                        if not fut.done():
                            fut.set_result(value)
                        return
                    if not fut.done():
                        fut.set_result(value if isinstance(value, dict) else
                                       protocol.error(_rid, protocol.INTERNAL, "malformed answer"))
        except (OSError, WalbatchError, protocol.ProtocolError) as ex:
            error = ex
        self._broken(writer, error)

    def _broken(self, writer: asyncio.StreamWriter, cause: BaseException | None) -> None:
        if self._writer is writer:
            self._writer = None
            pending, self._pending = self._pending, deque()
            _fail_unanswered(pending, cause)
        writer.close()

    async def close(self) -> None:
        if self._writer is not None:
            w = self._writer
            self._broken(w, None)
            try:
                await w.wait_closed()
            except (OSError, RuntimeError):
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_NO_WAIT = object()


def _submit(item: Any, key: Any, timeout: Any = _NO_WAIT) -> dict[str, Any]:
    msg = {"op": "submit", "item": item}
    if key is not None:
        msg["key"] = key
    return _waiting(msg, timeout)


def _submit_many(items: list[Any], key: Any, timeout: Any = _NO_WAIT) -> dict[str, Any]:
    if isinstance(items, (str, bytes, bytearray, dict)):  # iterable, but surely one item
        raise TypeError(f"submit_many takes a list of items, not a {type(items).__name__}; "
                        "use submit for one item")
    msg = {"op": "submit", "items": list(items)}
    if key is not None:
        msg["key"] = key
    return _waiting(msg, timeout)


def _waiting(msg: dict[str, Any], timeout: Any) -> dict[str, Any]:
    if timeout is not _NO_WAIT:
        msg["wait"] = True
        if timeout is not None:
            msg["timeout"] = timeout
    return msg


def _outcome(seq: int, entry: dict[str, Any], raise_it: bool) -> Any:
    """One item's entry of a waiting submit: its result, or the error (raised or returned)."""
    if entry.get("ok"):
        return entry.get("result")
    code, message = str(entry.get("code")), str(entry.get("message", ""))
    ex: Exception = (DeadLettered(seq, message) if code == protocol.DEAD_LETTERED
                     else _BY_CODE.get(code, RemoteError)(code, message))
    if raise_it:
        raise ex
    return ex
