"""Printing lines and values as the bytes Cyrus 3.6 accepts.

Tokens are written exactly as they are held (see dlist.model), so a value
parsed from the wire prints back byte-identical and a value built with
``Str``/``Num``/... prints the way Cyrus's own printer would.  Items are
separated by one space.

The one thing that depends on who speaks is a literal's header: ``{n+}``
from a client (sync_client never waits for a continuation) and ``{n}`` from a
server (a 3.6.5+ sync_client rejects ``{n+}`` in responses).  Every function
takes ``role="client"`` or ``role="server"``.

The printer is the gate to the peer, so it checks what it writes: node
shapes, kvlist pairing, nesting (at most :data:`MAX_PRINT_DEPTH`) and every
token's syntax, because values decoded from a binary blob are not checked
until used.  A malformed value raises DlistProtocolError and nothing is
returned.

File literals print their body; a file held by reference (body None) needs
``bodies``, a callable returning the body of a :class:`~dlist.model.File`
as ``bytes`` or an iterable of ``bytes`` chunks.  :func:`iter_line` yields
such bodies as chunks of their own so a large message can be streamed from
disk; a body of the wrong length raises ValueError (possibly after earlier
chunks were yielded, so the connection must then be dropped).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .errors import DlistProtocolError
from .limits import MAX_PRINT_DEPTH
from .model import FILE, KVLIST, LIST, LITERAL, File, Line, Value, wrap

Bodies = Callable[[File], "bytes | Iterable[bytes]"]

_ROLES = {"client": b"+}\r\n", "server": b"}\r\n"}
_OPEN = {LIST: b"(", KVLIST: b"%("}

_VALUE = re.compile(rb'[^\s()"{%\\][^\s()"]*|\\[^\s()"]*|"(?:[^"\\\r\n]|\\[^\r\n])*"')
# Cyrus reads keys with getastring(), which also takes words starting with "%".
_KEY = re.compile(rb'[^\s()"{%\\][^\s()"]*|\\[^\s()"]*|"(?:[^"\\\r\n]|\\[^\r\n])*"'
                  rb'|%(?![({])[^\s()"]*')
# Deleting every byte that may appear anywhere in an atom leaves the ones to look at.
_ORDINARY = bytes(b for b in range(256) if b not in b' \t\n\r\x0b\x0c()"\\')
_PART_TOKEN = re.compile(rb'[^\s()"{}%\\][^\s(){}"]*|"(?:[^"\\\r\n{}]|\\[^\r\n{}])*"')
_GUID_TOKEN = re.compile(rb"[0-9a-fA-F]{40}")
# What a parsed line may hold (Line() itself is stricter): only SP ends a
# verb and only LF a line, so anything else prints back as it came.
_VERB = re.compile(rb"[^ \n]*")

_BATCH = 4096


def _tokens_ok(tokens: list[bytes], keys: bool) -> bool:
    """True when every token is well formed (an atom, flag, quoted string or NIL).

    Checked in bulk, a few thousand at a time: the tokens are joined by a
    double LF, which no well-formed token contains, and C-speed scans prove
    the common shapes right (plain atoms, flags, ``""``).  Only a batch that
    holds something else (a quoted ACL, say) is matched token by token.
    """
    match = (_KEY if keys else _VALUE).fullmatch
    for start in range(0, len(tokens), _BATCH):
        batch = tokens[start:start + _BATCH]
        if not (_batch_ok(batch, keys) or all(match(t) for t in batch)):
            return False
    return True


def _batch_ok(tokens: list[bytes], keys: bool) -> bool:
    blob = b"\n\n".join(tokens)
    marks = blob.translate(None, _ORDINARY)
    others = marks.replace(b"\n", b"")
    quotes = others.count(b'"')
    backslashes = others.count(b"\\")
    return bool(
        blob                                                     # (not one empty token)
        and marks.count(b"\n") == 2 * len(tokens) - 2            # no LF inside a token
        and b"\n\n\n" not in blob and blob[:1] != b"\n" and blob[-1:] != b"\n"  # none empty
        and len(others) == quotes + backslashes                  # no white space, parens, CR
        and (not quotes or quotes == 2 * (b"\n" + blob + b"\n").count(b'\n""\n'))
        and (not backslashes or backslashes == (b"\n" + blob).count(b"\n\\"))
        and b"\n{" not in blob and blob[:1] != b"{"
        and (b"\n%{" not in blob and blob[:2] != b"%{" if keys
             else b"\n%" not in blob and blob[:1] != b"%"))


class _Body:
    """A file body to stream: printed inline by print_line, yielded by iter_line."""

    __slots__ = ("data", "file")

    def __init__(self, file: File, data: Any):
        self.file = file
        self.data = data


def _bad(what: str, node: Any) -> DlistProtocolError:
    shown = repr(node)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return DlistProtocolError(f"cannot print {shown}", expected=what)


class _Renderer:
    """Renders nodes to bytes, or to a list of pieces when file bodies are streamed."""

    def __init__(self, role: str, bodies: Bodies | None):
        try:
            self.lit_end = _ROLES[role]
        except KeyError:
            raise ValueError(f"role must be 'client' or 'server', not {role!r}") from None
        self.bodies = bodies
        self.streaming = False  # a _Body is in the output: containers may render to lists
        self.keys: list[bytes] = []
        self.values: list[bytes] = []
        self.mixed_keys: list[Any] = []
        self.mixed_values: list[Any] = []

    def check(self) -> None:
        """Raise unless every token rendered so far is well formed."""
        # Tokens of containers that also hold nested nodes or literal keys are
        # in ``mixed_*``: leave the nodes out.  Each distinct token is checked
        # once (keys, flags and small numbers repeat in every record).
        values = set(self.values)
        values.update([v for v in self.mixed_values if type(v) is bytes])
        keys = set(self.keys)
        keys.update([k for k in self.mixed_keys if type(k) is bytes])
        if not (_tokens_ok(list(values), False) and _tokens_ok(list(keys), True)):
            raise DlistProtocolError("malformed token in a value to print",
                                     expected="atoms, flags, quoted strings and NIL")

    def node(self, node: Any, depth: int = 0) -> Any:
        """One value as bytes (or a piece list); its tokens are collected for check()."""
        if type(node) is bytes:
            self.values.append(node)
            return node
        if type(node) is not tuple or not node:
            raise _bad("a DLIST value", node)
        tag = node[0]
        if tag == LITERAL:
            return self.literal(node, False)
        if tag == FILE:
            return self.file(node)
        items = node[1:]
        if tag == KVLIST:
            if not len(node) & 1:
                raise _bad("a kvlist of key/value pairs", node)
            keys = items[0::2]
            values = items[1::2]
            opener = b"%("
        elif tag == LIST:
            keys = ()
            values = items
            opener = b"("
        else:
            raise _bad("a DLIST value", node)
        if items and type(items[-1]) is bytes:
            try:  # the common case: nothing but tokens
                body = b" ".join(items)
            except TypeError:
                pass
            else:
                self.keys += keys
                self.values += values
                return opener + body + b")"
        self.mixed_keys += keys
        self.mixed_values += values
        if depth >= MAX_PRINT_DEPTH:
            raise _bad(f"at most {MAX_PRINT_DEPTH} nested lists", node)
        depth += 1
        render = self.node
        if keys:
            parts = list(items)
            try:
                b"".join(keys)  # only tokens, as usual?
            except TypeError:
                parts[0::2] = [k if type(k) is bytes else self.key(k) for k in keys]
            parts[1::2] = [v if type(v) is bytes else render(v, depth) for v in values]
        else:
            parts = [v if type(v) is bytes else render(v, depth) for v in values]
        if self.streaming and list in map(type, parts):
            return _pieces(opener, parts, b")")
        return opener + b" ".join(parts) + b")"

    def key(self, node: Any) -> Any:
        """A key on its own (a line's key, or a literal key inside a kvlist)."""
        if type(node) is bytes:
            self.keys.append(node)
            return node
        if type(node) is tuple and node and node[0] == LITERAL:
            return self.literal(node, True)
        raise _bad("a key (atom, string or literal)", node)

    def literal(self, node: tuple, key: bool) -> bytes:
        if len(node) != 2 or type(node[1]) is not bytes or key and b"\0" in node[1]:
            raise _bad("a literal" + (" without NUL" if key else ""), node)
        return b"{%d%s%s" % (len(node[1]), self.lit_end, node[1])

    def file(self, node: tuple) -> Any:
        try:
            file = wrap(node)
        except DlistProtocolError:
            raise _bad("a file literal", node) from None
        _, part, guid, size, body, bare_lf = node
        if (_PART_TOKEN.fullmatch(part) is None or _GUID_TOKEN.fullmatch(guid) is None
                or not 0 <= size <= 0xFFFFFFFF or type(bare_lf) is not bool):
            raise _bad("a file literal", node)
        header = b"%%{%s %s %d}%s" % (part, guid, size, b"\n" if bare_lf else b"\r\n")
        if body is not None:
            if len(body) != size:
                raise _bad(f"a body of {size} bytes", node)
            return header + body
        if self.bodies is None:
            raise ValueError(f"file literal {file.guid} has no body; pass bodies= to print it")
        self.streaming = True
        return [header, _Body(file, self.bodies(file))]

    def line(self, line: Line) -> list[Any]:
        verb = line.verb.encode("utf-8", "surrogateescape")
        if _VERB.fullmatch(verb) is None:
            raise _bad("a verb without SP or LF", line.verb)
        if line.is_dlist:
            parts = [verb, self.key(line.key_node), self.node(line.value.node)]
        elif line.text is not None:
            if b"\n" in line.text:
                raise _bad("line text without LF", line.text)
            parts = [verb, line.text]
        else:
            parts = [verb]
        return _pieces(b"", parts, b"\r\n")


def _pieces(opener: bytes, parts: list[Any], closer: bytes) -> list[Any]:
    """``opener``, the parts separated by spaces, ``closer``: as a flat piece list."""
    out: list[Any] = [opener]
    for i, p in enumerate(parts):
        if i:
            out.append(b" ")
        if type(p) is list:
            out += p
        else:
            out.append(p)
    out.append(closer)
    return out


def _value_node(value: Any) -> Any:
    if isinstance(value, Value):
        return value.node
    raise TypeError(f"expected a dlist Value, got {type(value).__name__}")


def print_value(value: Value, role: str = "client", bodies: Bodies | None = None) -> bytes:
    """The wire bytes of one value, as ``role`` ("client" or "server") would send it."""
    r = _Renderer(role, bodies)
    out = r.node(_value_node(value))
    r.check()
    return _join(out if type(out) is list else [out])


def print_line(line: Line, role: str = "client", bodies: Bodies | None = None) -> bytes:
    """The wire bytes of a whole line, CRLF included."""
    r = _Renderer(role, bodies)
    pieces = r.line(line)
    r.check()
    return _join(pieces)


def iter_line(line: Line, role: str = "client", bodies: Bodies | None = None) -> Iterator[bytes]:
    """The wire bytes of a line in chunks; streamed file bodies come as chunks of their own.

    The whole line is checked before the first chunk is produced.
    """
    r = _Renderer(role, bodies)
    pieces = r.line(line)
    r.check()
    pending: list[bytes] = []
    for piece in pieces:
        if type(piece) is _Body:
            if pending:
                yield b"".join(pending)
                pending = []
            yield from _body_chunks(piece)
        else:
            pending.append(piece)
    if pending:
        yield b"".join(pending)


def _body_chunks(piece: _Body) -> Iterator[bytes]:
    data, size = piece.data, piece.file.size
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) != size:
            raise ValueError(f"body for {piece.file.guid} has {len(data)} bytes, not {size}")
        yield bytes(data)
        return
    sent = 0
    for chunk in data:
        sent += len(chunk)
        if sent > size:
            raise ValueError(f"body for {piece.file.guid} is longer than {size} bytes")
        yield bytes(chunk)
    if sent != size:
        raise ValueError(f"body for {piece.file.guid} has {sent} bytes, not {size}")


def _join(pieces: list[Any]) -> bytes:
    out: list[bytes] = []
    for p in pieces:
        if type(p) is _Body:
            out += _body_chunks(p)
        else:
            out.append(p)
    return b"".join(out)
