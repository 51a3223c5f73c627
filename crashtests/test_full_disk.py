"""Writes that fail because the disk is full (ENOSPC) or the file too large (EFBIG).

submit raises a clear error and acknowledges nothing it could not write; nothing
acknowledged is lost; once space returns, the same batcher works again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from walbatch import DurableBatcher, WalbatchError

EFBIG_CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from walbatch import DurableBatcher, WalbatchError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    directory, limit = sys.argv[1], int(sys.argv[2])
    got, acked, errors = {}, {}, []
    def sink(batch):
        for r in batch:
            got[r.seq] = r.item
    b = DurableBatcher(directory, sink, segment_bytes=1 << 20, max_delay=0.001)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))   # the "disk" fills up
    k = 0
    while len(errors) < 5:
        item = {"k": k, "pad": "e" * 100}
        try:
            acked[b.submit(item).seq] = item
        except WalbatchError as ex:
            errors.append(f"{type(ex).__name__}: {ex}")
        k += 1
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))    # space returns
    for j in range(200):
        item = {"after": j}
        acked[b.submit(item).seq] = item
    b.flush(timeout=60)
    b.close()
    lost = [s for s, item in acked.items() if got.get(s) != item]
    print(json.dumps({"acked": len(acked), "delivered": len(got), "lost": len(lost),
                      "errors": errors}))
""")


def test_efbig_is_a_clear_error_and_the_batcher_recovers(scenario, tmp_path):
    out = subprocess.run([sys.executable, "-c", EFBIG_CHILD, str(tmp_path / "log"), str(48 << 10)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    scenario.add(acknowledged=result["acked"], delivered=result["delivered"], lost=result["lost"],
                 write_errors=len(result["errors"]))
    assert result["lost"] == 0
    assert all(e.startswith("LogWriteError") and "nothing in this write was acknowledged" in e
               for e in result["errors"]), result["errors"]
    assert any("File too large" in e for e in result["errors"]), result["errors"]


@pytest.fixture
def tiny_tmpfs():
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs to fill needs root")
    mnt = tempfile.mkdtemp(prefix="walbatch-full-")
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", mnt],
                        capture_output=True, text=True)
    if rc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {rc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
        os.rmdir(mnt)


def test_enospc_is_a_clear_error_and_the_batcher_recovers(scenario, tiny_tmpfs):
    directory = os.path.join(tiny_tmpfs, "log")
    ballast = os.path.join(tiny_tmpfs, "ballast")
    got: dict[int, object] = {}
    up = {"ok": False}

    def sink(batch):
        if not up["ok"]:
            raise OSError(28, "sink's disk is full too")
        for r in batch:
            got[r.seq] = r.item

    acked: dict[int, object] = {}
    errors: list[str] = []
    b = DurableBatcher(directory, sink, segment_bytes=64 << 10, max_log_bytes=1 << 30,
                       max_delay=0.001, retry_initial_delay=0.001, retry_max_delay=0.01)
    with open(ballast, "wb") as f:  # leave only a little room
        try:
            f.write(b"\0" * (400 << 10))
        except OSError:
            pass
    k = 0
    while len(errors) < 5 and k < 100000:
        item = {"k": k, "pad": "n" * 200}
        try:
            acked[b.submit(item).seq] = item
        except WalbatchError as ex:
            errors.append(f"{type(ex).__name__}: {ex}")
        k += 1
    os.unlink(ballast)  # space returns
    up["ok"] = True
    for j in range(100):
        acked[b.submit({"after": j}).seq] = {"after": j}
    b.flush(timeout=60)
    stats = b.stats()
    b.close()
    lost = [s for s, item in acked.items() if got.get(s) != item]
    scenario.add(acknowledged=len(acked), delivered=len(got), lost=len(lost), write_errors=len(errors))
    assert errors and all("No space left on device" in e for e in errors), errors[:3]
    assert all(e.startswith("LogWriteError") for e in errors), errors[:3]
    assert not lost
    assert stats.pending == 0
