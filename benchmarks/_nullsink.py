"""A sink that takes everything and does nothing, for benchmarks of the write path."""


def sink(batch):  # noqa: ANN001 - loaded by `walbatch serve --sink _nullsink:sink`
    return None
