"""Change sets: state tokens, building against a base, the wire form, diff files.

The reference for "what a change set from base S must hold" is computed by
brute force from ``changes_since(user, 0)`` (every object, tombstones
included, with its stamp), never from the per-origin index build() uses.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import Message
from engine.apply import LegalityError, apply
from engine.changeset import (
    ChangeSet,
    build,
    covers,
    decode_items,
    decode_token,
    encode_items,
    encode_token,
    split,
    state_of,
)
from engine.errors import FullSyncNeeded, ModsyncError, ProtocolError
from engine.model import ACL, ANNOTATION, KIND_NAMES, MAILBOX, RECORD

from . import harness
from .harness import USER, dump, exchange, sync

KIND_OF = {name: kind for kind, name in KIND_NAMES.items()}

store_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
vectors = st.dictionaries(store_ids, st.integers(min_value=1, max_value=2 ** 63 - 1), max_size=5)


# -- state tokens ---------------------------------------------------------------------
@given(user=st.sampled_from(["u", "alice", "ünïcode"]), vv=vectors)
def test_token_round_trip(user, vv):
    token = encode_token(user, vv)
    assert token.startswith("ms1.") and token.isascii() and " " not in token
    assert decode_token(token) == (user, vv)


def test_token_of_first_sync():
    assert decode_token("0") == (None, {})
    assert decode_token("") == (None, {})
    # Zero entries carry nothing and are left out.
    assert decode_token(encode_token("u", {"ab" * 16: 0})) == ("u", {})


def _good_token():
    return encode_token("u", {"ab" * 16: 7, "cd" * 16: 9})


@pytest.mark.parametrize("token", [
    "ms2.abc", "MS1.abc", "hello", "ms1", "ms1.!!!!", "ms1.A",
    _good_token()[:-6], _good_token()[:8], _good_token() + "AAAA",
    "ms1." + __import__("base64").urlsafe_b64encode(msgpack.packb([2, "u", []])).decode(),
    "ms1." + __import__("base64").urlsafe_b64encode(msgpack.packb({"a": 1})).decode(),
    "ms1." + __import__("base64").urlsafe_b64encode(msgpack.packb([1, "u", [[b"x", "y"]]])).decode(),
])
def test_damaged_token_is_refused(token):
    with pytest.raises(ProtocolError) as ei:
        decode_token(token)
    assert "modsync state" in str(ei.value)


def test_every_truncation_of_a_token_is_refused():
    token = _good_token()
    for n in range(1, len(token)):
        t = token[:n]
        if t in ("0",):
            continue
        with pytest.raises(ProtocolError):
            decode_token(t)


# -- building -----------------------------------------------------------------------------
def identity(change) -> tuple:
    """(kind byte, ident) of a Change, as build() names it."""
    o, mb = change.object, change.mailbox
    kind = KIND_OF[change.kind]
    ident = {
        "mailbox": lambda: (o.id,),
        "record": lambda: (mb.id, o.uid),
        "subscription": lambda: (o.name,),
        "seen": lambda: (o.mailbox_id,),
        "sieve": lambda: (o.name,),
        "annotation": lambda: (mb.id, o.entry, o.userid),
        "acl": lambda: (mb.id, o.identifier),
        "quota": lambda: (o.root,),
    }[change.kind]()
    return kind, ident


def brute_force(store, base) -> dict:
    """{(kind, ident): (origin id, origin modseq, removed)} a change set for ``base`` must hold."""
    with store.db.read() as txn:
        def oid(n):
            return store.origin_id(txn, n)
        everything = {}
        for ch in store.changes_since(USER, 0):
            s = ch.object.stamp
            everything[identity(ch)] = (oid(s.origin), s.origin_modseq, s.removed)
    want = {k: v for k, v in everything.items() if not covers(base, v[0], v[1])}
    for (kind, ident) in list(want):
        if kind in (RECORD, ACL, ANNOTATION):
            mk = (MAILBOX, (ident[0],))
            want[mk] = everything[mk]
    return want


def as_found(cs) -> dict:
    return {(i.kind, i.ident): (i.origin, i.origin_modseq, i.removed) for i in cs.items}


def full_store(make_store):
    a = make_store()
    a.create_mailbox(USER, "INBOX")
    a.create_mailbox(USER, "Work")
    a.create_mailbox(USER, "Gone")
    a.append_many(USER, "Work", [Message(b"w%d" % i, ("\\Seen",), 1) for i in range(5)])
    a.append(USER, "Gone", b"g", internaldate=1)
    a.expunge(USER, "Work", [(2, 3)])
    a.delete_mailbox(USER, "Gone")
    a.subscribe(USER, "Work")
    a.subscribe(USER, "Old")
    a.unsubscribe(USER, "Old")
    a.set_seen(USER, "othermailbox000000000001", "1:4")
    a.sieve_put(USER, "main", b"keep;")
    a.sieve_put(USER, "old", b"discard;")
    a.sieve_activate(USER, "main")
    a.sieve_delete(USER, "old")
    a.set_annotation(USER, "Work", "/comment", b"c")
    a.set_annotation(USER, "Work", "/gone", b"x")
    a.set_annotation(USER, "Work", "/gone", None)
    a.set_acl(USER, "Work", "bob", "lrs")
    a.set_acl(USER, "Work", "eve", "lr")
    a.set_acl(USER, "Work", "eve", None)
    a.set_quota(USER, "", {"STORAGE": 1000})
    a.set_quota(USER, "Work", {"MESSAGE": 9})
    a.set_quota(USER, "Work", None)
    a.set_message_annotation(USER, "Work", 1, "/comment", "", b"note")
    return a


def test_build_from_empty_base_has_everything(make_store):
    a = full_store(make_store)
    cs = build(a, USER, {})
    got = as_found(cs)
    assert got == brute_force(a, {})
    removed = {KIND_NAMES[k] for (k, _), v in got.items() if v[2]}
    # Tombstones of every kind that leaves one travel too.
    assert {"mailbox", "record", "subscription", "sieve", "annotation", "acl", "quota"} <= removed
    assert cs.state == state_of(a, USER)
    assert cs.max_modseq == max(v[1] for v in got.values())
    live_bodies = {bytes(i.fields[0]) for i in cs.items if i.kind == RECORD and not i.removed}
    assert set(cs.bodies) >= live_bodies
    # And it reproduces the store exactly.
    b = make_store()
    assert apply(b, cs, bodies=a.read_body).status == "applied"
    assert b.status(USER)["digest"] == a.status(USER)["digest"]


def _histories(root, seeds):
    """Three replicas with several origins in their history, and states seen on the way."""
    for seed in seeds:
        with harness.seeded_ids(seed):
            w = harness.World(root / f"world{seed}", seed, 3)
            gen = harness.Generator(seed, 3, 30)
            bases = [{}]
            for _ in range(60):
                try:
                    w.step(gen.next(w))
                except harness.Failure:
                    pass        # engine bugs are the convergence tests' business
                bases.extend(w._state(r) for r in range(3))
        try:
            yield w, bases
        finally:
            w.close()
            shutil.rmtree(root / f"world{seed}", ignore_errors=True)


def test_build_from_later_base_is_exactly_what_the_base_lacks(workdir):
    checked = 0
    for w, bases in _histories(Path(workdir), range(12)):
        rng = random.Random(len(bases))
        for store in w.replicas:
            if USER not in store.users():
                continue
            vv = state_of(store, USER)
            picks = rng.sample(bases, min(8, len(bases)))
            # Arbitrary vectors too: partly ahead, partly behind, unknown origins.
            picks.append({o: rng.randrange(0, n + 2) for o, n in vv.items()})
            picks.append({**vv, "ee" * 16: 5})
            picks.append(vv)
            for base in picks:
                cs = build(store, USER, base)
                assert as_found(cs) == brute_force(store, base), base
                assert len(cs.items) == len(as_found(cs))     # each object once
                checked += 1
    assert checked > 100


def held(store) -> dict:
    """{(kind, ident): (origin id, origin modseq, removed)} of every object ``store`` holds."""
    if USER not in store.users():
        return {}
    with store.db.read() as txn:
        def oid(n):
            return store.origin_id(txn, n)
        return {identity(ch): (oid(ch.object.stamp.origin), ch.object.stamp.origin_modseq,
                               ch.object.stamp.removed) for ch in store.changes_since(USER, 0)}


def test_a_first_sync_in_parts_ends_where_the_whole_does(workdir, make_store):
    """Each part applies cleanly and leaves an exact state (the receiver holds what it
    covers, no more); stopping after any part, an ordinary change set completes it."""
    parted = cut = 0
    for w, _bases in _histories(Path(workdir), range(18, 30)):
        for store in w.replicas:
            if USER not in store.users():
                continue
            cs = build(store, USER, {})
            everything = held(store)
            for size in (1, 3, 7):
                parts = split(cs, size)
                parted += len(parts) > 1
                assert [i for p in parts for i in p.items if i.kind != MAILBOX] == sorted(
                    (i for i in cs.items if i.kind != MAILBOX),
                    key=lambda i: [j for p in parts for j in p.items].index(i))
                assert parts[0].base == {} and parts[-1].state == cs.state
                assert sorted(b for p in parts for b in p.bodies) == sorted(cs.bodies)
                dst = make_store()
                stop = len(parts) // 2
                for k, part in enumerate(parts):
                    if k:
                        assert part.base == parts[k - 1].state
                    assert apply(dst, part, bodies=store.read_body).status in ("applied",
                                                                               "nothing")
                    assert state_of(dst, USER) == part.state
                    assert held(dst) == {key: v for key, v in everything.items()
                                         if covers(part.state, v[0], v[1])}
                    if k + 1 == stop:       # cut off here: the next run completes it
                        rest = build(store, USER, state_of(dst, USER))
                        other = make_store()
                        for p in parts[:stop]:
                            apply(other, p, bodies=store.read_body)
                        assert apply(other, rest, bodies=store.read_body).ok
                        assert other.status(USER)["digest"] == store.status(USER)["digest"]
                        cut += 1
                assert dst.status(USER)["digest"] == store.status(USER)["digest"]
    assert parted > 10 and cut > 10


def test_parts_of_an_import_and_where_a_mailbox_cannot_be_cut(make_store):
    a = make_store()
    a.create_mailbox(USER, "INBOX")
    a.create_mailbox(USER, "Work")
    for i in range(6):
        a.append_many(USER, "INBOX", [Message(b"i%d-%d" % (i, j)) for j in range(5)])
        a.append(USER, "Work", b"w%d" % i)

    def uidnexts(parts, name):
        return [i.fields[2] for p in parts for i in p.items
                if i.kind == MAILBOX and i.fields[0] == name]
    parts = split(build(a, USER, {}), 10)
    assert [len(p.items) for p in parts] == [13, 14, 14, 2]
    # Each part's mailbox items keep uidnext below the UIDs still to come; each
    # mailbox's CRC is claimed in its last part.
    assert uidnexts(parts, "INBOX") == [11, 21, 31]
    assert uidnexts(parts, "Work") == [2, 4, 6, 7]
    assert [len(p.crcs) for p in parts] == [0, 0, 1, 1]
    # A message changed after newer ones arrived: no cut between its creation and
    # its change, nor between it and the newer UIDs of its mailbox.
    a.set_flags(USER, "INBOX", [(28, 28)], ["\\Flagged"])
    parts = split(build(a, USER, {}), 10)
    assert [len(p.items) for p in parts] == [13, 14, 15]
    assert {i.ident[1] for i in parts[-1].items if i.kind == RECORD} >= {26, 27, 28, 29, 30}
    # Only from an empty base: a receiver with anything may hold any of it.
    assert len(split(build(a, USER, {a.id: 1}), 10)) == 1


def test_items_codec_round_trip_and_refusals(workdir):
    for w, bases in _histories(Path(workdir), range(30, 34)):
        for store in w.replicas:
            if USER in store.users():
                items = build(store, USER, {}).items
                assert decode_items(encode_items(items)) == items
    rec = [RECORD, ["mb", 1], [b"a" * 32, b"s" * 20, 1, 0, 0, ["\\Seen"], [["/c", "", b"v"]],
                              ["ab" * 16, 1], {"\\seen": [2, "cd" * 16]}, 0, [2]],
           b"o" * 16, 3, False]
    assert decode_items(msgpack.packb([rec]))[0].ident == ("mb", 1)
    # Every field of a record broken in turn: refused as a protocol error, never accepted.
    for i, bad in [(1, ["mb", -1]), (1, ["mb"]), (3, b"short"), (4, -1), (5, "no")]:
        broken = list(rec)
        broken[i] = bad
        with pytest.raises(ProtocolError):
            decode_items(msgpack.packb([broken]))
    for j, bad in [(0, b"a"), (1, b"s"), (2, -1), (5, [1]), (6, [["/c", "", "v"]]),
                   (7, ["nothex" * 4, 1]), (8, {"x": [1, "cd"]}), (9, 1 << 32), (10, [-1])]:
        broken = list(rec)
        broken[2] = list(rec[2])
        broken[2][j] = bad
        with pytest.raises(ProtocolError):
            decode_items(msgpack.packb([broken]))
    with pytest.raises(ProtocolError):
        decode_items(b"\xc1")


def test_build_for_own_state_is_empty(make_store):
    a = full_store(make_store)
    cs = build(a, USER, state_of(a, USER))
    assert cs.is_empty() and not cs.bodies


def test_chain_a_to_b_to_c(make_store):
    a, b, c = make_store("a"), make_store("b"), make_store("c")
    a.create_mailbox(USER, "INBOX")
    a.append_many(USER, "INBOX", [Message(b"a%d" % i, (), 1) for i in range(3)])
    sync(a, b)
    b.append(USER, "INBOX", b"from b", internaldate=1)
    b.set_flags(USER, "INBOX", [(1, 1)], ["\\Seen"])
    sync(b, c)
    for x in (a, b):
        assert c.status(USER)["digest"] == b.status(USER)["digest"]
    # C holds A's changes through B: A has nothing C lacks ...
    cs = build(a, USER, state_of(c, USER))
    assert cs.is_empty()
    # ... and B's changes reach A from C, whose store id is neither.
    sync(c, a)
    assert a.status(USER)["digest"] == c.status(USER)["digest"]
    assert build(a, USER, state_of(c, USER)).is_empty()
    assert state_of(a, USER) == state_of(b, USER) == state_of(c, USER)


def test_three_masters_in_a_ring_converge(make_store):
    a, b, c = make_store("a"), make_store("b"), make_store("c")
    a.create_mailbox(USER, "INBOX")
    sync(a, b)
    sync(a, c)
    a.append(USER, "INBOX", b"from a", internaldate=1)
    b.create_mailbox(USER, "B-only")
    b.sieve_put(USER, "main", b"keep;")
    c.subscribe(USER, "INBOX")
    c.set_annotation(USER, "INBOX", "/comment", b"c")
    for _ in range(2):
        exchange(a, b)
        exchange(b, c)
        exchange(c, a)
    digests = {s.status(USER)["digest"] for s in (a, b, c)}
    assert len(digests) == 1
    assert state_of(a, USER) == state_of(b, USER) == state_of(c, USER)
    assert [m.name for m in c.mailboxes(USER)] == ["B-only", "INBOX"]


def test_apply_twice_is_nothing(make_store):
    a, b = full_store(make_store), make_store()
    cs = ChangeSet.decode(build(a, USER, {}).encode())
    assert apply(b, cs, bodies=a.read_body).status == "applied"
    before = dump(b)
    res = apply(b, cs, bodies=a.read_body)
    assert res.status == "nothing" and res.written == 0
    assert dump(b) == before


# -- the wire form ------------------------------------------------------------------------
def test_encode_decode_round_trip(make_store):
    a = full_store(make_store)
    for base in ({}, {a.id: 3}, state_of(a, USER)):
        cs = build(a, USER, base)
        again = ChangeSet.decode(cs.encode())
        assert again == cs
        assert again.encode() == cs.encode()


def test_encode_decode_round_trip_random_histories(workdir):
    for w, bases in _histories(Path(workdir), range(12, 18)):
        for store in w.replicas:
            if USER in store.users():
                cs = build(store, USER, bases[len(bases) // 2])
                assert ChangeSet.decode(cs.encode()) == cs


def _encoded(make_store) -> bytes:
    a = full_store(make_store)
    return build(a, USER, {}).encode()


def test_every_truncation_is_a_protocol_error(make_store):
    raw = _encoded(make_store)
    for n in range(len(raw)):
        with pytest.raises(ProtocolError):
            ChangeSet.decode(raw[:n])


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\xc1", msgpack.packb([]), msgpack.packb({"a": 1}), msgpack.packb("text"),
    msgpack.packb([2, "u"]), msgpack.packb([1, "u"]),
    msgpack.packb([1, "u", b"\x01" * 16, [], [], [[b"Z", [], [], b"\x01" * 16, 1, False]], [],
                   [], b"", 0]),
])
def test_malformed_change_sets_are_protocol_errors(data):
    with pytest.raises(ProtocolError) as ei:
        ChangeSet.decode(data)
    assert str(ei.value)


def test_unsupported_version_is_named():
    with pytest.raises(ProtocolError) as ei:
        ChangeSet.decode(msgpack.packb([9, "u", b"", [], [], [], [], [], b"", 0]))
    assert "version 9" in str(ei.value)


def test_trailing_bytes_are_a_protocol_error(make_store):
    with pytest.raises(ProtocolError):
        ChangeSet.decode(_encoded(make_store) + b"\x00")


def test_corrupted_bytes_decode_or_raise_protocol_error(make_store):
    """No checksum in the raw form: a flip may decode, but never raises anything else."""
    raw = _encoded(make_store)
    rng = random.Random(7)
    for _ in range(3000):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            ChangeSet.decode(bytes(b))
        except ProtocolError:
            pass


def test_store_id_must_be_bytes():
    with pytest.raises(ProtocolError):
        ChangeSet.decode(msgpack.packb([1, "u", 7, [], [], [], [], [], b"", 0]))


def test_corrupted_change_set_never_crashes_apply(make_store):
    a = full_store(make_store)
    cs0 = build(a, USER, {})
    raw = cs0.encode()
    bodies = {x: a.read_body(x) for x in cs0.bodies}
    b = make_store()
    rng = random.Random(1)
    crashes = []
    for i in range(600):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            cs = ChangeSet.decode(bytes(data))
        except ProtocolError:
            continue
        before = dump(b)
        try:
            apply(b, cs, bodies=bodies, allow_mass_delete=True)
        except ModsyncError:
            assert dump(b) == before
        except Exception as e:           # noqa: BLE001 - that is the point
            crashes.append(f"{type(e).__name__}: {e}")
            assert dump(b) == before
        if USER in b.users():
            b.close()
            b = make_store()
    assert not crashes, crashes[:5]


def test_full_sync_needed_after_expired_tombstones(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "INBOX")
    a.append_many(USER, "INBOX", [Message(b"m%d" % i, (), 1) for i in range(3)])
    sync(a, b)
    stale = state_of(b, USER)
    a.expunge(USER, "INBOX", [(1, 1)])
    a.append(USER, "INBOX", b"later", internaldate=1)
    assert not build(a, USER, stale).is_empty()
    a.expire_tombstones(USER, a.user_info(USER).modseq + 1)
    with pytest.raises(FullSyncNeeded) as ei:
        build(a, USER, stale)
    assert "full sync" in str(ei.value)
    # The empty base still works, and a base that saw the expunge still works.
    cs = build(a, USER, {})
    assert all(not i.removed for i in cs.items if i.kind == RECORD)
    fresh = make_store()
    sync(a, fresh)
    assert fresh.status(USER)["digest"] == a.status(USER)["digest"]
    # The stale replica cannot take the full change set as if it were a diff: it still
    # holds the message whose tombstone expired.  It must refuse, not diverge quietly.
    before = dump(b)
    try:
        res = apply(b, cs, bodies=a.read_body)
    except LegalityError:
        assert dump(b) == before
    else:
        assert res.ok and b.status(USER)["digest"] == a.status(USER)["digest"]


# -- diff files -------------------------------------------------------------------------------
difffile = pytest.importorskip("engine.difffile")


def _write(a, base, tmp_path, name="x.msd"):
    path = tmp_path / name
    difffile.write_diff(a, USER, base, path)
    return path


def test_diff_file_round_trip_and_apply(make_store, tmp_path):
    a, b = full_store(make_store), make_store()
    path = _write(a, {}, tmp_path)
    assert not (tmp_path / "x.msd.tmp").exists()
    got = difffile.read_diff(path)
    header, cs, bodies = got
    assert cs == build(a, USER, {})
    assert set(bodies) == set(cs.bodies)
    assert header.user == USER and header.origin == a.id and header.state == cs.state
    assert apply(b, cs, bodies=bodies).status == "applied"
    assert b.status(USER)["digest"] == a.status(USER)["digest"]
    # Incremental: from b's token.
    a.append(USER, "Work", b"later", internaldate=1)
    _, base = decode_token(encode_token(USER, state_of(b, USER)))
    path2 = _write(a, base, tmp_path, "y.msd")
    _, cs2, bodies2 = difffile.read_diff(path2)
    assert len(bodies2) == 1
    assert apply(b, cs2, bodies=bodies2).status == "applied"
    assert b.status(USER)["digest"] == a.status(USER)["digest"]


def _refused_file(path, *words):
    with pytest.raises(ProtocolError) as ei:
        difffile.read_diff(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_truncated_diff_files_are_refused(make_store, tmp_path):
    a = full_store(make_store)
    data = _write(a, {}, tmp_path).read_bytes()
    cut = tmp_path / "cut.msd"
    for n in list(range(64)) + list(range(64, len(data), 7)) + [len(data) - 1]:
        cut.write_bytes(data[:n])
        _refused_file(cut)


def test_truncated_diff_file_says_so(make_store, tmp_path):
    a = full_store(make_store)
    data = _write(a, {}, tmp_path).read_bytes()
    cut = tmp_path / "cut.msd"
    cut.write_bytes(data[: len(data) // 2])
    msg = _refused_file(cut)
    assert "truncated" in msg or "damaged" in msg


def test_every_corrupted_byte_is_refused(make_store, tmp_path):
    a = make_store()
    a.create_mailbox(USER, "INBOX")
    a.append(USER, "INBOX", b"one small message", internaldate=1)
    data = _write(a, {}, tmp_path).read_bytes()
    bad = tmp_path / "bad.msd"
    for i in range(len(data)):
        b = bytearray(data)
        b[i] ^= 0x20
        bad.write_bytes(bytes(b))
        _refused_file(bad)


def test_diff_file_refusals_name_the_problem(make_store, tmp_path):
    import blake3
    a = full_store(make_store)
    good = _write(a, {}, tmp_path).read_bytes()
    f = tmp_path / "f.msd"

    f.write_bytes(b"")
    _refused_file(f, "not a modsync diff")
    f.write_bytes(b"From: someone\r\n\r\nnot a diff")
    _refused_file(f, "not a modsync diff")
    _refused_file(tmp_path / "missing.msd", "cannot read")
    f.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    _refused_file(f, "checksum")

    def resealed(body: bytes) -> bytes:
        return body + blake3.blake3(body).digest()

    magic, n = difffile.MAGIC, int.from_bytes(good[8:12], "big")
    header = msgpack.unpackb(good[12:12 + n], raw=False)
    payload = good[12 + n:-32]

    def with_header(h):
        hb = msgpack.packb(h, use_bin_type=True)
        return resealed(magic + len(hb).to_bytes(4, "big") + hb + payload)

    f.write_bytes(with_header([2] + header[1:]))
    _refused_file(f, "version 2")
    f.write_bytes(with_header(header[:2] + ["someone-else"] + header[3:]))
    _refused_file(f, "disagree")
    f.write_bytes(resealed(magic + (2 ** 31).to_bytes(4, "big") + good[12:-32]))
    _refused_file(f, "header")
    f.write_bytes(resealed(good[:12 + n] + b"\x28\xb5\x2f\xfd garbage"))
    _refused_file(f, "payload")


def test_refused_diff_leaves_the_receiver_alone(make_store, tmp_path):
    a, b = full_store(make_store), make_store()
    b.create_mailbox(USER, "Mine")
    before = dump(b)
    data = _write(a, {}, tmp_path).read_bytes()
    bad = tmp_path / "bad.msd"
    bad.write_bytes(data[:-40])
    with pytest.raises(ProtocolError):
        _, cs, bodies = difffile.read_diff(bad)
        apply(b, cs, bodies=bodies, merge=True)
    assert dump(b) == before
