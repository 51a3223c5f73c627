"""Power loss at random points, on the crash-simulating file system.

Each cycle opens a DurableBatcher on `walbatch.simfs.SimFileSystem`, arms a power
loss at a random mutating file operation (a write, an fsync, a segment roll, a
checkpoint rename, a segment unlink, in the submitting thread or the flusher),
and submits until the "machine" dies. The crash drops unsynced bytes (or keeps a
torn prefix, or garbage) and forgets directory entries never fsync'd. After the
last cycle the log is opened once more with a healthy sink and flushed.

Invariant: every acknowledged item reaches the sink with the acknowledged payload;
no acknowledged seq is ever handed out again; the stats tally holds.
"""

from __future__ import annotations

import tempfile

from walbatch import DurableBatcher, SinkError, WalbatchError
from walbatch.simfs import SimFileSystem


def power_loss_run(scenario, cycles: int, fs: SimFileSystem) -> dict[str, int]:
    rng = scenario.rng
    directory = tempfile.mkdtemp(prefix="walbatch-power-")  # dlq.db lives on the real disk
    state = {"up": True}
    rows: dict[int, object] = {}
    counts = {"redelivered": 0, "damaged": 0}

    def sink(batch):
        if not state["up"]:
            raise SinkError("sink is down", retryable=True)
        for r in batch:
            if r.seq in rows:
                counts["redelivered"] += 1
                if rows[r.seq] != r.item:
                    counts["damaged"] += 1
            else:
                rows[r.seq] = r.item

    acked: dict[int, object] = {}
    reused = 0
    log_ids = set()
    for cycle in range(cycles):
        state["up"] = rng.random() < 0.5
        opts = dict(segment_bytes=rng.choice([256, 1024, 1 << 20]), max_log_bytes=1 << 30,
                    max_delay=0.001, checkpoint_interval=rng.choice([0.0, 0.002, 0.05]),
                    retry_initial_delay=0.001, retry_max_delay=0.005)
        b = DurableBatcher(directory, sink, _fs=fs, **opts)
        log_ids.add(b.log_id)
        generation = fs.generation
        fs.crash_after(rng.randint(1, 80), rng, "random")
        try:
            for k in range(400):
                if rng.random() < 0.75:
                    item = {"c": cycle, "k": k}
                    seq = b.submit(item).seq
                    reused += seq in acked
                    acked[seq] = item
                else:
                    items = [{"c": cycle, "k": k, "m": j} for j in range(rng.randint(1, 40))]
                    rs = b.submit_many(items)
                    for seq, item in zip(rs.seqs, items, strict=True):
                        reused += seq in acked
                        acked[seq] = item
        except (OSError, WalbatchError):
            pass  # the machine died under us
        if fs.generation == generation:
            fs.crash(rng, "random")  # the armed point was not reached: pull the plug now
        b.close(timeout=0)
    state["up"] = True
    b = DurableBatcher(directory, sink, _fs=fs, max_delay=0.001)
    log_ids.add(b.log_id)
    b.flush(timeout=60)
    stats = b.stats()
    b.close()
    lost = sum(1 for seq, item in acked.items() if rows.get(seq) != item)
    tally_ok = stats.submitted == stats.delivered + stats.dead_lettered + stats.pending
    return {"cycles": cycles, "acknowledged": len(acked), "delivered": len(rows), "lost": lost,
            "duplicated": reused, "damaged": counts["damaged"], "redelivered": counts["redelivered"],
            "log_ids": len(log_ids), "tally_ok": int(tally_ok), "pending": stats.pending}


def test_power_loss_loses_nothing_acknowledged(scenario):
    result = power_loss_run(scenario, scenario.iterations(40), SimFileSystem())
    scenario.add(**result)
    assert result["lost"] == 0, scenario.line()
    assert result["duplicated"] == 0, scenario.line()
    assert result["damaged"] == 0, scenario.line()
    assert result["log_ids"] == 1, scenario.line()
    assert result["tally_ok"] == 1 and result["pending"] == 0, scenario.line()


def test_the_check_catches_a_log_that_skips_fsync(scenario):
    """The same run on a file system whose fsync does nothing must be caught losing data."""
    result = power_loss_run(scenario, 8, SimFileSystem(skip_fsync=True))
    scenario.add(**result)
    assert result["lost"] > 0 or result["log_ids"] > 1, (
        "a log without fsync survived power losses: the harness cannot see the bug it looks for")
