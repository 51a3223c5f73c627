"""Random damage to segments, the checkpoint and dlq.db.

Each case builds a small log on real files (several segments, part of it already
delivered), damages one file (bit flips, truncation, a zeroed or overwritten range,
appended garbage) or puts segment files out of place (two swapped, one copied or
renamed to another name), and opens it with a recording sink. Allowed outcomes:

- CorruptLog naming the damaged file and an offset inside it; then the repair that
  `walbatch verify --repair` runs reports the seqs it gave up, and a fresh open
  delivers every other undelivered item intact: the reported seqs are exactly the
  ones that did not arrive;
- recovery as a torn tail: damage confined to the end of the newest segment is
  indistinguishable from a write cut short by a crash (docs/guarantees.md), so
  what is lost is a suffix of the log, counted here as `trimmed`;
- nothing undelivered affected (damage to delivered records, garbage after the end).

Never allowed: a damaged payload delivered, an undelivered item lost anywhere but
a tail suffix, any exception but CorruptLog.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from walbatch import CorruptLog, DurableBatcher
from walbatch.dlq import DeadLetterStore, list_dead_letters, record_lost
from walbatch.log import Log
from walbatch.segment import parse_segment_name, segment_name


def build(directory: str, rng) -> tuple[dict[int, object], int]:
    items: dict[int, object] = {}
    b = DurableBatcher(directory, None, segment_bytes=rng.choice([200, 600, 2000]))
    for k in range(rng.randint(20, 120)):
        if rng.random() < 0.7:
            item = {"k": k, "v": "x" * rng.randint(0, 30)}
            items[b.submit(item).seq] = item
        else:
            batch = [[k, j, rng.random()] for j in range(rng.randint(1, 12))]
            items.update(zip(b.submit_many(batch).seqs, batch, strict=True))
    b.close()
    delivered = rng.choice([0, 0, rng.randint(0, len(items))])
    # Half the time the checkpoint was written after the last fsync (its high-water mark
    # covers the whole log), as a running flusher's usually is; else it knows nothing newer.
    high_water = rng.choice([delivered, len(items)])
    if delivered or high_water:
        from walbatch.checkpoint import Checkpoint

        log = Log.open(directory)
        log.commit_checkpoint(Checkpoint(log.log_id, delivered, delivered, 0, high_water))
        log.close()
    if rng.random() < 0.2:  # make a dlq.db worth damaging
        store = DeadLetterStore.for_dir(directory)
        store.add("00000000-0000-0000-0000-000000000000", [(1, "x")], "for the test")
        store.close()
    return items, delivered


def damage(path: str, rng) -> str:
    data = bytearray(open(path, "rb").read())
    kind = rng.choice(["flip", "flip", "truncate", "zero", "garbage", "append"])
    if not data:
        kind = "append"
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind in ("zero", "garbage"):
        at = rng.randrange(len(data))
        n = rng.randint(1, 64)
        data[at:at + n] = bytes(n) if kind == "zero" else rng.randbytes(min(n, len(data) - at))
    else:
        data += rng.randbytes(rng.randint(1, 64))
    with open(path, "wb") as f:
        f.write(data)
    return kind


def misplace(segdir: str, segs: list[str], rng) -> str:
    """Put segment files out of place, as a restore from a backup might: return the kind."""
    kind = rng.choice(["swap", "copy", "rename"])
    names = [os.path.join(segdir, s) for s in segs]
    taken = {parse_segment_name(s) for s in segs}
    fresh = rng.choice([n for n in range(1, max(taken) + 50) if n not in taken])
    src = rng.choice(names)
    if kind == "swap":
        a, b = rng.sample(names, 2)
        data_a, data_b = open(a, "rb").read(), open(b, "rb").read()
        open(a, "wb").write(data_b)
        open(b, "wb").write(data_a)
    elif kind == "copy":
        shutil.copy(src, os.path.join(segdir, segment_name(fresh)))
    else:
        os.rename(src, os.path.join(segdir, segment_name(fresh)))
    return kind


def read_everything(directory: str) -> set[int]:
    """Read every record as `walbatch dump` does; return the seqs a repair gives up.

    A reader never trips over what the read-only recovery did not report.
    """
    log = Log.open(directory, readonly=True, on_corruption="report")
    try:
        for _ in log.records():
            pass
        return {s for r in log.lost for s in range(r.first, r.last + 1)}
    finally:
        log.close()


def one_case(rng, counts: dict[str, int]) -> None:
    directory = tempfile.mkdtemp(prefix="walbatch-corrupt-")
    try:
        items, cp = build(directory, rng)
        segs = sorted(os.listdir(os.path.join(directory, "segments")))
        targets = [os.path.join(directory, "segments", s) for s in segs] * 8
        targets.append(os.path.join(directory, "checkpoint"))
        if os.path.exists(os.path.join(directory, "dlq.db")):
            targets.append(os.path.join(directory, "dlq.db"))
        target = rng.choice(targets)
        if len(segs) > 1 and rng.random() < 0.15:  # or whole segment files out of place
            counts[misplace(os.path.join(directory, "segments"), segs, rng)] += 1
            target = os.path.join(directory, "segments")
        else:
            damage(target, rng)
        got: dict[int, object] = {}

        def sink(batch):
            for r in batch:
                got.setdefault(r.seq, r.item)
                if got[r.seq] != items.get(r.seq):
                    counts["damaged"] += 1

        undelivered = {s for s in items if s > cp}
        try:
            with DurableBatcher(directory, sink, max_delay=0.001) as b:
                b.flush(timeout=30)
        except CorruptLog as ex:
            counts["detected"] += 1
            assert ex.path == target or ex.path.startswith(os.path.join(directory, "segments")), ex
            if target.endswith("dlq.db"):
                return  # the log is intact; dlq.db needs sqlite's own recovery
            foreseen = read_everything(directory)  # walbatch verify and dump
            log = Log.open(directory, on_corruption="quarantine")  # walbatch verify --repair
            reported = {s for r in log.lost for s in range(r.first, r.last + 1)}
            assert reported == foreseen, "verify and verify --repair disagree about the lost seqs"
            assert not {s for s in read_everything(directory) if s > cp} - reported
            if target.endswith("segments"):  # out of place, not damaged: nothing to give up
                assert not {s for s in reported if s > cp}, sorted(reported)[:10]
            store = DeadLetterStore.for_dir(directory)
            record_lost(store, log)
            store.close()
            log.close()
            with DurableBatcher(directory, sink, max_delay=0.001) as b:
                b.flush(timeout=30)
            missing = {s for s in undelivered if s not in got}
            unreported = sorted(missing - reported)
            if unreported:  # only a trimmed tail of the newest segment may go unreported
                assert unreported == list(range(unreported[0], max(items) + 1)), (
                    f"lost without a report: {unreported[:10]}")
                assert target == os.path.join(directory, "segments", segs[-1]), target
                counts["trimmed"] += 1
                counts["trimmed_items"] += len(unreported)
            assert not (reported & set(got)), "reported as lost but delivered"
            dead = {d.seq for d in list_dead_letters(directory) if d.lost}
            assert reported - {s for s in reported if s <= cp} <= dead | set(range(0, cp + 1))
            counts["repaired_lost"] += len(reported)
            return
        read_everything(directory)  # dump reads what the open accepted
        missing = sorted(s for s in undelivered if s not in got)
        if missing:
            # Only a torn-tail trim may lose items, and only a suffix of the log.
            assert missing == list(range(missing[0], max(items) + 1)), (
                f"items lost from the middle of the log without an error: {missing[:10]}")
            assert target == os.path.join(directory, "segments", segs[-1]), target
            counts["trimmed"] += 1
            counts["trimmed_items"] += len(missing)
        else:
            counts["harmless"] += 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_corruption_is_detected_or_trimmed_never_delivered(scenario):
    counts = {"cases": 0, "detected": 0, "trimmed": 0, "trimmed_items": 0, "harmless": 0,
              "repaired_lost": 0, "damaged": 0, "swap": 0, "copy": 0, "rename": 0}
    for _ in range(scenario.iterations(150)):
        counts["cases"] += 1
        one_case(scenario.rng, counts)
    scenario.add(**counts)
    assert counts["damaged"] == 0, scenario.line()
