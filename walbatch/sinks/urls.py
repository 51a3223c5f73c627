"""Sink URLs: the one parser of their ``?option=value`` queries, and their safe display.

Every built-in sink reads its options through ``URLOptions``, so the rules are the
same everywhere: each option is given once (or, if the sink says so, repeated), has a
value, and a name the sink knows; a misspelt option is an error naming the valid
ones, never a silent default. Values are decoded like a form (``+`` and ``%20`` are a
space). A sink may pass parameters it does not own through untouched (PostgreSQL
gives libpq's to libpq; HTTP sends ``query.NAME`` to the endpoint).

Booleans are ``1/0``, ``true/false``, ``yes/no`` or ``on/off``; durations are seconds
or a number with a unit (``500ms``, ``30s``, ``10m``, ``2h``, ``1d``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from urllib.parse import unquote_plus, urlsplit

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, what: str = "duration") -> float:
    """``"10m"``, ``"30s"``, ``"500ms"``, ``"2h"``, ``"1d"`` or plain seconds -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{what}={text!r} is not a duration (e.g. 500ms, 30s, 10m, 2h, 1d, "
                         "or seconds)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def redacted(url: str) -> str:
    """The URL without credentials or query (both may hold secrets), for messages."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url.split("?")[0]
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


class URLOptions:
    """The options in a sink URL's query, checked against what the sink takes.

    ``known``: the option names; ``repeatable``: those that may come more than once
    (read with ``values``); ``passthrough(name)``: True for a parameter the sink hands
    on as written (kept in ``others`` as raw ``name=value`` text, in order);
    ``hint(name)``: more to say about an unknown option.
    """

    def __init__(self, url: str, sink: str, known: Iterable[str], *,
                 repeatable: Iterable[str] = (),
                 passthrough: Callable[[str], bool] | None = None,
                 hint: Callable[[str], str] | None = None) -> None:
        self.sink = sink
        self.where = f"{sink} sink URL {redacted(url)!r}"
        self.known = tuple(known)
        self._repeatable = frozenset(repeatable)
        self._given: dict[str, list[str]] = {}
        self.others: list[str] = []
        for pair in urlsplit(url).query.split("&"):
            if not pair:
                continue
            raw_name, eq, raw_value = pair.partition("=")
            name = unquote_plus(raw_name)
            if name not in self.known:
                if passthrough is not None and passthrough(name):
                    self.others.append(pair)
                    continue
                raise self.error(f"unknown option {name!r}; valid: {', '.join(self.known) or 'none'}"
                                 + (hint(name) if hint is not None else ""))
            if not eq:
                raise self.error(f"option {name} needs a value ({name}=...)")
            value = unquote_plus(raw_value)
            if not value:
                raise self.error(f"option {name}= is empty")
            if name in self._given and name not in self._repeatable:
                # Which one would win is a guess the user did not mean to make.
                raise self.error(f"option {name} given more than once")
            self._given.setdefault(name, []).append(value)

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.where}: {message}")

    def __contains__(self, name: str) -> bool:
        return name in self._given

    def text(self, name: str, default: str | None = None) -> str | None:
        values = self._given.get(name)
        return values[-1] if values else default

    def values(self, name: str) -> list[str]:
        """Every value of a repeatable option, in order."""
        return list(self._given.get(name, ()))

    def flag(self, name: str, default: bool) -> bool:
        value = self.text(name)
        if value is None:
            return default
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise self.error(f"{name}={value!r} is not a boolean (1/0, true/false, yes/no, on/off)")

    def integer(self, name: str, default: int, *, low: int | None = None,
                high: int | None = None) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            n = int(value.replace("_", ""))
        except ValueError:
            raise self.error(f"{name}={value!r} is not an integer") from None
        if (low is not None and n < low) or (high is not None and n > high):
            span = f"from {low}" if high is None else f"from {low} to {high}"
            raise self.error(f"{name}={n} is out of range ({span})")
        return n

    def number(self, name: str, default: float) -> float:
        """A float, as written (the sink checks its range: ``inf`` parses)."""
        value = self.text(name)
        if value is None:
            return default
        try:
            return float(value.replace("_", ""))
        except ValueError:
            raise self.error(f"{name}={value!r} is not a number") from None

    def duration(self, name: str, default: float) -> float:
        """Seconds; ``500ms``, ``30s``, ``10m``, ``2h`` and ``1d`` work too. Positive."""
        value = self.text(name)
        if value is None:
            return default
        try:
            seconds = parse_duration(value, name)
        except ValueError as ex:
            raise self.error(str(ex)) from None
        if seconds <= 0:
            raise self.error(f"{name} must be positive")
        return seconds

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        value = self.text(name)
        if value is None:
            return default
        options = tuple(choices)
        if value.lower() not in options:
            raise self.error(f"{name}={value!r}; expected one of {', '.join(options)}")
        return value.lower()
