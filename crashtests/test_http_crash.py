"""kill -9 the daemon under HTTP load: every item answered 200 is in the sink, once.

Each cycle starts `walbatch serve --http` and a client process whose threads POST
single JSON items and NDJSON batches over keep-alive connections, appending each
item's id to their acks file only after its 200. After a seeded number of
acknowledged bytes the daemon is killed with SIGKILL (mid-request, mid-fsync,
mid-delivery to the real SQLite sink, whose unique key on the log id and seq makes
it idempotent). At the end the log is opened once more and flushed.

Invariant: every id answered 200 is in SQLite exactly once with its payload; no
dead letters; the stats tally holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from http_daemon import HttpDaemon
from test_process_crash import OPTS, check, wait_for_acks

CLIENT = textwrap.dedent("""
    import http.client, json, sys, threading
    port, acks, cycle = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    def work(t):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with open(f"{acks}.{cycle}.{t}", "a", buffering=1) as f:
            k = 0
            while True:
                if k % 5 == 0:
                    # The payloads of tests/helpers.acking_writer, so payload_ok checks them.
                    items = [{"id": f"{cycle}-{t}-{k}-{j}", "p": "x" * (j * 7 % 90)}
                             for j in range(30)]
                    body = "".join(json.dumps(i) + "\\n" for i in items)
                    ctype = "application/x-ndjson"
                else:
                    items = [{"id": f"{cycle}-{t}-{k}", "p": "y" * (k % 80)}]
                    body, ctype = json.dumps(items[0]), "application/json"
                try:
                    conn.request("POST", "/v1/items", body, {"Content-Type": ctype})
                    resp = conn.getresponse()
                    answer = resp.read()
                except (OSError, http.client.HTTPException):
                    return  # the daemon died: an unanswered POST is not acknowledged
                if resp.status == 200:
                    assert json.loads(answer)["count"] == len(items)
                    f.write("".join(i["id"] + "\\n" for i in items))
                k += 1
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads: th.start()
    for th in threads: th.join()
""")


def test_kill_9_the_daemon_under_http_load(scenario):
    directory = tempfile.mkdtemp(prefix="walbatch-killh-")
    db, acks = os.path.join(directory, "out.db"), os.path.join(directory, "acks")
    cycles = scenario.iterations(8)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in OPTS.items()]
    for cycle in range(cycles):
        daemon = HttpDaemon(Path(directory) / "log", ["--sink", f"sqlite:///{db}?table=t", *flags])
        daemon.start()
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(daemon.port), acks, str(cycle)])
        try:
            wait_for_acks(acks, cycle, scenario.rng.randint(2_000, 60_000), daemon.proc)
        finally:
            daemon.kill()
        try:
            client.wait(60)
        finally:
            if client.poll() is None:
                client.kill()
    scenario.add(cycles=cycles)
    check(directory, db, acks, scenario)
