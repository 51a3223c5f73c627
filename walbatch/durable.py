"""DurableBatcher: the embedded API over the log, the group committer and the flusher.

The promise (docs/guarantees.md): ``submit`` returns only after the item is in
the log and fdatasync'd; every acknowledged item is then delivered to the sink,
dead-lettered with its error, or still in the log, and is replayed by the next
open if this process dies first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, overload

import msgpack

from . import values
from .checkpoint import Checkpoint
from .commit import GroupCommitter, join_decoded
from .datadir import check_private
from .delivery import Delivery, Stats, close_sink
from .dlq import DeadLetterStore
from .errors import Closed, LogFailed, LogFull
from .events import StateLog
from .fileio import FileSystem
from .framing import FRAME_HEADER_SIZE, HEADER_SIZE, MAX_FRAME_PAYLOAD
from .keys import check_key, wrap, wrap_many
from .log import Log
from .observer import Observers
from .options import Options
from .sinks import resolve_sink

log = logging.getLogger("walbatch")

_tls = threading.local()


def _encode(item: Any, name: str = "the item") -> bytes:
    """``item`` packed, or TypeError/ValueError naming where in it the problem is."""
    try:
        pack = _tls.pack
    except AttributeError:  # one Packer per thread: packb would build one per call
        pack = _tls.pack = msgpack.Packer(use_bin_type=True).pack
    try:
        data = pack(item)
    except (TypeError, OverflowError, ValueError) as ex:
        _refuse(item, name, ex)
    if values.needs_check(data):  # too deep to read back, or an ExtType the log reserves
        values.check(item, name)
    return data


def _refuse(item: Any, name: str, ex: BaseException) -> NoReturn:
    """Raise TypeError for an item msgpack cannot pack, naming the path inside it."""
    try:
        values.check(item, name)
        detail = str(ex)
    except (TypeError, ValueError) as found:
        detail = str(found)
    raise TypeError(f"cannot submit {name}, a {type(item).__name__}: items must be "
                    "msgpack-serialisable (None, bool, int, float, str, bytes, list, tuple, "
                    f"dict); nothing was written: {detail}") from None


def _encode_keyed(item: Any, key: Any) -> bytes:
    """One keyed item's encoding (see walbatch.keys)."""
    check_key(key)
    kb, ib = _encode(key, "the key"), _encode(item)
    return _tls.pack(wrap(kb, ib))  # the one ExtType 87 the log holds on purpose


def _encode_many(items: Iterable[Any], key: Any = None) -> tuple[bytes, int]:
    """The concatenated msgpack encodings of ``items`` (a frame payload) and their count.

    All or nothing: an item that cannot be submitted raises, naming ``items[i]`` and
    the path inside it, and nothing is written.
    """
    if isinstance(items, (str, bytes, bytearray, dict)):  # iterable, but surely one item
        raise TypeError(f"submit_many takes a list (or other iterable) of items, not a "
                        f"{type(items).__name__}; use submit for one item")
    seq = items if isinstance(items, list) else list(items)
    if key is not None:
        check_key(key)
        kb = _encode(key, "the key")
        try:
            packs = list(map(_tls.pack, seq))
        except (TypeError, OverflowError, ValueError, AttributeError):
            packs = [_encode(item, f"items[{i}]") for i, item in enumerate(seq)]
        if packs and (max(map(len, packs)) >= values.MSGPACK_DEPTH
                      or values.has_ext_87(b"".join(packs))):
            for i, item in enumerate(seq):
                values.check(item, f"items[{i}]")
        return wrap_many(kb, packs), len(seq)
    n = len(seq)
    try:
        pack_list = _tls.pack_list
    except AttributeError:  # one Packer per thread, as in _encode
        pack_list = _tls.pack_list = msgpack.Packer(use_bin_type=True).pack
    try:
        packed = pack_list(seq)
    except (TypeError, OverflowError, ValueError):
        for i, item in enumerate(seq):
            _encode(item, f"items[{i}]")  # raises, naming the first item that cannot go
        raise
    # Packed inside the list, every item is one level deeper, so msgpack's own limit
    # already refused any item too deep to read back; an ExtType 87 is left to find.
    if values.has_ext_87(packed):
        for i, item in enumerate(seq):
            values.check(item, f"items[{i}]")
    # Packing the list as one array runs the per-item loop in C; the payload is that
    # array without its header (1, 3 or 5 bytes by length: msgpack's fixarray/array16/array32).
    return packed[1 if n < 16 else 3 if n < 65536 else 5:], n


def _check_frame_size(nbytes: int) -> None:
    # Checked before joining a commit group: one oversized submit must not fail the others.
    if nbytes > MAX_FRAME_PAYLOAD:
        raise ValueError(f"{nbytes} bytes in one submit exceed the limit of {MAX_FRAME_PAYLOAD} "
                         "bytes; nothing was written")


class Receipt:
    """The acknowledgement of one durable item: its seq, and a way to await delivery.

    ``wait()`` (or ``await receipt``) returns the item's result: what the sink
    returned for it, None if it returned nothing. Results live in this process's
    memory only; after a restart nobody waits and replayed items' results are
    dropped.
    """

    __slots__ = ("seq", "_delivery", "_known")

    def __init__(self, seq: int, delivery: Delivery, known: dict[int, Any] | None = None) -> None:
        self.seq = seq
        self._delivery = delivery
        self._known = known  # results already collected (shared with the Receipts it came from)

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the item is delivered; return its result.

        Raises DeadLettered if it went to the dead-letter store, TimeoutError if
        not delivered in time (it stays in the log), Closed if the batcher closed
        first.
        """
        known = self._known
        if known is not None and self.seq in known:
            return known[self.seq]
        result = self._delivery.wait_seq(self.seq, timeout)
        self._remember(result)
        return result

    def __await__(self) -> Generator[Any, None, Any]:
        """``await receipt``: ``wait()`` without blocking the event loop.

        Cancelling the awaiting task only stops the wait: the item stays
        acknowledged and is delivered anyway.
        """
        return self._await().__await__()

    async def _await(self) -> Any:
        known = self._known
        if known is not None and self.seq in known:
            return known[self.seq]
        result = await self._delivery.await_seq(self.seq)
        self._remember(result)
        return result

    def _remember(self, result: Any) -> None:
        if self._known is None:
            self._known = {}
        self._known[self.seq] = result

    @property
    def delivered(self) -> bool:
        """True once the item is delivered or dead-lettered."""
        return self._delivery.completed(self.seq)

    def __repr__(self) -> str:
        return f"Receipt(seq={self.seq})"


class Receipts(Sequence[Receipt]):
    """The receipts of one ``submit_many``: seqs ``first_seq .. first_seq+count-1``."""

    __slots__ = ("first_seq", "count", "_delivery", "_known")

    def __init__(self, first_seq: int, count: int, delivery: Delivery) -> None:
        self.first_seq = first_seq
        self.count = count
        self._delivery = delivery
        self._known: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, i: int) -> Receipt: ...
    @overload
    def __getitem__(self, i: slice) -> list[Receipt]: ...
    def __getitem__(self, i: int | slice) -> Receipt | list[Receipt]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(i)
        return Receipt(self.first_seq + i, self._delivery, self._known)

    def __iter__(self) -> Iterator[Receipt]:
        for i in range(self.count):
            yield Receipt(self.first_seq + i, self._delivery, self._known)

    @property
    def seqs(self) -> range:
        return range(self.first_seq, self.first_seq + self.count)

    def wait(self, timeout: float | None = None) -> None:
        """Block until all are delivered; raise DeadLettered for the first dead one."""
        self.results(timeout)

    def results(self, timeout: float | None = None) -> list[Any]:
        """Block until all are delivered; their results in order (DeadLettered for a dead one)."""
        end = None if timeout is None else time.monotonic() + timeout
        out = []
        for r in self:
            out.append(r.wait(None if end is None else max(0.0, end - time.monotonic())))
        return out

    def __await__(self) -> Generator[Any, None, list[Any]]:
        """``await receipts``: ``results()`` without blocking the event loop."""
        return self._await().__await__()

    async def _await(self) -> list[Any]:
        return [await r for r in self]

    def __repr__(self) -> str:
        return f"Receipts(first_seq={self.first_seq}, count={self.count})"


class DurableBatcher:
    """Acknowledge items only once fsync'd; batch them to ``sink``; replay on open.

    ``sink`` is a callable ``fn(batch)``, an object with ``write(batch)`` (and
    optionally ``close()``), or a URL: ``sqlite:///out.db?table=items``,
    ``file:///abs/out.jsonl``, ``module:function``. ``None`` makes a writer
    only: items are acknowledged and stay in the log until a batcher with a
    sink (or ``walbatch replay``) opens it. Options are keyword arguments
    (see ``walbatch.Options`` for each one and its default).
    """

    def __init__(self, directory: str | os.PathLike[str], sink: Any, *,
                 _fs: FileSystem | None = None, **options: Any) -> None:
        unknown = set(options) - set(Options.names())
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}; "
                            f"valid options: {', '.join(Options.names())}")
        self.options = opts = Options(**options)
        self.directory = os.path.abspath(os.fspath(directory))
        if opts.strict_modes:
            check_private(self.directory)
        self._sink = None if sink is None else resolve_sink(sink)
        try:
            self._log = Log.open(self.directory, fs=_fs, segment_bytes=opts.segment_bytes,
                                 on_corruption=opts.on_corruption,
                                 role="owner" if self._sink is not None else "writer")
        except BaseException:
            close_sink(self._sink)  # e.g. the SQLite connection of a sink URL
            raise
        self._initial_checkpoint = self._log.checkpoint
        self._backlog_at_open = self._log.synced_seq - self._log.checkpoint.seq
        try:
            self._delivery = Delivery(self._log, self._sink, opts)
            self._committer = GroupCommitter(self._log, self._delivery.flusher.on_durable,
                                             opts.max_group_bytes, self._delivery.observers)
        except BaseException:
            close_sink(self._sink)
            self._log.close()
            raise
        self.dead_letters: DeadLetterStore = self._delivery.dead_letters
        """The log's dead-letter store (``dead_letters.requeue(batcher.submit_many)``)."""
        self.observers: Observers = self._delivery.observers
        """Hooks on the data path (walbatch.observer): ``observers.add(obs)``."""
        self.state_log: StateLog = self._delivery.state_log
        """The observer that logs each state change and knows since when the sink fails."""
        self._room = threading.Condition(threading.Lock())
        self._closing = False
        self._close_lock = threading.Lock()
        self._closed = threading.Event()
        self._completed_at_close = 0
        self._aio_pool: ThreadPoolExecutor | None = None
        self._aio_state: weakref.WeakKeyDictionary[Any, _AioQueue] = weakref.WeakKeyDictionary()
        self._delivery.on_space = self._notify_room
        self._delivery.start()

    def _notify_room(self) -> None:
        with self._room:
            self._room.notify_all()

    # ------------------------------------------------------------ identity

    @property
    def log_id(self) -> str:
        return str(self._log.log_id)

    @property
    def sink(self) -> Any:
        """The sink items are delivered to (the object a URL was resolved to); None for a writer."""
        return self._sink

    @property
    def initial_checkpoint(self) -> Checkpoint:
        """The checkpoint found at open: what was delivered before this batcher started."""
        return self._initial_checkpoint

    @property
    def backlog_at_open(self) -> int:
        """How many acknowledged items were waiting for delivery when the log was opened."""
        return self._backlog_at_open

    # -------------------------------------------------------------- submit

    def submit(self, item: Any, key: str | int | bytes | None = None) -> Receipt:
        """Durably append one item; return once it is fsync'd.

        ``key`` (a str, int or bytes) puts the item in that key's batches: a
        batch never mixes keys, and each key's batches reach the sink in order.

        Raises TypeError (nothing written) for an item msgpack cannot encode,
        LogFull when the log stays full for ``submit_timeout``, Closed after
        close(), LogFailed/LogWriteError when the disk fails.
        """
        data = _encode(item) if key is None else _encode_keyed(item, key)
        _check_frame_size(len(data))
        self._wait_for_room(len(data))
        seq = self._committer.commit(data, 1)
        self.observers.submitted(seq, 1)
        return Receipt(seq, self._delivery)

    def submit_many(self, items: Iterable[Any], key: str | int | bytes | None = None) -> Receipts:
        """Durably append all ``items`` in one write and one fsync (all under ``key``).

        All or nothing: if any item cannot be encoded, nothing is written.
        """
        payload, count = _encode_many(items, key)
        if count == 0:
            if self._closing:
                raise Closed("the batcher is closed")
            return Receipts(self._log.synced_seq + 1, 0, self._delivery)
        _check_frame_size(len(payload))
        self._wait_for_room(len(payload))
        first = self._committer.commit(payload, count)
        self.observers.submitted(first, count)
        return Receipts(first, count, self._delivery)

    def _commit_payload(self, payload: bytes, count: int, decoded: list[Any] | None = None) -> int:
        self._wait_for_room(len(payload))
        return self._committer.commit(payload, count, decoded)

    async def asubmit(self, item: Any, key: str | int | bytes | None = None) -> Receipt:
        """``submit`` for asyncio: same promise, without blocking the event loop.

        Items submitted from one event loop while a commit is running are
        committed together by a helper thread. If the awaiting task is
        cancelled the item may still have been acknowledged.
        """
        receipt: Receipt = await self._asubmit_future(item, key)
        self.observers.submitted(receipt.seq, 1)  # in the caller's task: its trace context
        return receipt

    async def asubmit_many(self, items: Iterable[Any],
                           key: str | int | bytes | None = None) -> Receipts:
        """``submit_many`` for asyncio: all or nothing, one frame with its group."""
        receipts: Receipts = await self._asubmit_many_future(items, key)
        self.observers.submitted(receipts.first_seq, receipts.count)
        return receipts

    def _asubmit_future(self, item: Any, key: str | int | bytes | None = None
                        ) -> asyncio.Future[Receipt]:
        """The synchronous half of ``asubmit``: encode and queue; the future gets the receipt.

        For callers that serve many submits on one loop (the daemon) and cannot afford
        a task per item; they call ``observers.submitted`` themselves.
        """
        data = _encode(item) if key is None else _encode_keyed(item, key)
        _check_frame_size(len(data))
        return self._aio_enqueue(data, 1, False)

    def _asubmit_payload_future(self, payload: bytes, items: list[Any]) -> asyncio.Future[Receipts]:
        """``_asubmit_many_future(items)`` for items that arrived encoded: ``payload`` is
        their msgpack encodings back to back, exactly what the log holds (the daemon
        reads them off a frame), so they are not encoded again."""
        if not items or values.has_ext_87(payload):  # the slow way refuses, naming the item
            return self._asubmit_many_future(items)
        _check_frame_size(len(payload))
        # The items were decoded from those bytes by the log's own decoder and belong
        # to nobody else: delivery takes them as they are instead of decoding again.
        return self._aio_enqueue(payload, len(items), True, items)

    async def _asubmit_many_owned(self, items: list[Any]) -> Receipts:
        """``asubmit_many`` of items nobody else holds, as the log will read them back.

        For items just parsed from a request (HTTP's JSON: dicts with str keys, lists,
        str, int, float, bool, None, all of which msgpack gives back as they are):
        delivery takes these objects instead of decoding the log's bytes again.
        """
        receipts: Receipts = await self._asubmit_many_future(items, owned=True)
        self.observers.submitted(receipts.first_seq, receipts.count)
        return receipts

    def _asubmit_many_future(self, items: Iterable[Any], key: str | int | bytes | None = None,
                             owned: bool = False) -> asyncio.Future[Receipts]:
        """The synchronous half of ``asubmit_many`` (see ``_asubmit_future``)."""
        payload, count = _encode_many(items, key)
        if count == 0:
            if self._closing:
                raise Closed("the batcher is closed")
            fut: asyncio.Future[Receipts] = asyncio.get_running_loop().create_future()
            fut.set_result(Receipts(self._log.synced_seq + 1, 0, self._delivery))
            return fut
        _check_frame_size(len(payload))
        handed = items if owned and key is None and type(items) is list else None
        return self._aio_enqueue(payload, count, True, handed)

    def _aio_enqueue(self, payload: bytes, count: int, many: bool,
                     decoded: list[Any] | None = None) -> asyncio.Future[Any]:
        """Queue a payload for this loop's next group commit; the future gets its receipt(s).

        A plain function returning the future, not a coroutine: one coroutine per
        asubmit is already the largest cost on that path.
        """
        if self._closing:
            raise Closed("the batcher is closed; the item was not written")
        loop = asyncio.get_running_loop()
        q = self._aio_state.get(loop) or self._aio_queue(loop)
        fut = loop.create_future()
        q.entries.append((payload, count, fut, many, decoded))
        if not q.running:
            q.running = True
            loop.create_task(self._aio_drain(loop, q))
        return fut

    def _aio_queue(self, loop: asyncio.AbstractEventLoop) -> _AioQueue:
        q = self._aio_state[loop] = _AioQueue()
        return q

    def _aio_executor(self) -> ThreadPoolExecutor:
        if self._aio_pool is None:
            with self._close_lock:
                if self._aio_pool is None:
                    self._aio_pool = ThreadPoolExecutor(4, thread_name_prefix="walbatch-aio")
        return self._aio_pool

    async def _aio_drain(self, loop: asyncio.AbstractEventLoop, q: _AioQueue) -> None:
        """Commit what is queued from this loop in groups, until the queue is empty.

        A group stops at ``max_group_bytes`` (and a quarter of the log quota), as the
        group committer's do: a whole loop's queue in one payload could exceed the
        quota and be refused as an item that "can never fit".
        """
        pool = self._aio_executor()
        delivery = self._delivery
        limit = max(1, min(self.options.max_group_bytes, self.options.max_log_bytes // 4))
        try:
            while q.entries:
                k, size = 0, 0
                for e in q.entries:
                    size += len(e[0])
                    if k and size > limit:
                        break
                    k += 1
                entries, q.entries = q.entries[:k], q.entries[k:]
                payload = entries[0][0] if len(entries) == 1 else b"".join(e[0] for e in entries)
                total = sum(e[1] for e in entries)
                decoded = join_decoded([e[4] for e in entries])
                try:
                    first = await loop.run_in_executor(pool, self._commit_payload, payload, total,
                                                       decoded)
                except BaseException as ex:
                    for e in entries:
                        if not e[2].done():
                            e[2].set_exception(ex)
                    continue
                seq = first
                for _payload, count, fut, many, _decoded in entries:
                    if not fut.done():
                        fut.set_result(Receipts(seq, count, delivery) if many else Receipt(seq, delivery))
                    seq += count
        finally:
            q.running = False

    def _wait_for_room(self, nbytes: int) -> None:
        opts = self.options
        # Count the frame header and a possible new segment's header too.
        nbytes += FRAME_HEADER_SIZE + HEADER_SIZE
        if self._log.total_bytes + nbytes <= opts.max_log_bytes:
            return
        if nbytes > opts.max_log_bytes:
            raise LogFull(f"an item of {nbytes} bytes can never fit in max_log_bytes="
                          f"{opts.max_log_bytes}; nothing was written")
        deadline = time.monotonic() + opts.submit_timeout
        self.observers.log_full(self._log.total_bytes, opts.max_log_bytes)
        while self._log.total_bytes + nbytes > opts.max_log_bytes:
            if self._sink is None:
                self._log.reconcile()  # a follower may have delivered and deleted segments
                if self._log.total_bytes + nbytes <= opts.max_log_bytes:
                    break
            elif (self._log.checkpoint.seq >= self._log.synced_seq
                  and self._committer.exclusive(self._log.release_delivered)):
                # Everything was delivered and what filled the quota was the active
                # segment, which only an append would have sealed: freed now.
                continue
            if self._closing:
                raise Closed("the batcher is closed; the item was not written")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LogFull(
                    f"log is full ({self._log.total_bytes} of max_log_bytes="
                    f"{opts.max_log_bytes} bytes) and did not drain within "
                    f"submit_timeout={opts.submit_timeout}s; the item was not written"
                    + (f"; last sink error: {self._delivery.last_error}"
                       if self._delivery.last_error else "")
                )
            with self._room:
                self._room.wait(min(left, 0.05))

    # ------------------------------------------------------------- control

    def flush(self, timeout: float | None = None) -> None:
        """Deliver everything acknowledged so far (or dead-letter it) and checkpoint.

        Raises TimeoutError if that does not happen within ``timeout`` seconds
        (the items stay in the log), or the flusher's fatal error (CorruptLog).
        """
        if self._sink is None:
            raise Closed("this batcher has no sink (sink=None): it only writes the log")
        if self._delivery.in_sink():
            raise RuntimeError("flush() called from inside the sink would wait for itself")
        self._delivery.progress.flush(self._log.synced_seq, timeout)

    async def aflush(self, timeout: float | None = None) -> None:
        """``flush`` for asyncio: same result and errors, without holding a thread."""
        if self._sink is None:
            raise Closed("this batcher has no sink (sink=None): it only writes the log")
        if self._delivery.in_sink():
            raise RuntimeError("aflush() called from inside the sink would wait for itself")
        await self._delivery.progress.aflush(self._log.synced_seq, timeout)

    def stats(self) -> Stats:
        return self._delivery.stats(self._committer.groups)

    @property
    def broken(self) -> BaseException | None:
        """Why this batcher can take or deliver nothing more until reopened: the log
        failed (an fsync error) or delivery stopped (a corrupt log); None while it works."""
        failed = self._log.failed
        if failed is not None:
            return failed if isinstance(failed, LogFailed) else LogFailed(
                f"the log failed ({failed}) and refuses writes until it is reopened")
        return self._delivery.progress.fatal

    def close(self, timeout: float | None = None) -> None:
        """Stop intake, deliver what can be delivered within ``timeout``, close.

        What is not delivered by then stays in the log for the next open.
        Idempotent and safe from any thread, including from inside the sink.
        """
        timeout = self.options.close_timeout if timeout is None else timeout
        # inf would overflow the clock a deadline is kept on, NaN wait forever: close
        # must work whatever it is given, so clamp rather than raise.
        if timeout != timeout:  # NaN
            timeout = self.options.close_timeout
        timeout = min(float(timeout), 86400.0) if timeout >= 0 else 0.0
        with self._close_lock:
            first = not self._closing
            self._closing = True
        if first:
            self._committer.close()
            with self._room:
                self._room.notify_all()
            self._completed_at_close = _completed(self.stats())  # for the close summary
            self._delivery.stop(time.monotonic() + timeout)
        if self._delivery.in_sink():
            # Called from inside the sink: the flusher cannot wait for itself.
            threading.Thread(target=self._finish_after_exit, daemon=True).start()
            return
        if not self._delivery.wait_stopped(timeout + 5.0):
            log.error("walbatch: the sink did not return within the close timeout; "
                      "closing anyway (undelivered items stay in the log)")
        self._finish()

    def _finish_after_exit(self) -> None:
        self._delivery.flusher.exited.wait()
        self._finish()

    def _finish(self) -> None:
        with self._close_lock:
            if self._closed.is_set():
                return
            self._closed.set()
        end = self.stats()
        self.observers.closed(_completed(end) - self._completed_at_close, end.pending)
        if self._aio_pool is not None:
            self._aio_pool.shutdown(wait=False)
        self._delivery.close()
        self._log.close()

    @property
    def closed(self) -> bool:
        return self._closing

    def __enter__(self) -> DurableBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    async def __aenter__(self) -> DurableBatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"DurableBatcher({self.directory!r}, {self._sink!r})"


def _completed(s: Stats) -> int:
    return s.delivered + s.dead_lettered


class _AioQueue:
    __slots__ = ("entries", "running")

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, int, asyncio.Future[Any], bool, list[Any] | None]] = []
        self.running = False
