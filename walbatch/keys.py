"""Keyed items: how ``submit(item, key=...)`` is written to the log and read back.

A keyed item is stored as one msgpack extension value (type ``KEY_EXT``) whose
data is the key's encoding followed by the item's. Unkeyed items are stored
exactly as before, so keys cost nothing to those who do not use them, and a
log written before keys existed reads the same. The extension code is reserved:
a foreign ``msgpack.ExtType`` with this code that does not parse as a key and
an item is passed through unchanged (see docs/format.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from .codec import unpack_values

KEY_EXT = 87  # "W"
MAX_KEY_BYTES = 1024


class Keyed(NamedTuple):
    """An item and its batching key, as decoded from the log."""

    key: str | int | bytes
    item: Any


def check_key(key: Any) -> None:
    """Refuse keys that cannot work as a batching key, before anything is written."""
    if isinstance(key, bool) or not isinstance(key, (str, int, bytes)):
        raise TypeError(f"key must be a str, int or bytes, not {type(key).__name__}")
    if isinstance(key, int) and not -(1 << 63) <= key < (1 << 64):
        raise ValueError(f"key {key} does not fit in 64 bits")
    if isinstance(key, str):
        try:
            size = len(key.encode())
        except UnicodeEncodeError:
            raise ValueError("key is not valid text (it holds a lone surrogate)") from None
    else:
        size = len(key) if isinstance(key, bytes) else 0
    if size > MAX_KEY_BYTES:
        raise ValueError(f"key is {size} bytes long; the limit is {MAX_KEY_BYTES}")


def wrap(key_bytes: bytes, item_bytes: bytes) -> msgpack.ExtType:
    """The extension value standing for a keyed item, from both encodings."""
    return msgpack.ExtType(KEY_EXT, key_bytes + item_bytes)


# ext 8 headers (0xc7, length, type) by length: wrap_many writes every keyed item with
# one of these (or ext 16/32), where msgpack would pick fixext for 1, 2, 4, 8 or 16 bytes;
# both are valid msgpack and read back the same.
_EXT8 = [bytes((0xC7, n, KEY_EXT)) for n in range(256)]


def _ext_header(n: int) -> bytes:
    if n < 256:
        return _EXT8[n]
    if n < 65536:
        return b"\xc8" + n.to_bytes(2, "big") + bytes((KEY_EXT,))
    return b"\xc9" + n.to_bytes(4, "big") + bytes((KEY_EXT,))


def wrap_many(key_bytes: bytes, item_bytes: list[bytes]) -> bytes:
    """Many keyed items under one key, packed and concatenated (a frame payload).

    What packing ``wrap(key_bytes, b)`` for each would give, without building an
    ExtType apiece: keyed submit_many was six times slower than unkeyed.
    """
    k = len(key_bytes)
    return b"".join([(_EXT8[k + len(b)] if k + len(b) < 256 else _ext_header(k + len(b)))
                     + key_bytes + b for b in item_bytes])


def ext_hook(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook``: keyed items become ``Keyed``; other extensions pass through."""
    if code != KEY_EXT:
        return msgpack.ExtType(code, data)
    try:
        values = unpack_values(data, ext_hook)
    except Exception:  # not ours (a foreign ExtType with our code): keep it as it came
        return msgpack.ExtType(code, data)
    if len(values) != 2 or isinstance(values[0], bool) or not isinstance(values[0], (str, int, bytes)):
        return msgpack.ExtType(code, data)
    return Keyed(values[0], values[1])
