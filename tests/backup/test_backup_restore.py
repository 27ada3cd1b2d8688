"""engine/backup.py: backups from a store, points in time, and restores of every kind."""
from __future__ import annotations

import random
import sys
import types

import pytest
from engine.blobs import address_of, sha1_of
from engine.errors import NoSuchMailbox, NoSuchMessage, NoSuchUser, UsageError

from engine import Message
from engine.archive import Archive, verify_archive
from engine.backup import (
    LocalSource,
    backup,
    choose_point,
    format_time,
    list_points,
    restore,
    split_changeset,
    state_at,
)

from .conftest import DAY, T0, body, history, snapshot


def test_restore_at_every_point_gives_the_sources_digest(source, archive, new_store):
    snaps = history(source, archive)
    assert [p.point for p in archive.points("alice")] == [1, 2, 3, 4, 5]
    for snap in snaps:
        for at in (f"modseq:{snap.modseq}", f"point:{snap.point}", f"@{snap.time + 5}"):
            target = new_store()
            report = restore(archive, "alice", at=at, store=target)
            assert report.mode == "exact" and report.digest_ok
            assert target.status("alice")["digest"] == snap.digest
            assert snapshot(target, "alice", 0, 0).mailboxes == snap.mailboxes
    assert verify_archive(archive).ok


def test_expunged_and_deleted_mail_stays_restorable(source, archive, new_store):
    snaps = history(source, archive)
    # At the end INBOX is empty and the first "Old" was deleted; point 3 has both.
    assert source.records("alice", "INBOX") == []
    target = new_store()
    restore(archive, "alice", at="point:3", mailbox="Old", store=target)
    assert [r.address for r in target.records("alice", "Old")] == \
        [a for _, a, _ in snaps[2].mailboxes["Old"]]
    info, cs = state_at(archive, "alice", "point:1")
    assert info.point == 1 and len([i for i in cs.items if i.kind == b"R"]) == 35


def test_points_are_only_added_when_something_changed(source, archive):
    history(source, archive)
    before = archive.head()
    r = backup(archive, LocalSource(source))
    assert r.points == 0 and r.users == [{"user": "alice", "point": None, "unchanged": True}]
    assert archive.head() == before


def test_bodies_are_stored_once_per_archive(source, archive):
    source.create_mailbox("alice", "INBOX")
    source.create_mailbox("bob", "INBOX")
    shared = [Message(body(i)) for i in range(10)]
    source.append_many("alice", "INBOX", shared)
    source.append_many("bob", "INBOX", shared + [Message(body(99))])
    r = backup(archive, LocalSource(source))
    assert r.points == 2 and r.bodies == 11
    assert archive.body_count() == 11
    source.create_mailbox("alice", "Copies")
    source.copy("alice", "INBOX", [(1, 10)], "Copies")
    r = backup(archive, LocalSource(source))
    assert r.bodies == 0 and r.points == 1


def test_choose_point_rules(source, archive):
    snaps = history(source, archive)
    points = archive.points("alice")
    assert choose_point(points, None).point == 5
    assert choose_point(points, f"modseq:{snaps[1].modseq + 1}").point == 2
    assert format_time(T0) == "2023-11-14T22:13:20Z"
    assert choose_point(points, "2023-11-14T22:13:20Z").point == 1      # T0 exactly
    assert choose_point(points, "2023-11-15").point == 2                  # the end of that day
    assert choose_point(points, "2023-11-15T23:00:00+02:00").point == 1   # 21:00 UTC
    assert choose_point(points, "2023-11-15T22:13:20").point == 2         # naive = UTC
    with pytest.raises(UsageError):
        choose_point(points, "modseq:1")
    with pytest.raises(UsageError):
        choose_point(points, "point:9")
    with pytest.raises(UsageError):
        choose_point(points, "yesterday")
    with pytest.raises(UsageError):
        choose_point(points, f"@{T0 - DAY}")


def test_restore_single_messages_into_a_live_store_disturbs_nothing(source, archive):
    snaps = history(source, archive)
    before = {mb.name: (mb.id, mb.uidvalidity, [(r.uid, r.address, r.flags)
                                                 for r in source.records("alice", mb.name)])
              for mb in source.mailboxes("alice")}
    # INBOX UIDs 2 and 4 as they were at point 2 (now expunged), into INBOX itself.
    report = restore(archive, "alice", at="point:2", mailbox="INBOX", uids=[(2, 2), (4, 4)],
                     store=source)
    assert report.mode == "append" and report.messages == 2
    assert report.mailboxes[0]["uids"] == [[2, 22], [4, 23]]
    recs = source.records("alice", "INBOX")
    old = {uid: (a, f) for uid, a, f in snaps[1].mailboxes["INBOX"]}
    assert [(r.uid, r.address, tuple(sorted(r.flags))) for r in recs] == \
        [(22, *old[2]), (23, *old[4])]
    # By GUID (SHA-1, Cyrus's form), into a mailbox named by the operator.
    addr = old[3][0]
    sha1 = sha1_of(archive.read_body(addr)).hex()
    restore(archive, "alice", at="point:2", guid=sha1, into="Rescued", store=source)
    assert [r.address for r in source.records("alice", "Rescued")] == [addr]
    restore(archive, "alice", at="point:2", guid=addr.hex(), mailbox="INBOX",
            into="Rescued", store=source)
    assert len(source.records("alice", "Rescued")) == 2
    # A whole mailbox deleted since; a new "Old" exists now: appended into it.
    report = restore(archive, "alice", at="point:3", mailbox="Old", store=source)
    assert report.mailboxes[0]["messages"] == 7 and report.mailboxes[0]["created"] is False
    # Or into a new mailbox, which gets a new unique id (never the archived one).
    old_id = next(i.ident[0] for i in state_at(archive, "alice", "point:3")[1].items
                  if i.kind == b"M" and i.fields[0] == "Old")
    report = restore(archive, "alice", at="point:3", mailbox=old_id, into="Old again",
                     store=source)
    made = report.mailboxes[0]
    assert made["created"] is True and made["id"] != old_id and made["messages"] == 7
    assert made["from"] == "Old"
    after = {mb.name: (mb.id, mb.uidvalidity, [(r.uid, r.address, r.flags)
                                                for r in source.records("alice", mb.name)])
             for mb in source.mailboxes("alice")}
    for name, (mbid, uv, recs) in before.items():
        assert after[name][0] == mbid and after[name][1] == uv
        assert after[name][2][:len(recs)] == recs      # what was there is untouched


def test_a_restore_of_a_mailbox_or_messages_decodes_only_what_it_takes(source, archive):
    """state_at(mailbox=, uids=, guid=) decodes a fraction of each point, and selects
    exactly what the whole state would give, at every point: also for a mailbox that
    got its name after its mail was backed up (Work -> Archive/Work, point 3)."""
    from engine.backup import select, selection_changeset

    history(source, archive)
    for point in range(1, 6):
        at = f"point:{point}"
        full = state_at(archive, "alice", at)[1]
        records = [it for it in full.items if it.kind == b"R" and not it.removed]
        mailboxes = {it.ident[0]: it.fields[0] for it in full.items
                     if it.kind == b"M" and not it.removed}
        some = records[len(records) // 2]
        named = mailboxes[some.ident[0]]
        cases = [{"mailbox": name} for name in mailboxes.values()]
        cases += [{"mailbox": mbid} for mbid in list(mailboxes)[:1]]
        cases += [{"mailbox": named, "uids": [(some.ident[1], some.ident[1])]},
                  {"mailbox": named, "uids": [(1, 3), (7, 9)]},
                  {"guid": bytes(some.fields[1]).hex()}, {"guid": bytes(some.fields[0]).hex()},
                  {"mailbox": named, "guid": bytes(some.fields[0]).hex()}]
        for case in cases:
            raw = {k: v for k, v in case.items() if k != "guid"}
            if "guid" in case:
                raw["guid"] = bytes.fromhex(case["guid"])
            try:
                want = selection_changeset(full, select(full, **case), None)
            except NoSuchMessage:
                continue
            scoped = state_at(archive, "alice", at, **raw)[1]
            got = selection_changeset(scoped, select(scoped, **case), None)
            assert [i.to_wire() for i in got.items] == [i.to_wire() for i in want.items], case
            assert got.bodies == want.bodies and got.crcs == want.crcs
            # Only mailboxes and the objects of what is restored were decoded.
            assert len(scoped.items) < len(full.items), case
    renamed = state_at(archive, "alice", "point:3", mailbox="Archive/Work")[1]
    assert len([i for i in renamed.items if i.kind == b"R" and not i.removed]) == 13


def test_whole_user_into_a_store_that_has_the_user_appends(source, archive, new_store):
    history(source, archive)
    target = new_store()
    target.create_mailbox("alice", "INBOX")
    target.append("alice", "INBOX", b"Subject: mine\r\n\r\nkeep me\r\n")
    report = restore(archive, "alice", at="point:1", store=target, into="Restored")
    assert report.mode == "append"
    assert {m["name"] for m in report.mailboxes} == {"Restored/INBOX", "Restored/Work",
                                                     "Restored/Old"}
    assert len(target.records("alice", "INBOX")) == 1
    assert len(target.records("alice", "Restored/INBOX")) == 20
    assert set(target.subscriptions("alice")) == {"INBOX", "Work"}
    assert [s.name for s in target.sieve_scripts("alice")] == ["main"]
    # Mailbox ids are new: nothing restored can be taken for the source's mailboxes.
    src_ids = {mb.id for mb in source.mailboxes("alice", include_removed=True)}
    assert not src_ids & {m["id"] for m in report.mailboxes}


def test_restoring_a_user_the_store_has_never_replaces_anything(source, archive):
    history(source, archive)
    count = len(source.records("alice", "Archive/Work"))
    report = restore(archive, "alice", store=source, at="point:5")
    assert report.mode == "append"          # the user exists: never exact
    assert len(source.records("alice", "Archive/Work")) == 2 * count


def test_restore_errors(source, archive, new_store):
    history(source, archive)
    with pytest.raises(NoSuchUser):
        restore(archive, "carol", store=new_store())
    with pytest.raises(NoSuchMailbox, match="mailboxes then"):
        restore(archive, "alice", mailbox="Nope", store=new_store())
    with pytest.raises(NoSuchMessage):
        restore(archive, "alice", mailbox="INBOX", uids=[(500, 600)], store=new_store())
    with pytest.raises(NoSuchMessage):
        restore(archive, "alice", guid="00" * 20, store=new_store())
    with pytest.raises(UsageError):
        restore(archive, "alice", guid="zz", store=new_store())
    with pytest.raises(UsageError):
        restore(archive, "alice", uids=[(1, 2)], store=new_store())
    with pytest.raises(UsageError, match="exactly one target"):
        restore(archive, "alice")


def test_restore_to_maildir_keeps_uids(source, archive, tmp_path):
    snaps = history(source, archive)
    out = tmp_path / "md"
    report = restore(archive, "alice", at="point:2", mailbox="INBOX", maildir=out)
    assert report.messages == len(snaps[1].mailboxes["INBOX"])
    uidlist = (out / "dovecot-uidlist").read_text().splitlines()
    assert [int(line.split()[0]) for line in uidlist[1:]] == \
        [uid for uid, _, _ in snaps[1].mailboxes["INBOX"]]
    files = sorted((out / "cur").iterdir())
    assert {address_of(f.read_bytes()) for f in files} == \
        {a for _, a, _ in snaps[1].mailboxes["INBOX"]}


def test_restore_to_cyrus_uses_csync_push_user(source, archive, monkeypatch):
    history(source, archive)
    calls = []

    def push_user(store, user, host, port, *, authname, password, progress=None):
        calls.append((user, host, port, authname, password,
                      [mb.name for mb in store.mailboxes(user)],
                      store.status(user)["digest"]))
        return types.SimpleNamespace(ok=len(calls) == 1, errors=["refused (test)"])
    monkeypatch.setitem(sys.modules, "engine.csync", types.SimpleNamespace(push_user=push_user))
    report = restore(archive, "alice", at="point:3", csync="cyrus.example.org:2005",
                     authname="admin", password="pw")
    assert report.digest_ok
    (user, host, port, authname, password, _, digest), = calls
    assert (user, host, port, authname, password) == ("alice", "cyrus.example.org", 2005,
                                                      "admin", "pw")
    assert digest == archive.points("alice")[2].digest.hex()
    with pytest.raises(Exception, match="refused"):
        restore(archive, "alice", csync="h:1", authname="a", password="p")
    monkeypatch.setitem(sys.modules, "engine.csync", None)
    with pytest.raises(Exception, match="engine.csync"):
        restore(archive, "alice", csync="h:1")


def test_exact_restore_in_batches(source, archive, new_store, monkeypatch):
    import engine.backup as backup_mod
    snaps = history(source, archive)
    monkeypatch.setattr(backup_mod, "BATCH_BODIES", 3)
    _, cs = state_at(archive, "alice", "point:3")
    assert len(list(split_changeset(cs))) > 5
    target = new_store()
    report = restore(archive, "alice", at="point:3", store=target)
    assert report.digest_ok and target.status("alice")["digest"] == snaps[2].digest


def test_expired_tombstones_at_the_source_make_a_full_point(source, archive, new_store):
    snaps = history(source, archive)
    source.expunge("alice", "Archive/Work", [(1, 2)])
    source.expire_tombstones("alice", source.user_info("alice").modseq + 1)
    r = backup(archive, LocalSource(source))
    assert r.users[0]["full"] is True
    last = snapshot(source, "alice", 6, 0)
    for snap in (snaps[3], last):
        target = new_store()
        restore(archive, "alice", at=f"modseq:{snap.modseq}", store=target)
        assert target.status("alice")["digest"] == snap.digest
    assert verify_archive(archive).ok


class FakeRemote:
    """What engine.client.RemoteSource offers, over a local store (as the server would)."""

    def __init__(self, store):
        self.store = store
        self.closed = False

    def users(self):
        return self.store.users()

    def state(self, user):
        from engine.changeset import state_of
        return state_of(self.store, user)

    def changes(self, user, base):
        from engine.changeset import build
        return build(self.store, user, base), self.store.read_body

    def close(self):
        self.closed = True


def test_backup_from_a_remote_source(source, archive, new_store, monkeypatch):
    made = []

    class RemoteSource(FakeRemote):
        def __init__(self, host, port, *, account, password, tls=None):
            super().__init__(source)
            made.append((host, port, account, password, tls))
    monkeypatch.setitem(sys.modules, "engine.client",
                        types.SimpleNamespace(RemoteSource=RemoteSource))
    from engine.backup import remote_source
    src = remote_source("mail.example.org:2005", account="backup", password="pw")
    assert made == [("mail.example.org", 2005, "backup", "pw", None)]
    remote_source("unix:/run/modsync.sock", account="b", password="p")
    assert made[-1][:2] == ("unix:/run/modsync.sock", None)
    source.create_mailbox("alice", "INBOX")
    source.append_many("alice", "INBOX", [Message(body(i)) for i in range(5)])
    r = backup(archive, src)
    assert r.points == 1 and r.bodies == 5
    source.expunge("alice", "INBOX", [(1, 1)])
    assert backup(archive, src).points == 1
    target = new_store()
    restore(archive, "alice", store=target)
    assert target.status("alice")["digest"] == source.status("alice")["digest"]


def test_a_remote_full_sync_refusal_gives_a_full_point(source, archive, new_store):
    from engine.errors import ModsyncError

    class Refusal(ModsyncError):
        code = "full-sync-needed"

    class Picky(FakeRemote):
        def changes(self, user, base):
            if base:
                raise Refusal("below the horizon")
            return super().changes(user, base)
    source.create_mailbox("alice", "INBOX")
    source.append("alice", "INBOX", body(1))
    backup(archive, Picky(source))
    source.append("alice", "INBOX", body(2))
    r = backup(archive, Picky(source))
    assert r.users[0]["full"] is True
    assert verify_archive(archive).ok


def test_a_remote_sending_bad_bodies_is_refused(source, archive):
    source.create_mailbox("alice", "INBOX")
    source.append("alice", "INBOX", body(1))

    class Liar(FakeRemote):
        def changes(self, user, base):
            cs, _ = super().changes(user, base)
            return cs, lambda a: b"not the body"
    source.create_mailbox("bob", "INBOX")
    source.append("bob", "INBOX", body(2))
    report = backup(archive, Liar(source), ["alice"])
    assert not report.ok and "does not hash" in report.users[0]["error"]
    assert archive.points("alice") == []
    # One failing user does not stop the others.

    class HalfLiar(FakeRemote):
        def changes(self, user, base):
            cs, get = super().changes(user, base)
            return cs, (lambda a: b"bad") if user == "alice" else get
    report = backup(archive, HalfLiar(source))
    assert report.errors == 1 and report.points == 1
    assert [u["user"] for u in report.users if u.get("point")] == ["bob"]
    assert verify_archive(archive).ok


def test_random_histories_restore_exactly(tmp_path):
    """Random operations, a backup every few; every point restores to its digest."""
    from engine import Store
    rng = random.Random(7)
    src = Store.init(tmp_path / "src")
    arc = Archive.create(tmp_path / "arc")
    src.create_mailbox("u", "INBOX")
    snaps = []
    n = 0
    for round_ in range(8):
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            mb = rng.choice([m.name for m in src.mailboxes("u")])
            if op < 0.35:
                src.append_many("u", mb, [Message(body(n + k, rng.randint(50, 3000)))
                                          for k in range(rng.randint(1, 8))])
                n += 10
            elif op < 0.5:
                recs = src.records("u", mb)
                if recs:
                    src.set_flags("u", mb, [(rng.choice(recs).uid,) * 2], ["$x"])
            elif op < 0.65:
                recs = src.records("u", mb)
                if recs:
                    uid = rng.choice(recs).uid
                    src.expunge("u", mb, [(uid, uid)])
            elif op < 0.75:
                src.create_mailbox("u", f"F{round_}{rng.randint(0, 99)}")
            elif op < 0.85 and mb != "INBOX":
                src.delete_mailbox("u", mb)
            elif mb != "INBOX":
                if mb + "x" not in {m.name for m in src.mailboxes("u")}:
                    src.rename_mailbox("u", mb, mb + "x")
        r = backup(arc, LocalSource(src))
        if r.points:
            snaps.append((src.user_info("u").modseq, src.status("u")["digest"]))
    for i, (modseq, digest) in enumerate(snaps):
        t = Store.init(tmp_path / f"t{i}")
        restore(arc, "u", at=f"modseq:{modseq}", store=t)
        assert t.status("u")["digest"] == digest
        t.close()
    assert verify_archive(arc).ok
    assert len(list_points(arc)["users"][0]["points"]) == len(snaps)
