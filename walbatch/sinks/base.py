"""What a sink is, and the helpers every built-in sink shares.

This module knows no sink: the sinks import it, and ``registry`` maps URLs to them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ..record import Batch

Outcomes = Sequence[BaseException | None] | None


@runtime_checkable
class Sink(Protocol):
    """Anything with ``write(batch)``; ``close()`` is optional.

    ``write`` returns None when every record was taken, or one outcome per
    record: None for taken, an exception for that record's failure. Raising
    fails the whole batch (retried unless the error is permanent).
    """

    def write(self, batch: Batch) -> Outcomes: ...


class FunctionSink:
    """Adapts a plain callable ``fn(batch)`` to the Sink protocol."""

    def __init__(self, fn: Callable[[Batch], Outcomes]) -> None:
        self.fn = fn

    def write(self, batch: Batch) -> Outcomes:
        return self.fn(batch)

    def __repr__(self) -> str:
        return f"FunctionSink({getattr(self.fn, '__qualname__', self.fn)!r})"


def require(module: str, extra: str, sink: str) -> Any:
    """Import an optional driver, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as ex:
        raise ImportError(
            f"the {sink} sink needs the {module!r} package: pip install 'walbatch[{extra}]' "
            f"({ex})"
        ) from ex


def isolate(rows: list[tuple[int, Any]], store: Callable[[list[tuple[int, Any]]], None],
            about_rows: Callable[[BaseException], bool],
            refuse: Callable[[int, BaseException], None]) -> None:
    """Store ``(index, row)`` pairs, halving failing chunks until each bad row is alone.

    ``store`` must leave nothing behind when it raises (a savepoint). An error
    ``about_rows`` says is not about the rows (the connection, the database) is
    raised: the batch is retried whole. Each row that fails alone goes to
    ``refuse(index, error)``. The whole batch goes first, so a good one costs one call.
    """
    todo = [rows] if rows else []
    while todo:
        chunk = todo.pop()
        try:
            store(chunk)
        except Exception as ex:
            if not about_rows(ex):
                raise
            if len(chunk) == 1:
                refuse(chunk[0][0], ex)
                continue
            mid = len(chunk) // 2
            todo += [chunk[mid:], chunk[:mid]]  # the first half goes first, in batch order
