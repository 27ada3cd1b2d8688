"""Malformed input: always DlistProtocolError, at the absolute offset where the bytes went wrong."""
from __future__ import annotations

import hashlib

import pytest
from dlist_testlib import parse_all, parse_chunked

from dlist import DlistProtocolError, Limits, Parser

GUID = hashlib.sha1(b"abc").hexdigest().encode()
PREFIX = b"GET USER a\r\n"  # offsets are absolute: errors after a first line count it too


def error(data: bytes, **kwargs) -> DlistProtocolError:
    with pytest.raises(DlistProtocolError) as e:
        parse_all(data, **kwargs)
    # Fed a byte at a time, the parser fails the same way.
    with pytest.raises(DlistProtocolError) as again:
        parse_chunked(data, [1], **kwargs)
    assert (again.value.offset, again.value.message) == (e.value.offset, e.value.message)
    return e.value


@pytest.mark.parametrize("data, offset, words", [
    # truncated: the stream ends inside a line, a literal, a file literal
    (b"APPLY X (a b", 12, "stream ended"),
    (b"APPLY X {5+}\r\nab", 16, "3 more literal bytes"),
    (b"APPLY MESSAGE (%{p " + GUID + b" 3}\r\na", 65, "2 more file literal bytes"),
    (b"EXIT", 4, "stream ended"),
    (b"APPLY X (a\r\n b\r\n", 16, "stream ended"),
    # bad literal headers and lengths
    (b"APPLY X {x}\r\n", 8, "literal header"),
    (b"APPLY X {-1}\r\n", 8, "literal header"),
    (b"APPLY X ({3}x)\r\n", 9, "literal header"),          # not followed by CRLF
    (b"APPLY X {3}\nabc\r\n", 8, "literal header"),        # LF without CR: not a literal
    (b"APPLY X {2147483648}\r\n", 8, "too big"),            # beyond Cyrus's getint32
    (b"APPLY X {\r\n", 8, "literal header"),
    (b"APPLY X %{p zz 3}\r\nabc\r\n", 12, "GUID"),
    (b"APPLY X %{p " + GUID + b" 4294967296}\r\n", 8, "too big"),
    (b"APPLY X (%{p " + GUID + b" 3} x)\r\n", 9, "file literal header"),
    (b'APPLY X (%{"{" ' + GUID + b" 3}\r\nabc)\r\n", 9, "file literal header"),  # no braces
    # unbalanced parens and misplaced pieces
    (b"APPLY X (a))\r\n", 11, "unbalanced"),
    (b"APPLY X )\r\n", 8, "unbalanced"),
    (b"APPLY X %(A)\r\n", 11, "key without a value"),
    (b"APPLY X %((a) b)\r\n", 10, "cannot be a key"),
    (b"APPLY X %(%(a) b)\r\n", 10, "cannot be a key"),
    (b"APPLY X %(%{p " + GUID + b" 3}\r\nabc 1)\r\n", 10, "file literal cannot be a key"),
    (b"APPLY X %({1}\r\n\0 v)\r\n", 10, "NUL"),
    (b"APPLY X a b\r\n", 10, "after the line's value"),
    (b"APPLY X (a) b\r\n", 12, "after the line's value"),
    (b"APPLY X a {1}\r\nb\r\n", 10, "after the line's value"),
    (b"APPLY X a \r\n", 9, "white space before the end"),
    (b"APPLY X a\r\r\n", 9, "white space before the end"),
    (b"APPLY X\r\n", 7, "before its value"),
    (b"APPLY  X y\r\n", 6, "missing key"),
    (b"APPLY \r\n", 6, "missing key"),
    (b"APPLY (a) b\r\n", 6, "cannot be a key"),
    # garbage
    (b'APPLY X "abc\r\n', 8, "unterminated quoted"),
    (b'APPLY X "a\\\nb"\r\n', 8, "unterminated quoted"),       # no escaped LF (Cyrus takes it)
    (b"APPLY X %y\r\n", 8, "must be followed by '('"),
    (b"APPLY X (% (a))\r\n", 9, "must be followed by '('"),
    (b"APPLY X (a %)\r\n", 11, "must be followed by '('"),
])
def test_malformed_input(data, offset, words):
    e = error(data)
    assert words in str(e)
    assert e.offset == offset, str(e)
    # The same mistake after a good line is reported at its absolute offset.
    assert error(PREFIX + data).offset == offset + len(PREFIX)


def test_every_error_says_what_was_expected():
    e = error(b"APPLY X (a))\r\n")
    assert e.expected and "expected" in str(e) and "at byte 11" in str(e)


@pytest.mark.parametrize("limits, data, offset", [
    (Limits(max_line=40), b"APPLY X " + b"a" * 100 + b"\r\n", 40),
    (Limits(max_line=40), b"OK " + b"a" * 100 + b"\r\n", 40),
    (Limits(max_line=40), b"OK " + b"a" * 100, 40),                         # no LF yet
    (Limits(max_line=40), b"APPLY X (a\r\n" + b"b " * 30 + b")\r\n", 40),  # over several lines
    (Limits(max_line=40), b"APPLY X {30+}\r\n" + b"x" * 30 + b"\r\n", 40),   # literals count
    (Limits(max_literal=5), b"APPLY X {6+}\r\nabcdef\r\n", 8),
    (Limits(max_depth=3), b"APPLY X (((( a))))\r\n", 11),
    (Limits(max_file=2), b"APPLY MESSAGE (%{p " + GUID + b" 3}\r\nabc)\r\n", 15),
    (Limits(max_line=80), b"APPLY MESSAGE (%{p " + GUID + b" 30}\r\n" + b"x" * 30 + b")\r\n", 80),
])
def test_limits(limits, data, offset):
    e = error(data, limits=limits)
    assert e.offset == offset and "limits." in str(e), str(e)


def test_file_bodies_in_a_callers_sink_do_not_count_against_the_line():
    class Drop:
        def __init__(self, *args):
            pass

        def write(self, data):
            pass

        def close(self, verified):
            return None
    data = b"APPLY MESSAGE (%{p " + GUID + b" 300}\r\n" + b"x" * 300 + b")\r\n"
    assert parse_all(data, limits=Limits(max_line=80), sink=Drop)


def test_hostile_nesting_is_cut_off_early():
    parser = Parser()
    with pytest.raises(DlistProtocolError) as e:
        parser.feed(b"APPLY X " + b"(" * 1_000_000 + b"\r\n")
    assert e.value.offset == 8 + 64


@pytest.mark.parametrize("field", ["max_line", "max_literal", "max_depth", "max_file"])
def test_limits_must_be_positive(field):
    with pytest.raises(ValueError):
        Limits(**{field: 0})
