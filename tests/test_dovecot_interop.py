"""Maildir import and export against a real Dovecot 2.3 (doveadm, no daemon).

doveadm runs through tools/peers/dovecot.py: without -u, with USER set, as
a non-root uid (setpriv) when the tests run as root.  Each test works in a
directory of its own from ``tempfile.mkdtemp`` (pytest's tmp_path is not
reachable by that uid) and removes only that directory.
"""
from __future__ import annotations

import calendar
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.maildir import export_maildir, import_maildir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "peers"))
sys.path.insert(0, str(ROOT / "tools"))
import corpus
import dovecot

pytestmark = pytest.mark.interop
U = "alice"
T0 = 1_600_000_000


@pytest.fixture
def doveadm():
    """Doveadm(base) factory on one fresh base directory; Maildir at base/Maildir."""
    why = dovecot.missing()
    if why is not None:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="modsync-dovecot-"))
    try:
        yield lambda: dovecot.Doveadm(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def imap_name(listed: str) -> str:
    """A name as `doveadm mailbox list` prints it ('.' separates levels) -> a modsync name."""
    return listed.replace(".", "/")


def flagset(flags) -> frozenset:
    """IMAP flags compare without case ($Custom and $custom are one keyword)."""
    return frozenset(f.lower() for f in flags)


def existing_mailboxes(dc: dovecot.Doveadm) -> list[str]:
    """Mailboxes that exist (`mailbox list` also shows parents implied by their children)."""
    out = dc.run("mailbox", "status", "messages", "*", fmt="tab").decode()
    return [line.split("\t")[0] for line in out.splitlines()[1:] if line]


def dovecot_view(dc: dovecot.Doveadm) -> dict:
    """{mailbox: [(uid, body, flags, internaldate)]} as Dovecot serves them, in UID order."""
    view = {}
    for listed in existing_mailboxes(dc):
        rows = dc.fetch(listed, "uid flags date.received")
        view[imap_name(listed)] = [
            (int(r["uid"]), dc.text(listed, int(r["uid"])),
             flagset(f for f in r["flags"].split() if f != "\\Recent"),
             calendar.timegm(time.strptime(r["date.received"], "%Y-%m-%d %H:%M:%S")))
            for r in rows]
    return view


def store_view(store) -> dict:
    return {mb.name: [(r.uid, store.read_body(r.address), flagset(r.flags), r.internaldate)
                      for r in store.records(U, mb.name)]
            for mb in store.mailboxes(U)}


def without_uids(view: dict) -> dict:
    return {mb: [m[1:] for m in msgs] for mb, msgs in view.items()}


def log_problems(dc: dovecot.Doveadm) -> list[str]:
    log = dc.base / "dovecot.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if "Error" in line or "Panic" in line
            or "Warning" in line]


def test_a_maildir_written_by_dovecot_imports_exactly(doveadm, store):
    dc = doveadm()
    for name in ("Sent", "Entwürfe", "Lists.modsync", "a&b", "Archive.2023.Q4"):
        dc.run("mailbox", "create", name)
    saves = {
        "INBOX": [b"Subject: crlf\r\n\r\nline\r\n", b"Subject: lf\n\nline\n",
                  b"Subject: nul\r\n\r\na\0b\r\n", b"", b"no newline at the end",
                  b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n"],
        "Sent": [b"Subject: sent %d\n\nbody\n" % i for i in range(5)],
        "Entwürfe": [b"Subject: =?UTF-8?Q?Entw=C3=BCrfe?=\n\nfrom >From\nFrom x\n"],
        "Lists.modsync": [m.body for m in corpus.generate(30, seed=21, max_size=20_000)],
        "a&b": [b"Subject: amp\n\n&\n"],
    }
    for mailbox, bodies in saves.items():
        for body in bodies:
            dc.run("save", "-m", mailbox, input=body)
    dc.run("flags", "add", "\\Seen $Junk Work", "mailbox", "INBOX", "uid", "1:3")
    dc.run("flags", "add", "\\Answered \\Flagged \\Draft \\Deleted", "mailbox", "INBOX", "uid", "2")
    dc.run("flags", "add", "$label1", "mailbox", "Lists.modsync", "uid", "3:20")
    dc.run("flags", "add", "\\Seen", "mailbox", "Lists.modsync", "all")
    dc.run("expunge", "mailbox", "Sent", "uid", "2")
    for name in ("INBOX", "Sent", "Lists.modsync", "Gone"):
        dc.run("mailbox", "subscribe", name)
    want = dovecot_view(dc)
    assert sum(len(v) for v in want.values()) == 6 + 4 + 1 + 30 + 1

    report = import_maildir(store, U, dc.maildir)
    assert report.ok, report.refused
    assert report.imported == 42
    assert without_uids(store_view(store)) == without_uids(want)
    assert sorted(store.subscriptions(U)) == sorted(imap_name(n) for n in
                                                    dc.mailboxes(subscribed=True))
    assert import_maildir(store, U, dc.maildir).imported == 0
    assert log_problems(dc) == []


def fill(store) -> None:
    src = Path(tempfile.mkdtemp(prefix="modsync-sample-"))
    try:
        corpus.write_maildir(src / "md", corpus.generate(60, seed=22, max_size=16_000),
                             ("INBOX", "Sent", "Entwürfe", "Lists/modsync"), seed=22)
        assert import_maildir(store, U, src / "md").ok
    finally:
        shutil.rmtree(src)
    store.create_mailbox(U, "Entwürfe/Ä&B")
    store.append(U, "Entwürfe/Ä&B", b"Subject: x\r\n\r\nbody\0with NUL\r\n",
                 flags=["$Custom", "\\Flagged"], internaldate=T0)
    store.append(U, "Entwürfe/Ä&B", b"lf\nonly\n", flags=["$custom"], internaldate=T0 + 1)
    store.expunge(U, "INBOX", [(2, 4)])        # gaps: Dovecot must keep the store's UIDs
    store.subscribe(U, "Entwürfe/Ä&B")
    store.unsubscribe(U, "Sent")


def test_an_export_reads_back_in_dovecot(doveadm, store):
    fill(store)
    dc_probe = doveadm()
    out = dc_probe.maildir
    report = export_maildir(store, U, out)
    assert report.ok, report.refused
    dc = doveadm()           # hands the export to doveadm's uid
    view = dovecot_view(dc)
    assert view == store_view(store)           # UIDs, bodies, flags, internal dates
    listed = set(dc.mailboxes())
    assert {imap_name(n) for n in listed} == {mb.name for mb in store.mailboxes(U)} | {"Lists"}
    assert sorted(imap_name(n) for n in dc.mailboxes(subscribed=True)) == sorted(
        store.subscriptions(U))
    for mb in store.mailboxes(U):
        name = mb.name.replace("/", ".")
        status = dc.run("mailbox", "status", "messages uidvalidity uidnext", name).decode()
        assert status.split()[1:] == [f"messages={mb.messages}", f"uidnext={mb.uidnext}",
                                      f"uidvalidity={mb.uidvalidity}"], status
        recs = store.records(U, mb.name)
        for query, pick in (("seen", lambda r: "\\Seen" in r.flags),
                            ("unseen", lambda r: "\\Seen" not in r.flags),
                            ("keyword $Junk", lambda r: "$Junk" in r.flags),
                            ("keyword $label1", lambda r: "$label1" in r.flags),
                            ("flagged", lambda r: "\\Flagged" in r.flags),
                            ("body NUL", lambda r: b"NUL" in store.read_body(r.address))):
            assert dc.search(name, query) == [r.uid for r in recs if pick(r)], (mb.name, query)
    assert log_problems(dc) == []


def test_changes_dovecot_makes_to_an_export_import_correctly(doveadm, store, make_store):
    fill(store)
    out = doveadm().maildir
    assert export_maildir(store, U, out).ok
    want_sent_flags = store.records(U, "Sent")[0].flags
    dc = doveadm()
    dc.run("flags", "add", "\\Seen $NewKeyword", "mailbox", "INBOX", "uid", "1,5:7")
    dc.run("flags", "remove", "\\Seen", "mailbox", "Sent", "all")
    dc.run("flags", "replace", "\\Answered Later", "mailbox", "Entwürfe.Ä&B", "all")
    dc.run("expunge", "mailbox", "INBOX", "uid", "6")
    dc.run("save", "-m", "INBOX", input=b"Subject: new in Dovecot\n\nhello\n")
    dc.run("mailbox", "create", "Neu.Ordner")
    dc.run("save", "-m", "Neu.Ordner", input=b"Subject: in a new folder\n\nhi\n")
    dc.run("move", "Neu.Ordner", "mailbox", "Sent", "uid", "1")
    dc.run("mailbox", "rename", "Lists.modsync", "Lists.renamed")
    dc.run("mailbox", "subscribe", "Neu.Ordner")
    dc.run("mailbox", "unsubscribe", "INBOX")
    want = dovecot_view(dc)

    fresh = make_store()
    report = import_maildir(fresh, U, out)
    assert report.ok, report.refused
    assert without_uids(store_view(fresh)) == without_uids(want)
    assert sorted(fresh.subscriptions(U)) == sorted(imap_name(n) for n in
                                                    dc.mailboxes(subscribed=True))
    # Into the store it came from: what Dovecot added arrives, flags stay the store's, and
    # a renamed folder is a new mailbox (Maildir keeps no mailbox id).
    lists = store.mailbox(U, "Lists/modsync").messages
    again = import_maildir(store, U, out)
    assert sorted(again.mailboxes_created) == ["Lists/renamed", "Neu/Ordner"]
    assert again.imported == 1 + 2 + lists
    assert store.records(U, "Sent")[0].flags == want_sent_flags
    assert log_problems(dc) == []
