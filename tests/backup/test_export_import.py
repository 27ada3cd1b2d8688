"""Export one user's backup as one file; import it into another archive or a store."""
from __future__ import annotations

import pytest
from engine.errors import ModsyncError, ProtocolError

from engine import Message
from engine.archive import Archive, verify_archive
from engine.backup import (
    ExportFile,
    LocalSource,
    backup,
    export_user,
    import_export,
    restore,
)

from .conftest import history


def test_export_then_import_elsewhere_restores_every_point(tmp_path, source, archive, new_store):
    snaps = history(source, archive, "alice")
    history(source, archive, "bob")
    rep = export_user(archive, "alice", tmp_path / "alice.msexport")
    assert rep.points == 5
    ef = ExportFile(tmp_path / "alice.msexport")
    assert ef.users() == ["alice"] and len(ef.points("alice")) == 5 and ef.points("bob") == []
    ef.close()
    other = Archive.create(tmp_path / "site-b")
    r = import_export(tmp_path / "alice.msexport", archive=other)
    assert r.points == 5 and r.bodies == rep.bodies
    assert other.users() == ["alice"]
    assert verify_archive(other).ok
    for snap in snaps:
        t = new_store()
        restore(other, "alice", at=f"point:{snap.point}", store=t)
        assert t.status("alice")["digest"] == snap.digest
    # Twice: nothing new.
    r = import_export(tmp_path / "alice.msexport", archive=other)
    assert r.points == 0 and r.skipped_points == 5 and r.bodies == 0
    # A continuation: a later export adds only the new points.
    source.append("alice", "Old", b"Subject: later\r\n\r\nlater\r\n")
    backup(archive, LocalSource(source), ["alice"])
    export_user(archive, "alice", tmp_path / "alice2.msexport")
    r = import_export(tmp_path / "alice2.msexport", archive=other)
    assert r.points == 1 and r.skipped_points == 5 and r.bodies == 1
    assert verify_archive(other).ok


def test_an_export_holds_only_that_users_bodies(tmp_path, source, archive):
    source.create_mailbox("alice", "INBOX")
    source.create_mailbox("bob", "INBOX")
    source.append("alice", "INBOX", b"Subject: a\r\n\r\nalice only\r\n")
    source.append_many("bob", "INBOX", [Message(b"Subject: b\r\n\r\nbob secret %d\r\n" % i)
                                        for i in range(5)])
    backup(archive, LocalSource(source))
    export_user(archive, "alice", tmp_path / "a.x", level=1)
    assert b"bob secret" not in (tmp_path / "a.x").read_bytes()
    ef = ExportFile(tmp_path / "a.x")
    assert len(ef._bodies) == 1
    ef.close()


def test_diverging_history_is_refused_unless_renamed(tmp_path, source, archive, new_store):
    history(source, archive)
    export_user(archive, "alice", tmp_path / "a.x")
    other_src = new_store("other")
    other_src.create_mailbox("alice", "INBOX")
    other = Archive.create(tmp_path / "b")
    backup(other, LocalSource(other_src))
    with pytest.raises(ModsyncError, match="another name"):
        import_export(tmp_path / "a.x", archive=other)
    r = import_export(tmp_path / "a.x", archive=other, as_user="alice-site-a")
    assert r.points == 5 and sorted(other.users()) == ["alice", "alice-site-a"]
    t = new_store()
    restore(other, "alice-site-a", store=t)
    assert t.status("alice-site-a")["digest"] == source.status("alice")["digest"]
    assert verify_archive(other).ok


def test_import_into_a_store(tmp_path, source, archive, new_store):
    snaps = history(source, archive)
    export_user(archive, "alice", tmp_path / "a.x")
    t = new_store()
    r = import_export(tmp_path / "a.x", store=t, at="point:3")
    assert r.restore["mode"] == "exact" and r.restore["digest_ok"]
    assert t.status("alice")["digest"] == snaps[2].digest


def test_a_damaged_export_is_refused(tmp_path, source, archive):
    history(source, archive)
    export_user(archive, "alice", tmp_path / "a.x")
    data = (tmp_path / "a.x").read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    for bad in (bytes(flipped), data[:-10]):
        (tmp_path / "bad.x").write_bytes(bad)
        with pytest.raises(ProtocolError, match="checksum"):
            ExportFile(tmp_path / "bad.x")
    (tmp_path / "junk.x").write_bytes(b"hello world, this is not an export file at all....")
    with pytest.raises(ProtocolError, match="not a modsync export"):
        ExportFile(tmp_path / "junk.x")
