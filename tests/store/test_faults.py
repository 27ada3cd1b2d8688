"""Faults: a full map, killed processes, crashes between blob sync and commit, failing mutations."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import lmdb
import pytest

import engine.db
import engine.store
from engine import Message, Store
from engine.blobs import address_of
from engine.db import TABLES
from engine.mutation import Mutation
from engine.verify import verify_store

U = "alice"
MIB = 1 << 20


def dump(store: Store) -> dict:
    """Every key and value of every LMDB table: 'exactly as before' means equal dumps."""
    with store.db.read() as txn:
        return {t: list(txn.range(t)) for t in TABLES}


def run_python(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=False, **kw)


# --- the memory map filling up --------------------------------------------------------------

def test_map_growth_through_the_store(store_path, monkeypatch):
    monkeypatch.setattr(engine.db, "INITIAL_MAP_SIZE", 1 * MIB)
    attempts = []

    class CountingMutation(Mutation):
        def __init__(self, *a, **kw):
            attempts.append(1)
            super().__init__(*a, **kw)
    monkeypatch.setattr(engine.store, "Mutation", CountingMutation)

    store = Store.init(store_path)
    assert store.db.env.info()["map_size"] == 1 * MIB
    store.create_mailbox(U, "INBOX")
    bodies = [b"message %06d " % i + b"x" * (i % 300) for i in range(6000)]
    attempts.clear()
    recs = store.append_many(U, "INBOX", [Message(b, ("\\Seen",)) for b in bodies])
    assert len(attempts) >= 2, "the big transaction should have hit MapFullError and been retried"
    assert store.db.env.info()["map_size"] > 1 * MIB
    # Retrying did not write the bodies twice: staging in the blob store is idempotent.
    pack_bytes = sum(store.blobs.pack_size(p) for p in store.blobs.packs())
    assert pack_bytes < 1.5 * sum(len(b) for b in bodies) + 100 * len(bodies)
    for i in range(200):                                 # and many small transactions
        store.set_flags(U, "INBOX", [(i + 1, i + 1)], [f"$k{i}"])
    store.close()

    store = Store.open(store_path)
    assert [r.uid for r in store.records(U, "INBOX")] == list(range(1, 6001))
    for r, b in zip(recs[::500], bodies[::500]):
        assert store.read_body(r.address) == b
    assert store.mailbox(U, "INBOX").messages == 6000
    assert verify_store(store).ok
    store.close()


def test_read_after_another_process_grew_the_map(store_path, monkeypatch):
    monkeypatch.setattr(engine.db, "INITIAL_MAP_SIZE", 1 * MIB)
    store = Store.init(store_path)
    store.create_mailbox(U, "INBOX")
    try:
        child = run_python(f"""
            import engine.db
            engine.db.INITIAL_MAP_SIZE = {MIB}
            from engine import Message, Store
            s = Store.open({str(store_path)!r})
            for j in range(6):
                s.append_many("alice", "INBOX", [Message(b"%d %d" % (j, i) + b"y" * 200)
                                                 for i in range(2000)])
            s.close()
            """)
        assert child.returncode == 0, child.stderr
        assert len(store.records(U, "INBOX")) == 12000
    finally:
        store.close()


# --- a process killed while reading -----------------------------------------------------------

def _spawn(code: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    assert line == "ready", p.stderr.read()
    return p


def test_stale_reader_of_a_killed_process_is_cleared_at_open(store_path):
    store = Store.init(store_path)
    store.create_mailbox(U, "INBOX")
    store.append(U, "INBOX", b"before")
    store.close()
    # A second process keeps the environment open, so that LMDB does not simply reset the
    # reader table because nobody else has it open: only reader_check() can clear the slot.
    holder = _spawn(f"""
        import time
        from engine import Store
        s = Store.open({str(store_path)!r})
        print("ready", flush=True)
        time.sleep(120)
        """)
    reader = _spawn(f"""
        import time
        from engine import Store
        s = Store.open({str(store_path)!r})
        txn = s.db.env.begin()
        txn.get(b"x")
        print("ready", flush=True)
        time.sleep(120)
        """)
    try:
        os.kill(reader.pid, signal.SIGKILL)
        reader.wait()
        # The slot is there: a plain LMDB open (no reader_check) still lists the dead reader.
        env = lmdb.open(str(store_path / "db"), max_dbs=engine.db.MAX_TABLES, readonly=True)
        assert str(reader.pid) in env.readers()
        env.close()

        store = Store.open(store_path)
        assert str(reader.pid) not in store.db.env.readers()
        store.append(U, "INBOX", b"after")
        assert [store.read_body(r.address) for r in store.records(U, "INBOX")] == \
            [b"before", b"after"]
        assert verify_store(store).ok
        store.close()
    finally:
        holder.kill()
        holder.wait()
        for p in (holder, reader):
            p.stdout.close()
            p.stderr.close()


# --- crashes between the blob fsync and the LMDB commit ------------------------------------------

def test_failure_after_blob_sync_before_commit(store):
    store.create_mailbox(U, "INBOX")
    store.append(U, "INBOX", b"old")
    before, info = dump(store), store.user_info(U).pack()
    real_sync = store.blobs.sync

    def sync_then_crash():
        real_sync()                          # the bytes are durable ...
        raise OSError("power lost")          # ... and the commit never happens
    store.blobs.sync = sync_then_crash
    with pytest.raises(OSError):
        store.append(U, "INBOX", b"new body")
    store.blobs.sync = real_sync
    assert dump(store) == before and store.user_info(U).pack() == info
    assert not store.has_body(address_of(b"new body"))
    assert verify_store(store).ok
    rec = store.append(U, "INBOX", b"new body")      # and it can be appended afterwards
    assert rec.uid == 2 and store.read_body(rec.address) == b"new body"
    assert verify_store(store).ok


def test_process_killed_after_blob_sync_before_commit(store_path):
    store = Store.init(store_path)
    store.create_mailbox(U, "INBOX")
    store.append(U, "INBOX", b"old")
    before = dump(store)
    store.close()
    child = run_python(f"""
        import os
        from engine import Store
        s = Store.open({str(store_path)!r})
        real = s.blobs.sync
        def sync_then_die():
            real()
            os._exit(9)
        s.blobs.sync = sync_then_die
        s.append("alice", "INBOX", b"body of the dying process")
        """)
    assert child.returncode == 9, child.stderr
    store = Store.open(store_path)
    try:
        assert dump(store) == before
        assert not store.has_body(address_of(b"body of the dying process"))
        assert verify_store(store).ok
        rec = store.append(U, "INBOX", b"body of the dying process")
        assert store.read_body(rec.address) == b"body of the dying process"
        assert verify_store(store).ok
    finally:
        store.close()


def test_process_killed_while_writing_a_pack(store_path):
    """A torn entry at the end of a pack is never referenced; later appends go after it."""
    store = Store.init(store_path)
    store.create_mailbox(U, "INBOX")
    store.append(U, "INBOX", b"old body")
    store.close()
    child = run_python(f"""
        import os
        from engine import Store
        s = Store.open({str(store_path)!r})
        s.append("alice", "INBOX", b"first, committed")
        def die():
            s.blobs._fh.flush()            # part of the entry reached the file ...
            os._exit(9)                    # ... and the process died before the fsync
        s.blobs.sync = die
        s.append("alice", "INBOX", os.urandom(300000))
        """)
    assert child.returncode == 9, child.stderr
    store = Store.open(store_path)
    try:
        assert [store.read_body(r.address) for r in store.records(U, "INBOX")] == \
            [b"old body", b"first, committed"]
        assert verify_store(store).ok
        for i in range(3):
            store.append(U, "INBOX", b"after the crash %d" % i)
        store.close()
        store = Store.open(store_path)
        assert [store.read_body(r.address) for r in store.records(U, "INBOX")][2:] == \
            [b"after the crash %d" % i for i in range(3)]
        assert verify_store(store).ok
    finally:
        store.close()


# --- an exception inside a mutation ---------------------------------------------------------------

def _prepare(store):
    store.create_mailbox(U, "INBOX")
    store.create_mailbox(U, "A")
    store.create_mailbox(U, "A/B")
    store.append_many(U, "INBOX", [Message(b"m%d" % i, ("\\Seen",)) for i in range(4)])
    store.subscribe(U, "A")
    store.sieve_put(U, "s", b"keep;")
    store.set_acl(U, "A", "bob", "lr")
    store.set_annotation(U, "A", "/comment", b"c")
    store.set_quota(U, "", {"STORAGE": 9})
    store.set_seen(U, "box", "1")
    store.subscribe(U, "gone")
    store.unsubscribe(U, "gone")          # a tombstone for expire_tombstones


OPERATIONS = {
    "create_mailbox": lambda s: s.create_mailbox(U, "New"),
    "rename_mailbox": lambda s: s.rename_mailbox(U, "A", "Z"),
    "rename INBOX": lambda s: s.rename_mailbox(U, "INBOX", "Old"),
    "delete_mailbox": lambda s: s.delete_mailbox(U, "A"),
    "append": lambda s: s.append(U, "INBOX", b"brand new body"),
    "append_many": lambda s: s.append_many(U, "INBOX", [Message(b"n1"), Message(b"n2")]),
    "copy": lambda s: s.copy(U, "INBOX", [(1, 3)], "A"),
    "move": lambda s: s.copy(U, "INBOX", [(1, 3)], "A", move=True),
    "set_flags": lambda s: s.set_flags(U, "INBOX", None, ["$X"], mode="add"),
    "expunge": lambda s: s.expunge(U, "INBOX", [(2, 3)]),
    "set_message_annotation": lambda s: s.set_message_annotation(U, "INBOX", 1, "/c", "", b"v"),
    "subscribe": lambda s: s.subscribe(U, "INBOX"),
    "unsubscribe": lambda s: s.unsubscribe(U, "A"),
    "set_seen": lambda s: s.set_seen(U, "box", "1:9"),
    "delete_seen": lambda s: s.delete_seen(U, "box"),
    "sieve_put": lambda s: s.sieve_put(U, "t", b"new script body"),
    "sieve_activate": lambda s: s.sieve_activate(U, "s"),
    "sieve_delete": lambda s: s.sieve_delete(U, "s"),
    "set_acl": lambda s: s.set_acl(U, "A", "carol", "lrs"),
    "delete acl": lambda s: s.set_acl(U, "A", "bob", None),
    "set_annotation": lambda s: s.set_annotation(U, "A", "/specialuse", b"\\Sent"),
    "unset annotation": lambda s: s.set_annotation(U, "A", "/comment", None),
    "set_quota": lambda s: s.set_quota(U, "", {"STORAGE": 10}),
    "remove quota": lambda s: s.set_quota(U, "", None),
    "expire_tombstones": lambda s: s.expire_tombstones(U, s.user_info(U).modseq + 1),
}


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_exception_inside_a_mutation_changes_nothing(store, monkeypatch, op):
    """Everything the mutation wrote (objects, indexes, CRCs, the user record) is rolled back."""
    _prepare(store)
    before = dump(store)
    real_finish = Mutation.finish

    def finish_then_fail(self):
        real_finish(self)          # every write of the mutation is in the transaction now
        raise RuntimeError("injected")
    monkeypatch.setattr(Mutation, "finish", finish_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        OPERATIONS[op](store)
    monkeypatch.undo()
    assert dump(store) == before
    assert verify_store(store).ok
    # The same operation works afterwards and leaves a sound store.
    OPERATIONS[op](store)
    assert dump(store) != before
    assert verify_store(store).ok


def test_exception_half_way_through_a_batch(store, monkeypatch):
    _prepare(store)
    before = dump(store)
    real = Mutation.put_record
    calls = []

    def put_record(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected on the third record")
        return real(self, *a, **kw)
    monkeypatch.setattr(Mutation, "put_record", put_record)
    with pytest.raises(RuntimeError):
        store.append_many(U, "INBOX", [Message(b"batch %d" % i) for i in range(5)])
    monkeypatch.undo()
    assert dump(store) == before
    recs = store.append_many(U, "INBOX", [Message(b"batch %d" % i) for i in range(5)])
    assert [store.read_body(r.address) for r in recs] == [b"batch %d" % i for i in range(5)]
    assert verify_store(store).ok


# --- modseq across close and reopen ---------------------------------------------------------------

def test_modseq_persists_across_reopen(store_path):
    store = Store.init(store_path)
    _prepare(store)
    m = store.user_info(U).modseq
    digest = store.user_info(U).digest
    store.close()
    for _ in range(3):
        store = Store.open(store_path)
        assert store.user_info(U).modseq == m and store.user_info(U).digest == digest
        store.subscribe(U, f"s{m}")
        assert store.user_info(U).modseq == m + 1
        m += 1
        digest = store.user_info(U).digest
        store.close()
    store = Store.open(store_path, readonly=True)
    assert store.user_info(U).modseq == m
    assert verify_store(store).ok
    store.close()
