"""engine/gc.py: unreferenced bodies go only after the retention period; nothing live ever goes."""
from __future__ import annotations

import fcntl
import random
import subprocess
import sys
import textwrap

import pytest

import engine.blobs
import engine.gc
from engine import Message, Store
from engine.blobs import address_of
from engine.errors import NoSuchMessage
from engine.gc import collect
from engine.model import unpackb
from engine.verify import verify_store

U = "alice"
DAY = 86400
T0 = 2_000_000_000          # a "now" well after every pack was created
FAR = T0 + 10_000 * DAY


def mark_of(store, address):
    with store.db.read() as txn:
        raw = txn.get("blobs", address)
    return None if raw is None else unpackb(raw)[7]


def body(i: int, n: int = 3000) -> bytes:
    return random.Random(i).randbytes(n)


def live_bodies_readable(store):
    for mb in store.mailboxes(U):
        for r in store.records(U, mb.name):
            assert store.read_body(r.address) is not None
    for s in store.sieve_scripts(U):
        store.read_body(s.address)


def test_expunged_body_survives_the_retention_period(store):
    store.create_mailbox(U, "INBOX")
    gone = store.append(U, "INBOX", b"to be expunged")
    kept = store.append(U, "INBOX", b"to be kept")
    store.expunge(U, "INBOX", [(gone.uid, gone.uid)])
    assert store.read_body(gone.address) == b"to be expunged"     # expunge deletes no body

    r = collect(store, retention=7 * DAY, now=T0)
    assert (r.marked, r.removed) == (1, 0)
    assert mark_of(store, gone.address) == T0 and mark_of(store, kept.address) == 0
    r = collect(store, retention=7 * DAY, now=T0 + 7 * DAY - 1)
    assert (r.marked, r.removed) == (0, 0)
    assert store.read_body(gone.address) == b"to be expunged"
    assert verify_store(store).ok

    r = collect(store, retention=7 * DAY, now=T0 + 7 * DAY)
    assert r.removed == 1 and r.removed_bytes == len(b"to be expunged")
    with pytest.raises(NoSuchMessage):
        store.read_body(gone.address)
    assert not store.has_body(gone.address)
    assert store.address_for_sha1(gone.sha1) is None
    assert store.read_body(kept.address) == b"to be kept"
    assert verify_store(store).ok


def test_referenced_bodies_are_never_removed(store):
    store.create_mailbox(U, "INBOX")
    store.create_mailbox(U, "Other")
    store.create_mailbox("bob", "INBOX")
    shared = b"shared body"
    a = store.append(U, "INBOX", shared)
    store.append(U, "Other", shared)
    store.append("bob", "INBOX", b"bob's body")
    store.sieve_put(U, "s", b"keep;")
    store.expunge(U, "INBOX", [(a.uid, a.uid)])      # still referenced from Other
    for now in (T0, T0 + DAY, FAR, FAR * 2):
        r = collect(store, retention=0, now=now)
        assert r.removed == 0 and r.marked == 0
    live_bodies_readable(store)
    assert store.read_body(a.address) == shared
    assert store.sieve_script(U, "s") == b"keep;"
    assert verify_store(store).ok


def test_a_body_referenced_again_is_unmarked(store):
    store.create_mailbox(U, "INBOX")
    rec = store.append(U, "INBOX", b"comes back")
    store.expunge(U, "INBOX", [(1, 1)])
    collect(store, retention=DAY, now=T0)
    assert mark_of(store, rec.address) == T0
    again = store.append(U, "INBOX", b"comes back")          # deduplicated: same blob
    assert again.address == rec.address
    r = collect(store, retention=DAY, now=T0 + 2 * DAY)
    assert r.removed == 0 and mark_of(store, rec.address) == 0
    assert store.read_body(rec.address) == b"comes back"
    # Unreferenced once more: the retention period starts again from now.
    store.expunge(U, "INBOX", [(again.uid, again.uid)])
    collect(store, retention=DAY, now=T0 + 3 * DAY)
    assert mark_of(store, rec.address) == T0 + 3 * DAY
    assert collect(store, retention=DAY, now=T0 + 4 * DAY - 1).removed == 0
    assert collect(store, retention=DAY, now=T0 + 4 * DAY).removed == 1
    assert verify_store(store).ok


def test_bodies_of_deleted_mailboxes_and_scripts_are_collected(store):
    store.create_mailbox(U, "Doomed")
    rec = store.append(U, "Doomed", b"in a deleted mailbox")
    store.sieve_put(U, "old", b"discard;")
    script = store.sieve_scripts(U)[0].address
    store.delete_mailbox(U, "Doomed")
    store.sieve_delete(U, "old")
    collect(store, retention=0, now=T0)
    r = collect(store, retention=0, now=T0)
    assert r.removed == 2
    assert not store.has_body(rec.address) and not store.has_body(script)
    assert verify_store(store).ok


# Bodies of 3000 random bytes are stored raw: 53 + 3000 bytes an entry, so a pack
# with this target holds exactly 10 of them (8 + 9 * 3053 < 30000 <= 8 + 10 * 3053).
TEN_PER_PACK = 30000


@pytest.fixture
def ten_per_pack(monkeypatch):
    monkeypatch.setattr(engine.blobs, "PACK_TARGET_SIZE", TEN_PER_PACK)


def _packs_with(store, groups):
    """One full pack per group of ten bodies, then a filler in the (new) current pack."""
    out = []
    for g in groups:
        assert len(g) == 10
        out.append(store.append_many(U, "INBOX", [Message(b) for b in g]))
    store.append(U, "INBOX", b"filler in the current pack")
    return out


def pack_of(store, address):
    with store.db.read() as txn:
        return unpackb(txn.get("blobs", address))[0]


def test_mostly_dead_pack_is_rewritten_and_live_bodies_stay_readable(store_path, ten_per_pack,
                                                                     monkeypatch):
    monkeypatch.setattr(engine.gc, "SMALL_PACK", 0)        # only the live-share rule
    store = Store.init(store_path)
    store.create_mailbox(U, "INBOX")
    dead_heavy, live_heavy = _packs_with(store, [[body(i) for i in range(10)],
                                                 [body(100 + i) for i in range(10)]])
    p1, p2 = pack_of(store, dead_heavy[0].address), pack_of(store, live_heavy[0].address)
    assert p1 != p2 and store.blobs.current_pack not in (p1, p2)
    # 8 of 10 dead in the first pack, 2 of 10 in the second.
    store.expunge(U, "INBOX", [(1, 8), (11, 12)])
    collect(store, retention=DAY, now=T0)
    marked_only = collect(store, retention=DAY, now=T0 + 1)
    assert marked_only.packs_rewritten == 0                  # the marked bodies are still there
    r = collect(store, retention=DAY, now=T0 + DAY)
    assert r.removed == 10
    assert r.packs_rewritten == 1 and r.reclaimed_bytes > 0
    packs_after = store.blobs.packs()
    assert p1 not in packs_after and p2 in packs_after
    for rec in dead_heavy[8:]:
        assert store.read_body(rec.address) == body(rec.uid - 1)
        assert pack_of(store, rec.address) != p1
    for rec in live_heavy[2:]:
        assert store.read_body(rec.address) == body(100 + rec.uid - 11)
    assert verify_store(store).ok
    store.close()
    store = Store.open(store_path)
    live_bodies_readable(store)
    assert verify_store(store).ok
    store.close()


def test_small_packs_are_merged(store, ten_per_pack, monkeypatch):
    monkeypatch.setattr(engine.gc, "SMALL_PACK", TEN_PER_PACK * 2)
    store.create_mailbox(U, "INBOX")
    groups = _packs_with(store, [[body(i) for i in range(10)], [body(10 + i) for i in range(10)]])
    before = {pack_of(store, g[0].address) for g in groups}
    r = collect(store, retention=DAY, now=T0)
    assert r.packs_rewritten == 2 and r.removed == 0
    assert not before & set(store.blobs.packs())
    live_bodies_readable(store)
    assert verify_store(store).ok


def test_dead_pack_is_deleted(store, ten_per_pack):
    store.create_mailbox(U, "INBOX")
    group, = _packs_with(store, [[body(i) for i in range(10)]])
    first = pack_of(store, group[0].address)
    store.expunge(U, "INBOX", [(1, 10)])
    collect(store, retention=0, now=T0)
    r = collect(store, retention=0, now=T0)
    assert r.packs_deleted == 1 and first not in store.blobs.packs()
    assert store.read_body(store.records(U, "INBOX")[0].address) == b"filler in the current pack"
    assert verify_store(store).ok


def test_current_pack_and_packs_held_by_a_writer_are_left_alone(store, ten_per_pack):
    store.create_mailbox(U, "INBOX")
    group, = _packs_with(store, [[body(i) for i in range(10)]])
    full = pack_of(store, group[0].address)
    store.expunge(U, "INBOX", [(1, 11)])                  # everything, the filler too
    with open(store.path / "blobs" / f"{full}.pack", "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)         # another writer appending to it
        collect(store, retention=0, now=T0)
        r = collect(store, retention=0, now=T0)
        assert r.removed == 11 and r.packs_rewritten == r.packs_deleted == 0
        assert full in store.blobs.packs() and store.blobs.current_pack in store.blobs.packs()
    r = collect(store, retention=0, now=T0)               # released: now it goes
    assert r.packs_deleted == 1 and full not in store.blobs.packs()
    assert store.blobs.current_pack in store.blobs.packs()
    assert verify_store(store).ok


def test_failed_rewrite_keeps_the_old_pack(store, ten_per_pack, monkeypatch):
    """If the new copies cannot be made durable, the index and the old pack stay as they were."""
    store.create_mailbox(U, "INBOX")
    recs, = _packs_with(store, [[body(i) for i in range(10)]])
    old = pack_of(store, recs[0].address)
    store.expunge(U, "INBOX", [(1, 8)])
    collect(store, retention=0, now=T0)
    real_sync = store.blobs.sync

    def fail():
        raise OSError("disk full")
    monkeypatch.setattr(store.blobs, "sync", fail)
    with pytest.raises(OSError):
        collect(store, retention=0, now=T0)
    monkeypatch.setattr(store.blobs, "sync", real_sync)
    assert old in store.blobs.packs()
    for rec in recs[8:]:
        assert pack_of(store, rec.address) == old
        assert store.read_body(rec.address) == body(rec.uid - 1)
    assert verify_store(store).ok
    # And the next run finishes the job.
    collect(store, retention=0, now=T0)
    assert old not in store.blobs.packs()
    for rec in recs[8:]:
        assert store.read_body(rec.address) == body(rec.uid - 1)
    assert verify_store(store).ok


def test_gc_then_append_of_a_collected_body(store):
    store.create_mailbox(U, "INBOX")
    rec = store.append(U, "INBOX", b"reborn")
    store.expunge(U, "INBOX", [(1, 1)])
    collect(store, retention=0, now=T0)
    collect(store, retention=0, now=T0)
    assert not store.has_body(rec.address)
    again = store.append(U, "INBOX", b"reborn")
    assert store.read_body(again.address) == b"reborn"
    assert address_of(b"reborn") == again.address
    assert verify_store(store).ok


def test_writer_taking_over_a_pack_while_gc_removes_it(store_path):
    store = Store.init(store_path)
    store.create_mailbox(U, "INBOX")
    store.append_many(U, "INBOX", [Message(b"old %d" % i) for i in range(3)])
    doomed = store.blobs.current_pack
    store.close()
    store = Store.open(store_path)
    with open(store.path / "blobs" / f"{doomed}.pack", "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)   # so that this process starts its own pack
        store.append(U, "INBOX", b"in the gc process's own pack")
    store.expunge(U, "INBOX", [(1, 3)])              # the doomed pack is now all garbage
    collect(store, retention=0, now=T0)
    real_remove = store.blobs.remove_pack

    def remove_pack(pack):                           # another process writes just now
        child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from engine import Store
            s = Store.open({str(store_path)!r})
            s.append("alice", "INBOX", b"written while gc removes a pack")
            s.close()
            """)], capture_output=True, text=True, timeout=120, check=False)
        assert child.returncode == 0, child.stderr
        real_remove(pack)
    store.blobs.remove_pack = remove_pack
    try:
        collect(store, retention=0, now=T0)
        assert [store.read_body(r.address) for r in store.records(U, "INBOX")] == \
            [b"in the gc process's own pack", b"written while gc removes a pack"]
        assert verify_store(store).ok
    finally:
        store.blobs.remove_pack = real_remove
        store.close()
