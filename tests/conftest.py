"""Fixtures shared by the DurableBatcher tests."""

from __future__ import annotations

import pytest
from helpers import FAST

from walbatch import DurableBatcher


@pytest.fixture
def logdir(tmp_path):
    return tmp_path / "log"


@pytest.fixture
def make(logdir):
    """Open a DurableBatcher with fast test options; every one is closed at teardown."""
    opened: list[DurableBatcher] = []

    def _make(sink, directory=None, **options) -> DurableBatcher:
        b = DurableBatcher(directory or logdir, sink, **{**FAST, **options})
        opened.append(b)
        return b

    yield _make
    for b in opened:
        b.close(timeout=1)
