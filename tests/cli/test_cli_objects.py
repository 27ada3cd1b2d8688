"""The rest of a user's data: `seen`, `sieve`, `acl`, `metadata`, `quota`."""
from __future__ import annotations

import base64

import pytest

from .runner import ok, run


def inbox_id() -> str:
    boxes = ok("mailbox", "list", "-u", "alice", "--json").json["mailboxes"]
    return next(m["id"] for m in boxes if m["name"] == "INBOX")


# -- seen -------------------------------------------------------------------------------
def test_seen_sets_for_another_users_mailbox(alice):
    mbid = inbox_id()
    r = ok("seen", "-u", "bob", "--mailbox-id", mbid, "--uid", "1:*", "--lastuid", "3",
           "--json").json
    assert (r["owner"], r["mailbox"], r["uids"], r["lastuid"]) == ("alice", "INBOX", "1:3", 3)
    assert ok("seen", "-u", "bob", "--mailbox-id", mbid, "--uid", "3,1").out == \
        "bob has seen 1,3 of INBOX (owner alice)\n"
    listed = ok("seen", "list", "-u", "bob", "--json").json["seen"]
    assert [(s["mailbox_id"], s["owner"], s["uids"], s["lastuid"]) for s in listed] == [
        (mbid, "alice", "1,3", 0)]              # replaced, not merged
    lines = ok("seen", "list", "-u", "bob").lines
    assert lines[0].split() == ["MAILBOX-ID", "OWNER", "MAILBOX", "UIDS", "LASTUID", "LASTREAD"]
    assert lines[1].split()[:5] == [mbid, "alice", "INBOX", "1,3", "0"]


def test_seen_for_a_mailbox_this_store_does_not_know(alice):
    r = ok("seen", "-u", "bob", "--mailbox-id", "0q3u1mzb4kgj7c2vx9w8ey5a", "--uid", "1:40,42",
           "--json")
    assert (r.json["owner"], r.json["mailbox"]) == (None, None)
    assert "not in this store" in r.err
    r = run("seen", "-u", "bob", "--mailbox-id", "0q3u1mzb4kgj7c2vx9w8ey5a", "--uid", "1:*")
    assert r.code == 2 and "'*'" in r.error


def test_seen_on_ones_own_mailbox_is_the_seen_flag(alice):
    r = run("seen", "-u", "alice", "--mailbox-id", inbox_id(), "--uid", "1", "--json")
    assert r.code == 2 and "\\Seen flag" in r.error


@pytest.mark.parametrize("argv", [
    ["seen", "--mailbox-id", "x", "--uid", "1"],
    ["seen", "-u", "bob", "--uid", "1"],
    ["seen", "-u", "bob", "--mailbox-id", "x"],
    ["seen", "list"],
    ["seen", "-u", "bob", "--mailbox-id", "x", "--uid", "1", "--lastuid", "-1"],
])
def test_seen_usage(alice, argv):
    r = run(*argv, "--json")
    assert r.code == 2 and r.json["error"] == "usage"


# -- sieve ---------------------------------------------------------------------------------
SCRIPT = 'require ["fileinto"];\r\nif header :contains "subject" "ünïcode" { fileinto "Junk"; }\n'


def test_sieve_lifecycle(alice, scratch):
    path = scratch / "vacation.sieve"
    path.write_text(SCRIPT, encoding="utf-8", newline="")
    put = ok("sieve", "put", "-u", "alice", "vacation", path, "--json").json
    assert put["size"] == len(SCRIPT.encode())
    ok("sieve", "put", "-u", "alice", "spam", stdin=b"keep;\n")
    ok("sieve", "activate", "-u", "alice", "vacation")
    assert ok("sieve", "get", "-u", "alice", "vacation").stdout == SCRIPT.encode()
    got = ok("sieve", "get", "-u", "alice", "vacation", "--json").json
    assert got["active"] is True and got["script"] == SCRIPT
    assert base64.b64decode(got["script_base64"]) == SCRIPT.encode()
    listed = ok("sieve", "list", "-u", "alice", "--json").json["scripts"]
    assert [(s["name"], s["active"]) for s in listed] == [("spam", False), ("vacation", True)]
    # Replacing the active script keeps it active; activating another switches.
    ok("sieve", "put", "-u", "alice", "vacation", "-", stdin=b"discard;\n")
    assert ok("sieve", "get", "-u", "alice", "vacation", "--json").json["active"] is True
    assert ok("sieve", "activate", "-u", "alice", "spam").out == \
        "spam is now alice's active sieve script\n"
    assert [s["active"] for s in ok("sieve", "list", "-u", "alice", "--json").json["scripts"]] \
        == [True, False]
    assert ok("sieve", "deactivate", "-u", "alice").out == "deactivated spam\n"
    assert ok("sieve", "deactivate", "-u", "alice", "--json").json["active"] is None
    ok("sieve", "delete", "-u", "alice", "vacation")
    lines = ok("sieve", "list", "-u", "alice").lines
    assert lines[0].split() == ["NAME", "ACTIVE", "SIZE", "UPDATED"]
    assert lines[1].split()[:4] == ["spam", "no", "6", "B"]


def test_sieve_put_makes_the_user(store):
    ok("sieve", "put", "-u", "newbie", "s", stdin=b"keep;")
    assert ok("sieve", "get", "-u", "newbie", "s").stdout == b"keep;"


@pytest.mark.parametrize("argv, stdin, code, error", [
    (["put", "-u", "alice", "bad"], b"\xff\xfe not utf-8", 2, "usage"),
    (["put", "-u", "alice", "a/b"], b"keep;", 2, "usage"),
    (["put", "-u", "alice", "x", "/nonexistent/script.sieve"], b"", 1, "os"),
    (["get", "-u", "alice", "nope"], b"", 1, "no-such-object"),
    (["activate", "-u", "alice", "nope"], b"", 1, "no-such-object"),
    (["delete", "-u", "alice", "nope"], b"", 1, "no-such-object"),
    (["list", "-u", "bob"], b"", 1, "no-such-user"),
])
def test_sieve_refusals(alice, argv, stdin, code, error):
    r = run("sieve", *argv, "--json", stdin=stdin)
    assert (r.code, r.json["error"]) == (code, error)


# -- acl -------------------------------------------------------------------------------------
def acl() -> dict[str, str]:
    entries = ok("acl", "list", "-u", "alice", "-m", "INBOX", "--json").json["acl"]
    return {e["identifier"]: e["rights"] for e in entries}


def test_acl_set_add_take_away_delete(alice):
    assert ok("acl", "set", "-u", "alice", "-m", "INBOX", "bob", "srl",
              "--json").json["rights"] == "lrs"                # RFC 4314 order
    assert ok("acl", "set", "-u", "alice", "-m", "INBOX", "bob", "+wi").out == \
        "bob has rights lrswi on INBOX\n"
    ok("acl", "set", "-u", "alice", "-m", "INBOX", "--json", "--", "bob", "-wx")
    ok("acl", "set", "-u", "alice", "-m", "INBOX", "anyone", "l")
    assert acl() == {"anyone": "l", "bob": "lrsi"}
    lines = ok("acl", "list", "-u", "alice", "-m", "INBOX").lines
    assert [line.split() for line in lines] == [["IDENTIFIER", "RIGHTS"], ["anyone", "l"],
                                               ["bob", "lrsi"]]
    ok("acl", "delete", "-u", "alice", "-m", "INBOX", "anyone")
    assert acl() == {"bob": "lrsi"}


def test_acl_taking_away_every_right_removes_the_entry(alice):
    ok("acl", "set", "-u", "alice", "-m", "INBOX", "bob", "lr")
    r = ok("acl", "set", "-u", "alice", "-m", "INBOX", "--json", "--", "bob", "-lr").json
    assert r["rights"] == ""
    assert acl() == {}


@pytest.mark.parametrize("argv, code, error", [
    (["set", "-u", "alice", "-m", "INBOX", "bob", "lrZ"], 2, "usage"),
    (["set", "-u", "alice", "-m", "Nope", "bob", "lr"], 1, "no-such-mailbox"),
    (["delete", "-u", "alice", "-m", "INBOX", "carol"], 1, "no-such-object"),
    (["list", "-u", "alice", "-m", "Nope"], 1, "no-such-mailbox"),
])
def test_acl_refusals(alice, argv, code, error):
    r = run("acl", *argv, "--json")
    assert (r.code, r.json["error"]) == (code, error)


def test_acl_negative_rights_need_double_dash(alice):
    r = run("acl", "set", "-u", "alice", "-m", "INBOX", "bob", "-w")
    assert r.code == 2


# -- metadata ----------------------------------------------------------------------------------
def annotations(mailbox: str = "INBOX") -> list[tuple]:
    rows = ok("metadata", "list", "-u", "alice", "-m", mailbox, "--json").json["annotations"]
    return [(a["entry"], a["stored_entry"], a["userid"], a["value"]) for a in rows]


def test_metadata_set_list_unset(alice):
    r = ok("metadata", "set", "-u", "alice", "-m", "INBOX", "/shared/comment", "Main inbox",
           "--json").json
    assert (r["entry"], r["stored_entry"], r["userid"]) == ("/shared/comment", "/comment", "")
    ok("metadata", "set", "-u", "alice", "-m", "INBOX", "/private/comment", "mine")
    ok("metadata", "set", "-u", "alice", "-m", "INBOX", "/vendor/x", "line1\nline2")
    ok("metadata", "set", "-u", "alice", "-m", "INBOX", "/vendor/y", "p", "--private")
    assert annotations() == [
        ("/shared/comment", "/comment", "", "Main inbox"),
        ("/private/comment", "/comment", "alice", "mine"),
        ("/shared/vendor/x", "/vendor/x", "", "line1\nline2"),
        ("/private/vendor/y", "/vendor/y", "alice", "p"),
    ]
    text = ok("metadata", "list", "-u", "alice", "-m", "INBOX").lines
    assert text[0].split() == ["ENTRY", "USERID", "VALUE"]
    assert text[3].split() == ["/shared/vendor/x", "-", "line1\\nline2"]   # a row stays a row
    assert ok("metadata", "unset", "-u", "alice", "-m", "INBOX", "/private/comment").out == \
        "removed /private/comment from INBOX\n"
    ok("metadata", "unset", "-u", "alice", "-m", "INBOX", "/vendor/y", "--private")
    assert [a[0] for a in annotations()] == ["/shared/comment", "/shared/vendor/x"]


def test_private_specialuse_is_the_mailboxs_special_use(alice):
    ok("metadata", "set", "-u", "alice", "-m", "Archive", "/private/specialuse", "\\Archive")
    boxes = ok("mailbox", "list", "-u", "alice", "--json").json["mailboxes"]
    assert next(m for m in boxes if m["name"] == "Archive")["specialuse"] == ["\\Archive"]
    ok("metadata", "unset", "-u", "alice", "-m", "Archive", "/private/specialuse")
    boxes = ok("mailbox", "list", "-u", "alice", "--json").json["mailboxes"]
    assert next(m for m in boxes if m["name"] == "Archive")["specialuse"] == []


@pytest.mark.parametrize("entry, extra", [
    ("comment", []),
    ("/shared/", []),
    ("/private", []),
    ("/shared", []),
    ("/a//b", []),
    ("/a/", []),
    ("/x\ny", []),
    ("/shared/comment", ["--private"]),
])
def test_metadata_bad_entries(alice, entry, extra):
    r = run("metadata", "set", "-u", "alice", "-m", "INBOX", *extra, "--json", "--", entry, "v")
    assert r.code == 2 and r.json["error"] == "usage"
    assert annotations() == []


def test_metadata_unset_a_missing_entry(alice):
    r = run("metadata", "unset", "-u", "alice", "-m", "INBOX", "/shared/nope", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-object"
    # Nothing was recorded: no tombstone for an entry that never existed.
    changes = ok("changes", "-u", "alice", "--since", "0", "--json").json["changes"]
    assert not [c for c in changes if c["kind"] == "annotation"]


# -- quota ---------------------------------------------------------------------------------------
def test_quota_set_list_delete(alice):
    r = ok("quota", "set", "-u", "alice", "", "--storage", "1024", "--messages", "10",
           "--json").json
    assert (r["root"], r["limits"]) == ("", {"STORAGE": 1024, "MESSAGE": 10})
    assert ok("quota", "set", "-u", "alice", "Archive", "--storage", "5").out == \
        "quota root Archive of alice: STORAGE 5\n"
    roots = ok("quota", "list", "-u", "alice", "--json").json["roots"]
    assert roots == [
        {"root": "", "limits": {"STORAGE": 1024, "MESSAGE": 10},
         "usage": {"STORAGE": 1, "MESSAGE": 3}},          # 3 small messages: 1 KiB, rounded up
        {"root": "Archive", "limits": {"STORAGE": 5}, "usage": {"STORAGE": 0, "MESSAGE": 0}},
    ]
    lines = ok("quota", "list", "-u", "alice").lines
    assert lines[0].split() == ["ROOT", "STORAGE", "MESSAGES"]
    assert lines[1].split()[0] == '""' and "of 10" in lines[1]
    assert ok("quota", "delete", "-u", "alice", "", "--json").json["root"] == ""
    assert [q["root"] for q in ok("quota", "list", "-u", "alice", "--json").json["roots"]] == [
        "Archive"]


def test_quota_set_replaces_the_limits(alice):
    ok("quota", "set", "-u", "alice", "", "--storage", "100")
    ok("quota", "set", "-u", "alice", "", "--messages", "7")
    assert ok("quota", "list", "-u", "alice", "--json").json["roots"][0]["limits"] == {
        "MESSAGE": 7}


@pytest.mark.parametrize("argv, code, error", [
    (["set", "-u", "alice", ""], 2, "usage"),
    (["set", "-u", "alice", "", "--storage", "-1"], 2, "usage"),
    (["set", "-u", "alice", "", "--messages", "many"], 2, "usage"),
    (["delete", "-u", "alice", "Archive"], 1, "no-such-object"),
    (["list", "-u", "bob"], 1, "no-such-user"),
])
def test_quota_refusals(alice, argv, code, error):
    r = run("quota", *argv, "--json")
    assert (r.code, r.json["error"]) == (code, error)


def test_quota_root_inbox_is_canonical(alice):
    assert ok("quota", "set", "-u", "alice", "inbox", "--messages", "10",
              "--json").json["root"] == "INBOX"
    (root,) = ok("quota", "list", "-u", "alice", "--json").json["roots"]
    assert root["usage"]["MESSAGE"] == 3


def test_quota_root_must_be_a_possible_mailbox_name(alice):
    r = run("quota", "set", "-u", "alice", "a//b", "--messages", "10", "--json")
    assert r.code == 2 and r.json["error"] == "invalid-name"
