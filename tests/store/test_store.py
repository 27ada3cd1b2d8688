"""engine/store.py: opening, names, mailbox semantics, UIDs, change sets and their cost."""
from __future__ import annotations

import os
import threading
import time

import pytest

from engine import Message, Store, names
from engine.db import TABLES
from engine.errors import (
    FullSyncNeeded,
    InvalidName,
    MailboxExists,
    ModsyncError,
    NoSuchMailbox,
    NoSuchObject,
    NoSuchUser,
    NotAStore,
    SchemaVersionError,
    UsageError,
)
from engine.model import U32
from engine.verify import verify_store

from . import oracle

U = "alice"


def dump_all(store: Store) -> dict:
    """Every key and value of every LMDB table."""
    with store.db.read() as txn:
        return {t: list(txn.range(t)) for t in TABLES}


def status_and_changes(store: Store, user: str = U):
    return store.status(user), [(c.kind, c.object.pack()) for c in store.changes_since(user, 0)]


# --- opening and initialising ------------------------------------------------------------------

def test_open_refuses_a_missing_path(scratch):
    with pytest.raises(NotAStore):
        Store.open(scratch / "nothing-here")


def test_open_refuses_an_empty_directory(scratch):
    """An empty directory is what an unmounted volume looks like."""
    (scratch / "mnt").mkdir()
    with pytest.raises(NotAStore):
        Store.open(scratch / "mnt")
    assert list((scratch / "mnt").iterdir()) == []    # and nothing was created in it


def test_open_refuses_a_file(scratch):
    (scratch / "f").write_text("x")
    with pytest.raises(NotAStore):
        Store.open(scratch / "f")


@pytest.mark.parametrize("content", [
    b"", b"hello world\n", b"modsync-store 1\n", b"modsync-store 1\nid\n",
    b"other-format 1\nid 00\n", b"\xff\xfe\x00garbage", b"modsync-store 1 name abc\n",
])
def test_open_refuses_a_bogus_format_file(store_path, content):
    Store.init(store_path).close()
    (store_path / "FORMAT").write_bytes(content)
    with pytest.raises(NotAStore):
        Store.open(store_path)


def test_open_refuses_a_future_schema_version(store_path):
    s = Store.init(store_path)
    sid = s.id
    s.close()
    (store_path / "FORMAT").write_text(f"modsync-store 2\nid {sid}\n")
    with pytest.raises(SchemaVersionError):
        Store.open(store_path)
    (store_path / "FORMAT").write_text(f"modsync-store 1\nid {sid}\n")
    Store.open(store_path).close()


def test_open_refuses_a_format_file_of_another_store(scratch):
    a, b = Store.init(scratch / "a"), Store.init(scratch / "b")
    a.close()
    b.close()
    (scratch / "a" / "FORMAT").write_bytes((scratch / "b" / "FORMAT").read_bytes())
    with pytest.raises(NotAStore):
        Store.open(scratch / "a")


def test_open_refuses_a_store_without_its_database(store_path):
    Store.init(store_path).close()
    for f in (store_path / "db").iterdir():
        f.unlink()
    with pytest.raises(NotAStore):
        Store.open(store_path)


def test_open_refuses_a_database_of_a_future_schema(store_path):
    s = Store.init(store_path)
    s.db.write(lambda txn: txn.put("meta", b"schema", U32.pack(2)))
    s.close()
    with pytest.raises(SchemaVersionError):
        Store.open(store_path)


def test_init_refuses_a_non_empty_directory(scratch):
    (scratch / "d").mkdir()
    (scratch / "d" / "somefile").write_text("x")
    with pytest.raises(UsageError):
        Store.init(scratch / "d")
    assert [p.name for p in (scratch / "d").iterdir()] == ["somefile"]


def test_init_refuses_an_existing_store(store_path):
    Store.init(store_path).close()
    with pytest.raises(UsageError):
        Store.init(store_path)
    Store.open(store_path).close()


def test_init_accepts_an_empty_or_missing_directory(scratch):
    (scratch / "empty").mkdir()
    Store.init(scratch / "empty").close()
    Store.init(scratch / "missing" / "deeper").close()
    Store.open(scratch / "empty").close()
    Store.open(scratch / "missing" / "deeper").close()


# --- names --------------------------------------------------------------------------------------

HOSTILE = ["a.b", "^x", "with space", " leading space", "trailing space ", "Ünïcödé",
           "日本語/子供", "a.b/c^d/e f", "&AMk-", "%", "*", "~user", "\"quoted\"", "x" * 200,
           "INBOX/Sub", "Inboxes"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_accepted(store, name):
    mb = store.create_mailbox(U, name)
    assert mb.name == name
    store.append(U, name, b"body")
    store.subscribe(U, name)
    assert store.mailbox(U, name).messages == 1
    assert name in store.subscriptions(U)
    store.rename_mailbox(U, name, name + "-renamed")
    assert store.mailbox(U, name + "-renamed").messages == 1
    assert verify_store(store).ok


@pytest.mark.parametrize("spelling", ["inbox", "Inbox", "iNbOx", "INBOX"])
def test_inbox_is_case_insensitive(store, spelling):
    store.create_mailbox(U, spelling)
    assert [m.name for m in store.mailboxes(U)] == ["INBOX"]
    store.create_mailbox(U, spelling + "/Sub")
    assert store.mailbox(U, "INBOX/Sub").name == "INBOX/Sub"
    with pytest.raises(MailboxExists):
        store.create_mailbox(U, "INBOX")
    assert names.mailbox("inboxes") == "inboxes"      # only the whole first component


def test_names_are_unicode_normalised(store):
    store.create_mailbox(U, "caf\u00e9")                 # precomposed
    with pytest.raises(MailboxExists):
        store.create_mailbox(U, "cafe\u0301")            # decomposed: the same name
    assert store.mailbox(U, "cafe\u0301").name == "caf\u00e9"


@pytest.mark.parametrize("name", [
    "", "a//b", "/a", "a/", "/", "//", "a\x00b", "a\tb", "a\nb", "a\x7fb", "a\x1b",
    "x" * (names.MAX_NAME_BYTES + 1), "é" * (names.MAX_NAME_BYTES // 2 + 1), "a\ud800b", None, 5,
])
def test_bad_names_are_refused(store, name):
    store.create_mailbox(U, "INBOX")
    before = status_and_changes(store)
    for op in (lambda: store.create_mailbox(U, name),
               lambda: store.subscribe(U, name),
               lambda: store.rename_mailbox(U, "INBOX", name),
               lambda: store.append(U, name, b"x")):
        with pytest.raises(InvalidName):
            op()
    assert status_and_changes(store) == before


@pytest.mark.parametrize("user", ["", "a b", "a/b", "a\x00", "x" * 256])
def test_bad_user_names_are_refused(store, user):
    with pytest.raises(InvalidName):
        store.create_mailbox(user, "INBOX")
    assert store.users() == []


@pytest.mark.parametrize("nbytes", [names.MAX_NAME_BYTES // 2, names.MAX_NAME_BYTES])
def test_names_up_to_the_limit_work(store, nbytes):
    name = "x" * nbytes
    assert names.mailbox(name) == name
    store.create_mailbox(U, name)
    store.subscribe(U, name)
    store.append(U, name, b"x")
    assert store.mailbox(U, name).messages == 1


@pytest.mark.parametrize("op", ["annotation", "acl", "sieve", "seen", "quota"])
def test_long_keys_are_refused_with_a_typed_error(store, op):
    store.create_mailbox(U, "INBOX")
    long = "k" * 600
    calls = {
        "annotation": lambda: store.set_annotation(U, "INBOX", "/" + long, b"v"),
        "acl": lambda: store.set_acl(U, "INBOX", long, "lr"),
        "sieve": lambda: store.sieve_put(U, long, b"keep;"),
        "seen": lambda: store.set_seen(U, long, "1"),
        "quota": lambda: store.set_quota(U, long, {"STORAGE": 1}),
    }
    try:
        calls[op]()
    except ModsyncError:
        pass


# --- mailboxes ------------------------------------------------------------------------------

def test_create_refuses_a_used_unique_id(store):
    store.create_mailbox(U, "A", unique_id="uid-a")
    with pytest.raises(MailboxExists):
        store.create_mailbox(U, "B", unique_id="uid-a")
    store.delete_mailbox(U, "A")
    with pytest.raises(MailboxExists):       # the tombstone still holds it
        store.create_mailbox(U, "B", unique_id="uid-a")


def test_rename_moves_children_and_keeps_identity(store):
    for n in ("A", "A/B", "A/B/C", "AB"):
        store.create_mailbox(U, n)
    store.append(U, "A/B", b"msg")
    before = {m.name: (m.id, m.uidvalidity, m.uidnext) for m in store.mailboxes(U)}
    store.rename_mailbox(U, "A", "Z")
    after = {m.name: (m.id, m.uidvalidity, m.uidnext) for m in store.mailboxes(U)}
    assert after == {"Z": before["A"], "Z/B": before["A/B"], "Z/B/C": before["A/B/C"],
                     "AB": before["AB"]}
    assert store.mailbox(U, "Z/B").messages == 1
    assert verify_store(store).ok


def test_rename_of_an_implied_parent(store):
    store.create_mailbox(U, "P/child")
    store.rename_mailbox(U, "P", "Q")
    assert [m.name for m in store.mailboxes(U)] == ["Q/child"]


def test_rename_refusals_change_nothing(store):
    for n in ("A", "A/B", "C"):
        store.create_mailbox(U, n)
    before = status_and_changes(store)
    with pytest.raises(MailboxExists):
        store.rename_mailbox(U, "A", "C")
    with pytest.raises(UsageError):
        store.rename_mailbox(U, "A", "A/B/new")
    with pytest.raises(NoSuchMailbox):
        store.rename_mailbox(U, "Nope", "D")
    assert status_and_changes(store) == before


def test_rename_refuses_child_name_collision(store):
    for n in ("A", "A/X", "B/X"):
        store.create_mailbox(U, n)
    before = status_and_changes(store)
    with pytest.raises(MailboxExists):
        store.rename_mailbox(U, "A", "B")
    assert status_and_changes(store) == before
    assert verify_store(store).ok


def test_rename_child_onto_sibling_being_moved(store):
    for n in ("A/B", "A/B/B/Z", "A/B/Z"):
        store.create_mailbox(U, n)
    ids = {m.name: m.id for m in store.mailboxes(U)}
    store.rename_mailbox(U, "A/B", "A")
    assert store.mailbox(U, "A").id == ids["A/B"]
    assert store.mailbox(U, "A/B/Z").id == ids["A/B/B/Z"]
    assert store.mailbox(U, "A/Z").id == ids["A/B/Z"]
    assert verify_store(store).ok


def test_rename_inbox_moves_its_messages(store):
    store.create_mailbox(U, "INBOX")
    store.create_mailbox(U, "INBOX/Child")
    recs = store.append_many(U, "INBOX", [Message(b"m%d" % i, ("\\Seen",), 100 + i)
                                          for i in range(3)])
    inbox = store.mailbox(U, "INBOX")
    store.rename_mailbox(U, "inbox", "Old")
    old = store.records(U, "Old")
    assert [(r.address, r.flags, r.internaldate) for r in old] == \
           [(r.address, r.flags, r.internaldate) for r in recs]
    now = store.mailbox(U, "INBOX")
    assert (now.id, now.uidvalidity, now.messages) == (inbox.id, inbox.uidvalidity, 0)
    assert now.uidnext == inbox.uidnext            # the UIDs stay used
    assert store.mailbox(U, "INBOX/Child")         # children stay
    assert store.append(U, "INBOX", b"new").uid == inbox.uidnext
    assert verify_store(store).ok


def test_rename_inbox_to_a_child_of_inbox(store):
    store.create_mailbox(U, "INBOX")
    store.append(U, "INBOX", b"x")
    store.rename_mailbox(U, "INBOX", "INBOX/Old")
    assert store.mailbox(U, "INBOX/Old").messages == 1
    assert store.mailbox(U, "INBOX").messages == 0


def test_delete_leaves_a_tombstone_and_keeps_children(store):
    store.create_mailbox(U, "A")
    store.create_mailbox(U, "A/B")
    store.append(U, "A", b"x")
    store.set_acl(U, "A", "bob", "lr")
    store.set_annotation(U, "A", "/comment", b"c")
    live = store.mailbox(U, "A")
    store.delete_mailbox(U, "A")
    assert [m.name for m in store.mailboxes(U)] == ["A/B"]
    (tomb,) = [m for m in store.mailboxes(U, include_removed=True) if m.stamp.removed]
    assert (tomb.id, tomb.name, tomb.uidvalidity, tomb.uidnext) == \
           (live.id, live.name, live.uidvalidity, live.uidnext)
    assert tomb.stamp.modseq == store.user_info(U).modseq
    assert store.find_mailbox_id(live.id)[1].stamp.removed
    with pytest.raises(NoSuchMailbox):
        store.records(U, "A")
    assert verify_store(store).ok


def test_recreated_name_gets_a_greater_uidvalidity(store, monkeypatch):
    first = store.create_mailbox(U, "A", uidvalidity=4_000_000_000)
    store.delete_mailbox(U, "A")
    second = store.create_mailbox(U, "A")            # the clock is far below 4e9
    assert second.uidvalidity > first.uidvalidity
    assert store.create_mailbox(U, "B", uidvalidity=5).uidvalidity == 5   # B is new
    store.delete_mailbox(U, "A")
    with pytest.raises(UsageError):
        store.create_mailbox(U, "A", uidvalidity=second.uidvalidity)
    # The clock going backwards does not matter either.
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    third = store.create_mailbox(U, "A")
    assert third.uidvalidity > second.uidvalidity
    # Nor does the tombstone expiring, nor a rename leaving the name.
    store.rename_mailbox(U, "A", "A2")
    store.expire_tombstones(U, store.user_info(U).modseq + 1)
    fourth = store.create_mailbox(U, "A")
    assert fourth.uidvalidity > third.uidvalidity


@pytest.mark.parametrize("case", ["explicit", "exhausted"])
def test_uidvalidity_out_of_range_is_a_typed_error(store, case):
    if case == "explicit":
        with pytest.raises(UsageError):
            store.create_mailbox(U, "B", uidvalidity=1 << 32)
    else:
        store.create_mailbox(U, "A", uidvalidity=0xFFFFFFFF)
        store.delete_mailbox(U, "A")
        with pytest.raises(UsageError):
            store.create_mailbox(U, "A")


def test_uids_are_never_reused(store_path):
    store = Store.init(store_path)
    store.create_mailbox(U, "INBOX")
    store.append_many(U, "INBOX", [Message(b"m%d" % i) for i in range(5)])
    store.expunge(U, "INBOX", [(4, 5)])
    assert store.append(U, "INBOX", b"a").uid == 6
    store.expunge(U, "INBOX", [(1, 6)])
    store.expire_tombstones(U, store.user_info(U).modseq + 1)
    assert store.records(U, "INBOX", include_expunged=True) == []
    assert store.append(U, "INBOX", b"b").uid == 7
    store.close()
    store = Store.open(store_path)
    assert store.append(U, "INBOX", b"c").uid == 8
    store.create_mailbox(U, "Other")
    assert store.copy(U, "INBOX", [(7, 8)], "Other", move=True) == {7: 1, 8: 2}
    assert store.append(U, "INBOX", b"d").uid == 9
    store.close()


@pytest.mark.parametrize("op", ["set_flags", "expunge", "copy", "move"])
def test_overlapping_uid_ranges(store, op):
    """Overlapping ranges select each message once (they once visited records twice)."""
    store.create_mailbox(U, "INBOX")
    store.create_mailbox(U, "Dest")
    store.append_many(U, "INBOX", [Message(b"m%d" % i) for i in range(4)])
    ranges = [(1, 2), (2, 3), (2, 2)]
    if op == "set_flags":
        assert store.set_flags(U, "INBOX", ranges, ["\\Seen"]) == 3
    elif op == "expunge":
        assert store.expunge(U, "INBOX", ranges) == 3
        assert store.mailbox(U, "INBOX").messages == 1
    else:
        assert store.copy(U, "INBOX", ranges, "Dest", move=op == "move") == {1: 1, 2: 2, 3: 3}
        assert store.mailbox(U, "Dest").messages == 3
    assert verify_store(store).ok
    oracle.check_mailbox_totals(store, U)


@pytest.mark.parametrize("case", ["address of another stored body", "made-up address"])
def test_append_with_a_wrong_address(store, case):
    """A caller-supplied content address is checked: never a record pointing at another body."""
    store.create_mailbox(U, "INBOX")
    other = store.append(U, "INBOX", b"body B")
    wrong = other.address if case.startswith("address of") else b"\x07" * 32
    try:
        rec, = store.append_many(U, "INBOX", [Message(b"body A", address=wrong)])
    except UsageError:
        return
    assert store.read_body(rec.address) == b"body A"
    assert verify_store(store).ok


def test_concurrent_writers_and_readers(scratch):
    """The store is thread-safe: writers serialise, readers see committed bodies and states."""
    store = Store.init(scratch / "s")
    written: dict[bytes, bytes] = {}
    errors: list = []

    def writer(user):
        try:
            store.create_mailbox(user, "INBOX")
            for i in range(60):
                b = os.urandom(i * 37 % 2000)
                r = store.append(user, "INBOX", b)
                written[r.address] = b
                if i % 7 == 0:
                    store.set_flags(user, "INBOX", [(1, r.uid)], ["\\Seen"])
                if i % 11 == 0:
                    store.expunge(user, "INBOX", [(r.uid, r.uid)])
        except Exception as e:  # noqa: BLE001 - any failure in a thread is the test's failure
            errors.append(e)

    def reader():
        try:
            for _ in range(100):
                for address, b in list(written.items())[-10:]:
                    assert store.read_body(address) == b
                for user in store.users():
                    changes = store.changes_since(user, 0)
                    u = store.user_info(user)          # read after: never older
                    assert all(c.modseq <= u.modseq for c in changes)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(f"user{i}",)) for i in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(store.user_info(f"user{i}").modseq == 60 + 1 + 9 + 6 for i in range(3))
    assert verify_store(store).ok
    store.close()


# --- per-user objects ------------------------------------------------------------------------

def test_per_user_objects_round_trip(store):
    store.create_mailbox(U, "INBOX")
    store.subscribe(U, "INBOX")
    store.subscribe(U, "Not/There")           # subscriptions need no mailbox
    store.set_seen(U, "box-of-bob", "1:5,9", lastuid=9)
    store.sieve_put(U, "main", b"keep;")
    store.sieve_put(U, "other", b"discard;")
    store.sieve_activate(U, "other")
    store.set_acl(U, "INBOX", "bob", "rl")
    store.set_annotation(U, "INBOX", "/comment", b"hello")
    store.set_annotation(U, "INBOX", "/comment", b"mine", userid=U)
    store.set_quota(U, "", {"STORAGE": 100, "MESSAGE": 10})
    assert sorted(store.subscriptions(U)) == ["INBOX", "Not/There"]
    assert [(s.mailbox_id, s.uids, s.lastuid) for s in store.seen_sets(U)] == \
        [("box-of-bob", "1:5,9", 9)]
    assert {s.name: s.active for s in store.sieve_scripts(U)} == {"main": False, "other": True}
    assert store.sieve_script(U, "main") == b"keep;"
    assert store.acl(U, "INBOX") == {"bob": "lr"}       # rights in RFC 4314 order
    assert sorted((a.userid, a.value) for a in store.annotations(U, "INBOX")) == \
        [("", b"hello"), (U, b"mine")]
    assert store.quota(U) == [{"root": "", "limits": {"STORAGE": 100, "MESSAGE": 10},
                               "usage": {"STORAGE": 0, "MESSAGE": 0}}]
    store.sieve_delete(U, "other")
    assert [s.name for s in store.sieve_scripts(U)] == ["main"]
    assert verify_store(store).ok


def test_removing_leaves_tombstones_with_the_modseq_of_removal(store):
    store.create_mailbox(U, "INBOX")
    store.subscribe(U, "INBOX")
    store.sieve_put(U, "s", b"keep;")
    store.set_acl(U, "INBOX", "bob", "lr")
    store.set_annotation(U, "INBOX", "/comment", b"x")
    store.set_quota(U, "", {"STORAGE": 1})
    store.set_seen(U, "box", "1")
    rec = store.append(U, "INBOX", b"m")
    removals = [
        ("subscription", lambda: store.unsubscribe(U, "INBOX")),
        ("sieve", lambda: store.sieve_delete(U, "s")),
        ("acl", lambda: store.set_acl(U, "INBOX", "bob", None)),
        ("annotation", lambda: store.set_annotation(U, "INBOX", "/comment", None)),
        ("quota", lambda: store.set_quota(U, "", None)),
        ("seen", lambda: store.delete_seen(U, "box")),
        ("record", lambda: store.expunge(U, "INBOX", [(rec.uid, rec.uid)])),
    ]
    for kind, remove in removals:
        m0 = store.user_info(U).modseq
        remove()
        m1 = store.user_info(U).modseq
        assert m1 > m0
        (tomb,) = [c.object for c in store.changes_since(U, m0) if c.kind == kind]
        assert tomb.stamp.removed and tomb.stamp.modseq == m1
    tomb = next(c.object for c in store.changes_since(U, 0) if c.kind == "record")
    assert (tomb.uid, tomb.address) == (rec.uid, rec.address)
    assert verify_store(store).ok


REMOVALS_OF_NOTHING = {
    "unsubscribe": lambda s: s.unsubscribe(U, "Never"),
    "sieve_delete": lambda s: s.sieve_delete(U, "never"),
    "acl": lambda s: s.set_acl(U, "INBOX", "never", None),
    "mailbox annotation": lambda s: s.set_annotation(U, "INBOX", "/never", None),
    "private mailbox annotation": lambda s: s.set_annotation(U, "INBOX", "/comment", None,
                                                             userid="bob"),
    "quota root": lambda s: s.set_quota(U, "never", None),
    "seen set": lambda s: s.delete_seen(U, "never"),
}


@pytest.mark.parametrize("what", sorted(REMOVALS_OF_NOTHING))
def test_removing_what_does_not_exist_is_refused_and_changes_nothing(store, what):
    store.create_mailbox(U, "INBOX")
    store.set_annotation(U, "INBOX", "/comment", b"shared")
    before = dump_all(store)
    with pytest.raises(NoSuchObject):
        REMOVALS_OF_NOTHING[what](store)
    assert dump_all(store) == before


def test_removed_objects_can_come_back(store):
    store.create_mailbox(U, "INBOX")
    for cycle in range(2):
        store.subscribe(U, "INBOX")
        store.set_acl(U, "INBOX", "bob", "lr")
        store.set_annotation(U, "INBOX", "/comment", b"c")
        store.set_quota(U, "", {"STORAGE": 1})
        store.set_seen(U, "box", "1")
        store.sieve_put(U, "s", b"keep;")
        store.unsubscribe(U, "INBOX")
        store.set_acl(U, "INBOX", "bob", None)
        store.set_annotation(U, "INBOX", "/comment", None)
        store.set_quota(U, "", None)
        store.delete_seen(U, "box")
        store.sieve_delete(U, "s")
        assert (store.subscriptions(U), store.acl(U, "INBOX"), store.annotations(U, "INBOX"),
                store.quota(U), store.seen_sets(U), store.sieve_scripts(U)) == \
            ([], {}, [], [], [], [])
    assert verify_store(store).ok


NO_OP_WRITES = {
    "subscribe twice": lambda s: s.subscribe(U, "INBOX"),
    "same ACL rights": lambda s: s.set_acl(U, "INBOX", "bob", "rl"),
    "same mailbox annotation": lambda s: s.set_annotation(U, "INBOX", "/comment", b"v"),
    "same quota": lambda s: s.set_quota(U, "", {"STORAGE": 1}),
    "same seen set": lambda s: s.set_seen(U, "box-of-bob", "1:3"),
    "same message annotation": lambda s: s.set_message_annotation(U, "INBOX", 1, "/c", "", b"v"),
    "remove missing message annotation":
        lambda s: s.set_message_annotation(U, "INBOX", 1, "/nope", "", None),
}


@pytest.mark.parametrize("what", sorted(NO_OP_WRITES))
def test_writes_that_change_nothing_use_no_modseq(store, what):
    """Store.mutate's promise: nothing changed, no modseq (and nothing to replicate)."""
    store.create_mailbox(U, "INBOX")
    store.append(U, "INBOX", b"x")
    store.subscribe(U, "INBOX")
    store.set_acl(U, "INBOX", "bob", "lr")
    store.set_annotation(U, "INBOX", "/comment", b"v")
    store.set_quota(U, "", {"STORAGE": 1})
    store.set_seen(U, "box-of-bob", "1:3")
    store.set_message_annotation(U, "INBOX", 1, "/c", "", b"v")
    m0 = store.user_info(U).modseq
    try:
        NO_OP_WRITES[what](store)
    except NoSuchObject:
        pass
    assert store.user_info(U).modseq == m0
    assert store.changes_since(U, m0) == []


def test_seen_sets_are_canonical(make_store):
    """'1:3' and '1,2,3' are one seen set: stored alike, same digest; garbage refused."""
    a, b = make_store(), make_store()
    a.set_seen(U, "box", "1:3,5")
    b.set_seen(U, "box", "5,3,1,2")
    assert a.user_info(U).digest == b.user_info(U).digest
    with pytest.raises(UsageError):
        a.set_seen(U, "box", "garbage")


@pytest.mark.parametrize("entry", ["/a\0b", "/a\tb", "/a\x7f", "comment", ""])
def test_bad_annotation_entries_are_refused(store, entry):
    """The key separates entry and userid with NUL: an entry holding one would decode wrongly."""
    store.create_mailbox(U, "INBOX")
    rec = store.append(U, "INBOX", b"x")
    before = dump_all(store)
    with pytest.raises(UsageError):
        store.set_annotation(U, "INBOX", entry, b"v")
    with pytest.raises(UsageError):
        store.set_message_annotation(U, "INBOX", rec.uid, entry, "", b"v")
    assert dump_all(store) == before


def test_specialuse_does_not_depend_on_annotation_order(make_store):
    """Only the owner's /specialuse value is the mailbox's SPECIAL-USE, whatever the order."""
    a, b = make_store(), make_store()
    for s in (a, b):
        s.create_mailbox(U, "INBOX", unique_id="inbox-id", uidvalidity=7)
    a.set_annotation(U, "INBOX", "/specialuse", b"\\Junk", userid="bob")
    a.set_annotation(U, "INBOX", "/specialuse", b"\\Sent", userid=U)
    b.set_annotation(U, "INBOX", "/specialuse", b"\\Sent", userid=U)
    b.set_annotation(U, "INBOX", "/specialuse", b"\\Junk", userid="bob")
    assert oracle.visible_state(a, U) == oracle.visible_state(b, U)
    assert a.mailbox(U, "INBOX").specialuse == b.mailbox(U, "INBOX").specialuse == ("\\Sent",)
    assert a.user_info(U).digest == b.user_info(U).digest
    b.set_annotation(U, "INBOX", "/specialuse", None, userid="bob")
    assert b.mailbox(U, "INBOX").specialuse == ("\\Sent",)


def test_specialuse_annotation_that_is_not_utf8(store):
    """Either refused (UsageError) or stored; never an untyped error or a damaged store."""
    store.create_mailbox(U, "INBOX")
    try:
        store.set_annotation(U, "INBOX", "/specialuse", b"\xff\xfe \\Sent")
    except UsageError:
        pass
    assert verify_store(store).ok


# --- changes_since -------------------------------------------------------------------------

def test_changes_since_lists_exactly_what_changed(store):
    store.create_mailbox(U, "INBOX")
    store.create_mailbox(U, "Other")
    store.append_many(U, "INBOX", [Message(b"m%d" % i) for i in range(5)])
    store.subscribe(U, "Other")
    n = store.user_info(U).modseq
    then = oracle.snapshot(store, U)
    store.set_flags(U, "INBOX", [(2, 2)], ["\\Seen"])
    store.expunge(U, "INBOX", [(4, 4)])
    store.unsubscribe(U, "Other")
    store.delete_mailbox(U, "Other")
    got = {(c.kind, c.object.key()) for c in store.changes_since(U, n)}
    inbox = store.mailbox(U, "INBOX")
    other = next(m for m in store.mailboxes(U, include_removed=True) if m.stamp.removed)
    assert got == {("record", inbox.key() + (2).to_bytes(4, "big")),
                   ("record", inbox.key() + (4).to_bytes(4, "big")),
                   ("subscription", b"Other"), ("mailbox", inbox.key()), ("mailbox", other.key())}
    oracle.check_changes_since(store, U, n, then, oracle.snapshot(store, U))
    listed = store.changes(U, n)
    assert [(c.kind, c.object.key()) for c in listed.changes] == \
        [(c.kind, c.object.key()) for c in store.changes_since(U, n)]
    assert (listed.modseq, listed.horizon) == (store.user_info(U).modseq, 0)
    assert store.changes_since(U, store.user_info(U).modseq) == []
    assert store.changes_since(U, 10**12) == []


def test_changes_since_for_an_unknown_user(store):
    with pytest.raises(NoSuchUser):
        store.changes_since("nobody", 0)


def test_full_sync_needed_below_the_horizon(store):
    store.create_mailbox(U, "INBOX")
    for i in range(6):
        store.subscribe(U, f"s{i}")
        store.unsubscribe(U, f"s{i}")
    top = store.user_info(U).modseq
    dropped = store.expire_tombstones(U, 8)
    assert dropped == 3                         # unsubscribed at modseqs 3, 5 and 7
    assert store.user_info(U).horizon == 8
    for since in range(1, 8):
        with pytest.raises(FullSyncNeeded) as e:
            store.changes_since(U, since)
        assert (e.value.since, e.value.horizon) == (since, 8)
    assert store.changes_since(U, 0)            # the full state is always there
    for since in range(8, top + 2):
        store.changes_since(U, since)
    # The horizon never goes down.
    store.expire_tombstones(U, 3)
    assert store.user_info(U).horizon == 8


def test_expiry_above_the_modseq_keeps_an_up_to_date_replica_incremental(store):
    """The horizon never passes the modseq: an up-to-date replica stays incremental."""
    store.create_mailbox(U, "INBOX")
    store.subscribe(U, "x")
    store.unsubscribe(U, "x")
    store.expire_tombstones(U, store.user_info(U).modseq + 1000)
    u = store.user_info(U)
    assert u.horizon <= u.modseq
    assert store.changes_since(U, u.modseq) == []
    store.subscribe(U, "y")
    assert [c.kind for c in store.changes_since(U, u.modseq)] == ["subscription"]


# --- cost of changes_since: O(changes), counted, not timed ---------------------------------

class _Counter:
    def __init__(self):
        self.n = 0


class _CountingCursor:
    def __init__(self, cur, counter):
        self._cur, self._c = cur, counter

    def __enter__(self):
        self._cur.__enter__()
        return self

    def __exit__(self, *a):
        return self._cur.__exit__(*a)

    def iternext(self, *a, **kw):
        for item in self._cur.iternext(*a, **kw):
            self._c.n += 1
            yield item

    def iterprev(self, *a, **kw):
        for item in self._cur.iterprev(*a, **kw):
            self._c.n += 1
            yield item

    def __getattr__(self, name):
        attr = getattr(self._cur, name)
        if callable(attr):
            def counted(*a, **kw):
                self._c.n += 1
                return attr(*a, **kw)
            return counted
        return attr


class _CountingTxn:
    def __init__(self, txn, counter):
        self._txn, self._c = txn, counter

    def __enter__(self):
        self._txn.__enter__()
        return self

    def __exit__(self, *a):
        return self._txn.__exit__(*a)

    def cursor(self, *a, **kw):
        return _CountingCursor(self._txn.cursor(*a, **kw), self._c)

    def __getattr__(self, name):
        attr = getattr(self._txn, name)
        if callable(attr):
            def counted(*a, **kw):
                self._c.n += 1
                return attr(*a, **kw)
            return counted
        return attr


class _CountingEnv:
    """Every LMDB operation of every transaction of the store passes through here."""

    def __init__(self, env, counter):
        self._env, self._c = env, counter

    def begin(self, *a, **kw):
        return _CountingTxn(self._env.begin(*a, **kw), self._c)

    def __getattr__(self, name):
        return getattr(self._env, name)


def _lmdb_ops(store, fn):
    counter = _Counter()
    real = store.db.env
    store.db.env = _CountingEnv(real, counter)
    try:
        result = fn()
    finally:
        store.db.env = real
    return counter.n, result


def _store_with_history(path, big: int) -> tuple[Store, int]:
    """A user with a mailbox of `big` messages, then 100 flag changes elsewhere."""
    s = Store.init(path)
    s.create_mailbox(U, "Big")
    s.append_many(U, "Big", [Message(b"big %d" % i) for i in range(big)])
    s.create_mailbox(U, "Work")
    s.append_many(U, "Work", [Message(b"work %d" % i) for i in range(100)])
    for i in range(20):
        s.subscribe(U, f"sub{i}")
    s.create_mailbox("bob", "INBOX")       # another user, busy after N as well
    s.append_many("bob", "INBOX", [Message(b"bob %d" % i) for i in range(big)])
    n = s.user_info(U).modseq
    for uid in range(1, 101):
        s.set_flags(U, "Work", [(uid, uid)], ["\\Seen"])
        if uid % 10 == 0:
            s.set_flags("bob", "INBOX", None, [f"$k{uid}"])
    return s, n


def test_changes_since_cost_does_not_depend_on_store_size(scratch):
    small, n_small = _store_with_history(scratch / "small", 100)
    big, n_big = _store_with_history(scratch / "big", 2000)
    try:
        costs = {}
        for name, s, n in (("small", small, n_small), ("big", big, n_big)):
            ops, changes = _lmdb_ops(s, lambda s=s, n=n: s.changes_since(U, n))
            assert len(changes) == 101                  # 100 records and their mailbox
            costs[name] = ops
            half, changes = _lmdb_ops(s, lambda s=s, n=n: s.changes_since(U, n + 50))
            assert len(changes) == 51
            assert half <= ops / 2 + 10                 # linear in the number of changes
            top = s.user_info(U).modseq
            none, changes = _lmdb_ops(s, lambda s=s, top=top: s.changes_since(U, top))
            assert changes == [] and none <= 10
        assert costs["big"] == costs["small"]
        assert costs["big"] <= 5 * 101 + 20
    finally:
        small.close()
        big.close()
