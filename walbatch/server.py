"""The Unix-socket daemon: a thin asyncio shell over one DurableBatcher.

Each connection is read by one task and answered by another, in request order
(docs/protocol.md). Submits from all connections go through the batcher's
asyncio group commit, so concurrent requests share fsyncs. A connection may
have at most ``max_pending`` requests (and ``max_pending_bytes``) unanswered;
past that the daemon stops reading from it, so a client that never reads its
answers only stalls itself.

Optionally the daemon also listens on HTTP (walbatch.httpd: metrics, health,
ingest into the same batcher). A monitor task runs once a second (twice per
systemd watchdog period if shorter): it re-reads the log's fill for the
high/low-water marks, tells systemd ``STATUS=`` (backlog, log fill, sink) and
pings its watchdog, except once the log has failed (a failed fsync): then a
restart, which reopens the log, is the way out and the watchdog brings it.

Lifecycle (huey's shape): ``serve()`` = initialize, loop until the stop event,
shutdown. Signal handlers only call ``request_stop``. Shutdown stops accepting,
answers what is in flight, then closes the batcher with ``shutdown_timeout``
(deliver what it can, leave the rest in the log); meanwhile HTTP submits get
503 and ``/metrics`` keeps answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import logging
import os
import signal
import socket
import stat
import struct
import time
from typing import Any

from . import __version__, protocol
from .durable import DurableBatcher
from .errors import Closed, CorruptLog, DeadLettered, LogFailed, LogFull, LogWriteError
from .health import Backpressure
from .httpd import HttpOptions
from .protocol import ProtocolError

log = logging.getLogger("walbatch.server")

_READ_SIZE = 1 << 16


@dataclasses.dataclass
class ServerOptions:
    socket_path: str | None = None
    """Where to listen. Ignored when systemd passes a socket (LISTEN_FDS)."""
    socket_mode: int = 0o600
    socket_group: str | None = None
    allow_uids: tuple[int, ...] = ()
    """With allow_gids: if either is set, only these peers (SO_PEERCRED) are served."""
    allow_gids: tuple[int, ...] = ()
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME
    max_pending: int = 1024
    """Unanswered requests per connection before the daemon stops reading from it."""
    max_pending_bytes: int = 64 << 20
    shutdown_timeout: float = 30.0
    flush_timeout: float = 30.0
    """Default wait of a ``flush`` request that names no timeout."""
    http: HttpOptions | None = None
    """Listen on HTTP too (metrics, health, ingest); None: the Unix socket only."""
    sink_label: str = ""
    """How the start line names the sink (its URL without credentials)."""
    status_interval: float = 1.0
    """Seconds between the monitor's turns (systemd status, watchdog, water marks)."""
    otel: bool = False
    """Trace deliveries with OpenTelemetry (walbatch.tracing), with the global tracer provider."""


class Server:
    def __init__(self, batcher: DurableBatcher, opts: ServerOptions) -> None:
        self.batcher = batcher
        self.opts = opts
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._conns: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._created_socket: str | None = None
        self.address: str | None = None
        self._max_conns = 1 << 30
        self._busy_logged = 0.0
        water = opts.http or HttpOptions("")
        self.backpressure = Backpressure(batcher, water.high_water, water.low_water)
        self.http: Any = None
        self.metrics: Any = None

    # ------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        """Run until ``request_stop`` (or SIGTERM/SIGINT), then shut down cleanly."""
        # Connections may use all file descriptors but a reserve for the log's
        # segments, the checkpoint and the sink; beyond that, accepting one more
        # would make the next segment or sink connection fail for everyone.
        self._max_conns = max(8, _raise_fd_limit() - _FD_RESERVE)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_accept_errors)
        self._stop = asyncio.Event()
        sock = self._listening_socket()
        self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        try:
            if self.opts.otel:
                from . import tracing

                tracing.trace(self.batcher, sink=self.opts.sink_label or None)
            if self.opts.http is not None:
                await self._start_http(self.opts.http)
        except BaseException:
            self._server.close()
            self._remove_socket()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        self._log_start()
        sd_notify(f"READY=1\nSTATUS={self.status()}")
        monitor = asyncio.ensure_future(self._monitor())
        try:
            await self._stop.wait()
        finally:
            monitor.cancel()
            log.info("walbatch: stopping: no new requests; delivering for up to %gs",
                     self.opts.shutdown_timeout, extra={"event": "stopping"})
            sd_notify("STOPPING=1")
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _start_http(self, opts: HttpOptions) -> None:
        from . import httpd, metrics

        httpd.require()
        pc = metrics.require()
        registry = pc.CollectorRegistry()
        pc.ProcessCollector(registry=registry)
        pc.PlatformCollector(registry=registry)
        self.metrics = metrics.register(self.batcher, registry)
        self.http = httpd.HttpListener(self.batcher, opts, registry, self.backpressure,
                                       room=lambda http: len(self._conns) + http < self._max_conns)
        await self.http.start()

    def _log_start(self) -> None:
        b = self.batcher
        http = f" and http://{self.http.address}" if self.http is not None else ""
        log.info("walbatch: serving %s on %s%s (log %s, sink %s, %d item(s) waiting from before, "
                 "version %s)", b.directory, self.address, http, b.log_id,
                 self.opts.sink_label or "?", b.backlog_at_open, __version__,
                 extra={"event": "started", "data_dir": b.directory, "socket": self.address,
                        "http": self.http.address if self.http is not None else None,
                        "log_id": b.log_id, "sink": self.opts.sink_label,
                        "backlog": b.backlog_at_open, "version": __version__})

    def status(self, s: Any = None) -> str:
        """One line for systemd's STATUS=: backlog, log fill, the sink (``s``: a stats snapshot)."""
        b = self.batcher
        s = s or b.stats()
        cap = b.options.max_log_bytes
        parts = [f"{s.pending} pending", f"log {100.0 * s.log_bytes / cap:.0f}% full"]
        broken = b.broken
        failing = b.state_log.sink_failing_for()
        if broken is not None:
            parts.append(f"{type(broken).__name__}: {str(broken)[:200]}")
        elif failing:
            parts.append(f"sink failing for {failing:.0f}s")
        else:
            parts.append("sink ok")
        if self.backpressure.engaged:
            parts.append("HTTP submits refused (429) until the log drains")
        return ", ".join(parts)

    async def _monitor(self) -> None:
        """Once a second: water marks, systemd status, watchdog (see the module's top)."""
        watchdog = watchdog_interval()
        interval = self.opts.status_interval
        if watchdog is not None:
            interval = min(interval, watchdog / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                s = self.batcher.stats()
                self.backpressure.update(s.log_bytes)
                notes = [f"STATUS={self.status(s)}"]
                if watchdog is not None and not isinstance(self.batcher.broken, LogFailed):
                    notes.append("WATCHDOG=1")
                sd_notify("\n".join(notes))
            except Exception:  # the monitor must outlive anything it reads
                log.exception("walbatch: the status monitor failed; retrying")

    async def _shutdown(self) -> None:
        self._stopping = True
        if self.http is not None:
            self.http.stopping = True  # submits get 503 from now on; /metrics still answers
        if self._server is not None:
            self._server.close()
        # Answer what is in flight, then let the batcher deliver what it can.
        conns = list(self._conns)
        for c in conns:
            c.stop_reading()
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.done.wait()) for c in conns],
                               timeout=max(1.0, min(10.0, self.opts.shutdown_timeout)))
        for c in conns:
            c.abort()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.batcher.close, self.opts.shutdown_timeout)
        if self.http is not None:
            await self.http.stop()
        self._remove_socket()

    def _remove_socket(self) -> None:
        if self._created_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._created_socket)

    # --------------------------------------------------------------- socket

    def _listening_socket(self) -> socket.socket:
        passed = systemd_socket()
        if passed is not None:
            self.address = passed.getsockname() or "(systemd socket)"
            return passed
        path = self.opts.socket_path
        if not path:
            raise ValueError("no socket path given and no socket passed by systemd")
        path = os.path.abspath(path)
        if len(os.fsencode(path)) > _MAX_SUN_PATH:
            raise ValueError(f"the socket path {path} is {len(os.fsencode(path))} bytes long, but a "
                             f"Unix socket path may have at most {_MAX_SUN_PATH} (AF_UNIX): give "
                             "--socket a shorter path (e.g. /run/walbatch/walbatch.sock) or use a "
                             "shorter --data-dir")
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a daemon that died
            else:
                raise FileExistsError(f"another daemon is already listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # never expose the socket, even for an instant
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if self.opts.socket_group:
            gid = grp.getgrnam(self.opts.socket_group).gr_gid
            os.chown(path, -1, gid)
        os.chmod(path, self.opts.socket_mode)
        sock.listen(1024)
        sock.setblocking(False)
        self._created_socket = path
        self.address = path
        return sock

    def _peer_allowed(self, sock: socket.socket | None) -> tuple[bool, str]:
        if not (self.opts.allow_uids or self.opts.allow_gids):
            return True, ""
        if sock is None:
            return False, "peer credentials unavailable"
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        if uid in self.opts.allow_uids or gid in self.opts.allow_gids:
            return True, ""
        return False, f"peer pid {pid} uid {uid} gid {gid} is not allowed"

    # ----------------------------------------------------------- connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        allowed, why = self._peer_allowed(writer.get_extra_info("socket"))
        if not allowed:
            log.warning("walbatch refused a connection: %s", why)
            with contextlib.suppress(ConnectionError):
                writer.write(protocol.encode(protocol.error(None, protocol.FORBIDDEN, why)))
                await writer.drain()
            writer.close()
            return
        if len(self._conns) + (self.http.connections() if self.http is not None else 0
                               ) >= self._max_conns:
            now = time.monotonic()
            if now - self._busy_logged > 10:
                self._busy_logged = now
                log.warning("walbatch: refusing connections: %d open, the most the file "
                            "descriptor limit allows (raise it with ulimit -n / LimitNOFILE)",
                            len(self._conns))
            with contextlib.suppress(ConnectionError):
                writer.write(protocol.encode(protocol.error(
                    None, protocol.BUSY, f"the daemon has {len(self._conns)} connections, its "
                    "limit; retry later")))
                await writer.drain()
            writer.close()
            return
        conn = _Connection(self, reader, writer)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)

    def start_request(self, msg: Any, prior: asyncio.Future[Any] | None = None,
                      body: bytes | None = None) -> Answer:
        """Begin serving one decoded frame; ``answer(fut)`` of what it returns is the response.

        ``prior`` is the connection's previous request: ``stats`` and ``flush`` wait
        for it, so a flush pipelined behind submits covers them, as a client expects.
        A submit that does not wait for delivery gets no task of its own: its future
        is the batcher's, and the response is built from the receipt when it is sent
        (a task per one-item request was the daemon's largest cost).
        """
        try:
            req = protocol.parse_request(msg)
        except ProtocolError as ex:
            return _answered(protocol.error(ex.request_id, ex.code, ex.message))
        if self._stopping:
            return _answered(protocol.error(req.id, protocol.SHUTTING_DOWN,
                                            "the daemon is shutting down; nothing was written"))
        if req.op == "ping":
            return _answered(protocol.ok(req.id, pong=True, version=__version__))
        if req.op == "submit":
            if req.wait:
                return asyncio.ensure_future(self._submit(req)), _result
            assert req.items is not None
            try:
                if req.single:
                    return self.batcher._asubmit_future(req.items[0], key=req.key), req
                if req.key is None and len(req.items) >= 16 and body is not None:
                    payload = protocol.items_payload(body)  # stored as sent, not re-encoded
                    if payload is not None:
                        return self.batcher._asubmit_payload_future(payload, req.items), req
                return self.batcher._asubmit_many_future(req.items, key=req.key), req
            except Exception as ex:
                return _answered(self._submit_error(req, ex))
        return asyncio.ensure_future(self._after(prior, req)), _result

    def submit_answer(self, req: protocol.Request, fut: asyncio.Future[Any]) -> dict[str, Any]:
        """The response to a submit that did not wait, from its batcher future (done)."""
        ex = fut.exception()
        if ex is not None:
            return self._submit_error(req, ex)
        r = fut.result()
        if req.single:
            self.batcher.observers.submitted(r.seq, 1)
            return {"id": req.id, "ok": True, "first_seq": r.seq, "count": 1}
        self.batcher.observers.submitted(r.first_seq, r.count)
        return {"id": req.id, "ok": True, "first_seq": r.first_seq, "count": r.count}

    def _submit_error(self, req: protocol.Request, ex: BaseException) -> dict[str, Any]:
        if isinstance(ex, (TypeError, ValueError)):
            return protocol.error(req.id, protocol.BAD_REQUEST, f"{ex}")
        if isinstance(ex, LogFull):
            return protocol.error(req.id, protocol.LOG_FULL, str(ex))
        if isinstance(ex, Closed):
            return protocol.error(req.id, protocol.SHUTTING_DOWN, str(ex))
        if isinstance(ex, (LogWriteError, LogFailed)):
            return protocol.error(req.id, protocol.WRITE_FAILED, str(ex))
        log.error("walbatch: submit failed", exc_info=ex)
        return protocol.error(req.id, protocol.INTERNAL, f"{type(ex).__name__}: {ex}")

    async def _after(self, prior: asyncio.Future[Any] | None,
                     req: protocol.Request) -> dict[str, Any]:
        if prior is not None and not prior.done():
            await asyncio.wait((prior,))  # its answer is sent by _send; cancelling us spares it
        if req.op == "stats":
            return protocol.ok(req.id, stats=dataclasses.asdict(self.batcher.stats()))
        return await self._flush(req)

    async def _submit(self, req: protocol.Request) -> dict[str, Any]:
        """A waiting submit: acknowledged, then answered once every item is delivered."""
        assert req.items is not None
        try:
            if req.single:
                r = await self.batcher.asubmit(req.items[0], key=req.key)
                return protocol.ok(req.id, first_seq=r.seq, count=1,
                                   results=await self._results([r], req.timeout))
            rs = await self.batcher.asubmit_many(req.items, key=req.key)
            return protocol.ok(req.id, first_seq=rs.first_seq, count=rs.count,
                               results=await self._results(list(rs), req.timeout))
        except Exception as ex:
            return self._submit_error(req, ex)

    async def _results(self, receipts: list[Any], timeout: float | None) -> list[dict[str, Any]]:
        """Each item's outcome once delivered (the items are already acknowledged).

        Waits at most ``timeout`` (the daemon's flush timeout by default) and no longer
        than the daemon runs: an item not delivered by then is answered ``timeout`` or
        ``shutting_down``, and is delivered later all the same.
        """
        timeout = self.opts.flush_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + timeout
        assert self._stop is not None
        stopping = asyncio.ensure_future(self._stop.wait())
        out: list[dict[str, Any]] = []
        try:
            for r in receipts:
                waiting = asyncio.ensure_future(r)
                left = deadline - asyncio.get_running_loop().time()
                done, _ = await asyncio.wait({waiting, stopping}, timeout=max(0.0, left),
                                             return_when=asyncio.FIRST_COMPLETED)
                if waiting not in done:
                    waiting.cancel()  # only the wait: the item stays acknowledged
                    code, why = ((protocol.SHUTTING_DOWN, "the daemon is shutting down")
                                 if stopping in done else
                                 (protocol.TIMEOUT, f"not delivered within {timeout}s"))
                    out.append(protocol.item_error(code, f"seq {r.seq}: {why}; it is "
                                                   "acknowledged and stays in the log"))
                    continue
                try:
                    out.append(protocol.item_result(waiting.result()))
                except DeadLettered as ex:
                    out.append(protocol.item_error(protocol.DEAD_LETTERED, ex.error))
                except Closed as ex:
                    out.append(protocol.item_error(protocol.SHUTTING_DOWN, str(ex)))
                except CorruptLog as ex:
                    out.append(protocol.item_error(protocol.CORRUPT_LOG, str(ex)))
        finally:
            stopping.cancel()
        return out

    async def _flush(self, req: protocol.Request) -> dict[str, Any]:
        timeout = self.opts.flush_timeout if req.timeout is None else req.timeout
        try:
            flushed = asyncio.ensure_future(self.batcher.aflush(timeout))
            assert self._stop is not None
            stopping = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({flushed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not flushed.done():  # a shutdown must not wait for flushes of up to an hour
                flushed.cancel()
                return protocol.error(req.id, protocol.SHUTTING_DOWN,
                                      "the daemon is shutting down before the flush completed; "
                                      "what is not delivered stays in the log for its next start")
            flushed.result()
        except TimeoutError as ex:
            return protocol.error(req.id, protocol.TIMEOUT, str(ex))
        except CorruptLog as ex:
            return protocol.error(req.id, protocol.CORRUPT_LOG, str(ex))
        except Closed as ex:
            return protocol.error(req.id, protocol.SHUTTING_DOWN, str(ex))
        except Exception as ex:
            log.exception("walbatch: flush failed")
            return protocol.error(req.id, protocol.INTERNAL, f"{type(ex).__name__}: {ex}")
        return protocol.ok(req.id)


class _Connection:
    """One client: a reader task feeding an ordered queue, a sender answering in order."""

    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[asyncio.Future[Any], int, Any] | None] = asyncio.Queue()
        self.pending = 0
        self.pending_bytes = 0
        self._room: asyncio.Future[None] | None = None  # set while the reader waits for room
        self.done = asyncio.Event()
        self._read_task: asyncio.Task[None] | None = None
        self._last: asyncio.Future[Any] | None = None  # the latest request's future
        self._decoder = protocol.FrameDecoder(server.opts.max_frame_bytes, with_body=True)
        self._fatal = False  # the stream broke (a bad length): nothing after it is a request
        self._stopped = False
        self._in_read = False
        self._broken = False

    async def run(self) -> None:
        sender = asyncio.ensure_future(self._send())
        self._read_task = asyncio.ensure_future(self._read())
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task
            if self.server._stopping and not self._fatal:
                await self._answer_unread()
            self.queue.put_nowait(None)
            await sender
        finally:
            sender.cancel()
            self.writer.close()
            self.done.set()

    def stop_reading(self) -> None:
        # Only a read is interrupted: frames already taken off the socket are all
        # queued (and so answered), or the client could not tell what took effect.
        self._stopped = True
        if self._read_task is not None and self._in_read:
            self._read_task.cancel()

    def abort(self) -> None:
        self.writer.transport.abort()

    async def _read(self) -> None:
        while not self._stopped:
            self._in_read = True
            try:
                data = await self.reader.read(_READ_SIZE)
            except ConnectionError:
                return
            finally:
                self._in_read = False
            if not data:
                return  # a frame cut off by the disconnect was never acknowledged
            if not await self._take(data):
                return

    async def _answer_unread(self) -> None:
        """Shutdown: answer what the client sent but we had not read: shutting_down.

        Cutting the connection instead left the client unsure whether those
        requests took effect, so a retry could duplicate an item. Reading stops
        once the client has been quiet for 50 ms (or the shutdown's wait ends).
        """
        while True:
            try:
                data = await asyncio.wait_for(self.reader.read(_READ_SIZE), 0.05)
            except (TimeoutError, ConnectionError):
                return
            if not data or not await self._take(data):
                return

    async def _take(self, data: bytes) -> bool:
        """Start serving the frames in ``data``; False once the stream cannot go on."""
        opts = self.server.opts
        fatal: ProtocolError | None = None
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as ex:  # the stream cannot be trusted any more
            frames, fatal = ex.frames, ex  # but the requests before the bad length are served
        server = self.server
        max_pending, max_bytes = opts.max_pending, opts.max_pending_bytes
        for msg, size, body in frames:
            # Room for one more unanswered request (a lone one may be of any size).
            while self.pending >= max_pending or (
                    self.pending and self.pending_bytes + size > max_bytes):
                if self._broken:
                    return False  # the sender is gone: this request could never be answered
                self._room = asyncio.get_running_loop().create_future()
                await self._room
            self.pending += 1
            self.pending_bytes += size
            fut, how = server.start_request(msg, self._last, body)
            self._last = fut
            self.queue.put_nowait((fut, size, how))
        if fatal is not None:
            self._fatal = True
            fut, how = _answered(protocol.error(None, fatal.code, fatal.message))
            self.queue.put_nowait((fut, 0, how))
            return False
        return True

    async def _send(self) -> None:
        """Answer in request order; answers ready together go out in one write."""
        queue = self.queue
        server = self.server
        out: list[bytes] = []
        freed = freed_bytes = 0
        while True:
            entry = queue.get_nowait() if not queue.empty() else await queue.get()
            if entry is not None and not entry[0].done() and out:
                # Send what is ready before waiting for the next answer.
                if not await self._write(out, freed, freed_bytes):
                    return
                out, freed, freed_bytes = [], 0, 0
            if entry is None:
                if out:
                    await self._write(out, freed, freed_bytes)
                return
            fut, size, how = entry
            if not fut.done():
                await asyncio.wait((fut,))
            if how is not _result:
                response = server.submit_answer(how, fut)
            elif fut.cancelled():
                response = protocol.error(None, protocol.INTERNAL, "the request was cancelled")
            else:
                response = fut.result()
            out.append(protocol.encode(response))
            freed += 1
            freed_bytes += size
            if queue.empty() or freed_bytes > (1 << 20) or len(out) >= 1024:
                if not await self._write(out, freed, freed_bytes):
                    return
                out, freed, freed_bytes = [], 0, 0

    async def _write(self, out: list[bytes], freed: int, freed_bytes: int) -> bool:
        """Write these answers; False once the connection is broken."""
        writer = self.writer
        try:
            if writer.transport.is_closing():
                # The client is gone: its requests still run (a submit is durable
                # all the same), but their answers have nowhere to go.
                self.stop_reading()
                return True
            writer.write(out[0] if len(out) == 1 else b"".join(out))
            if self.queue.empty() or writer.transport.get_write_buffer_size() > (1 << 20):
                await writer.drain()
            return True
        except (ConnectionError, RuntimeError):
            self._broken = True  # nothing more can be answered: the reader stops too
            self.stop_reading()
            return False
        finally:
            self.pending -= freed
            self.pending_bytes -= freed_bytes
            room = self._room
            if room is not None and not room.done():
                room.set_result(None)


Answer = tuple["asyncio.Future[Any]", Any]
"""What ``start_request`` returns: a future, and how its result becomes the response:
``_result`` (it is the response), a ``Request`` (a submit's receipt, see
``Server.submit_answer``)."""

_result = object()


def _answered(value: dict[str, Any]) -> Answer:
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut, _result


_FD_RESERVE = 64
_MAX_SUN_PATH = 107  # sockaddr_un.sun_path is 108 bytes on Linux, one for the NUL


def _raise_fd_limit() -> int:
    """Allow as many connections as the hard limit does (the soft default is often 1024).

    Returns the file descriptor limit in force.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


_accept_error_logged = [0.0]


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """One line per 10 s for asyncio's "out of system resource" accept errors.

    asyncio retries accept() every second and logs a traceback each time; with
    the descriptors used up that filled the log at megabytes a minute.
    """
    if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
        now = time.monotonic()
        if now - _accept_error_logged[0] > 10:
            _accept_error_logged[0] = now
            log.error("walbatch: cannot accept connections: %s (out of file descriptors?)",
                      context.get("exception"))
        return
    loop.default_exception_handler(context)


def sd_notify(state: str) -> None:
    """Tell systemd about our state if it asked (NOTIFY_SOCKET); otherwise do nothing."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as ex:
        log.warning("walbatch: sd_notify(%s) failed: %s", state, ex)


def watchdog_interval() -> float | None:
    """systemd's watchdog period in seconds (WATCHDOG_USEC), if it is watching this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def systemd_socket() -> socket.socket | None:
    """The listening socket systemd passed us (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if n < 1:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError("the socket passed by systemd (fd 3) is not a Unix stream socket")
    sock.setblocking(False)
    return sock
