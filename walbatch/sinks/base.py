"""What a sink is, and how a sink URL or callable becomes one."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

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


def _query(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def _path_of(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``."""
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    if not path:
        raise ValueError(f"sink URL {url!r} has no path")
    return path[1:] if path.startswith("/") else path


def _only(url: str, query: dict[str, str], allowed: tuple[str, ...]) -> None:
    # A misspelt option must not quietly become the default (rows in another table).
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ValueError(f"sink URL {_redacted(url)!r}: unknown option {unknown[0]!r}; "
                         f"valid: {', '.join(allowed) or 'none'}")


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


def resolve_sink(spec: Any) -> Any:
    """A sink object from a URL string, a callable, or an object with ``write``."""
    if isinstance(spec, str):
        return sink_from_url(spec)
    if hasattr(spec, "write") and callable(spec.write):
        return spec
    if callable(spec):
        return FunctionSink(spec)
    raise TypeError(
        f"sink must be a URL string, a callable taking a batch, or an object with "
        f"write(batch); got {type(spec).__name__}"
    )


def _redacted(url: str) -> str:
    """The URL without credentials or query (both may hold secrets), for error messages."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme and parts.netloc else url.split("?")[0]


def sink_from_url(url: str) -> Any:
    """Build a built-in sink from its URL (see docs/sinks.md)."""
    scheme = urlsplit(url).scheme
    q = _query(url)
    if scheme == "sqlite":
        from .sqlite import SQLiteSink

        _only(url, q, ("table",))
        return SQLiteSink(_path_of(url), table=q.get("table", "items"))
    if scheme == "file":
        from .file import FileSink

        # RFC 8089: file:///abs/path is absolute; file:rel/path is relative.
        parts = urlsplit(url)
        path = parts.netloc + parts.path
        if not path:
            raise ValueError(f"sink URL {url!r} has no path")
        _only(url, q, ())
        return FileSink(path)
    if scheme in ("postgresql", "postgres"):
        from .postgresql import from_url as postgresql_from_url

        return postgresql_from_url(url)
    if scheme in ("nats", "tls"):
        from .nats import from_url as nats_from_url

        return nats_from_url(url)
    if scheme in ("http", "https"):
        from .http import from_url as http_from_url

        return http_from_url(url)
    if ":" in url and "/" not in url.split(":", 1)[0]:
        module, _, attr = url.partition(":")
        if module and attr.isidentifier() and all(p.isidentifier() for p in module.split(".")):
            fn = getattr(importlib.import_module(module), attr)
            return resolve_sink(fn)
    raise ValueError(
        f"unknown sink {_redacted(url)!r}: expected sqlite:///PATH.db, file:///ABS/PATH.jsonl, "
        "postgresql://..., nats://..., http(s)://... or module:function"
    )
