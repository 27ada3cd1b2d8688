"""Bad input and faults: garbage, stalls, disconnects, oversize change sets, SIGTERM, kill -9."""
from __future__ import annotations

import os
import signal
import socket
import time

from engine import Message, Store
from engine import protocol as P
from engine.changeset import build, split, state_of
from engine.model import RECORD
from engine.verify import verify_store

from .test_push_pull import fill
from .util import ADMIN, PASSWORD, auth, digest, dump, wait_for


class Raw:
    """A hand-driven protocol client: sends exactly the frames a test wants."""

    def __init__(self, address: str, *, login: bool = True):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = P.Connection("client")
        self.pending: list = []
        if login:
            self.send(P.Hello())
            self.expect(P.Welcome)
            self.send(P.Auth(ADMIN, PASSWORD))
            self.expect(P.Ok)

    def send(self, *events) -> None:
        self.sock.sendall(b"".join(self.conn.send(e) for e in events))

    def frames(self, store: Store, user: str) -> list[bytes]:
        cs = build(store, user, {})
        return [self.conn.send(e) for e in P.changeset_events(cs, store.read_body)]

    def expect(self, cls):
        while not self.pending:
            self.pending += self.conn.receive_data(self.sock.recv(65536))
        ev = self.pending.pop(0)
        assert isinstance(ev, cls), ev
        return ev

    def closed_by_peer(self, timeout: float = 10) -> list:
        """Events until the server closes the connection."""
        self.sock.settimeout(timeout)
        out, self.pending = self.pending, []
        if self.conn.closed:
            return out
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return out
                out += self.conn.receive_data(data)
                if self.conn.closed:
                    return out
        except (ConnectionResetError, P.ProtocolError):
            return out

    def close(self) -> None:
        self.sock.close()


def test_garbage_is_cut_off_with_a_logged_reason(new_store, serve):
    b = new_store("b")
    fill(b, "alice", 2)
    before = dump(b)
    srv = serve(b)
    raw = Raw(srv.address, login=False)
    raw.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    raw.closed_by_peer()
    log = srv.wait_log("protocol error")
    assert "frame of" in log and "at byte 0" in log
    # Garbage inside a change set, after logging in.
    with Store.open(b) as s:
        frames = Raw(srv.address).frames(s, "alice")
    raw = Raw(srv.address)
    raw.send(P.Push("alice"))
    raw.sock.sendall(frames[0] + b"\x00\x00\x00\x10" + b"\xc1" * 16)
    got = raw.closed_by_peer()
    assert any(isinstance(e, P.Bye) and e.code == "protocol" for e in got)
    srv.wait_log("not a DLIST binary line")
    assert dump(b) == before
    assert srv.alive()


def test_disconnect_mid_change_set_changes_nothing_and_the_sender_retries(
        new_store, serve, cli, pwfile):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 50)
    srv = serve(b)
    before = dump(b)
    with Store.open(a) as s:
        raw = Raw(srv.address)
        frames = raw.frames(s, "alice")
    raw.send(P.Push("alice"))
    raw.sock.sendall(b"".join(frames[:-1]) + frames[-1][:3])   # all but the end
    raw.close()
    srv.wait_log("connection closed in the middle of a change set")
    time.sleep(0.2)
    assert dump(b) == before
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile))
    assert r.code == 0 and digest(a, "alice") == digest(b, "alice")


def test_a_first_sync_cut_off_between_parts_keeps_whole_parts_and_is_completed(
        new_store, serve, cli, pwfile):
    """A first sync in parts (changeset.split) cut off in its third part: the first two
    are applied, each whole, the store holds exactly their state, and the next push
    carries on from there."""
    a, b = new_store("a"), new_store("b")
    with Store.open(a) as s:
        s.create_mailbox("alice", "INBOX")
        for i in range(6):
            s.append_many("alice", "INBOX", [Message(b"Subject: %d-%d\r\n\r\nbody" % (i, j))
                                             for j in range(20)])
        parts = split(build(s, "alice", {}), 30)
        assert len(parts) >= 3
        srv = serve(b)
        raw = Raw(srv.address)
        frames = [raw.conn.send(P.Push("alice"))]
        for part in parts[:3]:
            frames += [raw.conn.send(e) for e in P.changeset_events(
                part, s.read_body, read_packed=s.read_packed, more=True)]
    raw.sock.sendall(b"".join(frames[:-2]))      # the third part's last frames never come
    raw.close()
    srv.wait_log("connection closed in the middle of a change set")

    def state():
        with Store.open(b) as s:
            return state_of(s, "alice") if "alice" in s.users() else {}
    assert wait_for(lambda: state() == parts[1].state), state()
    with Store.open(b) as s:
        assert len(s.records("alice", "INBOX")) == sum(
            1 for p in parts[:2] for i in p.items if i.kind == RECORD)
        assert verify_store(s).ok
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile))
    assert r.code == 0 and digest(a, "alice") == digest(b, "alice")


def test_a_stalled_peer_is_cut_off(new_store, serve):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 3)
    srv = serve(b, "--stall-timeout", "1", "--idle-timeout", "30")
    before = dump(b)
    with Store.open(a) as s:
        raw = Raw(srv.address)
        frames = raw.frames(s, "alice")
    raw.send(P.Push("alice"))
    raw.sock.sendall(frames[0])
    t0 = time.monotonic()
    got = raw.closed_by_peer(10)
    assert 0.8 < time.monotonic() - t0 < 8
    assert any(isinstance(e, P.Bye) and e.code == "stalled" for e in got)
    assert "sent nothing for 1 s in the middle of a change set" in srv.log()
    assert dump(b) == before


def test_an_oversize_change_set_is_refused(new_store, serve, cli, pwfile):
    a, b = new_store("a"), new_store("b")
    with Store.open(a) as s:
        s.create_mailbox("alice", "INBOX")
        s.append_many("alice", "INBOX", [Message(os.urandom(20_000)) for _ in range(10)])
    srv = serve(b, "--max-changeset", "64K")
    before = dump(b)
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile), "--json")
    assert r.code == 1
    srv.wait_log("larger than the limit of 65536 bytes")
    assert dump(b) == before
    small = new_store("small")
    fill(small, "bob", 2)                        # within the limit it goes through
    assert cli("push", "--store", small, "--to", srv.address, *auth(pwfile)).code == 0


def test_sigterm_finishes_the_transaction_in_flight(new_store, serve):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 20)
    srv = serve(b)
    with Store.open(a) as s:
        raw = Raw(srv.address)
        frames = raw.frames(s, "alice")
        idle = Raw(srv.address)
    raw.send(P.Push("alice"))
    raw.sock.sendall(b"".join(frames[:-1]))      # everything but END
    time.sleep(0.3)
    os.kill(srv.pid, signal.SIGTERM)
    srv.wait_log("finishing work in progress")
    assert srv.alive()
    raw.sock.sendall(frames[-1])
    assert raw.expect(P.Result).status == "applied"
    assert any(isinstance(e, P.Bye) and e.code == "shutdown" for e in raw.closed_by_peer())
    assert any(isinstance(e, P.Bye) for e in idle.closed_by_peer())
    assert srv.stop() == 0
    assert digest(a, "alice") == digest(b, "alice")


def test_kill_the_receiver_mid_push_then_retry(new_store, serve, cli, pwfile):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 30)
    srv = serve(b)
    before = dump(b)
    with Store.open(a) as s:
        raw = Raw(srv.address)
        frames = raw.frames(s, "alice")
    raw.send(P.Push("alice"))
    raw.sock.sendall(b"".join(frames[: len(frames) // 2]))
    time.sleep(0.2)
    srv.kill()
    assert dump(b) == before
    srv.start()
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile))
    assert r.code == 0 and digest(a, "alice") == digest(b, "alice")


def test_what_was_acknowledged_survives_kill_9(new_store, serve, cli, pwfile):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 5)
    srv = serve(b)
    assert cli("push", "--store", a, "--to", srv.address, *auth(pwfile)).code == 0
    srv.kill()          # right after the acknowledgement
    assert digest(a, "alice") == digest(b, "alice")


def test_kill_the_pusher_at_random_moments(new_store, serve, spawn, pwfile, cli):
    a, b = new_store("a"), new_store("b")
    with Store.open(a) as s:
        for box in ("INBOX", "Archive"):
            s.create_mailbox("alice", box)
            s.append_many("alice", box, [Message(os.urandom(3000)) for _ in range(300)])
    srv = serve(b)
    for delay in (0.3, 0.6, 0.9):
        p = spawn("push", "--store", a, "--to", srv.address, *auth(pwfile))
        time.sleep(delay)
        p.kill()
        p.wait()
        with Store.open(b) as s:
            # All or nothing: the replica holds none of the change set or all of it.
            n = len(s.records("alice", "INBOX")) + len(s.records("alice", "Archive")) \
                if "alice" in s.users() else 0
        assert n in (0, 600)
    r = cli("push", "--store", a, "--to", srv.address, *auth(pwfile))
    assert r.code == 0 and digest(a, "alice") == digest(b, "alice")
