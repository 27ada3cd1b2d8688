"""modsync as a Cyrus master: push_user into a real Cyrus 3.6 sync_server.

Each scenario changes a modsync store through its API, pushes the user into
a real Cyrus replica, and checks what an IMAP (and ManageSieve) client of
that replica sees against modsync: the same folders, messages byte-exact,
flags, subscriptions, STATUS, seen state, sieve scripts and the active one.
One Cyrus replica per module; each test has users of its own.
"""
from __future__ import annotations

import pytest

from engine import Store
from engine.csync import push_user, restore_to_cyrus

from cyruslib import assert_same, cyrus_peer, message

check = cyrus_peer.check

MAIN = b'require ["fileinto"];\r\nif header :contains "subject" "list" { fileinto "INBOX/Lists"; }\r\n'
AWAY = b'require ["vacation"];\r\nvacation :days 7 "I am away";\r\n'


@pytest.fixture(scope="module")
def master_store(peer_base):
    store = Store.init(peer_base / "master-store")
    yield store
    store.close()


def push(store, cy, user, **kw):
    report = push_user(store, user, "127.0.0.1", cy.csync_port, authname="repl",
                       password="replpw", **kw)
    assert report.ok, report.as_dict()
    return report


def test_initial_push_then_nothing_to_send(master_store, cyrus_replica):
    st, cy = master_store, cyrus_replica
    u = "pam"
    cy.add_login(u)
    st.create_mailbox(u, "INBOX")
    for n in ("Sent", "Archive/2024", "Lists/cyrus.devel", "Entwürfe"):
        st.create_mailbox(u, n)
    st.append(u, "INBOX", message(1), flags=["\\Seen"])
    st.append(u, "INBOX", message(2), flags=["\\Flagged", "$Label1", "custom_kw"])
    st.append(u, "INBOX", message(3, extra=b"Content-Type: text/plain; charset=utf-8\r\n",
                                  body="Zeile ä ö ü\r\n".encode() * 300))
    st.append(u, "Sent", message(4), flags=["\\Seen", "\\Draft"])
    st.append(u, "Archive/2024", message(5), flags=["\\Deleted"])
    st.append(u, "Entwürfe", message(6))
    st.subscribe(u, "INBOX")
    st.subscribe(u, "Lists/cyrus.devel")
    st.sieve_put(u, "main", MAIN)
    st.sieve_activate(u, "main")
    r = push(st, cy, u)
    assert r.updated == 5 and r.uploaded == 6
    assert_same(cy, st, u)
    with cy.sieve(u) as s:
        assert s.list() == {"main": True}
        assert s.get("main") == MAIN
    again = push(st, cy, u)
    assert again.updated == 0 and again.uploaded == 0 and again.unchanged == 5


def test_flag_changes_and_expunges(master_store, cyrus_replica):
    st, cy = master_store, cyrus_replica
    u = "quinn"
    cy.add_login(u)
    st.create_mailbox(u, "INBOX")
    for i in range(1, 7):
        st.append(u, "INBOX", message(10 + i))
    push(st, cy, u)
    st.set_flags(u, "INBOX", [(2, 2)], ["\\Seen", "\\Answered"])
    st.set_flags(u, "INBOX", [(3, 3)], ["$Junk"])
    st.set_flags(u, "INBOX", [(4, 4)], ["\\Seen"], mode="replace")
    st.expunge(u, "INBOX", [(5, 5)])
    r = push(st, cy, u)
    assert r.updated == 1 and r.uploaded == 0
    assert_same(cy, st, u)


def test_subscriptions_and_seen_of_another_user(master_store, cyrus_replica):
    st, cy = master_store, cyrus_replica
    u, other = "rita", "sam"
    cy.add_login(u)
    cy.add_login(other)
    st.create_mailbox(u, "INBOX")
    st.create_mailbox(u, "Old")
    st.create_mailbox(other, "INBOX")
    for i in range(1, 6):
        st.append(u, "INBOX", message(20 + i))
    st.set_acl(u, "INBOX", other, "lrs")
    st.subscribe(u, "INBOX")
    st.subscribe(u, "Old")
    inbox = st.mailbox(u, "INBOX")
    st.set_seen(other, inbox.id, "1:3", lastuid=5)
    push(st, cy, u)
    push(st, cy, other)
    assert_same(cy, st, u)
    with cy.imap(other) as c:
        check(c.select(f"user/{u}", readonly=True))
        typ, data = c.fetch("1:5", "(UID FLAGS)")
        seen = sorted(int(x.split()[0]) for x in data if b"\\Seen" in x)
    assert seen == [1, 2, 3]
    st.unsubscribe(u, "Old")
    st.set_seen(other, inbox.id, "2:5", lastuid=5)
    push(st, cy, u)
    push(st, cy, other)
    assert_same(cy, st, u)
    with cy.imap(other) as c:
        check(c.select(f"user/{u}", readonly=True))
        typ, data = c.fetch("1:5", "(UID FLAGS)")
        seen = sorted(int(x.split()[0]) for x in data if b"\\Seen" in x)
    assert seen == [2, 3, 4, 5]


def test_sieve_put_activate_delete(master_store, cyrus_replica):
    st, cy = master_store, cyrus_replica
    u = "tom"
    cy.add_login(u)
    st.create_mailbox(u, "INBOX")
    st.sieve_put(u, "main", MAIN)
    st.sieve_activate(u, "main")
    push(st, cy, u)
    with cy.sieve(u) as s:
        assert s.list() == {"main": True}
    st.sieve_put(u, "vacation", AWAY)
    st.sieve_activate(u, "vacation")
    st.sieve_delete(u, "main")
    push(st, cy, u)
    with cy.sieve(u) as s:
        assert s.list() == {"vacation": True}
        assert s.get("vacation") == AWAY
    st.sieve_put(u, "vacation", AWAY.replace(b"7", b"3"))
    st.sieve_activate(u, None)
    push(st, cy, u)
    with cy.sieve(u) as s:
        assert s.list() == {"vacation": False}
        assert s.get("vacation") == AWAY.replace(b"7", b"3")
    again = push(st, cy, u)
    assert again.updated == 0 and again.uploaded == 0


def test_append_and_copy_sends_each_body_once(master_store, cyrus_replica):
    st, cy = master_store, cyrus_replica
    u = "uma"
    cy.add_login(u)
    st.create_mailbox(u, "INBOX")
    st.create_mailbox(u, "Archive")
    st.append(u, "INBOX", message(30))
    push(st, cy, u)
    st.append(u, "INBOX", message(31))
    st.copy(u, "INBOX", [(1, 2)], "Archive")
    r = push(st, cy, u)
    assert r.uploaded == 1 and r.reserved == 1
    assert_same(cy, st, u)


def test_create_rename_delete_mailboxes(master_store, cyrus_replica):
    st, cy = master_store, cyrus_replica
    u = "vera"
    cy.add_login(u)
    st.create_mailbox(u, "INBOX")
    for n in ("Archive", "Archive/2024", "Drafts", "Old"):
        st.create_mailbox(u, n)
    st.append(u, "Archive/2024", message(40))
    st.append(u, "Old", message(41))
    push(st, cy, u)
    st.create_mailbox(u, "Projects")
    st.append(u, "Projects", message(42))
    st.rename_mailbox(u, "Archive/2024", "Archive/Y2024")
    st.rename_mailbox(u, "Drafts", "Entwürfe")
    st.delete_mailbox(u, "Old")
    r = push(st, cy, u)
    assert r.renamed == 2 and r.deleted == 1
    assert_same(cy, st, u)


def test_create_and_delete_a_user(master_store, cyrus_replica):
    st, cy = master_store, cyrus_replica
    u = "walt"
    cy.add_login(u)
    st.create_mailbox(u, "INBOX")
    st.create_mailbox(u, "Sent")
    st.append(u, "INBOX", message(50))
    push(st, cy, u)
    assert_same(cy, st, u)
    st.delete_mailbox(u, "Sent")
    st.delete_mailbox(u, "INBOX")
    r = push(st, cy, u)
    assert r.deleted_user
    with cy.imap("admin") as c:
        typ, data = c.list(f"user/{u}", "*")
        assert data == [None] or not [x for x in data if x]


def test_acl_quota_and_metadata(master_store, cyrus_replica):
    st, cy = master_store, cyrus_replica
    u = "xena"
    cy.add_login(u)
    st.create_mailbox(u, "INBOX")
    st.create_mailbox(u, "Sent")
    st.append(u, "INBOX", message(60))
    st.set_acl(u, "Sent", "other", "lrsw")
    st.set_quota(u, "", {"STORAGE": 200000, "MESSAGE": 5000})
    st.set_annotation(u, "INBOX", "/comment", b"my inbox", userid=u)
    st.set_annotation(u, "INBOX", "/comment", b"shared note")
    st.set_annotation(u, "Sent", "/specialuse", b"\\Sent", userid=u)
    st.set_message_annotation(u, "INBOX", 1, "/comment", u, b"per-message note")
    push(st, cy, u)
    assert_same(cy, st, u)
    with cy.imap("admin") as c:
        typ, data = c.getacl(f"user/{u}/Sent")
        assert b"other lrsw" in data[0]
        typ, data = c.getquota(f"user/{u}")
        assert b"STORAGE 0 200000" in data[0] and b"MESSAGE 1 5000" in data[0]
    assert cy.getmetadata(u, "INBOX", "/private/comment") == b"my inbox"
    assert cy.getmetadata(u, "INBOX", "/shared/comment") == b"shared note"
    assert cy.getmetadata(u, "Sent", "/private/specialuse") == b"\\Sent"
    st.set_quota(u, "", {"STORAGE": 300000})
    st.set_acl(u, "Sent", "other", None)
    st.set_annotation(u, "INBOX", "/comment", None)
    push(st, cy, u)
    with cy.imap("admin") as c:
        typ, data = c.getacl(f"user/{u}/Sent")
        assert b"other" not in data[0]
        typ, data = c.getquota(f"user/{u}")
        assert b"STORAGE 0 300000" in data[0] and b"MESSAGE" not in data[0]
    assert cy.getmetadata(u, "INBOX", "/shared/comment") is None
    again = push(st, cy, u)
    assert again.updated == 0


def test_a_diverged_replica_is_repaired(master_store, cyrus_replica):
    """Changes made on the Cyrus replica behind modsync's back: sync_client's repair."""
    st, cy = master_store, cyrus_replica
    u = "yves"
    cy.add_login(u)
    st.create_mailbox(u, "INBOX")
    for i in range(1, 5):
        st.append(u, "INBOX", message(70 + i))
    push(st, cy, u)
    with cy.imap(u) as c:
        c.select("INBOX")
        check(c.store("1", "+FLAGS", r"(\Flagged replica_kw)"))
        check(c.append("INBOX", r"(\Seen)", None, message(79)))
    st.set_flags(u, "INBOX", [(2, 2)], ["\\Answered"])
    r = push(st, cy, u)
    assert r.full_updates >= 1 and r.copied_back == 1
    assert_same(cy, st, u)
    recs = {x.uid: x for x in st.records(u, "INBOX")}
    assert "replica_kw" in recs[1].flags and "\\Answered" in recs[2].flags
    assert st.read_body(recs[5].address) == message(79)
    again = push(st, cy, u)
    assert again.updated == 0 and again.full_updates == 0


def test_restore_into_cyrus_under_another_name(cyrus_replica, peer_base):
    """restore_to_cyrus: a user from any store (e.g. a restored backup), under a new name."""
    tmp = Store.init(peer_base / "restore-store")
    try:
        tmp.create_mailbox("orig", "INBOX")
        tmp.create_mailbox("orig", "Sent")
        tmp.append("orig", "INBOX", message(90), flags=["\\Seen"])
        tmp.append("orig", "Sent", message(91))
        tmp.subscribe("orig", "Sent")
        cyrus_replica.add_login("zoe")
        r = restore_to_cyrus(tmp, "orig", "127.0.0.1", cyrus_replica.csync_port,
                             authname="repl", password="replpw", as_user="zoe")
        assert r.ok, r.as_dict()
        view = cyrus_replica.view("zoe")
        assert [b for _, b in view["mailboxes"]["INBOX"]] == [message(90)]
        assert view["subscribed"] == ["Sent"]
    finally:
        tmp.close()
