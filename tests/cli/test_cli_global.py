"""What every command shares: global options, finding the store, usage errors, output."""
from __future__ import annotations

import json
import os
import re

import pytest

from .runner import ALICE_BODIES, ok, run


# -- the command line ---------------------------------------------------------------
def test_version():
    r = run("--version")
    assert r.code == 0
    assert re.fullmatch(r"modsync \S+ \(store schema \d+\)\n", r.out)


def test_no_verb_is_a_usage_error():
    r = run()
    assert r.code == 2
    assert "usage: modsync" in r.err
    assert "VERB" in r.error


def test_unknown_verb_with_json():
    r = run("--json", "frobnicate")
    assert r.code == 2
    assert r.json["command"] == "" and r.json["error"] == "usage"
    assert "frobnicate" in r.json["message"]


@pytest.mark.parametrize("argv, command", [
    (["mailbox", "--json"], "mailbox"),
    (["mailbox", "create", "-u", "alice", "--json"], "mailbox create"),
    (["flags", "add", "-u", "alice", "-m", "INBOX", "--json"], "flags add"),
    (["changes", "-u", "alice", "--since", "-1", "--json"], "changes"),
    (["save", "-u", "alice", "--json"], "save"),
])
def test_usage_errors_name_the_command(argv, command):
    r = run(*argv)
    assert r.code == 2
    assert r.json["command"] == command
    assert r.json["error"] == "usage"
    assert r.err.startswith(f"usage: modsync {command}")


def test_json_after_double_dash_is_an_argument(alice):
    """Everything after `--` is positional: `--json` there is a mailbox name, not the option."""
    r = ok("mailbox", "create", "-u", "alice", "--", "--json")
    assert r.out.startswith("created mailbox --json ")
    names = [m["name"] for m in ok("mailbox", "list", "-u", "alice", "--json").json["mailboxes"]]
    assert "--json" in names


@pytest.mark.parametrize("argv", [
    ["--json", "mailbox", "list", "-u", "alice"],
    ["mailbox", "--json", "list", "-u", "alice"],
    ["mailbox", "list", "-u", "alice", "--json"],
    ["--json", "mailbox", "list", "--json", "-u", "alice"],
])
def test_global_options_before_and_after_the_verb(alice, argv):
    r = ok(*argv)
    assert r.json["command"] == "mailbox list"
    assert [m["name"] for m in r.json["mailboxes"]] == ["Archive", "INBOX"]


def test_store_before_and_after_the_verb(alice, store):
    before = ok("--store", alice, "status", "--json").json
    after = ok("status", "--store", alice, "--json").json
    assert before == after
    assert before["store"]["path"] == str(alice)


def test_option_after_the_verb_wins(alice, scratch):
    missing = scratch / "missing"
    assert ok("--store", missing, "status", "--store", alice).code == 0
    r = run("--store", alice, "status", "--store", missing)
    assert r.code == 1 and str(missing) in r.error


def test_verbose_counts_add_up_across_the_verb(alice):
    # -vv is debug; the debug line below is logged by `save` before it reads stdin.
    line = "modsync: debug: reading the message from standard input"
    one = run("-v", "save", "-u", "alice", "-m", "INBOX", stdin=b"x")
    assert one.code == 0 and line not in one.err
    two = run("-v", "save", "-v", "-u", "alice", "-m", "INBOX", stdin=b"y")
    assert two.code == 0 and line in two.err


def test_quiet_drops_confirmations_but_not_results(alice):
    assert ok("-q", "mailbox", "create", "-u", "alice", "Work").out == ""
    assert ok("mailbox", "create", "-u", "alice", "Play").out.startswith("created mailbox Play")
    assert "Work" in ok("mailbox", "list", "-u", "alice", "-q").out
    assert ok("save", "-q", "-u", "alice", "-m", "Work", stdin=b"m").out == "1\n"


def test_log_file_takes_the_log_lines(alice, scratch):
    log = scratch / "modsync.log"
    r = ok("-vv", "--log-file", log, "save", "-u", "alice", "-m", "INBOX", stdin=b"z")
    assert r.err == ""
    assert "reading the message from standard input" in log.read_text()


# -- finding the store ---------------------------------------------------------------
def test_store_from_the_environment(alice):
    assert os.environ["MODSYNC_STORE"] == str(alice)
    r = ok("status", "--json")
    assert r.json["store"]["path"] == str(alice)
    assert [u["user"] for u in r.json["users"]] == ["alice"]


def test_store_flag_beats_the_environment(alice, scratch):
    other = scratch / "other"
    ok("init", "--store", other, "-q")
    r = ok("status", "--store", other, "--json")
    assert r.json["store"]["path"] == str(other) and r.json["users"] == []


def test_no_store_given():
    r = run("status", "--json")
    assert r.code == 2
    assert r.json["error"] == "usage"
    assert "MODSYNC_STORE" in r.json["message"] and "--store" in r.json["message"]


def test_missing_store_directory(scratch):
    missing = scratch / "srv" / "modsync"
    r = run("status", "--store", missing, "--json")
    assert r.code == 1
    assert r.json["error"] == "not-a-store"
    assert "no such directory" in r.json["message"]
    assert not (scratch / "srv").exists()


@pytest.mark.parametrize("argv, stdin", [
    (["status"], b""),
    (["mailbox", "create", "-u", "alice", "INBOX"], b""),
    (["save", "-u", "alice", "-m", "INBOX"], ALICE_BODIES[0]),
    (["subscribe", "-u", "alice", "INBOX"], b""),
    (["verify"], b""),
    (["gc", "--retention", "0"], b""),
])
def test_an_empty_directory_is_refused_as_a_missing_mount(scratch, argv, stdin):
    """An unmounted volume looks like an empty directory: refuse it, and write nothing there."""
    mount = scratch / "mnt"
    mount.mkdir()
    r = run(*argv, "--store", mount, "--json", stdin=stdin)
    assert r.code == 1
    assert r.json["error"] == "not-a-store"
    assert "mounted" in r.json["message"] and "modsync init" in r.json["message"]
    assert list(mount.iterdir()) == []


def test_sync_refuses_a_peer_that_is_not_a_store(alice, scratch):
    mount = scratch / "mnt"
    mount.mkdir()
    r = run("sync", "--peer", mount, "--json")
    assert r.code == 1 and r.json["error"] == "not-a-store"
    assert list(mount.iterdir()) == []


def test_a_foreign_marker_is_refused(scratch):
    path = scratch / "foreign"
    path.mkdir()
    (path / "FORMAT").write_text("something else entirely\n")
    r = run("status", "--store", path, "--json")
    assert r.code == 1 and r.json["error"] == "not-a-store"


def test_a_newer_store_schema_is_refused(store):
    fmt = store / "FORMAT"
    fmt.write_text(fmt.read_text().replace("modsync-store 1", "modsync-store 99"))
    r = run("status", "--json")
    assert r.code == 1
    assert r.json["error"] == "schema-version"
    assert "upgrade modsync" in r.json["message"]


# -- init ---------------------------------------------------------------------------------
def test_init(scratch):
    path = scratch / "new" / "store"
    r = ok("init", "--store", path, "--compression-level", "19", "--json")
    assert r.json["store"] == str(path)
    assert r.json["compression_level"] == 19 and r.json["schema"] == 1
    assert (path / "FORMAT").read_text().split()[3] == r.json["id"]
    assert ok("status", "--store", path, "--json").json["store"]["id"] == r.json["id"]


def test_init_text(scratch):
    r = ok("init", "--store", scratch / "s")
    assert re.fullmatch(r"initialised store \S+ \(id [0-9a-f]{32}\)\n", r.out)


def test_init_refuses_a_directory_that_is_not_empty(scratch):
    path = scratch / "data"
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    r = run("init", "--store", path, "--json")
    assert r.code == 2 and "not empty" in r.json["message"]
    assert [p.name for p in path.iterdir()] == ["keep.txt"]


def test_init_refuses_an_existing_store(store):
    r = run("init", "--json")
    assert r.code == 2 and "already a modsync store" in r.json["message"]


@pytest.mark.parametrize("level", ["0", "23", "fast", "-1"])
def test_init_compression_level_range(scratch, level):
    r = run("init", "--store", scratch / "s", "--compression-level", level)
    assert r.code == 2 and "zstd level from 1 to 22" in r.error
    assert not (scratch / "s").exists()


# -- output ------------------------------------------------------------------------------
def test_json_is_one_line_and_keeps_names_as_they_are(alice):
    ok("mailbox", "create", "-u", "alice", "Entwürfe/日本")
    r = ok("mailbox", "list", "-u", "alice", "--json")
    assert "Entwürfe/日本" in r.out          # UTF-8 on stdout: not \u escapes
    assert r.out.count("\n") == 1


def test_a_terminal_that_cannot_show_a_name_gets_escapes(alice):
    ok("mailbox", "create", "-u", "alice", "Entwürfe/日本")
    r = run("mailbox", "list", "-u", "alice", encoding="ascii")
    assert r.code == 0
    assert "Entw\\xfcrfe/\\u65e5\\u672c" in r.out
    j = run("mailbox", "list", "-u", "alice", "--json", encoding="ascii")
    assert j.code == 0
    assert "Entw\\u00fcrfe" in j.out
    assert "Entwürfe/日本" in [m["name"] for m in json.loads(j.out)["mailboxes"]]
    e = run("mailbox", "create", "-u", "alice", "Entwürfe/日本", encoding="ascii")
    assert e.code == 1 and "Entw\\xfcrfe" in e.err


def test_tables_align_wide_characters(alice):
    from engine.cli.output import display_width
    ok("mailbox", "create", "-u", "alice", "日本")
    lines = ok("mailbox", "list", "-u", "alice").lines
    end = len(lines[0][:lines[0].index("MESSAGES") + len("MESSAGES")])
    for row, (name, count) in zip(lines[1:], [("Archive", "0"), ("INBOX", "3"), ("日本", "0")],
                                  strict=True):
        assert row.startswith(name)
        i = row.index(count, len(name)) + len(count)
        assert display_width(row[:i]) == end, row   # "日本" takes 4 columns, not 2


def test_quiet_json_still_writes_the_object(alice):
    r = ok("-q", "mailbox", "create", "-u", "alice", "Work", "--json")
    assert r.json["mailbox"]["name"] == "Work"


TOO_BIG = str(2 ** 64)


@pytest.mark.parametrize("argv, stdin", [
    (["save", "-u", "alice", "-m", "INBOX", "--internaldate", TOO_BIG], b"m"),
    (["changes", "-u", "alice", "--since", TOO_BIG], b""),
    (["seen", "-u", "bob", "--mailbox-id", "x", "--uid", "1", "--lastuid", TOO_BIG], b""),
    (["quota", "set", "-u", "alice", "", "--messages", TOO_BIG], b""),
], ids=["save --internaldate", "changes --since", "seen --lastuid", "quota --messages"])
def test_numbers_out_of_range_are_usage_errors(alice, argv, stdin):
    r = run(*argv, "--json", stdin=stdin)
    assert r.code == 2 and r.json["error"] == "usage", r.error
