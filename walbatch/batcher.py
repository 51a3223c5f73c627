"""Batching policy: when does a batch close? No threads, no I/O, no clock.

The caller passes the time in, so the policy is tested by plain function calls.
A batch closes when it reaches ``max_items`` (reason ``size``), when the next
item would push it past ``max_bytes`` (``bytes``; an item larger than
``max_bytes`` travels alone), or ``max_delay`` seconds after its *first* item
arrived (``time``); the caller can also close it for ``flush``, ``shutdown`` or
``replay``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

REASONS = ("size", "bytes", "time", "flush", "shutdown", "replay")


@dataclass(slots=True)
class ClosedBatch(Generic[T]):
    items: list[T]
    nbytes: int
    reason: str


@dataclass(slots=True)
class BatchPolicy(Generic[T]):
    max_items: int = 500
    max_bytes: int = 1 << 20
    max_delay: float = 0.2
    _items: list[T] = field(default_factory=list)
    _bytes: int = 0
    _started: float | None = None

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {self.max_items}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {self.max_bytes}")
        if self.max_delay < 0:
            raise ValueError(f"max_delay must not be negative, not {self.max_delay}")

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, size: int, now: float) -> list[ClosedBatch[T]]:
        """Add one item; return the batches this closes (zero, one or two)."""
        out: list[ClosedBatch[T]] = []
        if self._items and self._bytes + size > self.max_bytes:
            out.append(self._close("bytes"))
        if not self._items:
            self._started = now
        self._items.append(item)
        self._bytes += size
        if len(self._items) >= self.max_items:
            out.append(self._close("size"))
        elif self._bytes >= self.max_bytes:
            out.append(self._close("bytes"))
        return out

    def add_bulk(self, items: list[T], nbytes: int, now: float) -> list[ClosedBatch[T]]:
        """Add several items at once (at most an upper bound of ``nbytes`` in all).

        The caller guarantees they fit: ``len(self) + len(items) <= max_items``
        and ``bytes + nbytes <= max_bytes``, unless the batch is empty. Returns
        the batch this closes, if it is now full.
        """
        if not items:
            return []
        if not self._items:
            self._started = now
        self._items.extend(items)
        self._bytes += nbytes
        if len(self._items) >= self.max_items:
            return [self._close("size")]
        if self._bytes >= self.max_bytes:
            return [self._close("bytes")]
        return []

    @property
    def nbytes(self) -> int:
        """Encoded bytes in the open batch (an upper bound after add_bulk)."""
        return self._bytes

    def deadline(self) -> float | None:
        """When the open batch must close on time, or None if there is none."""
        return None if self._started is None else self._started + self.max_delay

    def poll(self, now: float) -> ClosedBatch[T] | None:
        """Close the open batch if its time is up."""
        due = self.deadline()
        if due is not None and now >= due:
            return self._close("time")
        return None

    def take(self, reason: str) -> ClosedBatch[T] | None:
        """Close the open batch now, whatever its size, or None if it is empty."""
        return self._close(reason) if self._items else None

    def _close(self, reason: str) -> ClosedBatch[Any]:
        batch = ClosedBatch(self._items, self._bytes, reason)
        self._items = []
        self._bytes = 0
        self._started = None
        return batch
