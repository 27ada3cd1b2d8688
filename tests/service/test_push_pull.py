"""push, pull and drain against real `modsync serve` processes; versions, accounts, TLS."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from engine import Message, Store
from engine.client import Client, RemoteError, RemoteSource
from engine.replication import UserLock

from .util import ADMIN, PASSWORD, auth, digest


def fill(path, user="alice", n=5, box="INBOX", tag="m"):
    with Store.open(path) as s:
        if user not in s.users() or box not in [m.name for m in s.mailboxes(user)]:
            s.create_mailbox(user, box)
        s.append_many(user, box, [Message(f"Subject: {tag}{i}\r\n\r\nbody {i}\r\n".encode(),
                                          ("\\Seen",) if i % 2 else ())
                                  for i in range(n)])


def test_push_once_pull_once_and_drain(new_store, serve, cli, pwfile):
    a, b, c = new_store("a"), new_store("b"), new_store("c")
    fill(a, "alice", 6)
    fill(a, "bob", 3)
    srv = serve(b)
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile), "--json")
    assert r.code == 0, r.err
    assert {u["user"]: u["status"] for u in r.json["users"]} == {"alice": "sent", "bob": "sent"}
    assert digest(a, "alice") == digest(b, "alice") and digest(a, "bob") == digest(b, "bob")
    # Again: the cached state of the replica says there is nothing to send.
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile), "--json")
    assert r.code == 0 and {u["status"] for u in r.json["users"]} == {"nothing"}
    # Pull into a third store: it asks from its own state; the master keeps nothing.
    r = cli("pull", "--store", c, "--from", srv.address, *auth(pwfile), "--json")
    assert r.code == 0, r.err
    assert digest(c, "alice") == digest(a, "alice")
    fill(a, "alice", 2, tag="later")
    r = cli("drain", "--store", a, "--to", srv.address, *auth(pwfile), "--json")
    assert r.code == 0 and r.json["complete"], r.out
    assert digest(b, "alice") == digest(a, "alice")
    r = cli("pull", "--store", c, "--from", srv.address, *auth(pwfile), "-u", "alice")
    assert r.code == 0 and digest(c, "alice") == digest(a, "alice")


def test_a_rejected_push_is_merged_and_sent_again(new_store, serve, cli, pwfile):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 3)
    srv = serve(b)
    assert cli("push", "--store", a, "--to", srv.address, *auth(pwfile)).code == 0
    # Both change: the replica's change comes back as the counter and is merged here.
    fill(b, "alice", 2, tag="on-b")
    with Store.open(a) as s:
        s.set_flags("alice", "INBOX", [(1, 1)], ["\\Flagged"])
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile), "--json")
    assert r.code == 0, r.out
    (u,) = r.json["users"]
    assert u["status"] == "sent" and u["rounds"] == 2
    assert digest(a, "alice") == digest(b, "alice")
    with Store.open(b) as s:
        assert len(s.records("alice", "INBOX")) == 5


def test_a_first_sync_goes_in_parts_both_ways(new_store, serve, cli, pwfile):
    """Push and pull of a user the other side lacks travel as parts (changeset.split),
    each applied as it arrives; an older peer gets one change set."""
    a, b, c, d = new_store("a"), new_store("b"), new_store("c"), new_store("d")
    with Store.open(a) as s:
        s.create_mailbox("alice", "INBOX")
        for i in range(5):
            s.append_many("alice", "INBOX", [Message(b"Subject: %d %d\r\n\r\n" % (i, j))
                                             for j in range(500)])
    srv = serve(b)
    assert cli("push", "--store", a, "--to", srv.address, *auth(pwfile)).code == 0
    assert digest(a, "alice") == digest(b, "alice")
    applied = srv.wait_log("push of alice: applied")
    assert applied and srv.log().count("push of alice: applied") == 2
    with Client(srv.address, account=ADMIN, password=PASSWORD) as client:
        parts = list(client.pull_parts("alice"))
        assert len(parts) == 2 and parts[1][0].base == parts[0][0].state
        for _, spool in parts:
            spool.close()
    assert cli("pull", "--store", c, "--from", srv.address, *auth(pwfile)).code == 0
    assert digest(c, "alice") == digest(a, "alice")
    old = serve(d, "--protocol-versions", "1,2")
    assert cli("push", "--store", a, "--to", old.address, *auth(pwfile)).code == 0
    assert digest(d, "alice") == digest(a, "alice") and old.log().count("push of alice") == 1


def test_versions_old_client_new_server_and_unknown(new_store, serve):
    b = new_store("b")
    fill(b, "alice", 2)
    srv = serve(b)
    old = Client(srv.address, account=ADMIN, password=PASSWORD, versions=(1,))
    assert old.version == 1
    cs, spool = old.pull("alice", {})
    assert len(cs.bodies) == 2
    spool.close()
    with pytest.raises(Exception, match="needs protocol version 2"):
        old.follow()
    old.close()
    new = Client(srv.address, account=ADMIN, password=PASSWORD)
    assert new.version == 3
    new.close()
    with pytest.raises(RemoteError) as e:
        Client(srv.address, account=ADMIN, password=PASSWORD, versions=(9,))
    assert e.value.code == "version" and "1, 2, 3" in e.value.text and "9" in e.value.text
    srv.wait_log("this server speaks protocol versions 1, 2, 3")


def test_new_client_old_server(new_store, serve, cli, pwfile):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 3)
    srv = serve(b, "--protocol-versions", "1")
    c = Client(srv.address, account=ADMIN, password=PASSWORD)
    assert c.version == 1
    c.close()
    assert cli("push", "--store", a, "--to", srv.address, *auth(pwfile)).code == 0
    assert digest(a, "alice") == digest(b, "alice")


def test_accounts_and_failed_logins_logged_and_rate_limited(new_store, serve, cli):
    b = new_store("b", admin=False)
    r = cli("account", "add", "--store", b, "repl", "--admin", "--json", stdin=b"s3cret\n")
    assert r.code == 0 and r.json["account"]["admin"] is True
    assert cli("account", "add", "--store", b, "alice", stdin=b"").code == 2
    r = cli("account", "list", "--store", b, "--json")
    assert [a["name"] for a in r.json["accounts"]] == ["repl"]
    with Store.open(b) as s:   # stored hashed
        with s.db.read() as txn:
            assert b"s3cret" not in txn.get("accounts", b"repl")
    srv = serve(b, "--auth-failures", "3", "--auth-window", "30", "--auth-delay", "0")
    Client(srv.address, account="repl", password="s3cret").close()
    for _ in range(3):
        with pytest.raises(RemoteError) as e:
            Client(srv.address, account="repl", password="wrong")
        assert e.value.code == "auth"
    with pytest.raises(RemoteError) as e:      # now even the right password must wait
        Client(srv.address, account="repl", password="s3cret")
    assert e.value.code == "rate-limited"
    log = srv.log()
    assert log.count("authentication failed for 'repl' from 127.0.0.1") == 3
    assert "too many failed logins" in log
    assert cli("account", "remove", "--store", b, "repl", "--json").code == 0
    assert cli("account", "remove", "--store", b, "repl").code == 1


def test_unix_socket_and_config_file(new_store, serve, cli, pwfile, tmp_path):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 2)
    sock = tmp_path / "s.sock"
    conf = tmp_path / "modsync.toml"
    conf.write_text(f'[serve]\nlisten = ["127.0.0.1:0"]\nunix = "{sock.name}"\n'
                    f'max_changeset = "64M"\nstall_timeout = 5\n')
    srv = serve(b, "-c", str(conf))
    assert f"unix:{sock}" in srv.addresses
    assert any(x.startswith("127.0.0.1:") for x in srv.addresses)
    r = cli("push", "--store", a, "--to", f"unix:{sock}", *auth(pwfile))
    assert r.code == 0, r.err
    assert digest(a, "alice") == digest(b, "alice")


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_tls(new_store, serve, cli, pwfile, tmp_path):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 3)
    cert, key = _self_signed(tmp_path)
    srv = serve(b, "--tls-cert", cert, "--tls-key", key)
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile), "--tls-ca", cert)
    assert r.code == 0, r.err
    assert digest(a, "alice") == digest(b, "alice")
    # A client that does not trust the certificate refuses; plain text is refused too.
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile), "--tls")
    assert r.code != 0 and "certificate" in r.err.lower()
    with pytest.raises(Exception):
        Client(srv.address, account=ADMIN, password=PASSWORD, timeout=5)


def test_remote_source_for_backups(new_store, serve):
    b = new_store("b")
    fill(b, "alice", 4)
    fill(b, "bob", 1)
    srv = serve(b)
    host, port = srv.address.rsplit(":", 1)
    with RemoteSource(host, int(port), account=ADMIN, password=PASSWORD) as src:
        assert src.users() == ["alice", "bob"]
        vv = src.state("alice")
        assert vv and src.state("nobody") == {}
        cs, bodies = src.changes("alice", {})
        assert len(cs.bodies) == 4 and all(bodies(a) for a in cs.bodies)
        cs2, _ = src.changes("alice", vv)
        assert cs2.items == []


def test_lock_back_off(new_store, serve, cli, pwfile):
    """A user locked on the receiver is answered LOCKED at once; the others go through."""
    a, b = new_store("a"), new_store("b")
    for u in ("alice", "bob", "carol"):
        fill(a, u, 3)
    srv = serve(b)
    lock = UserLock(b, "bob")
    assert lock.acquire()
    try:
        t0 = time.monotonic()
        r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile), "--json")
        assert time.monotonic() - t0 < 10
        status = {u["user"]: u["status"] for u in r.json["users"]}
        assert status == {"alice": "sent", "bob": "locked", "carol": "sent"} and r.code == 1
        r = cli("drain", "--store", a, "--to", srv.address, *auth(pwfile),
                "--drain-timeout", "1", "--json")
        assert r.code == 1 and [x["user"] for x in r.json["left"]] == ["bob"]
        assert "locked" in r.json["left"][0]["why"]
    finally:
        lock.release()
    r = cli("drain", "--store", a, "--to", srv.address, *auth(pwfile))
    assert r.code == 0, r.out
    assert digest(a, "bob") == digest(b, "bob")


def test_admin_lock_over_the_protocol(new_store, serve, cli, pwfile):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 2)
    srv = serve(b)
    holder = Client(srv.address, account=ADMIN, password=PASSWORD)
    assert holder.lock("alice")
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile), "--json")
    assert r.json["users"][0]["status"] == "locked"
    holder.close()      # a lock dies with its connection
    assert cli("push", "--store", a, "--to", srv.address, *auth(pwfile)).code == 0


def test_many_connections_at_once(new_store, serve, pwfile):
    """Sixteen pushers (one user each) and four pullers on one server at the same time."""
    import threading

    from engine.replication import Puller, Pusher
    b = new_store("b")
    srv = serve(b)
    sources = []
    for i in range(16):
        a = new_store(f"a{i}")
        fill(a, f"user{i}", 20)
        sources.append(a)
    pullers = [new_store(f"p{i}") for i in range(4)]
    errors = []

    def connect():
        return Client(srv.address, account=ADMIN, password=PASSWORD)

    def push(i):
        try:
            with Store.open(sources[i]) as s:
                p = Pusher(s, connect, address=srv.address)
                out = p.push_once([f"user{i}"])
                p.disconnect()
                assert [o.status for o in out.outcomes] == ["sent"], out
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    def pull(i):
        try:
            with Store.open(pullers[i]) as s:
                p = Puller(s, connect, address=srv.address)
                for _ in range(3):
                    p.pull_once()
                p.disconnect()
        except Exception as e:   # pragma: no cover
            errors.append(e)
    threads = [threading.Thread(target=push, args=(i,)) for i in range(16)]
    threads += [threading.Thread(target=pull, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, a in enumerate(sources):
        assert digest(a, f"user{i}") == digest(b, f"user{i}")
