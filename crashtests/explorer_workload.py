"""The program the crash explorer traces: walbatch doing its job, on a real directory.

Run as ``python explorer_workload.py ROOT EXTERNAL TRACE SEED``. Under strace
(attached to itself once its imports are done, so the trace holds only what it
does with files) it:

1. opens a DurableBatcher in ``ROOT/data`` with small segments (rolls and
   deletions), a checkpoint after every batch and a sink that refuses every
   "bad" item (dead letters in ``dlq.db``);
2. submits from several threads at once (``submit`` and ``submit_many``) and
   from asyncio tasks (``asubmit``, ``asubmit_many``), so commit groups have
   followers; flushes; closes;
3. opens the log again (recovery on a real directory), submits the same way,
   and stops dead (``os._exit``) without closing: whatever was in flight is.

Two files outside ``ROOT`` tell the explorer what the outside world saw. After
each submit returns, its thread writes ``ack SEQ ID`` lines to ``EXTERNAL/acks``
(one write per call); the sink writes ``SEQ ID`` lines for the items it takes
to ``EXTERNAL/delivered`` (one write per batch) before it returns. Item ids are
fixed-width, and every item's payload follows from its id (``make_item``).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from systrace import traced  # noqa: E402

import walbatch  # noqa: E402
from walbatch import DurableBatcher, PermanentSinkError  # noqa: E402

OPTIONS = [
    dict(segment_bytes=900, max_items=5, max_delay=0.002, checkpoint_interval=0.0,
         retry_initial_delay=0.001, retry_max_delay=0.01),
    dict(segment_bytes=600, max_items=7, max_delay=0.003, checkpoint_interval=0.0,
         retry_initial_delay=0.001, retry_max_delay=0.01),
]


def make_item(item_id: str) -> dict[str, object]:
    """The item with this id: its payload and badness follow from the id alone."""
    n = int(item_id[-4:])
    return {"id": item_id, "p": "x" * (n * 37 % 120), "bad": n % 6 == 5}


def is_bad(item_id: str) -> bool:
    return int(item_id[-4:]) % 6 == 5


def parse_acks(data: bytes) -> list[tuple[int, str]]:
    out = []
    for line in data.decode().splitlines():
        _ack, seq, item_id = line.split()
        out.append((int(seq), item_id))
    return out


def parse_delivered(data: bytes) -> list[tuple[int, str]]:
    out = []
    for line in data.decode().splitlines():
        seq, item_id = line.split()
        out.append((int(seq), item_id))
    return out


class RecordingSink:
    """Takes good items (recording them in ``delivered`` before it returns), refuses bad ones."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, batch):  # noqa: ANN001, ANN201
        lines, outcomes = [], []
        for r in batch:
            if r.item["bad"]:
                outcomes.append(PermanentSinkError("the workload refuses bad items"))
            else:
                lines.append(f"{r.seq} {r.item['id']}\n")
                outcomes.append(None)
        if lines:
            os.write(self.fd, "".join(lines).encode())
        return outcomes


def run_phase(b: DurableBatcher, phase: int, acks: int, rng: random.Random, threads: int,
              calls: int, tasks: int) -> None:
    def ack(seqs, ids) -> None:  # noqa: ANN001
        os.write(acks, "".join(f"ack {s} {i}\n" for s, i in zip(seqs, ids, strict=True)).encode())

    plans = {t: [rng.randint(1, 4) if rng.random() < 0.4 else 0 for _ in range(calls)]
             for t in range(threads + 1)}
    start = threading.Barrier(threads + 1)

    def submitter(t: int) -> None:
        start.wait()
        for k, many in enumerate(plans[t]):
            base = f"p{phase}t{t}-{k:03d}"
            if many:
                ids = [f"{base}-{j}{k * 7 + j:04d}" for j in range(many)]
                r = b.submit_many([make_item(i) for i in ids])
                ack(list(r.seqs), ids)
            else:
                item_id = f"{base}-s{k * 7:04d}"
                ack([b.submit(make_item(item_id)).seq], [item_id])

    async def aio() -> None:
        async def task(n: int) -> None:
            for k in range(calls // 2):
                base = f"p{phase}a{n}-{k:03d}"
                if (n + k) % 3 == 0:
                    ids = [f"{base}-{j}{k * 11 + j + n:04d}" for j in range(3)]
                    r = await b.asubmit_many([make_item(i) for i in ids])
                    ack(list(r.seqs), ids)
                else:
                    item_id = f"{base}-s{k * 11 + n:04d}"
                    ack([(await b.asubmit(make_item(item_id))).seq], [item_id])

        await asyncio.gather(*(task(n) for n in range(tasks)))

    workers = [threading.Thread(target=submitter, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    asyncio.run(aio())
    for w in workers:
        w.join()


def main() -> None:
    root, external, trace_path, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(seed)
    data = os.path.join(root, "data")
    with open(os.path.join(external, "package"), "w") as f:
        f.write(os.path.dirname(walbatch.__file__))  # which walbatch ran: the explorer reports it
    with traced(trace_path):
        acks = os.open(os.path.join(external, "acks"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        delivered = os.open(os.path.join(external, "delivered"),
                            os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sink = RecordingSink(delivered)
        b = DurableBatcher(data, sink, **OPTIONS[0])
        run_phase(b, 1, acks, rng, threads=3, calls=14, tasks=4)
        b.flush(timeout=60)
        b.close()
        b = DurableBatcher(data, sink, **OPTIONS[1])
        run_phase(b, 2, acks, rng, threads=3, calls=10, tasks=3)
        os._exit(0)  # stop dead: the trace ends with whatever was in flight


if __name__ == "__main__":
    main()
