"""engine/maildir.py (and the import rules of engine/mailfile.py): Maildir++ in and out.

What Dovecot does is the reference throughout; the tables of folder names
below were checked against doveadm 2.3.19 (`doveadm mailbox list` on
directories made by hand).  tests/test_dovecot_interop.py runs doveadm itself.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Store, mailfile, names
from engine.errors import ImportError_, InvalidName, UsageError
from engine.maildir import (
    ExportReport,
    ImportReport,
    decode_mutf7,
    encode_mutf7,
    export_maildir,
    flags_from_letters,
    folder_dirname,
    format_keywords,
    import_maildir,
    letters_from_flags,
    mailbox_name,
    parse_keywords,
)
from engine.progress import Progress
from engine.verify import verify_store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import corpus

SAMPLE = ROOT / "tests" / "data" / "sample-maildir"
U = "alice"
T0 = 1_600_000_000


# -- helpers --------------------------------------------------------------------------

def make_folder(root: Path, dirname: str = "") -> Path:
    """A Maildir folder (root itself for dirname ""), with cur/ new/ tmp/."""
    folder = root / dirname if dirname else root
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return folder


def put(folder: Path, name: str, body: bytes, mtime: int = T0, sub: str = "cur") -> Path:
    path = folder / sub / name
    path.write_bytes(body)
    os.utime(path, (mtime, mtime))
    return path


def contents(store: Store, user: str = U) -> dict[str, list[tuple[bytes, tuple, int]]]:
    """{mailbox: [(body, flags, internaldate) in UID order]}."""
    return {mb.name: [(store.read_body(r.address), r.flags, r.internaldate)
                      for r in store.records(user, mb.name)]
            for mb in store.mailboxes(user)}


def refused_files(report) -> list[str]:
    return [r["file"] for r in report.refused]


def read_exported(root: Path) -> dict[str, Counter]:
    """An exported tree read without engine code: {dirname: Counter((body, flags, mtime))}.

    Flags as Dovecot reads them: D F R S T and dovecot-keywords letters.
    """
    system = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen",
              "T": "\\Deleted"}
    out = {}
    for folder in [root] + sorted(p for p in root.iterdir() if p.name.startswith(".")):
        kw = {}
        if (folder / "dovecot-keywords").exists():
            for line in (folder / "dovecot-keywords").read_text().splitlines():
                i, _, name = line.partition(" ")
                kw[chr(ord("a") + int(i))] = name
        msgs = Counter()
        assert not list((folder / "tmp").iterdir()), "tmp/ must be empty after an export"
        for f in (folder / "cur").iterdir():
            letters = f.name.partition(":2,")[2]
            flags = frozenset(system[c] if c in system else kw[c] for c in letters)
            msgs[(f.read_bytes(), flags, int(f.stat().st_mtime))] += 1
        out["" if folder == root else folder.name] = msgs
    return out


# -- modified UTF-7 and folder names ---------------------------------------------------

@pytest.mark.parametrize("text, encoded", [
    ("Entwürfe", "Entw&APw-rfe"),
    ("a&b", "a&-b"),
    ("日本語", "&ZeVnLIqe-"),
    ("x😀y", "x&2D3eAA-y"),
    ("台北", "&U,BTFw-"),
    ("plain ascii ~!", "plain ascii ~!"),
])
def test_modified_utf7_both_ways(text, encoded):
    assert encode_mutf7(text) == encoded
    assert decode_mutf7(encoded) == text


# Directory name part -> the name `doveadm mailbox list` shows (Dovecot 2.3.19).  A part
# Dovecot's decoder refuses is listed as it is.
DOVECOT_LISTS = [
    ("Entw&APw-rfe", "Entwürfe"),
    ("a&AOQ-&-b", "aä&b"),                # a run, then "&-"
    ("a&-&AOQ-b", "a&äb"),
    ("&AOQ-&-&AOQ-", "ä&ä"),
    ("&-&-", "&&"),
    ("x&AOQ-y&AOQ-z", "xäyäz"),
    ("x&AOQ--y", "xä-y"),
    ("x&AOQA5AD8-y", "xääüy"),
    ("&AOR-", "ä"),                        # left-over bits are not checked
    ("x&2D3eAA-y", "x😀y"),
    ("&Jjo-!", "☺!"),
    ("bad&", "bad&"),                      # no closing "-"
    ("bad&AOQ", "bad&AOQ"),
    ("r&AOQ-&", "r&AOQ-&"),
    ("x&AAA-y", "x&AAA-y"),                # encoded NUL
    ("x&AEE-y", "x&AEE-y"),                # encoded printable ASCII ("A")
    ("x&2D0-y", "x&2D0-y"),                # high surrogate alone
    ("x&3gA-y", "x&3gA-y"),                # low surrogate alone
    ("u&2D3eAA-&2D3eAA-", "u&2D3eAA-&2D3eAA-"),  # two runs in a row
    ("a&AOQ-&AOQ-b", "a&AOQ-&AOQ-b"),
    ("x&A-y", "x&A-y"),                    # truncated base64
    ("x&AOQA-y", "x&AOQA-y"),              # odd number of bytes
    ("x&AOQ=-y", "x&AOQ=-y"),              # "=" is not modified base64
    ("s&,,,,-", "s&,,,,-"),
    ("q&AO Q-", "q&AO Q-"),
    ("x&&-y", "x&&-y"),
    ("täst", "täst"),                      # raw UTF-8: not mUTF-7, taken literally
    ("sp ace", "sp ace"),
    ("~tilde", "~tilde"),
]


@pytest.mark.parametrize("part, listed", DOVECOT_LISTS)
def test_folder_names_decode_as_dovecot_lists_them(part, listed):
    assert mailbox_name("." + part) == listed


def test_folder_hierarchy_and_inbox():
    assert mailbox_name("") == "INBOX"
    assert mailbox_name(".Sub") == "Sub"
    assert mailbox_name(".Sub.Folder") == "Sub/Folder"
    assert mailbox_name(".Projekte.&ANw-bersicht") == "Projekte/Übersicht"
    assert mailbox_name(".INBOX.Sub") == mailbox_name(".inbox.Sub") == "INBOX/Sub"
    assert folder_dirname("INBOX") == ""
    assert folder_dirname("Sub/Folder") == ".Sub.Folder"
    assert folder_dirname("Projekte/Übersicht") == ".Projekte.&ANw-bersicht"
    assert folder_dirname("INBOX/Sub") == ".INBOX.Sub"


@pytest.mark.parametrize("dirname", [".a..b", ".a.", "..", ".", "cur", ".x&AB8-y"])
def test_folder_names_that_are_no_mailbox_name(dirname):
    with pytest.raises(InvalidName):
        mailbox_name(dirname)


@pytest.mark.parametrize("name, why", [
    ("v1.2", "'.' separates"),
    ("Archive/v1.2", "'.' separates"),
    ("~home", "begins with '~'"),
    ("x" * 255, "255"),
    ("ü" * 100, "255"),        # 100 characters, but 2 + 4 * 100 / 3 bytes of mUTF-7
])
def test_names_export_cannot_write(name, why):
    with pytest.raises(InvalidName, match=why):
        folder_dirname(name)


@given(st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="./"),
                        min_size=1, max_size=12), min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_every_exportable_name_reads_back_as_itself(parts):
    name = "/".join(parts)
    try:
        dirname = folder_dirname(name)
    except InvalidName:
        return     # "~", too long, or not a valid name at all
    assert mailbox_name(dirname) == names.mailbox(name)


# -- flags -----------------------------------------------------------------------------

def test_flag_letters():
    kw = {0: "$Junk", 2: "Work"}
    assert flags_from_letters("DFRST", kw) == ["\\Draft", "\\Flagged", "\\Answered", "\\Seen",
                                              "\\Deleted"]
    assert flags_from_letters("Sac", kw) == ["\\Seen", "$Junk", "Work"]
    # A letter dovecot-keywords does not name gets Dovecot's name for it.
    assert flags_from_letters("bz", kw) == ["unknown-1", "unknown-25"]
    # P (passed) is $Forwarded; other upper-case letters mean nothing to Dovecot.
    assert flags_from_letters("PSXQ", kw) == ["$Forwarded", "\\Seen"]
    letter_of = {"$junk": "a", "work": "c"}
    assert letters_from_flags(["\\Seen", "Work", "\\Draft", "$JUNK", "\\Recent", "other"],
                              letter_of) == "DSac"


def test_keywords_file():
    assert parse_keywords(b"0 $Junk\n2 Work Stuff\nbad\n30 tooFar\nx y\n\n1 \n3 Four\r\n") == {
        0: "$Junk", 2: "Work Stuff", 3: "Four"}
    assert format_keywords(["$Junk", "Work"]) == b"0 $Junk\n1 Work\n"
    with pytest.raises(ValueError):
        format_keywords([f"k{i}" for i in range(27)])


# -- import ------------------------------------------------------------------------------

def sample_copy(tmp_path: Path) -> Path:
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} is not in this checkout (tools/corpus.py maildir "
                    f"tests/data/sample-maildir --sample makes it)")
    dst = tmp_path / "sample"
    shutil.copytree(SAMPLE, dst)
    corpus.restore_checkout(dst)      # git keeps neither mtimes nor empty directories
    return dst


def test_import_the_sample_maildir(store, tmp_path):
    src = sample_copy(tmp_path)
    report = import_maildir(store, U, src)
    assert isinstance(report, ImportReport)
    assert report.ok and report.refused == []
    assert report.imported == 40 and report.skipped == 0
    assert sorted(report.mailboxes_created) == ["Entwürfe", "INBOX", "Lists/modsync", "Sent"]
    assert sorted(report.subscribed) == ["Entwürfe", "INBOX", "Lists/modsync", "Sent"]
    assert sorted(store.subscriptions(U)) == sorted(report.subscribed)
    s = corpus.SAMPLE
    mails = list(corpus.generate(s["messages"], s["seed"], size_mix=s["size_mix"],
                                 max_size=s["max_size"]))
    assert report.bytes == sum(len(m.body) for m in mails)
    want = Counter((m.body, frozenset(m.flags), m.internaldate) for m in mails)
    got = Counter((body, frozenset(flags), date) for msgs in contents(store).values()
                  for body, flags, date in msgs)
    assert got == want
    # Each folder in Dovecot's UID order (dovecot-uidlist), which is arrival order here.
    for mb, msgs in contents(store).items():
        dates = [d for _, _, d in msgs]
        assert dates == sorted(dates), mb
    d = report.as_dict()
    assert d["ok"] is True and d["imported"] == 40 and d["refused"] == []


def test_messages_are_read_in_uidlist_order_then_by_arrival(store, tmp_path):
    root = make_folder(tmp_path / "md")
    put(root, "200.M5P1.h,S=1:2,S", b"b")
    put(root, "100.M9P1.h,S=1:2,S", b"a")
    put(root, "300.M1P1.h,S=1", b"c", sub="new")
    put(root, "150.M2P1.h", b"x", sub="new")
    put(root, "150.M1P1.h", b"w", sub="new")
    # Dovecot gave UID 7 to the newer file, 9 to the older one.
    (root / "dovecot-uidlist").write_bytes(b"3 V1 N10 Gabc\n7 :200.M5P1.h,S=1\n"
                                           b"9 W99 :100.M9P1.h,S=1\n")
    import_maildir(store, U, root)
    assert [b for b, _, _ in contents(store)["INBOX"]] == [b"b", b"a", b"w", b"x", b"c"]


def test_internal_date_is_the_file_mtime(store, tmp_path):
    root = make_folder(tmp_path / "md")
    put(root, "a:2,", b"one", mtime=0)
    put(root, "b:2,", b"two", mtime=2_000_000_000)
    import_maildir(store, U, root)
    assert sorted(d for _, _, d in contents(store)["INBOX"]) == [0, 2_000_000_000]


def test_tmp_and_dot_files_are_not_messages(store, tmp_path):
    root = make_folder(tmp_path / "md")
    put(root, "real:2,S", b"real")
    put(root, "half-delivered", b"partial", sub="tmp")
    put(root, ".hidden:2,S", b"hidden")
    put(root, ".nfs0000123", b"x", sub="new")
    (root / "dovecot.index.log").write_bytes(b"\0" * 40)
    report = import_maildir(store, U, root)
    assert report.ok and report.imported == 1
    assert [b for b, _, _ in contents(store)["INBOX"]] == [b"real"]


def test_flags_from_file_names_and_keywords(store, tmp_path):
    root = make_folder(tmp_path / "md")
    (root / "dovecot-keywords").write_text("0 $Junk\n1 Work\n")
    put(root, "1.M1P1.h:2,DFRST", b"all system")
    put(root, "2.M1P1.h:2,Sab", b"keywords")
    put(root, "3.M1P1.h:2,c", b"unnamed letter")
    put(root, "4.M1P1.h:2,PS", b"passed")
    put(root, "5.M1P1.h", b"fresh", sub="new")
    sub = make_folder(root, ".Sub")
    put(sub, "6.M1P1.h:2,a", b"no keywords file here")
    report = import_maildir(store, U, root)
    assert report.ok
    got = {b: set(f) for b, f, _ in contents(store)["INBOX"]}
    assert got == {
        b"all system": {"\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "\\Seen"},
        b"keywords": {"\\Seen", "$Junk", "Work"},
        b"unnamed letter": {"unknown-2"},
        b"passed": {"\\Seen", "$Forwarded"},
        b"fresh": set(),
    }
    assert contents(store)["Sub"][0][1] == ("unknown-0",)


def test_keywords_the_store_refuses_are_left_off_and_reported_once_per_folder(store, tmp_path):
    root = make_folder(tmp_path / "md")
    (root / "dovecot-keywords").write_text("0 two words\n1 Wichtig-ä\n2 $Junk\n")
    for i in range(3):
        put(root, f"{i}.M1P1.h:2,Sabc", b"message %d" % i)
    put(root, "9.M1P1.h:2,a", b"only the bad one")
    sub = make_folder(root, ".Other")
    (sub / "dovecot-keywords").write_text("0 two words\n")
    put(sub, "1.M1P1.h:2,Fa", b"elsewhere")
    report = import_maildir(store, U, root)
    assert report.imported == 5 and not report.ok
    by_folder = Counter(refused_files(report))
    assert by_folder == {str(root): 2, str(sub): 1}
    reasons = " | ".join(r["reason"] for r in report.refused)
    assert "'two words'" in reasons and "'Wichtig-ä'" in reasons
    assert "left off 4 message(s)" in reasons and "left off 3 message(s)" in reasons
    got = {b: f for b, f, _ in contents(store)["INBOX"]}
    assert got[b"message 0"] == ("\\Seen", "$Junk")
    assert got[b"only the bad one"] == ()
    assert contents(store)["Other"][0][1] == ("\\Flagged",)


def test_folders_and_subscriptions(store, tmp_path):
    root = make_folder(tmp_path / "md")
    for d in (".Sent", ".Lists.modsync", ".Entw&APw-rfe", ".a&AOQ", ".INBOX.Sub"):
        put(make_folder(root, d), "1:2,S", d.encode())
    (root / ".notafolder").mkdir()                 # no cur/ or new/: not a folder (as Dovecot)
    (root / ".file").write_text("x")
    (root / "subscriptions").write_bytes(
        b"V\t2\n\nSent\nLists\tmodsync\nEntw&APw-rfe\nINBOX\nGone\tAway\n")
    report = import_maildir(store, U, root)
    assert report.ok, report.refused
    assert [m.name for m in store.mailboxes(U)] == sorted(
        ["INBOX", "Sent", "Lists/modsync", "Entwürfe", "a&AOQ", "INBOX/Sub"])
    assert sorted(store.subscriptions(U)) == sorted(
        ["Sent", "Lists/modsync", "Entwürfe", "INBOX", "Gone/Away"])
    assert contents(store)["Entwürfe"][0][0] == b".Entw&APw-rfe"


def test_old_subscriptions_file(store, tmp_path):
    root = make_folder(tmp_path / "md")
    (root / "subscriptions").write_bytes(b"Sent\nLists.modsync\nEntw&APw-rfe\n")
    import_maildir(store, U, root)
    assert sorted(store.subscriptions(U)) == ["Entwürfe", "Lists/modsync", "Sent"]


def test_an_inbox_folder_is_refused(store, tmp_path):
    root = make_folder(tmp_path / "md")
    put(root, "1:2,S", b"the real inbox")
    hidden = make_folder(root, ".INBOX")
    put(hidden, "1:2,S", b"dovecot never shows this")
    lower = make_folder(root, ".inbox")
    report = import_maildir(store, U, root)
    assert sorted(refused_files(report)) == [str(hidden), str(lower)]
    assert "Dovecot never shows" in report.refused[0]["reason"]
    assert contents(store) == {"INBOX": [(b"the real inbox", ("\\Seen",), T0)]}


def test_an_inbox_folder_is_refused_when_the_root_has_no_cur(store, tmp_path):
    root = tmp_path / "md"
    hidden = make_folder(root, ".INBOX")
    put(hidden, "1:2,S", b"dovecot never shows this")
    put(make_folder(root, ".Sent"), "1:2,S", b"sent")
    report = import_maildir(store, U, root)
    assert refused_files(report) == [str(hidden)]
    assert contents(store) == {"Sent": [(b"sent", ("\\Seen",), T0)]}


def test_folders_dovecot_would_show_under_one_name(store, tmp_path):
    root = make_folder(tmp_path / "md")
    a = make_folder(root, ".INBOX.Sub")
    b = make_folder(root, ".inbox.Sub")
    put(a, "1:2,", b"a")
    put(b, "1:2,", b"b")
    report = import_maildir(store, U, root)
    assert refused_files(report) == [str(b)]
    assert "same name" in report.refused[0]["reason"]
    assert [x for x, _, _ in contents(store)["INBOX/Sub"]] == [b"a"]


def test_folder_names_that_are_not_utf8_are_refused(store, tmp_path):
    root = make_folder(tmp_path / "md")
    bad = os.path.join(os.fsencode(root), b".caf\xe9")
    for sub in (b"cur", b"new", b"tmp"):
        os.makedirs(os.path.join(bad, sub))
    with open(os.path.join(bad, b"cur", b"1:2,S"), "wb") as fh:
        fh.write(b"latin-1 folder")
    put(make_folder(root, ".a..b"), "1:2,", b"empty level")
    put(root, "1:2,S", b"inbox")
    report = import_maildir(store, U, root)
    assert report.imported == 1 and not report.ok
    files = refused_files(report)
    assert str(root / ".caf\\xe9") in files and str(root / ".a..b") in files
    why = {r["file"]: r["reason"] for r in report.refused}
    assert "not UTF-8" in why[str(root / ".caf\\xe9")]
    assert report.as_dict()["refused_count"] == 2


def test_not_a_maildir(store, tmp_path):
    with pytest.raises(ImportError_, match="no such directory"):
        import_maildir(store, U, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImportError_, match="not a Maildir"):
        import_maildir(store, U, tmp_path / "empty")


# -- bodies are stored exactly ---------------------------------------------------------------

ODD_BODIES = {
    "nul": b"Subject: nul\r\n\r\nbefore\0after\0\0\r\n",
    "bare-lf": b"Subject: lf\n\nline one\nline two\n",
    "mixed": b"Subject: mixed\r\n\nline\rone\r\nline two\n\r\n",
    "long-lines": b"Subject: long\r\n\r\n" + b"x" * 2000 + b"\r\n" + b"y" * 5000 + b"\r\n"
                  + b"z" * 3333,
    "empty": b"",
    "no-final-newline": b"Subject: end\r\n\r\nno newline at the end",
    "binary": bytes(range(256)) * 4,
    "from-lines": b"Subject: f\n\nFrom me\n>From you\n",
}


def test_bodies_are_stored_byte_for_byte(store, tmp_path):
    root = make_folder(tmp_path / "md")
    for i, (name, body) in enumerate(ODD_BODIES.items()):
        put(root, f"{i}.M{i}P1.{name},S={len(body)}:2,S", body)
    report = import_maildir(store, U, root)
    assert report.ok and report.imported == len(ODD_BODIES)
    assert [b for b, _, _ in contents(store)["INBOX"]] == list(ODD_BODIES.values())
    out = tmp_path / "out"
    export_maildir(store, U, out)
    assert sorted(f.read_bytes() for f in (out / "cur").iterdir()) == sorted(ODD_BODIES.values())


def test_a_50_mb_message(store, tmp_path):
    body = b"Subject: big\r\n\r\n" + (os.urandom(1 << 20) + b"\r\n") * 50
    root = make_folder(tmp_path / "md")
    put(root, f"1.M1P1.h,S={len(body)}:2,S", body)
    put(root, "2.M1P1.h:2,S", b"small after it")
    report = import_maildir(store, U, root)
    assert report.ok and report.imported == 2 and report.bytes == len(body) + 14
    rec = store.records(U, "INBOX")[0]
    assert rec.size == len(body) and store.read_body(rec.address) == body
    out = tmp_path / "out"
    export_maildir(store, U, out)
    assert any(f.read_bytes() == body for f in (out / "cur").iterdir())


# -- refused files: named, and the import goes on ------------------------------------------------

def test_refused_files_are_named_and_the_rest_imported(store, tmp_path, monkeypatch):
    root = make_folder(tmp_path / "md")
    good = [put(root, f"{i}.M{i}P1.good:2,S", b"good %d" % i) for i in range(3)]
    cur = root / "cur"
    short = put(root, "10.M1P1.h,S=100:2,S", b"only 50 bytes".ljust(50, b"."))
    longer = put(root, "11.M1P1.h,S=5:2,S", b"more than five")
    (cur / "12.M1P1.dir:2,S").mkdir()
    os.mkfifo(cur / "13.M1P1.fifo:2,S")
    (cur / "14.M1P1.dangling:2,S").symlink_to(tmp_path / "nowhere")
    (cur / "15.M1P1.link:2,S").symlink_to(good[0])        # a link to a message: read it
    huge = cur / "16.M1P1.huge:2,S"
    with open(huge, "wb") as fh:                           # sparse: no GiB written
        fh.truncate(mailfile.MAX_MESSAGE_BYTES + 1)
    unreadable = put(root, "17.M1P1.unreadable:2,S", b"secret")
    unreadable.chmod(0)
    if os.geteuid() == 0:      # root reads anything: make open() fail as it would for others
        real_open = os.open

        def deny(path, flags, *args, **kw):
            if os.fspath(path) == str(unreadable):
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, flags, *args, **kw)
        monkeypatch.setattr(os, "open", deny)
    vanishing = put(root, "18.M1P1.vanishing:2,S", b"gone before it is read")

    class DeleteAfterListing(Progress):
        def start(self, *args, **kw):
            vanishing.unlink()

    report = import_maildir(store, U, root, progress=DeleteAfterListing())
    monkeypatch.undo()
    why = {r["file"]: r["reason"] for r in report.refused}
    assert set(why) == {str(p) for p in (short, longer, cur / "12.M1P1.dir:2,S",
                                         cur / "13.M1P1.fifo:2,S", cur / "14.M1P1.dangling:2,S",
                                         huge, unreadable, vanishing)}
    assert "S=100" in why[str(short)] and "truncated" in why[str(short)]
    assert "S=5" in why[str(longer)]
    assert why[str(cur / "12.M1P1.dir:2,S")] == "not a regular file"
    assert why[str(cur / "13.M1P1.fifo:2,S")] == "not a regular file"
    assert "No such file" in why[str(cur / "14.M1P1.dangling:2,S")]
    assert str(mailfile.MAX_MESSAGE_BYTES) in why[str(huge)]
    assert "Permission denied" in why[str(unreadable)]
    assert "No such file" in why[str(vanishing)]
    assert report.imported == 4 and not report.ok
    assert Counter(b for b, _, _ in contents(store)["INBOX"]) == {
        b"good 0": 2, b"good 1": 1, b"good 2": 1}


# -- re-imports and batches ---------------------------------------------------------------

def test_reimport_adds_only_what_is_missing(store, tmp_path):
    root = make_folder(tmp_path / "md")
    put(root, "1:2,S", b"one")
    put(root, "2:2,S", b"twice")
    put(root, "3:2,F", b"twice")               # the same body twice: two messages
    first = import_maildir(store, U, root)
    assert (first.imported, first.skipped) == (3, 0)
    again = import_maildir(store, U, root)
    assert (again.imported, again.skipped, again.mailboxes_created) == (0, 3, [])
    assert again.subscribed == [] and again.ok

    # A third copy in the source is the one extra message imported.
    put(root, "4:2,", b"twice")
    put(root, "5:2,", b"new")
    third = import_maildir(store, U, root)
    assert (third.imported, third.skipped) == (2, 3)
    assert Counter(b for b, _, _ in contents(store)["INBOX"]) == {b"one": 1, b"twice": 3,
                                                                  b"new": 1}
    # Flags of messages already there are not changed by a re-import.
    os.rename(root / "cur" / "1:2,S", root / "cur" / "1:2,FS")
    import_maildir(store, U, root)
    assert contents(store)["INBOX"][0] == (b"one", ("\\Seen",), T0)

    # A message deleted from the store comes back when the same source is imported again
    # (documented in engine/mailfile.py).
    store.expunge(U, "INBOX", [(1, 1)])
    back = import_maildir(store, U, root)
    assert (back.imported, back.skipped) == (1, 4)
    assert Counter(b for b, _, _ in contents(store)["INBOX"])[b"one"] == 1
    assert "comes back" in mailfile.__doc__


@pytest.fixture(scope="module")
def maildir_2500(tmp_path_factory) -> tuple[Path, list[bytes]]:
    """A Maildir whose INBOX holds 2,500 small messages (two and a half batches)."""
    root = make_folder(tmp_path_factory.mktemp("md2500") / "md")
    bodies = [b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(2500)]
    for i, body in enumerate(bodies):
        put(root, f"{T0 + i}.M{i}P1.h:2,S", body, mtime=T0 + i)
    return root, bodies


def spy_batches(store: Store, monkeypatch) -> list:
    """(mailbox, messages, bytes) of each batch the import commits, in commit order."""
    calls = []
    real = store.append_prepared

    def spy(user, mailbox, batch):
        bodies = [m.body for m, *_ in batch.messages]
        calls.append((mailbox, len(bodies), sum(map(len, bodies))))
        return real(user, mailbox, batch)
    monkeypatch.setattr(store, "append_prepared", spy)
    return calls


def test_batches_of_1000_messages(store, maildir_2500, monkeypatch):
    calls = spy_batches(store, monkeypatch)
    report = import_maildir(store, U, maildir_2500[0])
    assert report.imported == 2500
    assert [(mb, n) for mb, n, _ in calls] == [("INBOX", 1000), ("INBOX", 1000), ("INBOX", 500)]
    assert mailfile.BATCH_MESSAGES == 1000


def test_batches_of_at_most_32_mb(store, tmp_path, monkeypatch):
    calls = spy_batches(store, monkeypatch)
    root = make_folder(tmp_path / "md")
    chunk = b"x" * (10 << 20)
    for i in range(5):
        put(root, f"{i}.M1P1.h:2,", chunk + b"%d" % i)
    put(root, "9.M1P1.h:2,", b"small")
    report = import_maildir(store, U, root)
    assert report.imported == 6
    assert [n for _, n, _ in calls] == [3, 3]        # 30 MB, then 20 MB and the small one
    assert all(nbytes <= mailfile.BATCH_BYTES for _, _, nbytes in calls)
    assert mailfile.BATCH_BYTES == 32 << 20


KILLED_CHILD = r"""
import sys, time
from engine import Store
from engine.maildir import import_maildir

store = Store.open(sys.argv[1])
batches = 0
real_append, real_write = store.append_prepared, store.db.write

def append_prepared(user, mailbox, batch):
    global batches
    batches += 1
    return real_append(user, mailbox, batch)

def write(fn, **kw):
    def run(txn):
        result = fn(txn)
        if batches == 3:    # every record of the third batch is in the open transaction
            print("third batch in transaction", flush=True)
            time.sleep(120)
        return result
    return real_write(run, **kw)

store.append_prepared, store.db.write = append_prepared, write
import_maildir(store, "alice", sys.argv[2])
print("finished", flush=True)
"""


def test_import_killed_inside_a_transaction_leaves_no_half_batch(make_store, maildir_2500):
    store = make_store()
    path = store.path
    store.close()
    root, bodies = maildir_2500
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(path), str(root)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = child.stdout.readline()
        assert line == b"third batch in transaction\n", child.stderr.read().decode()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()

    store = Store.open(path)
    try:
        stored = [store.read_body(r.address) for r in store.records(U, "INBOX")]
        assert stored == bodies[:2000]           # two whole batches, nothing of the third
        assert verify_store(store).ok
        report = import_maildir(store, U, root)
        assert (report.imported, report.skipped) == (500, 2000)
        stored = [store.read_body(r.address) for r in store.records(U, "INBOX")]
        assert stored == bodies                  # complete, in order, no duplicates
        assert verify_store(store).ok
    finally:
        store.close()


# -- export -----------------------------------------------------------------------------------

def fill(store: Store) -> None:
    store.create_mailbox(U, "INBOX")
    store.append(U, "INBOX", b"Subject: 1\r\n\r\none\r\n", flags=["\\Seen", "$Junk"],
                 internaldate=T0)
    store.append(U, "INBOX", b"Subject: 2\n\ntwo\n", flags=["\\Answered", "\\Flagged", "Work"],
                 internaldate=T0 + 60)
    store.append(U, "INBOX", b"Subject: 3\r\n\r\nthree\r\n", internaldate=T0 + 120)
    store.create_mailbox(U, "Entwürfe/Ä&B")
    store.append(U, "Entwürfe/Ä&B", b"draft", flags=["\\Draft", "$junk"], internaldate=T0 + 1)
    store.subscribe(U, "INBOX")
    store.subscribe(U, "Entwürfe/Ä&B")
    store.subscribe(U, "Not/There")


def test_export_writes_what_dovecot_reads(store, tmp_path):
    fill(store)
    store.expunge(U, "INBOX", [(2, 2)])
    out = tmp_path / "out"
    report = export_maildir(store, U, out)
    assert isinstance(report, ExportReport)
    assert report.ok and report.exported == 3 and report.mailboxes == ["Entwürfe/Ä&B", "INBOX"]
    assert report.bytes == sum(r.size for mb in store.mailboxes(U) for r in store.records(U, mb.name))
    assert report.as_dict()["refused"] == [] and report.as_dict()["ok"] is True

    sub = out / ".Entw&APw-rfe.&AMQ-&-B"
    assert (sub / "maildirfolder").is_file() and not (out / "maildirfolder").exists()
    for folder in (out, sub):
        assert sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            == ["cur", "new", "tmp"]
        assert not list((folder / "tmp").iterdir()) and not list((folder / "new").iterdir())
    names = sorted(p.name for p in (out / "cur").iterdir())
    assert len(names) == 2
    inbox = store.mailbox(U, "INBOX")
    hostpart = names[0].split(".", 2)[2].split(",")[0]
    assert names[0] == f"{T0}.M1P{os.getpid()}.{hostpart},S=19,W=19:2,Sa"
    assert names[1] == f"{T0 + 120}.M3P{os.getpid()}.{hostpart},S=21,W=21:2,"
    assert [int((out / "cur" / n).stat().st_mtime) for n in names] == [T0, T0 + 120]
    assert (out / "dovecot-keywords").read_text() == "0 $Junk\n"
    uidlist = (out / "dovecot-uidlist").read_text().splitlines()
    assert uidlist[0] == f"3 V{inbox.uidvalidity} N{inbox.uidnext}"
    assert [line.split(" :")[0] for line in uidlist[1:]] == ["1", "3"]
    assert [line.split(" :")[1] for line in uidlist[1:]] == [n.split(":2,")[0] for n in names]
    (draft,) = (sub / "cur").iterdir()
    assert draft.name.endswith(",S=5,W=5:2,Da") and draft.read_bytes() == b"draft"
    assert (sub / "dovecot-keywords").read_text() == "0 $junk\n"
    assert (out / "subscriptions").read_bytes() == (
        b"V\t2\n\nEntw&APw-rfe\t&AMQ-&-B\nINBOX\nNot\tThere\n")


def test_export_counts_lf_only_lines_in_the_virtual_size(store, tmp_path):
    store.create_mailbox(U, "INBOX")
    store.append(U, "INBOX", b"a\nb\r\nc\n", internaldate=T0)
    export_maildir(store, U, tmp_path / "out")
    (f,) = (tmp_path / "out" / "cur").iterdir()
    assert ",S=7,W=9:2," in f.name


def test_export_needs_a_new_or_empty_directory(store, tmp_path):
    fill(store)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UsageError, match="not an empty directory"):
        export_maildir(store, U, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(UsageError):
        export_maildir(store, U, tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    assert export_maildir(store, U, tmp_path / "empty").exported == 4


def test_export_refuses_names_a_maildir_cannot_hold(store, tmp_path):
    long_name = "L" * 255          # the directory name, with its ".", would be 256 bytes
    for name in ("Good", "v1.2", "Archive/2023.Q4", "~home", long_name):
        store.create_mailbox(U, name)
        store.append(U, name, name.encode()[:20], internaldate=T0)
        store.subscribe(U, name)
    store.subscribe(U, "a.b")          # subscribed, no mailbox: refused once, as a subscription
    report = export_maildir(store, U, tmp_path / "out")
    why = {r["mailbox"]: r["reason"] for r in report.refused}
    assert set(why) == {"v1.2", "Archive/2023.Q4", "~home", long_name, "a.b"}
    assert "rename the mailbox" in why["v1.2"] and "'v1_2'" in why["v1.2"]
    assert "'~'" in why["~home"] and "255" in why[long_name]
    assert why["a.b"].startswith("subscription not written")
    assert report.mailboxes == ["Good"] and report.exported == 1 and not report.ok
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == [".Good"]
    assert (tmp_path / "out" / "subscriptions").read_bytes() == b"V\t2\n\nGood\n"


def test_export_keeps_the_26_most_used_keywords(store, tmp_path):
    store.create_mailbox(U, "INBOX")
    # kw00 is on 28 messages, kw01 on 27, ... kw27 on 1.
    for i in range(28):
        store.append(U, "INBOX", b"message %d" % i, internaldate=T0 + i,
                     flags=["\\Seen"] + [f"kw{k:02d}" for k in range(28 - i)])
    store.append(U, "INBOX", b"control", flags=[], internaldate=T0)
    report = export_maildir(store, U, tmp_path / "out")
    assert report.exported == 29 and not report.ok
    (refusal,) = report.refused
    assert refusal["mailbox"] == "INBOX"
    assert "kw26 (2 message(s))" in refusal["reason"] and "kw27 (1 message(s))" in refusal["reason"]
    kws = parse_keywords((tmp_path / "out" / "dovecot-keywords").read_bytes())
    assert sorted(kws.values()) == [f"kw{k:02d}" for k in range(26)]
    back = read_exported(tmp_path / "out")[""]
    first = next(flags for (body, flags, _) in back if body == b"message 0")
    assert first == frozenset(["\\Seen"] + [f"kw{k:02d}" for k in range(26)])


def test_export_then_import_gives_the_same_mail(store, make_store, tmp_path):
    src = sample_copy(tmp_path)
    import_maildir(store, U, src)
    out = tmp_path / "out"
    report = export_maildir(store, U, out)
    assert report.ok and report.exported == 40
    again = make_store()
    back = import_maildir(again, U, out)
    assert back.ok and back.imported == 40
    assert contents(again) == contents(store)
    assert sorted(again.subscriptions(U)) == sorted(store.subscriptions(U))
    for mb in store.mailboxes(U):        # the exported dovecot-uidlist keeps UIDs in order
        assert [r.uid for r in again.records(U, mb.name)] == \
            list(range(1, len(store.records(U, mb.name)) + 1))


def test_progress_is_reported(store, tmp_path):
    events = []

    class Record(Progress):
        def start(self, label, total_items=None, total_bytes=None):
            events.append(("start", total_items))

        def advance(self, items=1, nbytes=0):
            events.append(("advance", items, nbytes))

        def finish(self):
            events.append(("finish",))

    root = make_folder(tmp_path / "md")
    put(root, "1:2,", b"abc")
    put(root, "2:2,", b"de")
    import_maildir(store, U, root, progress=Record())
    assert events == [("start", 2), ("advance", 1, 3), ("advance", 1, 2), ("finish",)]
    events.clear()
    export_maildir(store, U, tmp_path / "out", progress=Record())
    assert events[0] == ("start", 2) and events[-1] == ("finish",) and len(events) == 4


# -- export(import(M)) reproduces M ----------------------------------------------------------

KEYWORD_POOL = ["$Junk", "$NotJunk", "$Forwarded", "Work", "todo", "$label1", "Ärger"]
FOLDER_POOL = ["", ".Sent", ".Entw&APw-rfe", ".Lists.modsync", ".a&-b", ".&ZeVnLIqe-.x"]

messages = st.tuples(
    st.binary(max_size=300) | st.sampled_from([b"", b"\0", b"a\nb\r\nc", b"x" * 3000]),
    st.sets(st.sampled_from("DFRSTP")),
    st.sets(st.integers(0, 7)),          # keyword letters a..h (g, h: unnamed)
    st.integers(0, 2 ** 31 - 1),
    st.booleans(),                       # still in new/
)
maildirs = st.dictionaries(st.sampled_from(FOLDER_POOL),
                           st.tuples(st.permutations(KEYWORD_POOL).map(lambda p: p[:6]),
                                     st.lists(messages, max_size=8)),
                           min_size=1, max_size=4)


def expected_flags(system: set, letters: set, keywords: list) -> frozenset:
    """What Dovecot (and modsync, for P) makes of a file's letters; bad keywords dropped."""
    out = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
    flags = {f for f, c in out.items() if c in system}
    if "P" in system:
        flags.add("$Forwarded")
    for i in letters:
        name = keywords[i] if i < len(keywords) else f"unknown-{i}"
        if name.isascii():
            flags.add(name)
    return frozenset(flags)


@given(maildirs)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_export_of_an_import_reproduces_every_body_and_its_flags(spec):
    fast = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="modsync-prop-", dir=fast) as tmp:
        tmp = Path(tmp)
        root = make_folder(tmp / "md")
        want = {}
        for dirname, (keywords, msgs) in spec.items():
            folder = make_folder(root, dirname)
            (folder / "dovecot-keywords").write_text(
                "".join(f"{i} {k}\n" for i, k in enumerate(keywords)))
            want[dirname] = Counter()
            for n, (body, system, letters, mtime, new) in enumerate(msgs):
                info = "".join(sorted(system)) + "".join(chr(97 + i) for i in sorted(letters))
                if new:
                    put(folder, f"{mtime}.M{n}P1.h,S={len(body)}", body, mtime, sub="new")
                    flags = frozenset()
                else:
                    put(folder, f"{mtime}.M{n}P1.h,S={len(body)}:2,{info}", body, mtime)
                    flags = expected_flags(system, letters, keywords)
                want[dirname][(body, flags, mtime)] += 1
        store = Store.init(tmp / "store")
        try:
            report = import_maildir(store, U, root)
            assert report.imported == sum(len(m) for _, m in spec.values())
            assert all("not an IMAP atom" in r["reason"] for r in report.refused)
            out = export_maildir(store, U, tmp / "out")
            assert out.ok, out.refused
            assert out.exported == report.imported
            want.setdefault("", Counter())       # the root is INBOX, even if empty
            assert read_exported(tmp / "out") == want
        finally:
            store.close()
