"""`modsync backup --from HOST:PORT` against a real `modsync serve` (engine.client.RemoteSource).

Two backups over the network with changes in between; each point restores
to the digest the source had at that point's modseq.
"""
from __future__ import annotations

from engine import Message, Store

from .util import auth, digest


def test_backup_from_a_server_twice_and_restore_each_point(new_store, serve, cli, pwfile,
                                                          root):
    source = new_store("mail")
    with Store.open(source) as s:
        for user in ("alice", "bob"):
            s.create_mailbox(user, "INBOX")
            s.create_mailbox(user, "Work")
            s.append_many(user, "INBOX", [Message(
                b"Subject: %s %d\r\n\r\n" % (user.encode(), i) + b"text %d\r\n" % i * (3 + i),
                ("\\Seen",) if i % 2 else ()) for i in range(40)])
        s.subscribe("alice", "Work")
        s.sieve_put("alice", "main", b"keep;\r\n")
    srv = serve(source)
    archive = root / "archive"
    seen = []                                   # (modseq, digest) of alice at each point

    def run_backup(expect_full: bool) -> None:
        r = cli("backup", "--from", srv.address, *auth(pwfile), "--to", archive, "--json")
        assert r.code == 0, r.err
        assert r.json["source"] == {"from": srv.address}
        by_user = {u["user"]: u for u in r.json["users"]}
        assert by_user["alice"]["full"] is expect_full
        with Store.open(source, readonly=True) as s:
            modseq = s.user_info("alice").modseq
        assert by_user["alice"]["modseq"] == modseq
        seen.append((modseq, digest(source, "alice")))

    run_backup(expect_full=True)
    with Store.open(source) as s:
        s.set_flags("alice", "INBOX", [(1, 10)], ["\\Flagged"])
        s.expunge("alice", "INBOX", [(11, 15)])
        s.copy("alice", "INBOX", [(20, 25)], "Work", move=True)
        s.append("alice", "Work", b"Subject: later\r\n\r\nadded between the backups\r\n")
        s.delete_mailbox("bob", "Work")
    run_backup(expect_full=False)
    assert seen[0] != seen[1]
    r = cli("backup", "list", "--archive", archive, "-u", "alice", "--json")
    points = r.json["users"][0]["points"]
    assert [(p["point"], p["modseq"]) for p in points] == [(1, seen[0][0]), (2, seen[1][0])]
    assert points[1]["new_bodies"] == 1
    assert cli("verify", "--archive", archive).code == 0
    for i, (modseq, want) in enumerate(seen):
        target = root / f"restored-{i}"
        assert cli("init", "--store", target).code == 0
        r = cli("restore", "--archive", archive, "-u", "alice", "--at", f"modseq:{modseq}",
                "--store", target, "--json")
        assert r.code == 0, r.err
        assert r.json["point"]["point"] == i + 1 and r.json["digest_ok"]
        assert digest(target, "alice") == want
    assert srv.stop() == 0
