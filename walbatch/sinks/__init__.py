"""Built-in sinks, selected by URL: ``sqlite:///PATH``, ``file:///PATH``, ``module:function``."""

from .base import FunctionSink, Sink, resolve_sink, sink_from_url

__all__ = ["FunctionSink", "Sink", "resolve_sink", "sink_from_url"]
