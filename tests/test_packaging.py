"""What a user gets from the wheel: type hints, the licence, and the docs its help points to."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # setuptools builds in the source tree: leave the checkout alone
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    [path] = out.glob("walbatch-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_is_typed_and_licensed(wheel):
    names = wheel.namelist()
    assert "walbatch/py.typed" in names
    assert any(re.search(r"\.dist-info/(licenses/)?LICENSE$", n) for n in names), names


def test_every_doc_the_package_names_is_in_the_wheel(wheel):
    # Help texts and error messages say "see docs/sinks/nats.md": the wheel installs
    # those files under PREFIX/share/doc/walbatch/, which `walbatch --help` names.
    data = {n.split("/share/doc/walbatch/", 1)[1] for n in wheel.namelist() if "/share/doc/walbatch/" in n}
    named = set()
    for path in (ROOT / "walbatch").rglob("*.py"):
        named |= set(re.findall(r"docs/[\w/.-]+\.(?:md|service|yml|json)", path.read_text()))
    assert named, "the scan found no doc references: the test is looking in the wrong place"
    missing = sorted(n for n in named if n not in data)
    assert not missing, f"named by the package but not in the wheel: {missing}"
    assert "README.md" in data


def test_help_says_where_the_docs_are():
    out = subprocess.run([sys.executable, "-m", "walbatch", "--help"], capture_output=True, text=True,
                         check=True).stdout
    where = re.search(r"Documentation \(README.md, docs/\): (\S+)", out)
    assert where and (Path(where.group(1)) / "docs" / "sinks.md").is_file()
