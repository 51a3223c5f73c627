"""The benchmark charts, drawn with matplotlib from the results' JSON (report.py calls these).

A benchmark-only dependency (``pip install -e '.[bench]'``): neither walbatch nor the
default test run imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

WALBATCH = "#1f77b4"
CEILING = "#b0b0b0"
BASELINE = "#d9d9d9"
TARGET = "#d62728"
MISSED = "#9ec3e0"
Docs = dict[str, dict[str, Any]]


def _rows(doc: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in (doc or {}).get("rows", [])}


def _subtitle(*docs: dict[str, Any] | None) -> str:
    ds = [d for d in docs if d]
    dates = sorted({d.get("date", "?")[:10] for d in ds})
    m = ds[0].get("machine", {}) if ds else {}
    text = (f"{', '.join(dates)}; {m.get('cores', '?')} cores, {m.get('fs_type', '?')}, "
            f"Python {m.get('python', '?')}")
    if any(d.get("busy") for d in ds):
        text += "; MACHINE BUSY: not for comparison"
    return text


def _human(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def throughput(docs: Docs) -> Figure | None:
    """Each walbatch writer next to the minimal writer doing the same job, same run."""
    sub, dmn = _rows(docs.get("submit")), _rows(docs.get("daemon"))
    pairs = [
        ("submit(), 1 thread", sub.get("walbatch-1t"), sub.get("naive"), "naive writer"),
        ("submit(), 16 threads", sub.get("walbatch-16t"), sub.get("ceiling-16t"), "ceiling-16t"),
        ("submit_many(1000)", sub.get("walbatch-many"), sub.get("ceiling-batch"), "ceiling-batch"),
        ("asubmit(), 1,000 tasks", sub.get("walbatch-aio"), sub.get("ceiling-aio"), "ceiling-aio"),
        ("daemon, 8 clients,\n1 item/request", dmn.get("daemon-8c-1"), None, ""),
        ("daemon, 8 clients,\n1,000 items/request", dmn.get("daemon-8c-1000"), dmn.get("embedded"),
         "embedded submit_many"),
    ]
    pairs = [p for p in pairs if p[1] is not None]
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.9 * len(pairs) + 1.6))
    h = 0.38
    for i, (_label, wb, ceil, ceil_name) in enumerate(pairs):
        y = len(pairs) - 1 - i
        ax.barh(y + h / 2, wb["items_per_s"], h, color=WALBATCH, label="walbatch" if i == 0 else None)
        text = _human(wb["items_per_s"])
        if ceil is not None:
            ax.barh(y - h / 2, ceil["items_per_s"], h, color=CEILING,
                    label="minimal writer, same job (ceiling)" if i == 0 else None)
            ax.text(ceil["items_per_s"] * 1.05, y - h / 2, f"{_human(ceil['items_per_s'])}  {ceil_name}",
                    va="center", fontsize=8, color="#555555")
            text += f"  ({wb['items_per_s'] / ceil['items_per_s']:.0%} of {ceil_name})"
        ax.text(wb["items_per_s"] * 1.05, y + h / 2, text, va="center", fontsize=8.5)
    ax.set_yticks(range(len(pairs)), [p[0] for p in reversed(pairs)], fontsize=9)
    ax.set_xscale("log")
    xmax = max(max(p[1]["items_per_s"], p[2]["items_per_s"] if p[2] else 0) for p in pairs)
    ax.set_xlim(right=xmax * 12)
    ax.set_xlabel("acknowledged (fsync'd) items per second, log scale")
    ax.set_title("Throughput per writer next to its ceiling\n"
                 + _subtitle(docs.get("submit"), docs.get("daemon")), fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="x", which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def latency(docs: Docs) -> Figure | None:
    """Submit latency percentiles of the per-item writers, and fdatasync alone."""
    doc = docs.get("submit")
    rows = _rows(doc)
    if not rows:
        return None
    qs = [("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("p99.9", "p999_us")]
    lines: list[tuple[str, dict[str, Any], str, str]] = []
    naive = rows.get("naive")
    if naive and naive.get("fdatasync"):
        lines.append(("fdatasync alone (naive writer)", naive["fdatasync"], "#555555", "--"))
    for key, label, color in (("walbatch-1t", "submit(), 1 thread", "#2ca02c"),
                              ("walbatch-16t", "submit(), 16 threads, flat out", "#1f77b4"),
                              ("walbatch-16t-half", "submit(), 16 threads at half that rate", "#9467bd"),
                              ("walbatch-aio", "asubmit(), 1,000 tasks", "#ff7f0e")):
        if key in rows:
            lines.append((label, rows[key], color, "-"))
    fig, ax = plt.subplots(figsize=(9, 5.2))
    for label, p, color, style in lines:
        ys = [p.get(f) for _, f in qs]
        ax.plot(range(len(qs)), ys, style, marker="o", color=color, label=label)
        last = next((y for y in reversed(ys) if y), None)
        if last:
            ax.annotate(f"{last:,.0f} µs", (len(qs) - 1, last), textcoords="offset points", xytext=(6, 0),
                        va="center", fontsize=8, color=color)
    if naive and naive.get("fdatasync") and naive["fdatasync"].get("p99_us"):
        goal = 2 * naive["fdatasync"]["p99_us"]
        ax.plot([1.75, 2.25], [goal, goal], color=TARGET, lw=2.5,
                label=f"target for the half-rate row's p99: 2x p99 fdatasync ({goal:,.0f} µs)")
    ax.set_xticks(range(len(qs)), [q for q, _ in qs])
    ax.set_xlim(-0.2, len(qs) - 0.4)
    ax.set_yscale("log")
    ax.set_ylabel("latency of one call, µs (log scale)")
    ax.set_title("Submit latency percentiles (each item fsync'd before the call returns)\n" + _subtitle(doc),
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    ax.grid(alpha=0.3, which="both", axis="y")
    fig.tight_layout()
    return fig


def sinks(docs: Docs) -> Figure | None:
    """walbatch end to end as a multiple of one write per item, per sink, with its target."""
    def best(doc: dict[str, Any] | None) -> dict[str, Any] | None:
        cands = [r for r in (doc or {}).get("rows", []) if r["key"].startswith("walbatch")]
        return max(cands, key=lambda r: r["items_per_s"]) if cands else None

    def target(doc: dict[str, Any] | None, i: int = 0) -> float | None:
        ts = (doc or {}).get("targets") or []
        return ts[i]["needed"] if len(ts) > i and ts[i]["kind"] == "ratio" else None

    bars: list[tuple[str, float, float | None]] = []
    sq, pg, nt, ht, ap = (docs.get(n) for n in ("sqlite", "postgresql", "nats", "http", "apply"))
    if sq and "walbatch-many" in _rows(sq):
        bars.append(("sqlite: (default)", _rows(sq)["walbatch-many"]["x_per_item"], target(sq)))
    if pg and best(pg):
        bars.append(("PostgreSQL", best(pg)["x_per_item"], target(pg)))
    if nt and best(nt):
        ceiling = max((m["items_per_s"] for m in nt.get("methods") or [] if m["key"].startswith("nats-py")),
                      default=None)
        base = _rows(nt)["per-item"]["items_per_s"]
        goal = nt["targets"][0]["needed"] * ceiling / base if ceiling and nt.get("targets") else None
        bars.append(("NATS JetStream", best(nt)["x_per_item"], goal))
    if ht and "walbatch-many" in _rows(ht):
        bars.append(("HTTP bulk, local", _rows(ht)["walbatch-many"]["x_per_item"], None))
    for backend in ("sqlite", "postgresql"):
        r = _rows(ap).get(f"{backend}-walbatch-many")
        if r:
            ts = [t for t in ap["targets"] if backend in t["name"]]
            bars.append((f"ApplySink, {backend}", r["x_per_item"], ts[0]["needed"] if ts else None))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(bars) + 1.6))
    for i, (_label, x, goal) in enumerate(bars):
        y = len(bars) - 1 - i
        met = goal is None or x >= goal
        ax.barh(y, x, 0.6, color=WALBATCH if met else MISSED)
        ax.text(x + 0.5, y, f"{x:.1f}x", va="center", fontsize=8.5)
        if goal is not None:
            ax.plot([goal, goal], [y - 0.38, y + 0.38], color=TARGET, lw=2,
                    label="target" if i == next(j for j, b in enumerate(bars) if b[2] is not None) else None)
    ax.set_yticks(range(len(bars)), [b[0] for b in reversed(bars)], fontsize=9)
    ax.set_xlabel("walbatch submit_many(1000) end to end, x one write + commit per item (same run)")
    ax.set_xlim(0, max(max(b[1] for b in bars), max((b[2] or 0) for b in bars)) * 1.15)
    ax.set_title("Sinks end to end vs one write per item\n" + _subtitle(sq, pg, nt, ht, ap), fontsize=10)
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=WALBATCH, label="walbatch: target met (or none)"),
                Patch(color=MISSED, label="walbatch: target missed")]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


DRAW: dict[str, Callable[[Docs], Figure | None]] = {
    "bench-throughput.png": throughput,
    "bench-latency.png": latency,
    "bench-sinks.png": sinks,
}
