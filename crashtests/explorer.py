"""The crash explorer: walbatch's promise on every state a power loss could leave.

It runs the real code on a real directory (explorer_workload.py: concurrent
submitters, threads and asyncio, dead letters, segment rolls and deletions, a
close and a reopen, then a dead stop), records the file-system system calls it
makes with strace, and builds from them the trees a power loss could have left
(crashstates.py: everything up to a durability point, any prefix of what came
after, torn last writes). It then opens each tree with a real DurableBatcher,
lets it deliver, submits one more item, and checks the promise against what
the workload's outside world saw before the crash (the acknowledgements and
deliveries it recorded outside the tree):

- every acknowledged item was delivered before the crash, is delivered now,
  or (a refused one) is in the dead-letter store, with its payload intact;
- nothing reaches the sink or the dead letters that was never submitted, and
  no seq arrives with two different items;
- recovery raises nothing (no CorruptLog on a state a crash can leave) and
  records nothing as lost to corruption;
- the next seq handed out is above every acknowledged and every delivered one;
- ``submitted == delivered + dead_lettered + pending`` with nothing pending.

Crash points: the return of every durability point (the crash comes just
before it: the most acknowledged with the least durable), every delivery, and
the end. At each, the state that kept only what was durable, the one that kept
everything, and (seeded) prefixes and torn writes. States whose tree is the
same are recovered once. States in which an acknowledged item's bytes are
found in no file are tried first (they are where a missing sync shows), then
the rest in seeded random order, up to ``--states``.

Run: ``python crashtests/explorer.py [--seed N] [--states N|0 for all] [--prefixes N|0 for all]``.
Exit status 1 and a report of each violation if the promise broke; the trace
and the first failing tree are kept (``--replay DIR`` explores a kept trace
again, exactly as before, for the same seed).
"""

from __future__ import annotations

import argparse
import bisect
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from crashstates import CrashState, FsHistory, Op, tree_digest, write_tree  # noqa: E402
from explorer_workload import is_bad, make_item, parse_acks, parse_delivered  # noqa: E402
from systrace import Trace  # noqa: E402

WORKLOAD = os.path.join(HERE, "explorer_workload.py")
DEFAULT_STATES = 150
REQUIRED_COVERAGE = ("segment data", "segment roll", "segment deletion", "checkpoint",
                     "synced marker", "dead letters")


# ------------------------------------------------------------------ recording


@dataclass
class Recording:
    directory: str
    history: FsHistory
    acks: list[tuple[int, int, str]]
    """(trace line of the write's start, seq, id): acknowledged from that moment."""
    deliveries: list[tuple[int, int, str]]
    """(trace line of the write's return, seq, id): delivered from that moment."""
    calls: int
    seconds: float
    package: str
    """The walbatch package the workload ran."""


def record(directory: str, seed: int, timeout: float = 300.0) -> str:
    """Run the workload under strace in ``directory``; return it (root/, ext/, trace)."""
    root, ext = os.path.join(directory, "root"), os.path.join(directory, "ext")
    os.makedirs(root)
    os.makedirs(ext)
    trace = os.path.join(directory, "trace")
    proc = subprocess.run([sys.executable, WORKLOAD, root, ext, trace, str(seed)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the workload failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return directory


def load(directory: str) -> Recording:
    t0 = time.monotonic()
    root, ext = os.path.join(directory, "root"), os.path.join(directory, "ext")
    calls = Trace(os.path.join(directory, "trace")).calls
    acks_path, delivered_path = os.path.join(ext, "acks"), os.path.join(ext, "delivered")
    history = FsHistory(root, external=(acks_path, delivered_path))
    history.feed(calls)
    acks, deliveries = [], []
    for w in history.external_writes:
        if w.path == os.path.realpath(acks_path):
            acks += [(w.start, seq, i) for seq, i in parse_acks(w.data)]
        else:
            deliveries += [(w.end, seq, i) for seq, i in parse_delivered(w.data)]
    acks.sort()
    deliveries.sort()
    with open(os.path.join(ext, "package")) as f:
        package = f.read()
    return Recording(directory, history, acks, deliveries, len(calls), time.monotonic() - t0, package)


# ------------------------------------------------------------------ recovery


@dataclass
class Outcome:
    """What a recovery of one tree found."""

    error: str | None = None
    delivered: dict[int, Any] = field(default_factory=dict)
    dead: dict[int, tuple[Any, bool, str]] = field(default_factory=dict)
    probe_seq: int = 0
    tally: str | None = None


class _Sink:
    def __init__(self) -> None:
        self.got: dict[int, list[Any]] = {}

    def write(self, batch):  # noqa: ANN001, ANN201
        from walbatch import PermanentSinkError

        outcomes = []
        for r in batch:
            self.got.setdefault(r.seq, []).append(r.item)
            bad = isinstance(r.item, dict) and r.item.get("bad")
            outcomes.append(PermanentSinkError("the workload refuses bad items") if bad else None)
        return outcomes


def recover(tree_dir: str) -> Outcome:
    """Open the tree's log with a real DurableBatcher, deliver, submit one more item, close."""
    from walbatch import DurableBatcher
    from walbatch.dlq import list_dead_letters

    out = Outcome()
    data = os.path.join(tree_dir, "data")
    sink = _Sink()
    try:
        b = DurableBatcher(data, sink, max_delay=0.001, checkpoint_interval=0.0)
        try:
            b.flush(timeout=60)
            s = b.stats()
            if s.pending or s.submitted != s.delivered + s.dead_lettered + s.pending:
                out.tally = repr(s)
            out.probe_seq = b.submit(make_item("probe-0000")).seq
        finally:
            b.close(timeout=60)
        for d in list_dead_letters(data):
            out.dead[d.seq] = (d.item, d.lost, d.error)
    except Exception as ex:  # noqa: BLE001 - any failure to recover is the finding
        out.error = f"{type(ex).__name__}: {ex}"
    for seq, items in sink.got.items():
        if any(i != items[0] for i in items):
            out.error = (out.error or "") + f" seq {seq} delivered as different items {items!r}"
        out.delivered[seq] = items[0]
    return out


# ------------------------------------------------------------------ checking


def check(rec: Recording, state: CrashState, out: Outcome) -> list[str]:
    """Everything in ``out`` that breaks the promise for a crash at ``state.at``."""
    at = state.at
    acked = {seq: i for _pos, seq, i in rec.acks[:bisect.bisect_left(rec.acks, (at,))]}
    before = {seq: i for _pos, seq, i in rec.deliveries[:bisect.bisect_left(rec.deliveries, (at,))]}
    problems: list[str] = []
    if out.error:
        problems.append(f"RECOVERY FAILED: {out.error}")
    if out.tally:
        problems.append(f"TALLY: after a flush {out.tally}")
    for seq, item_id in sorted(acked.items()):
        item = make_item(item_id)
        if is_bad(item_id):
            d = out.dead.get(seq)
            if d is None or d[0] != item:
                problems.append(f"LOST seq {seq} ({item_id}, refused by the sink): "
                                f"not in the dead letters ({d!r})")
        elif before.get(seq) != item_id and out.delivered.get(seq) != item:
            problems.append(f"LOST seq {seq} ({item_id}): acknowledged, delivered neither before "
                            f"the crash nor after ({out.delivered.get(seq)!r})")
    where: dict[str, set[int]] = {}
    for seq, item_id in before.items():
        where.setdefault(item_id, set()).add(seq)
    for seq, item in sorted(out.delivered.items()):
        item_id = item.get("id") if isinstance(item, dict) else None
        if item_id == "probe-0000" and seq == out.probe_seq:
            continue
        if not isinstance(item_id, str) or item != make_item(item_id):
            problems.append(f"DAMAGED seq {seq}: delivered {item!r}, which was never submitted")
            continue
        if seq in acked and acked[seq] != item_id or seq in before and before[seq] != item_id:
            problems.append(f"REUSED seq {seq}: delivered {item_id}, but it was "
                            f"{acked.get(seq) or before.get(seq)} before the crash")
        where.setdefault(item_id, set()).add(seq)
    for seq, (item, lost, error) in sorted(out.dead.items()):
        if lost:
            problems.append(f"LOST TO CORRUPTION seq {seq}: {error}")
            continue
        item_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(item_id, str) or item != make_item(item_id) or not item["bad"]:
            problems.append(f"DAMAGED dead letter seq {seq}: {item!r}")
            continue
        where.setdefault(item_id, set()).add(seq)
    for item_id, seqs in sorted(where.items()):
        if len(seqs) > 1:
            problems.append(f"DUPLICATED {item_id} under seqs {sorted(seqs)}")
    high = max([*acked, *before, 0])
    if not out.error and out.probe_seq <= high:
        problems.append(f"SEQ REUSED: the next submit got seq {out.probe_seq}, but seq {high} "
                        "was acknowledged or delivered before the crash")
    return problems


# ---------------------------------------------------------------- exploring


def category(op: Op) -> str:
    name = os.path.basename(op.path)
    if "/segments/" in op.path and name.endswith(".wal"):
        return {"write": "segment data", "truncate": "segment data", "create": "segment roll",
                "unlink": "segment deletion"}.get(op.kind, "segment " + op.kind)
    if name.startswith("checkpoint"):
        return "checkpoint"
    if name == "synced":
        return "synced marker"
    if name.startswith("dlq.db"):
        return "dead letters"
    return "directories" if op.kind == "mkdir" else f"other ({name})"


@dataclass
class Report:
    seed: int
    package: str = ""
    """The walbatch package that ran the workload and the recoveries."""
    calls: int = 0
    ops: int = 0
    durability_points: int = 0
    acks: int = 0
    crash_points: int = 0
    candidates: int = 0
    states: int = 0
    """Distinct trees recovered and checked."""
    checked: int = 0
    """Crash states checked (several may share a tree)."""
    violations: list[tuple[CrashState, list[str], str]] = field(default_factory=list)
    coverage: dict[str, int] = field(default_factory=dict)
    record_seconds: float = 0.0
    explore_seconds: float = 0.0
    kept: str | None = None

    def summary(self) -> str:
        cov = ", ".join(f"{k} {v}" for k, v in sorted(self.coverage.items()))
        return (f"crash explorer ({self.package}): seed={self.seed} calls={self.calls} ops={self.ops} "
                f"durability_points={self.durability_points} acknowledged={self.acks} "
                f"crash_points={self.crash_points} candidates={self.candidates} "
                f"states={self.states} checked={self.checked} violations={len(self.violations)} "
                f"record={self.record_seconds:.1f}s explore={self.explore_seconds:.1f}s\n"
                f"  states that lost or tore: {cov}")


def candidates(rec: Recording, rng: random.Random, prefixes: int = 1) -> list[CrashState]:
    """Crash states at every crash point: durable only, everything, ``prefixes`` seeded
    prefixes of what was lost and as many torn writes (0: every prefix, every torn cut)."""
    h = rec.history
    end = max((op.pos for op in h.ops), default=0) + 1
    points = sorted(set(h.durability_points) | {pos for pos, _s, _i in rec.deliveries} | {end})
    by_pos = {op.pos: op for op in h.ops}
    out: list[CrashState] = []

    def torn(at: int, cut: int, w: Op, choices: list[tuple[int, bool]], what: str) -> None:
        for keep, zeros in choices:
            out.append(CrashState(at, cut, (w.idx, keep, zeros),
                                  f"torn {what}{os.path.basename(w.path)} write ({keep} of "
                                  f"{len(w.data)} bytes{', rest zeros' if zeros else ''})"))

    for at in points:
        out.append(CrashState(at, 0, None, "durable only"))
        out.append(CrashState(at, len(h.ops), None, "everything"))
        lost = h.lost(CrashState(at, 0))
        if lost:
            ks = range(len(lost)) if not prefixes else [rng.randrange(len(lost)) for _ in range(prefixes)]
            for k in sorted(set(ks)):
                out.append(CrashState(at, lost[k].idx, None, f"prefix of {k} of {len(lost)} lost ops"))
            writes = [op for op in lost if op.kind == "write"]
            if writes and prefixes:
                writes = [rng.choice(writes) for _ in range(prefixes)]
            for w in writes:
                choices = h.torn_choices(w)
                if choices:
                    torn(at, w.idx, w, choices if not prefixes else [rng.choice(choices)], "")
        inflight = by_pos.get(at)
        if inflight is not None and inflight.kind == "write" and inflight.durable_at == at:
            choices = h.torn_choices(inflight)
            if choices:
                torn(at, 0, inflight, choices if not prefixes else [rng.choice(choices)],
                     "in-flight O_DSYNC ")
    return out


def explore(rec: Recording, seed: int, states: int = DEFAULT_STATES, stop_at_first: bool = False,
            scratch: str | None = None, keep_failures: str | None = None, prefixes: int = 1) -> Report:
    """Recover and check up to ``states`` distinct trees (0: all of them); ``prefixes``
    as in ``candidates``."""
    t0 = time.monotonic()
    rng = random.Random(seed)
    h = rec.history
    import walbatch

    package = os.path.dirname(walbatch.__file__)
    if package != rec.package:
        raise RuntimeError(f"the workload ran {rec.package} but recovery would run {package}")
    report = Report(seed, package, calls=rec.calls, ops=len(h.ops),
                    durability_points=len(h.durability_points), acks=len(rec.acks))
    cands = candidates(rec, rng, prefixes)
    report.crash_points = len({c.at for c in cands})
    report.candidates = len(cands)
    # Realize every candidate (cheap, in memory): group by tree, flag the suspicious.
    groups: dict[str, list[CrashState]] = {}
    trees: dict[str, dict[str, bytes | None]] = {}
    suspicious: set[str] = set()
    for c in cands:
        tree = h.realize(c)
        digest = tree_digest(tree)
        if digest not in groups:
            groups[digest] = []
            trees[digest] = tree
        groups[digest].append(c)
        if digest not in suspicious and _suspicious(rec, c, tree):
            suspicious.add(digest)
    order = [d for d in groups if d in suspicious]
    rest = [d for d in groups if d not in suspicious]
    rng.shuffle(rest)
    order += rest
    if states:
        order = order[:states]
    scratch = scratch or tempfile.mkdtemp(prefix="walbatch-states-", dir=_fast_tmp())
    logging.getLogger("walbatch").setLevel(logging.CRITICAL)  # torn tails are expected here
    try:
        for n, digest in enumerate(order):
            tree_dir = os.path.join(scratch, f"s{n}")
            write_tree(trees[digest], tree_dir)
            out = recover(tree_dir)
            report.states += 1
            for c in groups[digest]:
                report.checked += 1
                for cat in {category(op) for op in h.lost(c)} | (
                        {category(h.ops[c.torn[0]])} if c.torn else set()):
                    report.coverage[cat] = report.coverage.get(cat, 0) + 1
                problems = check(rec, c, out)
                if problems:
                    if not report.violations and keep_failures:
                        kept = os.path.join(keep_failures, "failed-state")
                        write_tree(trees[digest], kept)
                        report.kept = kept
                    report.violations.append((c, problems, digest))
            shutil.rmtree(tree_dir, ignore_errors=True)
            if stop_at_first and report.violations:
                break
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.explore_seconds = time.monotonic() - t0
    return report


def _suspicious(rec: Recording, state: CrashState, tree: dict[str, bytes | None]) -> bool:
    """Is an acknowledged, undelivered item's id in no file of the tree?"""
    at = state.at
    before = {i for pos, _s, i in rec.deliveries if pos < at}
    blob = b"\0".join(v for v in tree.values() if v)
    for pos, _seq, item_id in rec.acks:
        if pos >= at:
            break
        if item_id not in before and item_id.encode() not in blob:
            return True
    return False


def _fast_tmp() -> str | None:
    """Recovery fsyncs too: on a tmpfs that costs nothing, and nothing here needs it."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def format_violations(report: Report, limit: int = 5) -> str:
    lines = []
    for state, problems, _digest in report.violations[:limit]:
        lines.append(f"- crash at trace line {state.at} ({state.label}; cut={state.cut}, "
                     f"torn={state.torn}):")
        lines += [f"    {p}" for p in problems[:8]]
        if len(problems) > 8:
            lines.append(f"    ... and {len(problems) - 8} more")
    if len(report.violations) > limit:
        lines.append(f"... and {len(report.violations) - limit} more crash states")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=15, help="seeds the workload and the choice of states")
    p.add_argument("--states", type=int, default=DEFAULT_STATES,
                   help=f"distinct crash states to recover (default {DEFAULT_STATES}; 0: all)")
    p.add_argument("--prefixes", type=int, default=1,
                   help="seeded prefixes and torn writes per crash point (default 1; 0: every one)")
    p.add_argument("--stop-at-first", action="store_true", help="stop at the first violation")
    p.add_argument("--replay", metavar="DIR", help="explore a trace kept by an earlier run")
    p.add_argument("--keep", metavar="DIR", help="record into DIR and keep it")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    if args.replay:
        directory = args.replay
    else:
        directory = args.keep or tempfile.mkdtemp(prefix="walbatch-explore-")
        os.makedirs(directory, exist_ok=True)
        record(directory, args.seed)
    recording = load(directory)
    record_seconds = time.monotonic() - t0
    report = explore(recording, args.seed, args.states, args.stop_at_first, keep_failures=directory,
                     prefixes=args.prefixes)
    report.record_seconds = record_seconds
    print(report.summary())
    if report.violations:
        print(f"PROMISE BROKEN in {len(report.violations)} crash state(s):")
        print(format_violations(report))
        print(f"trace kept in {directory}; replay: python {os.path.relpath(__file__)} "
              f"--replay {directory} --seed {args.seed} --states {args.states}")
        return 1
    if not args.replay and not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
