"""The verbs: backup, backup list, restore, compact, verify/export/import --archive.

Every --json output is checked against its schema by the ``cli`` fixture.
"""
from __future__ import annotations

import os
import sys
import types

import pytest
from engine.errors import EXIT_DAMAGED, EXIT_ERROR, EXIT_USAGE


@pytest.fixture
def store_of(cli, tmp_path, sample_maildir):
    def make():
        s = tmp_path / "store"
        assert cli("init", "--store", s).code == 0
        r = cli("import", "--store", s, "-u", "alice", "--maildir", sample_maildir)
        assert r.code == 0, r.err
        return s
    return make


def test_backup_list_verify_restore(cli, tmp_path, store_of):
    s = store_of()
    a = tmp_path / "archive"
    r = cli("backup", "--store", s, "--to", a, "--json")
    assert r.code == 0, r.err
    assert r.json["created"] and r.json["points"] == 1 and r.json["bodies"] == 40
    assert cli("flags", "add", "--store", s, "-u", "alice", "-m", "INBOX", "--uid", "1:3",
               "$x").code == 0
    r = cli("backup", "--store", s, "--to", a, "-u", "alice")
    assert r.code == 0 and "point 2 (incremental" in r.out
    r = cli("backup", "--store", s, "--to", a)
    assert "alice: unchanged" in r.out
    r = cli("backup", "list", "--archive", a, "--json")
    assert [p["point"] for p in r.json["users"][0]["points"]] == [1, 2]
    r = cli("backup", "list", "--archive", a)
    assert r.out.splitlines()[0].split()[:3] == ["USER", "POINT", "TIME"]
    r = cli("verify", "--archive", a, "--json")
    assert r.code == 0 and r.json["ok"] and r.json["bodies_checked"] == 40
    r = cli("verify", "--archive", a)
    assert r.out.startswith("ok: 1 user, 2 points")
    t = tmp_path / "t"
    cli("init", "--store", t)
    r = cli("restore", "--archive", a, "-u", "alice", "--at", "point:1", "--store", t, "--json")
    assert r.code == 0, r.err
    assert r.json["mode"] == "exact" and r.json["digest_ok"] and r.json["messages"] == 40
    r = cli("restore", "--archive", a, "-u", "alice", "-m", "INBOX", "--uid", "2", "--store", s,
            "--into", "Restored")
    assert r.code == 0 and "INBOX -> Restored (created): 1 message" in r.out
    r = cli("restore", "--archive", a, "-u", "alice", "--maildir", tmp_path / "md", "--json")
    assert r.code == 0 and r.json["target"] == {"maildir": str(tmp_path / "md")}
    r = cli("--json", "restore", "--archive", a, "-u", "alice", "--uid", "2", "--store", t)
    assert r.code == EXIT_USAGE and "--uid needs --mailbox" in r.err
    r = cli("restore", "--archive", a, "-u", "alice", "--maildir", "x", "--store", t)
    assert r.code == EXIT_USAGE


def test_verify_refuses_missing_or_empty_archives_and_reports_damage(cli, tmp_path,
                                                                    store_of):
    r = cli("verify", "--archive", tmp_path / "nope", "--json")
    assert r.code == EXIT_ERROR and r.json["error"] == "not-an-archive"
    (tmp_path / "empty").mkdir()
    r = cli("verify", "--archive", tmp_path / "empty")
    assert r.code == EXIT_ERROR and "empty directory" in r.err
    s = store_of()
    a = tmp_path / "archive"
    cli("backup", "--store", s, "--to", a)
    chunk = next(p for p in (a / "data").rglob("*.chunk") if p.stat().st_size > 10000)
    os.chmod(chunk, 0o644)
    data = bytearray(chunk.read_bytes())
    data[5000] ^= 1
    chunk.write_bytes(bytes(data))
    r = cli("verify", "--archive", a, "--json")
    assert r.code == EXIT_DAMAGED and not r.json["ok"] and r.json["problems"]
    r = cli("verify", "--archive", a)
    assert r.code == EXIT_DAMAGED and "is damaged" in r.err and "PROBLEM" in r.out
    r = cli("verify", "--archive", a, "--sample", "50", "--max-duration", "60",
            "--state-file", tmp_path / "st.json", "--json")
    assert r.code == EXIT_DAMAGED and r.json["sample"] == 50
    assert cli("verify", "--archive", a, "--sample", "0").code == EXIT_USAGE
    assert cli("verify", "--store", s, "--sample", "5").code == EXIT_USAGE
    # The store form is unchanged.
    r = cli("verify", "--store", s, "--json")
    assert r.code == 0 and r.json["records"] == 40


def test_a_new_archive_is_not_made_in_an_existing_empty_directory(cli, tmp_path, store_of):
    s = store_of()
    (tmp_path / "mnt").mkdir()
    r = cli("backup", "--store", s, "--to", tmp_path / "mnt")
    assert r.code == EXIT_ERROR and "--init" in r.err
    assert cli("backup", "--store", s, "--to", tmp_path / "mnt", "--init").code == 0
    r = cli("backup", "--store", s, "--to", tmp_path / "no" / "such" / "dir")
    assert r.code == EXIT_ERROR
    assert cli("backup", "--store", s).code == EXIT_USAGE


def test_compact_and_append_only(cli, tmp_path, monkeypatch, store_of):
    s = store_of()
    a = tmp_path / "archive"
    key = tmp_path / "admin.key"
    r = cli("backup", "--store", s, "--to", a, "--admin-key-file", key)
    assert r.code == 0 and key.exists()
    for i in range(3):
        cli("flags", "add", "--store", s, "-u", "alice", "-m", "INBOX", "--uid", str(i + 1),
            f"$k{i}")
        assert cli("backup", "--store", s, "--to", a).code == 0
    assert cli("backup", "list", "--archive", a, "--json").json["locked"] is True
    r = cli("compact", "--archive", a, "--keep-last", "1", "--json")
    assert r.code == EXIT_ERROR and r.json["error"] == "append-only"
    assert "admin key" in r.json["message"]
    r = cli("compact", "--archive", a, "--keep-last", "1", "--admin-key-file", key,
            "--append-only")
    assert r.code == EXIT_ERROR and "append-only" in r.err
    monkeypatch.setenv("MODSYNC_APPEND_ONLY", "1")
    assert cli("compact", "--archive", a, "--keep-last", "1", "--admin-key-file",
               key).code == EXIT_ERROR
    monkeypatch.delenv("MODSYNC_APPEND_ONLY")
    r = cli("compact", "--archive", a, "--keep-last", "1", "--dry-run", "--json")
    assert r.code == 0 and r.json["dry_run"] and r.json["points_dropped"] == 3
    r = cli("compact", "--archive", a, "--keep-last", "1", "--admin-key-file", key, "--json")
    assert r.code == 0, r.err
    assert r.json["points_dropped"] == 3
    assert cli("compact", "--archive", a).code == EXIT_USAGE
    assert cli("verify", "--archive", a).code == 0
    other = tmp_path / "other.key"
    other.write_text("z" * 40)
    r = cli("compact", "--archive", a, "--keep-last", "1", "--admin-key-file", other)
    assert r.code == EXIT_ERROR and "does not match" in r.err


def test_export_and_import_verbs(cli, tmp_path, store_of, sample_maildir):
    s = store_of()
    a = tmp_path / "archive"
    cli("backup", "--store", s, "--to", a)
    out = tmp_path / "alice.msexport"
    r = cli("export", "--archive", a, "-u", "alice", "--out", out, "--json")
    assert r.code == 0, r.err
    assert r.json["report"]["points"] == 1 and out.exists()
    b = tmp_path / "b"
    r = cli("import", "--archive", b, out, "--json")
    assert r.code == 0, r.err
    assert r.json["target"] == {"archive": str(b)} and r.json["report"]["points"] == 1
    assert cli("verify", "--archive", b).code == 0
    t = tmp_path / "t"
    cli("init", "--store", t)
    r = cli("import", "--store", t, out, "--json")
    assert r.code == 0 and r.json["report"]["restore"]["mode"] == "exact"
    assert cli("status", "--store", t, "-u", "alice", "--json").json["users"][0]["digest"] == \
        cli("status", "--store", s, "-u", "alice", "--json").json["users"][0]["digest"]
    # The old forms are untouched, and the new ones do not mix with them.
    assert cli("import", "--store", t, "-u", "bob").code == EXIT_USAGE
    assert cli("import", "--store", t, out, "--maildir", sample_maildir).code == EXIT_USAGE
    assert cli("export", "--store", t, "-u", "alice").code == EXIT_USAGE
    assert cli("export", "--archive", a, "-u", "alice").code == EXIT_USAGE
    assert cli("export", "--archive", a, "-u", "alice", "--maildir", "x",
               "--out", "y").code == EXIT_USAGE


def test_backup_from_a_server_and_restore_to_cyrus(cli, tmp_path, monkeypatch, store_of):
    from engine import Store

    from .test_backup_restore import FakeRemote
    s = store_of()
    seen = []

    class RemoteSource(FakeRemote):
        def __init__(self, host, port, *, account, password, tls=None):
            seen.append((host, port, account, password, tls))
            super().__init__(Store.open(s, readonly=True))

        def close(self):
            self.store.close()
    monkeypatch.setitem(sys.modules, "engine.client",
                        types.SimpleNamespace(RemoteSource=RemoteSource))
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    a = tmp_path / "archive"
    r = cli("backup", "--from", "mail.example.org:2005", "--account", "backup",
            "--password-file", pw, "--to", a, "--json")
    assert r.code == 0, r.err
    assert r.json["source"] == {"from": "mail.example.org:2005"} and r.json["bodies"] == 40
    assert seen == [("mail.example.org", 2005, "backup", "secret", None)]
    assert cli("backup", "--from", "nohostport", "--to", a).code == EXIT_USAGE
    pushed = []
    monkeypatch.setitem(sys.modules, "engine.csync", types.SimpleNamespace(
        push_user=lambda store, user, host, port, **kw: pushed.append((user, host, port, kw))
        or types.SimpleNamespace(ok=True, errors=[])))
    monkeypatch.setenv("MODSYNC_PASSWORD", "cyrus-pw")
    r = cli("restore", "--archive", a, "-u", "alice", "--csync", "cyrus:2005", "--authname",
            "admin", "--json")
    assert r.code == 0, r.err
    assert r.json["target"] == {"csync": "cyrus:2005"}
    (user, host, port, kw), = pushed
    assert (user, host, port, kw["authname"], kw["password"]) == ("alice", "cyrus", 2005,
                                                                  "admin", "cyrus-pw")
    monkeypatch.setitem(sys.modules, "engine.client", None)
    r = cli("backup", "--from", "h:1", "--to", a)
    assert r.code == EXIT_ERROR and "engine.client" in r.err
