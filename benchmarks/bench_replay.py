#!/usr/bin/env python
"""Recovery from a large backlog: `walbatch replay` rate, `--dry-run` scan rate, and memory.

    python benchmarks/bench_replay.py [--items 5M] [--memory-backlogs 1M,10M] [--dir DIR]
                                      [--only KEYS] [--json FILE]

One run, on the disk under ``--dir`` (avoid a tmpfs). A writer-only DurableBatcher
(``DurableBatcher(dir, None)``, no sink) first writes a backlog of ``--items`` items
(``submit_many`` of 1,000 small dicts, untimed), then each row runs the real command
line in a child process and times it from start to exit (Python's start-up included,
as a user waits for it), reading the command's peak resident memory (``ru_maxrss``,
through GNU time's ``%M``; no psutil):

* ``replay-sqlite``  ``walbatch replay --sink sqlite:///…?table=items`` on a copy of the
                     backlog; the table's row count is checked.
* ``replay-file``    ``walbatch replay --sink file:///….jsonl`` on a copy; lines counted.
* ``dry-run``        ``walbatch replay --dry-run``: read, check and decode every record.
* ``memory-*``       for each backlog in ``--memory-backlogs`` (written the same way):
                     ``walbatch status``, ``walbatch replay --dry-run`` and ``walbatch
                     replay --sink file:…``, each with its peak RSS. 100M items is a
                     few GB of log and minutes to write: pass ``--memory-backlogs 1M,100M``.

Targets: replay into sqlite: and file: >= 400k items/s; dry-run >= 3M
records/s; status and replay under 60 MiB of RSS, and flat (at most 10% more) from
the smallest backlog to the largest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _e2e import BUSY_CORES, cpu_snapshot, other_cpu_cores
from _run import Target, count_arg, document, now, print_targets, write_json

TS = 1700000000.123
REPLAY_RATE = 400_000.0
SCAN_RATE = 3_000_000.0
RSS_MIB = 60.0
FLAT = 1.10  # the largest backlog's RSS over the smallest's
CHUNK = 1000


def make_item(i: int) -> dict[str, Any]:
    return {"user_id": i, "action": "login", "ts": TS}


def write_backlog(directory: str, items: int) -> float:
    """A log of ``items`` undelivered items; returns the seconds it took (not a result row)."""
    from walbatch import DurableBatcher

    t0 = time.perf_counter()
    # A quota above the backlog: the writer must not block on its own log.
    quota = max(1 << 30, items * 64)
    with DurableBatcher(directory, None, max_log_bytes=quota) as b:
        for first in range(0, items, CHUNK):
            b.submit_many([make_item(i) for i in range(first, min(items, first + CHUNK))])
    return time.perf_counter() - t0


TIME = "/usr/bin/time"


def run_cli(args: list[str], workdir: str) -> dict[str, Any]:
    """Run ``walbatch ARGS``; its wall time, peak RSS, exit code and output.

    The peak RSS is GNU time's ``%M`` (``ru_maxrss`` of the command). Not our own
    ``wait4``: Linux carries the high-water mark of the process that forked across
    ``exec``, so a child of this (large) benchmark process would report our size.
    """
    if not os.path.exists(TIME):
        raise RuntimeError(f"{TIME} is needed for the peak RSS (Debian: apt-get install time)")
    out_path, rss_path = os.path.join(workdir, "cli.out"), os.path.join(workdir, "cli.rss")
    with open(out_path, "w+") as out:
        t0 = time.perf_counter()
        code = subprocess.call([TIME, "-f", "%M", "-o", rss_path, sys.executable, "-m", "walbatch", *args],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    if code != 0:
        raise RuntimeError(f"walbatch {' '.join(args)} exited {code}: {text[-2000:]}")
    with open(rss_path) as f:
        kib = int(f.read().split()[-1])
    return {"seconds": elapsed, "max_rss_mib": round(kib / 1024, 1), "output": text.strip()}


def replay_row(backlog: str, items: int, workdir: str, sink: str) -> dict[str, Any]:
    """``walbatch replay`` of a copy of ``backlog`` into a fresh ``sink`` ('sqlite' or 'file')."""
    copy = os.path.join(workdir, f"replay-{sink}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(backlog, copy)
    if sink == "sqlite":
        target = os.path.join(workdir, "replay.db")
        url = f"sqlite:///{target}?table=items"
    else:
        target = os.path.join(workdir, "replay.jsonl")
        url = f"file:///{target.lstrip('/')}"
    for leftover in (target, target + "-wal", target + "-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    r = run_cli(["replay", "--data-dir", copy, "--sink", url], workdir)
    if sink == "sqlite":
        with sqlite3.connect(target) as c:
            stored = c.execute("SELECT count(*) FROM items").fetchone()[0]
    else:
        with open(target, "rb") as f:
            stored = sum(1 for _ in f)
    if stored != items or f"delivered {items} item(s)" not in r["output"]:
        raise RuntimeError(f"replay into {sink}: {stored} of {items} stored; it said {r['output']!r}")
    shutil.rmtree(copy, ignore_errors=True)
    os.unlink(target)
    return {"writer": f"walbatch replay --sink {sink}:…, {items:,} items", "items": items, **r,
            "output": r["output"].splitlines()[-1]}


def dry_run_row(backlog: str, items: int, workdir: str) -> dict[str, Any]:
    r = run_cli(["replay", "--data-dir", backlog, "--dry-run"], workdir)
    if f"would deliver {items} item(s)" not in r["output"]:
        raise RuntimeError(f"dry run: expected {items} items, it said {r['output']!r}")
    return {"writer": f"walbatch replay --dry-run, {items:,} records", "items": items, **r}


def status_row(backlog: str, items: int, workdir: str) -> dict[str, Any]:
    r = run_cli(["status", "--data-dir", backlog, "--json"], workdir)
    if json.loads(r["output"]).get("backlog") != items:
        raise RuntimeError(f"status: expected a backlog of {items}, it said {r['output'][-500:]!r}")
    return {"writer": f"walbatch status, {items:,}-item backlog", "items": None, **r,
            "output": None}


def human(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=count_arg, default=5_000_000,
                   help="backlog for the replay and dry-run rows (default 5M; 500k, 20M, ... work)")
    p.add_argument("--memory-backlogs", default="1M,10M",
                   help="comma-separated backlogs for the memory rows (default 1M,10M; 1M,100M writes "
                        "GBs of log)")
    p.add_argument("--dir", default=".", help="where the logs go (the disk under test; not a tmpfs)")
    p.add_argument("--only", default="", help="comma-separated row groups: replay-sqlite, replay-file, "
                   "dry-run, memory")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout)")
    args = p.parse_args(argv)
    try:
        args.memory = sorted({count_arg(x) for x in args.memory_backlogs.split(",") if x.strip()})
    except argparse.ArgumentTypeError as ex:
        p.error(f"--memory-backlogs: {ex}")
    groups = ["replay-sqlite", "replay-file", "dry-run", "memory"]
    args.groups = groups
    if args.only:
        wanted = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = [g for g in wanted if g not in groups]
        if unknown:
            p.error(f"unknown row group(s) {unknown}; choose from {', '.join(groups)}")
        args.groups = [g for g in groups if g in wanted]
    if "memory" in args.groups and len(args.memory) < 2:
        p.error("--memory-backlogs needs two sizes or more (memory must stay flat between them)")
    return args


def main(argv: list[str] | None = None) -> int:
    started = now()
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="walbatch-bench-replay-", dir=args.dir)
    rows: list[dict[str, Any]] = []
    log = sys.stderr

    def timed(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"  {key} ...", end="", file=log, flush=True)
        before = cpu_snapshot()
        r = fn()
        other = other_cpu_cores(before)
        r["key"] = key
        r["other_cores"] = None if other is None else round(other, 3)
        r["seconds"] = round(r["seconds"], 3)
        if r.get("items"):
            r["items_per_s"] = round(r["items"] / r["seconds"], 1)
        rows.append(r)
        rate = f"{r['items_per_s']:,.0f} items/s, " if r.get("items") else ""
        print(f" {rate}{r['seconds']:.2f} s, peak RSS {r['max_rss_mib']:.1f} MiB", file=log, flush=True)

    backlogs: dict[int, float] = {}

    def backlog(items: int) -> str:
        d = os.path.join(base, f"backlog-{items}")
        if items not in backlogs:
            print(f"  writing a backlog of {items:,} items ...", end="", file=log, flush=True)
            backlogs[items] = write_backlog(d, items)
            print(f" {backlogs[items]:.1f} s", file=log, flush=True)
        return d

    try:
        if {"replay-sqlite", "replay-file", "dry-run"} & set(args.groups):
            d = backlog(args.items)
            if "dry-run" in args.groups:
                timed("dry-run", lambda: dry_run_row(d, args.items, base))
            for sink in ("sqlite", "file"):
                if f"replay-{sink}" in args.groups:
                    timed(f"replay-{sink}", lambda sink=sink: replay_row(d, args.items, base, sink))
            if args.items not in args.memory:
                shutil.rmtree(d, ignore_errors=True)
        if "memory" in args.groups:
            for n in args.memory:
                d = backlog(n)
                h = human(n)
                timed(f"memory-status-{h}", lambda d=d, n=n: status_row(d, n, base))
                timed(f"memory-dry-run-{h}", lambda d=d, n=n: dry_run_row(d, n, base))
                timed(f"memory-replay-file-{h}", lambda d=d, n=n: replay_row(d, n, base, "file"))
                shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    by_key = {r["key"]: r for r in rows}
    targets: list[Target] = []
    for sink in ("sqlite", "file"):
        r = by_key.get(f"replay-{sink}")
        if r:
            targets.append(Target(f"walbatch replay, {sink}: sink", r["items_per_s"], REPLAY_RATE, "rate",
                                  "items/s", detail=f"{r['items']:,} items in {r['seconds']:.2f} s"))
    r = by_key.get("dry-run")
    if r:
        targets.append(Target("walbatch replay --dry-run scan", r["items_per_s"], SCAN_RATE, "rate",
                              "records/s", detail=f"{r['items']:,} records in {r['seconds']:.2f} s"))
    if "memory" in args.groups:
        small, large = human(args.memory[0]), human(args.memory[-1])
        for what, prefix in (("walbatch status", "memory-status-"),
                             ("walbatch replay", "memory-replay-file-")):
            rss = {h: by_key[prefix + h]["max_rss_mib"] for h in (human(n) for n in args.memory)}
            targets.append(Target(f"{what} peak RSS", max(rss.values()), RSS_MIB, "mib", op="<=",
                                  detail=", ".join(f"{v:.1f} MiB at {k}" for k, v in rss.items())))
            targets.append(Target(f"{what} RSS flat from {small} to {large} items of backlog",
                                  rss[large] / rss[small], FLAT, "ratio", f"the {small} RSS", op="<=",
                                  detail=f"{rss[small]:.1f} -> {rss[large]:.1f} MiB"))

    print()
    print(f"| {'row':<24} | {'what':<50} | {'items/s':>11} | {'seconds':>8} | {'peak RSS MiB':>12} |")
    print(f"|{'-' * 26}|{'-' * 52}|{'-' * 12}:|{'-' * 9}:|{'-' * 13}:|")
    for r in rows:
        rate = f"{r['items_per_s']:,.0f}" if r.get("items_per_s") else "—"
        print(f"| {r['key']:<24} | {r['writer']:<50} | {rate:>11} | {r['seconds']:>8.2f} | "
              f"{r['max_rss_mib']:>12.1f} |")
    for r in rows:
        if r["other_cores"] is not None and r["other_cores"] >= BUSY_CORES:
            print(f"WARNING: other processes kept {r['other_cores']:.2f} CPU cores busy during {r['key']}")
    print_targets(targets)
    write_json(document("replay", args.dir, rows, targets, started=started, script=__file__,
                        argv=argv and [__file__, *argv],
                        settings={"items": args.items, "memory_backlogs": args.memory,
                                  "item": make_item(0), "submit_many": CHUNK},
                        backlog_write_seconds={str(k): round(v, 2) for k, v in backlogs.items()}),
               args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
