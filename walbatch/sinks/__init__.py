"""Built-in sinks, selected by URL (docs/sinks.md), and what a sink is.

``sink_from_url`` and ``resolve_sink`` come from the registry, which imports a
sink's module (and its driver) only when its URL is used.
"""

from .base import FunctionSink, Sink
from .registry import resolve_sink, sink_from_url

__all__ = ["FunctionSink", "Sink", "resolve_sink", "sink_from_url"]
