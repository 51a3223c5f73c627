"""Hypothesis strategies over every value the log gives a sink (docs/values.md).

``items()`` draws what msgpack holds and reads back: None, bool, ints from -2**63 to
2**64-1, every float (NaN with any payload, both infinities, -0.0), text with NUL and
tag-like or SQL-hostile names, bytes, lists, dicts with str, int, float, bool, None,
bytes, tuple and ExtType keys (colliding ones included), ExtType and Timestamp.

``WALBATCH_VALUE_EXAMPLES`` raises the example count of the property tests that use
``examples()`` (default modest, so the suite stays fast).
"""

from __future__ import annotations

import os
import struct

import msgpack
from hypothesis import strategies as st

from walbatch.codec import unpack_one


def examples(default: int) -> int:
    return int(os.environ.get("WALBATCH_VALUE_EXAMPLES", default))


# Names chosen to collide with what sinks treat specially: SQLite's row id aliases in
# any case, the identity columns, the JSON tags and their escapes, SQL and JSON-path
# syntax, NUL and control characters.
HOSTILE_NAMES = ["rowid", "ROWID", "oid", "Oid", "_rowid_", "_ROWID_", "_seq", "_SEQ", "_log_id",
                 "_LOG_ID", "item", "ITEM", "$base64", "$float", "$map", "$ext", "$timestamp",
                 "$", "$$", "$$base64", "", " ", "a\x00b", "\x00", 'q"uote', "back\\slash",
                 "new\nline", "a.b", "a[0]", "$.x", "sélect", "SELECT", "key", "log_id", "seq"]

names = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=8))


@st.composite
def floats(draw: st.DrawFn) -> float:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # any bit pattern: NaNs with payloads, subnormals, -0.0
        (v,) = struct.unpack(">d", draw(st.binary(min_size=8, max_size=8)))
        return v
    if kind == 1:
        return draw(st.sampled_from([0.0, -0.0, float("nan"), -float("nan"), float("inf"),
                                     -float("inf"), 1e16, -1e16, 1e300, 5e-324, 1e-5,
                                     9007199254740993.0, 1.0, 0.1]))
    return draw(st.floats(allow_nan=True, allow_infinity=True))


ints = st.one_of(st.integers(-(1 << 63), (1 << 64) - 1),
                 st.sampled_from([0, 1, -1, (1 << 53) + 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
                                  -(1 << 63)]))
texts = st.one_of(names, st.text())
exts = st.builds(msgpack.ExtType, st.integers(0, 127).filter(lambda c: c != 87), st.binary(max_size=8))
timestamps = st.builds(msgpack.Timestamp, st.integers(-(1 << 34), (1 << 34) - 1),
                       st.integers(0, 999_999_999))

scalars = st.one_of(st.none(), st.booleans(), ints, floats(), texts, st.binary(max_size=16), exts,
                    timestamps)
# Dict keys: anything hashable msgpack holds, including keys that collide with each
# other once written as JSON text (1, "1", 1.0, True).
keys = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, floats(), texts, st.binary(max_size=4), exts,
              st.sampled_from([1, "1", 1.0, True, "true", None, "null", 0, "0", -0.0])),
    lambda inner: st.tuples(inner, inner), max_leaves=3)


def _values(leaves: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(names, inner, max_size=4),
            st.dictionaries(keys, inner, max_size=4),
        ),
        max_leaves=12,
    )


def from_log(value: object) -> object:
    """The value as a sink gets it: packed at submit, read back from the log."""
    return unpack_one(msgpack.packb(value, use_bin_type=True))


def items() -> st.SearchStrategy:
    """Any item, as the sink receives it (after msgpack: tuples are lists, except in keys)."""
    return _values(scalars).map(from_log)


def dict_items() -> st.SearchStrategy:
    """Dict items with hostile str field names: what SQL sinks turn into rows."""
    return st.dictionaries(names, _values(scalars), min_size=1, max_size=6).map(from_log)


def deep(depth: int, leaf: object = 1) -> object:
    """A value nested ``depth`` levels: dicts with an int key inside lists."""
    v = leaf
    for i in range(depth):
        v = [v] if i % 2 else {i: v}
    return v
