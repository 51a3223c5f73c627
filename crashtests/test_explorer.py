"""The crash explorer (explorer.py) on the real code, and on copies broken on purpose.

The first test explores the crash states of the package as it is and must find
nothing; it also checks that the states it explored lost or tore writes of
every kind of file the promise rests on (segments, their roll and deletion,
the checkpoint, the synced marker, dlq.db), so a workload that stopped
reaching one of them fails here instead of passing quietly.

The others copy the package to a temporary directory, make one small breaking
change to the copy (each a real way to break durability at the boundary with
the operating system) and run the explorer on the copy in a subprocess: it
must report the promise broken. The change must apply exactly; if the code it
targets moved, the test says so rather than test nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import walbatch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import explorer  # noqa: E402
from systrace import STRACE  # noqa: E402

pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed "
                                "(Debian: apt-get install strace)")


def test_every_crash_state_keeps_the_promise(scenario, tmp_path, crash_states):
    """One traced run per iteration (seeds follow from the scenario's), each explored."""
    for i in range(scenario.iterations(1)):
        seed = scenario.seed + i
        directory = str(tmp_path / f"rec{i}")
        explorer.record(directory, seed)
        report = explorer.explore(explorer.load(directory), seed, crash_states,
                                  keep_failures=directory, prefixes=0 if crash_states == 0 else 1)
        scenario.add(calls=report.calls, durability_points=report.durability_points,
                     acknowledged=report.acks, crash_points=report.crash_points,
                     states=report.states, checked=report.checked,
                     violations=len(report.violations))
        print(report.summary())
        assert not report.violations, (
            f"{explorer.format_violations(report)}\ntrace and first failing tree kept in "
            f"{directory}; replay: python crashtests/explorer.py --replay {directory} "
            f"--seed {seed} --states {crash_states}")
        missing = [c for c in explorer.REQUIRED_COVERAGE if not report.coverage.get(c)]
        assert not missing, f"no explored state lost a write to: {missing} ({report.summary()})"
        assert report.states >= min(crash_states or 100, 100), report.summary()


# (file in walbatch/, text that must be there exactly once, its replacement)
BREAKING_CHANGES = {
    "checkpoint temp file not fsync'd": [
        ("fileio.py", "            h.write(data)\n            os.fsync(fd)\n", "            h.write(data)\n"),
    ],
    "segments without O_DSYNC, fdatasync a no-op": [
        ("fileio.py", "(os.O_DSYNC if dsync else 0)", "0"),
        ("fileio.py", "    def sync(self) -> None:\n        os.fdatasync(self.fd)\n",
         "    def sync(self) -> None:\n        pass\n"),
    ],
    "followers answered before the leader's write returns": [
        ("commit.py",
         "        try:\n            first = self.log.append(payload, count)\n",
         "        early, group = group[1:], group[:1]\n"
         "        seq = self.log.next_seq + group[0].count\n"
         "        for w in early:\n"
         "            w.first_seq, seq = seq, seq + w.count\n"
         "        with self._mu:\n"
         "            for w in early:\n"
         "                w.done = True\n"
         "        for w in early:\n"
         "            w.wake.release()\n"
         "        try:\n            first = self.log.append(payload, count)\n"),
    ],
    "new segment's directory entry not fsync'd": [
        ("log.py", "            fh.sync()\n            self.fs.fsync_dir(self.segdir)\n",
         "            fh.sync()\n"),
    ],
}


def broken_copy(dest: str, change: str) -> str:
    """A copy of the walbatch package with ``change`` applied; returns the directory to put on sys.path."""
    src = os.path.dirname(walbatch.__file__)
    pkg = os.path.join(dest, "walbatch")
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name, old, new in BREAKING_CHANGES[change]:
        path = os.path.join(pkg, name)
        with open(path) as f:
            text = f.read()
        assert text.count(old) == 1, (
            f"the breaking change {change!r} no longer applies: walbatch/{name} does not contain "
            f"exactly one {old!r}; update BREAKING_CHANGES to the code as it is now")
        with open(path, "w") as f:
            f.write(text.replace(old, new))
    return dest


@pytest.mark.parametrize("change", sorted(BREAKING_CHANGES))
def test_the_explorer_catches(change, scenario, tmp_path):
    root = broken_copy(str(tmp_path / "pkg"), change)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "explorer.py"), "--seed", str(scenario.seed),
         "--states", "0", "--stop-at-first", "--keep", str(tmp_path / "rec")],
        env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    scenario.add(caught=int(proc.returncode == 1))
    assert f"({root}/walbatch)" in proc.stdout, "the explorer did not run the broken copy"
    assert proc.returncode == 1 and "PROMISE BROKEN" in proc.stdout, (
        f"the explorer did not notice: {change}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")

