"""`save`, `fetch`, `flags`, `expunge`, `copy`, `move`, and UID sets."""
from __future__ import annotations

import base64
import hashlib

import pytest

from .runner import ALICE_BODIES, ok, run


def flags_of(uid: int, mailbox: str = "INBOX") -> list[str]:
    return ok("fetch", "-u", "alice", "-m", mailbox, "--uid", uid, "--json").json["flags"]


def messages(mailbox: str = "INBOX") -> int:
    boxes = ok("mailbox", "list", "-u", "alice", "--json").json["mailboxes"]
    return next(m["messages"] for m in boxes if m["name"] == mailbox)


# -- save ------------------------------------------------------------------------------
def test_save_prints_the_uid(alice):
    assert ok("save", "-u", "alice", "-m", "INBOX", stdin=b"four").out == "4\n"
    assert ok("save", "-u", "alice", "-m", "Archive", stdin=b"one").out == "1\n"


def test_save_json(alice):
    body = b"From: x@example.org\r\n\r\nhi\r\n"
    r = ok("save", "-u", "alice", "-m", "INBOX", "--flags", "\\seen $Forwarded",
           "--internaldate", "2024-03-01T09:30:00+01:00", "--json", stdin=body).json
    assert (r["uid"], r["size"], r["internaldate"]) == (4, len(body), 1709281800)
    assert r["flags"] == ["\\Seen", "$Forwarded"]
    assert r["uidvalidity"] == ok("mailbox", "list", "-u", "alice",
                                  "--json").json["mailboxes"][1]["uidvalidity"]


@pytest.mark.parametrize("date, epoch", [
    ("1709281800", 1709281800),
    ("2024-03-01T08:30:00", 1709281800),         # no offset: UTC
    ("2024-03-01T08:30:00+00:00", 1709281800),
    ("2024-03-01", 1709251200),
    ("0", 0),
])
def test_save_internaldate(alice, date, epoch):
    assert ok("save", "-u", "alice", "-m", "INBOX", "--internaldate", date, "--json",
              stdin=b"m").json["internaldate"] == epoch


@pytest.mark.parametrize("date", ["yesterday", "1960-01-01", "2024-13-01", "-5"])
def test_save_refuses_a_bad_internaldate(alice, date):
    r = run("save", "-u", "alice", "-m", "INBOX", f"--internaldate={date}", "--json",
            stdin=b"m")
    assert r.code == 2 and r.json["error"] == "usage"
    assert messages() == 3


@pytest.mark.parametrize("flags, why", [
    ("\\Recent", "session state"),
    ("\\Bogus", "unknown system flag"),
    ("a(b", "bad flag keyword"),
    ("caf\u00e9", "bad flag keyword"),
    ("x]", "bad flag keyword"),
])
def test_save_refuses_bad_flags(alice, flags, why):
    r = run("save", "-u", "alice", "-m", "INBOX", "--flags", flags, "--json", stdin=b"m")
    assert r.code == 2 and why in r.error
    assert messages() == 3


def test_save_refuses_an_empty_message(alice):
    r = run("save", "-u", "alice", "-m", "INBOX", "--json", stdin=b"")
    assert r.code == 2 and "no message on standard input" in r.error


def test_save_to_a_missing_mailbox_or_user(alice):
    r = run("save", "-u", "alice", "-m", "Nope", "--json", stdin=b"m")
    assert r.code == 1 and r.json["error"] == "no-such-mailbox"
    r = run("save", "-u", "bob", "-m", "INBOX", "--json", stdin=b"m")
    assert r.code == 1 and r.json["error"] == "no-such-user"


def test_the_same_body_twice_is_two_messages_sharing_one_body(alice):
    ok("save", "-u", "alice", "-m", "INBOX", stdin=ALICE_BODIES[0])
    assert messages() == 4
    assert ok("verify", "--json").json["blobs"] == 3


# -- fetch -------------------------------------------------------------------------------
@pytest.mark.parametrize("uid", [1, 2, 3])
def test_fetch_is_byte_exact(alice, uid):
    assert ok("fetch", "-u", "alice", "-m", "INBOX", "--uid", uid).stdout == ALICE_BODIES[uid - 1]


def test_fetch_json(alice):
    r = ok("fetch", "-u", "alice", "-m", "INBOX", "--uid", "3", "--json").json
    body = base64.b64decode(r["body_base64"])
    assert body == ALICE_BODIES[2]
    assert r["sha1"] == hashlib.sha1(body).hexdigest()
    assert (r["uid"], r["size"], r["flags"], r["mailbox"]) == (3, len(body), [], "INBOX")


def test_fetch_star_is_the_highest_uid_given_out(alice):
    assert ok("fetch", "-u", "alice", "-m", "INBOX", "--uid", "*").stdout == ALICE_BODIES[2]
    ok("expunge", "-u", "alice", "-m", "INBOX", "--uid", "3")
    r = run("fetch", "-u", "alice", "-m", "INBOX", "--uid", "*", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-message"
    assert "UID 3" in r.error


def test_fetch_takes_one_uid(alice):
    r = run("fetch", "-u", "alice", "-m", "INBOX", "--uid", "1:2", "--json")
    assert r.code == 2 and "one UID" in r.error
    assert r.stdout.count(b"\n") == 1      # the error object only, no body


def test_fetch_a_missing_message(alice):
    r = run("fetch", "-u", "alice", "-m", "INBOX", "--uid", "9")
    assert r.code == 1 and r.stdout == b""
    assert r.error == "'INBOX' of user 'alice' has no message with UID 9"


def test_fetch_from_an_empty_mailbox(alice):
    r = run("fetch", "-u", "alice", "-m", "Archive", "--uid", "*", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-message"


# -- flags --------------------------------------------------------------------------------
def test_flags_add_remove_replace(alice):
    r = ok("flags", "add", "-u", "alice", "-m", "INBOX", "--uid", "1:*", "\\seen", "$Junk",
           "--json").json
    assert (r["uids"], r["mode"], r["changed"]) == ("1:3", "add", 3)
    assert r["flags"] == ["\\Seen", "$Junk"]
    assert flags_of(2) == ["\\Seen", "$Junk"]
    r = ok("flags", "remove", "-u", "alice", "-m", "INBOX", "--uid", "2", "$junk", "--json").json
    assert r["changed"] == 1
    assert flags_of(2) == ["\\Seen"]               # keywords match case-insensitively
    r = ok("flags", "replace", "-u", "alice", "-m", "INBOX", "--uid", "1,3", "\\Flagged",
           "--json").json
    assert r["changed"] == 2
    assert [flags_of(uid) for uid in (1, 2, 3)] == [["\\Flagged"], ["\\Seen"], ["\\Flagged"]]
    ok("flags", "replace", "-u", "alice", "-m", "INBOX", "--uid", "1:*")
    assert [flags_of(uid) for uid in (1, 2, 3)] == [[], [], []]


def test_flags_text_and_no_change(alice):
    assert ok("flags", "add", "-u", "alice", "-m", "INBOX", "--uid", "1", "\\Seen").out == \
        "added flags on 1 message\n"
    assert ok("flags", "add", "-u", "alice", "-m", "INBOX", "--uid", "1:2", "\\Seen").out == \
        "added flags on 1 message\n"          # UID 1 had it already
    assert ok("flags", "remove", "-u", "alice", "-m", "INBOX", "--uid", "1:*", "\\Draft").out == \
        "removed flags from 0 messages\n"


@pytest.mark.parametrize("uids, canonical, changed", [
    ("1:*", "1:3", 3),
    ("2:*", "2:3", 2),
    ("*", "3", 1),
    ("*:2", "2:3", 2),
    ("3,1", "1,3", 2),
    ("2:1", "1:2", 2),
    ("1:2,2:3", "1:3", 3),
    ("1:5,9", "1:5,9", 3),
    ("7:9", "7:9", 0),
])
def test_uid_sets(alice, uids, canonical, changed):
    r = ok("flags", "add", "-u", "alice", "-m", "INBOX", "--uid", uids, "$X", "--json").json
    assert (r["uids"], r["changed"]) == (canonical, changed)


@pytest.mark.parametrize("uids", ["", "x", "0", "1:x", "4294967296", "1,,2", "1:2:3", "-1"])
def test_malformed_uid_sets(alice, uids):
    r = run("flags", "add", "-u", "alice", "-m", "INBOX", f"--uid={uids}", "$X", "--json")
    assert r.code == 2 and r.json["error"] == "usage"
    assert flags_of(1) == []


def test_flags_need_at_least_one_flag_except_replace(alice):
    assert run("flags", "add", "-u", "alice", "-m", "INBOX", "--uid", "1").code == 2
    assert run("flags", "remove", "-u", "alice", "-m", "INBOX", "--uid", "1").code == 2


# -- expunge, copy, move --------------------------------------------------------------------
def test_expunge(alice):
    r = ok("expunge", "-u", "alice", "-m", "INBOX", "--uid", "1,3", "--json").json
    assert (r["uids"], r["expunged"]) == ("1,3", 2)
    assert messages() == 1
    assert ok("expunge", "-u", "alice", "-m", "INBOX", "--uid", "1:*").out == \
        "expunged 1 message from INBOX\n"
    assert ok("expunge", "-u", "alice", "-m", "INBOX", "--uid", "1:*", "--json").json[
        "expunged"] == 0
    # UIDs are never reused: the next message gets 4.
    assert ok("save", "-u", "alice", "-m", "INBOX", stdin=b"new").out == "4\n"


def test_copy(alice):
    r = ok("copy", "-u", "alice", "-m", "INBOX", "--uid", "2:*", "Archive", "--json").json
    assert r["uids"] == [{"uid": 2, "new_uid": 1}, {"uid": 3, "new_uid": 2}]
    assert (r["mailbox"], r["dest"]) == ("INBOX", "Archive")
    assert messages("INBOX") == 3 and messages("Archive") == 2
    assert ok("fetch", "-u", "alice", "-m", "Archive", "--uid", "2").stdout == ALICE_BODIES[2]
    assert ok("verify", "--json").json["blobs"] == 3       # bodies shared, not copied
    assert ok("copy", "-u", "alice", "-m", "INBOX", "--uid", "1", "Archive").out == \
        "copied 1 message from INBOX to Archive: UIDs 1 -> 3\n"


def test_move(alice):
    ok("flags", "add", "-u", "alice", "-m", "INBOX", "--uid", "1", "\\Flagged")
    assert ok("move", "-u", "alice", "-m", "INBOX", "--uid", "1:2", "Archive").out == \
        "moved 2 messages from INBOX to Archive: UIDs 1:2 -> 1:2\n"
    assert messages("INBOX") == 1 and messages("Archive") == 2
    assert flags_of(1, "Archive") == ["\\Flagged"]
    assert ok("fetch", "-u", "alice", "-m", "Archive", "--uid", "2").stdout == ALICE_BODIES[1]


def test_copy_nothing(alice):
    r = ok("copy", "-u", "alice", "-m", "Archive", "--uid", "1:*", "INBOX", "--json").json
    assert r["uids"] == []


@pytest.mark.parametrize("verb", ["copy", "move"])
def test_copy_and_move_refusals(alice, verb):
    r = run(verb, "-u", "alice", "-m", "INBOX", "--uid", "1", "inbox", "--json")
    assert r.code == 2 and "onto itself" in r.error
    r = run(verb, "-u", "alice", "-m", "INBOX", "--uid", "1", "Nope", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-mailbox"
    assert messages("INBOX") == 3
