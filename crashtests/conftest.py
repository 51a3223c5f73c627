"""Crash, power-loss, corruption, full-disk, outage and hostile-input scenarios.

Quick by default (a few minutes in all on 2 cores); `--crash-iterations N` (or
WALBATCH_CRASH_ITERATIONS=N) runs every scenario N cycles for a soak. Every
scenario prints its seed and a one-line summary; `--crash-seed S` replays one.
"""

from __future__ import annotations

import os
import random

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("walbatch crash suite")
    group.addoption("--crash-iterations", type=int, default=None,
                    help="cycles per scenario (default: a quick setting; env WALBATCH_CRASH_ITERATIONS)")
    group.addoption("--crash-seed", type=int, default=None,
                    help="seed to replay (default: random, printed)")


class Scenario:
    """Iterations, a seeded RNG and the summary line of one scenario."""

    def __init__(self, config: pytest.Config, name: str) -> None:
        self.config = config
        self.name = name
        seed = config.getoption("--crash-seed")
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.counts: dict[str, int] = {}

    def iterations(self, quick: int) -> int:
        n = self.config.getoption("--crash-iterations") or int(
            os.environ.get("WALBATCH_CRASH_ITERATIONS", "0"))
        return n or quick

    def add(self, **counts: int) -> None:
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def line(self) -> str:
        parts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"{self.name}: seed={self.seed} {parts}"


_LINES = pytest.StashKey[list]()


@pytest.fixture
def scenario(request: pytest.FixtureRequest):
    sc = Scenario(request.config, request.node.name)
    yield sc
    request.config.stash.setdefault(_LINES, []).append(
        sc.line() + f"  (replay: --crash-seed {sc.seed} -k '{request.node.name}')")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    lines = config.stash.get(_LINES, [])
    if lines:
        terminalreporter.section("walbatch crash suite")
        for line in lines:
            terminalreporter.write_line(line)
