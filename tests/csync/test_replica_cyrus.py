"""A real Cyrus 3.6 master replicates into modsync (`sync_client` -> modsync's csync server).

Each scenario changes the Cyrus master over IMAP/ManageSieve, runs Cyrus's
own sync_client (one-shot ``-u`` or rolling ``-r``), and ends by comparing
the master's IMAP view with what the modsync store holds (messages
byte-exact, flags, subscriptions, STATUS).  One Cyrus master and one modsync
server per module; each test works on users of its own.
"""
from __future__ import annotations

import time

import pytest

from cyruslib import assert_same, cyrus_peer, message, modsync_view
from engine.csync import view
from engine.model import RECORD, U64, Record
from engine.verify import verify_store

check = cyrus_peer.check


def sync_user(cy, *users: str):
    """``sync_client -u``, then forget the sync log (-u does not consume it)."""
    p = cy.sync_client("-v", "-u", *users)
    cy.clear_sync_log()
    return p


def roll(cy):
    """One pass of rolling replication over the sync log (``sync_client -r -1``)."""
    return cy.tool("sync_client", "-r", "-1", "-o", "-v", env={"CYRUS_ISDAEMON": "1"})


def new_user(cy, user: str) -> None:
    cy.create_user(user)


def assert_settled(cy, store, *users: str) -> None:
    """A full user sync afterwards finds nothing to do, and the store verifies clean."""
    p = sync_user(cy, *users)
    want = ["ENABLE", "0x800"] + [w for u in users for w in ("USER", u)]
    assert p.stdout.decode().split() == want
    report = verify_store(store, check_blobs=False)
    assert report.ok, report.as_dict()["problems"]


def restore_deleted(cy, user: str, folder: str) -> str:
    """As the admin, rename the user's newest DELETED.* copy of folder back; its Cyrus name."""
    with cy.imap("admin") as c:
        typ, data = c.list('""', f"DELETED/user/{user}/{folder}/*")
        check((typ, data))
        deleted = data[-1].decode().rsplit(" ", 1)[-1].strip('"')
        check(c.rename(deleted, f"user/{user}/{folder}"))
    return deleted.replace("/", ".")


def deleted_folder(cy, store, user: str, first_message: int):
    """A folder Old with two messages, replicated, then deleted (Cyrus keeps DELETED.*).

    Returns the modsync mailbox it was before the delete.
    """
    new_user(cy, user)
    with cy.imap(user) as c:
        check(c.create("INBOX/Old"))
        check(c.append("INBOX/Old", r"(\Seen)", None, message(first_message)))
        check(c.append("INBOX/Old", r"(\Answered $Label1)", None, message(first_message + 1)))
    roll(cy)
    before = store.mailbox(user, "Old")
    with cy.imap(user) as c:
        check(c.delete("INBOX/Old"))
    roll(cy)
    return before


def records_of(store, user: str, mb) -> list[Record]:
    """Every record of a mailbox, tombstones of both included (by mailbox number)."""
    with store.db.read() as txn:
        u = view.user_record(txn, user)
        return [Record.unpack(k[5:], v)
                for k, v in txn.prefix("objects", u.prefix + RECORD + U64.pack(mb.num))]


def test_initial_user_sync_names_with_dots_and_non_ascii(cyrus_master, replica_store,
                                                         csync_server):
    cy, store = cyrus_master, replica_store
    new_user(cy, "alice")
    with cy.imap("alice") as c:
        for name in ("Sent", "Archive", "Archive/2024", "Lists/cyrus.devel", "Entwürfe",
                     "Entwürfe/März 2024"):
            check(c.create('"' + cy.mailbox_name("alice", name) + '"'))
        for i in range(1, 8):
            flags = r"(\Seen)" if i % 2 else None
            extra = b""
            body = None
            if i == 7:
                extra = b"Content-Type: text/plain; charset=utf-8\r\n"
                body = "Zeile ä ö ü\r\n".encode() * 200
            check(c.append("INBOX", flags, None, message(i, extra=extra, body=body)))
        check(c.append("INBOX/Sent", r"(\Seen \Draft)", None, message(20)))
        check(c.append("INBOX/Archive/2024", r"(\Deleted)", None, message(30)))
        check(c.append('"' + cy.mailbox_name("alice", "Lists/cyrus.devel") + '"', None, None,
                       message(40)))
        check(c.append('"' + cy.mailbox_name("alice", "Entwürfe/März 2024") + '"',
                       r"($Label1 custom_kw)", None, message(41)))
        c.select("INBOX")
        check(c.store("1", "+FLAGS", r"(\Flagged $Label1)"))
        check(c.subscribe("INBOX"))
        check(c.subscribe('"' + cy.mailbox_name("alice", "Lists/cyrus.devel") + '"'))
    sync_user(cy, "alice")
    assert_same(cy, store, "alice")
    names = {m.name for m in store.mailboxes("alice")}
    assert {"Lists/cyrus.devel", "Entwürfe", "Entwürfe/März 2024", "Archive/2024"} <= names

    # A second run finds nothing to do: every mailbox compares unchanged.
    before = csync_server.stats.as_dict()
    p = sync_user(cy, "alice")
    after = csync_server.stats.as_dict()
    assert p.stdout.decode().split() == ["ENABLE", "0x800", "USER", "alice"]
    assert after["files"] == before["files"]


def test_flag_changes_and_expunges(cyrus_master, replica_store):
    cy, store = cyrus_master, replica_store
    new_user(cy, "bob")
    with cy.imap("bob") as c:
        check(c.create("INBOX/Archive"))
        for i in range(1, 7):
            check(c.append("INBOX", None, None, message(100 + i)))
        check(c.append("INBOX/Archive", r"(\Deleted)", None, message(110)))
    sync_user(cy, "bob")
    with cy.imap("bob") as c:
        c.select("INBOX")
        check(c.store("2", "+FLAGS", r"(\Seen \Answered)"))
        check(c.store("3", "+FLAGS", r"($Junk)"))
        check(c.store("5", "+FLAGS", r"(\Deleted)"))
        check(c.expunge())
        c.select("INBOX/Archive")
        check(c.expunge())
    sync_user(cy, "bob")
    assert_same(cy, store, "bob")
    # the expunges are tombstones in modsync's log, UIDs kept
    inbox = store.records("bob", "INBOX", include_expunged=True)
    assert [r.uid for r in inbox if r.expunged] == [5]
    assert store.changes_since("bob", 0)


def test_subscriptions_rolling(cyrus_master, replica_store):
    cy, store = cyrus_master, replica_store
    new_user(cy, "carol")
    with cy.imap("carol") as c:
        check(c.create("INBOX/Sent"))
        check(c.create("INBOX/Old"))
        check(c.subscribe("INBOX/Sent"))
    sync_user(cy, "carol")
    assert store.subscriptions("carol") == ["Sent"]
    with cy.imap("carol") as c:
        check(c.subscribe("INBOX/Old"))
        check(c.unsubscribe("INBOX/Sent"))
    roll(cy)
    assert store.subscriptions("carol") == ["Old"]
    assert_same(cy, store, "carol")


def test_seen_state_of_owner_and_of_another_user(cyrus_master, replica_store):
    cy, store = cyrus_master, replica_store
    new_user(cy, "dave")
    new_user(cy, "erin")
    with cy.imap("dave") as c:
        for i in range(1, 6):
            check(c.append("INBOX", None, None, message(200 + i)))
        check(c.setacl("INBOX", "erin", "lrs"))
    with cy.imap("erin") as c:
        check(c.select("user/dave"))
        check(c.store("1:3", "+FLAGS", r"(\Seen)"))
    with cy.imap("dave") as c:
        c.select("INBOX")
        check(c.store("4", "+FLAGS", r"(\Seen)"))
    sync_user(cy, "dave", "erin")
    assert_same(cy, store, "dave")
    inbox = store.mailbox("dave", "INBOX")
    seen = {s.mailbox_id: s for s in store.seen_sets("erin")}
    assert seen[inbox.id].uids == "1:3"
    # owner's \Seen is a flag on the record, not a seen set
    assert [r.uid for r in store.records("dave", "INBOX") if "\\Seen" in r.flags] == [4]

    with cy.imap("erin") as c:
        c.select("user/dave")
        check(c.store("1", "-FLAGS", r"(\Seen)"))
        check(c.store("5", "+FLAGS", r"(\Seen)"))
    roll(cy)
    seen = {s.mailbox_id: s for s in store.seen_sets("erin")}
    assert seen[inbox.id].uids == "2:3,5"


def test_sieve_put_activate_delete(cyrus_master, replica_store):
    cy, store = cyrus_master, replica_store
    new_user(cy, "fred")
    sync_user(cy, "fred")
    main = b'require ["fileinto"];\r\nif header :contains "subject" "list" { fileinto "INBOX/Lists"; }\r\n'
    away = b'require ["vacation"];\r\nvacation :days 7 "I am away";\r\n'
    with cy.sieve("fred") as s:
        s.put("main", main)
        s.activate("main")
    roll(cy)
    scripts = {x.name: x for x in store.sieve_scripts("fred")}
    assert set(scripts) == {"main"} and scripts["main"].active
    assert store.sieve_script("fred", "main") == main
    with cy.sieve("fred") as s:
        s.put("vacation", away)
        s.activate("vacation")
        s.delete("main")
        cyrus_side = s.list()
    roll(cy)
    scripts = {x.name: x for x in store.sieve_scripts("fred")}
    assert {n: x.active for n, x in scripts.items()} == cyrus_side == {"vacation": True}
    assert store.sieve_script("fred", "vacation") == away
    # sieve scripts are not folders for modsync
    assert "#sieve" not in modsync_view(store, "fred")["mailboxes"]
    # and a full user sync afterwards has nothing to do
    p = sync_user(cy, "fred")
    assert p.stdout.decode().split() == ["ENABLE", "0x800", "USER", "fred"]


def test_append_and_copy_sends_the_body_once(cyrus_master, replica_store, csync_server):
    cy, store = cyrus_master, replica_store
    new_user(cy, "gina")
    with cy.imap("gina") as c:
        check(c.create("INBOX/Archive"))
        check(c.append("INBOX", None, None, message(300)))
    sync_user(cy, "gina")
    before = csync_server.stats.files
    with cy.imap("gina") as c:
        check(c.append("INBOX", None, None, message(301)))
        c.select("INBOX")
        check(c.copy("1:2", "INBOX/Archive"))
    roll(cy)
    assert csync_server.stats.files - before == 1      # only the new message travelled
    assert_same(cy, store, "gina")
    a = store.records("gina", "Archive")
    i = store.records("gina", "INBOX")
    assert {r.address for r in a} == {r.address for r in i}


def test_create_rename_delete_mailboxes(cyrus_master, replica_store):
    cy, store = cyrus_master, replica_store
    new_user(cy, "hank")
    with cy.imap("hank") as c:
        for name in ("Archive", "Archive/2024", "Drafts", "Old"):
            check(c.create("INBOX/" + name))
        check(c.append("INBOX/Archive/2024", None, None, message(400)))
        check(c.append("INBOX/Old", None, None, message(401)))
    sync_user(cy, "hank")
    old_id = store.mailbox("hank", "Old").id
    with cy.imap("hank") as c:
        check(c.create("INBOX/Projects"))
        check(c.append("INBOX/Projects", None, None, message(402)))
        check(c.rename("INBOX/Archive/2024", "INBOX/Archive/Y2024"))
        check(c.rename("INBOX/Drafts", "INBOX/Entw&APw-rfe"))
        check(c.delete("INBOX/Old"))
    roll(cy)
    assert_same(cy, store, "hank")
    names = {m.name for m in store.mailboxes("hank")}
    assert names == {"INBOX", "Archive", "Archive/Y2024", "Entwürfe", "Projects"}
    # the deleted mailbox is a tombstone in modsync (Cyrus keeps it as DELETED.*)
    tomb = [m for m in store.mailboxes("hank", include_removed=True) if m.stamp.removed]
    assert [m.id for m in tomb] == [old_id]
    # and a full user sync agrees with the result
    p = sync_user(cy, "hank")
    assert p.stdout.decode().split() == ["ENABLE", "0x800", "USER", "hank"]


def test_folder_moved_between_users(cyrus_master, replica_store):
    """An admin RENAME user/nina/Proj -> user/otto/Proj: one csync RENAME across users."""
    cy, store = cyrus_master, replica_store
    new_user(cy, "nina")
    new_user(cy, "otto")
    with cy.imap("nina") as c:
        check(c.create("INBOX/Proj"))
        check(c.append("INBOX/Proj", r"(\Seen)", None, message(600)))
        check(c.append("INBOX/Proj", None, None, message(601)))
        check(c.append("INBOX/Proj", None, None, message(602)))
        c.select("INBOX/Proj")
        check(c.store("2", "+FLAGS", r"(\Flagged)"))
        check(c.store("3", "+FLAGS", r"(\Deleted)"))
        check(c.expunge())
    roll(cy)
    old = store.mailbox("nina", "Proj")
    with cy.imap("admin") as c:
        check(c.rename("user/nina/Proj", "user/otto/Proj"))
        # the folder keeps nina's ACL: the admin gives it to its new owner
        check(c.setacl("user/otto/Proj", "otto", "lrswipkxtecdan"))
        check(c.deleteacl("user/otto/Proj", "nina"))
    p = roll(cy)
    assert "RENAME user.nina.Proj -> user.otto.Proj" in p.stdout.decode()
    assert_same(cy, store, "nina")
    assert_same(cy, store, "otto")
    moved = store.mailbox("otto", "Proj")
    # nina's mailbox is a tombstone whose messages stay expunged; otto's is a new
    # mailbox (modsync ids are never reused) with the same UIDs and uidvalidity
    tomb = [m for m in store.mailboxes("nina", include_removed=True) if m.name == "Proj"]
    assert [m.id for m in tomb] == [old.id] and tomb[0].stamp.removed
    assert all(r.stamp.removed for r in records_of(store, "nina", old))
    assert moved.id != old.id and moved.uidvalidity == old.uidvalidity
    assert [r.uid for r in store.records("otto", "Proj")] == [1, 2]
    assert_settled(cy, store, "nina", "otto")


def test_user_renamed(cyrus_master, replica_store):
    """An admin renames a user (allowusermoves): every folder, sieve and subscriptions move."""
    cy, store = cyrus_master, replica_store
    new_user(cy, "quinn")
    with cy.imap("quinn") as c:
        check(c.create("INBOX/Sub"))
        check(c.append("INBOX", None, None, message(700)))
        check(c.append("INBOX/Sub", r"(\Seen)", None, message(701)))
        check(c.subscribe("INBOX/Sub"))
    with cy.sieve("quinn") as s:
        s.put("main", b"keep;\r\n")
        s.activate("main")
    roll(cy)
    with cy.imap("admin") as c:
        check(c.rename("user/quinn", "user/rita"))
    cy.add_login("rita")
    p = roll(cy)
    assert "RENAME user.quinn.Sub -> user.rita.Sub" in p.stdout.decode()
    assert_same(cy, store, "rita")
    assert store.mailboxes("quinn") == []
    assert store.subscriptions("rita") == ["Sub"]
    assert {x.name: x.active for x in store.sieve_scripts("rita")} == {"main": True}
    assert store.sieve_script("rita", "main") == b"keep;\r\n"
    assert_settled(cy, store, "rita")


def test_deleted_folder_restored(cyrus_master, replica_store):
    """An admin restores DELETED.user.max.Old.<hex> under its old name (an undelete)."""
    cy, store = cyrus_master, replica_store
    first = deleted_folder(cy, store, "max", 610)
    deleted = restore_deleted(cy, "max", "Old")
    p = roll(cy)
    assert f"RENAME {deleted} -> user.max.Old" in p.stdout.decode()
    # the same messages, flags and UIDs; a new modsync mailbox, with a higher
    # uidvalidity than the deleted one (modsync's rule for a recreated name)
    assert_same(cy, store, "max", renewed=("Old",))
    restored = store.mailbox("max", "Old")
    assert restored.id != first.id and restored.uidvalidity > first.uidvalidity
    assert [r.uid for r in store.records("max", "Old")] == [1, 2]
    tomb = [m for m in store.mailboxes("max", include_removed=True) if m.id == first.id]
    assert tomb[0].stamp.removed
    assert [r.stamp.removed for r in records_of(store, "max", first)] == [True, True]
    assert_settled(cy, store, "max")


def test_create_and_delete_a_user(cyrus_master, replica_store):
    cy, store = cyrus_master, replica_store
    new_user(cy, "ivan")
    with cy.imap("ivan") as c:
        check(c.create("INBOX/Sent"))
        check(c.append("INBOX", None, None, message(500)))
        check(c.subscribe("INBOX/Sent"))
    roll(cy)
    assert_same(cy, store, "ivan")
    cy.delete_user("ivan")
    roll(cy)
    assert store.mailboxes("ivan") == []
    assert store.subscriptions("ivan") == []
    assert all(m.stamp.removed for m in store.mailboxes("ivan", include_removed=True))


def test_acl_quota_and_metadata(cyrus_master, replica_store):
    cy, store = cyrus_master, replica_store
    new_user(cy, "judy")
    with cy.imap("judy") as c:
        check(c.create("INBOX/Sent"))
        check(c.append("INBOX", None, None, message(600)))
        check(c.append("INBOX", None, None, message(601)))
    sync_user(cy, "judy")
    with cy.imap("admin") as c:
        check(c.setquota("user/judy", "(STORAGE 200000 MESSAGE 5000)"))
        check(c.setacl("user/judy/Sent", "other", "lrsw"))
    with cy.imap("judy") as c:
        check(c._simple_command("SETMETADATA", "INBOX", '(/private/comment "my inbox")'))
        check(c._simple_command("SETMETADATA", "INBOX", '(/shared/comment "shared note")'))
        check(c._simple_command("SETMETADATA", "INBOX/Sent", r'(/private/specialuse "\\Sent")'))
        c.select("INBOX")
        check(c._simple_command("UID", "STORE", "2", "ANNOTATION",
                                '(/comment (value.priv "per-message note"))'))
    roll(cy)
    assert_same(cy, store, "judy")
    assert store.acl("judy", "Sent") == {"judy": "lrswipkxtecdan", "other": "lrsw"}
    ann = {(a.entry, a.userid): a.value for a in store.annotations("judy", "INBOX")}
    assert ann == {("/comment", "judy"): b"my inbox", ("/comment", ""): b"shared note"}
    assert store.mailbox("judy", "Sent").specialuse == ("\\Sent",)
    [q] = store.quota("judy")
    assert q["root"] == "" and q["limits"] == {"STORAGE": 200000, "MESSAGE": 5000}
    r2 = store.records("judy", "INBOX", uids=[(2, 2)])[0]
    assert r2.annotations == (("/comment", "judy", b"per-message note"),)

    with cy.imap("admin") as c:
        check(c.setquota("user/judy", "(STORAGE 300000)"))
        check(c.deleteacl("user/judy/Sent", "other"))
    with cy.imap("judy") as c:
        check(c._simple_command("SETMETADATA", "INBOX", "(/shared/comment NIL)"))
    roll(cy)
    assert store.acl("judy", "Sent") == {"judy": "lrswipkxtecdan"}
    ann = {(a.entry, a.userid): a.value for a in store.annotations("judy", "INBOX")}
    assert ann == {("/comment", "judy"): b"my inbox"}
    assert store.quota("judy")[0]["limits"] == {"STORAGE": 300000}
    p = sync_user(cy, "judy")
    assert p.stdout.decode().split() == ["ENABLE", "0x800", "USER", "judy"]


def test_replica_changed_behind_the_masters_back(cyrus_master, replica_store):
    """Cyrus's checksum-failure path: CHECKSUM, GET FULLMAILBOX, copy-back, resend."""
    cy, store = cyrus_master, replica_store
    new_user(cy, "kate")
    with cy.imap("kate") as c:
        for i in range(1, 5):
            check(c.append("INBOX", None, None, message(700 + i)))
    sync_user(cy, "kate")
    # behind the master's back, in modsync:
    store.set_flags("kate", "INBOX", [(1, 1)], ["\\Deleted", "replica_only_kw"])
    # and on the master:
    with cy.imap("kate") as c:
        c.select("INBOX")
        check(c.store("3", "+FLAGS", r"(\Flagged)"))
    p = sync_user(cy, "kate")
    out = p.stdout.decode()
    assert "FULLMAILBOX user.kate" in out          # the repair ladder ran
    assert_same(cy, store, "kate")
    flags = {r.uid: r.flags for r in store.records("kate", "INBOX")}
    assert "replica_only_kw" in flags[1] and "\\Flagged" in flags[3]
    # the master adopted the replica's newer record
    with cy.imap("kate") as c:
        c.select("INBOX", readonly=True)
        typ, data = c.fetch("1", "(FLAGS)")
        assert b"replica_only_kw" in data[0]


def test_replica_only_message_is_copied_back(cyrus_master, replica_store):
    """A message appended in modsync behind the master's back ends up on the master too."""
    cy, store = cyrus_master, replica_store
    new_user(cy, "lena")
    with cy.imap("lena") as c:
        check(c.append("INBOX", None, None, message(800)))
    sync_user(cy, "lena")
    store.append("lena", "INBOX", message(801))
    sync_user(cy, "lena")
    assert_same(cy, store, "lena")
    assert len(store.records("lena", "INBOX")) == 2


def test_rolling_replication_while_changes_arrive(cyrus_master, replica_store):
    cy, store = cyrus_master, replica_store
    new_user(cy, "mike")
    with cy.imap("mike") as c:
        check(c.create("INBOX/Projects"))
    sync_user(cy, "mike")
    cy.rolling_start("-v")
    try:
        with cy.imap("mike") as c:
            check(c.append("INBOX", None, None, message(900)))
        _wait(lambda: len(store.records("mike", "INBOX")) == 1)
        with cy.imap("mike") as c:
            c.select("INBOX")
            check(c.store("1", "+FLAGS", r"(\Flagged)"))
            check(c.append("INBOX", r"(\Seen)", None, message(901)))
        _wait(lambda: len(store.records("mike", "INBOX")) == 2
              and "\\Flagged" in store.records("mike", "INBOX")[0].flags)
        with cy.imap("mike") as c:
            check(c.subscribe("INBOX/Projects"))
        _wait(lambda: store.subscriptions("mike") == ["Projects"])
    finally:
        rc = cy.rolling_stop()
    assert rc == 0, cy.rolling_output()
    assert_same(cy, store, "mike")


def test_sync_client_that_tries_imap_first(peer_base, replica_store, csync_server):
    """An unconfigured sync_client (sync_try_imap: yes) probes with C01 CAPABILITY first."""
    why = cyrus_peer.missing()
    if why:
        pytest.skip(why)
    cy = cyrus_peer.Cyrus(peer_base, "probe", sync_port=csync_server.port, sync_try_imap=True)
    cy.start()
    try:
        cy.create_user("nina")
        with cy.imap("nina") as c:
            check(c.append("INBOX", None, None, message(1000)))
        t0 = time.monotonic()
        sync_user(cy, "nina")
        assert time.monotonic() - t0 < 5      # no 10 s client_timeout wait
        assert_same(cy, replica_store, "nina")
    finally:
        cy.destroy()


def _wait(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("rolling replication did not catch up in time")
        time.sleep(0.2)


# Last in this module: it collects every unreferenced body of the shared store.
def test_restoring_a_folder_whose_bodies_were_collected(cyrus_master, replica_store):
    """gc took the deleted folder's bodies: the master's retry uploads the folder again."""
    from engine.gc import collect
    cy, store = cyrus_master, replica_store
    deleted_folder(cy, store, "pia", 620)
    now = time.time()
    collect(store, retention=0, now=now)            # mark
    assert collect(store, retention=0, now=now + 1).removed >= 2   # sweep
    restore_deleted(cy, "pia", "Old")
    roll(cy)
    roll(cy)
    assert_same(cy, store, "pia", renewed=("Old",))
    assert [r.uid for r in store.records("pia", "Old")] == [1, 2]
    assert_settled(cy, store, "pia")
