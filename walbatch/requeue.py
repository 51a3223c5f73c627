"""Requeue the dead letters of a data directory, whoever has the log open.

A log has one writer. If it is running (``LOCK`` is held), the dead letters
go back in through that writer: the daemon's socket, with each item's key. If
nobody is, a short-lived ``DurableBatcher`` writes them into the log itself,
and the next ``serve`` or ``replay`` delivers them (or this one, given a sink).
Either way ``DeadLetterStore.requeue`` does the work with a submit function,
so both paths submit the same items with the same keys.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .dlq import DeadLetterStore
from .durable import DurableBatcher
from .errors import WalbatchError
from .fileio import OsFileSystem
from .lock import is_locked

SOCKET_FILE = "walbatch.sock"


def writer_running(data_dir: str) -> bool:
    """True if a process holds the log's writer lock (a daemon or an embedded batcher)."""
    return is_locked(OsFileSystem(), os.path.abspath(data_dir))


def requeue(data_dir: str | os.PathLike[str], seqs: Sequence[int] | None = None, *,
            socket_path: str | None = None, sink: Any = None) -> int:
    """Submit the dead letters (all, or those with ``seqs``) again; return how many.

    With a writer running, through its socket (``socket_path``, default
    ``DATA_DIR/walbatch.sock``); otherwise directly into the log, delivered by
    ``sink`` if one is given, else by the next open with a sink.
    """
    data_dir = os.fspath(data_dir)
    if not writer_running(data_dir):
        with DurableBatcher(data_dir, sink) as b:
            return b.dead_letters.requeue(b.submit_many, seqs)
    from .client import Client

    sock = socket_path or os.path.join(data_dir, SOCKET_FILE)
    store = DeadLetterStore.for_dir(data_dir)
    try:
        client = Client(sock, connect_timeout=2)
        try:
            client.ping()
        except (OSError, WalbatchError) as ex:
            client.close()
            raise WalbatchError(
                f"the log in {data_dir} is open in another process and no daemon answers at "
                f"{sock} ({ex}); requeue from inside that process with "
                "batcher.dead_letters.requeue(batcher.submit_many), or stop it first") from None
        with client:
            return store.requeue(client.submit_many, seqs)
    finally:
        store.close()
