"""Ready-made ``combine`` hooks (coalescing): fewer records, same meaning."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from .record import Batch, Record


def last_by(field: str | Callable[[Any], Hashable]) -> Callable[[Batch], list[Record]]:
    """Keep only the last record for each value of ``field`` (a dict key or a function).

    ``combine=last_by("user_id")`` turns a batch of activity updates into one
    update per user, in seq order of their last appearance. Items that are not
    dicts, or lack the field, are all kept.
    """
    get: Callable[[Any], Hashable] = field if callable(field) else (  # type: ignore[assignment]
        lambda item: item[field])

    def combine(batch: Batch) -> list[Record]:
        last: dict[Any, Record] = {}
        keep: list[Record] = []
        for rec in batch:
            try:
                k = get(rec.item)
                hash(k)
            except (KeyError, TypeError, IndexError):
                keep.append(rec)
                continue
            last[k] = rec
        keep.extend(last.values())
        keep.sort(key=lambda r: r.seq)
        return keep

    combine.__qualname__ = f"last_by({field!r})"
    return combine
