"""modsync's replica state machine answers real Cyrus sessions the way Cyrus did.

The transcripts in tests/data/cyrus-transcripts are real sync_client ->
sync_server sessions between two Cyrus 3.6.1 servers.  Replaying each
client line into :class:`ReplicaSession` over one modsync store, in the
order the scenarios ran, must give answers *byte-identical* to Cyrus's:
the same MAILBOX kvlists (modseqs, CRCs, ACL strings, annotations), the
same QUOTA, LSUB, MISSING and ENABLED lines, the same status lines,
including the checksum failures of the divergent-replica scenario.
"""
from __future__ import annotations

import base64
import hashlib

import pytest

from dlist import File, KvList, Line, List, print_line
from engine import Store
from engine.accounts import add_account
from engine.csync.replica import ReplicaSession
from engine.model import normalize_flags

import replay


def _bytes(lines) -> list[bytes]:
    return [print_line(x, "server") for x in lines]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Every transcript of the chain replayed in order into one store: {name: exchanges}."""
    store = Store.init(tmp_path_factory.mktemp("replay") / "store")
    add_account(store, "repl", "replpw", admin=True)
    out = {}
    for name in replay.CHAIN:
        if name.startswith("09-"):
            # On the Cyrus replica, before 09: STORE 1 +FLAGS (\Deleted replica_only_kw)
            # over IMAP at 1795284751.  The same change, made in modsync:
            def behind_the_masters_back(m):
                mb = m.mailbox_by_name("INBOX")
                r = m.record(mb, 1)
                old = r.copy()
                r.flags = normalize_flags(r.flags + ("\\Deleted", "replica_only_kw"))
                m.put_record(mb, r, old, last_updated=1795284751)
            store.mutate("test", behind_the_masters_back)
        out[name] = replay.replay(store, name)
    yield store, out
    store.close()


@pytest.mark.parametrize("name", replay.CHAIN)
def test_every_answer_is_byte_identical_to_cyrus(chain, name):
    _, results = chain
    exchanges = results[name]
    assert exchanges, "no commands replayed"
    for ex in exchanges:
        assert _bytes(ex.modsync) == _bytes(ex.cyrus), replay.describe(ex)


def test_the_replayed_store_holds_the_users_mail(chain):
    store, _ = chain
    names = {m.name for m in store.mailboxes("test")}
    assert names == {"INBOX", "Archive", "Archive/Y2024", "Lists", "Lists/cyrus.devel",
                     "Projects", "Sent"}
    # delayed delete of Entwürfe: a modsync tombstone
    gone = {m.name for m in store.mailboxes("test", include_removed=True) if m.stamp.removed}
    assert gone == {"Entwürfe"}
    inbox = {r.uid: r for r in store.records("test", "INBOX", include_expunged=True)}
    assert inbox[5].expunged and not inbox[1].expunged
    assert "replica_only_kw" in inbox[1].flags          # the master adopted it (09)
    assert inbox[2].annotations == (("/comment", "test", b"per-message note"),)
    assert store.subscriptions("test") == ["Archive/2024", "INBOX", "Lists/cyrus.devel",
                                           "Projects"]
    [script] = store.sieve_scripts("test")
    assert script.name == "vacation" and script.active
    assert store.quota("test")[0]["limits"] == {"STORAGE": 200000}
    assert store.acl("test", "Lists/cyrus.devel") == {"test": "lrswipkxtecdan", "other": "lrsw"}
    assert store.mailbox("test", "Sent").specialuse == ("\\Sent",)
    seen = store.seen_sets("other")
    assert [(s.mailbox_id, s.uids) for s in seen] == [("0jgr96w5rrddwd45tprkaxmn", "2:7")]
    # user third was created, then deleted (13a, 13b)
    assert store.mailboxes("third") == []


def test_bodies_are_stored_once_and_verified(chain):
    store, _ = chain
    inbox = store.records("test", "INBOX")
    archive = store.records("test", "Archive")
    assert archive[0].address == inbox[0].address       # the COPY of 06
    for r in inbox:
        assert hashlib.sha1(store.read_body(r.address)).digest() == r.sha1


# -- the session's own rules, command by command --------------------------------------------------

@pytest.fixture
def session(store):
    add_account(store, "repl", "replpw", admin=True)
    s = ReplicaSession(store, "replica.test")
    r = s.handle(Line("AUTHENTICATE", text=b"PLAIN " + base64.b64encode(b"\0repl\0replpw")))
    assert r.status.text == b"Success (no protection)"
    yield s
    # Ends the session as EXIT would: its body writer finishes before the store closes.
    s.close()


def status(reply) -> str:
    return print_line(reply.status, "server").decode().rstrip()


def apply(s, key, value):
    return s.handle(Line("APPLY", key, value))


def get(s, key, value):
    return s.handle(Line("GET", key, value))


def _mailbox(uid_list=(), **kw):
    fields = dict(UNIQUEID="u0000000000000000000001", MBOXNAME="user.t", SYNC_CRC=0,
                  SYNC_CRC_ANNOT=0, LAST_UID=0, HIGHESTMODSEQ=1, RECENTUID=0, RECENTTIME=0,
                  LAST_APPENDDATE=0, POP3_LAST_LOGIN=0, POP3_SHOW_AFTER=0,
                  UIDVALIDITY=1700000000, PARTITION="default", ACL="t\tlrswipkxtecdan\t",
                  OPTIONS="P")
    fields.update(kw)
    fields["RECORD"] = List(uid_list)
    return KvList(fields)


def _record(uid, modseq, guid, flags=(), expunged=False):
    from dlist import Atom, Flag
    fl = [Flag(f) if f.startswith("\\") else Atom(f) for f in flags]
    if expunged:
        fl.append(Flag("\\Expunged"))
    return KvList(UID=uid, MODSEQ=modseq, LAST_UPDATED=1700000000, FLAGS=List(fl),
                  INTERNALDATE=1700000000, SIZE=10, GUID=guid)


def _upload(s, body: bytes) -> str:
    guid = hashlib.sha1(body).hexdigest()
    assert status(apply(s, "MESSAGE", List([File("default", guid, body=body)]))) == "OK success"
    return guid


def test_before_authentication_only_session_commands_work(store):
    s = ReplicaSession(store)
    assert [print_line(x, "server") for x in s.banner()][-1].startswith(b"* OK ")
    assert status(s.handle(Line("NOOP"))) == "OK Noop completed"
    assert status(get(s, "USER", "x")) == "NO Please authenticate first"
    assert status(s.handle(Line("RESTART"))) == "OK Restarting"
    r = s.handle(Line("EXIT"))
    assert status(r) == "OK Finished" and r.close


def test_bad_password_and_non_admin(store):
    add_account(store, "repl", "replpw", admin=True)
    add_account(store, "joe", "joepw")
    s = ReplicaSession(store)
    r = s.handle(Line("AUTHENTICATE", text=b"PLAIN " + base64.b64encode(b"\0repl\0wrong")))
    assert status(r) == "NO authentication failure"
    r = s.handle(Line("AUTHENTICATE", text=b"PLAIN " + base64.b64encode(b"\0joe\0joepw")))
    assert status(r).startswith("OK")
    assert status(get(s, "USER", "x")) == "NO Permission denied"


def test_authenticate_with_a_continuation(store):
    add_account(store, "repl", "replpw", admin=True)
    s = ReplicaSession(store)
    r = s.handle(Line("AUTHENTICATE", text=b"PLAIN"))
    assert print_line(r.status, "server") == b"+ \r\n"
    r = s.handle(Line(base64.b64encode(b"\0repl\0replpw").decode()))
    assert status(r) == "OK Success (no protection)"


def test_imap_probe_gets_a_tagged_answer(store):
    s = ReplicaSession(store)
    r = s.handle(Line("C01", text=b"CAPABILITY"))
    assert status(r).startswith("C01 BAD")


def test_compress_and_capabilities(session):
    r = session.handle(Line("COMPRESS", text=b"DEFLATE"))
    assert status(r) == "OK DEFLATE active" and r.start_compress
    assert status(session.handle(Line("COMPRESS", text=b"DEFLATE"))).startswith(
        "NO Compression already active")
    r = apply(session, "CAPABILITIES", List(["SIEVE-MAILBOX", "OTHER"]))
    assert _bytes(r.all()) == [b"* ENABLED (SIEVE-MAILBOX)\r\n", b"OK success\r\n"]


def test_unknown_commands(session):
    assert status(session.handle(Line("FROB"))) == "BAD IMAP_PROTOCOL_ERROR Unrecognized command"
    assert status(apply(session, "FROB", "x")) == "NO IMAP_PROTOCOL_ERROR Protocol error"
    assert status(get(session, "FROB", "x")) == "NO IMAP_PROTOCOL_ERROR Protocol error"


def test_get_user_of_an_unknown_user_is_just_ok(session):
    assert _bytes(get(session, "USER", "nobody").all()) == [b"OK success\r\n"]


def test_missing_required_keys_are_bad_parameters(session):
    r = apply(session, "MAILBOX", KvList(UNIQUEID="x", MBOXNAME="user.t"))
    assert status(r).startswith("NO IMAP_PROTOCOL_BAD_PARAMETERS ")


def test_reserve_reports_only_missing_guids(session):
    have = _upload(session, b"Subject: a\r\n\r\nx\r\n")
    lack = "0123456789abcdef0123456789abcdef01234567"
    r = apply(session, "RESERVE", KvList(PARTITION="default", MBOXNAME=List(["user.t"]),
                                          GUID=List([have, lack])))
    assert _bytes(r.all()) == [f"* MISSING ({lack})\r\n".encode(), b"OK success\r\n"]


def test_legality_rules(session):
    """Cyrus's §5 rules, with its exact NO codes."""
    g1 = _upload(session, b"Subject: 1\r\n\r\none\r\n")
    g2 = _upload(session, b"Subject: 2\r\n\r\ntwo\r\n")
    assert status(apply(session, "MAILBOX", _mailbox(
        [_record(1, 2, g1), _record(2, 3, g2)], LAST_UID=2, HIGHESTMODSEQ=3))) == "OK success"
    # SINCE_MODSEQ that is not ours
    assert status(apply(session, "MAILBOX", _mailbox(
        [], LAST_UID=2, HIGHESTMODSEQ=4, SINCE_MODSEQ=2, SINCE_CRC=0,
        SINCE_CRC_ANNOT=0))) == "NO IMAP_SYNC_CHANGED Changed since last sync"
    # lower HIGHESTMODSEQ, UIDVALIDITY or LAST_UID than ours
    for kw in (dict(LAST_UID=2, HIGHESTMODSEQ=2), dict(LAST_UID=1, HIGHESTMODSEQ=5),
               dict(LAST_UID=2, HIGHESTMODSEQ=5, UIDVALIDITY=1600000000)):
        assert status(apply(session, "MAILBOX", _mailbox([], **kw))) == \
            "NO IMAP_SYNC_CHECKSUM Checksum Failure", kw
    # another message under a UID we hold
    assert status(apply(session, "MAILBOX", _mailbox(
        [_record(1, 5, g2)], LAST_UID=2, HIGHESTMODSEQ=5))) == "NO IMAP_SYNC_CHECKSUM Checksum Failure"
    # an older version of a record than ours
    assert status(apply(session, "MAILBOX", _mailbox(
        [_record(2, 1, g2)], LAST_UID=2, HIGHESTMODSEQ=5))) == "NO IMAP_SYNC_CHECKSUM Checksum Failure"
    g3 = _upload(session, b"Subject: 3\r\n\r\nthree\r\n")
    assert status(apply(session, "MAILBOX", _mailbox(
        [_record(3, 6, g3)], LAST_UID=3, HIGHESTMODSEQ=6))) == "OK success"
    # expunge 3, then try to bring it back
    assert status(apply(session, "MAILBOX", _mailbox(
        [_record(3, 7, g3, expunged=True)], LAST_UID=3, HIGHESTMODSEQ=7))) == "OK success"
    assert status(apply(session, "MAILBOX", _mailbox(
        [_record(3, 8, g3)], LAST_UID=3, HIGHESTMODSEQ=8))) == "NO IMAP_SYNC_CHECKSUM Checksum Failure"
    # a different unique id under our name, with mail in it
    assert status(apply(session, "MAILBOX", _mailbox(
        [], UNIQUEID="other00000000000000000001", LAST_UID=3, HIGHESTMODSEQ=9))) == \
        "NO IMAP_MAILBOX_MOVED Mailbox exists with another name or uniqueid"
    # records out of UID order
    assert status(apply(session, "MAILBOX", _mailbox(
        [_record(2, 9, g2), _record(1, 9, g1)], LAST_UID=3, HIGHESTMODSEQ=9))) == \
        "NO IMAP_PROTOCOL_ERROR Protocol error"
    # a wrong SYNC_CRC is reported after the changes are committed
    assert status(apply(session, "MAILBOX", _mailbox(
        [_record(1, 10, g1, flags=["\\Seen"])], LAST_UID=3, HIGHESTMODSEQ=10,
        SYNC_CRC=12345))) == "NO IMAP_SYNC_CHECKSUM Checksum Failure"
    assert session.store.records("t", "INBOX")[0].flags == ("\\Seen",)


def test_force_replaces_a_mailbox_with_another_uniqueid(session):
    g1 = _upload(session, b"Subject: 1\r\n\r\none\r\n")
    apply(session, "MAILBOX", _mailbox([_record(1, 2, g1)], LAST_UID=1, HIGHESTMODSEQ=2))
    assert status(apply(session, "FORCE", KvList())) == "OK success"
    r = apply(session, "MAILBOX", _mailbox([], UNIQUEID="new000000000000000000001",
                                           HIGHESTMODSEQ=1))
    assert status(r) == "OK success"
    assert session.store.mailbox("t", "INBOX").id == "new000000000000000000001"


def test_expunge_and_fetch(session):
    g1 = _upload(session, b"Subject: 1\r\n\r\none\r\n")
    apply(session, "MAILBOX", _mailbox([_record(1, 2, g1)], LAST_UID=1, HIGHESTMODSEQ=2))
    r = get(session, "FETCH", KvList(MBOXNAME="user.t", PARTITION="default",
                                     UNIQUEID="u0000000000000000000001", GUID=g1, UID=1))
    assert _bytes(r.all())[0].endswith(b"Subject: 1\r\n\r\none\r\n\r\n")
    r = apply(session, "EXPUNGE", KvList(MBOXNAME="user.t", UNIQUEID="wrong", UID=List([1])))
    assert status(r).startswith("NO IMAP_MAILBOX_MOVED ")
    r = apply(session, "EXPUNGE", KvList(MBOXNAME="user.t", UNIQUEID="u0000000000000000000001",
                                         UID=List([1])))
    assert status(r) == "OK success"
    assert session.store.records("t", "INBOX") == []
    full = get(session, "FULLMAILBOX", "user.t")
    assert b"\\Expunged" in _bytes(full.all())[0]


def test_sieve_commands_without_sieve_mailbox(session):
    assert status(apply(session, "SIEVE", KvList(USERID="t", FILENAME="main.script",
                                                 LAST_UPDATE=1700000000,
                                                 CONTENT="keep;\r\n"))) == "OK success"
    assert status(apply(session, "ACTIVATE_SIEVE", KvList(USERID="t", FILENAME="main.bc"))) == \
        "OK success"
    [s] = session.store.sieve_scripts("t")
    assert s.name == "main" and s.active
    meta = _bytes(get(session, "META", "t").all())
    assert any(b"FILENAME main.script" in x for x in meta)
    assert any(b"FILENAME main.bc" in x and b"ISACTIVE 1" in x for x in meta)
    r = get(session, "FETCH_SIEVE", KvList(USERID="t", FILENAME="main.script"))
    assert b"CONTENT" in _bytes(r.all())[0]
    assert status(apply(session, "UNACTIVATE_SIEVE", KvList(USERID="t"))) == "OK success"
    assert status(apply(session, "UNSIEVE", KvList(USERID="t", FILENAME="main.script"))) == \
        "OK success"
    assert session.store.sieve_scripts("t") == []
