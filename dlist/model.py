"""DLIST values: typed views over compact nodes that keep what the wire said.

Every value is stored as a *node*, the one representation shared by the text
parser, the printer and the binary codec:

* a token, ``bytes``, exactly as it appears on the wire: an atom
  (``user.test``, ``42``), a flag (``\\Seen``), a quoted string with its
  quotes and any backslash escapes (``"a b"``), or ``NIL``;
* ``(LITERAL, data)`` for a ``{n}`` literal (binary-safe);
* ``(FILE, partition, guid, size, body, bare_lf)`` for a ``%{...}`` file
  literal; ``partition``/``guid`` are tokens, ``body`` is ``bytes`` or ``None``
  (the body lives elsewhere, e.g. in a blob store), ``bare_lf`` is true when
  the header ended in LF without CR;
* ``(LIST, item, ...)`` and ``(KVLIST, key, value, key, value, ...)``, keys
  being tokens or literal nodes.

Keeping tokens raw is what makes re-printing byte-identical and parsing cheap;
conversions happen lazily in the accessors, with Cyrus's rules (``dlist.c``):
a number is an atom (or string) of decimal digits, a date is a number, a GUID
is exactly 40 hex digits, and lookups by key return the first match and leave
unknown keys alone.

The classes below are the public face: :func:`wrap` gives the view for a node,
and the constructors build nodes the way Cyrus's printer would
(``Str("a b")`` is the quoted string ``"a b"``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .errors import DlistProtocolError

# Node tags: element 0 of a tuple node.  They are also the tags of the binary
# format (dlist.binary), so they must never be renumbered.
LIST = 1
KVLIST = 2
LITERAL = 3
FILE = 4

NIL_TOKEN = b"NIL"
EMPTY_QUOTED = b'""'

# imparse_isatom(): what Cyrus prints bare.  0x1f itself is allowed (Cyrus
# tests `< 0x1f`); NIL is excluded separately; 1023 bytes at most.
_NOT_ATOM = re.compile(rb'[^\x1f-\x7e]|[ {()"%*\\]')
# prot_printstring()'s QCHAR: what Cyrus prints between double quotes, never
# escaping anything.  NUL is excluded because Cyrus strings are C strings.
_NOT_QCHAR = re.compile(rb'[^\x01-\x7f]|[\r\n"%\\]')
_MAX_BARE = 1024  # atoms and quoted strings are shorter than this (MAXQSTRING)

# What the parser accepts as an atom in value position (getxstring is liberal:
# anything up to white space, parens or a double quote).
_ATOM_TOKEN = re.compile(rb'[^\s()"{%\\][^\s()"]*')
_FLAG_TOKEN = re.compile(rb'\\[^\s()"]*')
_QUOTED_TOKEN = re.compile(rb'"((?:[^"\\\r\n]|\\[^\r\n])*)"')
_UNESCAPE = re.compile(rb'\\(.)', re.DOTALL)
_HEX = re.compile(rb'[0-9a-fA-F]+')
_GUID = re.compile(rb'[0-9a-fA-F]{40}')

_MAX_U64 = 2 ** 64 - 1


def decode_text(data: bytes) -> str:
    """Bytes from the wire as ``str``: UTF-8, with undecodable bytes kept (surrogateescape)."""
    return data.decode("utf-8", "surrogateescape")


def encode_text(text: str | bytes | bytearray | memoryview) -> bytes:
    """The inverse of :func:`decode_text`; bytes-like input is taken as is."""
    if isinstance(text, str):
        return text.encode("utf-8", "surrogateescape")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def string_node(data: bytes) -> bytes | tuple:
    """The node Cyrus's printer (prot_printastring) would send for ``data``.

    Atom when imparse_isatom() allows it and it is not ``NIL``; ``""`` when
    empty; quoted when every byte is a QCHAR and it is shorter than 1024
    bytes; a literal otherwise.  Never a backslash escape.
    """
    n = len(data)
    if n == 0:
        return EMPTY_QUOTED
    if n < _MAX_BARE:
        if _NOT_ATOM.search(data) is None and data != NIL_TOKEN:
            return data
        if _NOT_QCHAR.search(data) is None:
            return b'"' + data + b'"'
    return (LITERAL, data)


def _malformed(what: str, node: Any) -> DlistProtocolError:
    shown = repr(node)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return DlistProtocolError(f"malformed DLIST value {shown}", expected=what)


def _kind(node: Any) -> str:
    """A short name for what a node is, for error messages."""
    if type(node) is bytes:
        if node == NIL_TOKEN:
            return "NIL"
        if node[:1] == b'"':
            return "quoted string"
        if node[:1] == b"\\":
            return "flag"
        return "atom"
    if type(node) is tuple and node:
        return {LIST: "list", KVLIST: "kvlist", LITERAL: "literal", FILE: "file literal"}.get(
            node[0], "unknown node")
    return "unknown node"


def _unquote(token: bytes) -> bytes:
    if token == EMPTY_QUOTED:
        return b""
    m = _QUOTED_TOKEN.fullmatch(token)
    if m is None:
        raise _malformed("a quoted string", token)
    inner = m.group(1)
    return _UNESCAPE.sub(rb"\1", inner) if b"\\" in inner else inner


def node_map(node: Any) -> bytes | None:
    """Cyrus's dlist_tomap(): the bytes of a string-like value (NUL allowed), None for NIL."""
    if type(node) is bytes:
        if not node:
            raise _malformed("a string", node)
        if node[0] == 34:  # '"'
            return _unquote(node)
        if node == NIL_TOKEN:
            return None
        return node
    if type(node) is tuple and len(node) == 2 and node[0] == LITERAL and type(node[1]) is bytes:
        return node[1]
    raise DlistProtocolError(f"found a {_kind(node)}", expected="a string")


def node_atom(node: Any) -> str | None:
    """Cyrus's dlist_toatom(): a string-like value without NUL bytes, None for NIL."""
    data = node_map(node)
    if data is None:
        return None
    if b"\0" in data:
        raise DlistProtocolError("string contains a NUL byte", expected="a string without NUL")
    return decode_text(data)


def _numeric(node: Any, what: str) -> bytes:
    # dlist_tonum64/tohex64 accept DL_ATOM and DL_BUF only: atoms, quoted
    # strings and literals, but neither flags nor NIL.
    if type(node) is bytes and node[:1] != b"\\" and node != NIL_TOKEN:
        return node_map(node)
    if type(node) is tuple and len(node) == 2 and node[0] == LITERAL and type(node[1]) is bytes:
        return node[1]
    raise DlistProtocolError(f"found a {_kind(node)}", expected=what)


def node_num(node: Any) -> int:
    """Cyrus's dlist_tonum64(): decimal digits only, at most 2**64-1."""
    data = _numeric(node, "a number")
    if not data.isdigit():
        raise DlistProtocolError(f"{data[:40]!r} is not a number", expected="decimal digits")
    value = int(data)
    if value > _MAX_U64:
        raise DlistProtocolError(f"number {value} does not fit 64 bits", expected="a 64-bit number")
    return value


def node_hex(node: Any) -> int:
    """Cyrus's dlist_tohex64(): hex digits (either case), at most 2**64-1."""
    data = _numeric(node, "a hex number")
    if _HEX.fullmatch(data) is None:
        raise DlistProtocolError(f"{data[:40]!r} is not a hex number", expected="hex digits")
    value = int(data, 16)
    if value > _MAX_U64:
        raise DlistProtocolError(f"hex number {data[:40]!r} does not fit 64 bits",
                                 expected="a 64-bit hex number")
    return value


def node_guid(node: Any) -> str:
    """Cyrus's dlist_toguid(): exactly 40 hex digits, returned in lower case."""
    data = _numeric(node, "a GUID")
    if _GUID.fullmatch(data) is None:
        raise DlistProtocolError(f"{data[:50]!r} is not a GUID", expected="40 hex digits")
    return data.decode("ascii").lower()


def wrap(node: Any) -> Value:
    """The typed view of a node.  Raises DlistProtocolError for anything that is not a node."""
    t = type(node)
    if t is bytes:
        if not node:
            raise _malformed("a token", node)
        c = node[0]
        if c == 34:
            cls = Quoted
        elif c == 92:
            cls = Flag
        elif node == NIL_TOKEN:
            return NIL
        else:
            cls = Atom
    elif t is tuple and node:
        tag = node[0]
        n = len(node)
        if tag == LIST:
            cls = List
        elif tag == KVLIST and n & 1:
            v = object.__new__(KvList)
            v.node = node
            v._index = None
            return v
        elif tag == LITERAL and n == 2 and type(node[1]) is bytes:
            cls = Literal
        elif tag == FILE and n == 6 and type(node[1]) is bytes and type(node[2]) is bytes \
                and type(node[3]) is int and (node[4] is None or type(node[4]) is bytes):
            cls = File
        else:
            raise _malformed("a DLIST node", node)
    else:
        raise _malformed("a DLIST node", node)
    v = object.__new__(cls)
    v.node = node
    return v


def to_node(value: Any) -> Any:
    """The node for a Python value: Value -> its node, str/bytes -> Str, int -> Num,
    None -> NIL, list/tuple -> List, Mapping -> KvList."""
    if isinstance(value, Value):
        return value.node
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return string_node(encode_text(value))
    if isinstance(value, bool):
        raise TypeError("a bool is not a DLIST value; use 0/1 or a string")
    if isinstance(value, int):
        return Num(value).node
    if value is None:
        return NIL_TOKEN
    if isinstance(value, Mapping):
        return KvList(value).node
    if isinstance(value, (list, tuple)):
        return (LIST, *map(to_node, value))
    raise TypeError(f"cannot make a DLIST value from {type(value).__name__}")


def key_node(key: Any) -> bytes | tuple:
    """The node for a kvlist key or a line's key: a string printed like Cyrus prints keys."""
    if isinstance(key, Value):
        node = key.node
        if not isinstance(key, (Str, Flag)):
            raise TypeError(f"a {_kind(node)} cannot be a key")
    else:
        node = string_node(encode_text(key))
    data = node_map(node)
    if data is not None and b"\0" in data:
        raise ValueError("a key cannot contain a NUL byte")
    return node


def key_bytes(node: Any) -> bytes:
    """The key a key node stands for (quotes and literal framing removed)."""
    data = node_map(node)
    return NIL_TOKEN if data is None else data


class Value:
    """A DLIST value.  ``node`` is its compact representation (see the module docstring).

    Values compare equal when their nodes do, so two values are equal when
    they print the same.  The ``as_*`` methods convert like Cyrus's
    ``dlist_to*`` functions and raise DlistProtocolError when they cannot.
    """

    __slots__ = ("node",)

    def __new__(cls, *args, **kwargs):
        raise TypeError("Value is abstract; build a Str, Atom, Num, List, KvList, ...")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Value):
            return self.node == other.node
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.node)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.node!r})"

    def as_map(self) -> bytes | None:
        """The bytes of a string-like value (NUL allowed); None for NIL."""
        return node_map(self.node)

    def as_atom(self) -> str | None:
        """The text of a string-like value without NUL; None for NIL."""
        return node_atom(self.node)

    def as_num(self) -> int:
        """A 64-bit unsigned number written in decimal."""
        return node_num(self.node)

    def as_num32(self) -> int:
        """A number truncated to 32 bits, as Cyrus's dlist_getnum32() does."""
        return node_num(self.node) & 0xFFFFFFFF

    def as_date(self) -> int:
        """A time in seconds since the epoch (a number on the wire)."""
        return node_num(self.node)

    def as_hex(self) -> int:
        """A 64-bit number written in hex (e.g. a conversation id)."""
        return node_hex(self.node)

    def as_guid(self) -> str:
        """A 40-hex-digit message GUID, lower case."""
        return node_guid(self.node)


class Nil(Value):
    """``NIL``, the absent value.  There is one instance, :data:`NIL`."""

    __slots__ = ()

    def __new__(cls):
        return NIL

    def __repr__(self) -> str:
        return "NIL"


NIL = object.__new__(Nil)
NIL.node = NIL_TOKEN


class Str(Value):
    """A string value.  ``Str(x)`` takes the form Cyrus's printer would give ``x``.

    That is an :class:`Atom` when it can be one, a :class:`Quoted` string
    when it can be quoted without escapes, else a :class:`Literal`.  Values
    parsed from the wire keep the form they arrived in.
    """

    __slots__ = ()

    def __new__(cls, data: str | bytes):
        return wrap(string_node(encode_text(data)))

    @property
    def data(self) -> bytes:
        """The string's bytes (quotes, escapes and literal framing removed)."""
        return node_map(self.node)

    @property
    def text(self) -> str:
        """The string's bytes as text (UTF-8; undecodable bytes kept as surrogates)."""
        return decode_text(node_map(self.node))


class Atom(Str):
    """A string sent bare, e.g. ``user.test`` or ``1795284742``."""

    __slots__ = ()

    def __new__(cls, data: str | bytes):
        token = encode_text(data)
        if _ATOM_TOKEN.fullmatch(token) is None or token == NIL_TOKEN:
            raise ValueError(f"{token!r} cannot be sent as an atom")
        v = object.__new__(Atom)
        v.node = token
        return v


class Num(Atom):
    """A 64-bit unsigned number; printed in decimal (an atom on the wire)."""

    __slots__ = ()

    def __new__(cls, number: int):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= _MAX_U64:
            raise ValueError(f"{number!r} is not a 64-bit unsigned number")
        v = object.__new__(Num)
        v.node = b"%d" % number
        return v


class Hex(Atom):
    """A 64-bit number printed as 16 lower-case hex digits (Cyrus's DL_HEX)."""

    __slots__ = ()

    def __new__(cls, number: int):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= _MAX_U64:
            raise ValueError(f"{number!r} is not a 64-bit unsigned number")
        v = object.__new__(Hex)
        v.node = b"%016x" % number
        return v


class Guid(Atom):
    """A message GUID (SHA-1): 40 lower-case hex digits (Cyrus's DL_GUID)."""

    __slots__ = ()

    def __new__(cls, guid: str | bytes):
        token = encode_text(guid)
        if _GUID.fullmatch(token) is None:
            raise ValueError(f"{token!r} is not 40 hex digits")
        v = object.__new__(Guid)
        v.node = token.lower()
        return v


class Quoted(Str):
    """A string sent between double quotes, e.g. ``""`` or an ACL with TABs."""

    __slots__ = ()

    def __new__(cls, data: str | bytes):
        raw = encode_text(data)
        if re.search(rb'[\r\n"\\]', raw):
            raise ValueError(f"{raw[:40]!r} cannot be quoted without escapes")
        v = object.__new__(Quoted)
        v.node = b'"' + raw + b'"'
        return v


class Literal(Str):
    """A string sent as a ``{n}`` literal: binary-safe, may hold NUL.

    Whether the header reads ``{n+}`` or ``{n}`` depends on who prints it
    (see :mod:`dlist.printer`), not on the value.
    """

    __slots__ = ()

    def __new__(cls, data: str | bytes):
        v = object.__new__(Literal)
        v.node = (LITERAL, encode_text(data))
        return v


class Flag(Value):
    """A system flag such as ``\\Seen``: printed raw, as Cyrus prints DL_FLAG."""

    __slots__ = ()

    def __new__(cls, name: str | bytes):
        token = encode_text(name)
        if _FLAG_TOKEN.fullmatch(token) is None:
            raise ValueError(f"{token!r} is not a flag (a backslash and an atom)")
        v = object.__new__(Flag)
        v.node = token
        return v

    @property
    def name(self) -> str:
        """The flag with its backslash, e.g. ``\\Seen``."""
        return decode_text(self.node)


class File(Value):
    """A file literal ``%{partition guid size}`` and its body (a message).

    ``body`` is the bytes, or None when the body lives elsewhere: streamed to
    a caller's sink by the parser, or sent "by reference" in the binary form.
    """

    __slots__ = ()

    def __new__(cls, partition: str | bytes, guid: str | bytes, size: int | None = None,
                body: bytes | None = None):
        part = string_node(encode_text(partition))
        if type(part) is not bytes or b"{" in part or b"}" in part:
            raise ValueError(f"partition {partition!r} cannot go in a file literal header")
        gtoken = Guid(guid).node
        if body is not None:
            body = bytes(body)
            if size is None:
                size = len(body)
            elif size != len(body):
                raise ValueError(f"size {size} does not match the body's {len(body)} bytes")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 0xFFFFFFFF:
            raise ValueError(f"file size {size!r} is not a 32-bit unsigned number")
        v = object.__new__(File)
        v.node = (FILE, part, gtoken, size, body, False)
        return v

    @property
    def partition(self) -> str:
        return decode_text(node_map(self.node[1]))

    @property
    def guid(self) -> str:
        """The GUID from the header, lower case."""
        return decode_text(self.node[2]).lower()

    @property
    def size(self) -> int:
        return self.node[3]

    @property
    def body(self) -> bytes | None:
        return self.node[4]

    def without_body(self) -> File:
        """The same file literal, by reference (body None)."""
        v = object.__new__(File)
        v.node = self.node[:4] + (None,) + self.node[5:]
        return v

    def with_body(self, body: bytes) -> File:
        """The same file literal carrying ``body`` (which must have the declared size)."""
        body = bytes(body)
        if len(body) != self.node[3]:
            raise ValueError(f"body has {len(body)} bytes, the header says {self.node[3]}")
        v = object.__new__(File)
        v.node = self.node[:4] + (body,) + self.node[5:]
        return v

    def __repr__(self) -> str:
        body = "None" if self.body is None else f"<{len(self.body)} bytes>"
        return f"File({self.node[1]!r}, {self.node[2]!r}, {self.size}, body={body})"


class List(Value):
    """A list ``( ... )``: a sequence of values."""

    __slots__ = ()

    def __new__(cls, items: Iterable[Any] = ()):
        v = object.__new__(List)
        v.node = (LIST, *map(to_node, items))
        return v

    def __len__(self) -> int:
        return len(self.node) - 1

    def __iter__(self) -> Iterator[Value]:
        return map(wrap, self.node[1:])

    def __getitem__(self, index: int) -> Value:
        if not isinstance(index, int):
            raise TypeError("List indices are integers")
        if index < 0:
            index += len(self.node) - 1
        if not 0 <= index < len(self.node) - 1:
            raise IndexError("List index out of range")
        return wrap(self.node[index + 1])

    def atoms(self) -> list[str | None]:
        """Every item as text (:meth:`Value.as_atom`), e.g. mailbox names or flags."""
        return [node_atom(n) for n in self.node[1:]]

    def __repr__(self) -> str:
        try:
            return f"List({list(self)!r})"
        except DlistProtocolError:  # a malformed node from a binary blob
            return f"List(<malformed> {self.node!r})"


class _Missing:
    def __repr__(self) -> str:
        return "<required>"


_MISSING: Any = _Missing()


class KvList(Value):
    """A key/value list ``%( KEY value ... )``, looked up by key like Cyrus does.

    Order and duplicate or unknown keys are kept; a lookup returns the first
    pair with that key.  Keys are given as ``str`` (or ``bytes``).  Build one
    from pairs, a mapping, keyword arguments, or all three:
    ``KvList(UNIQUEID=u, MBOXNAME="user.test", RECORD=[...])``.
    """

    __slots__ = ("_index",)

    def __new__(cls, pairs: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = (), /, **fields: Any):
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        flat: list[Any] = [KVLIST]
        for key, value in (*items, *fields.items()):
            flat.append(key_node(key))
            flat.append(to_node(value))
        v = object.__new__(KvList)
        v.node = tuple(flat)
        v._index = None
        return v

    def _position(self, key: str | bytes) -> int | None:
        index = self._index
        if index is None:
            node = self.node
            keys = node[1::2]
            try:
                # Reversed so that the first of duplicate keys wins.
                index = dict(zip(reversed(keys), range(len(node) - 2, 0, -2)))
            except TypeError:  # an unhashable key: only from a malformed binary blob
                raise _malformed("a kvlist of string keys", node) from None
            if any(type(k) is not bytes or k[:1] == b'"' for k in keys):
                # Quoted or literal keys: index them by what they stand for.
                for k, pos in list(index.items()):
                    index.setdefault(key_bytes(k), pos)
            self._index = index
        return index.get(key if type(key) is bytes else encode_text(key))

    def __len__(self) -> int:
        return (len(self.node) - 1) // 2

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, bytes)) and self._position(key) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, key: str | bytes) -> Value:
        pos = self._position(key)
        if pos is None:
            raise KeyError(key)
        return wrap(self.node[pos + 1])

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value for ``key`` (first match), or ``default``."""
        pos = self._position(key)
        return default if pos is None else wrap(self.node[pos + 1])

    def keys(self) -> list[str]:
        """Every key in order, duplicates included."""
        return [decode_text(key_bytes(k)) for k in self.node[1::2]]

    def values(self) -> list[Value]:
        return [wrap(n) for n in self.node[2::2]]

    def items(self) -> list[tuple[str, Value]]:
        """Every (key, value) pair in order, duplicates included."""
        node = self.node
        return [(decode_text(key_bytes(node[i])), wrap(node[i + 1])) for i in range(1, len(node), 2)]

    def _node(self, key: str | bytes, default: Any) -> Any:
        pos = self._position(key)
        if pos is None:
            if default is _MISSING:
                raise DlistProtocolError(f"missing key {key!r}", expected=f"a {key!r} key")
            return _MISSING
        return self.node[pos + 1]

    def _get(self, key, default, convert):
        node = self._node(key, default)
        if node is _MISSING:
            return default
        try:
            return convert(node)
        except DlistProtocolError as e:
            raise DlistProtocolError(f"bad value for key {key!r}: {e.message}", expected=e.expected) from None

    def get_atom(self, key: str | bytes, default: Any = _MISSING) -> str | None:
        """Text of a string value (None for NIL).  Missing key: DlistProtocolError unless ``default``."""
        return self._get(key, default, node_atom)

    def get_map(self, key: str | bytes, default: Any = _MISSING) -> bytes | None:
        """Bytes of a string value, NUL allowed (None for NIL)."""
        return self._get(key, default, node_map)

    def get_num(self, key: str | bytes, default: Any = _MISSING) -> int:
        """A 64-bit unsigned decimal number."""
        return self._get(key, default, node_num)

    def get_num32(self, key: str | bytes, default: Any = _MISSING) -> int:
        """A number truncated to 32 bits (Cyrus's dlist_getnum32)."""
        return self._get(key, default, lambda n: node_num(n) & 0xFFFFFFFF)

    def get_date(self, key: str | bytes, default: Any = _MISSING) -> int:
        """Seconds since the epoch (a number on the wire)."""
        return self._get(key, default, node_num)

    def get_hex(self, key: str | bytes, default: Any = _MISSING) -> int:
        """A 64-bit number written in hex."""
        return self._get(key, default, node_hex)

    def get_guid(self, key: str | bytes, default: Any = _MISSING) -> str:
        """A 40-hex-digit GUID, lower case."""
        return self._get(key, default, node_guid)

    def get_list(self, key: str | bytes, default: Any = _MISSING) -> List:
        """A list ``( ... )``."""
        return self._get(key, default, lambda n: _expect(n, List, "a list"))

    def get_kvlist(self, key: str | bytes, default: Any = _MISSING) -> KvList:
        """A key/value list ``%( ... )``."""
        return self._get(key, default, lambda n: _expect(n, KvList, "a kvlist"))

    def get_file(self, key: str | bytes, default: Any = _MISSING) -> File:
        """A file literal."""
        return self._get(key, default, lambda n: _expect(n, File, "a file literal"))

    def __repr__(self) -> str:
        try:
            return "KvList(" + ", ".join(f"{k}={v!r}" for k, v in self.items()) + ")"
        except DlistProtocolError:  # a malformed node from a binary blob
            return f"KvList(<malformed> {self.node!r})"


def _expect(node: Any, cls: type, what: str) -> Any:
    v = wrap(node)
    if not isinstance(v, cls):
        raise DlistProtocolError(f"found a {_kind(node)}", expected=what)
    return v


#: ``kvlist(UNIQUEID=..., MBOXNAME=..., RECORD=[...])`` reads well in code that builds lines.
kvlist = KvList

_VERB = re.compile(rb"[^\s]*")


class Line:
    """One top-level line of the sync protocol, in either direction.

    A DLIST line (``APPLY``, ``GET``, ``RESTORE`` and untagged ``*``) has a
    ``key`` and a ``value``: ``Line("APPLY", "MAILBOX", KvList(...))``.  Any
    other line (``OK success``, ``AUTHENTICATE PLAIN <b64>``, ``EXIT``, the
    banner's ``* SASL PLAIN``) has ``text``, the bytes after the verb and one
    space, or None when the verb stands alone.

    ``corrupt_files`` lists the file literals whose body did not hash to the
    GUID in their header (see :class:`dlist.parser.Parser`); always empty for
    lines built in code.
    """

    __slots__ = ("_key", "corrupt_files", "text", "value", "verb")

    def __init__(self, verb: str, key: Any = None, value: Any = None, *,
                 text: str | bytes | None = None):
        verb_b = encode_text(verb)
        if _VERB.fullmatch(verb_b) is None:
            raise ValueError(f"verb {verb!r} contains white space")
        self.verb = decode_text(verb_b)
        self.corrupt_files: tuple[File, ...] = ()
        if key is not None or value is not None:
            if key is None or value is None or text is not None:
                raise ValueError("a DLIST line has a key and a value, and no text")
            if not verb_b:
                raise ValueError("a DLIST line needs a verb")
            self._key = key_node(key)
            self.value = value if isinstance(value, Value) else wrap(to_node(value))
            self.text = None
        else:
            self._key = None
            self.value = None
            if text is not None:
                text = encode_text(text)
                if b"\r" in text or b"\n" in text:
                    raise ValueError("line text cannot contain CR or LF")
                if not verb_b:
                    raise ValueError("a text line needs a verb")
            self.text = text

    @classmethod
    def _make(cls, verb: str, key: Any, value: Any, text: bytes | None,
              corrupt: tuple[File, ...] = ()) -> Line:
        """A line from already-checked parts (parser and binary codec)."""
        line = object.__new__(cls)
        line.verb = verb
        line._key = key
        line.value = None if value is None else wrap(value)
        line.text = text
        line.corrupt_files = corrupt
        return line

    @property
    def key(self) -> str | None:
        """The key of a DLIST line (``MAILBOX`` in ``APPLY MAILBOX ...``), else None."""
        return None if self._key is None else decode_text(key_bytes(self._key))

    @property
    def key_node(self) -> Any:
        """The key's node as it goes on the wire (usually an atom token)."""
        return self._key

    @property
    def is_dlist(self) -> bool:
        """True for a line carrying a DLIST value."""
        return self._key is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Line):
            return NotImplemented
        return (self.verb == other.verb and self._key == other._key and self.text == other.text
                and (self.value.node if self.value is not None else None)
                == (other.value.node if other.value is not None else None))

    def __hash__(self) -> int:
        return hash((self.verb, self._key, self.text,
                     None if self.value is None else self.value.node))

    def __repr__(self) -> str:
        if self._key is not None:
            return f"Line({self.verb!r}, {self._key!r}, {self.value!r})"
        if self.text is not None:
            return f"Line({self.verb!r}, text={self.text!r})"
        return f"Line({self.verb!r})"
