#!/usr/bin/env python
"""What the Prometheus metrics cost the data path: `walbatch.metrics.register` on and off.

    python benchmarks/bench_metrics.py [--seconds 3] [--rounds 3] [--dir DIR] [--json FILE]

The metrics read counters and gauges from ``stats()`` at scrape time (free for the data
path); only the histograms are observed on it: per group commit (fsync time, group
size, the acknowledgement clock), per batch (its size) and per sink call (its time).
Two ways to see the cost, both from one run:

* **Hot-path share** (the target): every hook the metrics add, timed alone (best of
  several ``timeit`` runs of the metrics' observer), times how often the data path
  called it during a run with the metrics on (group commits, batches and sink calls
  from ``stats()``), over that run's duration: the fraction of one core the
  observations took. Precise whatever the disk does.
* **Throughput on and off**: the same workload with and without the metrics, ``--rounds``
  times each, alternating (on, off, on, off, ...): the median rates and their ratio. On a
  noisy disk this moves by several percent between rounds either way, so it is shown,
  not held to a target.

Workloads: ``submit()`` from 16 threads (one group commit per few items: the most hook
calls per item) and ``submit_many(1000)`` from 1 thread, a no-op sink.
Target: the hot-path share <= 2% for each workload.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import timeit
from typing import Any

from _e2e import BUSY_CORES, cpu_snapshot, other_cpu_cores
from _run import Target, busy, document, now, print_targets, write_json

from walbatch import DurableBatcher
from walbatch.record import Batch, Record

TARGET = 0.02
ITEM = {"user_id": 1, "action": "login", "ts": 1700000000.123}
WORKLOADS = {"16t": "submit(), 16 threads", "many": "submit_many(1000), 1 thread"}


def run(base: str, workload: str, seconds: float, metrics_on: bool) -> dict[str, Any]:
    """One run; items/s and the hook calls the metrics would observe."""
    from prometheus_client import CollectorRegistry

    from walbatch import metrics

    directory = tempfile.mkdtemp(dir=base)
    b = DurableBatcher(directory, lambda batch: None, max_delay=0.05)
    try:
        if metrics_on:
            metrics.register(b, CollectorRegistry())
        before = b.stats()
        stop = time.perf_counter() + seconds
        counts = [0] * (16 if workload == "16t" else 1)

        def worker(t: int) -> None:
            n = 0
            if workload == "16t":
                while time.perf_counter() < stop:
                    b.submit(ITEM)
                    n += 1
            else:
                batch = [ITEM] * 1000
                while time.perf_counter() < stop:
                    b.submit_many(batch)
                    n += 1000
            counts[t] = n

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(counts))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t0
        b.flush(60)
        after = b.stats()
    finally:
        b.close()
        shutil.rmtree(directory, ignore_errors=True)
    batches = sum(after.batches_by_reason.values()) - sum(before.batches_by_reason.values())
    return {"items_per_s": sum(counts) / elapsed, "seconds": elapsed,
            "commit_groups": after.commit_groups - before.commit_groups,
            "batches": batches, "sink_calls": batches + after.retries - before.retries}


def hook_costs() -> dict[str, float]:
    """Seconds per call of each hook the metrics' observer implements (best of 5)."""
    from prometheus_client import CollectorRegistry

    from walbatch import metrics

    base = tempfile.mkdtemp()
    try:
        with DurableBatcher(base, None) as b:
            obs = metrics.register(b, CollectorRegistry())._observer
            batch = Batch([Record(1, ITEM)], "log", "size")
            n = 20000
            seq = iter(range(1, 10**9))

            def best(fn: Any) -> float:
                return min(timeit.repeat(fn, number=n, repeat=5)) / n

            return {
                "fsynced": best(lambda: obs.fsynced(0.0002, next(seq), 10)),
                "batch_closed": best(lambda: obs.batch_closed("size", 500)),
                "sink_called": best(lambda: obs.sink_called(batch, 0.001, None, False)),
            }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="per run (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="runs with and without, each (default 3)")
    p.add_argument("--dir", default=".", help="where the logs go (the disk under test; not a tmpfs)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        p.error("--seconds and --rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    started = now()
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="walbatch-bench-metrics-", dir=args.dir)
    costs = hook_costs()
    rows: list[dict[str, Any]] = []
    targets: list[Target] = []
    try:
        for workload, what in WORKLOADS.items():
            runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
            cpu = cpu_snapshot()
            for _ in range(args.rounds):
                for on in (True, False):
                    runs[on].append(run(base, workload, args.seconds, on))
            other = other_cpu_cores(cpu)
            on_rate = statistics.median(r["items_per_s"] for r in runs[True])
            off_rate = statistics.median(r["items_per_s"] for r in runs[False])
            # The hot-path share, from the runs with the metrics on.
            shares = [(r["commit_groups"] * costs["fsynced"] + r["batches"] * costs["batch_closed"]
                       + r["sink_calls"] * costs["sink_called"]) / r["seconds"] for r in runs[True]]
            share = max(shares)
            for on in (True, False):
                rows.append({
                    "key": f"{workload}-{'on' if on else 'off'}", "workload": workload,
                    "writer": f"walbatch {what}, metrics {'on' if on else 'off'}",
                    "items_per_s": round(on_rate if on else off_rate, 1),
                    "rates": [round(r["items_per_s"], 1) for r in runs[on]],
                    "commit_groups_per_s": round(statistics.median(
                        r["commit_groups"] / r["seconds"] for r in runs[on]), 1),
                    "batches_per_s": round(statistics.median(
                        r["batches"] / r["seconds"] for r in runs[on]), 1),
                    "hot_path_share": round(share, 6) if on else None,
                    "on_vs_off": round(on_rate / off_rate, 4) if on else None,
                    "other_cores": None if other is None else round(other, 3),
                })
            print(f"  {workload}: on {on_rate:,.0f}/s, off {off_rate:,.0f}/s "
                  f"({on_rate / off_rate:.3f}x); hot path {share * 100:.3f}% of a core",
                  file=sys.stderr, flush=True)
            targets.append(Target(f"metrics on the hot path, {what}", share, TARGET, "percent",
                                  "of one core", op="<=",
                                  detail=f"throughput on/off, median of {args.rounds}: "
                                         f"{on_rate:,.0f} vs {off_rate:,.0f} items/s "
                                         f"({on_rate / off_rate:.3f}x)"))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print("walbatch metrics: the data path with and without walbatch.metrics.register")
    print(f"hook cost (µs per call): fsynced {costs['fsynced'] * 1e6:.2f}, batch_closed "
          f"{costs['batch_closed'] * 1e6:.2f}, sink_called {costs['sink_called'] * 1e6:.2f}")
    print(f"{'writer':<52} {'items/s':>12} {'groups/s':>10} {'hot path':>9}")
    for r in rows:
        hp = "" if r["hot_path_share"] is None else f"{r['hot_path_share'] * 100:.3f}%"
        print(f"{r['writer']:<52} {r['items_per_s']:>12,.0f} {r['commit_groups_per_s']:>10,.0f} {hp:>9}")
    for r in rows:
        if r["other_cores"] is not None and r["other_cores"] >= BUSY_CORES:
            print(f"WARNING: other processes kept {r['other_cores']:.2f} CPU cores busy during {r['key']}")
    print_targets(targets)
    doc = document("metrics", args.dir, rows, targets, started=started, script=__file__,
                   argv=argv and [__file__, *argv],
                   settings={"seconds_per_run": args.seconds, "rounds": args.rounds, "item": ITEM,
                             "hook_cost_s": costs})
    doc["busy"] = busy(rows)
    write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
