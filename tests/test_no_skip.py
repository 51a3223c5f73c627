"""WALBATCH_NO_SKIP=1 (set by .ci/run) turns every skip into a failure; xfail stays."""

from __future__ import annotations

from pathlib import Path

ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"

CASES = '''
import pytest

def test_skipped():
    pytest.skip("no server binary here")

@pytest.mark.xfail(reason="a known bug")
def test_known_bug():
    assert False

def test_fine():
    pass
'''


def test_a_skip_fails_under_walbatch_no_skip(pytester, monkeypatch):
    pytester.makeconftest(ROOT_CONFTEST.read_text().replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile(test_cases=CASES)
    monkeypatch.setenv("WALBATCH_NO_SKIP", "1")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*WALBATCH_NO_SKIP=1 forbids skips here*no server binary here*"])
    monkeypatch.delenv("WALBATCH_NO_SKIP")
    pytester.runpytest().assert_outcomes(passed=1, skipped=1, xfailed=1)
