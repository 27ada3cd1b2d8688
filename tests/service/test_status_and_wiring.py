"""`modsync status` per peer, and the wiring of the Cyrus (csync) verbs."""
from __future__ import annotations

import json
import sys
import types

import pytest

from engine import Store
from engine.cli.status import peer_view

from .test_push_pull import fill
from .util import auth


def test_status_shows_each_peer(new_store, serve, cli, pwfile):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 3)
    fill(a, "bob", 1)
    srv = serve(b)
    assert cli("push", "--store", a, "--to", srv.address, *auth(pwfile)).code == 0
    fill(a, "alice", 2, tag="new")
    r = cli("status", "--store", a)
    assert "peers:" in r.out and srv.address in r.out
    with Store.open(a) as s:
        (peer,) = peer_view(s)
    with Store.open(b) as s:
        assert peer["peer_id"] == s.id
    assert peer["direction"] == "push" and peer["users_queued"] == 1
    assert peer["modseqs_behind"] >= 1 and 0 <= peer["seconds_behind"] < 30
    assert peer["last_contact"] and peer["last_error"] is None
    alice = next(u for u in peer["users"] if u["user"] == "alice")
    assert alice["queued"] and alice["modseqs_behind"] == 1
    # --json carries the same view under "peers", checked against status.schema.json.
    data = json.loads(cli("status", "--store", a, "--json", check_schema=True).out)
    assert data["peers"][0]["users_queued"] == 1
    assert cli("push", "--store", a, "--to", srv.address, *auth(pwfile)).code == 0
    with Store.open(a) as s:
        (peer,) = peer_view(s)
    assert peer["users_queued"] == 0 and peer["modseqs_behind"] == 0
    # The replica that pulled from a master shows it too, and the last error.
    c = new_store("c")
    assert cli("pull", "--store", c, "--from", srv.address, *auth(pwfile)).code == 0
    srv.kill()
    assert cli("pull", "--store", c, "--from", srv.address, *auth(pwfile)).code != 0
    with Store.open(c) as s:
        peers = peer_view(s)
    assert [p["direction"] for p in peers] == ["pull"]
    assert "cannot connect" in peers[0]["last_error"]


def test_status_without_peers_is_unchanged(new_store, cli):
    a = new_store("a")
    fill(a, "alice", 1)
    data = json.loads(cli("status", "--store", a, "--json", check_schema=True).out)
    assert "peers" not in data


@pytest.fixture
def fake_csync(monkeypatch):
    calls = []
    mod = types.ModuleType("engine.csync")

    def csync_handler(store, *, servername="modsync"):
        calls.append(("handler", store.path, servername))

        async def handle(reader, writer):
            writer.write(b"* OK fake csync\r\n")
            await writer.drain()
            writer.close()
        return handle

    class Report:
        def as_dict(self):
            return {"ok": True, "user": "alice"}

    def push_user(store, user, host, port, *, authname, password, progress=None):
        calls.append(("push_user", user, host, port, authname, password))
        return Report()
    mod.csync_handler, mod.push_user = csync_handler, push_user
    monkeypatch.setitem(sys.modules, "engine.csync", mod)
    import engine
    monkeypatch.setattr(engine, "csync", mod, raising=False)
    return calls


def test_push_csync_calls_engine_csync(new_store, cli, tmp_path, fake_csync):
    a = new_store("a")
    fill(a, "alice", 1)
    pw = tmp_path / "cyrus.pw"
    pw.write_text("cyruspw\n")
    r = cli("push", "--store", a, "--csync", "127.0.0.1:2005", "--user", "alice",
            "--csync-user", "cyradm", "--csync-password-file", pw, "--json")
    assert r.code == 0, r.err
    assert fake_csync == [("push_user", "alice", "127.0.0.1", 2005, "cyradm", "cyruspw")]
    assert r.json["report"] == {"ok": True, "user": "alice"}
    assert cli("push", "--store", a, "--csync", "127.0.0.1:2005", "--csync-user", "x",
               "--csync-password-file", pw).code == 2     # one user, named


def test_serve_csync_listener(new_store, fake_csync):
    import asyncio

    from engine.server import Server, ServerSettings
    b = new_store("b")

    async def run():
        with Store.open(b) as store:
            srv = Server(store, ServerSettings(listen=["127.0.0.1:0"],
                                               csync=["127.0.0.1:0"]))
            addresses = await srv.start()
            csync = next(x for x in addresses if x.startswith("csync:"))
            host, port = csync[6:].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            line = await reader.readline()
            writer.close()
            srv._stop.set()
            await srv.shutdown()
            return line
    assert asyncio.run(run()) == b"* OK fake csync\r\n"
    assert fake_csync[0][0] == "handler" and fake_csync[0][2] == "modsync"


def test_csync_missing_is_a_clear_error(new_store, cli, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "engine.csync", None)     # import fails
    # ... also when an earlier test imported it (the package keeps an attribute).
    import engine
    monkeypatch.delattr(engine, "csync", raising=False)
    a = new_store("a")
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    r = cli("push", "--store", a, "--csync", "127.0.0.1:2005", "-u", "alice",
            "--csync-user", "x", "--csync-password-file", pw)
    assert r.code == 2 and "engine.csync" in r.err
