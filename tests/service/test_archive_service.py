"""Backups into archives a real `modsync serve --archives DIR` holds (engine.archive_service).

An account made --append-only may add points and nothing else: its compact
and rewrite requests are refused and leave the archive's files byte for
byte as they were; an admin account may compact; a wrong password or a
plain user account gets nowhere.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from engine import Message, Store
from engine import archive_protocol as A
from engine import protocol as P
from engine.archive_client import RemoteArchive, parse_url
from engine.backup import RetentionPolicy
from engine.changeset import build, state_of
from engine.client import Client, RemoteError
from engine.errors import EXIT_ERROR, EXIT_USAGE, UsageError

from .util import ADMIN, PASSWORD, digest

PUSHER, PUSHER_PW = "mail1", "pusher-secret"
ALICE_PW = "alice-secret"


def mail(path: Path, start: int, n: int, box: str = "INBOX") -> None:
    with Store.open(path) as s:
        if "alice" not in s.users() or box not in [m.name for m in s.mailboxes("alice")]:
            s.create_mailbox("alice", box)
        s.append_many("alice", box, [Message(
            b"Subject: m%d\r\nMessage-ID: <%d@example.org>\r\n\r\n" % (i, i) + b"body %d\r\n" % i
            * (5 + i % 40), ("\\Seen",) if i % 3 else ()) for i in range(start, start + n)])


def files(archive: Path) -> dict[str, str]:
    """Every file of an archive but the lock files, by path: blake2 of its bytes."""
    return {str(p.relative_to(archive)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for p in sorted(archive.rglob("*"))
            if p.is_file() and p.name not in ("lock", "lock.mdb")}


@pytest.fixture
def backup_host(new_store, serve, root, tmp_path):
    """A `modsync serve --archives` with an admin, an append-only and a plain account;
    the password files; a mail store with alice's mail."""
    store = new_store("backup-host", accounts=[(PUSHER, PUSHER_PW, {"append_only": True}),
                                               ("alice", ALICE_PW, {})])
    archives = root / "archives"
    archives.mkdir()
    srv = serve(store, "--archives", archives)
    pw = {}
    for name, secret in ((ADMIN, PASSWORD), (PUSHER, PUSHER_PW), ("alice", ALICE_PW),
                         ("wrong", "not-the-password")):
        pw[name] = tmp_path / f"{name}.pw"
        pw[name].write_text(secret + "\n")
    source = root / "mail"
    Store.init(source).close()
    mail(source, 1, 30)
    mail(source, 100, 5, box="Work")
    return srv, archives, pw, source


def login(pw: dict, account: str, password_of: str | None = None) -> list:
    return ["--account", account, "--password-file", pw[password_of or account]]


def test_an_append_only_account_backs_up_incrementally_and_the_archive_restores(
        backup_host, cli, root):
    srv, archives, pw, source = backup_host
    url = f"modsync://{srv.address}/main"
    r = cli("backup", "--store", source, "--to", url, *login(pw, PUSHER), "--json")
    assert r.code == 0, r.err
    assert r.json["created"] and r.json["archive"] == url and r.json["bodies"] == 35
    (u,) = r.json["users"]
    assert u["point"] == 1 and u["full"] and u["new_bodies"] == 35
    first = digest(source, "alice")
    with Store.open(source) as s:
        s.set_flags("alice", "INBOX", [(1, 4)], ["\\Flagged"])
        s.expunge("alice", "INBOX", [(5, 6)])
        s.rename_mailbox("alice", "Work", "Archive/Work")
    mail(source, 200, 3)
    r = cli("backup", "--store", source, "--to", url, *login(pw, PUSHER), "--json")
    assert r.code == 0, r.err
    (u,) = r.json["users"]
    assert u["point"] == 2 and not u["full"] and u["new_bodies"] == 3
    assert not r.json["created"]
    second = digest(source, "alice")
    assert first != second
    # Nothing changed: no point, and nothing sent but the question.
    r = cli("backup", "--store", source, "--to", url, *login(pw, PUSHER), "--json")
    assert r.code == 0 and r.json["users"] == [{"user": "alice", "point": None,
                                                "unchanged": True}]
    r = cli("backup", "list", "--archive", url, *login(pw, PUSHER), "--json")
    assert r.code == 0, r.err
    assert r.json["append_only"] and not r.json["locked"]
    assert [p["point"] for p in r.json["users"][0]["points"]] == [1, 2]
    # The archive is an ordinary archive on the backup host: it verifies and
    # every point restores to the source's digest then.
    assert cli("verify", "--archive", archives / "main").code == 0
    for point, want in ((1, first), (2, second)):
        target = root / f"restored-{point}"
        assert cli("init", "--store", target).code == 0
        r = cli("restore", "--archive", archives / "main", "-u", "alice", "--at",
                f"point:{point}", "--store", target, "--json")
        assert r.code == 0, r.err
        assert r.json["digest_ok"] and digest(target, "alice") == want
    assert "point 2 of alice" in srv.log()


def test_an_append_only_account_can_neither_compact_nor_rewrite(backup_host, cli):
    srv, archives, pw, source = backup_host
    url = f"modsync://{srv.address}/main"
    assert cli("backup", "--store", source, "--to", url, *login(pw, PUSHER)).code == 0
    with Store.open(source) as s:
        base = state_of(s, "alice")
        s.set_flags("alice", "INBOX", [(1, 30)], ["$x"])
    assert cli("backup", "--store", source, "--to", url, *login(pw, PUSHER)).code == 0
    before = files(archives / "main")

    for extra in ([], ["-u", "alice"], ["--keep-days", "0"], ["--repack-unused", "0"]):
        r = cli("compact", "--archive", url, "--keep-last", "1", *extra, *login(pw, PUSHER),
                "--json")
        assert r.code == EXIT_ERROR and r.json["error"] == "append-only", r.out
        assert f"account '{PUSHER}' is append-only" in r.json["message"]
    # A dry run only reads: allowed, and it says what an admin would drop.
    r = cli("compact", "--archive", url, "--keep-last", "1", "--dry-run", *login(pw, PUSHER),
            "--json")
    assert r.code == 0 and r.json["points_dropped"] == 1
    with RemoteArchive(url, account=PUSHER, password=PUSHER_PW) as remote:
        assert remote.append_only
        # Compaction asked for directly, with an admin key the archive does not have.
        with pytest.raises(RemoteError) as e:
            remote.compact(RetentionPolicy(keep_last=1), admin_key=b"k" * 32)
        assert e.value.code == "append-only"
        # Rewriting history: point 2 again, from point 1's state.  Refused (for
        # every account): a point only ever continues the last one.
        with Store.open(source, readonly=True) as s:
            cs = build(s, "alice", base)
            bodies = s.read_body
            with pytest.raises(RemoteError) as e:
                remote.add_point("alice", cs, base=base, modseq=1, get_body=bodies,
                                 checked=True)
        assert e.value.code == "does-not-continue"
        # A body that is not what its address says: refused, nothing kept.
        with Store.open(source) as s:
            s.append("alice", "INBOX", b"Subject: new\r\n\r\nnew\r\n")
            last = remote.last_state("alice")
            cs = build(s, "alice", last)
        with pytest.raises(RemoteError) as e:
            remote.add_point("alice", cs, base=last, modseq=2, get_body=lambda a: b"forged",
                             checked=True)
        assert "does not hash" in str(e.value)
        # The connection carries on after every refusal.
        assert remote.last_state("alice") == last
    assert files(archives / "main") == before
    assert cli("verify", "--archive", archives / "main").code == 0
    assert "refused ArchiveCompact" in srv.log()


def test_an_admin_account_may_compact(backup_host, cli, root):
    srv, archives, pw, source = backup_host
    url = f"modsync://{srv.address}/main"
    for i in range(3):
        mail(source, 300 + i, 1)
        assert cli("backup", "--store", source, "--to", url, *login(pw, PUSHER)).code == 0
    last = digest(source, "alice")
    r = cli("compact", "--archive", url, "--keep-last", "1", *login(pw, ADMIN), "--json")
    assert r.code == 0, r.err
    assert r.json["points_dropped"] == 2 and r.json["archive"] == url
    assert r.json["policy"] == {"keep_last": 1}
    r = cli("backup", "list", "--archive", url, *login(pw, ADMIN), "--json")
    assert [p["point"] for p in r.json["users"][0]["points"]] == [3]
    assert not r.json["append_only"]
    assert cli("verify", "--archive", archives / "main").code == 0
    target = root / "restored"
    cli("init", "--store", target)
    assert cli("restore", "--archive", archives / "main", "-u", "alice", "--store",
               target).code == 0
    assert digest(target, "alice") == last


def test_a_locked_archive_needs_its_key_even_from_an_admin(backup_host, cli, tmp_path):
    srv, archives, pw, source = backup_host
    key = tmp_path / "admin.key"
    assert cli("backup", "--store", source, "--to", archives / "locked", "--admin-key-file",
               key).code == 0
    mail(source, 400, 1)
    url = f"modsync://{srv.address}/locked"
    assert cli("backup", "--store", source, "--to", url, *login(pw, ADMIN)).code == 0
    r = cli("compact", "--archive", url, "--keep-last", "1", *login(pw, ADMIN), "--json")
    assert r.code == EXIT_ERROR and r.json["error"] == "append-only"
    assert "admin key" in r.json["message"]
    r = cli("compact", "--archive", url, "--keep-last", "1", "--admin-key-file", key,
            *login(pw, ADMIN), "--json")
    assert r.code == 0, r.err
    assert r.json["points_dropped"] == 1


def test_wrong_passwords_and_plain_accounts_get_nowhere(backup_host, cli):
    srv, archives, pw, source = backup_host
    url = f"modsync://{srv.address}/main"
    r = cli("backup", "--store", source, "--to", url, *login(pw, PUSHER, "wrong"), "--json")
    assert r.code == EXIT_ERROR and "wrong password" in r.json["message"]
    r = cli("backup", "--store", source, "--to", url, *login(pw, "alice"), "--json")
    assert r.code == EXIT_ERROR and "may not use this server's archives" in r.json["message"]
    assert not (archives / "main").exists()
    assert "authentication failed" in srv.log()
    # A push from such an account is read to its end and refused, the connection kept.
    with Client(srv.address, account="alice", password=ALICE_PW) as client, \
            Store.open(source, readonly=True) as s:
        client._send(A.ArchivePush("main", "alice", 1))
        for ev in P.changeset_events(build(s, "alice", {}), s.read_body):
            client._sendall(client.conn.send(ev))
        with pytest.raises(RemoteError) as e:
            client._reply(A.PointAdded)
        assert e.value.code == "acl"
        assert client.users() == []          # the backup host keeps no mail of its own
    assert not (archives / "main").exists()


def test_usage_errors_and_a_server_without_archives(new_store, serve, cli, tmp_path, pwfile):
    plain = serve(new_store("plain"))
    url = f"modsync://{plain.address}/main"
    with pytest.raises(RemoteError, match="holds no archives"):
        RemoteArchive(url, account=ADMIN, password=PASSWORD)
    store = new_store("src")
    login = ["--account", ADMIN, "--password-file", pwfile]
    for argv in (["backup", "--store", store, "--to", url],
                 ["backup", "--from", plain.address, "--to", url, *login],
                 ["backup", "--store", store, "--to", url, "--init", *login],
                 ["backup", "--store", store, "--to", "modsync://nohostport/x", *login],
                 ["backup", "--store", store, "--to", f"modsync://{plain.address}/../x", *login],
                 ["restore", "--archive", url, "-u", "alice", "--store", store],
                 ["verify", "--archive", url]):
        assert cli(*argv).code == EXIT_USAGE, argv
    r = cli("backup", "--store", store, "--to", url, *login, "--json")
    assert r.code == EXIT_ERROR and "holds no archives" in r.json["message"]
    for bad in ("modsync://host:1/", "modsync://host/x", "modsync://unix:/s/x",
                "modsync://h:1/.hidden"):
        with pytest.raises(UsageError):
            parse_url(bad)
    assert parse_url("modsync://[::1]:4190/mail-2024") == ("[::1]:4190", "mail-2024")


def test_the_archive_messages_round_trip_and_bad_names_are_protocol_errors():
    c, s = P.Connection("client"), P.Connection("server")
    hello = s.receive_data(c.send(P.Hello(c.versions)))[0]
    c.receive_data(s.send(P.Welcome(s.choose_version(hello), s.versions)))
    s.receive_data(c.send(P.Auth("a", "b")))
    c.receive_data(s.send(P.Ok("welcome", "a", True)))
    for ev in (A.ArchiveOpen("main", True), A.ArchivePoints("main", "alice", True),
               A.ArchiveMissing("main", (b"\1" * 32, b"\2" * 32)),
               A.ArchivePush("main", "alice", 7),
               A.ArchiveCompact("main", {"last": 2, "seconds": 3600}, ("alice",), True, 50_000,
                                b"key")):
        assert s.receive_data(c.send(ev)) == [ev]
    for ev in (A.ArchiveInfo("main", "ab", True, True, False),
               A.PointList("main", {"users": [{"user": "alice", "points": [
                   {"point": 1, "state": {"0" * 32: 5}, "digest": "ff"}]}]}),
               A.PointAdded("main", "alice", {"user": "alice", "point": None,
                                              "unchanged": True}),
               A.Compacted("main", {"ms": 12, "users": []})):
        assert c.receive_data(s.send(ev)) == [ev]
    for bad in (A.ArchiveOpen("../etc"), A.ArchiveOpen(".hidden"),
                A.ArchiveMissing("main", (b"short",))):
        with pytest.raises(P.ProtocolError):
            s.receive_data(c.send(bad))
        c, s = P.Connection("client"), P.Connection("server")
        hello = s.receive_data(c.send(P.Hello(c.versions)))[0]
        c.receive_data(s.send(P.Welcome(s.choose_version(hello), s.versions)))
        s.receive_data(c.send(P.Auth("a", "b")))
        c.receive_data(s.send(P.Ok("welcome", "a", True)))
    with pytest.raises(ValueError):
        P.register_message(A.ArchiveOpen, "PUSH", P.C, 2, ())


def test_a_second_writer_is_told_the_archive_is_busy(backup_host, cli):
    from engine.archive import Archive
    srv, archives, pw, source = backup_host
    url = f"modsync://{srv.address}/main"
    assert cli("backup", "--store", source, "--to", url, *login(pw, PUSHER)).code == 0
    mail(source, 500, 2)
    with Archive.open(archives / "main") as local, local.writer():
        r = cli("backup", "--store", source, "--to", url, *login(pw, PUSHER), "--json")
        assert r.code == EXIT_ERROR and r.json["errors"] == 1
        assert "another modsync process is writing" in r.json["users"][0]["error"]
        assert str(archives) not in r.json["users"][0]["error"]
    r = cli("backup", "--store", source, "--to", url, *login(pw, PUSHER), "--json")
    assert r.code == 0 and r.json["users"][0]["new_bodies"] == 2
