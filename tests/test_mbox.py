"""engine/mbox.py: mbox (mboxrd) files into the store."""
from __future__ import annotations

import calendar
import mailbox as pymailbox
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from engine import mailfile, mbox
from engine.errors import ImportError_
from engine.mbox import flags_from_headers, import_mbox, parse_from_line

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import corpus

U = "alice"
FROM = b"From alice@example.org Mon Nov 13 10:12:11 2023\n"
T_FROM = calendar.timegm((2023, 11, 13, 10, 12, 11))


def bodies(store, mailbox="INBOX") -> list[bytes]:
    return [store.read_body(r.address) for r in store.records(U, mailbox)]


def write(tmp_path: Path, data: bytes, name: str = "mail.mbox") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- From_ lines -------------------------------------------------------------------------------

@pytest.mark.parametrize("line, when", [
    (b"From alice@example.org Mon Nov 13 10:12:11 2023", (2023, 11, 13, 10, 12, 11)),
    (b"From MAILER-DAEMON Thu Nov  2 08:00:00 2023", (2023, 11, 2, 8, 0, 0)),
    (b"From a@b Thu Nov 2 08:00 2023", (2023, 11, 2, 8, 0, 0)),             # no seconds
    (b"From a@b Sat Jan  1 00:00:00 UTC 2000", (2000, 1, 1, 0, 0, 0)),        # zone name
    (b"From a@b Sat Jan  1 01:00:00 2000 +0100", (2000, 1, 1, 0, 0, 0)),     # offset after
    (b"From a@b Fri Dec 31 19:00:00 -0500 1999", (2000, 1, 1, 0, 0, 0)),     # offset before
    (b"From a@b Tue Feb 29 12:00:00 2000\r", (2000, 2, 29, 12, 0, 0)),       # CRLF file
    (b"From  Mon Nov 13 10:12:11 2023", (2023, 11, 13, 10, 12, 11)),         # empty sender
])
def test_from_lines(line, when):
    assert parse_from_line(line) == calendar.timegm(when)


@pytest.mark.parametrize("line", [
    b"From here on, everything is different.",
    b"From a@b Mon Feb 30 10:12:11 2023",          # no such day
    b"From a@b Mon Nov 13 25:12:11 2023",
    b">From a@b Mon Nov 13 10:12:11 2023",
    b"from a@b Mon Nov 13 10:12:11 2023",
    b"From a@b Mon Nov 13 10:12:11 2023 trailing words",
    b"From " + b"x" * 2000 + b" Mon Nov 13 10:12:11 2023",
])
def test_lines_that_are_not_from_lines(line):
    assert parse_from_line(line) is None


# -- messages and their bytes ----------------------------------------------------------------

def test_import_messages_and_dates(store, tmp_path):
    path = write(tmp_path, FROM + b"Subject: one\n\nfirst\n\n"
                 + b"From bob Tue Nov 14 10:00:00 2023\nSubject: two\n\nsecond\n\n"
                 + b"From carol Wed Nov 15 10:00:00 2023\nSubject: three\n\nthird\n")
    report = import_mbox(store, U, path, "Archive/2023")
    assert report.ok and report.imported == 3 and report.mailboxes_created == ["Archive/2023"]
    assert bodies(store, "Archive/2023") == [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n",
                                             b"Subject: three\n\nthird\n"]
    assert [r.internaldate for r in store.records(U, "Archive/2023")] == [
        T_FROM, calendar.timegm((2023, 11, 14, 10, 0, 0)), calendar.timegm((2023, 11, 15, 10, 0, 0))]
    assert report.bytes == sum(len(b) for b in bodies(store, "Archive/2023"))
    assert report.as_dict()["imported"] == 3 and report.as_dict()["ok"] is True


def test_mboxrd_quoting_is_undone(store, tmp_path):
    path = write(tmp_path, FROM + b"Subject: q\n\n>From the start\n>>From two\n>>>From three\n"
                 b"> From not quoted\n>Fromage\nFrom no date here\n\n")
    import_mbox(store, U, path, "INBOX")
    assert bodies(store) == [(b"Subject: q\n\nFrom the start\n>From two\n>>From three\n"
                              b"> From not quoted\n>Fromage\nFrom no date here\n")]


def test_a_from_line_without_a_date_does_not_split_a_message(store, tmp_path):
    path = write(tmp_path, FROM + b"Subject: mboxo\n\nFrom here on, we talk.\nFrom me to you\n\n"
                 + FROM + b"Subject: next\n\nx\n")
    report = import_mbox(store, U, path, "INBOX")
    assert report.imported == 2
    assert bodies(store)[0] == b"Subject: mboxo\n\nFrom here on, we talk.\nFrom me to you\n"


def test_crlf_files_keep_their_line_ends(store, tmp_path):
    crlf = FROM.replace(b"\n", b"\r\n")
    path = write(tmp_path, crlf + b"Subject: a\r\n\r\nbody\r\n\r\n" + crlf + b"Subject: b\r\n\r\nend\r\n")
    import_mbox(store, U, path, "INBOX")
    assert bodies(store) == [b"Subject: a\r\n\r\nbody\r\n", b"Subject: b\r\n\r\nend\r\n"]
    assert [r.internaldate for r in store.records(U, "INBOX")] == [T_FROM, T_FROM]


ODD = [
    b"Subject: nul\n\nbefore\0after\0\0\n",
    b"Subject: long\n\n" + b"x" * 2000 + b"\n" + b"y" * 5000 + b"\n",
    b"",
    b"Subject: cr\r\n\nmixed\r\nline\rends\n",
    bytes(range(1, 10)) + b"\n" + bytes(range(11, 256)) + b"\n",
]


def test_bodies_are_kept_byte_for_byte(store, tmp_path):
    data = b"".join(FROM + (b + b"\n" if b else b"") for b in ODD)
    report = import_mbox(store, U, write(tmp_path, data), "INBOX")
    assert report.ok and report.imported == len(ODD)
    assert bodies(store) == ODD


def test_empty_messages(store, tmp_path):
    report = import_mbox(store, U, write(tmp_path, FROM + FROM + b"\n" + FROM), "INBOX")
    assert report.imported == 3 and bodies(store) == [b"", b"", b""]


def test_the_last_message_without_a_blank_line(store, tmp_path):
    path = write(tmp_path, FROM + b"Subject: a\n\nbody\n\n" + FROM + b"Subject: b\n\nno end")
    import_mbox(store, U, path, "INBOX")
    assert bodies(store) == [b"Subject: a\n\nbody\n", b"Subject: b\n\nno end"]


def test_a_50_mb_message(store, tmp_path):
    big = b"Subject: big\n\n" + (os.urandom(1 << 20).replace(b"\n", b"_") + b"\n") * 50
    path = write(tmp_path, FROM + big + b"\n" + FROM + b"Subject: small\n\nx\n")
    report = import_mbox(store, U, path, "INBOX")
    assert report.ok and report.imported == 2
    (rec, _) = store.records(U, "INBOX")
    assert rec.size == len(big) and store.read_body(rec.address) == big


# -- flags -------------------------------------------------------------------------------

def test_flags_from_status_headers(store, tmp_path):
    path = write(tmp_path,
                 FROM + b"Subject: a\nStatus: RO\nX-Status: AF\nX-Keywords: $Junk, Work\n\nbody\n\n"
                 + FROM + b"Subject: b\nstatus: O\nX-STATUS: DT\n\nStatus: R in the body\n\n"
                 + FROM + b"Subject: c\r\nStatus: R\r\n\r\nX-Keywords: body\r\n")
    import_mbox(store, U, path, "INBOX")
    flags = [set(r.flags) for r in store.records(U, "INBOX")]
    assert flags == [{"\\Seen", "\\Answered", "\\Flagged", "$Junk", "Work"},
                     {"\\Deleted", "\\Draft"}, {"\\Seen"}]
    # Headers are read, never changed.
    assert bodies(store)[0].startswith(b"Subject: a\nStatus: RO\nX-Status: AF\n")
    assert flags_from_headers(b"X-Keywords: a b,c ,, d\n\n") == ["a", "b", "c", "d"]


def test_keywords_the_store_refuses_are_left_off_and_reported_once(store, tmp_path):
    data = b"".join(FROM + b"Subject: %d\nStatus: R\nX-Keywords: $Junk Wichtig-\xc3\xa4 b\\ad\n\n"
                    b"body %d\n\n" % (i, i) for i in range(4))
    path = write(tmp_path, data)
    report = import_mbox(store, U, path, "INBOX")
    assert report.imported == 4 and not report.ok
    assert [r["file"] for r in report.refused] == [str(path), str(path)]
    reasons = " | ".join(r["reason"] for r in report.refused)
    assert "Wichtig-ä" in reasons and "b\\\\ad" in reasons
    assert reasons.count("left off 4 message(s)") == 2
    assert all(r.flags == ("\\Seen", "$Junk") for r in store.records(U, "INBOX"))


# -- refusals ----------------------------------------------------------------------------

def test_bytes_before_the_first_from_line_are_refused(store, tmp_path):
    path = write(tmp_path, b"garbage\nmore garbage\n" + FROM + b"Subject: a\n\nbody\n")
    report = import_mbox(store, U, path, "INBOX")
    assert report.imported == 1 and not report.ok
    assert report.refused == [{"file": str(path),
                               "reason": "21 bytes before the first From_ line are not a message"}]
    # Blank lines before it are no content.
    report = import_mbox(store, U, write(tmp_path, b"\n\n" + FROM + b"x\n", "b.mbox"), "Other")
    assert report.ok and report.imported == 1


def test_a_file_with_no_from_line(store, tmp_path):
    path = write(tmp_path, b"Subject: not an mbox\n\nbody\n")
    report = import_mbox(store, U, path, "INBOX")
    assert report.imported == 0 and report.refused == [
        {"file": str(path), "reason": "the file has no From_ line: it is not an mbox"}]


def test_an_empty_file(store, tmp_path):
    report = import_mbox(store, U, write(tmp_path, b""), "INBOX")
    assert report.ok and report.imported == 0 and report.mailboxes_created == ["INBOX"]


def test_a_missing_file(store, tmp_path):
    with pytest.raises(ImportError_, match="cannot open"):
        import_mbox(store, U, tmp_path / "missing.mbox", "INBOX")
    (tmp_path / "dir.mbox").mkdir()
    with pytest.raises(ImportError_):
        import_mbox(store, U, tmp_path / "dir.mbox", "INBOX")


def test_a_pipe_or_fifo_is_refused_not_read_as_empty(store, tmp_path):
    os.mkfifo(tmp_path / "fifo")                   # opening it must not wait for a writer
    with pytest.raises(ImportError_, match="not a regular file"):
        import_mbox(store, U, tmp_path / "fifo", "INBOX")
    r, w = os.pipe()                               # as `--mbox <(zcat old.mbox.gz)` gives it
    try:
        os.write(w, FROM + b"x\n")
        with pytest.raises(ImportError_, match="decompress or copy it to a file"):
            import_mbox(store, U, f"/proc/self/fd/{r}", "INBOX")
    finally:
        os.close(r)
        os.close(w)
    assert store.users() == []                     # nothing was created


def test_a_message_over_the_limit_is_refused_and_the_rest_imported(store, tmp_path,
                                                                   monkeypatch):
    # The limit is 1 GiB.  Finding the next From_ line means reading past it, which takes
    # seconds even in a sparse file; the rule is the same with a smaller limit.
    assert mailfile.MAX_MESSAGE_BYTES == 1 << 30
    monkeypatch.setattr(mbox, "MAX_MESSAGE_BYTES", 1 << 20)
    path = tmp_path / "huge.mbox"
    with open(path, "wb") as fh:
        fh.write(FROM + b"Subject: small\n\nfirst\n\n" + FROM + b"Subject: huge\n\n")
        fh.seek(1 << 20, os.SEEK_CUR)                 # sparse: nothing written
        fh.write(b"\n\n" + FROM + b"Subject: after\n\nlast\n")
    report = import_mbox(store, U, path, "INBOX")
    assert report.imported == 2 and not report.ok
    (refusal,) = report.refused
    assert refusal["file"] == str(path)
    assert refusal["reason"] == (f"message 2 (From_ line at line 6): {(1 << 20) + 17} bytes; "
                                 f"messages over {1 << 20} bytes are not imported")
    assert bodies(store) == [b"Subject: small\n\nfirst\n", b"Subject: after\n\nlast\n"]


# -- re-imports and batches ---------------------------------------------------------------

def test_reimport_adds_nothing_and_duplicates_stay(store, tmp_path):
    data = FROM + b"a\n\n" + FROM + b"b\n\n" + FROM + b"a\n"
    path = write(tmp_path, data)
    first = import_mbox(store, U, path, "INBOX")
    again = import_mbox(store, U, path, "INBOX")
    assert (first.imported, first.skipped, again.imported, again.skipped) == (3, 0, 0, 3)
    assert Counter(bodies(store)) == {b"a\n": 2, b"b\n": 1}
    # Into another mailbox, the same file is imported again: the rule is per mailbox.
    assert import_mbox(store, U, path, "Copy").imported == 3
    # An mbox that grew: only the new messages.
    path.write_bytes(data + b"\n" + FROM + b"c\n")
    grown = import_mbox(store, U, path, "INBOX")
    assert (grown.imported, grown.skipped) == (1, 3)


def test_batches(store, tmp_path, monkeypatch):
    calls = []
    real = store.append_prepared
    monkeypatch.setattr(store, "append_prepared",
                        lambda u, mb, b: calls.append(len(b.messages)) or real(u, mb, b))
    data = b"".join(FROM + b"Subject: %d\n\nbody\n\n" % i for i in range(2300))
    report = import_mbox(store, U, write(tmp_path, data), "INBOX")
    assert report.imported == 2300 and calls == [1000, 1000, 300]


# -- written by others ---------------------------------------------------------------------

def test_an_mbox_written_by_pythons_mailbox_module(store, tmp_path):
    path = tmp_path / "py.mbox"
    box = pymailbox.mbox(path)
    msgs = [b"Subject: one\n\nFrom the start\n", b"Subject: two\n\n>From quoted\nplain\n"]
    for m in msgs:
        box.add(pymailbox.mboxMessage(m))
    box.close()
    report = import_mbox(store, U, path, "INBOX")
    assert report.imported == 2
    # mboxo (Python's module) quotes "From " but does not mark ">From ": one ">" is lost
    # there, which is why mboxrd exists; every other byte is kept.
    assert bodies(store) == [msgs[0], b"Subject: two\n\nFrom quoted\nplain\n"]


def test_a_corpus_mbox_round_trip(store, tmp_path):
    mails = list(corpus.generate(60, seed=5, max_size=20_000))
    path = tmp_path / "corpus.mbox"
    corpus.write_mbox(path, mails)
    report = import_mbox(store, U, path, "INBOX")
    assert report.ok and report.imported == 60
    assert bodies(store) == [m.body.replace(b"\r\n", b"\n") for m in mails]
    assert [r.internaldate for r in store.records(U, "INBOX")] == [m.internaldate for m in mails]
