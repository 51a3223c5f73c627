"""The published benchmark numbers are rendered from committed JSON, never typed by hand.

README.md and docs/ hold generated sections (``<!-- bench:NAME -->``) that
benchmarks/report.py renders from benchmarks/results/*.json; these tests fail when a
section or a chart differs from what the committed JSON gives. They also check the
renderer and the benchmark scripts' argument handling. No benchmark runs here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _run  # noqa: E402
import _syscalls  # noqa: E402
import report  # noqa: E402
import run_all  # noqa: E402


def test_the_readme_and_docs_show_what_the_committed_json_renders_to() -> None:
    assert report.stale() == [], "run python benchmarks/report.py (never edit a generated section)"


def test_the_charts_were_drawn_from_the_committed_json() -> None:
    assert report.chart_sources_stale() == [], "run python benchmarks/report.py to redraw the charts"


def test_every_committed_run_states_its_date_machine_and_command() -> None:
    docs = report.load()
    assert {"submit", "daemon", "sqlite", "replay", "apply", "postgresql", "nats", "http"} <= set(docs)
    for name, doc in docs.items():
        assert doc["benchmark"] == name
        assert doc["date"] and doc["command"].startswith(f"python benchmarks/bench_{name}.py")
        for field in ("cpu_model", "cores", "kernel", "python", "fs_type"):
            assert doc["machine"][field], (name, field)
        assert doc["rows"], name
        assert "--dir DIR" in doc["command"]
        assert not [s for s in strings(doc) if s.startswith("/")], f"{name}.json names a path of the machine"


def strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def test_every_section_in_the_readme_names_its_run() -> None:
    text = (ROOT / "README.md").read_text()
    for key in ("submit", "daemon", "sinks", "replay"):
        body = text.split(f"<!-- bench:{key} -->")[1].split(f"<!-- /bench:{key} -->")[0]
        assert "Measured" in body and "python benchmarks/bench_" in body, key


def copy_of_docs(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copy(ROOT / "docs" / "benchmarks.md", tmp_path / "docs" / "benchmarks.md")
    return tmp_path


def test_a_number_edited_by_hand_is_caught(tmp_path: Path) -> None:
    root = copy_of_docs(tmp_path)
    assert report.stale(str(root)) == []
    readme = root / "README.md"
    text = readme.read_text()
    doc = report.load()["submit"]
    rate = f"{doc['rows'][0]['items_per_s']:,.0f}"
    start = text.index("<!-- bench:submit -->")
    at = text.index(rate, start)
    digit = "2" if text[at] == "1" else "1"
    readme.write_text(text[:at] + digit + text[at + 1:])
    assert report.stale(str(root)) == ["README.md"]
    report.write_all(str(root))
    assert readme.read_text() == text


def test_text_outside_the_markers_is_left_alone(tmp_path: Path) -> None:
    text = "intro 1,234\n<!-- bench:nosuchbench -->\nold\n<!-- /bench:nosuchbench -->\nafter 5,678\n"
    out = report.render_text(text, {})
    assert out.startswith("intro 1,234\n<!-- bench:nosuchbench -->\n")
    assert out.endswith("<!-- /bench:nosuchbench -->\nafter 5,678\n")
    assert "old" not in out and "Not measured yet" in out


def test_an_unclosed_marker_is_an_error() -> None:
    with pytest.raises(ValueError, match="no matching"):
        report.render_text("<!-- bench:submit -->\n| a table |\n", {})


def a_doc(**extra: object) -> dict:
    targets = [_run.Target("items per request", 120.0, 100.0, "rate", "items/s").to_json(),
               _run.Target("latency", 3.0, 2.0, "ratio", "fsync", op="<=").to_json()]
    doc = {"benchmark": "ingest", "date": "2026-12-01T10:00:00Z",
           "command": "python benchmarks/bench_ingest.py --dir DIR",
           "machine": {"cpu_model": "CPU X", "cores": 2, "kernel": "6.1", "python": "3.11.7",
                       "fs_type": "ext4"},
           "walbatch": {"version": "0.1.0", "commit": "abc"}, "busy": None,
           "rows": [{"key": "per-item", "writer": "one POST per item", "items_per_s": 1000.0,
                     "x_per_item": 1.0},
                    {"key": "walbatch", "writer": "walbatch over HTTP", "items_per_s": 25000.0,
                     "x_per_item": 25.0}],
           "targets": targets}
    doc.update(extra)
    return doc


def test_a_new_benchmark_renders_without_a_renderer_of_its_own() -> None:
    out = report.render("ingest", {"ingest": a_doc()})
    assert "| one POST per item | 1,000 | 1.00x |" in out
    assert "| **walbatch** over HTTP | 25,000 | 25.0x |" in out
    assert "| items per request | 120 | >= 100 items/s | met |" in out
    assert "| latency | 3.00x | <= 2.00x fsync | **MISSED** |" in out
    assert "Measured 2026-12-01 10:00:00 UTC on CPU X, 2 cores" in out
    assert "`python benchmarks/bench_ingest.py --dir DIR`" in out
    assert "busy" not in out


def test_a_busy_or_quick_run_says_so() -> None:
    doc = a_doc(busy={"max_other_cores": 1.5, "rows": ["walbatch"], "threshold_cores": 0.15}, quick=True)
    out = report.render("ingest", {"ingest": doc})
    assert "**The machine was busy:** other processes kept up to 1.50 CPU cores busy during 1 of 2 rows" \
        in out
    assert "**A quick run**" in out


def test_targets_are_met_missed_or_not_measured() -> None:
    assert _run.Target("t", 0.96, 0.95, "fraction").met is True
    assert _run.Target("t", 0.94, 0.95, "fraction").met is False
    assert _run.Target("t", 70.0, 60.0, "mib", op="<=").met is False
    assert _run.Target("t", None, 60.0, "mib", op="<=").met is None
    line = _run.Target("submit(), 16 threads", 0.86, 0.95, "fraction", "of ceiling-16t").line()
    assert line.startswith("MISSED") and "86% of ceiling-16t (needed >= 95% of ceiling-16t)" in line


def test_the_recorded_command_hides_the_bench_dir_and_the_json_path() -> None:
    cmd = _run.command(["benchmarks/bench_submit.py", "--seconds", "5", "--dir", "/srv/x y",
                        "--json", "/tmp/out.json"], script=str(ROOT / "benchmarks" / "bench_submit.py"))
    assert cmd == "python benchmarks/bench_submit.py --seconds 5 --dir DIR"


@pytest.mark.parametrize(("text", "count"), [("5M", 5_000_000), ("500k", 500_000), ("2.5M", 2_500_000),
                                             ("1_000", 1000), ("100M", 100_000_000)])
def test_backlog_sizes_parse(text: str, count: int) -> None:
    assert _run.parse_count(text) == count


@pytest.mark.parametrize("text", ["", "0", "-5", "1.5", "lots", "5T"])
def test_bad_backlog_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        _run.parse_count(text)


def test_percentiles_are_nearest_rank_in_microseconds() -> None:
    p = _run.percentiles_us(list(range(1000, 101_000, 1000)))  # 1..100 µs
    assert (p["p50_us"], p["p90_us"], p["p99_us"], p["max_us"]) == (50.0, 90.0, 99.0, 100.0)
    assert _run.percentiles_us([])["p99_us"] is None


PERF = """\
  100  10.000001:    syscalls:sys_enter_openat: dfd: 0xffffff9c, filename: 0x7f, flags: 0x00081041
  100  10.000002:     syscalls:sys_exit_openat: 0x5
  100  10.000003:    syscalls:sys_enter_openat: dfd: 0xffffff9c, filename: 0x7f, flags: 0x00080241
  101  10.000004:     syscalls:sys_exit_openat: 0x9
  100  10.000005:     syscalls:sys_exit_openat: 0x6
  101  10.000010:     syscalls:sys_enter_write: fd: 0x00000005, buf: 0x7f, count: 0x00000100
  102  10.000011:    syscalls:sys_enter_pwrite64: fd: 0x00000005, buf: 0x7f, count: 0x00000010, pos: 0x0
  100  10.000012:     syscalls:sys_enter_write: fd: 0x00000006, buf: 0x7f, count: 0x00000100
  100  10.000013: syscalls:sys_enter_fdatasync: fd: 0x00000006
  100  10.000014:     syscalls:sys_enter_fsync: fd: 0x00000003
  100  10.000015:     syscalls:sys_enter_close: fd: 0x00000005
  100  10.000016:     syscalls:sys_enter_write: fd: 0x00000005, buf: 0x7f, count: 0x00000100
  100  12.000000:     syscalls:sys_enter_write: fd: 0x00000001, buf: 0x7f, count: 0x00000100
"""


def test_syncs_are_counted_from_the_system_calls_of_each_window() -> None:
    events = _syscalls.parse(PERF)
    # fd 5 was opened O_DSYNC (0x1000 in 0x81041): its two writes are syncs until it is closed;
    # fd 6 was not (0x80241): its write is not, its fdatasync is.
    assert _syscalls.summarize(events, 10.0, 11.0) == {
        "fsync": 1, "fdatasync": 1, "sync_file_range": 0, "dsync_write": 2, "syncs": 4}
    assert _syscalls.summarize(events, 10.0000125, 11.0)["syncs"] == 2
    assert _syscalls.summarize(events, 11.0, 13.0)["syncs"] == 0


def test_run_all_runs_every_benchmark_into_the_results(tmp_path: Path) -> None:
    args = run_all.parse_args(["--dir", str(tmp_path), "--quick"])
    names = [b.name for b, _ in args.plan]
    assert names == [b.name for b in run_all.BENCHES]
    for b, cmd in args.plan:
        assert cmd[1].endswith(b.script) and (ROOT / "benchmarks" / b.script).exists()
        out = str(ROOT / "benchmarks" / "results" / f"{b.name}.json")
        assert cmd[-4:] == ["--dir", str(tmp_path), "--json", out]
        assert cmd[2:-4] == b.quick
    full = run_all.parse_args(["--dir", str(tmp_path), "--only", "replay,submit", "--skip", "submit"])
    assert [(b.name, cmd[2:-4]) for b, cmd in full.plan] == [("replay", run_all.BENCHES[3].full)]


@pytest.mark.parametrize("argv", [["--quick"], ["--dir", "d", "--only", "nosuch"],
                                  ["--dir", "d", "--skip", "x"]])
def test_run_all_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        run_all.parse_args(argv)


def test_run_all_records_how_it_was_run() -> None:
    assert run_all.run_by(["--quick", "--dir", "/srv/bench"]) == \
        "python benchmarks/run_all.py --quick --dir DIR"


def test_bench_submit_runs_what_a_row_depends_on() -> None:
    import bench_submit

    assert bench_submit.parse_args(["--only", "walbatch-16t-half"]).keys == [
        "naive", "walbatch-16t", "walbatch-16t-half"]
    for bad in (["--only", "nosuch"], ["--seconds", "0"], ["--syscalls", "strace"]):
        with pytest.raises(SystemExit):
            bench_submit.parse_args(bad)


def test_bench_replay_takes_backlog_sizes() -> None:
    import bench_replay

    a = bench_replay.parse_args(["--items", "2M", "--memory-backlogs", "10M,1M,1M"])
    assert a.items == 2_000_000 and a.memory == [1_000_000, 10_000_000]
    assert bench_replay.parse_args(["--only", "dry-run,memory"]).groups == ["dry-run", "memory"]
    for bad in (["--items", "many"], ["--memory-backlogs", "1M"], ["--memory-backlogs", "1M,x"],
                ["--only", "nosuch"]):
        with pytest.raises(SystemExit):
            bench_replay.parse_args(bad)
