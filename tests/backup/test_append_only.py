"""Append-only: credentials that can add to an archive cannot remove or rewrite anything."""
from __future__ import annotations

import os

import pytest

from engine.archive import AppendOnly, Archive, key_hash, new_key_file, verify_archive
from engine.backup import LocalSource, RetentionPolicy, backup, compact

from .conftest import history


def test_an_append_only_handle_adds_but_never_removes(tmp_path, source, archive):
    history(source, archive)
    archive.close()
    with Archive.open(tmp_path / "archive", append_only=True) as a:
        assert a.append_only
        head, chunks = a.head(), a.chunks()
        with pytest.raises(AppendOnly, match="append-only"):
            compact(a, RetentionPolicy(keep_last=1))
        w = a.writer()
        try:
            for call in (lambda: w.remove_chunk(chunks[0]), lambda: w.drop_point("alice", 1),
                         lambda: w.drop_body(b"\0" * 32),
                         lambda: w.move_body(b"\0" * 32, b"")):
                with pytest.raises(AppendOnly):
                    call()
        finally:
            w.close()
        assert a.head() == head and a.chunks() == chunks
        # A dry run only reads: allowed.
        assert compact(a, RetentionPolicy(keep_last=1), dry_run=True).points_dropped == 4
        # Adding is what it is for.
        source.append("alice", "INBOX", b"Subject: new\r\n\r\nnew\r\n")
        assert backup(a, LocalSource(source)).points == 1
        assert verify_archive(a).ok


def test_a_locked_archive_needs_its_admin_key_to_remove(tmp_path, source):
    key = new_key_file(tmp_path / "admin.key")
    assert os.stat(tmp_path / "admin.key").st_mode & 0o777 == 0o600
    a = Archive.create(tmp_path / "locked", admin_key=key)
    history(source, a)
    a.close()
    text = (tmp_path / "locked" / "FORMAT").read_text()
    assert key_hash(key) in text and key.decode() not in text
    with Archive.open(tmp_path / "locked") as plain:
        assert plain.append_only and plain.locked
        with pytest.raises(AppendOnly, match="admin key"):
            compact(plain, RetentionPolicy(keep_last=1))
        source.append("alice", "Archive/Work", b"Subject: x\r\n\r\ny\r\n")
        assert backup(plain, LocalSource(source)).points == 1
    with pytest.raises(AppendOnly, match="does not match"):
        Archive.open(tmp_path / "locked", admin_key=b"x" * 64)
    with Archive.open(tmp_path / "locked", admin_key=key) as admin:
        assert not admin.append_only
        assert compact(admin, RetentionPolicy(keep_last=1)).points_dropped == 5
        assert verify_archive(admin).ok
    # The flag wins over the key: a forced command can pin a handle to append-only.
    with Archive.open(tmp_path / "locked", admin_key=key, append_only=True) as a:
        with pytest.raises(AppendOnly, match="append-only"):
            compact(a, RetentionPolicy(keep_last=1))


def test_chunk_files_are_read_only_on_disk(source, archive):
    history(source, archive)
    for e in archive.chunks():
        if e.live:
            assert os.stat(archive.chunk_path(e.name)).st_mode & 0o222 == 0
