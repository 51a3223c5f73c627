"""Concurrent submitters in an interleaving chosen by a seed, so a crash test replays exactly.

Threads that submit at once make commit groups with followers, which is what a
crash test must exercise, but the operating system interleaves them differently
on every run, and a failure found once would not come back. ``Scheduler`` takes
the interleaving away from the OS: its submitters (threads, and an asyncio loop
whose commits run on helper threads) only run when the driver lets them, and
the driver only acts once every one of them is *parked*: waiting for its next
call, stopped at a mutating operation of the simulated file system (its
``gate``), or blocked in the group committer waiting for its group's leader
(``walbatch.commit._allocate``, the committer's own seam for its wake locks).
Who wakes a parked thread marks it running first, so the driver never sees a
woken thread as parked. Every choice (who submits next, which operation goes
through, where the power fails) comes from the driver's seeded RNG.

Waiting for everyone to park polls with a deadline (``WAIT``): a deadline that
passes is a hang and fails the test; it never decides an outcome.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

import walbatch.commit

WAIT = 30.0


class Scheduler:
    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.cv = threading.Condition()
        self.tracked: set[threading.Thread] = set()
        """Threads whose state the driver waits on."""
        self.parked: dict[threading.Thread, str] = {}
        """Tracked threads that cannot move until someone wakes them, and where."""
        self.at_gate: dict[threading.Thread, tuple[str, str, threading.Event]] = {}
        self.most_waiting = 0
        """The most threads ever blocked in the group committer at once: from two on,
        a commit group with a follower formed."""
        self._old_allocate: Any = None

    # ------------------------------------------------------------ install

    def __enter__(self) -> Scheduler:
        self.fs.gate = self._gate
        self._old_allocate = walbatch.commit._allocate
        walbatch.commit._allocate = lambda: _WakeLock(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.fs.gate = None
        walbatch.commit._allocate = self._old_allocate
        with self.cv:
            for _t, (_op, _path, go) in list(self.at_gate.items()):
                go.set()  # nothing may stay stuck behind a test that failed
            self.at_gate.clear()

    # ------------------------------------------------------------ parking

    def track(self, thread: threading.Thread) -> None:
        with self.cv:
            self.tracked.add(thread)

    def untrack(self, thread: threading.Thread) -> None:
        with self.cv:
            self.tracked.discard(thread)
            self.parked.pop(thread, None)
            self.cv.notify_all()

    def park(self, where: str, thread: threading.Thread | None = None) -> None:
        with self.cv:
            self.parked[thread or threading.current_thread()] = where
            self.cv.notify_all()

    def unpark(self, thread: threading.Thread) -> None:
        """``thread`` is about to be woken: from now on it counts as running."""
        with self.cv:
            self.parked.pop(thread, None)

    def wait_parked(self) -> None:
        """Until every tracked thread is parked (a deadline that passes is a hang)."""
        deadline = time.monotonic() + WAIT
        with self.cv:
            while not self.tracked <= set(self.parked):
                left = deadline - time.monotonic()
                if left <= 0:
                    running = [t.name for t in self.tracked if t not in self.parked]
                    raise AssertionError(f"scheduler: threads never parked: {running}")
                self.cv.wait(min(left, 0.05))

    def _gate(self, op: str, path: str) -> None:
        me = threading.current_thread()
        with self.cv:
            if me not in self.tracked:
                return  # the main thread (recovery), the flusher: not scheduled here
            go = threading.Event()
            self.at_gate[me] = (op, path, go)
            self.parked[me] = f"gate {op} {path}"
            self.cv.notify_all()
        if not go.wait(WAIT * 4):
            raise AssertionError(f"scheduler: {me.name} was never let through {op} {path}")

    def gated(self) -> list[tuple[threading.Thread, str, str]]:
        with self.cv:
            return [(t, op, path) for t, (op, path, _go) in self.at_gate.items()]

    def release(self, thread: threading.Thread) -> None:
        """Let ``thread`` through the operation it is stopped at."""
        with self.cv:
            _op, _path, go = self.at_gate.pop(thread)
            self.parked.pop(thread, None)
        go.set()


class _WakeLock:
    """The group committer's wake lock, telling the scheduler who is blocked on it."""

    def __init__(self, sched: Scheduler) -> None:
        self._lock = threading.Lock()
        self._sched = sched
        self._waiter: threading.Thread | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        me = threading.current_thread()
        with self._sched.cv:
            self._waiter = me
            if me in self._sched.tracked:
                self._sched.parked[me] = "group commit"
                waiting = sum(1 for w in self._sched.parked.values() if w == "group commit")
                self._sched.most_waiting = max(self._sched.most_waiting, waiting)
                self._sched.cv.notify_all()
        return self._lock.acquire(True, timeout)

    def release(self) -> None:
        with self._sched.cv:
            if self._waiter is not None:
                self._sched.parked.pop(self._waiter, None)
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


# ------------------------------------------------------------------ actors


class ThreadSubmitter:
    """A thread that makes one call (``fn()``) each time the driver says ``go``."""

    def __init__(self, sched: Scheduler, name: str) -> None:
        self.sched = sched
        self._cmd: Callable[[], None] | None = None
        self._go = threading.Event()
        self._stop = False
        self.busy = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        sched.track(self.thread)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self.sched.park("idle")
            self._go.wait()
            self._go.clear()
            if self._stop:
                self.sched.untrack(self.thread)
                return
            cmd, self._cmd = self._cmd, None
            assert cmd is not None
            try:
                cmd()
            finally:
                self.busy = False

    def go(self, fn: Callable[[], None]) -> None:
        assert not self.busy
        self.busy = True
        self._cmd = fn
        self.sched.unpark(self.thread)
        self._go.set()

    def stop(self) -> None:
        self._stop = True
        self.sched.unpark(self.thread)
        self._go.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), f"{self.thread.name} did not stop"


class AsyncioSubmitter:
    """An asyncio event loop in its own thread; ``go(coro_fn)`` runs one round of tasks.

    The batcher's helper threads (``asubmit`` commits there) are this scheduler's:
    ``install(batcher)`` gives it an executor whose threads it tracks.
    """

    def __init__(self, sched: Scheduler, name: str) -> None:
        self.sched = sched
        self.busy = False
        self.loop = asyncio.SelectorEventLoop(_ParkingSelector(self))
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        sched.track(self.thread)
        self._ready = threading.Event()
        self.thread.start()
        self._ready.wait(WAIT)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        self.sched.untrack(self.thread)

    def install(self, batcher: Any) -> None:
        assert hasattr(batcher, "_aio_pool"), "DurableBatcher no longer has _aio_pool: update the scheduler"
        batcher._aio_pool = _Executor(self)

    def go(self, coro_fn: Callable[[], Any]) -> None:
        assert not self.busy
        self.busy = True

        async def round_() -> None:
            try:
                await coro_fn()
            finally:
                self.busy = False

        self.sched.unpark(self.thread)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(round_()))

    def stop(self) -> None:
        self.sched.unpark(self.thread)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), f"{self.thread.name} did not stop"
        self.loop.close()


class _ParkingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The loop's thread is parked while it waits with nothing ready and no timer."""

    def __init__(self, owner: AsyncioSubmitter) -> None:
        super().__init__()
        self.owner = owner

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            self.owner.sched.park("asyncio idle", self.owner.thread)
        return super().select(timeout)


class _Executor(concurrent.futures.Executor):
    """One tracked thread per call; it wakes the loop only after it counts as running."""

    def __init__(self, owner: AsyncioSubmitter) -> None:
        self.owner = owner
        self.n = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        sched = self.owner.sched

        def run() -> None:
            try:
                result = fn(*args, **kwargs)
            except BaseException as ex:  # noqa: BLE001 - handed to the awaiting task
                sched.unpark(self.owner.thread)
                fut.set_exception(ex)
            else:
                sched.unpark(self.owner.thread)
                fut.set_result(result)  # wakes the loop (call_soon_threadsafe)
            finally:
                sched.untrack(threading.current_thread())

        self.n += 1
        t = threading.Thread(target=run, name=f"{self.owner.thread.name}-commit{self.n}", daemon=True)
        sched.track(t)
        t.start()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass
