"""The dead-letter store: where refused items go, how to list, requeue and purge them."""

from __future__ import annotations

import sqlite3
import threading

import msgpack
import pytest
from helpers import WAIT, Collector

from walbatch import DeadLettered, DeadLetterStore, DurableBatcher, LogFull, PermanentSinkError, WalbatchError
from walbatch.dlq import list_dead_letters
from walbatch.requeue import requeue


class Picky:
    """Refuses items marked ``{"bad": ...}`` for good while ``strict``; takes the rest."""

    def __init__(self) -> None:
        self.strict = True
        self.lock = threading.Lock()
        self.taken: list[tuple[int, object]] = []

    def write(self, batch):
        out: list[BaseException | None] = []
        with self.lock:
            for r in batch:
                if self.strict and isinstance(r.item, dict) and "bad" in r.item:
                    out.append(PermanentSinkError(f"rejected by schema: {r.item['bad']}"))
                else:
                    self.taken.append((r.seq, r.item))
                    out.append(None)
        return out

    @property
    def items(self) -> list[object]:
        with self.lock:
            return [i for _, i in self.taken]


def dead_letter_three(b: DurableBatcher) -> list[int]:
    """Submit 2 good and 3 bad items; return the bad ones' seqs once all are settled."""
    receipts = b.submit_many([{"ok": 1}, {"bad": "a"}, {"ok": 2}, {"bad": "b"}, {"bad": "c"}])
    b.flush(WAIT)
    dead = []
    for r in receipts:
        try:
            r.wait(WAIT)
        except DeadLettered:
            dead.append(r.seq)
    return dead


def test_dead_letters_land_in_dlq_db_with_error_text_and_type(make, logdir):
    b = make(Picky())
    assert dead_letter_three(b) == [2, 4, 5]
    conn = sqlite3.connect(logdir / "dlq.db")
    try:
        rows = conn.execute(
            "SELECT log_id, seq, item, error, error_type, attempts, lost FROM dead_letters ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    assert [r[1] for r in rows] == [2, 4, 5]
    assert {r[0] for r in rows} == {b.log_id}
    assert [msgpack.unpackb(r[2]) for r in rows] == [{"bad": "a"}, {"bad": "b"}, {"bad": "c"}]
    assert rows[0][3] == "PermanentSinkError: rejected by schema: a"
    assert {r[4] for r in rows} == {"PermanentSinkError"}
    assert {(r[5], r[6]) for r in rows} == {(1, 0)}


def test_list_dead_letters_while_open_and_after_close(make, logdir):
    b = make(Picky())
    dead_letter_three(b)
    listed = list_dead_letters(str(logdir))  # a second connection while the batcher runs
    assert [(d.seq, d.item) for d in listed] == [(2, {"bad": "a"}), (4, {"bad": "b"}), (5, {"bad": "c"})]
    assert all(d.log_id == b.log_id and not d.lost for d in listed)
    assert "rejected by schema: b" in listed[1].error
    assert [d.seq for d in b.dead_letters.list()] == [2, 4, 5]
    assert b.dead_letters.count() == 3
    b.close(timeout=WAIT)
    assert [d.seq for d in list_dead_letters(str(logdir))] == [2, 4, 5]
    assert [d.seq for d in list_dead_letters(str(logdir), limit=2)] == [2, 4]


def test_list_dead_letters_of_a_directory_without_any_is_empty(tmp_path):
    assert list_dead_letters(str(tmp_path / "nothing here")) == []


def test_requeue_resubmits_with_new_seqs_and_removes_them(make):
    sink = Picky()
    b = make(sink)
    dead = dead_letter_three(b)
    sink.strict = False  # the schema was fixed
    assert b.dead_letters.requeue(b.submit_many) == 3
    assert b.dead_letters.count() == 0
    b.flush(WAIT)
    requeued = [(s, i) for s, i in sink.taken if isinstance(i, dict) and "bad" in i]
    assert [i for _, i in requeued] == [{"bad": "a"}, {"bad": "b"}, {"bad": "c"}]
    assert all(s > max(dead) for s, _ in requeued)  # new seqs, after everything else
    s = b.stats()
    assert s.submitted == 8 and s.delivered == 5 and s.dead_lettered == 3 and s.pending == 0


def test_requeue_of_chosen_seqs_only(make):
    sink = Picky()
    b = make(sink)
    dead_letter_three(b)
    sink.strict = False
    assert b.dead_letters.requeue(b.submit_many, seqs=[4]) == 1
    assert [d.seq for d in b.dead_letters.list()] == [2, 5]
    b.flush(WAIT)
    assert sink.items.count({"bad": "b"}) == 1
    assert {"bad": "a"} not in sink.items


def test_requeue_with_nothing_to_requeue_submits_nothing(make):
    b = make(Picky())
    b.submit("x")
    b.flush(WAIT)
    assert b.dead_letters.requeue(b.submit_many) == 0
    assert b.stats().submitted == 1


def test_requeue_skips_items_lost_to_corruption(make):
    b = make(Picky())
    b.dead_letters.add(b.log_id, [(7, None)], "lost to corruption in seg at offset 9", lost=True)
    b.dead_letters.add(b.log_id, [(8, {"bad": "x"})], PermanentSinkError("nope"))
    assert b.dead_letters.requeue(b.submit_many) == 1
    (left,) = b.dead_letters.list()
    assert (left.seq, left.lost, left.item, left.error_type) == (7, True, None, "Lost")


def test_recording_the_same_failure_twice_keeps_one_row(tmp_path):
    store = DeadLetterStore(str(tmp_path / "dlq.db"))
    try:
        store.add("log", [(1, "a"), (2, "b")], ValueError("first"))
        store.add("log", [(2, "b")], ValueError("second"), attempts=2)
        rows = store.list()
        assert [(d.seq, d.error, d.attempts) for d in rows] == [
            (1, "ValueError: first", 1), (2, "ValueError: second", 2)]
    finally:
        store.close()


def test_purge_all_or_chosen_seqs(make, logdir):
    b = make(Picky())
    dead_letter_three(b)
    assert b.dead_letters.purge(seqs=[2, 5]) == 2
    assert [d.seq for d in b.dead_letters.list()] == [4]
    assert b.dead_letters.purge() == 1
    assert b.dead_letters.count() == 0
    assert list_dead_letters(str(logdir)) == []
    assert b.dead_letters.purge() == 0


def test_requeue_by_directory_puts_them_back_in_the_log_for_the_next_open(make, logdir):
    b = make(Picky())
    dead_letter_three(b)
    with pytest.raises(WalbatchError, match="no daemon answers"):  # in use by this process
        requeue(str(logdir))
    b.close(timeout=WAIT)

    assert requeue(str(logdir)) == 3
    assert list_dead_letters(str(logdir)) == []

    sink = Picky()
    sink.strict = False
    b2 = make(sink)
    b2.flush(WAIT)
    assert sink.items == [{"bad": "a"}, {"bad": "b"}, {"bad": "c"}]
    assert [s for s, _ in sink.taken] == [6, 7, 8]
    s = b2.stats()
    assert (s.submitted, s.delivered, s.dead_lettered, s.pending) == (8, 5, 3, 0)


def test_requeue_by_directory_with_a_sink_delivers_at_once(make, logdir):
    b = make(Picky())
    dead_letter_three(b)
    b.close(timeout=WAIT)
    sink = Picky()
    sink.strict = False
    assert requeue(str(logdir), sink=sink) == 3
    assert sink.items == [{"bad": "a"}, {"bad": "b"}, {"bad": "c"}]
    assert list_dead_letters(str(logdir)) == []


def test_a_damaged_store_is_corrupt_log_but_one_it_cannot_open_is_an_os_error(tmp_path):
    from walbatch import CorruptLog

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all " * 100)
    with pytest.raises(CorruptLog, match="damaged"):
        DeadLetterStore(str(garbage))
    # Access, not damage (another user's file, a directory in its place): the store
    # must not be called damaged, or an operator moves a healthy one aside.
    unopenable = tmp_path / "dir.db"
    unopenable.mkdir()
    with pytest.raises(OSError, match="cannot use the dead-letter store") as info:
        DeadLetterStore(str(unopenable))
    assert not isinstance(info.value, CorruptLog)


def test_a_store_whose_schema_does_not_decode_is_damaged_not_an_access_problem(tmp_path):
    """Found by crashtests/test_corruption.py (seed 1498955189): a bit flip in the
    table's schema text made sqlite3 raise "Could not decode to UTF-8", which carries
    no SQLite result code and was reported as an access problem (OSError)."""
    from walbatch import CorruptLog

    path = tmp_path / "dlq.db"
    DeadLetterStore(str(path)).close()
    data = path.read_bytes()
    assert data.count(b'"error"') == 1  # the column in the CREATE TABLE text
    path.write_bytes(data.replace(b'"error"', b'"e\xffror"'))
    with pytest.raises(CorruptLog, match="damaged"):
        DeadLetterStore(str(path))


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_a_truncated_or_deleted_store_is_reported_not_silently_empty(make, logdir, how):
    # The checkpoint still counted the dead letters, but status and dlq list showed
    # none and nothing said the store had been lost.
    def refuse(batch):
        return [PermanentSinkError("no") for _ in batch]

    b = make(refuse)
    b.submit_many(["a", "b", "c"])
    b.flush(WAIT)
    b.close()
    path = logdir / "dlq.db"
    for extra in ("-wal", "-shm"):
        (logdir / f"dlq.db{extra}").unlink(missing_ok=True)
    if how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    b2 = make(Collector())
    assert b2.stats().dead_lettered == 3
    [entry] = list_dead_letters(logdir)
    assert entry.seq == 0 and entry.lost
    assert f"was {how}" in entry.error and "3 dead letter(s)" in entry.error
    b2.close()
    b3 = make(Collector())  # reported once, not again at every open
    assert len(list_dead_letters(logdir)) == 1
    b3.close()


def test_a_log_without_dead_letters_and_without_a_store_reports_nothing(make, logdir):
    b = make(Collector())
    b.submit("x")
    b.flush(WAIT)
    b.close()
    (logdir / "dlq.db").unlink()
    make(Collector()).close()
    assert list_dead_letters(logdir) == []


def test_a_dead_letter_combine_made_unstorable_is_kept_as_text_and_delivery_goes_on(make, logdir):
    # combine may change items; one it turned into a set could not be stored as a
    # dead letter, and storing it was retried forever, holding back everything after.
    def to_set(batch):
        return [r._replace(item={"as": "set", "v": {r.item}}) if r.item == "bad" else r
                for r in batch]

    def sink(batch):
        return [PermanentSinkError("refused") if isinstance(r.item, dict) else None
                for r in batch]

    b = make(sink, combine=to_set)
    receipts = b.submit_many(["ok1", "bad", "ok2"])
    with pytest.raises(DeadLettered):
        receipts[1].wait(WAIT)
    receipts[2].wait(WAIT)
    [dead] = list_dead_letters(logdir)
    assert dead.seq == 2 and "stored as its repr" in dead.error
    assert "'set'" in dead.item or "{'bad'}" in dead.item


def test_a_requeue_cut_short_by_log_full_does_not_submit_the_same_items_twice(make, logdir):
    # Rows were removed only after every key's submit; when a later key's submit
    # hit LogFull the earlier key's items were in the log and still in the store,
    # so the next requeue delivered them twice.
    def refuse(batch):
        if batch.key is not None:
            raise PermanentSinkError("no")

    b = make(refuse, segment_bytes=4096, max_log_bytes=1 << 20)
    b.submit_many([f"A{i}" for i in range(3)], key="A")
    b.submit_many([f"B{i}-" + "x" * 1500 for i in range(4)], key="B")
    b.submit("filler")
    b.flush(WAIT)
    b.close()
    assert len(list_dead_letters(logdir)) == 7

    gate = threading.Event()
    got: list[str] = []

    def slow(batch):
        gate.wait(WAIT)
        got.extend(r.item[:2] for r in batch)

    b = make(slow, segment_bytes=4096, max_log_bytes=12000, submit_timeout=0.5)
    b.submit_many(["f" * 1000] * 6)  # other traffic fills the log while the sink waits
    with pytest.raises(LogFull):
        b.dead_letters.requeue(b.submit_many)  # A fits, B does not
    assert len(list_dead_letters(logdir)) == 4  # A's rows went with A's submit
    gate.set()
    b.flush(WAIT)
    assert b.dead_letters.requeue(b.submit_many) == 4
    b.flush(WAIT)
    assert sorted(x for x in got if x[0] in "AB") == ["A0", "A1", "A2", "B0", "B1", "B2", "B3"]


def test_a_dead_letter_past_the_checkpoint_is_delivered_again_not_twice(make, logdir):
    # Key B was dead-lettered while key A's earlier batch kept failing, so the
    # checkpoint stayed before both; the next open delivered B's item again and its
    # row stayed in the store, so a requeue delivered it a second time.
    healthy = threading.Event()
    got: list[tuple[int, str]] = []

    def sink(batch):
        if not healthy.is_set():
            if batch.key == "A":
                raise ConnectionError("A is down")
            if batch.key == "B":
                raise PermanentSinkError("B refused")
        got.extend((r.seq, r.item) for r in batch)

    b = make(sink, flush_concurrency=2)
    b.submit("a-item", key="A")
    with pytest.raises(DeadLettered):
        b.submit("b-item", key="B").wait(WAIT)
    assert b.stats().last_checkpoint == 0
    b.close(timeout=0.2)
    healthy.set()
    b2 = make(sink)
    b2.flush(WAIT)
    assert sorted(got) == [(1, "a-item"), (2, "b-item")]
    assert list_dead_letters(logdir) == []
    assert b2.dead_letters.requeue(b2.submit_many) == 0
    s = b2.stats()
    assert (s.submitted, s.delivered, s.dead_lettered, s.pending) == (2, 2, 0, 0)
