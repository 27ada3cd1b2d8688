"""Every line of the real Cyrus 3.6.1 transcripts parses and prints back byte-identical.

Wire bytes are rebuilt from the transcripts as described in
tests/data/cyrus-transcripts/README.md (each line plus the CRLF the capture
stripped); the proxy's own byte counts confirm the rebuild.  Client lines are
printed in the client role ({n+} literals), server lines in the server role.
"""
from __future__ import annotations

import functools
import hashlib
import re
from unittest import mock

import pytest
from dlist_testlib import (
    COMPLETE,
    SKELETONS,
    drain,
    parse_all,
    parse_chunked,
    plain_byte_counts,
    transcript_lines,
    wire,
)

import dlist.parser
import dlist.scan
from dlist import File, KvList, List, Parser, decode_line, encode_line, print_line

DIRECTIONS = [("C", "client", False), ("S", "server", True)]


def _ids(path):
    return path.name.split("-")[0]


@pytest.mark.parametrize("path", COMPLETE, ids=_ids)
def test_rebuilt_wire_bytes_match_the_proxys_counts(path):
    client, server = plain_byte_counts(path)
    assert len(wire(path, "C")) == client
    assert len(wire(path, "S")) == server


@pytest.mark.parametrize("direction, role, banner", DIRECTIONS)
@pytest.mark.parametrize("path", COMPLETE, ids=_ids)
def test_every_line_prints_back_byte_identical(path, direction, role, banner):
    data = wire(path, direction)
    lines = parse_all(data, banner=banner)
    assert lines, "no lines parsed"
    assert b"".join(print_line(line, role) for line in lines) == data


@pytest.mark.parametrize("direction, role, banner", DIRECTIONS)
@pytest.mark.parametrize("path", COMPLETE, ids=_ids)
def test_binary_form_round_trips_to_the_same_bytes(path, direction, role, banner):
    data = wire(path, direction)
    lines = parse_all(data, banner=banner)
    again = [decode_line(encode_line(line)) for line in lines]
    assert again == lines
    assert b"".join(print_line(line, role) for line in again) == data


@pytest.mark.parametrize("direction, role, banner", DIRECTIONS)
@pytest.mark.parametrize("path", COMPLETE, ids=_ids)
def test_feeding_in_small_chunks_gives_the_same_lines(path, direction, role, banner):
    data = wire(path, direction)
    whole = parse_all(data, banner=banner)
    assert parse_chunked(data, [1], banner=banner) == whole
    assert parse_chunked(data, [3, 1, 7, 64, 2, 1000], banner=banner) == whole
    with mock.patch.object(dlist.parser, "SCAN_AHEAD", 3):   # tokenize lines as they come
        assert parse_chunked(data, [3, 1, 7, 64, 2, 1000], banner=banner) == whole


@pytest.mark.parametrize("direction, role, banner", DIRECTIONS)
@pytest.mark.parametrize("path", COMPLETE, ids=_ids)
def test_exact_scanner_agrees_with_the_fast_one(path, direction, role, banner, monkeypatch):
    data = wire(path, direction)
    fast = parse_all(data, banner=banner)

    def always_bail(*args):
        raise dlist.scan._Bail
    monkeypatch.setattr(dlist.scan, "_fast_region", always_bail)
    assert parse_all(data, banner=banner) == fast


@pytest.mark.parametrize("path", COMPLETE, ids=_ids)
def test_every_message_body_hashes_to_its_guid(path):
    files = []
    for line in parse_all(wire(path, "C")):
        assert line.corrupt_files == ()
        if line.verb == "APPLY" and line.key == "MESSAGE":
            files += list(line.value)
    for f in files:
        assert isinstance(f, File)
        assert hashlib.sha1(f.body).hexdigest() == f.guid
        assert len(f.body) == f.size


def test_session_shapes_of_the_initial_sync():
    path = next(p for p in COMPLETE if p.name.startswith("01-"))
    server = parse_all(wire(path, "S"), banner=True)
    # The banner is text, up to and including "* OK".
    assert [(l.verb, l.text) for l in server[:4]] == [
        ("*", b"SASL PLAIN LOGIN"), ("*", b"COMPRESS DEFLATE"), ("*", b"SIEVE-MAILBOX"),
        ("*", b"OK cyrus-replica.test Cyrus sync server 3.6.1-Debian-3.6.1-4+deb12u5")]
    enabled = next(l for l in server if l.key == "ENABLED")
    assert enabled.verb == "*" and enabled.value.atoms() == ["SIEVE-MAILBOX"]

    client = parse_all(wire(path, "C"))
    assert (client[0].verb, client[0].text) == ("AUTHENTICATE", b"PLAIN AHJlcGwAcmVwbHB3")
    assert (client[1].verb, client[1].text) == ("COMPRESS", b"DEFLATE")
    assert client[-1].verb == "EXIT" and client[-1].text is None
    messages = [l for l in client if l.key == "MESSAGE"]
    assert sum(len(l.value) for l in messages) == 12  # 11 messages and the sieve script

    inbox = next(l.value for l in client if l.key == "MAILBOX"
                 and l.value.get_atom("MBOXNAME") == "user.test")
    assert isinstance(inbox, KvList)
    assert inbox.get_num("LAST_UID") == 7
    assert inbox.get_num32("SYNC_CRC") == 230631098
    assert inbox.get_atom("ACL") == "test\tlrswipkxtecdan\tother\tlrs\t"
    records = inbox.get_list("RECORD")
    assert [r.get_num("UID") for r in records] == [1, 2, 3, 4, 5, 6, 7]
    first = records[0]
    assert first.get_list("FLAGS").atoms() == ["\\Flagged", "\\Seen", "$Label1"]
    assert len(first.get_guid("GUID")) == 40
    annotations = [a.get_atom("ENTRY") for a in first.get_list("ANNOTATIONS")]
    assert "/vendor/cmu/cyrus-imapd/savedate" in annotations
    assert first.get_list("ANNOTATIONS")[0].get_atom("USERID") == ""

    sent = next(l.value for l in client if l.key == "MAILBOX"
                and l.value.get_atom("MBOXNAME") == "user.test.Sent")
    specialuse = sent.get_list("ANNOTATIONS")[0]
    assert specialuse.get_map("VALUE") == b"\\Sent"  # sent as the literal {5+}


def test_server_sends_literals_without_plus():
    path = next(p for p in COMPLETE if p.name.startswith("02-"))
    data = wire(path, "S")
    assert b"VALUE {5}\r\n\\Sent" in data
    lines = parse_all(data, banner=True)
    mailboxes = [l.value for l in lines if l.key == "MAILBOX"]
    sent = next(m for m in mailboxes if m.get_atom("MBOXNAME") == "user.test.Sent")
    assert sent.get_list("ANNOTATIONS")[0].get_map("VALUE") == b"\\Sent"
    # Printed as the client would send it, the same value gets "{5+}".
    assert b"VALUE {5+}\r\n\\Sent" in print_line(next(l for l in lines if l.value is sent), "client")


def test_missing_reply_to_reserve():
    path = next(p for p in COMPLETE if p.name.startswith("05-"))
    missing = [l for l in parse_all(wire(path, "S"), banner=True) if l.key == "MISSING"]
    assert missing and all(len(g) == 40 for l in missing for g in l.value.atoms())


# -- the 20,000-message skeletons (11 and 12) -----------------------------------------------
#
# Their message bodies are elided and their APPLY MAILBOX lines cut, so the
# client side cannot be replayed as it was.  What is testable: the server side
# in full; every client line that lost nothing; an APPLY MESSAGE batch with
# filler bytes in place of the elided bodies (the framing is by size, so the
# headers, sizes and the 1024-file batch shape are real; the fillers cannot
# hash to the real GUIDs, which tests the SHA-1 check); and the APPLY MAILBOX
# line with its cut middle closed up (the head, and whole records from
# either side of the cut).

_ELIDED = re.compile(rb"<(\d+) literal bytes elided>")
_MORE = re.compile(rb"  \.\.\. \[(\d+) more message literals of this APPLY MESSAGE batch elided\] \.\.\.")
_CUT = re.compile(rb" \.\.\. \[line is (\d+) chars, (\d+) %\(UID \.\.\.\) records; cut\] \.\.\. ")


@pytest.mark.parametrize("path", SKELETONS, ids=_ids)
def test_skeleton_server_side_is_complete(path):
    data = wire(path, "S")
    assert len(data) == plain_byte_counts(path)[1]
    lines = parse_all(data, banner=True)
    assert b"".join(print_line(l, "server") for l in lines) == data


@pytest.mark.parametrize("path", SKELETONS, ids=_ids)
def test_skeleton_client_lines_that_lost_nothing(path):
    lines = transcript_lines(path, "C")
    whole = [l for l in lines if not (_ELIDED.search(l) or _MORE.match(l) or _CUT.search(l)
                                      or l.startswith(b"APPLY MESSAGE"))]
    assert len(whole) >= 5
    for text in whole:
        data = text + b"\r\n"
        assert b"".join(print_line(l, "client") for l in parse_all(data)) == data


def _message_batches(path):
    """Each APPLY MESSAGE batch as its list of transcript lines."""
    batches, current = [], None
    for line in transcript_lines(path, "C"):
        if line.startswith(b"APPLY MESSAGE ("):
            current = [line]
        elif current is not None:
            current.append(line)
            if line.endswith(b")"):
                batches.append(current)
                current = None
    return batches


def _filled(lines):
    """Wire bytes for a skeleton batch: fillers for elided bodies, made-up whole literals
    (with real GUIDs) for the collapsed run.  Returns (bytes, GUIDs that cannot verify)."""
    out = []
    unverifiable = set(re.findall(rb"%\{default ([0-9a-f]{40}) \d+\}", b"\n".join(lines)))
    for i, line in enumerate(lines):
        m = _MORE.match(line)
        if m is None:
            out.append(_ELIDED.sub(lambda e: b"x" * int(e.group(1)), line) + b"\r\n")
            continue
        # The collapsed run holds the body of the last header shown before it,
        # then K whole literals; the body of the K-th is the next line's first elision.
        prev_size = int(re.findall(rb"(\d+)\}$", lines[i - 1])[0])
        next_size = int(_ELIDED.match(lines[i + 1]).group(1))
        run = [b"x" * prev_size]
        for k in range(int(m.group(1))):
            size = next_size if k == int(m.group(1)) - 1 else 3000 + k
            body = b"x" * size
            guid = hashlib.sha1(body).hexdigest().encode()
            run.append(b" %{default " + guid + b" %d}\r\n" % size)
            if k < int(m.group(1)) - 1:
                run.append(body)
        unverifiable.discard(hashlib.sha1(b"x" * next_size).hexdigest().encode())
        out.append(b"".join(run))
    return b"".join(out), {g.decode() for g in unverifiable}


class _CountingSink:
    """Counts a body's bytes and keeps nothing: the File stays by reference."""

    def __init__(self, sizes, partition, guid, size):
        assert partition == "default"
        self.sizes = sizes
        self.got = 0
        sizes.append(size)

    def write(self, chunk):
        self.got += len(chunk)

    def close(self, verified):
        assert self.got == self.sizes[-1]


def test_skeleton_message_batches_with_filler_bodies():
    path = next(p for p in SKELETONS if p.name.startswith("11-"))
    batches = _message_batches(path)
    assert len(batches) == 20
    for batch, count in ((batches[0], 1024), (batches[-1], 544)):  # a full one and the last
        data, unverifiable = _filled(batch)
        sizes: list[int] = []
        parser = Parser(sink=functools.partial(_CountingSink, sizes))
        for i in range(0, len(data), 65536):
            parser.feed(data[i:i + 65536])
        (line,) = drain(parser)
        files = list(line.value)
        assert len(files) == count
        assert all(f.body is None for f in files) and [f.size for f in files] == sizes
        assert {f.guid for f in line.corrupt_files} == unverifiable
        # In memory, with the default sink, the batch prints back as it came.
        (line,) = parse_all(data)
        assert print_line(line, "client") == data


@pytest.mark.parametrize("path", SKELETONS, ids=_ids)
def test_skeleton_apply_mailbox_with_the_cut_closed(path):
    (text,) = [l for l in transcript_lines(path, "C") if _CUT.search(l)]
    m = _CUT.search(text)
    length, records = int(m.group(1)), int(m.group(2))
    head, tail = text[:m.start()], text[m.end():]
    # Whole records only: the head up to its last record start, the tail from its first.
    head = head[:head.rindex(b" %(UID ")]
    tail = tail[tail.index(b"%(UID "):]
    data = head + b" " + tail + b"\r\n"
    (line,) = parse_all(data)
    assert print_line(line, "client") == data
    mailbox = line.value
    assert mailbox.get_atom("MBOXNAME") == "user.bench"
    uids = [r.get_num("UID") for r in mailbox.get_list("RECORD")]
    assert uids == sorted(uids) and uids[-1] <= mailbox.get_num("LAST_UID")
    assert records > len(uids) and length > len(data)
    for record in mailbox.get_list("RECORD"):
        assert set(record.keys()) == {"UID", "MODSEQ", "LAST_UPDATED", "FLAGS", "INTERNALDATE",
                                      "SIZE", "GUID", "ANNOTATIONS"}
        assert isinstance(record.get_list("FLAGS"), List)
    # A prefix of the original line is just an incomplete line, not an error.
    parser = Parser()
    parser.feed(text[:m.start()])
    assert parser.next_line() is None
