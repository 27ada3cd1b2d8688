"""modsync's protocol messages as DLIST values, and collecting a change set off the wire.

Every message of the native protocol (``engine.protocol``) is one DLIST
line in the binary codec (``dlist.binary.encode_line``)::

    VERB - %(FIELD value FIELD value ...)      most messages
    ITEMS - (item item ...)                     a batch of change set items
    BODIES - ((address data) ...)               small bodies, whole

The verb names the message (``HELLO``, ``PUSH``, ``RESULT``...), the key is
always ``-`` and the value is a kvlist of upper-case fields, except for
``ITEMS`` and ``BODIES`` whose value is a list.  Field values use a small,
self-describing mapping of Python values onto DLIST nodes, so the wire
form stays readable when printed as DLIST text and round-trips exactly:

    ==============  ===============================================
    Python          DLIST node
    ==============  ===============================================
    ``None``        ``NIL``
    ``True/False``  the atoms ``T`` / ``F``
    ``int``         a decimal atom (``-`` in front when negative)
    ``bytes``       a ``{n}`` literal
    ``str``         a flag-like atom when it looks like ``\\Seen``,
                    else a quoted string when it needs no escapes,
                    else ``%(TEXT {n}...)`` (a literal, tagged as text)
    ``list``        a list ``( ... )``
    ``dict``        a kvlist whose keys are literals (str keys only)
    ==============  ===============================================

A change set item travels as ``(kind ident fields origin origin-modseq
removed)``: the positional layout of ``engine.changeset.Item.to_wire``.
The wire promises only the DLIST shape of ``ident`` and ``fields``; their
meaning is ``engine.apply``'s to check, so the two cannot drift apart.

``Incoming`` collects one received change set: its items, and its bodies in
a ``BodySpool`` (memory up to a threshold, then a temporary file), so a
50 MB body arrives in chunks and is held whole once, when apply reads it.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

from dlist.model import KVLIST, LIST, LITERAL, NIL_TOKEN

from .blobs import unpack_stored, unpack_stored_async
from .changeset import ChangeSet, Item
from .errors import ProtocolError
from .model import KIND_CLASSES

# Nested values deeper than this are refused: the deepest thing modsync sends
# is a record's annotation ([item [fields [annotations [entry]]]]), five
# levels; sixteen leaves room for growth and keeps a hostile peer from
# exhausting the decoder's recursion.
MAX_VALUE_DEPTH = 16

# Strings this long or longer never go as quoted strings (Cyrus's
# MAXQSTRING), so the text form stays printable by Cyrus's rules.
_MAX_QUOTED = 1024
_TEXT_TAG = b"TEXT"
_TRUE, _FALSE = b"T", b"F"
_INT = re.compile(rb"-?[0-9]{1,20}")
_UNQUOTABLE = re.compile('[\r\n"\\\\\x00]')
_FLAG_LIKE = re.compile(r"\\[A-Za-z0-9_$.\-]+")
_HEX32 = re.compile(r"[0-9a-f]{32}")

MAX_MODSEQ = (1 << 63) - 1


class WireError(ProtocolError):
    """A DLIST value that does not have the shape a message needs."""


# -- values ---------------------------------------------------------------------------
def _text(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def to_node(v: Any):
    """The DLIST node for a Python value (see the module docstring)."""
    t = type(v)
    if t is int:
        return b"%d" % v
    if t is str:
        if v[:1] == "\\" and _FLAG_LIKE.fullmatch(v):
            return v.encode("ascii")
        if len(v) < _MAX_QUOTED and not _UNQUOTABLE.search(v):
            return b'"' + v.encode("utf-8", "surrogateescape") + b'"'
        return (KVLIST, _TEXT_TAG, (LITERAL, _text(v)))
    if t is bytes:
        return (LITERAL, v)
    if t is list or t is tuple:
        out = [LIST]
        append = out.append
        for x in v:
            tx = type(x)
            if tx is int:
                append(b"%d" % x)
            elif tx is bytes:
                append((LITERAL, x))
            else:
                append(to_node(x))
        return tuple(out)
    if t is bool:
        return _TRUE if v else _FALSE
    if v is None:
        return NIL_TOKEN
    if t is dict:
        flat: list = [KVLIST]
        for k, x in v.items():
            if type(k) is not str:
                raise TypeError(f"dict keys on the wire are strings, not {type(k).__name__}")
            flat.append((LITERAL, _text(k)))
            flat.append(to_node(x))
        return tuple(flat)
    if isinstance(v, (bytearray, memoryview)):
        return (LITERAL, bytes(v))
    if isinstance(v, int):      # IntEnum and friends
        return b"%d" % int(v)
    raise TypeError(f"cannot put a {t.__name__} on the wire")


def from_node(n: Any, depth: int = 0):
    """The Python value of a node made by ``to_node``; WireError for anything else."""
    if type(n) is tuple:
        if not n:
            raise WireError("empty node")
        tag = n[0]
        if tag == LIST:
            if depth >= MAX_VALUE_DEPTH:
                raise WireError(f"value nested deeper than {MAX_VALUE_DEPTH} levels")
            d = depth + 1
            out = []
            append = out.append
            for x in n[1:]:
                # The common scalars inline (a change set is mostly these); the
                # rest, and anything unusual, through from_node.
                tx = type(x)
                if tx is bytes and x:
                    c = x[0]
                    if c == 34 and len(x) > 1 and x[-1] == 34 and x.count(b'"') == 2 \
                            and b"\\" not in x:
                        append(x[1:-1].decode("utf-8", "surrogateescape"))
                        continue
                    if 48 <= c <= 57 and len(x) <= 20 and x.isdigit():
                        append(int(x))
                        continue
                elif tx is tuple and len(x) == 2 and x[0] == LITERAL and type(x[1]) is bytes:
                    append(x[1])
                    continue
                append(from_node(x, d))
            return out
        if tag == LITERAL and len(n) == 2 and type(n[1]) is bytes:
            return n[1]
        if tag == KVLIST and len(n) & 1:
            if depth >= MAX_VALUE_DEPTH:
                raise WireError(f"value nested deeper than {MAX_VALUE_DEPTH} levels")
            if len(n) == 3 and n[1] == _TEXT_TAG:
                lit = n[2]
                if type(lit) is tuple and len(lit) == 2 and lit[0] == LITERAL \
                        and type(lit[1]) is bytes:
                    return lit[1].decode("utf-8", "surrogateescape")
                raise WireError("malformed tagged text")
            out = {}
            d = depth + 1
            for i in range(1, len(n), 2):
                k = n[i]
                if type(k) is not tuple or len(k) != 2 or k[0] != LITERAL or type(k[1]) is not bytes:
                    raise WireError("a dict key on the wire must be a literal")
                out[k[1].decode("utf-8", "surrogateescape")] = from_node(n[i + 1], d)
            return out
        raise WireError(f"not a modsync wire value: {repr(n)[:60]}")
    if type(n) is bytes and n:
        c = n[0]
        if c == 34:     # '"'
            if len(n) < 2 or n[-1] != 34 or b'"' in n[1:-1] or b"\\" in n:
                raise WireError(f"malformed quoted string {n[:40]!r}")
            return n[1:-1].decode("utf-8", "surrogateescape")
        if 48 <= c <= 57:   # a digit
            if n.isdigit() and len(n) <= 20:
                return int(n)
        elif c == 92:   # a backslash
            if not _FLAG_LIKE.fullmatch(n.decode("ascii", "replace")):
                raise WireError(f"malformed flag {n[:40]!r}")
            return n.decode("ascii")
        elif n == _TRUE:
            return True
        elif n == _FALSE:
            return False
        elif n == NIL_TOKEN:
            return None
        elif c == 45 and _INT.fullmatch(n):   # '-'
            return int(n)
        raise WireError(f"unexpected atom {n[:40]!r}")
    raise WireError(f"not a modsync wire value: {repr(n)[:60]}")


# -- message fields -----------------------------------------------------------------------
def fields_node(fields: dict) -> tuple:
    """A message's fields as a kvlist with atom keys (``%(USER "alice" ...)``)."""
    flat: list = [KVLIST]
    for k, v in fields.items():
        flat.append(k.encode("ascii"))
        flat.append(to_node(v))
    return tuple(flat)


def node_fields(n: Any) -> dict:
    """The fields of a message (a kvlist with atom keys)."""
    if type(n) is not tuple or not n or n[0] != KVLIST or not len(n) & 1:
        raise WireError("a message's value must be a kvlist of fields")
    out = {}
    for i in range(1, len(n), 2):
        k = n[i]
        if type(k) is not bytes or not k.isalnum():
            raise WireError(f"bad field name {repr(k)[:40]}")
        out[k.decode("ascii")] = from_node(n[i + 1], 1)
    return out


# -- version vectors and items --------------------------------------------------------------
def check_vv(v: Any, what: str) -> dict[str, int]:
    """A version vector from the wire: {store id (32 hex digits): modseq}."""
    if type(v) is not dict:
        raise WireError(f"{what} must be a version vector")
    for k, n in v.items():
        if not _HEX32.fullmatch(k) or type(n) is not int or not 0 <= n <= MAX_MODSEQ:
            raise WireError(f"{what}: bad entry {k[:40]!r}: {n!r}")
    return v


def item_node(it: Item):
    return (LIST, (LITERAL, it.kind), to_node(it.ident), to_node(it.fields),
            b'"' + it.origin.encode("ascii") + b'"', b"%d" % it.origin_modseq,
            _TRUE if it.removed else _FALSE)


def node_item(n: Any) -> Item:
    v = from_node(n)
    if type(v) is not list or len(v) != 6:
        raise WireError("a change set item is (kind ident fields origin modseq removed)")
    kind, ident, fields, origin, om, removed = v
    if type(kind) is not bytes or kind not in KIND_CLASSES:
        raise WireError(f"item of unknown kind {kind!r}")
    if type(ident) is not list or type(fields) is not list:
        raise WireError("item ident and fields must be lists")
    if type(origin) is not str or not _HEX32.fullmatch(origin):
        raise WireError(f"item origin {origin!r} is not a store id")
    if type(om) is not int or not 0 <= om <= MAX_MODSEQ or type(removed) is not bool:
        raise WireError("item modseq or removed flag malformed")
    return Item(kind, tuple(ident), fields, origin, om, removed)


def header_fields(cs: ChangeSet, n_items: int | None = None) -> dict:
    """The CHANGESET message's fields: everything of a change set but its items."""
    return {"USER": cs.user, "SENDER": cs.sender, "BASE": dict(cs.base), "STATE": dict(cs.state),
            "CRCS": dict(cs.crcs), "DIGEST": cs.digest, "MAXMODSEQ": cs.max_modseq,
            "ITEMS": len(cs.items) if n_items is None else n_items, "BODIES": list(cs.bodies)}


def header_from_fields(f: dict) -> tuple[ChangeSet, int]:
    """(change set without items, the number of items announced)."""
    try:
        user, sender = f["USER"], f["SENDER"]
        base = check_vv(f["BASE"], "BASE")
        state = check_vv(f["STATE"], "STATE")
        crcs, digest, max_modseq = f["CRCS"], f["DIGEST"], f["MAXMODSEQ"]
        n_items, bodies = f["ITEMS"], f["BODIES"]
    except KeyError as e:
        raise WireError(f"CHANGESET without {e.args[0]}") from None
    if type(user) is not str or type(sender) is not str or not _HEX32.fullmatch(sender):
        raise WireError("CHANGESET: bad USER or SENDER")
    if type(crcs) is not dict or any(type(c) is not int or not 0 <= c < 1 << 64
                                     for c in crcs.values()):
        raise WireError("CHANGESET: CRCS must map mailbox ids to 64-bit CRCs")
    if type(digest) is not bytes or type(max_modseq) is not int or not 0 <= max_modseq <= MAX_MODSEQ:
        raise WireError("CHANGESET: bad DIGEST or MAXMODSEQ")
    if type(n_items) is not int or n_items < 0:
        raise WireError("CHANGESET: bad ITEMS count")
    if type(bodies) is not list or any(type(b) is not bytes or len(b) != 32 for b in bodies):
        raise WireError("CHANGESET: BODIES must list 32-byte content addresses")
    return ChangeSet(user, sender, base, state, [], bodies, crcs, digest, max_modseq), n_items


# -- receiving a change set -----------------------------------------------------------------
# Bodies are kept in memory until this many bytes have arrived, then spill
# to a temporary file: an incremental change set (a few new messages) never
# touches the disk, and a first sync of 20,000 messages or one 50 MB
# attachment does not sit in memory twice.
SPOOL_MEMORY = 32 << 20


class BodySpool:
    """Bodies of one incoming change set, by address; written in chunks, read whole.

    ``get(address)`` returns the bytes (or None): the ``bodies`` callable
    ``engine.apply.apply`` takes.  Bodies that came as a pack stores them
    (protocol version 3) are kept that way: ``stored(address)`` gives
    (method, payload, size), so that apply writes them without compressing
    again.  Those held in memory are decompressed at once on the compression
    threads (one GIL-free call per frame), while the rest of the change set
    arrives and the previous one is applied: ``unpacked``, ``unpack_many`` and
    ``get``, then only wait for it.  ``close()`` drops them (and the file).
    """

    def __init__(self, directory: str | None = None, memory: int = SPOOL_MEMORY):
        self._dir = directory
        self._memory_left = memory
        self._mem: dict[bytes, bytearray] = {}
        self._file = None
        self._where: dict[bytes, tuple[int, int]] = {}   # address -> (offset, size) in file
        self._packed: dict[bytes, tuple[int, int]] = {}  # address -> (method, size): as stored
        self._unpacking: dict[bytes, tuple] = {}         # address -> (future, index)
        self._current: bytes | None = None
        self.total = 0

    def begin(self, address: bytes, size: int) -> None:
        self._current = address
        if size <= self._memory_left:
            self._memory_left -= size
            self._mem[address] = bytearray()
        else:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="modsync-bodies-", dir=self._dir)
            off = self._file.seek(0, os.SEEK_END)
            self._where[address] = (off, size)

    def write(self, data: bytes) -> None:
        buf = self._mem.get(self._current)
        if buf is not None:
            buf += data
        else:
            self._file.write(data)
        self.total += len(data)

    def packed(self, entries) -> None:
        """Whole bodies as the sender's pack stores them: (address, size, method, payload)
        each (one ZBODIES frame); those kept in memory start decompressing."""
        started = []
        for address, size, method, payload in entries:
            n = len(payload)
            if n <= self._memory_left and type(payload) is bytes:
                self._memory_left -= n
                self._mem[address] = payload
                self.total += n
                started.append((address, (method, payload, size)))
            else:
                self.begin(address, n)
                self.write(payload)
            self._packed[address] = (method, size)
        if started:
            future = unpack_stored_async([e for _, e in started])
            for i, (address, _) in enumerate(started):
                self._unpacking[address] = (future, i)

    def unpacked(self, address: bytes) -> bytes | None:
        """A body that came as stored, decompressed (None if it does not decompress to
        the size it claims, or did not come as stored).  Not checked against its address."""
        entry = self.stored(address) if address not in self._unpacking else None
        return self.unpack_many([(address, entry)])[0]

    def unpack_many(self, entries: list) -> list[bytes | None]:
        """``unpacked`` of many bodies; ``entries`` are (address, ``stored(address)``).

        Bodies already being decompressed are taken from there, the others are
        decompressed together in one call (see ``unpack_stored``).
        """
        out: list = [None] * len(entries)
        rest = []
        for i, (address, entry) in enumerate(entries):
            started = self._unpacking.get(address)
            if started is not None:
                out[i] = started[0].result()[started[1]]
            elif entry is not None:
                rest.append(i)
        for i, data in zip(rest, unpack_stored([entries[i][1] for i in rest])):
            out[i] = data
        return out

    def _raw(self, address: bytes) -> bytes | None:
        buf = self._mem.get(address)
        if buf is not None:
            return bytes(buf)
        where = self._where.get(address)
        if where is None:
            return None
        off, size = where
        self._file.flush()
        return os.pread(self._file.fileno(), size, off)

    def stored(self, address: bytes) -> tuple[int, bytes, int] | None:
        """(method, payload, size) of a body that came as stored; None for the others."""
        packed = self._packed.get(address)
        if packed is None:
            return None
        return packed[0], self._raw(address), packed[1]

    def get(self, address: bytes) -> bytes | None:
        packed = self._packed.get(address)
        if packed is None:
            return self._raw(address)
        body = self.unpacked(address)
        if body is None:
            raise WireError(f"body {address.hex()[:16]} is not a zstd frame of {packed[1]} "
                            f"bytes")
        return body

    __call__ = get

    def addresses(self) -> list[bytes]:
        return list(self._mem) + list(self._where)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for a in self.addresses():
            yield a, self.get(a)

    def close(self) -> None:
        self._mem.clear()
        self._where.clear()
        self._packed.clear()
        self._unpacking.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


class Incoming:
    """A change set being received: feed it the protocol's change set events."""

    def __init__(self, header: ChangeSet, n_items: int, spool: BodySpool | None = None):
        self.cs = header
        self.expected_items = n_items
        self.spool = spool if spool is not None else BodySpool()

    def add_items(self, items) -> None:
        self.cs.items.extend(items)

    def body(self, address: bytes, offset: int, size: int, data: bytes) -> None:
        """A chunk of a body sent in pieces (protocol BODY)."""
        if offset == 0:
            self.spool.begin(address, size)
        self.spool.write(data)

    def whole_body(self, address: bytes, data: bytes) -> None:
        """A small body sent whole (protocol BODIES)."""
        self.spool.begin(address, len(data))
        self.spool.write(data)

    def packed_bodies(self, entries) -> None:
        """Small bodies as the sender stores them (protocol ZBODIES)."""
        self.spool.packed(entries)

    def finish(self) -> tuple[ChangeSet, BodySpool]:
        if len(self.cs.items) != self.expected_items:
            raise WireError(f"change set announced {self.expected_items} items and carried "
                            f"{len(self.cs.items)}")
        return self.cs, self.spool

    def discard(self) -> None:
        self.spool.close()
