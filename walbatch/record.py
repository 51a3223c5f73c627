"""What a sink receives: a ``Batch`` (a list) of ``Record(seq, item)``."""

from __future__ import annotations

from typing import Any, NamedTuple


class Record(NamedTuple):
    """One acknowledged item and its sequence number in the log.

    ``(batch.log_id, seq)`` is the item's stable identity: a redelivery after a
    crash carries the same pair, so a sink keyed on it drops duplicates.
    """

    seq: int
    item: Any


class Batch(list):  # type: ignore[type-arg]
    """A list of Records handed to ``sink.write``, with where it came from.

    ``log_id`` is the log's UUID as a string; ``reason`` why the batch closed
    (size, bytes, time, flush, shutdown, replay); ``attempt`` counts deliveries
    of this batch (1 on the first try).
    """

    __slots__ = ("log_id", "reason", "attempt")

    def __init__(self, records: list[Record], log_id: str, reason: str, attempt: int = 1) -> None:
        super().__init__(records)
        self.log_id = log_id
        self.reason = reason
        self.attempt = attempt
