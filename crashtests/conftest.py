"""Crash, power-loss, corruption, full-disk, outage and hostile-input scenarios.

Quick by default (a few minutes in all on 2 cores); `--crash-iterations N` (or
WALBATCH_CRASH_ITERATIONS=N) runs every scenario N cycles for a soak, and
`--crash-states N` (WALBATCH_CRASH_STATES; 0: every one it can build) lets the
crash explorer recover more crash states.

Seeds: every scenario draws its random choices from one seed. By default it is
derived from a fixed value and the test's name, so a run is the same run every
time; `--crash-seed S` (or WALBATCH_CRASH_SEEDS=S) uses S instead, and a list
(`--crash-seed default,2,3`; `default` is the derived one) runs every scenario
once per seed: CI runs a fixed set plus one derived from the commit (.ci/run).
Each scenario prints its seed and a summary line; the replay command is in the
summary at the end of the run.
"""

from __future__ import annotations

import os
import random
import zlib

import pytest

FIXED_SEED = 20150
DEFAULT_CRASH_STATES = 400


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("walbatch crash suite")
    group.addoption("--crash-iterations", type=int, default=None,
                    help="cycles per scenario (default: a quick setting; env WALBATCH_CRASH_ITERATIONS)")
    group.addoption("--crash-seed", default=None,
                    help="seed(s) to run with, comma-separated (default: derived from a fixed value "
                         "and the test name; env WALBATCH_CRASH_SEEDS)")
    group.addoption("--crash-states", type=int, default=None,
                    help=f"crash states the explorer recovers (default {DEFAULT_CRASH_STATES}; "
                         "0: every prefix and torn write at every crash point; "
                         "env WALBATCH_CRASH_STATES)")


def configured_seeds(config: pytest.Config) -> list[int | None]:
    """The seeds given (None for ``default``: the one derived from the test's name)."""
    raw = config.getoption("--crash-seed") or os.environ.get("WALBATCH_CRASH_SEEDS", "")
    words = [w.strip() for w in str(raw).replace(" ", ",").split(",") if w.strip()]
    return [None if w == "default" else int(w, 0) for w in words]


def derived_seed(name: str) -> int:
    """The seed a scenario uses when none is given: fixed, different per test."""
    return zlib.crc32(f"{FIXED_SEED}:{name}".encode())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "scenario" in metafunc.fixturenames:
        seeds = configured_seeds(metafunc.config)
        if seeds:
            metafunc.parametrize("crash_seed", seeds,
                                 ids=[f"seed={s}" if s is not None else "seed=default" for s in seeds])


@pytest.fixture
def crash_seed() -> int | None:
    return None  # parametrized by pytest_generate_tests when seeds are given


class Scenario:
    """Iterations, a seeded RNG and the summary line of one scenario."""

    def __init__(self, config: pytest.Config, name: str, seed: int) -> None:
        self.config = config
        self.name = name
        self.seed = seed
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
def scenario(request: pytest.FixtureRequest, crash_seed: int | None):
    seed = crash_seed if crash_seed is not None else derived_seed(request.node.originalname)
    sc = Scenario(request.config, request.node.name, seed)
    print(f"{request.node.name}: seed={seed} (replay: --crash-seed {seed})")
    yield sc
    request.config.stash.setdefault(_LINES, []).append(
        sc.line() + f"  (replay: --crash-seed {sc.seed} -k '{request.node.originalname}')")


@pytest.fixture
def crash_states(request: pytest.FixtureRequest) -> int:
    n = request.config.getoption("--crash-states")
    if n is None:
        n = int(os.environ.get("WALBATCH_CRASH_STATES", DEFAULT_CRASH_STATES))
    return n


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    lines = config.stash.get(_LINES, [])
    if lines:
        terminalreporter.section("walbatch crash suite")
        for line in lines:
            terminalreporter.write_line(line)
