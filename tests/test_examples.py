"""Every program in examples/ runs and checks its own result (exit 0)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"last_active_at.py", "last_active_at_daemon.py", "counters.py"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_example_runs_and_checks_itself(path, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
    result = subprocess.run([sys.executable, str(path), str(tmp_path / "run")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{path.name}:\n{result.stdout}\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), "an example says what it checked"
