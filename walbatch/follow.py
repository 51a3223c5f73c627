"""A standalone flusher for a log that another process writes (``walbatch replay --follow``).

The writer is a ``DurableBatcher(dir, None)`` (sink None: write only). It holds
``LOCK`` and publishes its last fsync'd position after every sync; the follower
holds ``FLUSH.LOCK``, wakes when that position moves (watchfiles, with a slow
poll as a safety net), and delivers exactly as an embedded batcher would:
same batching, retries, dead letters and checkpoint. It never reads past the
published position, so it never delivers a record that a power loss could
still take back.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .delivery import Delivery, Stats
from .errors import LogLocked
from .log import Log
from .options import Options
from .sinks import resolve_sink

log = logging.getLogger("walbatch")

_POLL = 1.0  # seconds between refreshes when no file event arrives


class Follower:
    def __init__(self, directory: str, sink: Any, **options: Any) -> None:
        self.options = opts = Options(**options)
        self._sink = resolve_sink(sink)
        # No writer running? Then recover the log as one would (trim a torn tail,
        # fsync what is there) and publish its position, so there is something to follow.
        try:
            Log.open(directory, segment_bytes=opts.segment_bytes, on_corruption=opts.on_corruption,
                     role="writer").close()
        except LogLocked:
            pass  # a writer is running and publishes as it goes
        self.log = Log.open(directory, segment_bytes=opts.segment_bytes,
                            on_corruption=opts.on_corruption, role="flusher")
        try:
            self.delivery = Delivery(self.log, self._sink, opts, follow=True)
        except BaseException:
            self.log.close()
            raise
        self.dead_letters = self.delivery.dead_letters
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="walbatch-follow", daemon=True)
        self._closed = False

    def start(self) -> None:
        self.delivery.start()
        self._watcher.start()

    def _watch(self) -> None:
        try:
            from watchfiles import watch

            for _changes in watch(self.log.directory, stop_event=self._stop, debounce=5, step=5,
                                  rust_timeout=int(_POLL * 1000), yield_on_timeout=True,
                                  recursive=True, raise_interrupt=False):
                self._refresh()
        except Exception:
            log.exception("walbatch: watching %s failed; polling instead", self.log.directory)
            while not self._stop.wait(_POLL / 10):
                self._refresh()

    def _refresh(self) -> None:
        try:
            if self.log.refresh():
                self.delivery.flusher.wake()
        except OSError as ex:
            log.warning("walbatch: refreshing %s failed: %s", self.log.directory, ex)

    def stats(self) -> Stats:
        return self.delivery.stats()

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is published (until ``timeout``), checkpoint, release the locks."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._refresh()
        self.delivery.stop(time.monotonic() + timeout)
        if self.delivery.flusher.thread.is_alive():
            self.delivery.wait_stopped(timeout + 5.0)
        self.delivery.close()
        self.log.close()

    def __enter__(self) -> Follower:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(self.options.close_timeout)
