"""Values: Cyrus's printer choice for built strings, Cyrus's lazy conversions, lookups."""
from __future__ import annotations

import pytest

from dlist import (
    NIL,
    Atom,
    DlistProtocolError,
    File,
    Flag,
    Guid,
    Hex,
    KvList,
    Line,
    List,
    Literal,
    Nil,
    Num,
    Quoted,
    Str,
    Value,
    kvlist,
    print_value,
)
from dlist.model import KVLIST, LIST, LITERAL, wrap

GUID = "4b3b60197aa452f8d53a050ef64669e72b554efd"


@pytest.mark.parametrize("text, wire", [
    ("user.test", b"user.test"),
    ("", b'""'),
    ("NIL", b'"NIL"'),                       # the atom NIL would mean nil
    ("a b", b'"a b"'),
    ("test\tlrs\t", b'"test\tlrs\t"'),       # ACLs: TAB is fine inside quotes
    ("*", b'"*"'), ("{", b'"{"'), ("(x)", b'"(x)"'), ("\x7f", b'"\x7f"'),
    ("\x1f", b"\x1f"),                       # imparse_isatom allows 0x1f (it tests < 0x1f)
    ("\x1e", b'"\x1e"'),
    ("\\Sent", b"{5+}\r\n\\Sent"),           # no backslash escapes: a literal
    ("50%", b"{3+}\r\n50%"), ('say "hi"', b'{8+}\r\nsay "hi"'),
    ("caf\u00e9", b"{5+}\r\ncaf\xc3\xa9"),   # 8-bit
    ("a\0b", b"{3+}\r\na\0b"), ("a\r\nb", b"{4+}\r\na\r\nb"),
    ("x" * 1023, b"x" * 1023),
    ("x" * 1024, b"{1024+}\r\n" + b"x" * 1024),
    ("x " * 511 + "x", b'"' + b"x " * 511 + b'x"'),
    ("x " * 512, b"{1024+}\r\n" + b"x " * 512),
])
def test_str_takes_the_form_cyrus_prints(text, wire):
    value = Str(text)
    assert isinstance(value, Str)
    assert print_value(value, "client") == wire
    assert value.data == text.encode()


def test_str_forms_and_roles():
    assert type(Str("a")) is Atom and type(Str("a b")) is Quoted and type(Str("\\")) is Literal
    assert print_value(Str("\\"), "server") == b"{1}\r\n\\"
    assert Str(b"raw\xff") == Literal(b"raw\xff")


def test_builders_for_each_form():
    assert Atom("a{b").node == b"a{b"                  # the parser is liberal, so is Atom
    assert Quoted("a b").node == b'"a b"' and Quoted("").node == b'""'
    assert Literal("x").node == (LITERAL, b"x")
    assert Num(0).node == b"0" and Num(2 ** 64 - 1).node == b"18446744073709551615"
    assert Hex(0xabc).node == b"0000000000000abc"
    assert Guid(GUID.upper()).node == GUID.encode()
    assert Flag("\\Seen").node == b"\\Seen" and Flag("\\Seen").name == "\\Seen"
    assert isinstance(Num(5), Atom) and Num(5) == Atom("5")
    assert Nil() is NIL and wrap(b"NIL") is NIL and repr(NIL) == "NIL"


@pytest.mark.parametrize("build", [
    lambda: Atom("a b"), lambda: Atom(""), lambda: Atom("NIL"), lambda: Atom("(x"),
    lambda: Atom("%x"), lambda: Atom('"x'), lambda: Quoted('a"b'), lambda: Quoted("a\\b"),
    lambda: Quoted("a\nb"), lambda: Num(-1), lambda: Num(2 ** 64), lambda: Num(True),
    lambda: Hex(-1), lambda: Guid("abc"), lambda: Guid("g" * 40), lambda: Flag("Seen"),
    lambda: Flag("\\Se en"), lambda: File("default", GUID, 3, b"ab"),
    lambda: File("a b\\", GUID, 1), lambda: File("default", GUID, -1), lambda: File("{", GUID, 1),
    lambda: KvList({"a\0": 1}),
])
def test_builders_refuse_what_cannot_be_sent(build):
    with pytest.raises(ValueError):
        build()


def test_value_is_abstract_and_python_data_converts():
    with pytest.raises(TypeError):
        Value()
    with pytest.raises(TypeError):
        List([object()])
    with pytest.raises(TypeError):
        List([True])
    value = KvList(A="x y", B=5, C=None, D=[1, "two", (3,)], E={"F": b"g"})
    assert print_value(value) == b'%(A "x y" B 5 C NIL D (1 two (3)) E %(F g))'


def test_kvlist_builds_from_pairs_mapping_and_keywords():
    a = KvList([("UID", 1), ("FLAGS", [Flag("\\Seen")])], SIZE=10)
    b = kvlist({"UID": 1, "FLAGS": [Flag("\\Seen")]}, SIZE=10)
    assert a == b
    assert print_value(a) == b"%(UID 1 FLAGS (\\Seen) SIZE 10)"
    assert KvList().node == (KVLIST,)


@pytest.mark.parametrize("wire, num", [
    (b"0", 0), (b"0123", 123), (b"18446744073709551615", 2 ** 64 - 1), (b'"42"', 42),
    ((LITERAL, b"42"), 42),
])
def test_numbers_are_atoms_of_decimal_digits(wire, num):
    assert wrap(wire).as_num() == num
    assert wrap(wire).as_date() == num


@pytest.mark.parametrize("wire", [
    b"18446744073709551616", b"-1", b"+1", b"1.5", b"12a", b'""', b"\\Seen", b"NIL", b" 1",
    (LIST, b"1"), (LITERAL, b"1 "),
])
def test_not_numbers(wire):
    with pytest.raises(DlistProtocolError):
        wrap(wire).as_num()


def test_num32_truncates_like_cyrus():
    assert Num(2 ** 32 + 7).as_num32() == 7


@pytest.mark.parametrize("wire, value", [
    (b"ff", 255), (b"FF", 255), (b"0000000000000abc", 0xabc), (b"ffffffffffffffff", 2 ** 64 - 1),
    (b"00000000000000000001", 1),  # Cyrus's parsehex only fails on overflow, not length
])
def test_hex(wire, value):
    assert wrap(wire).as_hex() == value


@pytest.mark.parametrize("wire", [b"1ffffffffffffffff", b"xyz", b'""', b"NIL", b"\\ff"])
def test_not_hex(wire):
    with pytest.raises(DlistProtocolError):
        wrap(wire).as_hex()


def test_guids():
    assert Atom(GUID.upper()).as_guid() == GUID
    assert Quoted(GUID).as_guid() == GUID
    for bad in (GUID[:-1], GUID + "0", "z" * 40):
        with pytest.raises(DlistProtocolError):
            Atom(bad).as_guid()


def test_strings_and_nil():
    assert NIL.as_atom() is None and NIL.as_map() is None
    assert Atom("x").as_atom() == "x" and Flag("\\Seen").as_atom() == "\\Seen"
    assert wrap(b'"a\\"b\\\\c"').as_atom() == 'a"b\\c'  # escapes are undone
    assert wrap(b'"a\\"b"').node == b'"a\\"b"'       # ... but kept for printing
    assert Literal(b"a\0b").as_map() == b"a\0b"
    with pytest.raises(DlistProtocolError):
        Literal(b"a\0b").as_atom()                    # dlist_toatom refuses NUL
    assert Str("caf\u00e9").as_atom() == "caf\u00e9"
    assert Literal(b"\xff").as_atom() == "\udcff"     # undecodable bytes survive
    with pytest.raises(DlistProtocolError):
        List([]).as_atom()


def test_kvlist_lookup_keeps_order_unknown_and_duplicate_keys():
    kv = wrap((KVLIST, b"UID", b"1", b"X-NEW", b"y", b"UID", b"2", b'"Q K"', b"3",
               (LITERAL, b"LIT"), b"4"))
    assert kv.keys() == ["UID", "X-NEW", "UID", "Q K", "LIT"]
    assert kv.get_num("UID") == 1                     # the first of duplicate keys
    assert [v.as_atom() for k, v in kv.items() if k == "UID"] == ["1", "2"]
    assert kv.get_atom("X-NEW") == "y" and "X-NEW" in kv and b"X-NEW" in kv
    assert kv.get_num("Q K") == 3 and kv.get_num("LIT") == 4
    assert "MISSING" not in kv and 3 not in kv
    assert kv.get("MISSING") is None and kv.get_num("MISSING", default=9) == 9
    assert len(kv) == 5 and list(kv) == kv.keys() and len(kv.values()) == 5
    with pytest.raises(KeyError):
        kv["MISSING"]
    with pytest.raises(DlistProtocolError, match="missing key"):
        kv.get_num("MISSING")
    with pytest.raises(DlistProtocolError, match="X-NEW"):
        kv.get_num("X-NEW")


def test_typed_getters():
    kv = KvList(L=[1, 2], K={"A": 1}, F=File("default", GUID, body=b"x" * 3), H=Hex(10),
                G=Guid(GUID), D=1690000000, N=None)
    assert kv.get_list("L").atoms() == ["1", "2"] and kv.get_kvlist("K").get_num("A") == 1
    assert kv.get_file("F").size == 3 and kv.get_hex("H") == 10 and kv.get_guid("G") == GUID
    assert kv.get_date("D") == 1690000000 and kv.get_atom("N") is None
    for getter in ("get_list", "get_kvlist", "get_file"):
        with pytest.raises(DlistProtocolError):
            getattr(kv, getter)("D")


def test_list_is_a_sequence():
    items = List(["a", 2, None, [3]])
    assert len(items) == 4 and items[0] == Atom("a") and items[-1] == List([3])
    assert items[2] is NIL and List(["a", 2, None]).atoms() == ["a", "2", None]
    with pytest.raises(IndexError):
        items[4]
    with pytest.raises(TypeError):
        items["a"]
    assert repr(List(["a"])) == "List([Atom(b'a')])"


def test_file_values():
    f = File("default", GUID.upper(), body=b"abc")
    assert (f.partition, f.guid, f.size, f.body) == ("default", GUID, 3, b"abc")
    ref = f.without_body()
    assert ref.body is None and ref.size == 3 and ref != f and ref.with_body(b"abc") == f
    with pytest.raises(ValueError):
        ref.with_body(b"ab")
    assert "3 bytes" in repr(f)
    assert print_value(f) == b"%{default " + GUID.encode() + b" 3}\r\nabc"


@pytest.mark.parametrize("node", [
    b"", 5, None, 1.5, (), (9, b"x"), (LITERAL,), (LITERAL, "str"), (KVLIST, b"k"),
    (4, b"p", b"g", 1), [LIST, b"x"],
])
def test_wrap_refuses_what_is_not_a_node(node):
    with pytest.raises(DlistProtocolError):
        wrap(node)


def test_values_compare_by_wire_form():
    assert Str("x") == Atom("x") and hash(Str("x")) == hash(Atom("x"))
    assert Quoted("x") != Atom("x")                   # different bytes on the wire
    assert Str("x") != "x"
    assert {Num(1), Atom("1")} == {Num(1)}


def test_lines():
    line = Line("APPLY", "MAILBOX", KvList(UNIQUEID="u1", MBOXNAME="user.test"))
    assert line.is_dlist and line.key == "MAILBOX" and line.text is None
    assert line.value.get_atom("MBOXNAME") == "user.test" and line.corrupt_files == ()
    assert Line("OK", text="success").text == b"success" and not Line("EXIT").is_dlist
    assert Line("APPLY", "X", "y") == Line("APPLY", Atom("X"), Atom("y"))
    assert Line("GET", "USER", "x") != Line("GET", "USER", "y")
    assert len({Line("EXIT"), Line("EXIT")}) == 1
    assert "MAILBOX" in repr(line) and "success" in repr(Line("OK", text="success"))
    for bad in (lambda: Line("APPLY", "X"), lambda: Line("APPLY", value="y"),
                lambda: Line("AP PLY", "X", "y"), lambda: Line("OK", text="a\r\nb"),
                lambda: Line("", "X", "y"), lambda: Line("", text="x"),
                lambda: Line("APPLY", "X", "y", text="z")):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        Line("APPLY", List([]), "y")
