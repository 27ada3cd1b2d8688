"""engine/blobs.py and the store's use of it: bodies byte-exact, once each, damage detected."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest

import engine
import engine.blobs
from engine import Store
from engine.blobs import ENTRY, BlobStore, Location, address_of
from engine.errors import NoSuchMessage, StoreCorrupt
from engine.model import unpackb
from engine.verify import verify_store

MB = 1 << 20


def location(store: Store, address: bytes) -> Location:
    with store.db.read() as txn:
        return Location.from_list(unpackb(txn.get("blobs", address)))


def pack_path(store: Store, pack: str):
    return store.path / "blobs" / f"{pack}.pack"


def blob_count(store: Store) -> int:
    with store.db.read() as txn:
        return txn.count("blobs")


def rand(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


BODIES = {
    "empty": b"",
    "one NUL": b"\0",
    "NULs inside": b"From: a@b\r\n\r\n\0\0body\0with\0NULs\r\n.\r\n",
    "CR/LF mix": b"a\rb\nc\r\nd\n\r",
    "incompressible": rand(64 * 1024),
    "compressible": b"Subject: hello\r\n" * 5000,
    "all byte values": bytes(range(256)) * 17,
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_body_reads_back_byte_exact(store_path, name):
    body = BODIES[name]
    store = Store.init(store_path)
    store.create_mailbox("u", "INBOX")
    rec = store.append("u", "INBOX", body)
    assert rec.address == address_of(body)
    assert rec.size == len(body)
    assert store.read_body(rec.address) == body
    store.close()
    store = Store.open(store_path)
    assert store.read_body(rec.address) == body
    assert verify_store(store).ok
    store.close()


def test_incompressible_body_is_stored_raw_and_compressible_one_compressed(store):
    store.create_mailbox("u", "INBOX")
    raw = store.append("u", "INBOX", BODIES["incompressible"])
    packed = store.append("u", "INBOX", BODIES["compressible"])
    assert location(store, raw.address).method == engine.blobs.METHOD_RAW
    loc = location(store, packed.address)
    assert loc.method == engine.blobs.METHOD_ZSTD and loc.stored < loc.size // 10


def test_fifty_megabyte_body(store):
    body = os.urandom(50 * MB)
    store.create_mailbox("u", "INBOX")
    rec = store.append("u", "INBOX", body)
    got = store.read_body(rec.address)
    assert len(got) == len(body) and got == body
    assert store.mailbox("u", "INBOX").size == 50 * MB


def test_large_batch_compressed_in_parallel_reads_back(store):
    """append_many compresses big batches on all cores before taking the writer lock."""
    bodies = list(BODIES.values()) * 3 + [rand(777, i) for i in range(engine.blobs.PARALLEL_MIN)]
    store.create_mailbox("u", "INBOX")
    store.append("u", "INBOX", BODIES["compressible"])           # one of them stored already
    recs = store.append_many("u", "INBOX", [engine.Message(b) for b in bodies])
    assert [store.read_body(r.address) for r in recs] == bodies
    assert blob_count(store) == len(BODIES) + engine.blobs.PARALLEL_MIN
    assert verify_store(store).ok


def test_same_body_is_stored_once(store):
    body = b"From: x\r\n\r\nthe same body\r\n"
    store.create_mailbox("u", "INBOX")
    store.create_mailbox("u", "Other")
    store.create_mailbox("v", "INBOX")
    store.append("u", "INBOX", body)
    pack = store.blobs.current_pack
    size = pack_path(store, pack).stat().st_size
    store.append("u", "Other", body)
    store.append("v", "INBOX", body)
    store.append_many("u", "INBOX", [engine.Message(body), engine.Message(body)])
    store.copy("u", "INBOX", None, "Other")
    assert blob_count(store) == 1
    assert pack_path(store, pack).stat().st_size == size
    with store.db.read() as txn:
        assert txn.count("sha1") == 1
    assert len(store.records("u", "Other")) == 4
    assert verify_store(store).ok


def test_unknown_address_is_no_such_message(store):
    with pytest.raises(NoSuchMessage):
        store.read_body(b"\1" * 32)


# --- damage ------------------------------------------------------------------------------

def _flip(path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ mask]))


# Offsets inside one pack entry: header fields, then the stored payload.
FLIPS = {
    "entry magic": lambda loc: 0,
    "address in header": lambda loc: 5 + 17,
    "stored length": lambda loc: 37 + 7,
    "size": lambda loc: 45 + 7,
    "first payload byte": lambda loc: ENTRY.size,
    "middle payload byte": lambda loc: ENTRY.size + loc.stored // 2,
    "last payload byte": lambda loc: ENTRY.size + loc.stored - 1,
}


@pytest.mark.parametrize("kind", ["compressible", "incompressible"])
@pytest.mark.parametrize("where", sorted(FLIPS))
def test_flipped_byte_is_detected(store, kind, where):
    body = BODIES[kind]
    store.create_mailbox("u", "INBOX")
    store.append("u", "INBOX", b"a neighbour before")
    rec = store.append("u", "INBOX", body)
    store.append("u", "INBOX", b"a neighbour after")
    loc = location(store, rec.address)
    _flip(pack_path(store, loc.pack), loc.offset + FLIPS[where](loc))
    with pytest.raises(StoreCorrupt):
        store.read_body(rec.address)
    report = verify_store(store)
    assert [(p.what, p.subject) for p in report.problems] == [("blob", rec.address.hex())] or \
        {(p.what, p.subject) for p in report.problems} == {("blob", loc.pack), ("blob", rec.address.hex())}
    # The neighbours are untouched.
    for r in store.records("u", "INBOX"):
        if r.uid != rec.uid:
            store.read_body(r.address)


@pytest.mark.parametrize("kind", ["compressible", "incompressible"])
def test_flipped_low_bit_of_method_is_detected(store, kind):
    """zstd <-> raw: the payload no longer decodes to the right length or hash."""
    store.create_mailbox("u", "INBOX")
    rec = store.append("u", "INBOX", BODIES[kind])
    loc = location(store, rec.address)
    _flip(pack_path(store, loc.pack), loc.offset + 4, 0x01)
    with pytest.raises(StoreCorrupt):
        store.read_body(rec.address)
    assert not verify_store(store).ok


def test_unknown_method_byte_is_detected(store):
    """A damaged (or future) method byte is refused, not guessed to be zstd."""
    store.create_mailbox("u", "INBOX")
    rec = store.append("u", "INBOX", BODIES["compressible"])
    loc = location(store, rec.address)
    _flip(pack_path(store, loc.pack), loc.offset + 4, 0x40)   # method 0 -> 0x40
    with pytest.raises(StoreCorrupt):
        store.read_body(rec.address)
    assert not verify_store(store).ok


def test_verify_names_each_damaged_blob(store):
    store.create_mailbox("u", "INBOX")
    recs = store.append_many("u", "INBOX", [engine.Message(rand(3000, i)) for i in range(5)])
    for r in recs[1::2]:
        loc = location(store, r.address)
        _flip(pack_path(store, loc.pack), loc.offset + ENTRY.size + 10)
    report = verify_store(store)
    assert sorted(p.subject for p in report.problems) == sorted(r.address.hex() for r in recs[1::2])
    assert all(p.what == "blob" for p in report.problems)


@pytest.mark.parametrize("cut", [1, ENTRY.size, "into header"])
def test_truncated_pack_is_detected(store, cut):
    store.create_mailbox("u", "INBOX")
    first = store.append("u", "INBOX", rand(2000, 1))
    last = store.append("u", "INBOX", rand(2000, 2))
    loc = location(store, last.address)
    path = pack_path(store, loc.pack)
    store.close()
    size = path.stat().st_size
    new_size = loc.offset + 10 if cut == "into header" else size - cut
    os.truncate(path, new_size)
    store = Store.open(store.path)
    try:
        with pytest.raises(StoreCorrupt):
            store.read_body(last.address)
        assert store.read_body(first.address) == rand(2000, 1)
        report = verify_store(store)
        assert [(p.what, p.subject) for p in report.problems] == [("blob", last.address.hex())]
    finally:
        store.close()


def test_missing_pack_is_detected(store):
    store.create_mailbox("u", "INBOX")
    rec = store.append("u", "INBOX", b"body")
    pack = location(store, rec.address).pack
    store.blobs.close()
    pack_path(store, pack).unlink()
    with pytest.raises(StoreCorrupt):
        store.read_body(rec.address)
    assert not verify_store(store).ok


def test_a_blob_in_another_blobs_place_is_detected(store):
    """An index entry pointing at the wrong (intact) entry is caught by the address check."""
    store.create_mailbox("u", "INBOX")
    a = store.append("u", "INBOX", b"body a")
    b = store.append("u", "INBOX", b"body b")

    def swap(txn):
        va, vb = txn.get("blobs", a.address), txn.get("blobs", b.address)
        txn.put("blobs", a.address, vb)
        txn.put("blobs", b.address, va)
    store.db.write(swap)
    with pytest.raises(StoreCorrupt):
        store.read_body(a.address)
    assert {p.subject for p in verify_store(store).problems} >= {a.address.hex(), b.address.hex()}


# --- packs -------------------------------------------------------------------------------

def test_full_packs_roll_over_and_keep_every_body_readable(store_path, monkeypatch):
    monkeypatch.setattr(engine.blobs, "PACK_TARGET_SIZE", 8 * 1024)
    store = Store.init(store_path)
    store.create_mailbox("u", "INBOX")
    bodies = [rand(1500, i) for i in range(40)]
    for i in range(0, 40, 4):
        store.append_many("u", "INBOX", [engine.Message(b) for b in bodies[i:i + 4]])
    packs = store.blobs.packs()
    assert len(packs) >= 5
    for p in packs:   # each pack stops soon after the target size
        assert pack_path(store, p).stat().st_size < 8 * 1024 + 1600 + ENTRY.size
    assert {location(store, address_of(b)).pack for b in bodies} == set(packs)
    store.close()
    store = Store.open(store_path)
    for b in bodies:
        assert store.read_body(address_of(b)) == b
    # After reopening, appends go to a pack with room (maybe an old one), never a full one.
    full = {p: pack_path(store, p).stat().st_size for p in packs
            if pack_path(store, p).stat().st_size >= 8 * 1024}
    for i in range(10):
        store.append("u", "INBOX", b"after reopen %d" % i)
    assert {p: pack_path(store, p).stat().st_size for p in full} == full
    for b in bodies:
        assert store.read_body(address_of(b)) == b
    assert verify_store(store).ok
    store.close()


def test_two_writers_never_share_a_pack(store_path):
    """Each writing process appends to a pack no other writer holds (flock)."""
    store = Store.init(store_path)
    store.create_mailbox("u", "INBOX")
    store.append("u", "INBOX", b"from parent")
    mine = store.blobs.current_pack
    store.close()                            # the pack has room: the child may take it over
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from engine import Store
        s = Store.open({str(store_path)!r})
        s.append("u", "INBOX", b"from child")
        print(s.blobs.current_pack, flush=True)
        sys.stdin.readline()                 # hold the pack until the parent has written
        s.append("u", "INBOX", b"from child again")
        s.close()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        childs = child.stdout.readline().strip()
        assert childs == mine                # reused: it had room and nobody held it
        store = Store.open(store_path)
        store.append("u", "INBOX", b"from parent again")
        assert store.blobs.current_pack != childs
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
        assert [store.read_body(r.address) for r in store.records("u", "INBOX")] == \
            [b"from parent", b"from child", b"from parent again", b"from child again"]
        assert verify_store(store).ok
        store.close()
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


def test_reopened_store_continues_a_pack_with_room(store_path):
    store = Store.init(store_path)
    store.create_mailbox("u", "INBOX")
    store.append("u", "INBOX", b"one")
    store.close()
    store = Store.open(store_path)
    store.append("u", "INBOX", b"two")
    assert len(store.blobs.packs()) == 1
    assert [store.read_body(r.address) for r in store.records("u", "INBOX")] == [b"one", b"two"]
    store.close()


def test_explicit_rollover(store):
    store.create_mailbox("u", "INBOX")
    a = store.append("u", "INBOX", b"one")
    first = store.blobs.current_pack
    store.blobs.rollover()
    assert store.blobs.current_pack is None
    b = store.append("u", "INBOX", b"two")
    assert location(store, a.address).pack == first != location(store, b.address).pack
    assert store.read_body(a.address) == b"one" and store.read_body(b.address) == b"two"


def test_blobstore_on_its_own(scratch):
    """The pack layer without LMDB: append, read before and after sync, entries self-describing."""
    bs = BlobStore(scratch / "blobs")
    data = [b"", b"x" * 10000, rand(5000)]
    locs = [bs.append(address_of(d), d) for d in data]
    assert [bs.read(address_of(d), loc) for d, loc in zip(data, locs)] == data   # before sync
    again = bs.append(address_of(data[1]), data[1])
    assert again == locs[1]              # staged: the same bytes are not written twice
    bs.sync()
    for d, loc in zip(data, locs):
        assert Location.from_list(loc.to_list()) == loc
        method, header_address, _payload = bs.read_stored(loc)
        assert header_address == address_of(d) and method == loc.method
        assert bs.read(address_of(d), loc) == d
    with pytest.raises(StoreCorrupt):
        bs.read(address_of(b"something else"), locs[1])
    bs.close()
