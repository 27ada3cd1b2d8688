"""engine/archive.py: the chunk format, the chain, and verify finding every kind of damage."""
from __future__ import annotations

import json
import os
import shutil

import msgpack
import pytest
from engine.errors import SchemaVersionError, UsageError

from engine import Message
from engine.archive import (
    CHUNK_MAGIC,
    KIND_BODIES,
    KIND_POINT,
    ZERO,
    Archive,
    ArchiveCorrupt,
    NotAnArchive,
    check_chunk,
    encode_chunk,
    parse_header,
    verify_archive,
)
from engine.backup import LocalSource, backup, verify

from .conftest import body, history


def test_chunk_round_trip_and_checks():
    assert CHUNK_MAGIC == b"MSARCH1\n"
    parts, checksum = encode_chunk(KIND_POINT, 7, ZERO, {"user": "u"}, [b"abc", b"def"], 5)
    data = b"".join(parts)
    header, start, c = check_chunk(data, "x")
    assert (header.kind, header.seq, header.created, header.prev, header.meta) == \
        (KIND_POINT, 7, 5, ZERO, {"user": "u"})
    assert c == checksum and data[start:-32] == b"abcdef"
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        with pytest.raises(ArchiveCorrupt):
            check_chunk(bytes(damaged), "x")
    with pytest.raises(ArchiveCorrupt, match="truncated|checksum"):
        check_chunk(data[:-1], "x")
    with pytest.raises(ArchiveCorrupt, match="magic"):
        parse_header(b"XXXXXXXX" + data[8:], "x")


def test_a_chunk_carries_the_checksum_of_the_one_before(source, archive):
    history(source, archive)
    prev = ZERO
    for e in archive.chunks():
        header, _, checksum = archive.read_chunk(e.seq)
        assert header.prev == prev
        prev = checksum
    assert archive.head() == (archive.chunks()[-1].seq, prev)


def test_open_refuses_what_is_not_an_archive(tmp_path):
    with pytest.raises(NotAnArchive, match="no such directory"):
        Archive.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAnArchive, match="empty directory"):
        Archive.open(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(NotAnArchive, match="not a modsync archive"):
        Archive.open(tmp_path / "other")
    Archive.create(tmp_path / "a").close()
    with pytest.raises(UsageError, match="already"):
        Archive.create(tmp_path / "a")
    with pytest.raises(UsageError, match="not empty"):
        Archive.create(tmp_path / "other")
    fmt = tmp_path / "a" / "FORMAT"
    fmt.write_text(fmt.read_text().replace("modsync-archive 1", "modsync-archive 9"))
    with pytest.raises(SchemaVersionError):
        Archive.open(tmp_path / "a")
    shutil.rmtree(tmp_path / "a" / "index")
    fmt.write_text(fmt.read_text().replace("modsync-archive 9", "modsync-archive 1"))
    with pytest.raises(NotAnArchive, match="index"):
        Archive.open(tmp_path / "a")


@pytest.fixture
def filled(source, archive):
    history(source, archive)
    return archive


def _chunk(archive, kind):
    return next(e for e in archive.chunks() if e.live and e.kind == kind)


def _problems(archive):
    rep = verify_archive(archive)
    return rep, {p.what for p in rep.problems}


def _writable(path):
    os.chmod(path, 0o644)
    return path


def test_a_sound_archive_verifies(filled):
    rep, _ = _problems(filled)
    assert rep.ok and rep.complete and not rep.notes
    assert rep.bodies_checked == rep.bodies == filled.body_count()
    assert rep.body_chunks_read == rep.body_chunks
    assert rep.points == 5 and rep.users == 1


@pytest.mark.parametrize("kind", [KIND_BODIES, KIND_POINT])
def test_a_flipped_bit_is_found(filled, kind):
    e = _chunk(filled, kind)
    path = _writable(filled.chunk_path(e.name))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    rep, what = _problems(filled)
    assert not rep.ok and "chunk" in what
    assert any(e.name in p.subject for p in rep.problems)


def test_a_truncated_chunk_is_found(filled):
    e = _chunk(filled, KIND_BODIES)
    os.truncate(_writable(filled.chunk_path(e.name)), e.size - 100)
    rep, what = _problems(filled)
    assert not rep.ok and "chunk-size" in what


def test_a_deleted_chunk_is_found(filled):
    for kind in (KIND_POINT, KIND_BODIES):
        e = _chunk(filled, kind)
        saved = filled.chunk_path(e.name).read_bytes()
        filled.chunk_path(e.name).unlink()
        rep, what = _problems(filled)
        assert not rep.ok and "missing-chunk" in what, what
        filled.chunk_path(e.name).write_bytes(saved)
    assert verify_archive(filled).ok


def test_a_replaced_chunk_breaks_the_chain(filled):
    """A chunk rewritten with a valid checksum of its own is still caught."""
    e = _chunk(filled, KIND_POINT)
    path = _writable(filled.chunk_path(e.name))
    data = path.read_bytes()
    header, start = parse_header(data, "x")
    parts, new_checksum = encode_chunk(header.kind, header.seq, header.prev, header.meta,
                                       data[start:-32], header.created + 1)
    path.write_bytes(b"".join(parts))
    rep, what = _problems(filled)
    assert not rep.ok and "chunk" in what        # checksum differs from the index's
    # Even if the index is made to agree, the next chunk's link does not.
    e.checksum = new_checksum
    filled.db.write(lambda txn: txn.put("chunks", e.seq.to_bytes(8, "big"), e.pack()))
    rep, what = _problems(filled)
    assert not rep.ok and "chain" in what


def test_index_damage_is_found(filled):
    def drop_a_body(txn):
        txn.delete("bodies", next(txn.range("bodies", values=False)))
    filled.db.write(drop_a_body)
    rep, what = _problems(filled)
    assert not rep.ok and "index" in what

    def drop_a_point(txn):
        txn.delete("points", next(txn.range("points", values=False)))
    filled.db.write(drop_a_point)
    rep, what = _problems(filled)
    assert "index" in what and "points" in what

    filled.db.write(lambda txn: txn.put("meta", b"head", msgpack.packb([1, b"\1" * 32])))
    rep, what = _problems(filled)
    assert "head" in what


def test_stray_files_are_notes_not_damage(filled):
    (filled.path / "data" / "0000" / "000000000099-dead.chunk.tmp").write_bytes(b"x")
    rep = verify_archive(filled)
    assert rep.ok and len(rep.notes) == 1 and "interrupted" in rep.notes[0]


def test_sampled_verify_covers_everything_across_runs(source, archive, monkeypatch, tmp_path):
    import engine.archive as archive_mod
    monkeypatch.setattr(archive_mod, "CHUNK_TARGET", 8 << 10)
    source.create_mailbox("alice", "INBOX")
    source.append_many("alice", "INBOX", [Message(os.urandom(3000) + body(i))
                                          for i in range(60)])
    backup(archive, LocalSource(source))
    n = len([e for e in archive.chunks() if e.kind == KIND_BODIES])
    assert n >= 10
    state = tmp_path / "state.json"
    read = runs = 0
    while True:
        rep = verify(archive, sample=25, state_file=state)
        assert rep.ok and rep.sample == 25
        runs += 1
        read += rep.body_chunks_read
        if rep.cycle_done == n:
            break
        assert runs < 10
    assert 3 <= runs <= 5 and read == n
    rep = verify(archive, sample=25, state_file=state)      # a new cycle starts
    assert rep.cycle_done == rep.body_chunks_read
    # A damaged chunk is found by the run that reads it and is read again by the next.
    victim = next(e for e in archive.chunks() if e.kind == KIND_BODIES
                  and e.seq not in json.loads(state.read_text())["done"])
    path = _writable(archive.chunk_path(victim.name))
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    found = False
    for _ in range(6):
        rep = verify(archive, sample=25, state_file=state)
        if not rep.ok:
            found = True
            break
    assert found
    assert victim.seq not in json.loads(state.read_text())["done"]
    # --max-duration: stops reading bodies, still checks the rest, continues next time.
    rep = verify(archive, max_duration=0.000001, state_file=tmp_path / "s2")
    assert not rep.complete and rep.body_chunks_read <= 1


def test_sample_argument_is_checked(filled):
    with pytest.raises(UsageError):
        verify(filled, sample=0)
    with pytest.raises(UsageError):
        verify(filled, sample=150)
