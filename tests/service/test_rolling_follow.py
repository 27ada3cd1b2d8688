"""The intent log, rolling push and pull --follow, with real processes."""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from engine import Store
from engine.changeset import state_of, vv_le
from engine.mutation import INTENT_RECENT
from engine.replication import CommitWatch, UserLock, read_intents

from .test_push_pull import fill
from .util import auth, digest, wait_for

# Generous bounds for a loaded CI machine; tools/bench measures the real figures.
LATENCY_BOUND = 1.0


def has(store: Store, user: str, vv: dict) -> bool:
    try:
        return vv_le(vv, state_of(store, user))
    except Exception:
        return False


def test_intent_is_written_with_the_change(new_store):
    a = new_store("a")
    with Store.open(a) as s:
        s.create_mailbox("alice", "INBOX")
        s.append("alice", "INBOX", b"x")
        assert read_intents(s)["alice"].modseq == s.user_info("alice").modseq
        before = (read_intents(s)["alice"].modseq, s.user_info("alice").modseq)

        def crash():
            raise RuntimeError("crash just before the commit")
        s.blobs.sync = crash
        with pytest.raises(RuntimeError):
            s.set_flags("alice", "INBOX", [(1, 1)], ["$x"])
        del s.blobs.sync
        # A transaction that did not commit leaves neither the change nor an intent.
        assert (read_intents(s)["alice"].modseq, s.user_info("alice").modseq) == before


def test_a_watch_reads_only_the_users_who_committed(new_store):
    """Watchers (followers' notifications, rolling push) look at the users who committed
    since their last look, not at every user's row."""
    with Store.open(new_store("a")) as s:
        for i in range(40):
            s.create_mailbox(f"u{i:02d}", "INBOX")
        watch = CommitWatch(s)
        assert len(watch.poll()) == 40            # the first look: everyone
        assert watch.poll() is None                # nothing committed since
        s.append("u07", "INBOX", b"x")
        s.append("u31", "INBOX", b"y")
        s.append("u07", "INBOX", b"z")
        got = watch.poll()
        assert set(got) == {"u07", "u31"} and got["u07"].modseq == s.user_info("u07").modseq
        with s.db.read() as txn:               # one row per user, at its latest commit
            assert sum(1 for _ in txn.prefix("intents", INTENT_RECENT)) == 40
        s.set_flags("u31", "INBOX", [(1, 1)], ["$x"])
        assert set(watch.poll()) == {"u31"}


CRASHER = r"""
import sys
from engine import Store, Message
s = Store.open(sys.argv[1])
i = 0
while True:
    i += 1
    s.append_many("alice", "INBOX", [Message(b"m%d" % i)])
    s.set_flags("alice", "INBOX", [(i, i)], ["\\Seen"])
"""


def test_kill_9_never_separates_a_change_from_its_intent(new_store):
    a = new_store("a")
    with Store.open(a) as s:
        s.create_mailbox("alice", "INBOX")
    for delay in (0.4, 0.7, 1.0):
        p = subprocess.Popen([sys.executable, "-c", CRASHER, str(a)])
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        with Store.open(a) as s:
            assert read_intents(s)["alice"].modseq == s.user_info("alice").modseq


def test_rolling_push_sends_each_commit_promptly(new_store, serve, spawn, pwfile):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 3)
    fill(a, "bob", 1)
    srv = serve(b)
    pusher = spawn("push", "--store", a, "--to", srv.address, *auth(pwfile), "--rolling")
    ra, rb = Store.open(a), Store.open(b)
    try:
        assert wait_for(lambda: has(rb, "alice", state_of(ra, "alice")), 20)
        lat = []
        for i in range(8):
            t0 = time.monotonic()
            ra.append("alice", "INBOX", b"Subject: rolling %d\r\n\r\n" % i)
            vv = state_of(ra, "alice")
            assert wait_for(lambda: has(rb, "alice", vv), 10, 0.002)
            lat.append(time.monotonic() - t0)
        assert statistics.median(lat) < LATENCY_BOUND, lat
        # A user locked on the receiver waits; the others keep flowing.
        lock = UserLock(b, "bob")
        assert lock.acquire()
        ra.append("bob", "INBOX", b"Subject: for bob\r\n\r\n")
        ra.append("alice", "INBOX", b"Subject: for alice\r\n\r\n")
        vv_alice, vv_bob = state_of(ra, "alice"), state_of(ra, "bob")
        assert wait_for(lambda: has(rb, "alice", vv_alice), 10)
        time.sleep(0.5)
        assert not has(rb, "bob", vv_bob)
        lock.release()
        assert wait_for(lambda: has(rb, "bob", vv_bob), 15)
        pusher.send_signal(signal.SIGTERM)
        assert pusher.wait(20) == 0
        # Commits made while no pusher runs wait in the intent log for the next one.
        ra.append("alice", "INBOX", b"Subject: while nobody pushes\r\n\r\n")
        vv = state_of(ra, "alice")
        time.sleep(0.3)
        assert not has(rb, "alice", vv)
        spawn("push", "--store", a, "--to", srv.address, *auth(pwfile), "--rolling")
        assert wait_for(lambda: has(rb, "alice", vv), 20)
    finally:
        ra.close()
        rb.close()


def test_rolling_pusher_reconnects_to_a_restarted_replica(new_store, serve, spawn, pwfile,
                                                          tmp_path):
    a, b = new_store("a"), new_store("b")
    fill(a, "alice", 2)
    sock = str(tmp_path / "r.sock")
    srv = serve(b, "--unix", sock)
    spawn("push", "--store", a, "--to", f"unix:{sock}", *auth(pwfile), "--rolling")
    ra, rb = Store.open(a), Store.open(b)
    try:
        assert wait_for(lambda: has(rb, "alice", state_of(ra, "alice")), 20)
        srv.kill()
        os.unlink(sock)
        ra.append("alice", "INBOX", b"Subject: while the replica was down\r\n\r\n")
        srv.start()
        vv = state_of(ra, "alice")
        assert wait_for(lambda: has(rb, "alice", vv), 30)
    finally:
        ra.close()
        rb.close()


def test_pull_follow_catches_up_without_polling(new_store, serve, spawn, pwfile):
    m, r = new_store("master"), new_store("replica")
    fill(m, "alice", 3)
    srv = serve(m)
    follower = spawn("pull", "--store", r, "--from", srv.address, *auth(pwfile), "--follow")
    rm, rr = Store.open(m), Store.open(r)
    try:
        assert wait_for(lambda: has(rr, "alice", state_of(rm, "alice")), 20)
        lat = []
        for i in range(8):
            t0 = time.monotonic()
            rm.append("alice", "INBOX", b"Subject: follow %d\r\n\r\n" % i)
            vv = state_of(rm, "alice")
            assert wait_for(lambda: has(rr, "alice", vv), 10, 0.002)
            lat.append(time.monotonic() - t0)
        assert statistics.median(lat) < LATENCY_BOUND, lat
        rm.create_mailbox("carol", "INBOX")       # a new user shows up too
        assert wait_for(lambda: "carol" in rr.users(), 10)
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(20) == 0
    finally:
        rm.close()
        rr.close()
    assert digest(m, "alice") == digest(r, "alice")
