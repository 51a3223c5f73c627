"""File sink: appends one JSON line per item and fsyncs each batch.

A line is ``{"log_id":"...","seq":N,"item":ITEM}`` (and ``"key":KEY`` for an item
submitted with a key), ITEM and KEY written under walbatch's value mapping
(walbatch.values, docs/values.md): ``values.loads(line)["item"]`` reads the item back
equal, and ``read(path)`` reads a whole file.

At-least-once: after a crash a batch may be appended again. Every line carries its
identity, so a reader keeps the first line per (log_id, seq); ``read`` does.

A write that fails (a full disk) is cut back to where the batch began before the
error is raised, and a file whose last line was cut short (a power loss mid-write)
gets a newline before anything is appended: a damaged line never swallows the next.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import PermanentSinkError, SinkError
from ..record import Batch
from ..values import dumps, dumps_many, loads
from .urls import URLOptions


class FileSink:
    def __init__(self, path: str) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"file sink: directory {parent!r} does not exist; create it first "
                             "(the sink makes the file, not directories)")
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._end_last_line()
        except BaseException:
            os.close(self._fd)
            raise

    def _end_last_line(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            last = f.read(1)
        if last != b"\n":
            self._append(b"\n", size)

    def write(self, batch: Batch) -> list[BaseException | None] | None:
        lines: list[str] = []
        outcomes: list[BaseException | None] = []
        head = '{"log_id":' + dumps(batch.log_id) + ',"seq":'
        key = getattr(batch, "key", None)
        try:
            tail = "}\n" if key is None else ',"key":' + dumps(key, "key") + "}\n"
        except (TypeError, ValueError) as ex:
            raise PermanentSinkError(f"file sink: the batch's key has no JSON form: {ex}") from None
        texts = dumps_many([r.item for r in batch])
        if texts is not None:  # every item plain: no per-item checks or outcomes
            data = "".join([f"{head}{r.seq},\"item\":{t}{tail}"
                            for r, t in zip(batch, texts, strict=True)])
            self._append(data.encode("utf-8"), os.fstat(self._fd).st_size)
            return None
        for r in batch:
            try:
                lines.append(f"{head}{r.seq},\"item\":{dumps(r.item)}{tail}")
            except (TypeError, ValueError) as ex:
                outcomes.append(PermanentSinkError(f"seq {r.seq}: the file sink cannot write the "
                                                   f"item: {ex}"))
                continue
            outcomes.append(None)
        if lines:
            self._append("".join(lines).encode("utf-8"), os.fstat(self._fd).st_size)
        return outcomes

    def _append(self, data: bytes, start: int) -> None:
        """Append ``data`` and fsync; on failure cut the file back to ``start`` and raise."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as ex:
            try:
                os.ftruncate(self._fd, start)
                os.fsync(self._fd)
            except OSError:
                pass  # the next open ends the damaged line with a newline
            raise SinkError(f"file sink {self.path}: {ex.strerror or ex}") from ex

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"FileSink({self.path!r})"


def read(path: str, *, strict: bool = True) -> Iterator[dict[str, Any]]:
    """The entries of a file the sink wrote, decoded, the first line per (log_id, seq).

    Each entry is ``{"log_id": str, "seq": int, "item": ...}`` (plus ``"key"``). A line
    that is not an entry (cut short by a power loss or a full disk, so never
    acknowledged by the sink and written again later) raises ValueError naming it,
    unless ``strict=False`` skips it.
    """
    seen: set[tuple[str, int]] = set()
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                entry = loads(line)
                identity = (entry["log_id"], entry["seq"])
                entry["item"]  # noqa: B018 - present, or the line is not an entry
            except (ValueError, TypeError, KeyError) as ex:
                if not line.strip() or not strict:
                    continue
                raise ValueError(f"{path} line {n} is not an entry of the file sink: {ex}") from None
            if identity not in seen:
                seen.add(identity)
                yield entry


def from_url(url: str) -> FileSink:
    """``file:///ABSOLUTE/PATH.jsonl`` (RFC 8089: ``file://localhost/...`` works too)."""
    URLOptions(url, "file", ())
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"file sink URL {url.split('?')[0]!r}: {parts.netloc!r} is read as a host name; "
            "write the absolute path after three slashes: file:///ABSOLUTE/PATH.jsonl")
    path = unquote(parts.path)
    if not path.startswith("/") or path == "/":
        raise ValueError(f"file sink URL {url.split('?')[0]!r}: expected file:///ABSOLUTE/PATH.jsonl")
    return FileSink(path)
