"""User-level replication: a regular account replicates its own mail, and other users'
mailboxes as far as RFC 4314 rights allow, one test per right (engine.acl).

One server holds alice's mailboxes, each with a different ACL entry for
bob; bob pulls what he may read into a store of his own, and each test
pushes one change from a copy of that store.  A refused push must leave
alice's mail on the server exactly as it was.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

import engine.accounts
from engine import Message, Store
from engine.accounts import add_account

from .util import ADMIN, PASSWORD, Served, digest, run_cli

BOB_PW = "bob-secret"
# mailbox of alice -> bob's rights on it
RIGHTS = {
    "INBOX": "lr", "r-only": "r", "l-only": "l", "private": "",
    "s": "lrs", "nos": "lr", "w": "lrw", "now": "lr", "i": "lri", "noi": "lr",
    "te": "lrte", "t-only": "lrt", "e-only": "lre", "k": "lrk", "nok": "lr",
    "x": "lrx", "nox": "lr", "a": "lra", "noa": "lr",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import os
    saved = engine.accounts.SCRYPT_N
    engine.accounts.SCRYPT_N = 1 << 10
    tmp = tmp_path_factory.mktemp("acl")
    root = Path(tempfile.mkdtemp(prefix="modsync-service-acl-",
                                 dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp))
    server_store = root / "server"
    with Store.init(server_store) as s:
        add_account(s, ADMIN, PASSWORD, admin=True)
        add_account(s, "bob", BOB_PW)
        for name, rights in RIGHTS.items():
            s.create_mailbox("alice", name)
            s.append_many("alice", name, [Message(f"Subject: {name} {i}\r\n\r\nx\r\n".encode())
                                          for i in range(2)])
            if rights:
                s.set_acl("alice", name, "bob", rights)
        s.create_mailbox("alice", "x/child")
        s.set_acl("alice", "x/child", "bob", "lrx")
        s.subscribe("alice", "INBOX")
        s.create_mailbox("bob", "INBOX")
        s.create_mailbox("carol", "INBOX")
        s.set_acl("carol", "INBOX", "bob", "l")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODSYNC_")}
    env["MODSYNC_CONFIG"] = os.devnull
    (tmp / "logs").mkdir()
    srv = Served(server_store, [], env, tmp / "logs")
    pw = tmp / "bob.pw"
    pw.write_text(BOB_PW + "\n")
    bob0 = root / "bob0"
    with Store.init(bob0):
        pass
    r = run_cli("pull", "--store", bob0, "--from", srv.address, "--account", "bob",
                "--password-file", pw, "-u", "alice", "--json")
    assert r.code == 0, r.out + r.err
    yield {"srv": srv, "server": server_store, "bob0": bob0, "pw": pw, "root": root}
    srv.kill()
    shutil.rmtree(root, ignore_errors=True)
    engine.accounts.SCRYPT_N = saved


def bob_copy(world, name: str) -> Path:
    """A store of bob's with what he may read of alice (its own store id: never a copy)."""
    dst = world["root"] / f"bob-{name}"
    Store.init(dst).close()
    r = run_cli("pull", "--store", dst, "--from", world["srv"].address, "--account", "bob",
                "--password-file", world["pw"], "-u", "alice")
    assert r.code == 0, r.out + r.err
    return dst


def push_as_bob(world, store: Path, user: str = "alice"):
    return run_cli("push", "--store", store, "--to", world["srv"].address, "--account", "bob",
                   "--password-file", world["pw"], "-u", user, "--json")


def attempt(world, name: str, change, *, ok: bool, right: str = ""):
    """Make ``change(store)`` in a copy of bob's store and push it; check the outcome."""
    store = bob_copy(world, name)
    with Store.open(store) as s:
        change(s)
    before = digest(world["server"], "alice")
    r = push_as_bob(world, store)
    (u,) = r.json["users"]
    if ok:
        assert r.code == 0 and u["status"] == "sent", u
        assert digest(world["server"], "alice") != before
    else:
        assert r.code == 1 and u["status"] == "error", u
        assert u["detail"].startswith("acl:"), u
        assert f"does not grant {right!r}" in u["detail"] or right in u["detail"], u
        assert digest(world["server"], "alice") == before     # nothing was applied
    return r


def server_records(world, mailbox: str):
    with Store.open(world["server"]) as s:
        return s.records("alice", mailbox)


# -- reading: l and r --------------------------------------------------------------------
def test_pull_needs_l_and_r(world):
    with Store.open(world["bob0"]) as s:
        names = {m.name for m in s.mailboxes("alice")}
        assert not s.subscriptions("alice")          # another user's subscriptions: no
    readable = {n for n, r in RIGHTS.items() if set("lr") <= set(r)} | {"x/child"}
    assert names == readable
    assert {"r-only", "l-only", "private"}.isdisjoint(names)


def test_pull_with_only_l_is_refused_with_a_clear_error(world, tmp_path):
    store = tmp_path / "b"
    Store.init(store).close()
    r = run_cli("pull", "--store", store, "--from", world["srv"].address, "--account", "bob",
                "--password-file", world["pw"], "-u", "carol", "--json")
    assert r.code == 1
    (u,) = r.json["users"]
    assert u["status"] == "error" and "'l' and 'r'" in u["detail"]
    with Store.open(store) as s:
        assert "carol" not in s.users()


def test_own_mail_needs_no_acl(world, tmp_path):
    store = tmp_path / "own"
    Store.init(store).close()
    base = ["--from", world["srv"].address, "--account", "bob", "--password-file", world["pw"]]
    assert run_cli("pull", "--store", store, *base).code == 0      # LISTUSERS: bob only
    with Store.open(store) as s:
        assert s.users() == ["bob"]
        s.append("bob", "INBOX", b"Subject: mine\r\n\r\n")
        s.subscribe("bob", "INBOX")
    r = push_as_bob(world, store, "bob")
    assert r.code == 0
    assert digest(world["server"], "bob") == digest(store, "bob")


# -- flags: s, w, t -------------------------------------------------------------------------
def test_seen_needs_s(world):
    attempt(world, "s", lambda s: s.set_flags("alice", "s", [(1, 1)], ["\\Seen"]), ok=True)
    assert server_records(world, "s")[0].flags == ("\\Seen",)
    attempt(world, "nos", lambda s: s.set_flags("alice", "nos", [(1, 1)], ["\\Seen"]),
            ok=False, right="s")


def test_other_flags_need_w(world):
    attempt(world, "w", lambda s: s.set_flags("alice", "w", [(1, 1)], ["$Junk", "\\Flagged"]),
            ok=True)
    attempt(world, "now", lambda s: s.set_flags("alice", "now", [(1, 1)], ["$Junk"]),
            ok=False, right="w")
    # \Seen alone does not need w, but w does not give \Seen either.
    attempt(world, "w-seen", lambda s: s.set_flags("alice", "w", [(2, 2)], ["\\Seen"]),
            ok=False, right="s")


def test_deleted_flag_needs_t(world):
    attempt(world, "t-flag", lambda s: s.set_flags("alice", "t-only", [(1, 1)], ["\\Deleted"]),
            ok=True)
    attempt(world, "not-flag", lambda s: s.set_flags("alice", "nos", [(2, 2)], ["\\Deleted"]),
            ok=False, right="t")


# -- append: i ---------------------------------------------------------------------------
def test_append_needs_i(world):
    n = len(server_records(world, "i"))
    attempt(world, "i", lambda s: s.append("alice", "i", b"Subject: from bob\r\n\r\n"), ok=True)
    assert len(server_records(world, "i")) == n + 1
    attempt(world, "noi", lambda s: s.append("alice", "noi", b"Subject: no\r\n\r\n"),
            ok=False, right="i")


# -- expunge: t and e ------------------------------------------------------------------------
def test_expunge_needs_t_and_e(world):
    attempt(world, "te", lambda s: s.expunge("alice", "te", [(1, 1)]), ok=True)
    assert [r.uid for r in server_records(world, "te")] == [2]
    attempt(world, "t-only", lambda s: s.expunge("alice", "t-only", [(2, 2)]), ok=False,
            right="e")
    attempt(world, "e-only", lambda s: s.expunge("alice", "e-only", [(1, 1)]), ok=False,
            right="t")


# -- mailboxes: k and x ----------------------------------------------------------------------
def test_create_needs_k_on_the_parent(world):
    attempt(world, "k", lambda s: s.create_mailbox("alice", "k/new"), ok=True)
    with Store.open(world["server"]) as s:
        assert "k/new" in [m.name for m in s.mailboxes("alice")]
    attempt(world, "nok", lambda s: s.create_mailbox("alice", "nok/new"), ok=False, right="k")
    attempt(world, "top", lambda s: s.create_mailbox("alice", "Top"), ok=False, right="k")


def test_delete_needs_x(world):
    attempt(world, "x", lambda s: s.delete_mailbox("alice", "x/child"), ok=True)
    with Store.open(world["server"]) as s:
        assert "x/child" not in [m.name for m in s.mailboxes("alice")]
    attempt(world, "nox", lambda s: s.delete_mailbox("alice", "nox"), ok=False, right="x")


def test_acl_changes_need_a(world):
    attempt(world, "a", lambda s: s.set_acl("alice", "a", "dave", "lr"), ok=True)
    attempt(world, "noa", lambda s: s.set_acl("alice", "noa", "dave", "lr"), ok=False,
            right="a")


def test_anything_else_is_refused(world):
    attempt(world, "sub", lambda s: s.subscribe("alice", "s"), ok=False, right="")
    attempt(world, "sieve", lambda s: s.sieve_put("alice", "evil", b"discard;"), ok=False,
            right="")


# -- a mailbox that becomes readable later (or stops being readable) ---------------------
def _records(store: Path, owner: str, mailbox: str):
    with Store.open(store) as s:
        if owner not in s.users() or mailbox not in [m.name for m in s.mailboxes(owner)]:
            return None
        return [(r.uid, r.address, r.flags) for r in s.records(owner, mailbox)]


def test_a_mailbox_readable_later_is_sent_whole_by_an_incremental_pull(world, tmp_path):
    owner = "erin"
    with Store.open(world["server"]) as s:
        for name in ("INBOX", "later", "revoked"):
            s.create_mailbox(owner, name)
            s.append_many(owner, name, [Message(f"Subject: {name} {i}\r\n\r\n".encode())
                                        for i in range(3)])
        s.set_acl(owner, "INBOX", "bob", "lr")
        s.set_acl(owner, "revoked", "bob", "lr")
    store = tmp_path / "bob"
    Store.init(store).close()

    def pull():
        r = run_cli("pull", "--store", store, "--from", world["srv"].address, "--account",
                    "bob", "--password-file", world["pw"], "-u", owner, "--json")
        assert r.code == 0, r.out + r.err
    pull()
    assert _records(store, owner, "later") is None
    assert len(_records(store, owner, "revoked")) == 3
    # Readable later: its older messages come too, not only what changed since.
    with Store.open(world["server"]) as s:
        s.set_acl(owner, "later", "anyone", "lr")
        s.append(owner, "INBOX", b"Subject: new\r\n\r\n")
    pull()
    assert _records(store, owner, "later") == _records(world["server"], owner, "later")
    assert len(_records(store, owner, "INBOX")) == 4
    # No longer readable: nothing of it comes any more, and the pull still works.
    with Store.open(world["server"]) as s:
        s.set_acl(owner, "revoked", "bob", None)
        s.append(owner, "revoked", b"Subject: secret\r\n\r\n")
        s.expunge(owner, "revoked", [(1, 1)])
        s.set_flags(owner, "later", [(2, 2)], ["\\Flagged"])
    pull()
    assert len(_records(store, owner, "revoked")) == 3          # as bob last saw it
    assert _records(store, owner, "later") == _records(world["server"], owner, "later")
    # Readable again: whole again, which brings bob's copy up to date.
    with Store.open(world["server"]) as s:
        s.set_acl(owner, "revoked", "bob", "lrs")
    pull()
    assert _records(store, owner, "revoked") == _records(world["server"], owner, "revoked")
    with Store.open(store) as mine, Store.open(world["server"]) as theirs:
        crc = {m.name: m.crc for m in theirs.mailboxes(owner)}
        assert {m.name: m.crc for m in mine.mailboxes(owner)} == {
            n: c for n, c in crc.items() if n != "private"}
    # A right that only takes 'r' away (a negative entry) hides it again.
    with Store.open(world["server"]) as s:
        s.set_acl(owner, "later", "-bob", "r")
        s.append(owner, "later", b"Subject: hidden\r\n\r\n")
    pull()
    assert len(_records(store, owner, "later")) == 3


def test_a_counter_change_set_shows_only_what_the_account_may_read(world):
    """A push refused for its base (base-unknown) is answered with the server's changes:
    for an account that sees part of the user, only that part."""
    from engine.changeset import build, state_of
    from engine.client import Client
    store = bob_copy(world, "counter")
    with Store.open(world["server"]) as s:
        s.append("alice", "private", b"Subject: not for bob\r\n\r\n")
        s.append("alice", "INBOX", b"Subject: for bob\r\n\r\n")
        ids = {m.name: m.id for m in s.mailboxes("alice")}
    with Store.open(store) as s, \
            Client(world["srv"].address, account="bob", password=BOB_PW) as c:
        base = state_of(s, "alice")
        s.set_flags("alice", "s", [(2, 2)], ["\\Seen"])
        cs = build(s, "alice", base)
        cs.base = {**base, "ab" * 16: 7}           # a state the server never had
        reply = c.push(cs, s.read_body, read_packed=s.read_packed)
        try:
            assert reply.result.status == "rejected" and reply.result.code == "base-unknown"
            seen = {i.ident[0] for i in reply.counter.items}
            assert ids["INBOX"] in seen and ids["private"] not in seen
            assert not any(i.kind == b"S" for i in reply.counter.items)   # subscriptions
        finally:
            reply.close()
