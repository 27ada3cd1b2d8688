"""Inspecting and maintaining a store: `status`, `changes`, `expire`, `verify`, `gc`,
and mail in and out: `import`, `export`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from .runner import ALICE_BODIES, ok, run


def damage_last_body(store: Path) -> None:
    """Flip the last byte of the newest pack: the body of the last message saved."""
    pack = max((store / "blobs").glob("*.pack"), key=lambda p: p.stat().st_mtime)
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0x55
    pack.write_bytes(data)


# -- status ------------------------------------------------------------------------------
def test_status_json(alice):
    r = ok("status", "--json").json
    (user,) = r["users"]
    assert user["user"] == "alice" and user["horizon"] == 0
    assert [(m["name"], m["messages"], m["uidnext"]) for m in user["mailboxes"]] == [
        ("Archive", 0, 1), ("INBOX", 3, 4)]
    assert re.fullmatch(r"[0-9a-f]{32}", user["digest"])
    assert ok("status", "-u", "alice", "--json").json["users"] == [user]


def test_status_text(alice):
    lines = ok("status").lines
    assert re.fullmatch(r"store \S+ \(id [0-9a-f]{32}\), 1 user", lines[0])
    assert re.fullmatch(r"user alice: modseq \d+, digest [0-9a-f]{32}", lines[2])
    assert lines[3].split() == ["NAME", "ID", "UIDVALIDITY", "UIDNEXT", "HIGHESTMODSEQ",
                                "MESSAGES", "SIZE", "CRC"]
    assert lines[5].split()[0] == "INBOX" and lines[5].startswith("  ")


def test_status_digest_follows_content_not_history(alice):
    digest = ok("status", "-u", "alice", "--json").json["users"][0]["digest"]
    ok("flags", "add", "-u", "alice", "-m", "INBOX", "--uid", "1", "$X")
    assert ok("status", "-u", "alice", "--json").json["users"][0]["digest"] != digest
    ok("flags", "remove", "-u", "alice", "-m", "INBOX", "--uid", "1", "$X")
    assert ok("status", "-u", "alice", "--json").json["users"][0]["digest"] == digest


def test_status_of_an_empty_store_and_an_unknown_user(store):
    assert ok("status", "--json").json["users"] == []
    assert ok("status").out.endswith(", 0 users\n")
    r = run("status", "-u", "alice", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-user"


# -- changes, expire ------------------------------------------------------------------------
def test_changes_since_0_is_the_whole_state(alice):
    r = ok("changes", "-u", "alice", "--since", "0", "--json").json
    assert r["since"] == 0 and r["modseq"] >= 5
    kinds = [(c["kind"], c["identity"]) for c in r["changes"]]
    assert sorted(kinds) == [("mailbox", "Archive"), ("mailbox", "INBOX"),
                             ("record", "INBOX;UID=1"), ("record", "INBOX;UID=2"),
                             ("record", "INBOX;UID=3")]
    modseqs = [c["modseq"] for c in r["changes"]]
    assert modseqs == sorted(modseqs)


def test_changes_since_a_modseq(alice):
    since = ok("status", "-u", "alice", "--json").json["users"][0]["modseq"]
    ok("flags", "add", "-u", "alice", "-m", "INBOX", "--uid", "2", "\\Seen")
    ok("expunge", "-u", "alice", "-m", "INBOX", "--uid", "3")
    ok("subscribe", "-u", "alice", "INBOX")
    r = ok("changes", "-u", "alice", "--since", since, "--json").json
    got = {(c["kind"], c["identity"]): (c["removed"], c["state"]) for c in r["changes"]}
    assert got[("record", "INBOX;UID=2")] == (False, f"(\\Seen) {len(ALICE_BODIES[1])} bytes")
    assert got[("record", "INBOX;UID=3")] == (True, "expunged")
    assert got[("subscription", "INBOX")] == (False, "subscribed")
    assert ("record", "INBOX;UID=1") not in got
    # Continuing from the reported modseq gives nothing new.
    assert ok("changes", "-u", "alice", "--since", r["modseq"], "--json").json["changes"] == []


def test_changes_text(alice):
    lines = ok("changes", "-u", "alice", "--since", "0").lines
    assert lines[0].split() == ["MODSEQ", "KIND", "IDENTITY", "STATE"]
    assert any(line.split()[1:3] == ["record", "INBOX;UID=1"] for line in lines)


def test_changes_of_every_kind_match_the_schema(alice):
    """Each kind has its own object shape in the schema; make one of each."""
    mbid = ok("mailbox", "list", "-u", "alice", "--json").json["mailboxes"][0]["id"]
    ok("subscribe", "-u", "alice", "INBOX")
    ok("seen", "-u", "alice", "--mailbox-id", "elsewhere0000000000000000", "--uid", "1:4")
    ok("sieve", "put", "-u", "alice", "s", stdin=b"keep;")
    ok("metadata", "set", "-u", "alice", "-m", "INBOX", "/shared/comment", "c")
    ok("acl", "set", "-u", "alice", "-m", "INBOX", "bob", "lr")
    ok("quota", "set", "-u", "alice", "", "--messages", "9")
    ok("mailbox", "delete", "-u", "alice", "Archive")
    r = ok("changes", "-u", "alice", "--since", "0", "--json").json
    assert {c["kind"] for c in r["changes"]} == {
        "mailbox", "record", "subscription", "seen", "sieve", "annotation", "acl", "quota"}
    assert any(c["object"].get("id") == mbid and c["removed"] for c in r["changes"])


def test_expire_raises_the_horizon(alice):
    ok("expunge", "-u", "alice", "-m", "INBOX", "--uid", "1")
    modseq = ok("status", "-u", "alice", "--json").json["users"][0]["modseq"]
    r = ok("expire", "-u", "alice", "--below", modseq + 1, "--json").json
    assert (r["dropped"], r["horizon"]) == (1, modseq + 1)
    assert ok("status", "-u", "alice", "--json").json["users"][0]["horizon"] == modseq + 1
    r = run("changes", "-u", "alice", "--since", "1", "--json")
    assert r.code == 1 and r.json["error"] == "full-sync-needed"
    assert "a full sync (since 0) is needed" in r.error
    full = ok("changes", "-u", "alice", "--since", "0", "--json").json["changes"]
    assert not [c for c in full if c["removed"]]
    assert ok("expire", "-u", "alice", "--below", "1").out == \
        f"dropped 0 tombstones of alice; tombstone horizon is now {modseq + 1}\n"


def test_changes_and_expire_usage(alice):
    assert run("changes", "-u", "alice", "--since", "-1").code == 2
    assert run("changes", "-u", "alice").code == 2
    assert run("expire", "-u", "alice", "--below", "x").code == 2
    r = run("expire", "-u", "bob", "--below", "3", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-user"


# -- verify ---------------------------------------------------------------------------------------
def test_verify_a_sound_store(alice):
    assert re.fullmatch(r"ok: 1 user, 2 mailboxes, 3 messages, 3 bodies \(\d+ B\) in [\d.]+ s\n",
                        ok("verify").out)
    r = ok("verify", "--json").json
    assert (r["users"], r["mailboxes"], r["records"], r["blobs"], r["problems"]) == (
        1, 2, 3, 3, [])
    assert ok("verify", "-q").out == ""
    assert ok("verify", "--no-blobs").out.startswith("ok: 1 user, 2 mailboxes, 3 messages, "
                                                      "bodies not read")


def test_verify_finds_a_damaged_body(alice):
    damage_last_body(alice)
    r = run("verify", "--json")
    assert r.code == 4
    assert r.json["ok"] is False and r.json["problems"]
    assert {p["what"] for p in r.json["problems"]} == {"blob"}
    assert "is damaged: 1 problem" in r.error
    text = run("verify")
    assert text.code == 4 and text.lines[0].split() == ["WHAT", "SUBJECT", "PROBLEM"]
    assert run("verify", "-q").code == 4
    # Without reading bodies nothing else is wrong.
    assert ok("verify", "--no-blobs").code == 0


def test_fetching_a_damaged_body_is_damage(alice):
    damage_last_body(alice)
    assert ok("fetch", "-u", "alice", "-m", "INBOX", "--uid", "1").stdout == ALICE_BODIES[0]
    r = run("fetch", "-u", "alice", "-m", "INBOX", "--uid", "3", "--json")
    assert r.code == 4 and r.json["error"] == "corrupt"
    raw = run("fetch", "-u", "alice", "-m", "INBOX", "--uid", "3")
    assert raw.code == 4 and raw.stdout == b""


def test_verify_never_writes(alice):
    damage_last_body(alice)
    before = {p: p.read_bytes() for p in alice.rglob("*") if p.is_file() and p.name != "lock.mdb"}
    run("verify")
    after = {p: p.read_bytes() for p in alice.rglob("*") if p.is_file() and p.name != "lock.mdb"}
    assert before == after


# -- gc ---------------------------------------------------------------------------------------
def test_gc_removes_unreferenced_bodies_after_the_retention(alice):
    ok("copy", "-u", "alice", "-m", "INBOX", "--uid", "1", "Archive")
    ok("expunge", "-u", "alice", "-m", "INBOX", "--uid", "1:*")
    kept = ok("gc", "--json").json                         # default retention: 7 days
    assert (kept["marked"], kept["removed"], kept["retention_days"]) == (2, 0, 7)
    first = ok("gc", "--retention", "0", "--json").json
    assert first["removed"] == 2 and first["removed_bytes"] == len(ALICE_BODIES[1]) + len(
        ALICE_BODIES[2])
    assert ok("verify", "--json").json["blobs"] == 1
    assert ok("fetch", "-u", "alice", "-m", "Archive", "--uid", "1").stdout == ALICE_BODIES[0]
    again = ok("gc", "--retention", "0")
    assert again.out.startswith("marked 0 bodies unreferenced; removed 0 (0 B); packs:")
    assert ok("gc", "-q").out == ""


@pytest.mark.parametrize("days", ["-1", "x", "1e9"])
def test_gc_retention_must_be_days(alice, days):
    r = run("gc", f"--retention={days}", "--json")
    assert r.code == 2 and "number of days" in r.error


# -- import, export ---------------------------------------------------------------------------
MAILDIR = {
    "cur/1000.M1P1.host,S=18:2,Sa": b"Subject: one\n\nabc\n",
    "new/1001.M2P1.host": b"Subject: two\r\n\r\nnew mail\r\n",
    ".Work/cur/1002.M3P1.host:2,F": b"Subject: w\n\nwork\n",
    ".Entw&APw-rfe/cur/1003.M4P1.host:2,": b"Subject: d\n\ndraft\n",
}


def make_maildir(root: Path, files: dict[str, bytes] = MAILDIR) -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        path = root / name
        for sub in ("cur", "new", "tmp"):
            (path.parent.parent / sub).mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    (root / "dovecot-keywords").write_text("0 $Junk\n")
    (root / "subscriptions").write_text("Work\n")
    return root


def test_import_a_maildir(alice, scratch):
    md = make_maildir(scratch / "Maildir")
    r = ok("import", "-u", "carol", "--maildir", md, "--json").json
    rep = r["report"]
    assert (rep["imported"], rep["skipped"], rep["refused"]) == (4, 0, [])
    assert set(rep["mailboxes_created"]) == {"INBOX", "Work", "Entwürfe"}
    assert rep["subscribed"] == ["Work"]
    assert r["source"] == {"maildir": str(md)}
    boxes = {m["name"]: m for m in ok("mailbox", "list", "-u", "carol", "--json").json["mailboxes"]}
    assert {n: m["messages"] for n, m in boxes.items()} == {"INBOX": 2, "Work": 1, "Entwürfe": 1}
    assert boxes["Work"]["subscribed"] is True
    bodies = {ok("fetch", "-u", "carol", "-m", "INBOX", "--uid", uid).stdout for uid in (1, 2)}
    assert bodies == {MAILDIR["cur/1000.M1P1.host,S=18:2,Sa"], MAILDIR["new/1001.M2P1.host"]}
    flags = {tuple(ok("fetch", "-u", "carol", "-m", "INBOX", "--uid", uid, "--json").json["flags"])
             for uid in (1, 2)}
    assert flags == {("\\Seen", "$Junk"), ()}
    # Again: nothing is imported twice.
    again = ok("import", "-u", "carol", "--maildir", md)
    assert again.out.startswith(f"carol (maildir {md}): imported 0, skipped 4")


def test_import_refuses_a_damaged_file_and_goes_on(alice, scratch):
    md = make_maildir(scratch / "Maildir", dict(MAILDIR, **{
        "cur/1009.M9P1.host,S=999:2,": b"Subject: cut short\n\n"}))
    r = run("import", "-u", "carol", "--maildir", md, "--json")
    assert r.code == 3
    assert r.error == "1 file refused"
    rep = r.json["report"]
    assert rep["imported"] == 4 and rep["refused_count"] == 1
    assert rep["refused"][0]["file"].endswith("1009.M9P1.host,S=999:2,")
    assert "S=999" in rep["refused"][0]["reason"]
    text = run("import", "-u", "dave", "--maildir", md)
    assert text.code == 3 and "  refused: " in text.out


def test_import_an_mbox(alice, scratch):
    mbox = scratch / "old.mbox"
    mbox.write_bytes(b"From a@example.org Thu Jan  1 00:00:00 2020\nSubject: a\n\n"
                     b"body\n>From here\n\n"
                     b"From b@example.org Thu Jan  2 00:00:00 2020\nSubject: b\nStatus: RO\n\nb\n")
    r = ok("import", "-u", "alice", "--mbox", mbox, "-m", "Archive/2020", "--json").json
    assert r["source"] == {"mbox": str(mbox), "mailbox": "Archive/2020"}
    assert (r["report"]["imported"], r["report"]["mailboxes_created"]) == (2, ["Archive/2020"])
    second = ok("fetch", "-u", "alice", "-m", "Archive/2020", "--uid", "2", "--json").json
    assert second["flags"] == ["\\Seen"]
    assert second["internaldate"] == 1577923200


@pytest.mark.parametrize("argv, code, error", [
    (["--mbox", "x.mbox"], 2, "usage"),                               # no --mailbox
    (["--maildir", "Maildir", "-m", "INBOX"], 2, "usage"),
    (["--maildir", "Maildir", "--mbox", "x.mbox", "-m", "INBOX"], 2, "usage"),
    ([], 2, "usage"),
    (["--maildir", "/nonexistent/Maildir"], 1, "import"),
    (["--mbox", "/nonexistent/x.mbox", "-m", "INBOX"], 1, "import"),
])
def test_import_refusals(alice, argv, code, error):
    r = run("import", "-u", "carol", *argv, "--json")
    assert (r.code, r.json["error"]) == (code, error)


def test_import_refuses_a_directory_that_is_not_a_maildir(alice, scratch):
    (scratch / "plain").mkdir()
    r = run("import", "-u", "carol", "--maildir", scratch / "plain", "--json")
    assert r.code == 1 and "is not a Maildir" in r.error


def test_export_is_byte_exact_and_imports_back(alice, scratch):
    out = scratch / "out"
    r = ok("export", "-u", "alice", "--maildir", out, "--json").json
    assert (r["report"]["exported"], r["report"]["mailboxes"]) == (3, ["Archive", "INBOX"])
    assert r["report"]["bytes"] == sum(map(len, ALICE_BODIES))
    assert sorted(p.read_bytes() for p in (out / "cur").iterdir()) == sorted(ALICE_BODIES)
    assert (out / ".Archive" / "cur").is_dir()
    ok("import", "-u", "copy", "--maildir", out)
    for uid, body in enumerate(ALICE_BODIES, 1):
        assert ok("fetch", "-u", "copy", "-m", "INBOX", "--uid", uid).stdout == body


def test_export_refuses_names_maildir_cannot_hold(alice, scratch):
    ok("mailbox", "create", "-u", "alice", "v1.2")
    ok("save", "-u", "alice", "-m", "v1.2", stdin=b"dotted")
    r = run("export", "-u", "alice", "--maildir", scratch / "out", "--json")
    assert r.code == 3 and r.error == "1 item refused"
    rep = r.json["report"]
    assert [x["mailbox"] for x in rep["refused"]] == ["v1.2"]
    assert rep["exported"] == 3 and "v1.2" not in rep["mailboxes"]


def test_export_needs_a_new_or_empty_directory(alice, scratch):
    (scratch / "full").mkdir()
    (scratch / "full" / "mine").write_text("keep")
    r = run("export", "-u", "alice", "--maildir", scratch / "full", "--json")
    assert r.code == 2
    assert [p.name for p in (scratch / "full").iterdir()] == ["mine"]
