"""Change sets between stores: `state`, `diff`, `apply` (offline files) and `sync`.

Every store here is made by `modsync init` (``new_store``): copies of one
template would share a store id, and a change set names its origin by it.
"""
from __future__ import annotations

import pytest

from .runner import ok, run


def save(store, body: bytes, mailbox: str = "INBOX") -> None:
    ok("save", "--store", store, "-u", "alice", "-m", mailbox, stdin=body)


def state(store) -> str:
    return ok("state", "--store", store, "-u", "alice").out.strip()


def digest(store) -> str | None:
    users = ok("status", "--store", store, "--json").json["users"]
    return next((u["digest"] for u in users if u["user"] == "alice"), None)


def names(store) -> set[str]:
    r = ok("mailbox", "list", "--store", store, "-u", "alice", "--json")
    return {m["name"] for m in r.json["mailboxes"]}


def diff(src, receiver_token: str, out) -> dict:
    return ok("diff", "--store", src, "-u", "alice", "--since", receiver_token, "--out", out,
              "--json").json


def apply(dst, path, *extra):
    return run("apply", "--store", dst, path, *extra, "--json")


@pytest.fixture
def pair(new_store):
    """Stores a and b; on a, alice has INBOX with two messages; b has nothing."""
    a, b = new_store("a"), new_store("b")
    ok("mailbox", "create", "--store", a, "-u", "alice", "INBOX")
    save(a, b"Subject: one\r\n\r\n1\r\n")
    save(a, b"Subject: two\r\n\r\n2\r\n")
    return a, b


@pytest.fixture
def synced(pair, scratch):
    """The pair after a's mail went to b by a diff file."""
    a, b = pair
    diff(a, state(b), scratch / "first.diff")
    assert apply(b, scratch / "first.diff").json["status"] == "applied"
    return a, b


def test_state_of_a_user_the_store_lacks_is_0(pair):
    a, b = pair
    assert ok("state", "--store", b, "-u", "alice").out == "0\n"
    r = ok("state", "--store", b, "-u", "alice", "--json").json
    assert r["token"] == "0"
    assert r["store_id"] == ok("status", "--store", b, "--json").json["store"]["id"]
    assert state(a).startswith("ms1.")


def test_file_exchange_converges_both_ways(pair, scratch):
    a, b = pair
    d = diff(a, state(b), scratch / "a1.diff")
    assert d["items"] >= 3 and d["bodies"] == 2 and d["bytes"] > 0
    first = apply(b, scratch / "a1.diff")
    assert first.code == 0
    assert (first.json["status"], first.json["counter_diff"]) == ("applied", None)
    assert first.json["token"] == state(b)
    assert digest(a) == digest(b)

    # Both change; b merges a's diff and answers with what a lacks.
    token_b = state(b)
    save(a, b"Subject: three (a)\r\n\r\n3\r\n")
    save(b, b"Subject: three (b)\r\n\r\nb\r\n")
    ok("mailbox", "create", "--store", b, "-u", "alice", "From B")
    diff(a, token_b, scratch / "a2.diff")
    merged = apply(b, scratch / "a2.diff", "--counter-diff", scratch / "b1.diff")
    assert merged.code == 0
    assert merged.json["status"] == "merged" and merged.json["counter_items"] > 0
    assert merged.json["counter_diff"]["out"] == str(scratch / "b1.diff")
    assert merged.json["counter_diff"]["items"] > 0
    back = apply(a, scratch / "b1.diff")
    assert back.code == 0 and back.json["status"] in ("applied", "merged")
    assert digest(a) == digest(b)
    assert names(a) == names(b) == {"INBOX", "From B"}
    inbox = [m for m in ok("mailbox", "list", "--store", a, "-u", "alice",
                           "--json").json["mailboxes"] if m["name"] == "INBOX"]
    assert inbox[0]["messages"] == 4          # no message lost in the merge

    # Applying the same file again does nothing.
    again = apply(b, scratch / "a2.diff")
    assert again.code == 0
    assert (again.json["status"], again.json["written"]) == ("nothing", 0)
    assert run("apply", "--store", b, scratch / "a2.diff").out.startswith(
        f"{scratch / 'a2.diff'}: nothing to do (already applied)\n")


def test_apply_text(pair, scratch):
    a, b = pair
    diff(a, "0", scratch / "full.diff")
    r = ok("apply", "--store", b, scratch / "full.diff")
    lines = r.lines
    assert lines[0].startswith(f"applied {scratch / 'full.diff'}: ")
    assert lines[0].endswith(" objects written")
    assert lines[-1] == f"state: {state(b)}"
    assert ok("diff", "--store", a, "-u", "alice", "--since", "0", "--out",
              scratch / "x.diff").out.startswith(f"wrote {scratch / 'x.diff'}: ")


def test_a_diff_for_a_state_the_receiver_lacks_is_rejected(pair, new_store, scratch):
    a, b = pair
    c = new_store("c")
    ok("mailbox", "create", "--store", c, "-u", "alice", "Elsewhere")
    diff(a, state(c), scratch / "for-c.diff")        # built for c, shipped to b
    r = run("apply", "--store", b, scratch / "for-c.diff")
    assert r.code == 3
    assert r.out.startswith(f"rejected {scratch / 'for-c.diff'}: ")
    assert "ask the sender for: modsync diff -u alice --since " in r.out
    j = apply(b, scratch / "for-c.diff")
    assert j.code == 3
    assert (j.json["ok"], j.json["status"], j.json["code"]) == (False, "rejected", "base-unknown")
    assert ok("status", "--store", b, "--json").json["users"] == []
    # The token printed is what the sender needs: a diff from it applies.
    diff(a, j.json["token"], scratch / "for-b.diff")
    assert apply(b, scratch / "for-b.diff").json["status"] == "applied"


def test_no_merge_rejects_when_the_receiver_changed(synced, scratch):
    a, b = synced
    token_b = state(b)
    save(a, b"Subject: from a\r\n\r\na\r\n")
    ok("flags", "add", "--store", b, "-u", "alice", "-m", "INBOX", "--uid", "1", "\\Seen")
    before = digest(b)
    diff(a, token_b, scratch / "a.diff")
    r = apply(b, scratch / "a.diff", "--no-merge", "--counter-diff", scratch / "back.diff")
    assert r.code == 3
    assert (r.json["ok"], r.json["status"], r.json["code"]) == (False, "rejected", "changed")
    assert r.json["counter_items"] > 0
    assert digest(b) == before
    # The counter diff lets the sender merge first; then the resend applies cleanly.
    assert apply(a, scratch / "back.diff").json["status"] == "merged"
    diff(a, state(b), scratch / "a2.diff")
    assert apply(b, scratch / "a2.diff", "--no-merge").json["status"] == "applied"
    assert digest(a) == digest(b)


def test_a_rejected_apply_ends_with_an_error_line(synced, scratch):
    a, b = synced
    token_b = state(b)
    save(a, b"Subject: from a\r\n\r\na\r\n")
    save(b, b"Subject: from b\r\n\r\nb\r\n")
    diff(a, token_b, scratch / "a.diff")
    r = run("apply", "--store", b, scratch / "a.diff", "--no-merge")
    assert r.code == 3
    assert r.error and "rejected" in r.error


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "bit flipped":
        data[len(data) // 2] ^= 0x10
    elif how == "checksum flipped":
        data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "bit flipped", "checksum flipped"])
def test_a_damaged_diff_is_refused(pair, scratch, how):
    a, b = pair
    diff(a, "0", scratch / "a.diff")
    damage(scratch / "a.diff", how)
    r = apply(b, scratch / "a.diff")
    assert r.code == 1 and r.json["error"] == "protocol"
    assert "checksum mismatch" in r.error
    assert ok("status", "--store", b, "--json").json["users"] == []


@pytest.mark.parametrize("content", [b"", b"hello\n" * 20, b"MSDIFF1\n"])
def test_a_file_that_is_not_a_diff(pair, scratch, content):
    _, b = pair
    (scratch / "junk.diff").write_bytes(content)
    r = apply(b, scratch / "junk.diff")
    assert r.code == 1 and r.json["error"] == "protocol"
    assert ("not a modsync diff file" in r.error) or ("truncated" in r.error)
    assert ok("status", "--store", b, "--json").json["users"] == []


def test_apply_a_missing_file(pair, scratch):
    r = apply(pair[1], scratch / "nope.diff")
    assert r.code == 1 and "cannot read the diff file" in r.error


def test_a_token_for_another_user(pair, scratch):
    a, b = pair
    ok("mailbox", "create", "--store", b, "-u", "bob", "INBOX")
    token = ok("state", "--store", b, "-u", "bob").out.strip()
    r = run("diff", "--store", a, "-u", "alice", "--since", token, "--out", scratch / "x.diff",
            "--json")
    assert r.code == 2 and r.json["error"] == "usage"
    assert "describes user 'bob'" in r.error
    assert not (scratch / "x.diff").exists()


@pytest.mark.parametrize("token", ["garbage", "ms1.!!!", "ms1.AAAA"])
def test_a_damaged_token(pair, scratch, token):
    r = run("diff", "--store", pair[0], "-u", "alice", "--since", token,
            "--out", scratch / "x.diff", "--json")
    assert r.code == 1 and r.json["error"] == "protocol"
    assert "modsync state" in r.error


def test_diff_refusals(pair, scratch):
    a, _ = pair
    r = run("diff", "--store", a, "-u", "bob", "--since", "0", "--out", scratch / "x.diff",
            "--json")
    assert r.code == 1 and r.json["error"] == "no-such-user"
    r = run("diff", "--store", a, "-u", "alice", "--since", "0",
            "--out", scratch / "no" / "such" / "dir.diff", "--json")
    assert r.code == 1 and r.json["error"] == "os"
    assert run("diff", "--store", a, "-u", "alice", "--since", "0").code == 2   # no --out


def test_mass_delete_is_refused_unless_allowed(synced, scratch):
    a, b = synced
    token_b = state(b)
    ok("expunge", "--store", a, "-u", "alice", "-m", "INBOX", "--uid", "1:*")
    diff(a, token_b, scratch / "empty.diff")
    before = digest(b)
    r = apply(b, scratch / "empty.diff")
    assert r.code == 3
    assert r.json["error"] == "mass-delete"
    assert "--allow-mass-delete" in r.error
    assert digest(b) == before
    ok("apply", "--store", b, scratch / "empty.diff", "--allow-mass-delete")
    assert digest(a) == digest(b)


# -- sync ------------------------------------------------------------------------------------------
def test_sync_converges_and_merges_mailbox_names(pair):
    a, b = pair
    ok("mailbox", "create", "--store", a, "-u", "alice", "Work")
    ok("mailbox", "create", "--store", b, "-u", "alice", "Personal")
    save(b, b"Subject: b\r\n\r\nb\r\n", "Personal")
    ok("mailbox", "create", "--store", b, "-u", "bob", "INBOX")
    r = ok("sync", "--store", a, "--peer", b, "--json").json
    assert r["converged"] is True and r["peer"] == str(b)
    assert {u["user"] for u in r["users"]} == {"alice", "bob"}
    assert all(u["converged"] for u in r["users"])
    assert names(a) == names(b) == {"INBOX", "Work", "Personal"}
    assert digest(a) == digest(b)
    again = ok("sync", "--store", a, "--peer", b, "--json").json
    assert {s["status"] for u in again["users"] for s in u["steps"]} == {"nothing"}


def test_sync_keeps_both_mailboxes_of_one_name(pair):
    a, b = pair
    ok("mailbox", "create", "--store", b, "-u", "alice", "INBOX")
    save(b, b"Subject: b's inbox\r\n\r\nb\r\n")
    ok("sync", "--store", a, "--peer", b)
    both = names(a)
    assert both == names(b)
    assert "INBOX" in both and len(both) == 2
    (other,) = both - {"INBOX"}
    assert other.startswith("INBOX~")
    assert digest(a) == digest(b)


def test_sync_one_user(pair):
    a, b = pair
    ok("mailbox", "create", "--store", b, "-u", "bob", "INBOX")
    r = ok("sync", "--store", a, "--peer", b, "-u", "alice", "--json").json
    assert [u["user"] for u in r["users"]] == ["alice"]
    assert [u["user"] for u in ok("status", "--store", a, "--json").json["users"]] == ["alice"]


def test_sync_text(pair):
    a, b = pair
    lines = ok("sync", "--store", a, "--peer", b).lines
    assert lines[0].split() == ["USER", "STEPS", "CONVERGED", "DIGEST"]
    assert lines[1].split()[0] == "alice" and " yes " in lines[1]


def test_sync_an_unknown_user(pair):
    a, b = pair
    r = run("sync", "--store", a, "--peer", b, "-u", "alcie", "--json")
    assert r.code == 1 and r.json["error"] == "no-such-user"
