"""Every legality rule of engine.apply: the illegal change set, the exact error, no change.

Each test builds a legitimate change set between two stores, breaks one rule
by tampering with it (an item's fields, stamp, order, or the bodies), and
checks that ``apply`` raises ``LegalityError`` with that rule's ``code`` and
that the receiver is byte-for-byte what it was (every LMDB table, hence the
status digest, the change index, the user's modseq and state, the blob index).
"""
from __future__ import annotations

import copy

import pytest

from engine import Message
from engine.apply import LegalityError, apply
from engine.blobs import address_of, sha1_of
from engine.changeset import ChangeSet, build, state_of
from engine.errors import ProtocolError
from engine.model import ACL, ANNOTATION, MAILBOX, RECORD, SIEVE, SUBSCRIPTION

from .harness import USER, dump, sync

ALL_RULES = {
    "modseq-lowered", "uidvalidity-lowered", "uidnext-lowered", "content-changed", "unexpunge",
    "uid-reused", "records-out-of-order", "body-hash-mismatch", "body-missing", "tombstoned",
    "name-conflict", "mailbox-id-in-use", "mass-delete", "crc-mismatch", "bad-uid",
}


def refused(store, cs, code, *, bodies=None, merge=False, **kw):
    """Apply cs (through its wire form) and check it is refused with ``code``, store untouched."""
    before = dump(store)
    digest = store.status(USER)["digest"] if USER in store.users() else None
    cs = ChangeSet.decode(cs.encode())
    with pytest.raises(LegalityError) as ei:
        apply(store, cs, bodies=bodies, merge=merge, **kw)
    assert ei.value.code == code, (ei.value.code, str(ei.value))
    assert str(ei.value)            # a message a person can act on
    assert dump(store) == before, "a refused change set changed the store"
    if digest is not None:
        assert store.status(USER)["digest"] == digest
    return ei.value


def items_of(cs, kind, ident=None):
    return [i for i in cs.items if i.kind == kind and (ident is None or i.ident == ident)]


@pytest.fixture
def pair(make_store):
    """A (sender) and B (receiver) in sync: Work holds three messages, one expunged."""
    a, b = make_store("a"), make_store("b")
    a.create_mailbox(USER, "INBOX")
    a.create_mailbox(USER, "Work")
    a.append_many(USER, "Work", [Message(b"w%d" % i, (), 1_700_000_000) for i in range(1, 5)])
    a.expunge(USER, "Work", [(2, 2)])
    a.set_annotation(USER, "Work", "/comment", b"c1")
    a.set_acl(USER, "Work", "bob", "lr")
    a.subscribe(USER, "Work")
    sync(a, b)
    assert a.status(USER)["digest"] == b.status(USER)["digest"]
    return a, b


def diff(a, b):
    return build(a, USER, state_of(b, USER))


# -- stamps and mailbox counters ---------------------------------------------------------
def test_modseq_lowered(pair):
    a, b = pair
    a.set_annotation(USER, "Work", "/comment", b"c2")
    cs = diff(a, b)
    (ann,) = items_of(cs, ANNOTATION)
    # B holds the annotation at the stamp of its first setting; claim an older one.
    ann.origin_modseq = 1
    refused(b, cs, "modseq-lowered")


def test_modseq_lowered_also_under_merge(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 1)], ["$x"])
    cs = diff(a, b)
    (rec,) = items_of(cs, RECORD)
    rec.origin_modseq = 1
    refused(b, cs, "modseq-lowered", merge=True)


def test_uidvalidity_lowered(pair):
    a, b = pair
    a.rename_mailbox(USER, "Work", "Job")
    cs = diff(a, b)
    (mb,) = items_of(cs, MAILBOX)
    mb.fields[1] -= 1
    refused(b, cs, "uidvalidity-lowered")


def test_uidnext_lowered(pair):
    a, b = pair
    a.rename_mailbox(USER, "Work", "Job")
    cs = diff(a, b)
    (mb,) = items_of(cs, MAILBOX)
    assert mb.fields[2] == 5
    mb.fields[2] = 3
    refused(b, cs, "uidnext-lowered")


# -- records ------------------------------------------------------------------------
def test_content_changed(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 1)], ["\\Seen"])
    cs = diff(a, b)
    (rec,) = items_of(cs, RECORD)
    other = address_of(b"w3")
    rec.fields[0], rec.fields[1] = other, sha1_of(b"w3")
    refused(b, cs, "content-changed", bodies={other: b"w3"})


def test_unexpunge(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(3, 3)], ["\\Seen"])
    cs = diff(a, b)
    (rec3,) = items_of(cs, RECORD)
    tomb = copy.deepcopy(items_of(build(a, USER, {}), RECORD, (rec3.ident[0], 2))[0])
    assert tomb.removed
    tomb.removed = False
    tomb.origin_modseq = rec3.origin_modseq
    cs.items.insert(cs.items.index(rec3), tomb)
    refused(b, cs, "unexpunge")


def test_uid_reused(pair):
    a, b = pair
    # B forgets the tombstone of UID 2 (expiry); UID 2 stays below uidnext.
    b.expire_tombstones(USER, b.user_info(USER).modseq + 1)
    a.set_flags(USER, "Work", [(3, 3)], ["\\Seen"])
    cs = diff(a, b)
    (rec3,) = items_of(cs, RECORD)
    reused = copy.deepcopy(rec3)
    reused.ident = (rec3.ident[0], 2)
    cs.items.insert(cs.items.index(rec3), reused)
    refused(b, cs, "uid-reused")


def test_records_out_of_order(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 4)], ["\\Seen"])
    cs = diff(a, b)
    recs = items_of(cs, RECORD)
    assert [r.ident[1] for r in recs] == [1, 3, 4]
    i, j = cs.items.index(recs[0]), cs.items.index(recs[1])
    cs.items[i], cs.items[j] = cs.items[j], cs.items[i]
    refused(b, cs, "records-out-of-order")


def test_records_out_of_order_duplicate_uid(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 1)], ["\\Seen"])
    cs = diff(a, b)
    (rec,) = items_of(cs, RECORD)
    cs.items.insert(cs.items.index(rec), copy.deepcopy(rec))
    refused(b, cs, "records-out-of-order")


def test_bad_uid(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 1)], ["\\Seen"])
    cs = diff(a, b)
    (rec,) = items_of(cs, RECORD)
    rec.ident = (rec.ident[0], 0)
    refused(b, cs, "bad-uid")


@pytest.mark.parametrize("uid", [-1, 2 ** 32, "7"])
def test_uid_that_is_no_uid_is_refused_when_decoded(pair, uid):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 1)], ["\\Seen"])
    cs = diff(a, b)
    (rec,) = items_of(cs, RECORD)
    rec.ident = (rec.ident[0], uid)
    with pytest.raises(ProtocolError, match="malformed record"):
        ChangeSet.decode(cs.encode())


# -- bodies -----------------------------------------------------------------------------
def test_body_hash_mismatch(pair):
    a, b = pair
    a.append(USER, "Work", b"new mail", internaldate=1_700_000_000)
    cs = diff(a, b)
    (addr,) = cs.bodies
    refused(b, cs, "body-hash-mismatch", bodies={addr: b"new mail, altered"})


def test_body_hash_mismatch_sha1(pair):
    a, b = pair
    a.append(USER, "Work", b"new mail", internaldate=1_700_000_000)
    cs = diff(a, b)
    (rec,) = items_of(cs, RECORD)
    rec.fields[1] = sha1_of(b"something else")
    refused(b, cs, "body-hash-mismatch", bodies={cs.bodies[0]: b"new mail"})


def test_body_missing(pair):
    a, b = pair
    a.append(USER, "Work", b"new mail", internaldate=1_700_000_000)
    cs = diff(a, b)
    refused(b, cs, "body-missing", bodies={})
    refused(b, cs, "body-missing", bodies=lambda addr: None)


def test_body_missing_sieve(pair):
    a, b = pair
    a.sieve_put(USER, "main", b"keep;")
    cs = diff(a, b)
    assert items_of(cs, SIEVE)
    refused(b, cs, "body-missing", bodies={})


# -- mailboxes ----------------------------------------------------------------------------
def test_tombstoned_record(pair):
    a, b = pair
    full = build(a, USER, {})
    a.delete_mailbox(USER, "Work")
    sync(a, b)
    a.subscribe(USER, "Other")
    cs = diff(a, b)
    (mbid,) = [i.ident[0] for i in items_of(full, MAILBOX) if i.fields[0] == "Work"]
    rec = copy.deepcopy(items_of(full, RECORD, (mbid, 1))[0])
    rec.origin_modseq = cs.max_modseq
    cs.items.append(rec)
    refused(b, cs, "tombstoned", bodies=a.read_body)


def test_tombstoned_unknown_mailbox(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 1)], ["\\Seen"])
    cs = diff(a, b)
    (rec,) = items_of(cs, RECORD)
    cs.items = [i for i in cs.items if i.kind != MAILBOX]
    rec.ident = ("nosuchmailbox00000000000", 1)
    refused(b, cs, "tombstoned")


@pytest.mark.parametrize("kind", [ACL, ANNOTATION])
def test_tombstoned_acl_and_annotation(pair, kind):
    a, b = pair
    full = build(a, USER, {})
    a.delete_mailbox(USER, "Work")
    sync(a, b)
    a.subscribe(USER, "Other")
    cs = diff(a, b)
    item = copy.deepcopy(items_of(full, kind)[0])
    item.origin_modseq = cs.max_modseq
    cs.items.append(item)
    cs.items.sort(key=lambda i: [MAILBOX, RECORD, ACL, ANNOTATION, SUBSCRIPTION].index(i.kind))
    refused(b, cs, "tombstoned")


def test_name_conflict(pair):
    a, b = pair
    a.create_mailbox(USER, "Other")
    cs = diff(a, b)
    (mb,) = items_of(cs, MAILBOX)
    mb.fields[0] = "Work"
    refused(b, cs, "name-conflict")


def test_mailbox_id_in_use(pair, make_store):
    a, _ = pair
    c = make_store("c")
    work = next(i for i in items_of(build(a, USER, {}), MAILBOX) if i.fields[0] == "Work")
    c.create_mailbox("other", "INBOX", unique_id=work.ident[0])
    refused(c, build(a, USER, {}), "mailbox-id-in-use", bodies=a.read_body)


# -- the mass-delete guard ----------------------------------------------------------------
def test_mass_delete_expunge(pair):
    a, b = pair
    a.append_many(USER, "INBOX", [Message(b"i%d" % i, (), 1) for i in range(3)])
    sync(a, b)
    a.expunge(USER, "Work", [(1, 0xFFFFFFFF)])
    a.expunge(USER, "INBOX", [(1, 2)])
    cs = diff(a, b)
    e = refused(b, cs, "mass-delete")
    assert "5 of" in str(e) and "--allow-mass-delete" in str(e)
    assert apply(b, cs, allow_mass_delete=True).status == "applied"
    assert b.status(USER)["digest"] == a.status(USER)["digest"]


def test_mass_delete_mailbox(pair):
    a, b = pair
    a.delete_mailbox(USER, "Work")
    cs = diff(a, b)
    refused(b, cs, "mass-delete")
    assert apply(b, cs, allow_mass_delete=True).status == "applied"


def test_mass_delete_share_is_a_bound_not_a_ban(pair):
    a, b = pair
    a.append_many(USER, "INBOX", [Message(b"i%d" % i, (), 1) for i in range(3)])
    sync(a, b)
    a.expunge(USER, "Work", [(1, 1)])    # 1 of 6
    assert apply(b, diff(a, b)).status == "applied"


# -- the claims -----------------------------------------------------------------------------
def test_crc_mismatch(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 1)], ["\\Seen"])
    cs = diff(a, b)
    (mbid,) = cs.crcs
    cs.crcs[mbid] ^= 1
    refused(b, cs, "crc-mismatch")


def test_crc_mismatch_from_tampered_flags(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 1)], ["\\Seen"])
    cs = diff(a, b)
    (rec,) = items_of(cs, RECORD)
    rec.fields[5] = ["\\Flagged"]
    refused(b, cs, "crc-mismatch")


def test_every_rule_is_tested():
    """A new rule in engine/apply.py needs a test here."""
    import re
    from pathlib import Path

    import engine.apply
    src = Path(engine.apply.__file__).read_text()
    codes = set(re.findall(r'LegalityError\(\s*"([a-z0-9-]+)"', src))
    # Not reachable from a decoded change set: "bad-kind" (decode refuses unknown kinds
    # first) and "changed" (apply rejects a concurrent change set before any item check).
    assert codes - {"bad-kind", "changed"} == ALL_RULES, codes ^ ALL_RULES


# -- rejection keeps the receiver's own changes ---------------------------------------------
def test_rejection_keeps_and_returns_receiver_changes(pair):
    a, b = pair
    a.set_flags(USER, "Work", [(1, 1)], ["$fromA"])
    b.set_flags(USER, "Work", [(3, 3)], ["$fromB"])
    b.append(USER, "Work", b"b's new mail", internaldate=1)
    b.sieve_put(USER, "main", b"keep;")
    before = dump(b)
    cs = diff(a, b)
    res = apply(b, ChangeSet.decode(cs.encode()), bodies=a.read_body)
    assert res.status == "rejected" and res.code == "changed"
    assert dump(b) == before
    got = {(i.kind, i.ident) for i in res.counter.items}
    want = {(i.kind, i.ident) for i in build(b, USER, cs.state).items}
    assert got == want
    kinds = {i.kind for i in res.counter.items}
    assert {RECORD, SIEVE} <= kinds
    assert address_of(b"b's new mail") in res.counter.bodies
    # The sender merges them and both end up with both sides' changes.
    apply(a, res.counter, bodies=b.read_body, merge=True)
    assert apply(b, diff(a, b), bodies=a.read_body).status == "applied"
    assert a.status(USER)["digest"] == b.status(USER)["digest"]
    flags = {r.uid: r.flags for r in b.records(USER, "Work")}
    assert "$fromA" in flags[1] and "$fromB" in flags[3]


def test_base_unknown_is_rejected_with_receiver_state(pair, make_store):
    _, b = pair
    c = make_store("c")
    c.create_mailbox(USER, "Elsewhere")
    before = dump(b)
    cs = build(c, USER, state_of(c, USER))      # built for a state b never had
    res = apply(b, cs)
    assert res.status == "rejected" and res.code == "base-unknown"
    assert res.token.startswith("ms1.")
    assert dump(b) == before
