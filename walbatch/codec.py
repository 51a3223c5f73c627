"""Reading items back from msgpack: the log, daemon frames and dead letters alike.

Everything ``submit`` accepts must read back, or an acknowledged item would stop
delivery as an "undecodable payload". One case needs help: a dict key that is a
tuple is written as a msgpack array, and msgpack reads arrays as lists, which
cannot be dict keys. Such payloads are read a second time with those keys turned
back into tuples; the fast path is untouched, so ordinary items pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

ExtHook = Callable[[int, bytes], Any]


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if type(value) is list else value


def _tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    return {_hashable(k): v for k, v in pairs}


def _unpacker(data: bytes | memoryview, ext_hook: ExtHook | None, tolerant: bool) -> msgpack.Unpacker:
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1 << 20),
        object_pairs_hook=_tuple_keys if tolerant else None, ext_hook=ext_hook or msgpack.ExtType,
    )
    unpacker.feed(data)
    return unpacker


def unpack_values(data: bytes | memoryview, ext_hook: ExtHook | None = None) -> list[Any]:
    """Every msgpack value in ``data``, in order (the items of a frame payload)."""
    try:
        return list(_unpacker(data, ext_hook, False))
    except TypeError:  # "unhashable type: 'list'": a tuple dict key
        return list(_unpacker(data, ext_hook, True))


def unpack_sized(data: bytes | memoryview, ext_hook: ExtHook | None = None) -> list[tuple[Any, int]]:
    """``(value, encoded size)`` for every msgpack value in ``data``.

    Raises ValueError (with how many values were read) when ``data`` is not a
    sequence of whole msgpack values.
    """
    try:
        return _sized(data, ext_hook, False)
    except TypeError:
        return _sized(data, ext_hook, True)


def _sized(data: bytes | memoryview, ext_hook: ExtHook | None, tolerant: bool) -> list[tuple[Any, int]]:
    unpacker = _unpacker(data, ext_hook, tolerant)
    out: list[tuple[Any, int]] = []
    prev = 0
    try:
        for value in unpacker:
            at = unpacker.tell()
            out.append((value, at - prev))
            prev = at
    except (ValueError, msgpack.UnpackException) as ex:  # ExtraData, FormatError, ...
        raise ValueError(f"undecodable payload after {len(out)} items: {ex}") from ex
    return out


def unpack_one(data: bytes, ext_hook: ExtHook | None = None) -> Any:
    """The single msgpack value ``data`` holds (msgpack.ExtraData if more follow)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=ext_hook or msgpack.ExtType)
    except TypeError:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=ext_hook or msgpack.ExtType,
                               object_pairs_hook=_tuple_keys)
