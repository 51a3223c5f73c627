"""The value mapping: how an item becomes JSON in every JSON-bearing sink, and back.

The promise (docs/values.md is the reference): an item read from the log (any value
msgpack holds) is written as JSON text by ``dumps`` so that ``loads`` gives back a
value ``equal`` to it, and two different items never give the same text (the
mapping is injective). The file, HTTP and NATS (``encoding=json``) sinks, PostgreSQL
``jsonb`` and SQLite's ``item`` column all use this one encoder; nothing else in
walbatch writes items as JSON.

The format. Plain JSON for what JSON holds exactly; a *tag* for the rest. A tag is
an object with exactly one member whose name is one of::

    {"$base64": "AAE="}                  bytes (standard base64, padded)
    {"$float": "NaN"}                    NaN (any other NaN: "NaN:<16 hex digits of its bits>"),
    {"$float": "Infinity"}               also "-Infinity" and "-0.0"
    {"$map": [[key, value], ...]}        a dict with a key that is not a str
    {"$ext": [code, "<base64>"]}         msgpack.ExtType(code, data)
    {"$timestamp": [seconds, nanos]}     msgpack.Timestamp

A dict whose keys are all str is a JSON object, and a member name that starts with
``$`` is written with one more ``$`` in front (``{"$set": 1}`` is ``{"$$set": 1}``), so
user data never looks like a tag. An int is a JSON number, whatever its size. A
finite float is a JSON number that always reads back as a float: its shortest
``repr``, except that a float of magnitude 1e16 or more is written out in full with
``.0`` (``1e16`` is ``10000000000000000.0``), because PostgreSQL ``jsonb`` keeps the
digits of a number but not an exponent form's ``float``-ness. Strings are UTF-8 and
may hold any character but a lone surrogate (which msgpack refuses at submit anyway).

Warning: this is stored data. Changing what ``dumps`` writes for any value breaks
what users have stored; extend it only with new tags.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import json.encoder
import math
import re
import struct
from collections.abc import Iterable
from typing import Any

import msgpack

from .keys import KEY_EXT

__all__ = ["check", "dumps", "encode", "equal", "loads", "needs_check"]

TAGS = ("$base64", "$float", "$map", "$ext", "$timestamp")
_CANONICAL_NAN = 0x7FF8000000000000
_BIG = 1e16  # from here on, float.__repr__ uses an exponent
# The deepest nesting msgpack reads back (its unpacker's stack). msgpack *packs* a
# little deeper, which would put a record in the log that cannot be read: check()
# refuses it before it is written.
MSGPACK_DEPTH = 1024
# The most JSON arrays and objects around a value in the JSON form: Python's json
# module reads that (and an envelope around it) well inside its default recursion
# limit; SQLite's JSON functions take 2000 levels, PostgreSQL more. Deeper items are
# refused by the JSON-bearing sinks, alone.
MAX_DEPTH = 512


_MsgpackExt = msgpack.ExtType
_Timestamp = msgpack.Timestamp


class _Refused(Exception):
    """Raised deep inside a value; each enclosing container adds its step to ``path``."""

    def __init__(self, error: type[Exception], message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.path: list[Any] = []  # innermost step first

    def raise_for(self, name: str) -> None:
        where = name + "".join(f"[{step!r}]" for step in reversed(self.path))
        raise self.error(f"{where}: {self.message}") from None


class _NotPlain(Exception):
    """The C encoder met a value plain JSON does not hold: take the slow path."""


def _not_plain(value: Any) -> Any:
    raise _NotPlain


# -------------------------------------------------------------------- encoding

# The fast path: the C encoder writes plain JSON exactly as the mapping does, except
# where it converts silently (a non-str key becomes a str; -0.0 and exponent floats
# are written as such) or fails (NaN, Infinity, any type it does not know). Those
# are detected exactly (below) and written by the slow path instead.
_make = getattr(json.encoder, "c_make_encoder", None)
_c_encode = (_make(None, _not_plain, json.encoder.encode_basestring, None, ":", ",",
                   False, False, False) if _make is not None else None)
# Floats the C encoder writes in a form the mapping does not: "1e+16" and above,
# and "-0.0". A string holding such text only costs the slow path, never a wrong answer.
_SUSPECT = re.compile(r"e\+|-0\.0(?![0-9])")
_SCALARS = frozenset({str, int, float, bool, type(None)})
_CONTAINERS = (dict, list, tuple)


def _plain_keys(value: Any, deep: bool) -> bool:
    """Are all dict keys inside the container ``value`` str without a '$'?

    With ``deep``, also: is it nested at most MAX_DEPTH levels?
    """
    todo = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, dict):
            try:
                names = "\0".join(v)  # TypeError on a key that is not a str
            except TypeError:
                return False
            if "$" in names:  # conservative: any '$' sends the value the slow way
                return False
            children: Iterable[Any] = v.values()
        else:  # list or tuple
            children = v
        if deep and depth >= MAX_DEPTH:
            if any(isinstance(x, _CONTAINERS) for x in children):
                return False
            continue
        for x in children:
            if type(x) not in _SCALARS and isinstance(x, _CONTAINERS):
                todo.append((x, depth + 1))
    return True


def dumps(value: Any, name: str = "item") -> str:
    """The JSON text of ``value`` under the mapping (compact, not ASCII-escaped).

    Raises TypeError for a value that is not a msgpack value (naming where it is,
    e.g. ``item['at']``) and ValueError for one that cannot be text (a lone surrogate)
    or whose JSON is nested deeper than MAX_DEPTH levels.
    """
    if type(value) is str and value.isascii():
        return _str(value)
    if _c_encode is not None:
        try:
            text = "".join(_c_encode(value, 0))
        except (_NotPlain, ValueError, TypeError, RecursionError):
            pass
        else:
            if (not (("e+" in text or "-0.0" in text) and _SUSPECT.search(text))
                    # A text this short cannot nest MAX_DEPTH levels.
                    and (not isinstance(value, _CONTAINERS)
                         or _plain_keys(value, len(text) > 2 * MAX_DEPTH))
                    and (text.isascii() or _encodable(text))):
                return text
    out: list[str] = []
    try:
        _emit(value, out, 0)
    except _Refused as ex:
        ex.raise_for(name)
    except RecursionError:  # only when called with little stack left
        raise ValueError(f"{name}: nested too deeply to encode here") from None
    return "".join(out)


def dumps_many(items: list[Any]) -> list[str] | None:
    """``[dumps(x) for x in items]``, checked once for the whole list; None if any item
    needs the general encoder (or is refused): then call ``dumps`` per item.

    For sinks writing a batch: the fast path's exactness checks (no suspect float
    text, plain str keys, encodable text, bounded depth) run over the batch at once.
    """
    if _c_encode is None:
        return None
    try:
        texts = ["".join(_c_encode(v, 0)) for v in items]
    except (_NotPlain, ValueError, TypeError, RecursionError):
        return None
    joined = "\n".join(texts)
    if (("e+" in joined or "-0.0" in joined) and _SUSPECT.search(joined)) \
            or not (joined.isascii() or _encodable(joined)):
        return None
    if _flat_dicts(items, joined):
        return texts if _str_keys(items) else None
    if not _plain_keys(items, len(joined) > 2 * MAX_DEPTH):
        return None
    return texts


def _flat_dicts(items: list[Any], joined: str) -> bool:
    """Are ``items`` (whose JSON texts ``joined`` holds) all dicts of scalars, no key with '$'?

    Read off the text: each dict writes one '{', so exactly one per item and no '['
    means nothing nested (a '{' or '[' inside a string only costs the slower check),
    and a '$' in a key would show in the text.
    """
    return (joined.count("{") == len(items) and "[" not in joined and "$" not in joined
            and set(map(type, items)) == {dict})


def _str_keys(items: list[Any]) -> bool:
    """Are all top-level keys of these dicts str? (One C-level pass over all of them.)"""
    try:
        "\0".join(itertools.chain.from_iterable(items))
    except TypeError:
        return False
    return True


def encode(value: Any, name: str = "item") -> bytes:
    """``dumps(value)`` as UTF-8 bytes."""
    return dumps(value, name).encode("utf-8")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_str = json.encoder.encode_basestring


def _emit_str(s: str, out: list[str]) -> None:
    if not s.isascii() and not _encodable(s):
        raise _Refused(ValueError, "a str holding a lone surrogate is not text (no UTF-8 form)")
    out.append(_str(s))


def _float_text(v: float) -> str | None:
    """A finite float's JSON number, or None when it needs the $float tag."""
    if v != v or v in (math.inf, -math.inf):
        return None
    if v == 0.0 and math.copysign(1.0, v) < 0:
        return None
    if -_BIG < v < _BIG:
        return float.__repr__(v)
    return f"{int(v)}.0"  # integral here: every double of this size is


def _float_tag(v: float) -> str:
    if v == 0.0:
        return "-0.0"
    if v == math.inf:
        return "Infinity"
    if v == -math.inf:
        return "-Infinity"
    (bits,) = struct.unpack(">Q", struct.pack(">d", v))
    return "NaN" if bits == _CANONICAL_NAN else f"NaN:{bits:016x}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _too_deep() -> _Refused:
    return _Refused(ValueError, f"nested deeper than {MAX_DEPTH} levels as JSON (a dict with a "
                                "key that is not a str takes 3: {\"$map\": [[key, value]]})")


def _emit(v: Any, out: list[str], depth: int) -> None:
    """Append the JSON text of ``v`` to ``out`` (the slow path, for any value).

    ``depth`` counts the JSON arrays and objects around ``v``. One Python frame per
    level (containers are handled here, not in helpers), so MAX_DEPTH levels stay
    well inside the recursion limit.
    """
    if v is None:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif isinstance(v, str):
        _emit_str(v, out)
    elif isinstance(v, int):
        try:
            out.append(int.__repr__(v))
        except ValueError as ex:  # more digits than int -> str allows
            raise _Refused(ValueError, f"an int too long to write ({ex})") from None
    elif isinstance(v, float):
        text = _float_text(v)
        out.append(text if text is not None else f'{{"$float":"{_float_tag(v)}"}}')
    elif isinstance(v, dict) and all(isinstance(k, str) for k in v):
        if depth >= MAX_DEPTH:
            raise _too_deep()
        out.append("{")
        for i, (k, x) in enumerate(v.items()):
            if i:
                out.append(",")
            try:
                _emit_str("$" + k if k[:1] == "$" else k, out)
                out.append(":")
                _emit(x, out, depth + 1)
            except _Refused as ex:
                ex.path.append(k)
                raise
        out.append("}")
    elif isinstance(v, dict):
        if depth + 3 > MAX_DEPTH:
            raise _too_deep()
        out.append('{"$map":[')
        for i, (k, x) in enumerate(v.items()):
            out.append(",[" if i else "[")
            try:
                _emit(k, out, depth + 3)
            except _Refused as ex:
                ex.message = f"in the key {k!r}: {ex.message}"
                raise
            out.append(",")
            try:
                _emit(x, out, depth + 3)
            except _Refused as ex:
                ex.path.append(k)
                raise
            out.append("]")
        out.append("]}")
    elif isinstance(v, _MsgpackExt):  # a namedtuple: before tuple
        out.append(f'{{"$ext":[{int(v.code)},"{_b64(bytes(v.data))}"]}}')
    elif isinstance(v, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise _too_deep()
        out.append("[")
        for i, x in enumerate(v):
            if i:
                out.append(",")
            try:
                _emit(x, out, depth + 1)
            except _Refused as ex:
                ex.path.append(i)
                raise
        out.append("]")
    elif isinstance(v, (bytes, bytearray, memoryview)):
        out.append(f'{{"$base64":"{_b64(bytes(v))}"}}')
    elif isinstance(v, _Timestamp):
        out.append(f'{{"$timestamp":[{int(v.seconds)},{int(v.nanoseconds)}]}}')
    else:
        raise _Refused(TypeError, f"a value of type {type(v).__name__} is not a msgpack value "
                                  "and has no form in the value mapping (docs/values.md)")


# -------------------------------------------------------------------- decoding


def loads(text: str | bytes | bytearray) -> Any:
    """The value whose ``dumps`` is ``text``: the inverse of the mapping.

    Raises ValueError for text that is not JSON, or JSON that ``dumps`` never writes
    (an unknown or malformed tag, a member name with a single leading ``$``, a
    repeated member name, NaN or Infinity as a bare number).
    """
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except _Refused as ex:
        raise ValueError(f"not a value under walbatch's mapping: {ex.message}") from None


def _constant(name: str) -> Any:
    raise _Refused(ValueError, f"bare {name} (non-finite floats are written as $float tags)")


def _object(pairs: list[tuple[str, Any]]) -> Any:
    if len(pairs) == 1 and pairs[0][0][:1] == "$" and pairs[0][0][:2] != "$$":
        return _tag(*pairs[0])
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k[:1] == "$":
            if k[:2] != "$$":
                raise _Refused(ValueError, f"member {k!r} is neither a tag alone nor escaped")
            k = k[1:]
        if k in out:
            raise _Refused(ValueError, f"member {k!r} appears twice")
        out[k] = v
    return out


def _tag(name: str, arg: Any) -> Any:
    try:
        if name == "$base64" and type(arg) is str:
            return base64.b64decode(arg, validate=True)
        if name == "$float" and type(arg) is str:
            return _special_float(arg)
        if name == "$map" and type(arg) is list:
            out: dict[Any, Any] = {}
            for pair in arg:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("a $map entry is not a [key, value] pair")
                key = _hashable(pair[0])
                if key in out:
                    raise ValueError(f"$map key {key!r} appears twice")
                out[key] = pair[1]
            return out
        if name == "$ext" and type(arg) is list and len(arg) == 2 and type(arg[0]) is int \
                and type(arg[1]) is str:
            return msgpack.ExtType(arg[0], base64.b64decode(arg[1], validate=True))
        if name == "$timestamp" and type(arg) is list and len(arg) == 2 \
                and all(type(a) is int for a in arg):
            return msgpack.Timestamp(arg[0], arg[1])
    except (ValueError, TypeError, binascii.Error) as ex:
        raise _Refused(ValueError, f"bad {name} tag: {ex}") from None
    if name in TAGS:
        raise _Refused(ValueError, f"bad {name} tag: {arg!r}")
    raise _Refused(ValueError, f"unknown tag {name!r}")


def _special_float(text: str) -> float:
    fixed = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, "-0.0": -0.0}
    if text in fixed:
        return fixed[text]
    if text.startswith("NaN:") and re.fullmatch(r"[0-9a-f]{16}", text[4:]):
        (v,) = struct.unpack(">d", bytes.fromhex(text[4:]))
        if v != v:
            return float(v)
    raise ValueError(f"{text!r} is not NaN, Infinity, -Infinity, -0.0 or NaN:<bits>")


def _hashable(value: Any) -> Any:
    """A $map key as a dict key: JSON arrays were tuples (msgpack reads them back so)."""
    if type(value) is list:
        return tuple(_hashable(v) for v in value)
    if type(value) is dict:
        raise ValueError("a $map key is an object (a dict cannot be a key)")
    return value


# -------------------------------------------------------------------- equality


def equal(a: Any, b: Any) -> bool:
    """Are ``a`` and ``b`` the same value under the mapping?

    Stricter than ``==`` where ``==`` forgets what a value is: types must agree (``1``,
    ``1.0`` and ``True`` differ), floats compare by their bits (a NaN equals the same
    NaN; ``-0.0`` differs from ``0.0``). Dict key order does not matter; a list and a
    tuple are the same (msgpack writes both as an array).
    """
    todo = [(a, b)]
    while todo:
        a, b = todo.pop()
        ta, tb = type(a), type(b)
        if ta is float or tb is float:
            if ta is not tb or struct.pack(">d", a) != struct.pack(">d", b):
                return False
        elif ta in (list, tuple) and tb in (list, tuple):
            if len(a) != len(b):
                return False
            todo += zip(a, b, strict=True)
        elif ta is not tb:
            return False
        elif ta is dict:
            if len(a) != len(b):
                return False
            if all(type(k) is str for k in a) and all(type(k) is str for k in b):
                if a.keys() != b.keys():
                    return False
                todo += ((v, b[k]) for k, v in a.items())
                continue
            unmatched = list(b.items())
            for k, v in a.items():
                for i, (k2, v2) in enumerate(unmatched):
                    if equal(k, k2):
                        todo.append((v, v2))
                        del unmatched[i]
                        break
                else:
                    return False
        elif ta is msgpack.ExtType:
            if a.code != b.code or a.data != b.data:
                return False
        elif a != b:
            return False
    return True


# -------------------------------------------------------------------- submit side


def needs_check(packed: bytes | memoryview) -> bool:
    """Could ``check`` refuse a value msgpack packed as ``packed``? False means it passes.

    For ``submit``'s hot path: only an item whose encoding is over 1,024 bytes can nest
    1,024 levels deep, and only one holding an ext header with type 87 can hold an
    ExtType with code 87. A scan in C; a false positive only costs a ``check``.
    """
    return len(packed) >= MSGPACK_DEPTH or has_ext_87(packed)


# An ext value is a header byte (0xd4..0xd8: fixext; 0xc7/0xc8/0xc9: ext with a 1/2/4-byte
# length) and then its type byte. Searched in the reversed bytes, the pattern starts with
# the literal type byte, which lets the regex engine skip ahead at C speed.
_EXT_87_REVERSED = re.compile(rb"\x57(?:[\xd4-\xd8]|.\xc7|..\xc8|....\xc9)", re.S)


def has_ext_87(packed: bytes | memoryview) -> bool:
    """Might ``packed`` (msgpack) hold an ExtType with code 87? False means it does not."""
    return _EXT_87_REVERSED.search(bytes(packed)[::-1]) is not None


def check(item: Any, name: str = "item") -> None:
    """Refuse, naming where it is, what the log cannot hold or would not give back.

    Meant for ``submit``, before anything is written: TypeError for a value that is not
    a msgpack value (a datetime, a set, an object), ValueError for one msgpack cannot
    hold (an int outside -2**63 .. 2**64-1, a str with a lone surrogate), nesting deeper
    than 1024 levels (which msgpack packs but cannot read back), or an ExtType with
    code 87 (reserved: the log reads it back as a keyed item). Every value that
    passes reads back from the log ``equal`` to what was submitted, tuples as lists.
    """
    # Iterative: a value may nest deeper than Python's recursion limit. Each entry is
    # (value, containers around it, parent entry, step from the parent, is a key).
    todo: list[tuple[Any, int, Any, Any, bool]] = [(item, 0, None, None, False)]
    while todo:
        entry = todo.pop()
        v, depth = entry[0], entry[1]
        if isinstance(v, dict):
            if depth >= MSGPACK_DEPTH:
                _refuse_at(entry, name, ValueError, _TOO_DEEP_FOR_MSGPACK)
            for k, x in v.items():
                todo.append((k, depth + 1, entry, k, True))
                todo.append((x, depth + 1, entry, k, False))
        elif isinstance(v, _MsgpackExt):
            if v.code == KEY_EXT:
                _refuse_at(entry, name, ValueError, f"ExtType code {KEY_EXT} is reserved by walbatch "
                                                    "for keyed items; use another code")
        elif isinstance(v, (list, tuple)):
            if depth >= MSGPACK_DEPTH:
                _refuse_at(entry, name, ValueError, _TOO_DEEP_FOR_MSGPACK)
            todo += [(x, depth + 1, entry, i, False) for i, x in enumerate(v)]
        else:
            problem = _leaf_problem(v)
            if problem is not None:
                _refuse_at(entry, name, *problem)


_TOO_DEEP_FOR_MSGPACK = f"nested deeper than {MSGPACK_DEPTH} levels, the most msgpack reads back"


def _leaf_problem(v: Any) -> tuple[type[Exception], str] | None:
    if v is None or isinstance(v, (bool, float, bytes, bytearray, memoryview, _Timestamp)):
        return None
    if isinstance(v, int):
        if -(1 << 63) <= v < (1 << 64):
            return None
        return ValueError, (f"the int {v} is outside -2**63 .. 2**64-1, what msgpack holds; "
                            "submit it as a str")
    if isinstance(v, str):
        if v.isascii() or _encodable(v):
            return None
        return ValueError, "a str holding a lone surrogate is not text (no UTF-8 form)"
    return TypeError, (f"a value of type {type(v).__name__} is not a msgpack value (None, bool, "
                       "int, float, str, bytes, list, tuple, dict, msgpack.ExtType, "
                       "msgpack.Timestamp)")


def _refuse_at(entry: Any, name: str, error: type[Exception], message: str) -> None:
    steps: list[str] = []
    while entry[2] is not None:
        if entry[4]:  # the problem is in a key: name the key, not a path through it
            steps.clear()
            message = f"in the key {entry[3]!r}: {message}"
        else:
            steps.append(f"[{entry[3]!r}]")
        entry = entry[2]
    raise error(f"{name}{''.join(reversed(steps))}: {message}") from None


# ------------------------------------------------------------ JSON arriving as items


class _RefusedJSON(ValueError):
    pass


def _json_constant(name: str) -> Any:
    raise _RefusedJSON(f"{name} is not JSON")


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _RefusedJSON(f"the number {text[:40]} is too large for a float")
    return value


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _RefusedJSON(f"the member name {k[:80]!r} appears twice in one object")
            seen.add(k)
    return out


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_json_object, parse_float=_json_float,
                            parse_constant=_json_constant)


def parse_json(text: str, where: str = "the item") -> Any:
    """One JSON value from ``text``, read strictly, or ValueError naming ``where``.

    What Python's json module would accept beyond JSON is refused rather than turned
    into something else: NaN and Infinity, a number too large for a float (it would
    become infinity), a member name repeated in one object (one value would be lost).
    For items arriving as JSON: HTTP ingest and ``walbatch submit``.
    """
    try:
        return _STRICT_JSON.decode(text)
    except _RefusedJSON as ex:
        raise ValueError(f"{where}: {ex}") from None
    except json.JSONDecodeError as ex:
        raise ValueError(f"{where}: not valid JSON ({ex.msg} at column {ex.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to read") from None
