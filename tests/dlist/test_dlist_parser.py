"""The streaming parser: framing, literals, file literal sinks, banner, white space, limits."""
from __future__ import annotations

import hashlib
import itertools
from typing import ClassVar

import pytest
from dlist_testlib import parse_all, parse_chunked

import dlist.parser
import dlist.scan
from dlist import (
    NIL,
    DlistProtocolError,
    File,
    Flag,
    KvList,
    Limits,
    Line,
    List,
    Literal,
    MemorySink,
    Parser,
    Quoted,
    Str,
    print_line,
)

BODY = b"From: a@b\r\nSubject: x\r\n\r\nhi\r\n"
GUID = hashlib.sha1(BODY).hexdigest().encode()
FILE_LINE = b"APPLY MESSAGE (%{default " + GUID + b" 29}\r\n" + BODY + b")\r\n"


def one(data: bytes, **kwargs) -> Line:
    (line,) = parse_all(data, **kwargs)
    return line


def exact_only(monkeypatch):
    """Make every region go through the exact scanner."""
    def bail(*args):
        raise dlist.scan._Bail
    monkeypatch.setattr(dlist.scan, "_fast_region", bail)


@pytest.mark.parametrize("data, verb, text", [
    (b"RESTART\r\n", "RESTART", None), (b"EXIT\r\n", "EXIT", None), (b"NOOP\n", "NOOP", None),
    (b"AUTHENTICATE PLAIN AHJlcGwAcmVwbHB3\r\n", "AUTHENTICATE", b"PLAIN AHJlcGwAcmVwbHB3"),
    (b"AUTHENTICATE PLAIN =\r\n", "AUTHENTICATE", b"PLAIN ="),
    (b"COMPRESS DEFLATE\r\n", "COMPRESS", b"DEFLATE"), (b"C01 CAPABILITY\r\n", "C01", b"CAPABILITY"),
    (b"OK success\r\n", "OK", b"success"), (b"OK \r\n", "OK", b""),
    (b"NO IMAP_SYNC_CHECKSUM Checksum Failure\r\n", "NO", b"IMAP_SYNC_CHECKSUM Checksum Failure"),
    (b"BAD IMAP_PROTOCOL_ERROR Unrecognized command\r\n", "BAD",
     b"IMAP_PROTOCOL_ERROR Unrecognized command"),
    (b"+ AHJlcGw=\r\n", "+", b"AHJlcGw="), (b"*\r\n", "*", None), (b"\r\n", "", None),
    (b"BYE shutting down\r\n", "BYE", b"shutting down"),
])
def test_text_lines(data, verb, text):
    line = one(data)
    assert (line.verb, line.text, line.value) == (verb, text, None)
    assert print_line(line) == data if data.endswith(b"\r\n") else data[:-1] + b"\r\n"


@pytest.mark.parametrize("data", [
    b"GET USER test\r\n", b"APPLY UNUSER third\r\n", b"RESTORE MAILBOX %(MBOXNAME x)\r\n",
    b"apply x y\r\n", b"Get X y\r\n", b"* LSUB (user.test user.test.Sent)\r\n",
    b"* COMPRESS DEFLATE\r\n", b"APPLY FORCE %()\r\n", b'GET ANNOTATION ""\r\n',
    b"APPLY CAPABILITIES (SIEVE-MAILBOX)\r\n", b"* X NIL\r\n", b"* X \\Seen\r\n",
])
def test_dlist_lines_round_trip(data):
    line = one(data)
    assert line.is_dlist and print_line(line) == data


def test_literals_either_marker_and_binary_safe():
    line = one(b"APPLY X %(A {3}\r\na\0b B {3+}\r\n)(\" C {0}\r\n)\r\n")
    kv = line.value
    assert kv.get_map("A") == b"a\0b" and kv.get_map("B") == b')("' and kv.get_map("C") == b""
    assert print_line(line, "client") == b"APPLY X %(A {3+}\r\na\0b B {3+}\r\n)(\" C {0+}\r\n)\r\n"
    assert print_line(line, "server") == b"APPLY X %(A {3}\r\na\0b B {3}\r\n)(\" C {0}\r\n)\r\n"


def test_literal_as_key_and_literals_side_by_side():
    line = one(b"APPLY X %({3+}\r\nKEY {1+}\r\nv)\r\n")
    assert line.value.get_atom("KEY") == "v"
    line = one(b"APPLY X ({1+}\r\na{1+}\r\nb\"c\")\r\n")
    assert line.value.atoms() == ["a", "b", "c"]
    line = one(b"* X {2}\r\nab\r\n")
    assert line.value == Literal(b"ab")


def test_tokens_next_to_each_other_split_like_cyrus():
    # getxstring(): an atom ends at white space, a paren or a double quote.
    line = one(b'APPLY X (a"b" "c"d)\r\n')
    assert line.value.atoms() == ["a", "b", "c", "d"]
    assert one(b'APPLY X ("a""b")\r\n').value.atoms() == ["a", "b"]
    assert one(b"APPLY X ((a)(b))\r\n").value == List([["a"], ["b"]])
    assert one(b"APPLY X (a)\r\n").value == List(["a"])
    assert one(b"APPLY X %(K(a))\r\n").value.get_list("K").atoms() == ["a"]
    assert one(b"APPLY X (a%(b 1))\r\n").value[0].as_atom() == "a%"  # "a%" is an atom
    assert one(b"APPLY X ((x)%())\r\n").value[1] == KvList()
    # getastring() reads keys: a word starting with "%" is a key.
    assert one(b"APPLY X %(%x 1 \\Flag 2)\r\n").value.keys() == ["%x", "\\Flag"]
    # Atoms may hold what Cyrus accepts but would never print bare.
    assert one(b"APPLY X (a{1} b%c \x01\xff *)\r\n").value.atoms() == [
        "a{1}", "b%c", "\x01\udcff", "*"]


def test_quoted_strings_keep_their_escapes():
    line = one(b'APPLY X %(A "a\\"b" B "\\\\" C "tab\there" D "x y (z)")\r\n')
    kv = line.value
    assert kv.get_atom("A") == 'a"b' and kv.get_atom("B") == "\\"
    assert kv.get_atom("C") == "tab\there" and kv.get_atom("D") == "x y (z)"
    assert isinstance(kv["A"], Quoted)
    assert print_line(line) == b'APPLY X %(A "a\\"b" B "\\\\" C "tab\there" D "x y (z)")\r\n'


@pytest.mark.parametrize("data, items", [
    (b'APPLY X ("" "" "")\r\n', ["", "", ""]),
    (b'APPLY X (a "" b "")\r\n', ["a", "", "b", ""]),
    (b'APPLY X ("a "" b")\r\n', ["a ", " b"]),          # two strings side by side
    (b'APPLY X ("x" "" "y z" "")\r\n', ["x", "", "y z", ""]),
    (b'APPLY X (x "" "(" "")\r\n', ["x", "", "(", ""]),
    (b'APPLY X ("" x)\r\n', ["", "x"]),
    (b'APPLY X ("\\"" "")\r\n', ['"', ""]),
])
def test_quoted_strings_among_empty_ones(data, items, monkeypatch):
    line = one(data)
    assert line.value.atoms() == items
    # Strings side by side get the one space Cyrus would print between them.
    assert print_line(line) == data.replace(b'"a "" b"', b'"a " " b"')
    exact_only(monkeypatch)
    assert one(data) == line


def test_nil_flags_and_nested_lists():
    line = one(b"APPLY X %(A NIL B \"NIL\" C (\\Seen \\ $Kw) D ((()) %()))\r\n")
    kv = line.value
    assert kv["A"] is NIL and kv.get_atom("B") == "NIL"
    assert list(kv.get_list("C")) == [Flag("\\Seen"), Flag("\\"), Str("$Kw")]
    assert kv["D"] == List([[[]], KvList()])


def test_white_space_inside_lists_is_any_run_cyrus_accepts():
    data = b"APPLY X %(A\t1  B\r\n(a\n\x0bb\x0c)\r\n C 3 )\r\n"
    line = one(data)
    assert line.value == KvList(A=1, B=["a", "b"], C=3)
    # Re-printed with single spaces, as Cyrus prints.
    assert print_line(line) == b"APPLY X %(A 1 B (a b) C 3)\r\n"
    assert one(b"APPLY X\t y\r\n").value.as_atom() == "y"     # key and value: any white space


def test_bare_lf_line_ends_are_accepted_and_printed_as_crlf():
    lines = parse_all(b"GET USER a\nOK done\nEXIT\n")
    assert [print_line(l) for l in lines] == [b"GET USER a\r\n", b"OK done\r\n", b"EXIT\r\n"]


def test_many_lines_in_one_feed_and_one_line_in_many():
    data = b"".join([b"GET USER u%d\r\n" % i for i in range(50)]) + FILE_LINE
    assert len(parse_all(data)) == 51
    assert parse_chunked(data, [1]) == parse_all(data)


def test_banner_lines_are_text_until_star_ok():
    data = (b"* SASL PLAIN LOGIN\r\n* STARTTLS\r\n* COMPRESS DEFLATE\r\n* SIEVE-MAILBOX\r\n"
            b"* OK host Cyrus sync server 3.6.1\r\n* ENABLED (SIEVE-MAILBOX)\r\nOK success\r\n")
    lines = parse_all(data, banner=True)
    assert [l.is_dlist for l in lines] == [False] * 5 + [True, False]
    assert lines[0].text == b"SASL PLAIN LOGIN" and lines[5].value.atoms() == ["SIEVE-MAILBOX"]
    assert b"".join(print_line(l, "server") for l in lines) == data
    # Without banner mode, "* SASL PLAIN LOGIN" is not DLIST.
    with pytest.raises(DlistProtocolError):
        parse_all(b"* SASL PLAIN LOGIN\r\n")
    # Any other line ends the banner too.
    lines = parse_all(b"BAD IMAP_PROTOCOL_ERROR x\r\n* MISSING (a)\r\n", banner=True)
    assert lines[1].is_dlist


def test_file_literals_with_and_without_cr():
    line = one(FILE_LINE)
    (f,) = line.value
    assert isinstance(f, File) and f.body == BODY and f.guid == GUID.decode()
    assert line.corrupt_files == () and print_line(line) == FILE_LINE
    bare = FILE_LINE.replace(b"29}\r\n", b"29}\n")
    line = one(bare)
    assert line.value[0].body == BODY and print_line(line) == bare
    # A top-level file literal: GET FETCH's reply.
    data = b"* MESSAGE %{default " + GUID + b" 29}\r\n" + BODY + b"\r\n"
    assert one(data).value.body == BODY and print_line(one(data), "server") == data
    # Quoted partition, upper-case GUID.
    data = b'APPLY MESSAGE (%{"def ault" ' + GUID.upper() + b" 29}\r\n" + BODY + b")\r\n"
    line = one(data)
    assert line.value[0].partition == "def ault" and not line.corrupt_files


def test_several_files_separated_by_one_space():
    data = (b"APPLY MESSAGE (%{p " + GUID + b" 29}\r\n" + BODY + b" %{p " + GUID + b" 29}\r\n"
            + BODY + b")\r\n")
    line = one(data)
    assert [f.size for f in line.value] == [29, 29] and print_line(line) == data


def test_the_space_between_two_files_is_not_scanned(monkeypatch):
    calls = []
    real = dlist.parser.scan_region

    def counting(stack, text, base, max_depth):
        calls.append(text)
        return real(stack, text, base, max_depth)
    monkeypatch.setattr(dlist.parser, "scan_region", counting)
    files = b" ".join([b"%{p " + GUID + b" 29}\r\n" + BODY] * 3)
    line = one(b"APPLY MESSAGE (" + files + b")\r\n")
    assert len(line.value) == 3
    assert calls == [b"MESSAGE (", b")\r\n"]
    # other white space between files still goes through the scanner, which accepts it
    line = one(b"APPLY MESSAGE (%{p " + GUID + b" 29}\r\n" + BODY + b"\t %{p " + GUID
               + b" 29}\r\n" + BODY + b")\r\n")
    assert len(line.value) == 2


def test_inside_line_says_whether_a_line_is_unfinished():
    parser = Parser()
    assert not parser.inside_line
    parser.feed(b"NOOP\r\nAPPLY MESSAGE (%{p " + GUID + b" 29}\r\n" + BODY[:10])
    assert parser.inside_line                          # inside a file body
    parser.feed(BODY[10:])
    assert parser.inside_line                          # the list is still open
    parser.feed(b")\r\nGET US")
    assert parser.inside_line                          # a line without its LF yet
    parser.feed(b"ER x\r\n")
    assert not parser.inside_line
    assert [x.verb for x in iter(parser.next_line, None)] == ["NOOP", "APPLY", "GET"]


class RecordingSink:
    """A sink keeping its body "elsewhere" (here: in a list), as a blob store would."""

    made: ClassVar[list] = []

    def __init__(self, partition, guid, size):
        self.args = (partition, guid, size)
        self.chunks: list[bytes] = []
        self.verified = None
        RecordingSink.made.append(self)

    def write(self, data):
        assert type(data) is bytes
        self.chunks.append(data)

    def close(self, verified):
        assert self.verified is None, "closed twice"
        self.verified = verified


@pytest.fixture
def sinks():
    RecordingSink.made = []
    return RecordingSink.made


def test_file_bodies_stream_into_the_sink_as_they_arrive(sinks):
    parser = Parser(sink=RecordingSink)
    head = FILE_LINE.split(b"\r\n", 1)[0]
    parser.feed(head + b"\r\n" + BODY[:10])
    assert sinks[0].args == ("default", GUID.decode(), 29) and sinks[0].chunks == [BODY[:10]]
    parser.feed(BODY[10:20])
    assert b"".join(sinks[0].chunks) == BODY[:20] and sinks[0].verified is None
    parser.feed(BODY[20:])
    assert sinks[0].verified is True and parser.next_line() is None  # line not ended yet
    parser.feed(b")\r\n")
    line = parser.next_line()
    (f,) = line.value
    assert f.body is None and f.size == 29 and b"".join(sinks[0].chunks) == BODY
    # Printing a by-reference file needs its body from somewhere.
    with pytest.raises(ValueError):
        print_line(line)
    assert print_line(line, bodies=lambda f: BODY) == FILE_LINE


def test_a_body_that_does_not_match_its_guid_is_flagged(sinks):
    bad = FILE_LINE.replace(b"hi\r\n", b"ho\r\n")
    line = one(bad, sink=RecordingSink)
    assert sinks[0].verified is False
    assert [f.guid for f in line.corrupt_files] == [GUID.decode()]
    line = one(bad)                                          # the default sink keeps it
    assert line.corrupt_files[0].body == BODY.replace(b"hi", b"ho")


def test_end_of_stream_inside_a_body_closes_the_sink_unverified(sinks):
    parser = Parser(sink=RecordingSink)
    parser.feed(FILE_LINE[:FILE_LINE.index(b"\n") + 10])
    with pytest.raises(DlistProtocolError) as e:
        parser.feed_eof()
    assert sinks[0].verified is False and "more file literal bytes" in str(e.value)


def test_a_failing_sink_breaks_the_parser():
    class Full:
        def __init__(self, *args):
            pass

        def write(self, data):
            raise OSError("disk full")

        def close(self, verified):
            return None
    parser = Parser(sink=Full)
    with pytest.raises(OSError):
        parser.feed(FILE_LINE)
    with pytest.raises(DlistProtocolError):
        parser.feed(b"EXIT\r\n")


def test_sink_close_must_return_the_body_or_none():
    class Wrong:
        def __init__(self, *args):
            pass

        def write(self, data):
            pass

        def close(self, verified):
            return "text"
    with pytest.raises(TypeError):
        Parser(sink=Wrong).feed(FILE_LINE)
    sink = MemorySink()
    sink.write(b"ab")
    assert sink.close(True) == b"ab"


def test_a_long_line_arriving_in_chunks_is_scanned_once(monkeypatch):
    """Each byte is tokenized once, most of them before the line's LF arrives."""
    calls = []
    real = dlist.parser.scan_region

    def counting(stack, text, base, max_depth):
        calls.append((base, text))
        return real(stack, text, base, max_depth)
    monkeypatch.setattr(dlist.parser, "scan_region", counting)
    record = (b'%(UID 1 MODSEQ 2 FLAGS (\\Seen) GUID ' + GUID
              + b' ANNOTATIONS (%(ENTRY /x USERID "" VALUE "a \\" b") x:y))')
    data = (b'APPLY MAILBOX %(MBOXNAME x ACL "a\tb c\t" RECORD ('
            + b" ".join([record] * 5000) + b"))\r\n")
    parser = Parser()
    for i in range(0, len(data) - 1000, 1000):
        parser.feed(data[i:i + 1000])
    assert parser.next_line() is None
    ahead = sum(len(t) for _, t in calls)
    assert ahead > len(data) - 2 * dlist.parser.SCAN_AHEAD - 1000
    parser.feed(data[i + 1000:])
    line = parser.next_line()
    assert len(line.value.get_list("RECORD")) == 5000
    assert line.value.get_list("RECORD")[4999].get_list("ANNOTATIONS")[0].get_map("VALUE") == \
        b'a " b'
    assert len(calls) > 1
    start = len(b"APPLY ")
    assert [base for base, _ in calls] == list(
        itertools.accumulate([start] + [len(t) for _, t in calls[:-1]]))
    assert b"".join(t for _, t in calls) == data[start:]
    assert print_line(line) == data


def test_many_quoted_strings_with_spaces_stay_linear():
    # Annotation values such as "shared note" must be found in one pass.
    record = b'%(ENTRY /comment USERID "" MODSEQ 0 VALUE "shared note (x)")'
    data = b"APPLY X (" + b" ".join([record] * 20000) + b" \"a\tb\")\r\n"
    parser = Parser()
    parser.feed(data)
    line = parser.next_line()
    assert len(line.value) == 20001 and line.value[0].get_atom("VALUE") == "shared note (x)"
    assert line.value[-1].as_atom() == "a\tb" and print_line(line) == data


def test_nesting_to_the_limit_and_beyond():
    deep = b"APPLY X " + b"(" * 64 + b"a" + b")" * 64 + b"\r\n"
    assert print_line(one(deep)) == deep
    with pytest.raises(DlistProtocolError) as e:
        parse_all(deep.replace(b"(", b"((", 1).replace(b"a)", b"a))", 1))
    assert e.value.offset == len(b"APPLY X ") + 64
    deeper = b"APPLY X " + b"%(K " * 200 + b"v" + b")" * 200 + b"\r\n"
    line = one(deeper, limits=Limits(max_depth=200))
    assert print_line(line) == deeper
    with pytest.raises(ValueError):
        Limits(max_depth=201)


def test_the_exact_scanner_takes_over_from_the_fast_one(monkeypatch):
    data = b'APPLY X %(A "a b" B (1 2 \\Seen) C %() D "")\r\n'
    fast = one(data)
    exact_only(monkeypatch)
    assert one(data) == fast


def test_the_parser_stays_broken_after_an_error():
    parser = Parser()
    with pytest.raises(DlistProtocolError) as first:
        parser.feed(b"APPLY X (a))\r\n")
    with pytest.raises(DlistProtocolError) as again:
        parser.feed(b"EXIT\r\n")
    assert again.value is first.value
    with pytest.raises(DlistProtocolError):
        parser.feed_eof()


def test_feed_after_eof_is_a_usage_error():
    parser = Parser()
    parser.feed_eof()
    with pytest.raises(ValueError):
        parser.feed(b"EXIT\r\n")
    assert parser.next_line() is None
