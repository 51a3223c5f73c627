#!/usr/bin/env python
"""Run every benchmark for the README, write its JSON to benchmarks/results/, then render.

    python benchmarks/run_all.py --dir DIR              # the published numbers (~15 min)
    python benchmarks/run_all.py --dir DIR --quick      # every script, briefly (~2 min): does it run?
    python benchmarks/run_all.py --dir DIR --only submit,replay

``DIR`` is where the logs, databases and servers' data go: a directory on the disk
under test, not a tmpfs (/tmp and /dev/shm may be one). Each benchmark runs in its
own process, one after the other (never two at once: they would measure each other);
one that fails leaves its previous JSON alone, and the run ends non-zero. Then
``report.py`` renders the README's and docs' tables and charts from the JSON.

Run it on an otherwise idle machine: every row records how much CPU other processes
used meanwhile, and the tables say "busy" when that was significant. ``--quick`` runs
are for checking the scripts: their JSON says it was a quick run (the command shows
the short durations), and their numbers are not for comparison.

Adding a benchmark: one ``Bench`` line below (its script takes ``--dir`` and
``--json FILE``), then a ``<!-- bench:NAME -->`` section where its table goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    full: list[str] = field(default_factory=list)
    """Arguments of the published run (beyond --dir and --json)."""
    quick: list[str] = field(default_factory=list)
    """Arguments of a --quick run: every row, briefly."""
    minutes: float = 1.0
    """About how long the full run takes on the 2-core development VM."""


BENCHES = [
    Bench("submit", "bench_submit.py", ["--seconds", "5"], ["--seconds", "0.5"], 1.2),
    Bench("daemon", "bench_daemon.py", ["--seconds", "5"], ["--seconds", "1"], 0.6),
    Bench("sqlite", "bench_sqlite.py", ["--seconds", "10"], ["--seconds", "1"], 0.6),
    Bench("replay", "bench_replay.py", ["--items", "5M", "--memory-backlogs", "1M,10M"],
          ["--items", "200k", "--memory-backlogs", "100k,400k"], 4.0),
    Bench("apply", "bench_apply.py", ["--seconds", "10"], ["--seconds", "1", "--users", "20000"], 1.6),
    Bench("postgresql", "bench_postgresql.py", ["--seconds", "10", "--methods-seconds", "3"],
          ["--seconds", "1", "--methods-seconds", "0.5"], 1.8),
    Bench("nats", "bench_nats.py", ["--seconds", "10", "--methods-seconds", "3"],
          ["--seconds", "1", "--methods-seconds", "0.5"], 1.2),
    Bench("http", "bench_http.py", ["--seconds", "10"], ["--seconds", "1"], 1.3),
    Bench("http_ingest", "bench_http_ingest.py", ["--seconds", "5"], ["--seconds", "1"], 0.8),
    Bench("metrics", "bench_metrics.py", ["--seconds", "3", "--rounds", "3"],
          ["--seconds", "0.5", "--rounds", "1"], 0.7),
]


def plan(args: argparse.Namespace) -> list[tuple[Bench, list[str]]]:
    """The benchmarks to run and each one's command line, in order."""
    by_name = {b.name: b for b in BENCHES}
    names = [b.name for b in BENCHES]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(by_name)}")
    skip = {n.strip() for n in (args.skip or "").split(",") if n.strip()}
    if skip - set(by_name):
        raise ValueError(f"unknown benchmark(s) to skip {sorted(skip - set(by_name))}")
    out = []
    for name in names:
        if name in skip:
            continue
        b = by_name[name]
        cmd = [sys.executable, os.path.join(HERE, b.script), *(b.quick if args.quick else b.full),
               "--dir", args.dir, "--json", os.path.join(args.out, f"{b.name}.json")]
        out.append((b, cmd))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dir", required=True, help="where the benchmarks' data goes: the disk under test "
                   "(not a tmpfs such as /tmp or /dev/shm)")
    p.add_argument("--quick", action="store_true", help="every benchmark briefly, to check the scripts")
    p.add_argument("--only", default="",
                   help="comma-separated benchmarks: " + ", ".join(b.name for b in BENCHES))
    p.add_argument("--skip", default="", help="comma-separated benchmarks not to run")
    p.add_argument("--out", default=RESULTS, help="where the JSON goes (default benchmarks/results)")
    p.add_argument("--no-report", action="store_true", help="do not render README/docs afterwards")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    try:
        args.plan = plan(args)
    except ValueError as ex:
        p.error(str(ex))
    return args


def run_by(argv: list[str] | None) -> str:
    words = ["python", "benchmarks/run_all.py"]
    args = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(args):
        if args[i] in ("--dir", "--out") and i + 1 < len(args):
            words += [args[i], "DIR" if args[i] == "--dir" else args[i + 1]]
            i += 2
            continue
        words.append("--dir=DIR" if args[i].startswith("--dir=") else args[i])
        i += 1
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for b, cmd in args.plan:
            print(f"{b.name}: {' '.join(cmd)}")
        return 0
    os.makedirs(args.dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    total = sum(b.minutes for b, _ in args.plan)
    print(f"running {len(args.plan)} benchmark(s){' (quick)' if args.quick else ''}; "
          f"about {'2' if args.quick else f'{total:.0f}'} minutes on an idle 2-core machine", flush=True)
    failed = []
    for b, cmd in args.plan:
        print(f"== {b.name}: {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        code = subprocess.call(cmd, cwd=os.path.dirname(HERE))
        print(f"== {b.name}: exit {code} after {time.monotonic() - t0:.0f} s", flush=True)
        if code != 0:
            failed.append(b.name)
            continue
        path = os.path.join(args.out, f"{b.name}.json")
        with open(path) as f:
            doc = json.load(f)
        doc["run_by"] = run_by(argv)
        doc["quick"] = bool(args.quick)
        with open(path, "w") as f:
            f.write(json.dumps(doc, indent=1, default=str, ensure_ascii=False) + "\n")
    if not args.no_report and os.path.abspath(args.out) == os.path.abspath(RESULTS):
        code = subprocess.call([sys.executable, os.path.join(HERE, "report.py")], cwd=os.path.dirname(HERE))
        if code != 0:
            failed.append("report")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
