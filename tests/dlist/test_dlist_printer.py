"""The printer: roles, Cyrus's forms, streaming file bodies, and refusing malformed values."""
from __future__ import annotations

import hashlib

import pytest
from dlist_testlib import parse_all

from dlist import (
    DlistProtocolError,
    File,
    Flag,
    KvList,
    Line,
    List,
    Literal,
    Num,
    Str,
    iter_line,
    print_line,
    print_value,
)
from dlist.model import FILE, KVLIST, LIST, LITERAL, wrap

BODY = b"message body\r\n"
GUID = hashlib.sha1(BODY).hexdigest()


def test_literal_headers_follow_the_role():
    line = Line("APPLY", "ANNOTATION", KvList(VALUE=Str("\\Sent")))
    assert print_line(line, "client") == b"APPLY ANNOTATION %(VALUE {5+}\r\n\\Sent)\r\n"
    assert print_line(line, "server") == b"APPLY ANNOTATION %(VALUE {5}\r\n\\Sent)\r\n"
    with pytest.raises(ValueError):
        print_line(line, "peer")


def test_building_an_apply_mailbox_like_sync_client():
    record = KvList(UID=1, MODSEQ=4, LAST_UPDATED=1690000000, FLAGS=[Flag("\\Seen"), "$Forwarded"],
                    INTERNALDATE=1690000000, SIZE=29, GUID=GUID,
                    ANNOTATIONS=[KvList(ENTRY="/vendor/cmu/cyrus-imapd/savedate", USERID="",
                                        MODSEQ=0, VALUE=1690000000)])
    line = Line("APPLY", "MAILBOX", KvList(
        UNIQUEID="7a1c0f9e-3b2d-4c55-9e1f-2a6b8d0c4e11", MBOXNAME="user.cassandane",
        ACL="cassandane\tlrswipkxtecdan\t", OPTIONS="P", RECORD=[record]))
    assert print_line(line) == (
        b'APPLY MAILBOX %(UNIQUEID 7a1c0f9e-3b2d-4c55-9e1f-2a6b8d0c4e11 MBOXNAME user.cassandane '
        b'ACL "cassandane\tlrswipkxtecdan\t" OPTIONS P RECORD (%(UID 1 MODSEQ 4 '
        b'LAST_UPDATED 1690000000 FLAGS (\\Seen $Forwarded) INTERNALDATE 1690000000 SIZE 29 '
        b'GUID ' + GUID.encode() + b' ANNOTATIONS (%(ENTRY /vendor/cmu/cyrus-imapd/savedate '
        b'USERID "" MODSEQ 0 VALUE 1690000000)))))\r\n')


def test_text_lines_and_values():
    assert print_line(Line("OK", text="success")) == b"OK success\r\n"
    assert print_line(Line("EXIT")) == b"EXIT\r\n"
    assert print_value(List([Num(1), Literal(b"\0")]), "server") == b"(1 {1}\r\n\0)"
    assert print_value(KvList()) == b"%()"
    with pytest.raises(TypeError):
        print_value("not a value")


def test_files_by_reference_need_bodies():
    ref = File("default", GUID, len(BODY))
    line = Line("APPLY", "MESSAGE", [ref, ref])
    with pytest.raises(ValueError, match="bodies"):
        print_line(line)
    header = b"%{default " + GUID.encode() + b" 14}\r\n"
    expected = b"APPLY MESSAGE (" + header + BODY + b" " + header + BODY + b")\r\n"
    assert print_line(line, bodies=lambda f: BODY) == expected
    assert print_line(line, bodies=lambda f: [BODY[:3], BODY[3:]]) == expected
    chunks = list(iter_line(line, bodies=lambda f: iter([BODY[:3], BODY[3:]])))
    assert b"".join(chunks) == expected
    assert chunks[1:3] == [BODY[:3], BODY[3:]]      # bodies stream as chunks of their own
    assert print_value(ref, bodies=lambda f: BODY) == header + BODY


@pytest.mark.parametrize("body", [BODY[:-1], BODY + b"x", [BODY, b"x"], [BODY[:3]]])
def test_a_body_of_the_wrong_length_is_refused(body):
    line = Line("APPLY", "MESSAGE", [File("default", GUID, len(BODY))])
    with pytest.raises(ValueError):
        print_line(line, bodies=lambda f: body)
    with pytest.raises(ValueError):
        b"".join(iter_line(line, bodies=lambda f: body))


def test_inline_files_print_as_they_are():
    f = File("default", GUID, body=BODY)
    line = Line("APPLY", "MESSAGE", [f])
    assert list(iter_line(line)) == [print_line(line)]


def _line_with(node):
    line = Line("APPLY", "X", "y")
    line.value = object.__new__(type(wrap((LIST,))))
    line.value.node = node
    return line


@pytest.mark.parametrize("node", [
    (LIST, b"a b"), (LIST, b""), (LIST, b"("), (LIST, b'"x'), (LIST, b"{5}"), (LIST, b"%x"),
    (LIST, b"a\nb"), (LIST, b"a\r"), (LIST, b'a"b'), (LIST, b'"a"b"'), (LIST, b'"a\r"'),
    (LIST, 5), (LIST, None), (LIST, 1.5), (LIST, "text"), (LIST, (9, b"x")),
    (KVLIST, b"k"), (KVLIST, (LIST,), b"v"), (KVLIST, b"k v", b"v"), (KVLIST, b"%(k", b"v"),
    (KVLIST, (LITERAL, b"\0"), b"v"), (KVLIST, (FILE, b"p", GUID.encode(), 1, b"x", False), b"v"),
    (LIST, (LITERAL, "x")), (LIST, (LITERAL, b"x", b"y")),
    (LIST, (FILE, b"p p", GUID.encode(), 1, b"x", False)),
    (LIST, (FILE, b"p", b"zz", 1, b"x", False)),
    (LIST, (FILE, b"p", GUID.encode(), 2, b"x", False)),
    (LIST, (FILE, b"p", GUID.encode(), 1, b"x", 1)),
    (LIST, (FILE, b"p", GUID.encode(), -1, None, False)),
    (LIST, b"a", (LIST, (LIST, b"b c"))),
    (LIST,) + (b"ok",) * 5000 + (b"no way",),
])
def test_malformed_values_are_never_printed(node):
    with pytest.raises(DlistProtocolError):
        print_line(_line_with(node), bodies=lambda f: b"")


def test_too_deep_to_print():
    node = (LIST, b"x")
    for _ in range(250):
        node = (LIST, node)
    with pytest.raises(DlistProtocolError, match="nested"):
        print_line(_line_with(node))


def test_unusual_but_valid_tokens_print():
    node = (KVLIST, b"%x", b'"a\\"b"', b"\\Flag", b"a{b%c", b'"tab\tin (quotes)"', b"NIL")
    assert print_line(_line_with(node)) == (
        b'APPLY X %(%x "a\\"b" \\Flag a{b%c "tab\tin (quotes)" NIL)\r\n')


def test_bad_verbs_and_texts_are_refused():
    line = Line("OK", text="x")
    line.text = b"a\r\nb"
    with pytest.raises(DlistProtocolError):
        print_line(line)
    line = Line("OK")
    line.verb = "O K"
    with pytest.raises(DlistProtocolError):
        print_line(line)
    # What the parser keeps losslessly prints back, even if Line() would refuse it.
    for data in (b"\tOK x\r\n", b"OK a\rb\r\n", b"EXIT\r\r\n", b" x\r\n"):
        (parsed,) = parse_all(data)
        assert print_line(parsed) == data
