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
    (size, bytes, time, flush, shutdown, replay, keys); ``attempt`` counts
    deliveries of this batch (1 on the first try); ``key`` is the batching key
    shared by every record (None for unkeyed items).

    ``first_seq``/``last_seq`` span every record the batch stands for: with a
    ``combine`` hook some of them were merged away and are not in the list, but
    they are delivered with it, so a sink that derives an idempotency key from a
    batch should use this range. ``coalesced`` counts the merged-away records.
    ``covers`` lists the runs ``(first, last)`` of exactly the seqs the batch
    stands for (a keyed batch's seqs interleave with other keys'); empty when
    they are simply the records' own seqs.
    """

    __slots__ = ("log_id", "reason", "attempt", "key", "first_seq", "last_seq", "coalesced",
                 "covers")

    def __init__(self, records: list[Record], log_id: str, reason: str, attempt: int = 1,
                 key: Any = None, first_seq: int | None = None, last_seq: int | None = None,
                 coalesced: int = 0, covers: list[tuple[int, int]] | None = None) -> None:
        super().__init__(records)
        self.log_id = log_id
        self.reason = reason
        self.attempt = attempt
        self.key = key
        self.first_seq = first_seq if first_seq is not None else (records[0].seq if records else 0)
        self.last_seq = last_seq if last_seq is not None else (records[-1].seq if records else 0)
        self.coalesced = coalesced
        self.covers = covers or []
