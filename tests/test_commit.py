"""commit.py: group commit over a real Log (and a SimFileSystem for faults)."""

from __future__ import annotations

import errno
import threading
import time

import msgpack
import pytest
from simfs import SimFileSystem
from systrace import STRACE, traced

from walbatch.commit import GroupCommitter
from walbatch.errors import Closed, LogFailed, LogWriteError
from walbatch.framing import decode_items
from walbatch.log import Log

THREADS = 16


def pack(*items: object) -> bytes:
    return b"".join(msgpack.packb(i, use_bin_type=True) for i in items)


class Recorder:
    """An on_durable callback that remembers what it was handed, and on which thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bytes]] = []
        self.threads: list[threading.Thread] = []

    def __call__(self, first: int, count: int, payload: bytes, decoded: object = None) -> None:
        self.calls.append((first, count, bytes(payload)))
        self.threads.append(threading.current_thread())


def run_threads(target, n: int = THREADS) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrapped(k: int) -> None:
        try:
            target(k)
        except BaseException as ex:  # noqa: BLE001 - reported by the test
            errors.append(ex)

    threads = [threading.Thread(target=wrapped, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a committer thread hung"
    return errors


def wait_until(cond, what: str) -> None:
    """Poll ``cond`` (a state change another thread makes); fail rather than hang."""
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


def read_items(log: Log) -> dict[int, object]:
    reader = log.reader(1)
    out: dict[int, object] = {}
    while frames := reader.read():
        for f in frames:
            assert f.payload is not None
            for n, (item, _) in enumerate(decode_items(f.payload, f.count)):
                out[f.first_seq + n] = item
    reader.close()
    return out


@pytest.fixture
def log(tmp_path):
    log = Log.open(str(tmp_path / "log"))
    yield log
    log.close()


def test_seqs_are_dense_and_unique_across_threads(log: Log) -> None:
    rec = Recorder()
    gc = GroupCommitter(log, rec)
    per_thread = 40
    got: dict[tuple[int, int], tuple[int, int]] = {}

    def work(k: int) -> None:
        for i in range(per_thread):
            count = 1 + (k + i) % 3  # some commits carry several items (submit_many)
            items = [[k, i, j] for j in range(count)]
            got[(k, i)] = (gc.commit(pack(*items), count), count)

    assert run_threads(work) == []
    seqs = sorted(s for first, count in got.values() for s in range(first, first + count))
    assert seqs == list(range(1, len(seqs) + 1))
    assert log.next_seq == len(seqs) + 1
    # Each returned seq names exactly the item that committer wrote.
    on_disk = read_items(log)
    for (k, i), (first, count) in got.items():
        assert [on_disk[first + j] for j in range(count)] == [[k, i, j] for j in range(count)]
    # on_durable saw every frame once, in seq order, each a complete group.
    assert [c[0] for c in rec.calls] == sorted(c[0] for c in rec.calls)
    assert sum(c[1] for c in rec.calls) == len(seqs)
    assert rec.calls[0][0] == 1
    for (first, count, _), (nxt, _, _) in zip(rec.calls, rec.calls[1:], strict=False):
        assert nxt == first + count
    assert gc.groups == len(rec.calls)


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian: apt-get install strace)")
def test_concurrent_commits_share_fsyncs(log: Log, tmp_path) -> None:
    # A commit takes a while (on a disk, mostly the fdatasync; here also the
    # callback, so the test holds on a tmpfs too). Whoever arrives meanwhile
    # must ride along in the next group rather than pay for a sync of its own.
    gc = GroupCommitter(log, lambda first, count, payload, decoded: time.sleep(0.0005))
    per_thread = 100
    barrier = threading.Barrier(THREADS)

    def work(k: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            gc.commit(pack([k, i]), 1)

    with traced(str(tmp_path / "trace")) as trace:
        assert run_threads(work) == []
    items = THREADS * per_thread
    assert log.next_seq == items + 1
    # Counted at the operating system: one durable write (O_DSYNC) per group, plus the
    # segment header's write and fdatasync; never one per item.
    syncs = sum(n for path, n in trace.durability_points(log.segdir).items() if path.endswith(".wal"))
    assert syncs == gc.groups + 2
    assert syncs < items // 4


def test_a_group_is_one_frame_with_everyones_items(tmp_path) -> None:
    log = Log.open(str(tmp_path))
    entered = threading.Event()
    queued = threading.Event()
    rec = Recorder()

    def on_durable(first: int, count: int, payload: bytes, decoded: object = None) -> None:
        rec(first, count, payload)
        if first == 1:
            entered.set()
            queued.wait(30)  # hold the first leader until everyone else is queued

    gc = GroupCommitter(log, on_durable)
    t0 = threading.Thread(target=gc.commit, args=(pack("first"), 1))
    t0.start()
    assert entered.wait(30)  # the first leader's group is written and it is holding on
    others = [threading.Thread(target=gc.commit, args=(pack(f"w{k}"), 1)) for k in range(5)]
    for t in others:
        t.start()
    wait_until(lambda: len(gc._queue) == 5, "all 5 are queued")
    queued.set()
    for t in [t0, *others]:
        t.join(30)
    log.close()
    assert [(first, count) for first, count, _ in rec.calls] == [(1, 1), (2, 5)]
    assert gc.groups == 2
    assert sorted(i for i, _ in decode_items(rec.calls[1][2], 5)) == [f"w{k}" for k in range(5)]


def test_a_lone_committer_does_the_work_on_its_own_thread(log: Log) -> None:
    rec = Recorder()
    gc = GroupCommitter(log, rec)
    before = threading.active_count()
    for n in range(5):
        assert gc.commit(pack(n), 1) == n + 1
    assert threading.active_count() == before
    assert rec.threads == [threading.current_thread()] * 5
    assert [c[:2] for c in rec.calls] == [(n + 1, 1) for n in range(5)]
    assert log.synced_seq == 5  # durable when commit returned


def test_commit_returns_only_once_durable() -> None:
    fs = SimFileSystem()
    log = Log.open("/log", fs=fs)
    gc = GroupCommitter(log, Recorder())
    seqs = [gc.commit(pack("a", "b"), 2), gc.commit(pack("c"), 1)]
    assert seqs == [1, 3]
    fs.crash()  # a power cut right after the acks
    log = Log.open("/log", fs=fs)
    assert read_items(log) == {1: "a", 2: "b", 3: "c"}
    log.close()


@pytest.mark.parametrize(
    ("op", "err", "exc"),
    [("write", errno.ENOSPC, LogWriteError), ("sync", errno.EIO, LogFailed)],
)
def test_an_error_in_the_groups_write_reaches_every_waiter_of_that_group(op: str, err: int, exc) -> None:
    # "sync": on a file system that does not honour O_DSYNC, where the log fdatasyncs.
    fs = SimFileSystem(honour_dsync=op != "sync")
    log = Log.open("/log", fs=fs)
    entered = threading.Event()
    queued = threading.Event()
    rec = Recorder()

    def on_durable(first: int, count: int, payload: bytes, decoded: object = None) -> None:
        rec(first, count, payload)
        if first == 1:
            entered.set()
            queued.wait(30)
            fs.fail(op, err)  # the next group's write (or fsync) fails

    gc = GroupCommitter(log, on_durable)
    results: dict[str, object] = {}

    def commit(name: str) -> None:
        try:
            results[name] = gc.commit(pack(name), 1)
        except BaseException as ex:  # noqa: BLE001
            results[name] = ex

    leader = threading.Thread(target=commit, args=("leader",))
    leader.start()
    assert entered.wait(30)  # the first leader's group is written and it is holding on
    waiters = [threading.Thread(target=commit, args=(f"w{k}",)) for k in range(6)]
    for t in waiters:
        t.start()
    wait_until(lambda: len(gc._queue) == len(waiters), "every waiter is queued")
    queued.set()
    for t in [leader, *waiters]:
        t.join(30)
        assert not t.is_alive()

    assert results.pop("leader") == 1
    assert len(results) == 6
    errors = list(results.values())
    assert all(isinstance(e, exc) for e in errors), errors
    assert len({id(e) for e in errors}) == 1  # one shared status for the group
    assert [c[:2] for c in rec.calls] == [(1, 1)]  # the failed group was never "durable"
    if exc is LogWriteError:
        # The log is still usable and the failed seqs were not consumed.
        assert gc.commit(pack("after"), 1) == 2
        assert read_items(log) == {1: "leader", 2: "after"}
    else:
        # After a failed fsync every later commit is refused until reopened.
        with pytest.raises(LogFailed):
            gc.commit(pack("after"), 1)
    log.close()


def test_close_refuses_new_commits(log: Log) -> None:
    gc = GroupCommitter(log, Recorder())
    assert gc.commit(pack("a"), 1) == 1
    gc.close()
    with pytest.raises(Closed):
        gc.commit(pack("b"), 1)
    assert log.next_seq == 2  # nothing was written
    gc.close()  # idempotent


def test_close_waits_for_the_running_group(log: Log) -> None:
    entered = threading.Event()
    proceed = threading.Event()

    def on_durable(first: int, count: int, payload: bytes, decoded: object = None) -> None:
        entered.set()
        proceed.wait(30)

    gc = GroupCommitter(log, on_durable)
    t = threading.Thread(target=gc.commit, args=(pack("a"), 1))
    t.start()
    entered.wait(30)
    closer_done = threading.Event()
    closer = threading.Thread(target=lambda: (gc.close(), closer_done.set()))
    closer.start()
    wait_until(lambda: gc._closed, "close() has begun")
    with pytest.raises(Closed):  # refused at once, while the running group finishes
        gc.commit(pack("b"), 1)
    assert not closer_done.is_set()
    proceed.set()
    t.join(30)
    closer.join(30)
    assert closer_done.is_set()
    assert log.synced_seq == 1


def test_max_group_bytes_caps_a_group(tmp_path) -> None:
    log = Log.open(str(tmp_path))
    entered = threading.Event()
    queued = threading.Event()
    rec = Recorder()

    def on_durable(first: int, count: int, payload: bytes, decoded: object = None) -> None:
        rec(first, count, payload)
        if first == 1:
            entered.set()
            queued.wait(30)

    item = pack("x" * 100)
    gc = GroupCommitter(log, on_durable, max_group_bytes=3 * len(item))
    t0 = threading.Thread(target=gc.commit, args=(item, 1))
    t0.start()
    assert entered.wait(30)  # the first leader's group is written and it is holding on
    others = [threading.Thread(target=gc.commit, args=(item, 1)) for _ in range(7)]
    for t in others:
        t.start()
    wait_until(lambda: len(gc._queue) == 7, "all 7 are queued")
    queued.set()
    for t in [t0, *others]:
        t.join(30)
    log.close()
    assert [c[1] for c in rec.calls] == [1, 3, 3, 1]
    assert all(len(c[2]) <= 3 * len(item) for c in rec.calls)


def test_exclusive_runs_while_no_commit_runs_and_never_joins_a_group(log: Log) -> None:
    # exclusive() queues like a committer; a leader collecting its group must not
    # take that placeholder along (it would run fn while appends go on).
    gc = GroupCommitter(log, Recorder())
    overlaps: list[str] = []
    stop = threading.Event()

    def fn() -> int:
        before = log.next_seq
        time.sleep(0.0005)
        if log.next_seq != before:
            overlaps.append(f"an append ran during exclusive: {before} -> {log.next_seq}")
        return 0

    def work(k: int) -> None:
        if k == 0:
            while not stop.is_set():
                gc.exclusive(fn)
            return
        for i in range(150):
            gc.commit(pack([k, i]), 1)
        if k == 1:
            stop.set()

    assert run_threads(work, n=8) == []
    assert overlaps == []
    assert log.synced_seq == 7 * 150
