"""last_active_at through the daemon: web workers in any language, one walbatch serve.

The same batching as ``last_active_at.py``, but the request handlers are
separate processes (as a web server's workers are) that hand each touch to
``walbatch serve`` over its Unix socket; the daemon's sink is
``last_active_at:make_sink`` (a function that builds the ApplySink) and each
batch is coalesced to the last touch per user (``--combine
last_active_at:last_touch``). Every user ends up holding their newest request.

Run it: ``python examples/last_active_at_daemon.py [DIR]``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

from walbatch import Client

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = """
import random, sys, time
from walbatch import Client
sock, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(worker)
with Client(sock) as c:
    for _ in range(n):
        user = rng.randrange(100)
        seq = c.submit({"user_id": user, "at": time.time()})   # answered once fsync'd
        print(user, seq, flush=False)
"""


def main(directory: str) -> None:
    sys.path.insert(0, HERE)
    from last_active_at import create_users

    os.makedirs(directory, exist_ok=True)
    db_path = os.path.join(directory, "app.db")
    create_users(db_path)
    data, sock = os.path.join(directory, "data"), os.path.join(directory, "wb.sock")
    env = {**os.environ, "LAST_ACTIVE_DB": db_path,
           "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    daemon = subprocess.Popen([sys.executable, "-m", "walbatch", "serve", "--data-dir", data,
                               "--socket", sock, "--sink", "last_active_at:make_sink",
                               "--combine", "last_active_at:last_touch",
                               "--max-delay", "0.05", "--log-level", "warning"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("walbatch serve did not start")
            time.sleep(0.02)
        workers = [subprocess.Popen([sys.executable, "-c", WORKER, sock, str(w), "300"],
                                    stdout=subprocess.PIPE, text=True, env=env) for w in range(8)]
        newest: dict[int, int] = {}
        for w in workers:
            out, _ = w.communicate(timeout=120)
            if w.returncode:
                raise SystemExit(f"a worker failed with {w.returncode}")
            for line in out.splitlines():
                user, seq = map(int, line.split())
                newest[user] = max(newest.get(user, 0), seq)
        with Client(sock) as c:
            c.flush(timeout=30)
            stats = c.stats()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    with sqlite3.connect(db_path) as db:
        stored = dict(db.execute("SELECT id, last_seq FROM users"))
    wrong = [u for u, seq in newest.items() if stored[u] != seq]
    print(f"{stats['submitted']} requests from 8 worker processes, {stats['delivered']} delivered; "
          f"users checked: {len(newest)}, not holding their newest request: {len(wrong)}")
    if wrong:
        raise SystemExit(f"users {wrong[:5]} do not hold their newest request")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "last-active-at-daemon-demo")
