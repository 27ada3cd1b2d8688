"""engine.bulk.BulkAppender: batches commit in order, one transaction each, one
batch behind the caller; an error committing a batch stops the later ones and
reaches the caller."""
from __future__ import annotations

import pytest

from engine import Message
from engine.bulk import BulkAppender
from engine.errors import ModsyncError

U = "alice"


def batch(n: int, tag: str) -> list[Message]:
    return [Message(b"Subject: %s %d\r\n\r\nbody\r\n" % (tag.encode(), i), ("\\Seen",))
            for i in range(n)]


def test_batches_commit_in_order_one_modseq_each(store):
    store.create_mailbox(U, "INBOX")
    store.create_mailbox(U, "Other")
    before = store.user_info(U).modseq
    seen = []
    with BulkAppender(store, U, on_commit=lambda mb, recs: seen.append((mb, len(recs)))) as bulk:
        for i in range(6):
            bulk.append("INBOX" if i % 2 == 0 else "Other", batch(50, f"b{i}"))
    assert seen == [("INBOX", 50), ("Other", 50)] * 3
    recs = store.records(U, "INBOX")
    assert [r.uid for r in recs] == list(range(1, 151))
    # One mutation per batch: each batch's records share one modseq, in order.
    assert sorted({r.stamp.modseq for r in recs}) == [before + 1, before + 3, before + 5]
    assert store.read_body(recs[0].address).startswith(b"Subject: b0 0")
    assert store.read_body(recs[-1].address).startswith(b"Subject: b4 49")


def test_a_failed_batch_stops_the_later_ones_and_is_raised(store, monkeypatch):
    store.create_mailbox(U, "INBOX")
    real = store.append_prepared
    calls = []

    def failing(user, mailbox, prepared):
        calls.append(len(prepared.messages))
        if len(calls) == 2:
            raise ModsyncError("disk full (test)")
        return real(user, mailbox, prepared)
    monkeypatch.setattr(store, "append_prepared", failing)
    bulk = BulkAppender(store, U)
    bulk.append("INBOX", batch(10, "b0"))
    bulk.append("INBOX", batch(10, "b1"))       # commits b0
    with pytest.raises(ModsyncError, match="disk full"):
        bulk.append("INBOX", batch(10, "b2"))   # committing b1 fails
    with pytest.raises(RuntimeError, match="after an error"):
        bulk.append("INBOX", batch(10, "b3"))
    bulk.close()                                # nothing left to commit
    assert len(store.records(U, "INBOX")) == 10
    assert calls == [10, 10]


def test_batches_commit_one_behind_and_wait_commits_the_last(store):
    store.create_mailbox(U, "INBOX")
    bulk = BulkAppender(store, U)
    bulk.append("INBOX", batch(3, "x"))
    assert store.records(U, "INBOX") == []
    bulk.append("INBOX", batch(2, "y"))
    assert len(store.records(U, "INBOX")) == 3
    bulk.wait()
    assert len(store.records(U, "INBOX")) == 5
    bulk.close()


def test_abandon_drops_the_last_batch_handed_over(store):
    store.create_mailbox(U, "INBOX")
    with pytest.raises(KeyError):
        with BulkAppender(store, U) as bulk:
            bulk.append("INBOX", batch(3, "x"))
            bulk.append("INBOX", batch(4, "y"))
            raise KeyError("the caller fails")
    assert len(store.records(U, "INBOX")) == 3


def test_append_after_close_is_refused(store):
    store.create_mailbox(U, "INBOX")
    bulk = BulkAppender(store, U)
    bulk.close()
    with pytest.raises(RuntimeError, match="closed"):
        bulk.append("INBOX", batch(1, "late"))
