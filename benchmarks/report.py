#!/usr/bin/env python
"""Render the benchmark tables and charts in README.md and docs/ from benchmarks/results/*.json.

    python benchmarks/report.py            # rewrite every generated section, and the charts
    python benchmarks/report.py --check    # exit 1, naming them, if any section is stale
    python benchmarks/report.py --no-charts

A generated section sits between two markers in any Markdown file of README.md and
docs/**; everything between them is replaced, nothing outside is touched::

    <!-- bench:submit -->
    ...rendered from benchmarks/results/submit.json...
    <!-- /bench:submit -->

Each section states the date, machine and command of the run it shows, and whether
the machine was busy. tests/test_bench_report.py fails when a section differs from
what this script renders from the committed JSON, so no number is typed by hand.

Adding a benchmark: have it write its JSON with ``_run.document`` (rows with
``writer`` and ``items_per_s``, and ``x_per_item`` if it has a baseline), put
``<!-- bench:NAME --><!-- /bench:NAME -->`` where its table goes and run this script:
the generic renderer (``render_generic``) shows its rows, targets and run. For other
columns, add a renderer to ``SECTIONS``.

Charts (``docs/images/bench-*.png``) need matplotlib (``pip install -e '.[bench]'``);
each PNG records the SHA-256 of the JSON it was drawn from (a PNG text chunk), so the
test also notices a chart older than its numbers. Only the standard library here but
for the charts.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _run import fmt_value, verdict  # noqa: E402

RESULTS = os.path.join(HERE, "results")
IMAGES = os.path.join(ROOT, "docs", "images")
MARKER = re.compile(r"(<!-- bench:([a-z0-9_-]+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.S)
OPEN = re.compile(r"<!-- bench:([a-z0-9_-]+) -->")

Docs = dict[str, dict[str, Any]]


# ------------------------------------------------------------------ loading


def load(results: str = RESULTS) -> Docs:
    """Every ``<name>.json`` under ``results``, by name."""
    docs: Docs = {}
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        docs[os.path.splitext(os.path.basename(path))[0]] = doc
    return docs


def digest(results: str = RESULTS, names: Iterable[str] | None = None) -> str:
    """SHA-256 over the named result files (all by default), as committed."""
    h = hashlib.sha256()
    paths = sorted(glob.glob(os.path.join(results, "*.json")))
    if names is not None:
        wanted = set(names)
        paths = [p for p in paths if os.path.splitext(os.path.basename(p))[0] in wanted]
    for path in paths:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# ------------------------------------------------------------------ pieces


def table(head: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """A Markdown table; columns in ``right`` are right-aligned (numbers)."""
    right = set(right)
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def num(x: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "—" if x is None else format(x, spec) + suffix


def ratio(x: float | None) -> str:
    return fmt_value(x, "ratio")


def machine_line(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    wb = doc.get("walbatch", {})
    cpu = f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores"
    if m.get("memory_gib"):
        cpu += f", {m['memory_gib']:g} GiB"
    version = wb.get("version") or "?"
    if wb.get("commit"):
        version += f" ({wb['commit']})"
    return (f"{cpu}; {m.get('os', 'Linux')} {m.get('kernel', '?')}; Python {m.get('python', '?')}; "
            f"bench dir on {m.get('fs_type', '?')}; walbatch {version}")


def footer(doc: dict[str, Any] | None, name: str = "") -> str:
    """Date, machine and command of a run, and a warning if the machine was busy."""
    if doc is None:
        return f"_Not measured yet: run `python benchmarks/run_all.py --dir DIR` ({name})._"
    date = doc.get("date", "?").replace("T", " ").replace("Z", " UTC")
    text = f"_Measured {date} on {machine_line(doc)}; `{doc.get('command', '?')}`"
    if doc.get("run_by"):
        text += f" (run by `{doc['run_by']}`)"
    text += "._"
    if doc.get("quick"):
        text += "\n\n**A quick run** (short rows, small backlogs): it checks that the benchmark works; " \
                "its numbers are not for comparison."
    b = doc.get("busy")
    if b:
        n = len(doc.get("rows", [])) + len(doc.get("methods") or [])
        text += (f"\n\n**The machine was busy:** other processes kept up to {b['max_other_cores']:.2f} CPU "
                 f"cores busy during {len(b['rows'])} of {n} rows; these numbers show that the "
                 "benchmark runs, not what walbatch can do.")
    return text


def targets(doc: dict[str, Any] | None) -> str:
    ts = (doc or {}).get("targets") or []
    if not ts:
        return ""
    rows = []
    for t in ts:
        unit = f" {t['unit']}" if t.get("unit") else ""
        measured = fmt_value(t["measured"], t["kind"])
        needed = f"{t['op']} {fmt_value(t['needed'], t['kind'])}{unit}"
        mark = {True: "met", False: "**MISSED**", None: "not measured"}[t["met"]]
        rows.append([t["name"], measured, needed, mark, t.get("detail", "")])
    return table(["target", "measured", "needed", "", "numbers"], rows, right=[1])


def section(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


def rows_by_key(doc: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {r.get("key"): r for r in (doc or {}).get("rows", [])}


def bold_walbatch(writer: str) -> str:
    return writer.replace("walbatch ", "**walbatch** ", 1) if writer.startswith("walbatch ") else writer


# ------------------------------------------------------------------ sections


def render_submit(docs: Docs) -> str:
    doc = docs.get("submit")
    if doc is None:
        return footer(None, "submit")
    rows = []
    for r in doc["rows"]:
        call = " per call" if r.get("latency_of", "item") != "item" else ""
        rows.append([bold_walbatch(r["writer"]), num(r["items_per_s"]), num(r.get("p50_us"), ",.0f", call),
                     num(r.get("p99_us"), ",.0f", call), num(r.get("syncs_per_1k_items"), ",.2f"),
                     ratio(r.get("ratio_to_naive")),
                     num(100 * r["fraction_of_ceiling"] if r.get("fraction_of_ceiling") else None,
                         ".0f", "%") + (f" of {r['ceiling']}" if r.get("ceiling") else "")])
    t = table(["writer", "items/s", "p50 µs", "p99 µs", "syncs / 1k items", "x naive", "vs its ceiling"],
              rows, right=[1, 2, 3, 4, 5])
    naive = rows_by_key(doc).get("naive", {})
    fd = naive.get("fdatasync") or {}
    syncs = ("syncs / 1k items: `fsync`, `fdatasync` and `O_DSYNC` writes the process made during the "
             "row, counted from the kernel's syscall tracepoints (perf)")
    if doc.get("syscalls_not_counted"):
        syncs = f"syncs / 1k items: not counted in this run ({doc['syscalls_not_counted']})"
    note = (f"Every item is written and fdatasync'd before its call returns. {syncs}. "
            f"`fdatasync` alone (naive row): p50 {num(fd.get('p50_us'))} µs, p99 {num(fd.get('p99_us'))} µs.")
    return section(t, note, targets(doc), footer(doc))


def render_daemon(docs: Docs) -> str:
    doc = docs.get("daemon")
    if doc is None:
        return footer(None, "daemon")
    rows = [[r["writer"], num(r["items_per_s"]), ratio(r.get("x_embedded"))] for r in doc["rows"]]
    return section(table(["writer (no-op sink)", "items/s", "vs embedded"], rows, right=[1, 2]),
                   targets(doc), footer(doc))


def _sink_row(name: str, doc: dict[str, Any] | None, key: str | None, base_key: str,
              pick_best: bool = False) -> list[str] | None:
    """``key``'s row against ``base_key``'s; ``pick_best``: the fastest row whose key
    starts with ``key`` (default "walbatch")."""
    if doc is None:
        return None
    rows = rows_by_key(doc)
    base = rows.get(base_key)
    if pick_best:
        cands = [r for r in doc["rows"] if r["key"].startswith(key or "walbatch")]
        r = max(cands, key=lambda r: r["items_per_s"]) if cands else None
    else:
        r = rows.get(key or "")
    if r is None or base is None:
        return None
    return [name, num(base["items_per_s"]), num(r["items_per_s"]),
            f"**{ratio(r['items_per_s'] / base['items_per_s'])}**", r["writer"]]


def runs(docs: Docs, names: Sequence[str]) -> str:
    """A compact list of the runs behind a table that combines several benchmarks."""
    present = [n for n in names if docs.get(n)]
    if not present:
        return footer(None, ", ".join(names))
    lines = [f"_Measured on {machine_line(docs[present[0]])}:_", ""]
    for n in names:
        doc = docs.get(n)
        if doc is None:
            lines.append(f"- {n}: not measured yet")
            continue
        flags = [f for f, on in (("a quick run", doc.get("quick")), ("**the machine was busy**",
                                                                    doc.get("busy"))) if on]
        lines.append(f"- {n}: {doc.get('date', '?').replace('T', ' ').replace('Z', ' UTC')}, "
                     f"`{doc.get('command', '?')}`" + (f"; {', '.join(flags)}" if flags else ""))
    return "\n".join(lines)


def render_sinks(docs: Docs) -> str:
    """One line per sink: walbatch end to end against one write per item, same run."""
    rows = [
        _sink_row("SQLite (`sqlite:`, the default)", docs.get("sqlite"), "walbatch-many", "per-item"),
        _sink_row("PostgreSQL", docs.get("postgresql"), None, "per-item", pick_best=True),
        _sink_row("NATS JetStream", docs.get("nats"), None, "per-item", pick_best=True),
        _sink_row("HTTP bulk API, local", docs.get("http"), "walbatch-many", "per-item-1t"),
        _sink_row("ApplySink, SQLite", docs.get("apply"), "sqlite-walbatch-many", "sqlite-per-item",
                  pick_best=True),
        _sink_row("ApplySink, PostgreSQL", docs.get("apply"), "postgresql-walbatch-many",
                  "postgresql-per-item", pick_best=True),
    ]
    t = table(["sink", "one write per item, items/s", "walbatch, items/s", "ratio", "walbatch row"],
              [r for r in rows if r], right=[1, 2, 3])
    names = ["sqlite", "postgresql", "nats", "http", "apply"]
    ts = [t for n in names for t in (docs.get(n) or {}).get("targets", [])]
    return section(t, targets({"targets": ts}) if ts else "", runs(docs, names))


def render_replay(docs: Docs) -> str:
    doc = docs.get("replay")
    if doc is None:
        return footer(None, "replay")
    rows = [[r["writer"], num(r.get("items_per_s")), num(r["seconds"], ",.2f"), num(r["max_rss_mib"], ",.1f")]
            for r in doc["rows"]]
    return section(table(["command", "items/s", "seconds", "peak RSS MiB"], rows, right=[1, 2, 3]),
                   targets(doc), footer(doc))


def _e2e_table(doc: dict[str, Any], extra: Sequence[tuple[str, str, str]] = ()) -> str:
    head = ["writer", "items/s", "x per-item"] + [h for h, _, _ in extra]
    rows = []
    for r in doc["rows"]:
        cells = [bold_walbatch(r["writer"]), num(r["items_per_s"]), ratio(r.get("x_per_item"))]
        cells += [num(r.get(field), spec) for _, field, spec in extra]
        rows.append(cells)
    return table(head, rows, right=range(1, len(head)))


def render_e2e(name: str, extra: Sequence[tuple[str, str, str]] = ()) -> Callable[[Docs], str]:
    def render(docs: Docs) -> str:
        doc = docs.get(name)
        if doc is None:
            return footer(None, name)
        return section(_e2e_table(doc, extra), targets(doc), footer(doc))
    return render


def render_apply(docs: Docs) -> str:
    doc = docs.get("apply")
    if doc is None:
        return footer(None, "apply")
    rows = [[r["backend"], bold_walbatch(r["writer"]), num(r["items_per_s"]), ratio(r.get("x_per_item"))]
            for r in doc["rows"]]
    return section(table(["database", "writer", "items/s", "x per-item"], rows, right=[2, 3]),
                   targets(doc), footer(doc))


def render_methods(name: str, rate: str) -> Callable[[Docs], str]:
    def render(docs: Docs) -> str:
        doc = docs.get(name)
        if doc is None:
            return footer(None, name)
        ms = doc.get("methods") or []
        if not ms:
            return "_The methods were not measured in this run._"
        rows = [[m["method"], num(m.get(rate))] for m in ms]
        return section(table(["method", rate.replace("_per_s", "/s")], rows, right=[1]), footer(doc))
    return render


def render_generic(name: str) -> Callable[[Docs], str]:
    """Any benchmark's rows, targets and run: writer, items/s, and x per-item if present."""
    def render(docs: Docs) -> str:
        doc = docs.get(name)
        if doc is None:
            return footer(None, name)
        rows = doc.get("rows", [])
        has_x = any("x_per_item" in r for r in rows)
        head = ["writer", "items/s"] + (["x per-item"] if has_x else [])
        body = [[bold_walbatch(r.get("writer") or r.get("key", "?")), num(r.get("items_per_s"))]
                + ([ratio(r.get("x_per_item"))] if has_x else []) for r in rows]
        return section(table(head, body, right=range(1, len(head))), targets(doc), footer(doc))
    return render


def render_metrics(docs: Docs) -> str:
    doc = docs.get("metrics")
    if doc is None:
        return footer(None, "metrics")
    rows = [[r["writer"], num(r["items_per_s"]), ", ".join(num(x) for x in r.get("rates", [])),
             num(r.get("commit_groups_per_s")),
             "—" if r.get("hot_path_share") is None else f"{r['hot_path_share']:.2%}"]
            for r in doc["rows"]]
    cost = (doc.get("settings") or {}).get("hook_cost_s") or {}
    costs = ", ".join(f"`{k}` {v * 1e6:.2f} µs" for k, v in cost.items())
    note = f"Each hook the metrics add, per call: {costs}." if costs else ""
    return section(table(["writer", "items/s (median)", "each run", "group commits/s",
                          "metrics' share of a core"], rows, right=[1, 3, 4]),
                   note, targets(doc), footer(doc))


def render_targets(docs: Docs) -> str:
    """Every target of every benchmark, with the run it comes from."""
    rows = []
    order = ["submit", "daemon", "sqlite", "replay", "apply", "postgresql", "nats", "http",
             "http_ingest", "metrics"]
    for name in sorted(docs, key=lambda n: (order.index(n) if n in order else len(order), n)):
        doc = docs[name]
        for t in doc.get("targets", []):
            unit = f" {t['unit']}" if t.get("unit") else ""
            rows.append([t["name"], fmt_value(t["measured"], t["kind"]),
                         f"{t['op']} {fmt_value(t['needed'], t['kind'])}{unit}",
                         {True: "met", False: "**MISSED**", None: "not measured"}[t["met"]],
                         f"{name}, {doc.get('date', '?')[:10]}" + (", quick" if doc.get("quick") else "")
                         + (", busy" if doc.get("busy") else "")])
    if not rows:
        return footer(None, "all")
    return table(["target", "measured", "needed", "", "run"], rows, right=[1])


SECTIONS: dict[str, Callable[[Docs], str]] = {
    "submit": render_submit,
    "daemon": render_daemon,
    "sinks": render_sinks,
    "targets": render_targets,
    "replay": render_replay,
    "sqlite": render_e2e("sqlite", [("drain s", "drain_s", ",.2f")]),
    "postgresql": render_e2e("postgresql", [("drain s", "drain_s", ",.1f")]),
    "postgresql-methods": render_methods("postgresql", "rows_per_s"),
    "nats": render_e2e("nats", [("of nats-py alone", "fraction_of_ceiling", ".0%"),
                                ("drain s", "drain_s", ",.1f"), ("server cores", "server_cores", ".2f")]),
    "nats-methods": render_methods("nats", "items_per_s"),
    "http": render_e2e("http", [("requests", "requests", ","),
                                ("wire bytes/item", "wire_bytes_per_item", ",.1f"),
                                ("server CPU", "server_cpu", ".2f"), ("drain s", "drain", ",.2f")]),
    "apply": render_apply,
    "metrics": render_metrics,
}


def render(key: str, docs: Docs) -> str:
    fn = SECTIONS.get(key) or render_generic(key)
    return fn(docs).rstrip("\n") + "\n"


# ------------------------------------------------------------------ files


def markdown_files(root: str = ROOT) -> list[str]:
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "**", "*.md"),
                                                                recursive=True))


def render_text(text: str, docs: Docs, where: str = "") -> str:
    """``text`` with every generated section rendered anew; an unclosed marker is an error."""
    opened = OPEN.findall(text)
    closed = [m.group(2) for m in MARKER.finditer(text)]
    if sorted(opened) != sorted(closed):
        bad = sorted(set(opened) - set(closed)) or opened
        raise ValueError(f"{where}: <!-- bench:{bad[0]} --> has no matching <!-- /bench:{bad[0]} -->")
    return MARKER.sub(lambda m: m.group(1) + render(m.group(2), docs) + m.group(4), text)


def stale(root: str = ROOT, results: str = RESULTS) -> list[str]:
    """The Markdown files whose generated sections differ from a fresh rendering."""
    docs = load(results)
    out = []
    for path in markdown_files(root):
        with open(path) as f:
            text = f.read()
        if render_text(text, docs, path) != text:
            out.append(os.path.relpath(path, root))
    return out


def write_all(root: str = ROOT, results: str = RESULTS) -> list[str]:
    docs = load(results)
    changed = []
    for path in markdown_files(root):
        with open(path) as f:
            text = f.read()
        new = render_text(text, docs, path)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            changed.append(os.path.relpath(path, root))
    return changed


# ------------------------------------------------------------------ charts

CHARTS = {
    "bench-throughput.png": ("submit", "daemon"),
    "bench-latency.png": ("submit",),
    "bench-sinks.png": ("sqlite", "postgresql", "nats", "http", "apply"),
}


def png_text(path: str) -> dict[str, str]:
    """The tEXt chunks of a PNG (stdlib only: the test reads the charts' source digest)."""
    import struct

    out = {}
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    i = 8
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind == b"tEXt":
            key, _, value = data[i + 8:i + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        i += 12 + length
    return out


def chart_sources_stale(results: str = RESULTS, images: str = IMAGES) -> list[str]:
    """Charts whose recorded source digest is not that of the committed JSON (or missing)."""
    out = []
    docs = load(results)
    for name, sources in CHARTS.items():
        if not any(s in docs for s in sources):
            continue
        path = os.path.join(images, name)
        if not os.path.exists(path) or png_text(path).get("Source") != digest(results, sources):
            out.append(os.path.relpath(path, ROOT))
    return out


def draw_charts(docs: Docs, results: str = RESULTS, images: str = IMAGES) -> list[str]:
    """Write the PNG charts (matplotlib); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import charts

    os.makedirs(images, exist_ok=True)
    written = []
    for name, sources in CHARTS.items():
        if not any(s in docs for s in sources):
            continue
        path = os.path.join(images, name)
        fig = charts.DRAW[name](docs)
        if fig is None:
            continue
        fig.savefig(path, dpi=110, metadata={"Source": digest(results, sources), "Software": None})
        matplotlib.pyplot.close(fig)
        written.append(os.path.relpath(path, ROOT))
    return written


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if a section or chart is stale")
    p.add_argument("--no-charts", action="store_true", help="only the Markdown sections")
    args = p.parse_args(argv)
    if args.check:
        bad = stale() + chart_sources_stale()
        for b in bad:
            print(f"stale: {b} (run python benchmarks/report.py)")
        return 1 if bad else 0
    for path in write_all():
        print(f"rendered {path}")
    if not args.no_charts:
        try:
            for path in draw_charts(load()):
                print(f"drew {path}")
        except ImportError as ex:
            print(f"charts not drawn: {ex} (pip install -e '.[bench]')", file=sys.stderr)
            return 1
    for name, doc in load().items():
        for t in doc.get("targets", []):
            print(f"  {name}: {verdict(t['met'])}: {t['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
