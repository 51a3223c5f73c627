"""walbatch.replay: the library behind `walbatch replay` (deliver or count a backlog)."""

from __future__ import annotations

import pytest
from helpers import FAST, Collector

from walbatch import DurableBatcher, LogLocked, PermanentSinkError
from walbatch.replay import replay, scan


def backlog(directory, n: int) -> None:
    with DurableBatcher(directory, None) as b:  # a writer only: everything stays in the log
        b.submit_many([{"i": i} for i in range(n)])


def test_replay_delivers_the_backlog_and_reports_progress(tmp_path):
    backlog(tmp_path, 5000)
    sink, seen = Collector(), []
    result = replay(tmp_path, sink, progress=lambda done, total, rate: seen.append((done, total)),
                    max_items=100, **FAST)
    assert (result.backlog, result.delivered, result.dead_lettered, result.left) == (5000, 5000, 0, 0)
    assert result.checkpoint == 5000 and result.error is None
    assert sink.seqs == list(range(1, 5001))
    assert seen and seen[-1] == (5000, 5000)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert scan(tmp_path).would_deliver == 0  # checkpointed: a second replay has nothing to do


def test_replay_counts_dead_letters_and_what_it_left_behind(tmp_path):
    backlog(tmp_path, 10)

    def refuse_odd(batch):
        return [PermanentSinkError("odd") if r.item["i"] % 2 else None for r in batch]

    result = replay(tmp_path, refuse_odd, **FAST)
    assert (result.delivered, result.dead_lettered, result.left) == (5, 5, 0)

    backlog(tmp_path, 3)

    def down(batch):
        raise ConnectionError("down")

    result = replay(tmp_path, down, timeout=0.2, **FAST)
    assert (result.delivered, result.left) == (0, 3)
    assert isinstance(result.error, TimeoutError) and "ConnectionError: down" in str(result.error)


def test_scan_reads_beside_a_writer_and_changes_nothing(tmp_path):
    backlog(tmp_path, 7)
    with DurableBatcher(tmp_path, None) as writer:
        writer.submit("one more")
        found = scan(tmp_path)
        assert (found.checkpoint, found.would_deliver, found.damaged, found.corruption) == (0, 8, 0, [])
        with pytest.raises(LogLocked):
            replay(tmp_path, Collector())
