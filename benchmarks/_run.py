"""What every benchmark records: the run (date, machine, command), its rows and its targets.

Every ``bench_*.py`` writes one JSON document with ``--json FILE`` (``-`` for stdout);
``run_all.py`` writes them to ``benchmarks/results/<name>.json`` and ``report.py``
renders the README's and the docs' tables and charts from those files, so every
published number comes from a run that one command repeats. The document::

    {"benchmark": NAME, "date": ISO-8601 UTC, "command": "python benchmarks/... --dir DIR",
     "machine": {cpu_model, cores, kernel, python, memory_gib, fs_type, load_average, ...},
     "walbatch": {"version", "commit"}, "busy": {"max_other_cores", "rows"} | null,
     "rows": [{"key", "writer", ...}, ...], "targets": [Target.to_json(), ...], ...}

The bench directory's path is written as ``DIR`` (its file system type is in
``machine``): the command repeats anywhere, and no machine's paths are published.
Only the standard library here: report.py and the tests import this module too.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUSY_CORES = 0.15  # a row during which other processes used this many CPU cores is disturbed


# ------------------------------------------------------------------ the machine


def fs_type(path: str) -> str:
    """The file system type of ``path`` from /proc/mounts (Linux), or '?'."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return "?"
    path = os.path.realpath(path)
    best = ("", "?")
    for m in mounts:
        if len(m) < 3:
            continue
        inside = path == m[1] or path.startswith(m[1].rstrip("/") + "/")
        if inside and len(m[1]) >= len(best[0]):
            best = (m[1], m[2])
    return best[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def machine(bench_dir: str) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, kernel, Python, the bench dir's file system."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "kernel": platform.release(),
        "os": platform.system(),
        "python": platform.python_version(),
        "fs_type": fs_type(bench_dir),
        "load_average_at_start": load,
    }


def walbatch_version() -> dict[str, Any]:
    """The walbatch version and the git commit the benchmark ran (``+dirty`` if changed)."""
    out: dict[str, Any] = {"version": None, "commit": None}
    try:
        from walbatch import __version__

        out["version"] = __version__
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no",
                                "--", "walbatch"], capture_output=True, text=True, timeout=10).stdout
        out["commit"] = (commit + ("+dirty" if dirty.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def command(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """The command line that repeats this run, with the bench directory written as DIR."""
    argv = list(sys.argv if argv is None else argv)
    script = script or argv[0]
    rel = os.path.relpath(os.path.abspath(script), ROOT)
    words = ["python", rel]
    args = argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--dir" and i + 1 < len(args):
            words += ["--dir", "DIR"]
            i += 2
            continue
        if a.startswith("--dir="):
            a = "--dir=DIR"
        if a in ("--json", "--out") and i + 1 < len(args):  # where the JSON went: not part of the run
            i += 2
            continue
        words.append(a)
        i += 1
    return " ".join(_quote(w) for w in words)


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------ targets


@dataclass
class Target:
    """One target of ``measured op needed``, in ``unit``; met is None if not measured.

    ``kind`` says how to print the numbers: ``ratio`` (1.23x), ``fraction`` (95%),
    ``percent`` (0.41%),
    ``rate`` (items/s), ``mib`` (MiB) or ``us`` (µs).
    """

    name: str
    measured: float | None
    needed: float
    kind: str = "ratio"
    unit: str = ""
    op: str = ">="
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.needed if self.op == ">=" else self.measured <= self.needed

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "measured": self.measured, "needed": self.needed, "kind": self.kind,
                "unit": self.unit, "op": self.op, "met": self.met, "detail": self.detail}

    def line(self) -> str:
        return target_line(self.to_json())


def fmt_value(value: float | None, kind: str) -> str:
    """A measured or needed value, as the tables print it."""
    if value is None:
        return "—"
    if kind == "ratio":
        return f"{value:,.2f}x" if value < 10 else f"{value:,.1f}x"
    if kind == "fraction":
        return f"{value:.0%}"
    if kind == "percent":  # a small fraction, shown to two decimals
        return f"{value:.2%}"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "mib":
        return f"{value:,.1f} MiB"
    if kind == "us":
        return f"{value:,.0f} µs"
    return f"{value:,.3g}"


def verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def target_line(t: dict[str, Any]) -> str:
    """``MISSED  submit(), 16 threads: 86% of ceiling-16t (needed >= 95%); ...``."""
    unit = f" {t['unit']}" if t.get("unit") else ""
    text = (f"{verdict(t['met']):<12} {t['name']}: {fmt_value(t['measured'], t['kind'])}{unit} "
            f"(needed {t['op']} {fmt_value(t['needed'], t['kind'])}{unit})")
    return text + (f"; {t['detail']}" if t.get("detail") else "")


def print_targets(targets: Iterable[Target], out: Any = None) -> None:
    out = out or sys.stdout
    print("Targets:", file=out)
    for t in targets:
        print("  " + t.line(), file=out)


# ------------------------------------------------------------------ the document


def busy(rows: Iterable[dict[str, Any]], field: str = "other_cores") -> dict[str, Any] | None:
    """Which rows other processes disturbed (used >= BUSY_CORES cores meanwhile), or None."""
    hit = [(r.get("key") or r.get("writer"), r[field]) for r in rows
           if r.get(field) is not None and r[field] >= BUSY_CORES]
    if not hit:
        return None
    return {"max_other_cores": round(max(c for _, c in hit), 2), "rows": [k for k, _ in hit],
            "threshold_cores": BUSY_CORES}


def document(name: str, bench_dir: str, rows: list[dict[str, Any]], targets: Iterable[Target],
             *, started: str, argv: Sequence[str] | None = None, script: str | None = None,
             **extra: Any) -> dict[str, Any]:
    """The JSON document of one run (see the module's docstring)."""
    doc: dict[str, Any] = {
        "benchmark": name,
        "date": started,
        "command": command(argv, script),
        "machine": machine(bench_dir),
        "walbatch": walbatch_version(),
        "busy": busy(rows),
        "rows": rows,
        "targets": [t.to_json() for t in targets],
    }
    doc.update(extra)
    return doc


def write_json(doc: dict[str, Any], dest: str | None) -> None:
    """Write ``doc`` to ``dest`` ('-': stdout; None: nowhere)."""
    if not dest:
        return
    text = json.dumps(doc, indent=1, default=str, ensure_ascii=False) + "\n"
    if dest == "-":
        sys.stdout.write(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, dest)


# ------------------------------------------------------------------ small helpers


def percentiles_us(samples_ns: Sequence[int] | Sequence[float], *, scale: float = 1e-3) -> dict[str, Any]:
    """p50, p90, p99, p99.9 and max of latency samples (ns by default), in µs, nearest rank."""
    if not samples_ns:
        return {"samples": 0, "p50_us": None, "p90_us": None, "p99_us": None, "p999_us": None,
                "max_us": None}
    s = sorted(samples_ns)

    def rank(q: float) -> float:
        i = max(0, min(len(s) - 1, int(q * len(s) + 0.999999) - 1))
        return round(s[i] * scale, 1)

    return {"samples": len(s), "p50_us": rank(0.5), "p90_us": rank(0.9), "p99_us": rank(0.99),
            "p999_us": rank(0.999), "max_us": round(s[-1] * scale, 1)}


def parse_count(text: str) -> int:
    """``5M``, ``500k``, ``1_000_000``, ``2.5M`` -> an item count (argparse type)."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    mult = 1
    if t and t[-1] in "kmg":
        mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}[t[-1]]
        t = t[:-1]
    try:
        n = float(t) * mult
    except ValueError:
        raise ValueError(f"not a count: {text!r} (examples: 5M, 500k, 100000)") from None
    if n < 1 or n != int(n):
        raise ValueError(f"not a positive whole count: {text!r}")
    return int(n)


def count_arg(text: str) -> int:
    import argparse

    try:
        return parse_count(text)
    except ValueError as ex:
        raise argparse.ArgumentTypeError(str(ex)) from None
