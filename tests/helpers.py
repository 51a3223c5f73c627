"""Shared test scaffolding for the DurableBatcher tests: fast options, the wait bound, a recording sink."""

from __future__ import annotations

import threading

FAST = {"max_delay": 0.01, "retry_initial_delay": 0.001, "retry_max_delay": 0.01,
        "checkpoint_interval": 0.01}
WAIT = 10.0  # seconds: the bound on every wait, so a bug fails a test instead of hanging it


class Collector:
    """A sink that records every batch it took: (reason, attempt, [(seq, item), ...])."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[str, int, list[tuple[int, object]]]] = []

    def write(self, batch) -> None:
        with self.lock:
            self.batches.append((batch.reason, batch.attempt, [(r.seq, r.item) for r in batch]))

    @property
    def records(self) -> list[tuple[int, object]]:
        with self.lock:
            return [rec for _, _, recs in self.batches for rec in recs]

    @property
    def seqs(self) -> list[int]:
        return [s for s, _ in self.records]

    @property
    def items(self) -> list[object]:
        return [i for _, i in self.records]

    def reasons(self) -> list[str]:
        with self.lock:
            return [reason for reason, _, _ in self.batches]

    def sizes(self) -> list[int]:
        with self.lock:
            return [len(recs) for _, _, recs in self.batches]
