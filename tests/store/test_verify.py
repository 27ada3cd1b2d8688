"""engine/verify.py: every kind of damage is found, named, and nothing is changed.

The property tests use verify_store as one of their oracles, so here each
check is shown to fire: the store is damaged behind the engine's back (raw
LMDB writes) in exactly one way, and the report must name that.
"""
from __future__ import annotations

import dataclasses

import pytest

from engine import Message, Store
from engine.model import (
    ACL,
    MAILBOX,
    RECORD,
    U32,
    U64,
    AclEntry,
    Record,
    Stamp,
    _pack,
    unpackb,
)
from engine.mutation import UserRecord, change_key, object_key, origin_key
from engine.store import IX_NAME
from engine.verify import verify_store

from . import oracle

U = "alice"


@pytest.fixture
def full(store) -> Store:
    """A store with a bit of everything."""
    store.create_mailbox(U, "INBOX")
    store.create_mailbox(U, "Other")
    store.append_many(U, "INBOX", [Message(b"m%d" % i, ("\\Seen",) if i % 2 else (), 100 + i)
                                   for i in range(4)])
    store.set_message_annotation(U, "INBOX", 2, "/comment", "", b"note")
    store.expunge(U, "INBOX", [(3, 3)])
    store.subscribe(U, "INBOX")
    store.set_acl(U, "INBOX", "bob", "lr")
    store.set_annotation(U, "INBOX", "/comment", b"x")
    store.sieve_put(U, "s", b"keep;")
    store.set_quota(U, "", {"STORAGE": 5})
    store.set_seen(U, "box", "1:2")
    store.create_mailbox("bob", "INBOX")
    store.append("bob", "INBOX", b"bob's")
    return store


def user(store, name=U) -> UserRecord:
    return store.user_info(name)


def edit_mailbox(store, name, **changes):
    u, mb = user(store), store.mailbox(U, name)
    new = dataclasses.replace(mb, **changes)
    store.db.write(lambda txn: txn.put("objects", object_key(u, MAILBOX, mb.key()), new.pack()))


def edit_record(store, mailbox, uid, **changes):
    u = user(store)
    rec = next(r for r in store.records(U, mailbox, include_expunged=True) if r.uid == uid)
    new = dataclasses.replace(rec, **changes)
    store.db.write(lambda txn: txn.put("objects", object_key(u, RECORD, rec.key()), new.pack()))


def edit_user(store, **changes):
    u = user(store)
    for k, v in changes.items():
        setattr(u, k, v)
    store.db.write(lambda txn: txn.put("users", U.encode(), u.pack()))


def problems(store):
    return sorted({p.what for p in verify_store(store).problems})


def test_a_sound_store_verifies(full):
    report = verify_store(full)
    assert report.ok, [p.as_dict() for p in report.problems]
    assert (report.users, report.mailboxes, report.records) == (2, 3, 4)
    assert report.blobs == 6      # 4 messages + bob's + the sieve script


def test_verify_changes_nothing(full):
    edit_mailbox(full, "INBOX", messages=99)
    before = [(c.kind, c.object.pack()) for c in full.changes_since(U, 0)]
    info = user(full).pack()
    assert not verify_store(full).ok
    assert [(c.kind, c.object.pack()) for c in full.changes_since(U, 0)] == before
    assert user(full).pack() == info
    assert full.mailbox(U, "INBOX").messages == 99     # reported, never "repaired"


@pytest.mark.parametrize("field,delta", [
    ("messages", 1), ("size", 7), ("crc", 1), ("cyrus_crc", 1), ("cyrus_crc_annot", 1),
])
def test_mailbox_counters_and_crcs(full, field, delta):
    mb = full.mailbox(U, "INBOX")
    edit_mailbox(full, "INBOX", **{field: getattr(mb, field) ^ delta if "crc" in field
                                   else getattr(mb, field) + delta})
    assert problems(full) == ["crc"]


def test_uidnext_not_above_every_uid(full):
    edit_mailbox(full, "INBOX", uidnext=3)           # UID 4 exists (and UID 3 is a tombstone)
    assert "mailbox" in problems(full)


def test_highestmodseq_below_a_record(full):
    edit_mailbox(full, "INBOX", highestmodseq=1)
    assert "mailbox" in problems(full)


def test_record_flag_changed_behind_the_engines_back(full):
    edit_record(full, "INBOX", 1, flags=("\\Flagged",))
    assert problems(full) == ["crc", "digest"]


def test_record_modseq_changed_behind_the_engines_back(full):
    rec = full.records(U, "INBOX")[0]
    edit_record(full, "INBOX", 1, stamp=Stamp(rec.stamp.modseq + 1000))
    assert {"crc", "modseq", "changes"} <= set(problems(full))


def test_user_digest(full):
    edit_user(full, digest=bytes(16))
    assert problems(full) == ["digest"]


def test_version_vector(full):
    edit_user(full, versions={})
    assert problems(full) == ["versions"]


def test_user_modseq_below_objects(full):
    edit_user(full, modseq=1)
    assert problems(full) == ["modseq"]


def test_missing_change_entry(full):
    u, rec = user(full), full.records(U, "INBOX")[0]
    full.db.write(lambda txn: txn.delete("changes", change_key(u, rec.stamp.modseq, RECORD,
                                                               rec.key())))
    assert problems(full) == ["changes"]


def test_change_entry_at_the_wrong_modseq(full):
    u, rec = user(full), full.records(U, "INBOX")[0]

    def move(txn):
        txn.delete("changes", change_key(u, rec.stamp.modseq, RECORD, rec.key()))
        txn.put("changes", change_key(u, rec.stamp.modseq - 1, RECORD, rec.key()), b"")
    full.db.write(move)
    assert problems(full) == ["changes"]


def test_change_entry_for_a_missing_object(full):
    u = user(full)
    full.db.write(lambda txn: txn.put("changes", change_key(u, 1, RECORD, U64.pack(1) + U32.pack(77)),
                                      b""))
    assert problems(full) == ["changes"]


def test_missing_per_origin_entry(full):
    u, rec = user(full), full.records(U, "INBOX")[0]
    full.db.write(lambda txn: txn.delete("byorigin", origin_key(
        u, rec.stamp.origin, rec.stamp.origin_modseq, RECORD, rec.key())))
    assert problems(full) == ["changes"]


def test_name_index_pointing_nowhere(full):
    u = user(full)
    full.db.write(lambda txn: txn.put("index", IX_NAME + u.prefix + b"Ghost", U64.pack(999)))
    assert problems(full) == ["index"]


def test_live_mailbox_missing_from_the_name_index(full):
    u = user(full)
    full.db.write(lambda txn: txn.delete("index", IX_NAME + u.prefix + b"Other"))
    assert problems(full) == ["index"]


def test_record_of_no_mailbox(full):
    u = user(full)
    rec = Record(1, b"\0" * 32, b"\0" * 20, 1, 1, stamp=Stamp(1), mailbox=4242)
    full.db.write(lambda txn: (txn.put("objects", object_key(u, RECORD, rec.key()), rec.pack()),
                               txn.put("changes", change_key(u, 1, RECORD, rec.key()), b"")))
    assert "record" in problems(full)


def test_acl_entry_of_a_deleted_mailbox(full):
    u = user(full)
    other = full.mailbox(U, "Other")
    full.delete_mailbox(U, "Other")
    acl = AclEntry(other.num, "bob", "lr", Stamp(2))
    full.db.write(lambda txn: (txn.put("objects", object_key(u, ACL, acl.key()), acl.pack()),
                               txn.put("changes", change_key(u, 2, ACL, acl.key()), b""),
                               txn.put("byorigin", origin_key(u, 0, 2, ACL, acl.key()), b"")))
    assert "object" in problems(full)


def test_body_missing_from_the_blob_index(full):
    rec = full.records(U, "INBOX")[0]
    full.db.write(lambda txn: txn.delete("blobs", rec.address))
    report = verify_store(full)
    assert [(p.what, p.subject) for p in report.problems] == [("blob", rec.address.hex())]


def test_sha1_index_disagrees(full):
    rec = full.records(U, "INBOX")[0]
    full.db.write(lambda txn: txn.put("sha1", rec.sha1, b"\1" * 32))
    assert problems(full) == ["blob"]


def test_recorded_sha1_wrong(full):
    rec = full.records(U, "INBOX")[0]

    def damage(txn):
        v = unpackb(txn.get("blobs", rec.address))
        v[5] = b"\2" * 20
        txn.put("blobs", rec.address, _pack(v))
    full.db.write(damage)
    assert "blob" in problems(full)


def test_check_blobs_false_skips_reading_bodies(full):
    rec = full.records(U, "INBOX")[0]
    full.db.write(lambda txn: txn.put("sha1", rec.sha1, b"\1" * 32))
    assert verify_store(full, check_blobs=False).ok


@pytest.mark.parametrize("field", ["sha1", "size"])
def test_record_disagreeing_with_its_blob(full, field):
    """A record whose GUID or size is not its body's (a Cyrus peer would be told a wrong GUID)."""
    rec = full.records(U, "INBOX")[0]
    change = {"sha1": b"\3" * 20} if field == "sha1" else {"size": rec.size + 1}
    edit_record(full, "INBOX", rec.uid, **change)
    # Keep the incremental values consistent so that only the blob mismatch remains.
    mb = full.mailbox(U, "INBOX")
    fixed = oracle.mailbox_totals(mb.id, full.records(U, "INBOX", include_expunged=True))
    edit_mailbox(full, "INBOX", size=fixed.size, cyrus_crc=fixed.cyrus_crc)
    assert problems(full) in (["record"], ["blob"])
