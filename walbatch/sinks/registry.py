"""From a sink spec (a URL, ``module:function``, a callable or an object) to a sink.

The registry maps each URL scheme to the ``from_url`` of the module that owns it,
imported only when a URL with that scheme is used: ``import walbatch`` loads no
driver, and a missing driver's message names the extra that installs it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any
from urllib.parse import urlsplit

from .base import FunctionSink
from .urls import redacted

# scheme -> module (under walbatch.sinks) whose from_url(url) builds the sink
SCHEMES = {
    "sqlite": "sqlite",
    "file": "file",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "nats": "nats",
    "tls": "nats",
    "http": "http",
    "https": "http",
}

FORMS = ("sqlite:///PATH.db, file:///ABSOLUTE/PATH.jsonl, postgresql://..., nats://..., "
         "http(s)://... or module:function")


def sink_from_url(url: str) -> Any:
    """Build a built-in sink from its URL, or load ``module:function`` (docs/sinks.md)."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme.lower() in SCHEMES:
        module = importlib.import_module(f"{__package__}.{SCHEMES[scheme.lower()]}")
        return module.from_url(url)
    if "://" not in url and ":" in url:
        target = load_callable(url)
        if _builds_a_sink(target):
            # module:make_sink, or module:SinkClass: called once, with no arguments.
            try:
                target = target()
            except Exception as ex:
                raise ValueError(f"building the sink {url!r} failed: {type(ex).__name__}: {ex}") from ex
        return resolve_sink(target)
    raise ValueError(f"unknown sink {redacted(url)!r}: expected {FORMS}")


def _builds_a_sink(target: Any) -> bool:
    """A callable that takes no arguments builds a sink; one taking the batch is the sink."""
    if not callable(target) or (hasattr(target, "write") and not isinstance(target, type)):
        return False
    try:
        inspect.signature(target).bind()
    except (TypeError, ValueError):  # needs an argument (the batch), or has no signature
        return False
    return True


def load_callable(spec: str) -> Any:
    """``package.module:function`` -> the function (or any attribute naming a sink)."""
    module, _, attr = spec.partition(":")
    if not (module and attr.isidentifier() and all(p.isidentifier() for p in module.split("."))):
        raise ValueError(f"unknown sink {spec!r}: expected {FORMS}")
    what = (f"cannot load the sink {spec!r} (module:function imports MODULE from the Python "
            f"path and calls FUNCTION(batch), or FUNCTION() once if it takes no arguments)")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as ex:
        if ex.name is not None and (module == ex.name or module.startswith(ex.name + ".")):
            raise ModuleNotFoundError(
                f"{what}: there is no module {ex.name!r} (is it installed, or its directory on "
                f"PYTHONPATH?); built-in sinks are URLs: {FORMS}", name=ex.name) from None
        raise ImportError(f"{what}: importing {module!r} failed: {ex}") from ex
    except Exception as ex:
        raise ImportError(f"{what}: importing {module!r} failed: "
                          f"{type(ex).__name__}: {ex}") from ex
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise AttributeError(f"{what}: module {module!r} has no attribute {attr!r}") from None


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
