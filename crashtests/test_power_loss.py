"""Power losses under concurrent submitters, on the crash-simulating file system.

Each cycle opens a DurableBatcher on ``SimFileSystem`` (tests/simfs.py: O_DSYNC
writes and write_file are durable when they are on disk, names once their
directory is fsync'd, and dlq.db goes back to its last commit) with a sink that
takes good items and refuses bad ones (dead letters). Rounds alternate:

- submitting: submitter threads and an asyncio loop (``asubmit``) submit at once,
  in an interleaving the seed chooses (tests/scheduling.py), so commit groups
  have followers; the sink holds its batch meanwhile;
- delivering: the sink opens and ``flush`` runs: the flusher delivers, writes
  dead letters and checkpoints, and deletes segments, alone.

The power fails once per cycle, where the seed says: before or inside a gated
operation of a submitter (a commit's write, a segment roll), or at the Nth
operation of a delivery. Each crash keeps what was durable and, as the seed
says, a torn prefix or garbage of what was not. After the last cycle the log
is opened with a healthy sink and flushed.

Invariant: every acknowledged item was delivered with its payload (a good one)
or is a dead letter (a bad one); no acknowledged seq is handed out again; one
log id; the stats tally holds. The seed decides every choice and the
interleaving, so ``--crash-seed S`` replays a run exactly.
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from typing import Any

from scheduling import WAIT, AsyncioSubmitter, Scheduler, ThreadSubmitter
from simfs import SimFileSystem

from walbatch import DurableBatcher, PermanentSinkError, SinkError, WalbatchError
from walbatch.dlq import DLQ_FILE, DeadLetterStore

DIR = "/data/log"
THREADS = 3
TASKS = 3


class Sink:
    """Takes good items, refuses bad ones; waits while closed; a dead process delivers nothing."""

    def __init__(self, fs: SimFileSystem) -> None:
        self.fs = fs
        self.open = threading.Event()
        self.closing = False
        self.rows: dict[int, Any] = {}
        self.damaged: list[str] = []
        self.redelivered = 0

    def write(self, batch: Any) -> list[BaseException | None]:
        while not self.open.wait(0.01):
            if self.closing or not self.fs.alive():
                raise SinkError("the sink is closed", retryable=True)
        if not self.fs.alive():
            raise SinkError("a dead process delivers nothing", retryable=True)
        outcomes: list[BaseException | None] = []
        for r in batch:
            if r.item["bad"]:
                outcomes.append(PermanentSinkError("refused"))
                continue
            if r.seq in self.rows:
                self.redelivered += 1
                if self.rows[r.seq] != r.item:
                    self.damaged.append(f"seq {r.seq}: first {self.rows[r.seq]!r}, now {r.item!r}")
            else:
                self.rows[r.seq] = r.item
            outcomes.append(None)
        return outcomes


class Run:
    """The bookkeeping of one run: what was acknowledged, what went wrong."""

    def __init__(self) -> None:
        self.acked: dict[int, Any] = {}
        self.reused: list[str] = []
        self.tried: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.n = 0

    def item(self, cycle: int, who: str, bad: bool) -> dict[str, Any]:
        with self.lock:
            self.n += 1
            item = {"id": f"{cycle}-{who}-{self.n}", "bad": bad, "p": "x" * (self.n * 13 % 90)}
            self.tried[item["id"]] = item
        return item

    def ack(self, seqs: Any, items: list[Any]) -> None:
        with self.lock:
            for seq, item in zip(seqs, items, strict=True):
                first = self.acked.setdefault(seq, item)  # the first ack is the one kept
                if first != item:
                    self.reused.append(f"seq {seq}: {first!r} then {item!r}")


def _call(b: DurableBatcher, items: list[Any], many: bool, run: Run) -> None:
    try:
        seqs = list(b.submit_many(items).seqs) if many else [b.submit(items[0]).seq]
    except (OSError, WalbatchError):
        return  # the machine died under us: not acknowledged
    run.ack(seqs, items)


def deliver(b: DurableBatcher, sink: Sink, fs: SimFileSystem) -> bool:
    """Open the sink and flush; False if the power failed meanwhile."""
    generation = fs.generation
    sink.open.set()
    deadline = time.monotonic() + WAIT
    try:
        while True:
            try:
                b.flush(timeout=0.05)
                return True
            except (TimeoutError, OSError, WalbatchError):
                if fs.generation != generation:
                    return False
                if time.monotonic() > deadline:
                    raise
    finally:
        sink.open.clear()


def power_loss_run(rng: Any, cycles: int, fs: SimFileSystem) -> dict[str, int]:
    run = Run()
    sink = Sink(fs)
    counts = {"crash_in_submit": 0, "crash_in_delivery": 0, "no_crash": 0, "cycles_with_followers": 0}
    log_ids = set()
    for cycle in range(cycles):
        opts = dict(segment_bytes=rng.choice([256, 700, 1 << 20]), max_log_bytes=1 << 30,
                    max_items=rng.randint(2, 9), max_delay=3600.0, checkpoint_interval=0.0,
                    retry_initial_delay=0.001, retry_max_delay=0.005)
        sink.closing = False
        b = DurableBatcher(DIR, sink, _fs=fs, **opts)
        log_ids.add(b.log_id)
        crashed = False
        with Scheduler(fs) as sched:
            threads = [ThreadSubmitter(sched, f"c{cycle}-t{k}") for k in range(THREADS)]
            aio = AsyncioSubmitter(sched, f"c{cycle}-aio")
            aio.install(b)
            crash_round, where = rng.randrange(4), rng.choice(["submit", "delivery"])
            for rnd in range(4):
                if _submit_round(sched, fs, run, rng, cycle, b, threads, aio,
                                 crash=rnd == crash_round and where == "submit"):
                    crashed = True
                    counts["crash_in_submit"] += 1
                    break
                if rnd == crash_round and where == "delivery":
                    fs.crash_after(rng.randint(1, 25), rng, "random")
                if not deliver(b, sink, fs):
                    crashed = True
                    counts["crash_in_delivery"] += 1
                    break
                fs.disarm()
            sched.wait_parked()
            for a in [*threads, aio]:
                a.stop()
            counts["cycles_with_followers"] += sched.most_waiting >= 2
        if not crashed:
            counts["no_crash"] += 1
            fs.crash(rng, "random")  # pull the plug at the end of the cycle
        sink.closing = True
        b.close(timeout=0)
    sink.closing = False
    sink.open.set()
    b = DurableBatcher(DIR, sink, _fs=fs, max_delay=0.001)
    log_ids.add(b.log_id)
    b.flush(timeout=60)
    stats = b.stats()
    b.close()
    store = DeadLetterStore(fs.local_path(f"{DIR}/{DLQ_FILE}"))
    dead = {d.seq: d for d in store.list()}
    store.close()
    lost = damaged = 0
    for seq, item in run.acked.items():
        if item["bad"]:
            d = dead.get(seq)
            lost += d is None or d.item != item
        elif sink.rows.get(seq) != item:
            lost += 1
    for seq, item in sink.rows.items():
        damaged += run.tried.get(item["id"]) != item or (seq in run.acked and run.acked[seq] != item)
    tally_ok = stats.submitted == stats.delivered + stats.dead_lettered + stats.pending
    return {"cycles": cycles, **counts, "acknowledged": len(run.acked), "delivered": len(sink.rows),
            "dead_lettered": len(dead), "lost": lost, "reused": len(run.reused),
            "damaged": damaged + len(sink.damaged), "redelivered": sink.redelivered,
            "corruption": sum(1 for d in dead.values() if d.lost), "log_ids": len(log_ids),
            "tally_ok": int(tally_ok), "pending": stats.pending,
            "digest": zlib.crc32(repr((sorted(run.acked.items()), sorted(sink.rows.items()),
                                       sorted((s, d.item) for s, d in dead.items()))).encode())}


def _submit_round(sched: Scheduler, fs: SimFileSystem, run: Run, rng: Any, cycle: int, b: DurableBatcher,
                  threads: list[ThreadSubmitter], aio: AsyncioSubmitter, crash: bool) -> bool:
    """One round of concurrent submits; True if the power failed in it."""
    plans: dict[Any, int] = {t: rng.randint(1, 4) for t in threads}
    plans[aio] = rng.randint(0, 2)
    crash_at = rng.randint(1, 40) if crash else None
    steps = 0
    sched.wait_parked()
    while True:
        gated = sched.gated()
        idle = [a for a, left in plans.items() if left and not a.busy]
        if not gated and not idle and not any(a.busy for a in plans):
            return False
        steps += 1
        if gated and crash_at is not None and steps >= crash_at:
            thread, op, _path = gated[0]
            if rng.random() < 0.5:
                fs.crash(rng, "random")  # before the operation
            else:
                fs.crash_after(rng.choice([1, 2]) if op == "write_file" else 1, rng, "random")
            for t, _op, _p in sched.gated():
                sched.release(t)
            sched.wait_parked()
            while any(a.busy for a in plans):  # their calls fail: the machine is dead
                for t, _op, _p in sched.gated():
                    sched.release(t)
                sched.wait_parked()
            return True
        if idle and (not gated or rng.random() < 0.6):
            actor = rng.choice(idle)
            plans[actor] -= 1
            if actor is aio:
                aio.go(_aio_round(b, run, rng, cycle, rng.randint(1, TASKS)))
            else:
                many = rng.random() < 0.3
                items = [run.item(cycle, actor.thread.name, rng.random() < 0.2)
                         for _ in range(rng.randint(1, 5) if many else 1)]
                actor.go(lambda b=b, items=items, many=many: _call(b, items, many, run))
        else:
            sched.release(gated[0][0])
        sched.wait_parked()


def _aio_round(b: DurableBatcher, run: Run, rng: Any, cycle: int, tasks: int) -> Any:
    plan = [(rng.random() < 0.3, [run.item(cycle, f"aio{t}", rng.random() < 0.2)
                                  for _ in range(rng.randint(1, 3))]) for t in range(tasks)]

    async def one(many: bool, items: list[Any]) -> None:
        try:
            if many:
                seqs = list((await b.asubmit_many(items)).seqs)
            else:
                items = items[:1]
                seqs = [(await b.asubmit(items[0])).seq]
        except (OSError, WalbatchError):
            return
        run.ack(seqs, items)

    async def round_() -> None:
        import asyncio

        await asyncio.gather(*(one(many, items) for many, items in plan))

    return round_


def test_power_loss_loses_nothing_acknowledged(scenario):
    result = power_loss_run(scenario.rng, scenario.iterations(25), SimFileSystem())
    result.pop("digest")
    scenario.add(**result)
    assert result["lost"] == 0, scenario.line()
    assert result["reused"] == 0, scenario.line()
    assert result["damaged"] == 0 and result["corruption"] == 0, scenario.line()
    assert result["log_ids"] == 1, scenario.line()
    assert result["tally_ok"] == 1 and result["pending"] == 0, scenario.line()
    # The run exercised what it is for (a seed that does not is a broken test).
    assert result["crash_in_submit"] and result["crash_in_delivery"], scenario.line()
    assert result["cycles_with_followers"] and result["dead_lettered"], scenario.line()


def test_the_check_catches_a_log_that_skips_fsync(scenario):
    """The same run on a file system whose fsync and O_DSYNC do nothing must be caught losing data."""
    result = power_loss_run(scenario.rng, 6, SimFileSystem(skip_fsync=True))
    result.pop("digest")
    scenario.add(**result)
    assert result["lost"] > 0 or result["log_ids"] > 1, (
        "a log without fsync survived power losses: the harness cannot see the bug it looks for")


def test_a_run_replays_exactly_from_its_seed(scenario):
    """Same seed, same run: every count, and every acknowledged, delivered and dead item."""
    first = power_loss_run(random.Random(scenario.seed), 5, SimFileSystem())
    second = power_loss_run(random.Random(scenario.seed), 5, SimFileSystem())
    scenario.add(cycles=10, acknowledged=first["acknowledged"])
    assert first == second
