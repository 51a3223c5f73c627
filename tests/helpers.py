"""Shared test scaffolding for the DurableBatcher tests: fast options, the wait bound, a recording sink."""

from __future__ import annotations

import glob
import textwrap
import threading

FAST = {"max_delay": 0.01, "retry_initial_delay": 0.001, "retry_max_delay": 0.01,
        "checkpoint_interval": 0.01}
WAIT = 10.0  # seconds: the bound on every wait, so a bug fails a test instead of hanging it


class Collector:
    """A sink that records every batch it took: (reason, attempt, [(seq, item), ...])."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[str, int, list[tuple[int, object]]]] = []

    def write(self, batch) -> None:
        with self.lock:
            self.batches.append((batch.reason, batch.attempt, [(r.seq, r.item) for r in batch]))

    @property
    def records(self) -> list[tuple[int, object]]:
        with self.lock:
            return [rec for _, _, recs in self.batches for rec in recs]

    @property
    def seqs(self) -> list[int]:
        return [s for s, _ in self.records]

    @property
    def items(self) -> list[object]:
        return [i for _, i in self.records]

    def reasons(self) -> list[str]:
        with self.lock:
            return [reason for reason, _, _ in self.batches]

    def sizes(self) -> list[int]:
        with self.lock:
            return [len(recs) for _, _, recs in self.batches]


# ---------------------------------------------------------------- kill -9 harness

def acking_writer(options: dict, threads: int = 2) -> str:
    """Source of a child process that submits to a DurableBatcher until it is killed.

    Run as ``python -c SCRIPT LOG_DIR SINK_URL ACKS CYCLE``. ``threads`` threads submit
    items ``{"id", "p"}`` (one by one, and every fifth time 15 in one submit_many)
    and append each id to ``ACKS.CYCLE.THREAD`` only after its acknowledgement.
    It prints ``ready`` once the batcher is open.
    """
    return textwrap.dedent("""
        import logging, sys, threading
        from walbatch import DurableBatcher
        logging.getLogger("walbatch").setLevel(logging.ERROR)  # retries are expected here
        log_dir, sink, acks, cycle = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        b = DurableBatcher(log_dir, sink, **OPTIONS)
        def work(t):
            with open(f"{acks}.{cycle}.{t}", "a", buffering=1) as f:
                k = 0
                while True:
                    if k % 5 == 2:
                        items = [{"id": f"{cycle}-{t}-{k}-{j}", "p": "x" * (j * 7 % 90)}
                                 for j in range(15)]
                        b.submit_many(items)
                        f.write("".join(i["id"] + "\\n" for i in items))
                    else:
                        item = {"id": f"{cycle}-{t}-{k}", "p": "y" * (k % 80)}
                        b.submit(item)
                        f.write(item["id"] + "\\n")
                    k += 1
        for t in range(THREADS):
            threading.Thread(target=work, args=(t,), daemon=True).start()
        print("ready", flush=True)
        threading.Event().wait()
    """).replace("**OPTIONS", "**" + repr(options)).replace("THREADS", str(threads))


def payload_ok(item_id: str, p: str) -> bool:
    """Whether ``p`` is the payload acking_writer gave the item ``item_id``."""
    parts = item_id.split("-")
    if len(parts) == 4:
        return p == "x" * (int(parts[3]) * 7 % 90)
    return p == "y" * (int(parts[2]) % 80)


def read_acks(prefix: str) -> set[str]:
    """Every id the writers acknowledged (complete lines of ``PREFIX.*``)."""
    acked: set[str] = set()
    for path in glob.glob(glob.escape(prefix) + ".*"):
        with open(path) as f:
            acked.update(line[:-1] for line in f if line.endswith("\n"))
    return acked


def answered(socks: list, at_least: int, timeout: float = WAIT) -> list:
    """The sockets with something to read (an answer, or EOF), once ``at_least`` have it."""
    import select
    import time

    deadline = time.monotonic() + timeout
    ready: list = []
    while len(ready) < at_least and time.monotonic() < deadline:
        ready, _, _ = select.select(socks, [], [], 0.2)
    return ready
