"""The binary (msgpack) form: lossless, versioned, files inline or by reference, hostile input."""
from __future__ import annotations

import hashlib

import msgpack
import pytest
from dlist_testlib import parse_all

from dlist import (
    FORMAT_VERSION,
    NIL,
    DlistProtocolError,
    File,
    Flag,
    KvList,
    Line,
    List,
    Literal,
    Quoted,
    Str,
    decode_line,
    decode_value,
    encode_line,
    encode_value,
    print_line,
)
from dlist.model import LIST

BODY = b"hello\r\n"
GUID = hashlib.sha1(BODY).hexdigest()


def test_values_round_trip():
    value = KvList(A=Str("x y"), B=Literal(b"\0\xff"), C=NIL, D=Flag("\\Seen"),
                   E=[1, [], KvList()], F=File("default", GUID, body=BODY), G=Quoted("q"))
    assert decode_value(encode_value(value)) == value


def test_text_to_binary_to_text_is_byte_identical():
    data = (b'APPLY X %(A "a\\"b" B {3+}\r\na\0b C (\\Seen $x) D %{p ' + GUID.encode()
            + b" 7}\n" + BODY + b" E NIL)\r\n")
    (line,) = parse_all(data)
    again = decode_line(encode_line(line))
    assert again == line and print_line(again) == data


def test_text_lines_round_trip():
    for line in (Line("OK", text="success"), Line("EXIT"), Line("", text=None)):
        assert decode_line(encode_line(line)) == line


def test_files_by_reference_or_inline():
    line = Line("APPLY", "MESSAGE", [File("default", GUID, body=BODY)] * 2)
    inline = decode_line(encode_line(line))
    assert [f.body for f in inline.value] == [BODY, BODY]
    ref = decode_line(encode_line(line, files="ref"))
    assert [(f.guid, f.size, f.body) for f in ref.value] == [(GUID, 7, None)] * 2
    assert len(encode_line(line, files="ref")) < len(encode_line(line))
    assert print_line(ref, bodies=lambda f: BODY) == print_line(line)
    # Nested deeper, and a value on its own.
    value = KvList(X=[[File("p", GUID, body=BODY)]], Y="unchanged")
    assert decode_value(encode_value(value, files="ref")).get_list("X")[0][0].body is None
    with pytest.raises(ValueError):
        encode_value(value, files="none")


def test_the_blob_starts_with_its_version():
    blob = msgpack.unpackb(encode_line(Line("EXIT")))
    assert blob[0] == FORMAT_VERSION == 1
    assert msgpack.unpackb(encode_value(Str("x"))) == [1, 0, b"x"]


@pytest.mark.parametrize("blob", [
    b"", b"\xc1", b"\x93", msgpack.packb([2, 1, b"EXIT", None, None, None]),
    msgpack.packb([1, 0, b"x"]) + b"extra", msgpack.packb({"a": 1}), msgpack.packb("str"),
    msgpack.packb([1, 1, "EXIT", None, None, None]), msgpack.packb([1, 1, b"EXIT"]),
    msgpack.packb([1, 1, b"X", b"k", None, None]), msgpack.packb([1, 1, b"X", None, None, 5]),
    msgpack.packb([1, 1, b"X", b"k", b"v", b"t"]), msgpack.packb([1, 1, b"X", 5, b"v", None]),
    msgpack.packb(["1", 1]), msgpack.packb([1]), msgpack.packb(5),
    msgpack.packb([1, 1, b"X", b"k", [LIST, {"a": 1}], None]),
    msgpack.packb([1, 1, b"X", b"k", msgpack.ExtType(1, b"x"), None]),
])
def test_malformed_line_blobs(blob):
    with pytest.raises(DlistProtocolError):
        decode_line(blob)


@pytest.mark.parametrize("blob", [
    msgpack.packb([1, 1, b"EXIT", None, None, None]),  # a line, not a value
    msgpack.packb([1, 0, None]), msgpack.packb([1, 0, 5]), msgpack.packb([1, 0, b""]),
    msgpack.packb([1, 0, [9]]), msgpack.packb([1, 0, b"x", b"y"]),
])
def test_malformed_value_blobs(blob):
    with pytest.raises(DlistProtocolError):
        decode_value(blob)


def test_deeper_nodes_are_checked_when_used():
    blob = msgpack.packb([1, 0, [LIST, b"fine", b"not fine", 5, [LIST, None]]])
    value = decode_value(blob)
    assert isinstance(value, List) and value[0].as_atom() == "fine"
    with pytest.raises(DlistProtocolError):
        value[2]
    with pytest.raises(DlistProtocolError):
        list(value[3])
    line = decode_line(msgpack.packb([1, 1, b"APPLY", b"X", [LIST, b"a b"], None]))
    with pytest.raises(DlistProtocolError):
        print_line(line)


def test_hostile_nesting_in_a_blob():
    data = b"\x92\x01" * 5000 + b"\xc0"
    with pytest.raises(DlistProtocolError):
        decode_value(msgpack.packb([1, 0, None])[:-1] + data)


def test_malformed_nodes_still_have_a_repr():
    value = decode_value(msgpack.packb([1, 0, [LIST, b"ok", 5, [2, b"k", None]]]))
    assert "malformed" in repr(value)
    line = decode_line(msgpack.packb([1, 1, b"APPLY", b"X", [2, 7, b"v"], None]))
    assert "malformed" in repr(line)
    assert line.key_node == b"X" and line.is_dlist
