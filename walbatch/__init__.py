"""walbatch: a durable, write-ahead-log-backed micro-batcher.

Submit items one at a time; each is fsync'd to an append-only segment log before
``submit`` returns, batched to a sink, and replayed after a crash.
"""

from . import combine
from .client import AsyncClient, Client
from .delivery import Stats
from .dlq import DeadLetter, DeadLetterStore
from .durable import DurableBatcher, Receipt, Receipts
from .errors import (
    Closed,
    CorruptLog,
    DeadLettered,
    LogFailed,
    LogFull,
    LogLocked,
    LogWriteError,
    PermanentSinkError,
    ResultDropped,
    SinkError,
    UnsafeDataDir,
    WalbatchError,
)
from .options import Options
from .record import Batch, Record
from .sinks.apply import ApplySink

__version__ = "0.1.0"

__all__ = [
    "ApplySink",
    "AsyncClient",
    "Batch",
    "Client",
    "Closed",
    "CorruptLog",
    "DeadLetter",
    "DeadLetterStore",
    "DeadLettered",
    "DurableBatcher",
    "LogFailed",
    "LogFull",
    "LogLocked",
    "LogWriteError",
    "Options",
    "PermanentSinkError",
    "Receipt",
    "Receipts",
    "ResultDropped",
    "Record",
    "SinkError",
    "Stats",
    "UnsafeDataDir",
    "WalbatchError",
    "__version__",
    "combine",
]
