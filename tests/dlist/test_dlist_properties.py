"""Property tests: whatever the printer writes, the parser reads back, in either role,
in any chunking, through either scanner and through the binary form."""
from __future__ import annotations

import hashlib
from unittest import mock

from dlist_testlib import parse_all, parse_chunked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlist.parser
import dlist.scan
from dlist import (
    DlistProtocolError,
    KvList,
    Line,
    Str,
    decode_line,
    decode_value,
    encode_line,
    encode_value,
    print_line,
    print_value,
)
from dlist.model import FILE, KVLIST, LIST, LITERAL, wrap

SETTINGS = settings(max_examples=75, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- nodes the printer may write ------------------------------------------------------------


def _chars(excluded: bytes) -> str:
    return bytes(b for b in range(256) if b not in excluded).decode("latin-1")


def _word(first: str, rest: str, max_size: int = 12):
    return st.builds(lambda a, b: (a + b).encode("latin-1"), st.sampled_from(first),
                     st.text(alphabet=rest, max_size=max_size))


_WS = b" \t\n\r\x0b\x0c"
_ATOM_REST = _chars(_WS + b'()"')
_atom = _word(_chars(_WS + b'()"{%\\'), _ATOM_REST).filter(lambda t: t != b"NIL")
_plain_atom = _word("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._/$&!^-",
                    "abcXYZ0129._/$&!^-").filter(lambda t: t != b"NIL")
_flag = _word("\\", _ATOM_REST, 8)
_qchar = st.sampled_from(_chars(b'"\\\r\n')).map(lambda c: c.encode("latin-1"))
_escape = st.sampled_from(_chars(b"\r\n")).map(lambda c: b"\\" + c.encode("latin-1"))
_quoted = st.lists(st.one_of(_qchar, _qchar, _escape), max_size=10).map(
    lambda parts: b'"' + b"".join(parts) + b'"')
_token = st.one_of(_plain_atom, _plain_atom, _atom, _flag, _quoted, st.just(b"NIL"),
                   st.just(b'""'))
_literal = st.binary(max_size=20).map(lambda b: (LITERAL, b))
_key = st.one_of(_plain_atom, _plain_atom, _atom, _flag, _quoted, st.just(b"NIL"),
                 st.just(b"%"), _word("%", _ATOM_REST, 5).filter(lambda t: t[1:2] not in b"({"),
                 st.binary(max_size=8).filter(lambda b: b"\0" not in b).map(lambda b: (LITERAL, b)))
_partition = st.one_of(_word(_chars(_WS + b'(){}"%\\'), _chars(_WS + b'(){}"'), 8),
                       _quoted.filter(lambda q: b"{" not in q and b"}" not in q))
_hex40 = st.text(alphabet="0123456789abcdefABCDEF", min_size=40, max_size=40)


@st.composite
def _file(draw):
    body = draw(st.binary(max_size=40))
    guid = hashlib.sha1(body).hexdigest() if draw(st.booleans()) else draw(_hex40)
    return (FILE, draw(_partition), guid.encode(), len(body), body, draw(st.booleans()))


_scalar = st.one_of(_token, _token, _token, _literal, _file())


def _containers(children):
    lists = st.lists(children, max_size=6).map(lambda items: (LIST, *items))
    kvlists = st.lists(st.tuples(_key, children), max_size=5).map(
        lambda pairs: (KVLIST, *[x for pair in pairs for x in pair]))
    return st.one_of(lists, kvlists)


nodes = st.recursive(_scalar, _containers, max_leaves=25)

_dlist_verb = st.sampled_from(["APPLY", "GET", "RESTORE", "apply", "Get", "*"])
_text_verb = st.text(alphabet="ABCDEOKNXYZabc0123+*_-", min_size=1, max_size=8).filter(
    lambda v: v.upper() not in ("APPLY", "GET", "RESTORE", "*"))
_text = st.one_of(st.none(), st.binary(max_size=30).filter(lambda b: b"\r" not in b
                                                           and b"\n" not in b))
lines = st.one_of(
    st.builds(lambda verb, key, value: Line._make(verb, key, value, None), _dlist_verb, _key, nodes),
    st.builds(lambda verb, text: Line._make(verb, None, None, text), _text_verb, _text))
roles = st.sampled_from(["client", "server"])


# -- properties --------------------------------------------------------------------------------

@SETTINGS
@given(st.lists(lines, min_size=1, max_size=4), roles)
def test_print_then_parse_gives_the_same_lines_and_bytes(items, role):
    data = b"".join(print_line(line, role) for line in items)
    parsed = parse_all(data)
    assert parsed == items
    assert b"".join(print_line(line, role) for line in parsed) == data


@SETTINGS
@given(st.lists(lines, min_size=1, max_size=3), roles,
       st.lists(st.integers(1, 50), min_size=1, max_size=8), st.sampled_from([None, 1, 4, 33]))
def test_any_chunking_gives_the_same_lines(items, role, sizes, ahead):
    data = b"".join(print_line(line, role) for line in items)
    whole = parse_all(data)
    with mock.patch.object(dlist.parser, "SCAN_AHEAD", ahead or dlist.parser.SCAN_AHEAD):
        assert parse_chunked(data, sizes) == whole


@SETTINGS
@given(lines, roles)
def test_text_to_binary_to_text_is_byte_identical(line, role):
    data = print_line(line, role)
    (parsed,) = parse_all(data)
    again = decode_line(encode_line(parsed))
    assert again == parsed and print_line(again, role) == data
    ref = decode_line(encode_line(parsed, files="ref"))
    assert print_line(ref, role, bodies=_bodies_of(parsed)) == data


def _bodies_of(line):
    """The bodies of a line's file literals, looked up by (GUID, size) like a blob store."""
    found = {}
    todo = [line.value.node] if line.value is not None else []
    while todo:
        node = todo.pop()
        if type(node) is tuple and node and node[0] in (LIST, KVLIST):
            todo.extend(node[1:])
        elif type(node) is tuple and node and node[0] == FILE:
            found[(node[2].decode().lower(), node[3])] = node[4]
    return lambda f: found[(f.guid, f.size)]


@SETTINGS
@given(lines, roles)
def test_the_exact_scanner_agrees_with_the_fast_one(line, role):
    data = print_line(line, role)
    fast = parse_all(data)
    real = dlist.scan._fast_region

    def bail(*args):
        raise dlist.scan._Bail
    dlist.scan._fast_region = bail
    try:
        assert parse_all(data) == fast
    finally:
        dlist.scan._fast_region = real


_space = st.sampled_from([b" ", b"  ", b"\t", b"\r\n", b"\n", b" \r\n\t", b"\x0b", b"\x0c"])


@st.composite
def _spaced(draw, node):
    """``node`` printed with random runs of white space between items, as Cyrus accepts."""
    if type(node) is tuple and node[0] in (LIST, KVLIST):
        parts = [draw(_spaced(x)) for x in node[1:]]
        out = b"(" if node[0] == LIST else b"%("
        if parts and draw(st.booleans()):
            out += draw(_space)                # white space after "(" is fine too
        for i, part in enumerate(parts):
            out += (draw(_space) if i else b"") + part
        return out + b")"
    if type(node) is tuple and node[0] == LITERAL:
        return b"{%d+}\r\n" % len(node[1]) + node[1]
    if type(node) is tuple and node[0] == FILE:
        return print_value(wrap(node))
    return node


@SETTINGS
@given(st.data(), _key, _containers(st.recursive(_scalar, _containers, max_leaves=10)))
def test_any_run_of_white_space_separates_items(data, key, node):
    line = Line._make("APPLY", key, node, None)
    key_text = key if type(key) is bytes else b"{%d+}\r\n" % len(key[1]) + key[1]
    text = b"APPLY " + key_text + b" " + data.draw(_spaced(node)) + b"\r\n"
    assert parse_all(text) == [line]


@SETTINGS
@given(st.binary(max_size=1100), roles)
def test_built_strings_come_back(data, role):
    (line,) = parse_all(print_line(Line("APPLY", "X", Str(data)), role))
    assert line.value.as_map() == data
    assert line.value == Str(data)


@SETTINGS
@given(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: "\0" not in k),
                       st.recursive(st.one_of(st.text(max_size=10), st.binary(max_size=10),
                                              st.integers(0, 2 ** 64 - 1), st.none()),
                                    lambda c: st.lists(c, max_size=4), max_leaves=10),
                       max_size=6))
def test_python_data_goes_out_and_comes_back(fields):
    value = KvList(fields)
    (line,) = parse_all(print_line(Line("APPLY", "X", value)))
    assert line.value == value
    for key, original in fields.items():
        if isinstance(original, int):
            assert line.value.get_num(key) == original
        elif isinstance(original, str):
            assert line.value.get_map(key) == original.encode("utf-8", "surrogateescape")


@SETTINGS
@given(nodes)
def test_values_round_trip_through_the_binary_form(node):
    assert decode_value(encode_value(wrap(node))).node == node


@SETTINGS
@given(st.binary(min_size=1, max_size=30))
def test_single_tokens_print_only_when_well_formed(token):
    # Whatever bytes a (decoded) token holds, the printer either writes it as
    # the parser will read it back, or refuses it.
    line = Line._make("APPLY", b"K", (LIST, token), None)
    try:
        data = print_line(line)
    except DlistProtocolError:
        return
    assert parse_all(data) == [line]
