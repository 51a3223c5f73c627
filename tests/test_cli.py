import subprocess
import sys


def test_demo_kills_a_writer_and_finds_every_acknowledged_item(tmp_path):
    directory = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "walbatch", "demo", "--dir", str(directory), "--items", "4000"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "acknowledged but missing: 0" in result.stdout
    assert "duplicated:               0" in result.stdout
    assert "kill -9 after" in result.stdout


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "walbatch", "demo", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "was not made by walbatch demo" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
