"""Shared by tests/ and crashtests/: under WALBATCH_NO_SKIP=1 (CI sets it) a skip fails.

Some tests skip where the machine cannot run them (no PostgreSQL or NATS binary, no
root to mount a tiny tmpfs, no 2 GiB of address space). CI installs and allows all of
that, so there a skip can only mean a broken install hiding a test: it is reported as
a failure, with the skip's reason. Expected failures (xfail) are left alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/helpers.py (fixtures' building blocks, the kill -9 writer) serves crashtests/ too.
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

pytest_plugins = ["pytester"]  # for the test of the hooks below


def _no_skip() -> bool:
    return os.environ.get("WALBATCH_NO_SKIP") == "1"


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if _no_skip() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but WALBATCH_NO_SKIP=1 forbids skips here: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    outcome = yield
    _fail_skip(outcome.get_result())
