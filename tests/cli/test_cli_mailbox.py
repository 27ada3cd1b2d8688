"""`modsync mailbox`, `subscribe`, `unsubscribe`; names as real servers have them."""
from __future__ import annotations

import unicodedata

import pytest

from .runner import ALICE_BODIES, ok, run


def mailboxes(user: str = "alice", *extra) -> dict[str, dict]:
    return {m["name"]: m for m in ok("mailbox", "list", "-u", user, *extra,
                                     "--json").json["mailboxes"]}


def test_create_list_rename_delete(alice):
    created = ok("mailbox", "create", "-u", "alice", "Work/Q1 reports", "--json").json
    mb = created["mailbox"]
    assert created["user"] == "alice"
    assert (mb["name"], mb["messages"], mb["uidnext"], mb["specialuse"]) == (
        "Work/Q1 reports", 0, 1, [])
    assert mailboxes()["Work/Q1 reports"]["id"] == mb["id"]

    renamed = ok("mailbox", "rename", "-u", "alice", "Work/Q1 reports", "Archive/Q1",
                 "--json").json
    assert renamed["old"] == "Work/Q1 reports"
    assert (renamed["mailbox"]["id"], renamed["mailbox"]["uidvalidity"]) == (
        mb["id"], mb["uidvalidity"])
    assert set(mailboxes()) == {"INBOX", "Archive", "Archive/Q1"}

    deleted = ok("mailbox", "delete", "-u", "alice", "Archive/Q1", "--json").json
    assert deleted["mailbox"] == {"name": "Archive/Q1", "id": mb["id"]}
    assert set(mailboxes()) == {"INBOX", "Archive"}


def test_text_output(alice):
    assert ok("mailbox", "create", "-u", "alice", "Work").out.startswith(
        "created mailbox Work (id ")
    assert ok("mailbox", "rename", "-u", "alice", "Work", "Play").out == "renamed Work to Play\n"
    assert ok("mailbox", "delete", "-u", "alice", "INBOX").out == \
        "deleted mailbox INBOX (3 messages)\n"
    lines = ok("mailbox", "list", "-u", "alice").lines
    assert lines[0].split() == ["NAME", "MESSAGES", "SIZE", "UIDVALIDITY", "UIDNEXT",
                                "HIGHESTMODSEQ"]
    assert [line.split()[0] for line in lines[1:]] == ["Archive", "Play"]


def test_list_shows_counts_and_sizes(alice):
    inbox = mailboxes()["INBOX"]
    assert inbox["messages"] == 3 and inbox["uidnext"] == 4
    assert inbox["size"] == sum(map(len, ALICE_BODIES))
    row = next(line for line in ok("mailbox", "list", "-u", "alice").lines
               if line.startswith("INBOX"))
    assert row.split()[1:4] == ["3", str(inbox["size"]), "B"]


def test_parents_are_not_created(alice):
    ok("mailbox", "create", "-u", "alice", "A/B/C")
    assert "A" not in mailboxes() and "A/B" not in mailboxes()


def test_create_makes_the_user(store):
    ok("mailbox", "create", "-u", "newbie", "INBOX")
    assert [u["user"] for u in ok("status", "--json").json["users"]] == ["newbie"]


def test_create_an_existing_mailbox(alice):
    r = run("mailbox", "create", "-u", "alice", "Archive", "--json")
    assert r.code == 1 and r.json["error"] == "mailbox-exists"
    assert r.json["subject"] == "Archive"


def test_special_use(alice):
    mb = ok("mailbox", "create", "-u", "alice", "Spam", "--special-use", "\\junk",
            "--special-use", "\\Important \\Junk", "--json").json["mailbox"]
    assert mb["specialuse"] == ["\\Junk", "\\Important"]
    lines = ok("mailbox", "list", "-u", "alice").lines
    assert lines[0].split()[-1] == "SPECIAL-USE"
    assert lines[-1].split()[0] == "Spam" and lines[-1].endswith("\\Junk \\Important")


def test_unknown_special_use(alice):
    r = run("mailbox", "create", "-u", "alice", "Spam", "--special-use", "\\Spam", "--json")
    assert r.code == 2 and "unknown special use" in r.error
    assert "Spam" not in mailboxes()


HOSTILE = [
    "v1.2",                       # a dot: Maildir++ would split it
    "a^b",                        # the Cyrus hierarchy escape
    "Q1 reports ",                # spaces, a trailing one too
    " leading",
    "Entwürfe/日本語/Ελληνικά",    # non-ASCII at every level
    "~tilde",
    "&AOQ-",                      # looks like modified UTF-7: it is taken literally
    "%*\"\\",                     # IMAP's list wildcards and quoting
    "INBOXes",                    # only INBOX itself is case-insensitive
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_round_trip(alice, name):
    assert ok("mailbox", "create", "-u", "alice", name, "--json").json["mailbox"]["name"] == name
    assert name in mailboxes()
    assert any(line.startswith(name) for line in ok("mailbox", "list", "-u", "alice").lines)
    assert ok("save", "-u", "alice", "-m", name, stdin=b"body").out == "1\n"
    assert ok("fetch", "-u", "alice", "-m", name, "--uid", "1").stdout == b"body"
    ok("subscribe", "-u", "alice", name)
    assert mailboxes()[name]["subscribed"] is True
    ok("mailbox", "rename", "-u", "alice", name, name + "-2")
    ok("mailbox", "delete", "-u", "alice", name + "-2")
    assert set(mailboxes()) == {"INBOX", "Archive"}


def test_a_name_that_looks_like_an_option(alice):
    ok("mailbox", "create", "-u", "alice", "--", "-dash")
    assert "-dash" in mailboxes()
    assert run("mailbox", "create", "-u", "alice", "-other").code == 2


@pytest.mark.parametrize("spelling", ["inbox", "Inbox", "iNbOx"])
def test_inbox_is_case_insensitive(alice, spelling):
    assert ok("save", "-u", "alice", "-m", spelling, "--json",
              stdin=b"x").json["mailbox"] == "INBOX"
    created = ok("mailbox", "create", "-u", "alice", f"{spelling}/Sub", "--json").json
    assert created["mailbox"]["name"] == "INBOX/Sub"
    r = run("mailbox", "create", "-u", "alice", spelling, "--json")
    assert r.code == 1 and r.json["error"] == "mailbox-exists"
    assert ok("subscribe", "-u", "alice", spelling, "--json").json["name"] == "INBOX"


def test_names_are_nfc_normalised(alice):
    decomposed = unicodedata.normalize("NFD", "Entwürfe")
    assert decomposed != "Entwürfe"
    assert ok("mailbox", "create", "-u", "alice", decomposed,
              "--json").json["mailbox"]["name"] == "Entwürfe"
    r = run("mailbox", "create", "-u", "alice", "Entwürfe", "--json")
    assert r.code == 1 and r.json["error"] == "mailbox-exists"
    assert ok("save", "-u", "alice", "-m", decomposed, "--json",
              stdin=b"x").json["mailbox"] == "Entwürfe"


@pytest.mark.parametrize("name", ["", "a//b", "/lead", "trail/", "tab\there", "nl\nx", "del\x7f"])
def test_invalid_mailbox_names(alice, name):
    r = run("mailbox", "create", "-u", "alice", "--json", "--", name)
    assert r.code == 2
    assert r.json["error"] == "invalid-name"
    assert set(mailboxes()) == {"INBOX", "Archive"}


@pytest.mark.parametrize("user", ["two words", "a/b", "", "tab\t"])
def test_invalid_user_names(store, user):
    r = run("mailbox", "create", "-u", user, "INBOX", "--json")
    assert r.code == 2 and r.json["error"] == "invalid-name"
    assert ok("status", "--json").json["users"] == []


def test_rename_inbox_moves_its_messages(alice):
    ok("mailbox", "rename", "-u", "alice", "INBOX", "Old")
    boxes = mailboxes()
    assert boxes["Old"]["messages"] == 3 and boxes["INBOX"]["messages"] == 0
    assert ok("fetch", "-u", "alice", "-m", "Old", "--uid", "2").stdout == ALICE_BODIES[1]


def test_rename_takes_the_children(alice):
    for name in ("Work", "Work/2024", "Work/2024/Q1", "Workshop"):
        ok("mailbox", "create", "-u", "alice", name)
    ok("mailbox", "rename", "-u", "alice", "Work", "Play")
    assert set(mailboxes()) == {"INBOX", "Archive", "Play", "Play/2024", "Play/2024/Q1",
                                "Workshop"}


@pytest.mark.parametrize("old, new, code, error", [
    ("Nope", "Other", 1, "no-such-mailbox"),
    ("Archive", "INBOX", 1, "mailbox-exists"),
    ("Archive", "Archive/Sub", 2, "usage"),
    ("Archive", "a//b", 2, "invalid-name"),
])
def test_rename_refusals(alice, old, new, code, error):
    r = run("mailbox", "rename", "-u", "alice", old, new, "--json")
    assert (r.code, r.json["error"]) == (code, error)
    assert set(mailboxes()) == {"INBOX", "Archive"}


def test_delete_leaves_a_tombstone_and_keeps_children(alice):
    ok("mailbox", "create", "-u", "alice", "Archive/2019")
    ok("mailbox", "delete", "-u", "alice", "Archive")
    assert set(mailboxes()) == {"INBOX", "Archive/2019"}
    changes = ok("changes", "-u", "alice", "--since", "0", "--json").json["changes"]
    gone = [c for c in changes if c["kind"] == "mailbox" and c["removed"]]
    assert [c["identity"] for c in gone] == ["Archive"]
    # The name can be used again, with a higher uidvalidity.
    again = ok("mailbox", "create", "-u", "alice", "Archive", "--json").json["mailbox"]
    assert again["id"] != gone[0]["object"]["id"]
    assert again["uidvalidity"] > gone[0]["object"]["uidvalidity"]


def test_delete_a_missing_mailbox(alice):
    r = run("mailbox", "delete", "-u", "alice", "Nope", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-mailbox"
    assert "modsync mailbox list" in r.error


def test_list_for_an_unknown_user(alice):
    r = run("mailbox", "list", "-u", "bob", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-user"


# -- subscriptions ------------------------------------------------------------------------
def test_subscribe_and_unsubscribe(alice):
    assert ok("subscribe", "-u", "alice", "INBOX", "--json").json == {
        "command": "subscribe", "ok": True, "user": "alice", "name": "INBOX", "subscribed": True}
    assert ok("subscribe", "-u", "alice", "Lists/python-dev").out == \
        "subscribed alice to Lists/python-dev\n"
    assert mailboxes()["INBOX"]["subscribed"] is True
    assert mailboxes()["Archive"]["subscribed"] is False
    subscribed = mailboxes("alice", "--subscribed")
    assert set(subscribed) == {"INBOX", "Lists/python-dev"}
    assert subscribed["Lists/python-dev"]["id"] is None       # no such mailbox: still listed
    assert subscribed["INBOX"]["messages"] == 3
    r = ok("unsubscribe", "-u", "alice", "Lists/python-dev", "--json")
    assert r.json["subscribed"] is False
    assert set(mailboxes("alice", "--subscribed")) == {"INBOX"}


def test_subscribing_twice_is_no_change(alice):
    ok("subscribe", "-u", "alice", "INBOX")
    before = ok("status", "-u", "alice", "--json").json["users"][0]["modseq"]
    ok("subscribe", "-u", "alice", "INBOX")
    assert ok("status", "-u", "alice", "--json").json["users"][0]["modseq"] == before


def test_unsubscribe_when_not_subscribed(alice):
    r = run("unsubscribe", "-u", "alice", "Archive", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-object"


def test_subscribe_makes_the_user(store):
    ok("subscribe", "-u", "newbie", "Lists/x")
    assert set(mailboxes("newbie", "--subscribed")) == {"Lists/x"}
