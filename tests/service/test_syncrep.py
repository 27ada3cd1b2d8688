"""Synchronous replicas (engine.syncrep): levels, quorums, timeouts, group commit."""
from __future__ import annotations

import threading
import time

import pytest

from engine import Store
from engine.model import Record
from engine.replication import local_only_ranges
from engine.syncrep import ReplicaSpec, SyncReplicas, SyncSettings, parse_quorum

from .test_push_pull import fill
from .util import ADMIN, PASSWORD, auth, digest, wait_for


def sync_args(pwfile, *replicas, level="applied", quorum="any 1", timeout="5",
              on_timeout="block"):
    out = []
    for r in replicas:
        out += ["--sync-replica", r]
    return out + ["--sync-level", level, "--sync-quorum", quorum, "--sync-timeout", timeout,
                  "--sync-on-timeout", on_timeout, "--sync-account", ADMIN,
                  "--sync-password-file", str(pwfile)]


@pytest.mark.parametrize("level", ["applied", "durable"])
def test_kill_the_master_right_after_a_synchronous_commit(level, new_store, serve, cli, pwfile):
    writer, master, replica = new_store("w"), new_store("m"), new_store("r")
    fill(writer, "alice", 4)
    rsrv = serve(replica)
    msrv = serve(master, *sync_args(pwfile, rsrv.address, level=level))
    r = cli("push", "--store", writer, "--to", msrv.address, *auth(pwfile))
    assert r.code == 0, r.out + r.err
    msrv.kill()                       # the commit returned: the replica must have it
    if level == "durable":
        rsrv.kill()                   # ... even if it crashes right after acknowledging
        rsrv.start()
    assert wait_for(lambda: digest(replica, "alice") == digest(writer, "alice"), 10)
    assert digest(replica, "alice") == digest(master, "alice")


def test_any_n_times_out_into_asynchronous_with_a_record(new_store, serve, cli, pwfile,
                                                        tmp_path):
    writer, master, replica = new_store("w"), new_store("m"), new_store("r")
    fill(writer, "alice", 2)
    rsrv = serve(replica)
    down = f"unix:{tmp_path / 'nobody.sock'}"
    msrv = serve(master, *sync_args(pwfile, rsrv.address, down, quorum="any 2", timeout="1",
                                    on_timeout="async"))
    t0 = time.monotonic()
    r = cli("push", "--store", writer, "--to", msrv.address, *auth(pwfile))
    took = time.monotonic() - t0
    assert r.code == 0 and 0.9 < took < 15, (took, r.out, r.err)
    log = msrv.wait_log("acknowledged only locally")
    assert "did not acknowledge alice" in log
    msrv.stop()
    with Store.open(master) as s:
        ranges = local_only_ranges(s)["alice"]
        assert ranges and ranges[-1][1] == s.user_info("alice").modseq
    r = cli("status", "--store", master, "--json", check_schema=False)
    assert any(p["direction"] == "sync" for p in r.json["peers"])
    # The replica that was up got it anyway.
    assert wait_for(lambda: digest(replica, "alice") == digest(writer, "alice"), 10)


def test_block_waits_for_the_replica(new_store, serve, spawn, pwfile, tmp_path):
    writer, master, replica = new_store("w"), new_store("m"), new_store("r")
    fill(writer, "alice", 2)
    sock = tmp_path / "replica.sock"
    msrv = serve(master, *sync_args(pwfile, f"unix:{sock}", timeout="0.5", on_timeout="block"))
    p = spawn("push", "--store", writer, "--to", msrv.address, *auth(pwfile))
    time.sleep(2.0)
    assert p.poll() is None            # still waiting for the replica
    serve(replica, "--unix", sock)
    assert p.wait(30) == 0
    assert digest(replica, "alice") == digest(writer, "alice")
    assert "still waiting (on_timeout = block)" in msrv.log()


def test_first_n_takes_the_next_replica_when_one_is_down(new_store, serve, cli, pwfile,
                                                        tmp_path):
    writer, master, r2 = new_store("w"), new_store("m"), new_store("r2")
    fill(writer, "alice", 2)
    srv2 = serve(r2)
    down = f"unix:{tmp_path / 'r1.sock'}"       # first by priority, but not running
    msrv = serve(master, *sync_args(pwfile, down, srv2.address, quorum="first 1", timeout="20",
                                    on_timeout="block"))
    t0 = time.monotonic()
    r = cli("push", "--store", writer, "--to", msrv.address, *auth(pwfile))
    assert r.code == 0 and time.monotonic() - t0 < 15
    assert digest(r2, "alice") == digest(writer, "alice")


@pytest.mark.parametrize("level", ["received", "durable", "applied"])
def test_concurrent_writers_are_grouped(level, new_store, serve, root):
    master, replica = new_store("m"), new_store("r")
    rsrv = serve(replica)
    with Store.open(master) as s:
        s.create_mailbox("alice", "INBOX")
    store = Store.open(master)
    sync = SyncReplicas(store, SyncSettings([ReplicaSpec(rsrv.address, "r")], level=level,
                                            quorum="any 1", timeout=30, account=ADMIN,
                                            password=PASSWORD))
    sync.start()
    writers, each = 8, 12
    errors = []

    def write(w):
        try:
            for i in range(each):
                body = f"Subject: w{w} m{i}\r\n\r\n".encode()
                sync.commit("alice", lambda m, b=body: _append(store, m, b))
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert sync.metrics["acknowledged"] == writers * each
        assert sync.metrics["batches"] < writers * each        # commits were grouped
        if level == "applied":
            assert digest(replica, "alice") == store.status("alice")["digest"]
    finally:
        sync.stop()
        store.close()


def _append(store, m, body):
    """Append inside a mutation that SyncReplicas.commit runs (one commit per message)."""
    mb = m.mailbox_by_name("INBOX")
    address, sha1 = store.put_body(m.txn, body)
    m.put_record(mb, Record(mb.uidnext, address, sha1, len(body), m.now, savedate=m.now,
                            createdmodseq=m.modseq), None)


def test_quorum_and_settings_are_checked():
    assert parse_quorum("any 2", 3) == ("any", 2)
    assert parse_quorum("first 1", 1) == ("first", 1)
    for bad in ("some 1", "any", "any 0", "any 4"):
        with pytest.raises(Exception):
            parse_quorum(bad, 3)
    with pytest.raises(Exception):
        SyncSettings([ReplicaSpec("127.0.0.1:1")], level="fsynced")
