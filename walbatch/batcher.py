"""Batching policy: when does a batch close? No threads, no I/O, no clock.

The caller passes the time in, so the policy is tested by plain function calls.
A batch closes when it reaches ``max_items`` (reason ``size``), when the next
item would push it past ``max_bytes`` (``bytes``; an item larger than
``max_bytes`` travels alone), or ``max_delay`` seconds after its *first* item
arrived (``time``); the caller can also close it for ``flush``, ``shutdown`` or
``replay``.

Keyed batching (``KeyedPolicies``) keeps one such policy per key, so a batch
never mixes keys and each key has its own size, byte and time triggers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

REASONS = ("size", "bytes", "time", "flush", "shutdown", "replay", "keys")


@dataclass(slots=True)
class ClosedBatch(Generic[T]):
    items: list[T]
    nbytes: int
    reason: str
    key: Any = None


@dataclass(slots=True)
class BatchPolicy(Generic[T]):
    max_items: int = 500
    max_bytes: int = 1 << 20
    max_delay: float = 0.2
    key: Any = None
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

    def set_max_items(self, n: int) -> ClosedBatch[T] | None:
        """Change the size trigger (adaptive batching); close the open batch if it is now full."""
        self.max_items = max(1, n)
        if len(self._items) >= self.max_items:
            return self._close("size")
        return None

    def _close(self, reason: str) -> ClosedBatch[Any]:
        batch = ClosedBatch(self._items, self._bytes, reason, self.key)
        self._items = []
        self._bytes = 0
        self._started = None
        return batch


class KeyedPolicies(Generic[T]):
    """One BatchPolicy per key, created on a key's first item, dropped when it closes.

    At most ``max_keys`` keyed batches are open at once: a new key past that
    closes the oldest open batch first (reason ``keys``), which bounds memory
    and how long a rarely-seen key can hold back the checkpoint.
    """

    def __init__(self, max_items: int, max_bytes: int, max_delay: float, max_keys: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self.max_keys = max_keys
        self._open: dict[Any, BatchPolicy[T]] = {}  # insertion order = oldest first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def keys_open(self) -> int:
        return len(self._open)

    def add(self, key: Any, item: T, size: int, now: float) -> list[ClosedBatch[T]]:
        out: list[ClosedBatch[T]] = []
        policy = self._open.get(key)
        if policy is None:
            if len(self._open) >= self.max_keys:
                out.append(self._pop(next(iter(self._open)), "keys"))
            policy = self._open[key] = BatchPolicy(self.max_items, self.max_bytes, self.max_delay,
                                                   key=key)
        closed_now = policy.add(item, size, now)
        self._count += 1
        for c in closed_now:
            self._count -= len(c.items)
        out.extend(closed_now)
        if not len(policy):
            del self._open[key]
        return out

    def deadline(self) -> float | None:
        due = [d for p in self._open.values() if (d := p.deadline()) is not None]
        return min(due) if due else None

    def poll(self, now: float) -> list[ClosedBatch[T]]:
        """Close every keyed batch whose time is up."""
        due = [k for k, p in self._open.items() if (d := p.deadline()) is not None and now >= d]
        return [self._pop(key, "time") for key in due]

    def _pop(self, key: Any, reason: str) -> ClosedBatch[T]:
        """Close an open keyed batch (never empty: empty ones are dropped at once)."""
        closed = self._open.pop(key).take(reason)
        assert closed is not None
        self._count -= len(closed.items)
        return closed

    def take_all(self, reason: str) -> list[ClosedBatch[T]]:
        """Close every open keyed batch now (flush, shutdown, replay), oldest first."""
        out = [c for p in self._open.values() if (c := p.take(reason)) is not None]
        self._open.clear()
        self._count = 0
        return out

    def set_max_items(self, n: int) -> list[ClosedBatch[T]]:
        self.max_items = max(1, n)
        out = []
        for key in list(self._open):
            closed = self._open[key].set_max_items(n)
            if closed is not None:
                self._count -= len(closed.items)
                del self._open[key]
                out.append(closed)
        return out


class AdaptiveLimit:
    """Adaptive batching: the size trigger follows how the sink copes.

    It grows by half while batches close full and deliveries are fast, and halves
    on a sink error or a delivery slower than ``target_latency``, always within
    ``min_items..max_items``. The caller reports each delivery with ``answered``
    and applies ``wanted`` to its policies (callers hold their own lock).
    """

    def __init__(self, min_items: int, max_items: int, target_latency: float) -> None:
        self.min_items = min_items
        self.max_items = max_items
        self.target_latency = target_latency
        self.limit = max(1, min(max_items, min_items))
        self.wanted: int | None = self.limit
        """A new limit not yet applied to the policies (None: nothing to apply)."""

    def answered(self, ok: bool, latency: float | None, full: bool) -> bool:
        """Record one delivery; True if the limit changed."""
        limit = self.limit
        if not ok or (latency is not None and latency > self.target_latency):
            new = max(self.min_items, limit // 2)
        elif full:
            new = min(self.max_items, max(limit + 1, limit * 3 // 2))
        else:
            return False
        if new == limit:
            return False
        self.limit = self.wanted = new
        return True

    def take_wanted(self) -> int | None:
        n, self.wanted = self.wanted, None
        return n
