"""modsync's native replication protocol, as a state machine with no I/O.

In the manner of h11: ``Connection.receive_data(bytes)`` returns the events
the bytes complete, ``Connection.send(event)`` returns the bytes to write.
It never touches a socket, a clock or a log, so the same core serves the
asyncio server, the blocking client, tests that feed one byte at a time,
and fuzzers.  Every violation raises ``ProtocolError`` (with the stream
offset and a reason) at the point the bytes stopped making sense; after
that the connection is unusable and must be closed.

Framing
-------
A stream of frames, in both directions::

    frame = length (u32, big-endian, > 0) | payload (length bytes)

Each payload is one DLIST line in the binary codec (``dlist.binary``); see
``engine.wire`` for how messages map onto DLIST values.

Conversation
------------
::

    C: HELLO  %(VERSIONS (1 2 3) SOFTWARE "modsync/0.1" STOREID "...")
    S: WELCOME %(VERSION 3 VERSIONS (1 2 3) SOFTWARE ... STOREID "...")
       | BYE %(CODE "version" TEXT "this server speaks protocol versions 1, 2, 3 ...")
    C: AUTH   %(NAME "alice" PASSWORD "...")
    S: OK %(ACCOUNT "alice" ADMIN F)  |  NO %(CODE "auth" ...)  |  NO %(CODE "rate-limited" ...)
    then commands, each answered before the next (except FOLLOW, below):
    C: LISTUSERS                S: USERS %(USERS (...))
    C: GETSTATE %(USER u)       S: STATE %(USER u STATE %(...) MODSEQ n)
    C: PUSH %(USER u ACK a MASSDELETE F) + change set
                                S: [ACK %(USER u LEVEL a)]  (version 2, ACK received|durable)
                                   RESULT %(... COUNTER T|F) [+ change set]  |  LOCKED  |  NO
                                   (LOCKED may come while the change set is still being
                                   sent; the sender then ends it with END %(ABORTED T))
    C: PULL %(USER u BASE %(...) [PARTS T])
                                S: change set  |  NO
    C: FOLLOW %(USERS (...)|NIL)   (version 2)
                                S: OK, then CHANGED %(USER u MODSEQ n) whenever u changes,
                                   between answers, until UNFOLLOW (answered OK)
    C: LOCK %(USER u) / UNLOCK  (version 2)     S: OK | LOCKED | NO
    C: LOGOUT                   S: BYE
    change set = CHANGESET %(USER SENDER BASE STATE CRCS DIGEST MAXMODSEQ ITEMS n BODIES (...))
                 ITEMS (item ...)*                   at most ITEMS_PER_FRAME items each
                 BODY %(ADDRESS OFFSET SIZE DATA)*   a big body in chunks, in order
                 BODIES ((address data) ...)*        small bodies, whole, many to a frame
                 END %(ABORTED F)                    (T: the sender gave up; discard it)
    version 3:   ITEMS {n}                           the items in engine.changeset's msgpack
                                                     form (encode_items), not DLIST values
                 ZBODIES {n}                         small bodies as stored: a msgpack array of
                                                     [address size method payload] (method 0:
                                                     a zstd frame, 1: the bytes as they are)
                 END %(MORE T)                       another change set follows: the parts of
                                                     a first full replication (changeset.split)

A first full replication (an empty base; for PULL, ``PARTS T`` says the
puller holds nothing of the user) may travel as consecutive change sets,
each legal on its own and applied in its own transaction as soon as it has
arrived, while the next one arrives.  A PUSH in parts is answered once,
after the last part (or the first that fails: the later ones are read and
dropped); its ACK level is ``applied``.

Versions
--------
``HELLO`` lists every version the client speaks; the server answers with
the highest it shares, so an older peer is served at its version, and
refuses (``BYE``, code ``version``) when there is none, naming the
versions it speaks.  Version 1: accounts, LISTUSERS, GETSTATE, PUSH,
PULL.  Version 2 adds FOLLOW / UNFOLLOW / CHANGED (live notification),
LOCK / UNLOCK, and early acknowledgements (``PUSH ... ACK
received|durable`` answered by ``ACK``) for synchronous replicas.  Version
3 changes only how a change set travels, for speed: items in
``engine.changeset``'s msgpack form (decoded ~20 times faster than DLIST
values: 3 against 60 µs a record), and small bodies as the sender's packs
store them (``ZBODIES``), so that neither side compresses or decompresses a
body twice; the receiver still checks every body against its address.  A
message of a later version on an earlier version's connection is a
protocol error in both directions.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dlist.binary import decode_line, encode_line
from dlist.errors import DlistProtocolError
from dlist.limits import MAX_FILE
from dlist.model import LIST, LITERAL, Line

from . import errors
from .blobs import METHOD_RAW, METHOD_ZSTD
from .changeset import ChangeSet, Item, decode_items, encode_items
from .wire import (
    WireError,
    check_vv,
    fields_node,
    header_fields,
    header_from_fields,
    item_node,
    node_fields,
    node_item,
)

#: Protocol versions this modsync speaks, oldest first.
PROTOCOL_VERSIONS = (1, 2, 3)
SOFTWARE = "modsync/0.1"

# -- limits ---------------------------------------------------------------------------
#: Largest frame before the peer has logged in.  HELLO and AUTH are under
#: 2 KiB (passwords are at most engine.accounts.MAX_PASSWORD = 1024
#: characters); 64 KiB is generous and keeps an anonymous peer from making
#: the server buffer anything worth having.
MAX_FRAME_BEFORE_AUTH = 64 * 1024

#: Largest frame after login.  Items go ITEMS_PER_FRAME to a frame (about
#: 0.4 MB for records) and bodies BODY_CHUNK at a time; the CHANGESET header
#: lists body addresses (32 bytes each: 16 MiB is 500,000 new messages in
#: one change set).  The same figure as dlist.limits.MAX_LITERAL.
MAX_FRAME = 16 * 1024 * 1024

#: Items per ITEMS frame when sending.  1,000 records are ~400 KB: large
#: enough that framing costs nothing, small enough to stream.
ITEMS_PER_FRAME = 1000

#: Body bytes per BODY frame when sending: a 50 MB attachment goes in 50
#: frames and is never copied whole into one frame.
BODY_CHUNK = 1024 * 1024

#: Bodies up to this size go whole, many to a BODIES frame of at most
#: BODY_CHUNK bytes: one frame per 4 KB message would cost more in framing
#: than the message itself.
SMALL_BODY = 64 * 1024

#: Largest body: dlist.limits.MAX_FILE (1 GiB), the ceiling modsync accepts
#: from Cyrus too.
MAX_BODY = MAX_FILE

#: Default ceiling of one change set (every frame from CHANGESET to END).
#: A first sync of a 100,000-message mailbox of 10 KB mean size is ~1 GB;
#: 8 GiB leaves room for big mailboxes while bounding a runaway sender.
#: Servers lower it with ``max_changeset``.
DEFAULT_MAX_CHANGESET = 8 * 1024 ** 3

_LEN = struct.Struct(">I")
_DASH = b"-"

ACK_LEVELS = ("received", "durable", "applied")


class ProtocolError(errors.ProtocolError):
    """The peer (or we) broke the protocol.  ``offset``: where in the received stream.

    ``code`` says what kind of break, for the peer and the logs: ``protocol``
    (malformed or out of order), ``too-large`` (a limit), ``version``,
    ``disconnected`` (the stream ended inside a change set).
    """

    def __init__(self, reason: str, *, offset: int | None = None, code: str = "protocol"):
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{reason}{where}")
        self.reason = reason
        self.offset = offset
        self.code = code


# -- events -------------------------------------------------------------------------------
class Event:
    """Base of every protocol event (immutable)."""


@dataclass(frozen=True)
class Hello(Event):
    versions: tuple = PROTOCOL_VERSIONS
    software: str = SOFTWARE
    store_id: str | None = None


@dataclass(frozen=True)
class Welcome(Event):
    version: int
    versions: tuple = PROTOCOL_VERSIONS
    software: str = SOFTWARE
    store_id: str | None = None


@dataclass(frozen=True)
class Auth(Event):
    name: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Ok(Event):
    text: str = ""
    account: str | None = None
    admin: bool = False


@dataclass(frozen=True)
class No(Event):
    """A command was refused; the connection carries on."""
    code: str
    text: str
    user: str | None = None


@dataclass(frozen=True)
class Bye(Event):
    """The sender closes the connection after this."""
    code: str
    text: str


@dataclass(frozen=True)
class ListUsers(Event):
    pass


@dataclass(frozen=True)
class Users(Event):
    users: tuple


@dataclass(frozen=True)
class GetState(Event):
    user: str


@dataclass(frozen=True)
class State(Event):
    user: str
    state: dict
    modseq: int = 0


@dataclass(frozen=True)
class Push(Event):
    """A change set for ``user`` follows.  ``ack``: when to acknowledge (version 2).

    ``mass_delete``: the sender means it if the change set removes most of
    the user's mail (honoured for admins and the user's own account).
    """
    user: str
    ack: str = "applied"
    mass_delete: bool = False


@dataclass(frozen=True)
class Pull(Event):
    """``parts``: the puller holds nothing of the user and takes the answer in parts
    (version 3; see ChangeSetEnd)."""
    user: str
    base: dict
    parts: bool | None = None


@dataclass(frozen=True)
class Result(Event):
    """How a pushed change set went.  ``counter``: a change set of the receiver's follows."""
    user: str
    status: str
    code: str = ""
    reason: str = ""
    state: dict = field(default_factory=dict)
    written: int = 0
    counter: bool = False


@dataclass(frozen=True)
class Ack(Event):
    user: str
    level: str


@dataclass(frozen=True)
class Locked(Event):
    user: str
    text: str = ""


@dataclass(frozen=True)
class Follow(Event):
    users: tuple | None = None


@dataclass(frozen=True)
class Unfollow(Event):
    pass


@dataclass(frozen=True)
class Changed(Event):
    user: str
    modseq: int


@dataclass(frozen=True)
class Lock(Event):
    user: str


@dataclass(frozen=True)
class Unlock(Event):
    user: str


@dataclass(frozen=True)
class Logout(Event):
    pass


@dataclass(frozen=True)
class ChangeSetStart(Event):
    """A change set begins: its header (``changeset.items`` empty) and how many items follow."""
    changeset: ChangeSet
    n_items: int


@dataclass(frozen=True)
class Items(Event):
    items: tuple


@dataclass(frozen=True)
class Body(Event):
    """A chunk of one body: ``data`` goes at ``offset`` of a body of ``size`` bytes."""
    address: bytes
    offset: int
    size: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Bodies(Event):
    """Whole small bodies, many to a frame: ((address, data), ...)."""
    bodies: tuple = field(repr=False)


@dataclass(frozen=True)
class PackedBodies(Event):
    """Whole small bodies as a pack stores them (version 3): ((address, size, method,
    payload), ...); ``method`` is engine.blobs.METHOD_ZSTD or METHOD_RAW."""
    bodies: tuple = field(repr=False)


def feed_changeset(incoming, ev: Event) -> bool:
    """Give a change set's content event (ITEMS, BODY, BODIES, ZBODIES) to an
    ``engine.wire.Incoming``; False for any other event, which the caller handles."""
    if isinstance(ev, Items):
        incoming.add_items(ev.items)
    elif isinstance(ev, PackedBodies):
        incoming.packed_bodies(ev.bodies)
    elif isinstance(ev, Bodies):
        for address, data in ev.bodies:
            incoming.whole_body(address, data)
    elif isinstance(ev, Body):
        incoming.body(ev.address, ev.offset, ev.size, ev.data)
    else:
        return False
    return True


@dataclass(frozen=True)
class ChangeSetEnd(Event):
    """``more``: another change set of the same transfer follows (version 3): the
    parts of a first full replication, ``engine.changeset.split``."""
    aborted: bool = False
    more: bool | None = None


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The peer closed its side (receive_data(b""))."""


# Wire name, who sends it, the first version that has it, and its fields:
# (wire field, attribute, type, required).  Types: str, int, bool, bytes,
# "vv" (version vector), "ints"/"strs" (lists), "strs?" and "str?" (or NIL),
# or a function check(field name, value) -> value that raises WireError.
C, S, BOTH = "client", "server", "both"
_MESSAGES: dict[type, tuple[str, str, int, tuple]] = {
    Hello: ("HELLO", C, 1, (("VERSIONS", "versions", "ints", True),
                            ("SOFTWARE", "software", str, False),
                            ("STOREID", "store_id", "str?", False))),
    Welcome: ("WELCOME", S, 1, (("VERSION", "version", int, True),
                                ("VERSIONS", "versions", "ints", False),
                                ("SOFTWARE", "software", str, False),
                                ("STOREID", "store_id", "str?", False))),
    Auth: ("AUTH", C, 1, (("NAME", "name", str, True), ("PASSWORD", "password", str, True))),
    Ok: ("OK", S, 1, (("TEXT", "text", str, False), ("ACCOUNT", "account", "str?", False),
                      ("ADMIN", "admin", bool, False))),
    No: ("NO", S, 1, (("CODE", "code", str, True), ("TEXT", "text", str, True),
                      ("USER", "user", "str?", False))),
    Bye: ("BYE", BOTH, 1, (("CODE", "code", str, True), ("TEXT", "text", str, True))),
    ListUsers: ("LISTUSERS", C, 1, ()),
    Users: ("USERS", S, 1, (("USERS", "users", "strs", True),)),
    GetState: ("GETSTATE", C, 1, (("USER", "user", str, True),)),
    State: ("STATE", S, 1, (("USER", "user", str, True), ("STATE", "state", "vv", True),
                            ("MODSEQ", "modseq", int, False))),
    Push: ("PUSH", C, 1, (("USER", "user", str, True), ("ACK", "ack", str, False),
                          ("MASSDELETE", "mass_delete", bool, False))),
    Pull: ("PULL", C, 1, (("USER", "user", str, True), ("BASE", "base", "vv", True),
                          ("PARTS", "parts", bool, False))),
    Result: ("RESULT", S, 1, (("USER", "user", str, True), ("STATUS", "status", str, True),
                              ("CODE", "code", str, False), ("REASON", "reason", str, False),
                              ("STATE", "state", "vv", False), ("WRITTEN", "written", int, False),
                              ("COUNTER", "counter", bool, False))),
    Ack: ("ACK", S, 2, (("USER", "user", str, True), ("LEVEL", "level", str, True))),
    Locked: ("LOCKED", S, 1, (("USER", "user", str, True), ("TEXT", "text", str, False))),
    Follow: ("FOLLOW", C, 2, (("USERS", "users", "strs?", False),)),
    Unfollow: ("UNFOLLOW", C, 2, ()),
    Changed: ("CHANGED", S, 2, (("USER", "user", str, True), ("MODSEQ", "modseq", int, True))),
    Lock: ("LOCK", C, 2, (("USER", "user", str, True),)),
    Unlock: ("UNLOCK", C, 2, (("USER", "user", str, True),)),
    Logout: ("LOGOUT", C, 1, ()),
    Body: ("BODY", BOTH, 1, (("ADDRESS", "address", bytes, True), ("OFFSET", "offset", int, True),
                             ("SIZE", "size", int, True), ("DATA", "data", bytes, True))),
    ChangeSetEnd: ("END", BOTH, 1, (("ABORTED", "aborted", bool, False),
                                    ("MORE", "more", bool, False))),
}
# Fields younger than their message: the first version that has them.
_FIELD_SINCE = {(ChangeSetEnd, "MORE"): 3, (Pull, "PARTS"): 3}
_BY_NAME = {spec[0]: cls for cls, spec in _MESSAGES.items()}
_CHANGESET, _ITEMS, _BODIES, _ZBODIES = "CHANGESET", "ITEMS", "BODIES", "ZBODIES"


def register_message(cls: type, name: str, sender: str, since: int, fields: tuple) -> None:
    """Add a message defined by another module (``engine.archive_protocol``'s) to the
    protocol, in the form of ``_MESSAGES``; such a module registers its messages when
    imported, and both ends import it."""
    if _BY_NAME.get(name, cls) is not cls or name in (_CHANGESET, _ITEMS, _BODIES, _ZBODIES):
        raise ValueError(f"protocol message {name} is already defined")
    if sender not in (C, S, BOTH):
        raise ValueError(f"{name}: sender must be {C!r}, {S!r} or {BOTH!r}")
    _MESSAGES[cls] = (name, sender, since, tuple(fields))
    _BY_NAME[name] = cls
#: The first version with items in msgpack form and ZBODIES.
PACKED_VERSION = 3
_ZBODY_TYPES = (bytes, int, int, bytes)       # address, size, method, payload

_TYPE_NAMES = {str: "a string", int: "a number", bool: "T or F", bytes: "a literal"}


def _check_field(name: str, value: Any, kind) -> Any:
    if callable(kind) and not isinstance(kind, type):
        return kind(name, value)
    if kind == "vv":
        return check_vv(value, name)
    if kind in ("ints", "strs", "strs?"):
        if value is None and kind == "strs?":
            return None
        want = int if kind == "ints" else str
        if type(value) is not list or any(type(x) is not want for x in value):
            raise WireError(f"field {name} must be a list of {'numbers' if want is int else 'strings'}")
        return tuple(value)
    if kind == "str?":
        if value is not None and type(value) is not str:
            raise WireError(f"field {name} must be a string or NIL")
        return value
    if type(value) is not kind:
        raise WireError(f"field {name} must be {_TYPE_NAMES[kind]}")
    return value


# -- the connection -------------------------------------------------------------------------
HELLO, AUTH, READY, CLOSED = "hello", "auth", "ready", "closed"


class _ChangeSetStream:
    """Checks one change set in one direction: counts, body order, size ceiling."""

    __slots__ = ("body", "body_off", "body_size", "bytes", "expected", "items", "limit", "listed")

    def __init__(self, n_items: int, bodies, limit: int):
        self.expected = n_items
        self.items = 0
        self.listed = set(bodies)
        self.body = None
        self.body_size = self.body_off = 0
        self.bytes = 0
        self.limit = limit

    def count(self, n: int, offset: int | None) -> None:
        self.bytes += n
        if self.bytes > self.limit:
            raise ProtocolError(f"change set larger than the limit of {self.limit} bytes",
                                offset=offset, code="too-large")

    def add_items(self, n: int, offset) -> None:
        self.items += n
        if self.items > self.expected:
            raise ProtocolError(f"change set carries more than the {self.expected} items it "
                                f"announced", offset=offset)

    def _start_body(self, address: bytes, size: int, offset) -> None:
        if self.body is not None and self.body_off != self.body_size:
            raise ProtocolError(f"body {self.body.hex()[:16]} ended after {self.body_off} of "
                                f"{self.body_size} bytes", offset=offset)
        if address not in self.listed:
            raise ProtocolError(f"body {address.hex()[:16]} is not in the change set's "
                                f"list (or came twice)", offset=offset)
        if not 0 <= size <= MAX_BODY:
            raise ProtocolError(f"body of {size} bytes exceeds MAX_BODY ({MAX_BODY})",
                                offset=offset, code="too-large")
        self.listed.discard(address)

    def add_body(self, ev: Body, offset) -> None:
        if ev.offset == 0:
            self._start_body(ev.address, ev.size, offset)
            self.body, self.body_size, self.body_off = ev.address, ev.size, 0
        elif ev.address != self.body or ev.offset != self.body_off or ev.size != self.body_size:
            raise ProtocolError("body chunk out of order", offset=offset)
        self.body_off += len(ev.data)
        if self.body_off > self.body_size:
            raise ProtocolError(f"body {ev.address.hex()[:16]} longer than its declared "
                                f"{self.body_size} bytes", offset=offset)

    def add_small(self, address: bytes, size: int, offset) -> None:
        self._start_body(address, size, offset)
        self.body = None

    def end(self, ev: ChangeSetEnd, offset) -> None:
        if ev.aborted:
            return
        if self.body is not None and self.body_off != self.body_size:
            raise ProtocolError(f"change set ended inside body {self.body.hex()[:16]}",
                                offset=offset)
        if self.items != self.expected:
            raise ProtocolError(f"change set announced {self.expected} items and carried "
                                f"{self.items}", offset=offset)


class Connection:
    """One end of a modsync protocol connection.

    ``role`` is "client" or "server".  ``versions`` are the protocol
    versions this end speaks; ``max_changeset`` bounds what it accepts.
    After the handshake ``version`` is the negotiated version.
    """

    def __init__(self, role: str, *, versions=PROTOCOL_VERSIONS,
                 max_changeset: int = DEFAULT_MAX_CHANGESET, max_frame: int = MAX_FRAME):
        if role not in (C, S):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        self.role = role
        self.peer_role = S if role == C else C
        self.versions = tuple(sorted(versions))
        self.version: int | None = None
        self.phase = HELLO
        self.max_changeset = max_changeset
        self.max_frame = max_frame
        self._buf = bytearray()
        self._offset = 0            # stream offset of _buf[0]
        self._in: _ChangeSetStream | None = None    # change set being received
        self._out: _ChangeSetStream | None = None   # change set being sent
        self._part_follows = False  # END MORE received: the next frame starts a change set
        self._sent_hello = False

    # -- state the transport may look at ---------------------------------------------
    @property
    def receiving_changeset(self) -> bool:
        return self._in is not None

    @property
    def sending_changeset(self) -> bool:
        return self._out is not None

    @property
    def mid_frame(self) -> bool:
        """Some bytes of an incomplete frame are buffered (a stall here is a fault)."""
        return bool(self._buf)

    @property
    def closed(self) -> bool:
        return self.phase == CLOSED

    # -- receiving ---------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes (b"" at end of stream); return the events they complete."""
        if self.phase == CLOSED:
            if data:
                raise ProtocolError("data after the connection closed", offset=self._offset)
            return []
        if not data:
            if self._in is not None:
                raise ProtocolError("connection closed in the middle of a change set (which "
                                    "therefore does not count)", offset=self._offset,
                                    code="disconnected")
            if self._buf:
                raise ProtocolError(f"connection closed inside a frame ({len(self._buf)} bytes "
                                    f"of it received)", offset=self._offset)
            self.phase = CLOSED
            return [ConnectionClosed()]
        self._buf += data
        out: list[Event] = []
        buf = self._buf
        pos = 0
        with memoryview(buf) as view:       # frames are decoded in place, not copied out
            while len(buf) - pos >= 4 and self.phase != CLOSED:
                (n,) = _LEN.unpack_from(buf, pos)
                at = self._offset + pos
                limit = self.max_frame if self.phase == READY else MAX_FRAME_BEFORE_AUTH
                if n == 0 or n > limit:
                    raise ProtocolError(f"frame of {n} bytes (this end accepts 1 to {limit} "
                                        f"now)", offset=at, code="too-large" if n else "protocol")
                if len(buf) - pos - 4 < n:
                    break
                with view[pos + 4:pos + 4 + n] as payload:
                    pos += 4 + n
                    out.append(self._event(payload, at, n + 4))
        if pos:
            del buf[:pos]
            self._offset += pos
        return out

    def _event(self, payload: bytes, at: int, size: int) -> Event:
        try:
            line = decode_line(payload)
        except DlistProtocolError as e:
            raise ProtocolError(f"frame is not a DLIST binary line ({e.message})", offset=at)
        verb = line.verb
        if line.value is None:
            raise ProtocolError(f"{verb[:20]!r} line without a value", offset=at)
        try:
            if verb == _ITEMS:
                ev = self._items(line, at)
            elif verb == _BODIES:
                ev = self._bodies(line, at)
            elif verb == _ZBODIES:
                ev = self._packed_bodies(line, at)
            elif verb == _CHANGESET:
                ev = self._changeset_start(line, at)
            else:
                cls = _BY_NAME.get(verb)
                if cls is None:
                    raise ProtocolError(f"unknown message {verb[:20]!r}", offset=at)
                ev = self._message(cls, line, at)
        except (WireError, DlistProtocolError) as e:
            raise ProtocolError(f"{verb[:20]}: {getattr(e, 'message', None) or e}", offset=at)
        if self._part_follows and not isinstance(ev, (ChangeSetStart, Bye)):
            raise ProtocolError(f"a change set announced another part, then came "
                                f"{verb[:20]}", offset=at)
        self._part_follows = False
        if self._in is not None:
            self._in.count(size, at)
            if isinstance(ev, Body):
                self._in.add_body(ev, at)
            elif isinstance(ev, ChangeSetEnd):
                self._in.end(ev, at)
                self._in = None
                self._part_follows = bool(ev.more) and not ev.aborted
        self._after_receive(ev)
        return ev

    def _items(self, line: Line, at: int) -> Items:
        if self._in is None:
            raise ProtocolError("ITEMS outside a change set", offset=at)
        node = line.value.node
        if (self.version or 1) >= PACKED_VERSION:
            if type(node) is not tuple or len(node) != 2 or node[0] != LITERAL \
                    or type(node[1]) is not bytes:
                raise ProtocolError("ITEMS value must be a literal (protocol version "
                                    f"{self.version})", offset=at)
            try:
                items = decode_items(node[1])
            except errors.ProtocolError as e:
                raise ProtocolError(str(e), offset=at) from None
            self._in.add_items(len(items), at)
            return Items(tuple(items))
        if type(node) is not tuple or not node or node[0] != LIST:
            raise ProtocolError("ITEMS value must be a list", offset=at)
        self._in.add_items(len(node) - 1, at)
        return Items(tuple(node_item(n) for n in node[1:]))

    def _bodies(self, line: Line, at: int) -> Bodies:
        if self._in is None:
            raise ProtocolError("BODIES outside a change set", offset=at)
        node = line.value.node
        if type(node) is not tuple or not node or node[0] != LIST:
            raise ProtocolError("BODIES value must be a list", offset=at)
        out = []
        for n in node[1:]:
            if (type(n) is not tuple or len(n) != 3 or n[0] != LIST or type(n[1]) is not tuple
                    or type(n[2]) is not tuple or len(n[1]) != 2 or len(n[2]) != 2
                    or n[1][0] != LITERAL or n[2][0] != LITERAL or type(n[1][1]) is not bytes
                    or type(n[2][1]) is not bytes or len(n[1][1]) != 32):
                raise ProtocolError("BODIES entries are (address data)", offset=at)
            self._in.add_small(n[1][1], len(n[2][1]), at)
            out.append((n[1][1], n[2][1]))
        return Bodies(tuple(out))

    def _packed_bodies(self, line: Line, at: int) -> PackedBodies:
        if (self.version or 1) < PACKED_VERSION:
            raise ProtocolError(f"ZBODIES needs protocol version {PACKED_VERSION}; this "
                                f"connection speaks {self.version}", offset=at)
        if self._in is None:
            raise ProtocolError("ZBODIES outside a change set", offset=at)
        node = line.value.node
        if type(node) is not tuple or len(node) != 2 or node[0] != LITERAL \
                or type(node[1]) is not bytes:
            raise ProtocolError("ZBODIES value must be a literal", offset=at)
        try:
            entries = msgpack.unpackb(node[1], use_list=False, raw=False, max_str_len=0,
                                      max_map_len=0, max_ext_len=0)
        except (ValueError, msgpack.UnpackException) as e:
            raise ProtocolError(f"ZBODIES is not msgpack ({e})", offset=at) from None
        if type(entries) is not tuple:
            raise ProtocolError("ZBODIES holds a list of bodies", offset=at)
        add_small = self._in.add_small
        for e in entries:
            if type(e) is not tuple or tuple(map(type, e)) != _ZBODY_TYPES or len(e[0]) != 32:
                raise ProtocolError("ZBODIES entries are [address size method payload]",
                                    offset=at)
            address, size, method, payload = e
            if not 0 <= size <= SMALL_BODY:
                raise ProtocolError(f"ZBODIES: a body of {size} bytes (whole bodies are at "
                                    f"most {SMALL_BODY})", offset=at, code="too-large")
            if method == METHOD_RAW:
                if len(payload) != size:
                    raise ProtocolError(f"ZBODIES: body {address.hex()[:16]} is {len(payload)} "
                                        f"bytes, not {size}", offset=at)
            elif method != METHOD_ZSTD:
                raise ProtocolError(f"ZBODIES: unknown storage method {method}", offset=at)
            elif len(payload) >= size:
                # A pack stores such a body raw (engine.blobs): no stored byte more.
                raise ProtocolError(f"ZBODIES: body {address.hex()[:16]} compressed to "
                                    f"{len(payload)} of its {size} bytes", offset=at)
            add_small(address, size, at)
        return PackedBodies(entries)

    def _changeset_start(self, line: Line, at: int) -> ChangeSetStart:
        if self.phase != READY:
            raise ProtocolError("change set before login", offset=at)
        if self._in is not None:
            raise ProtocolError("CHANGESET inside a change set", offset=at)
        cs, n = header_from_fields(node_fields(line.value.node))
        self._in = _ChangeSetStream(n, cs.bodies, self.max_changeset)
        return ChangeSetStart(cs, n)

    def _message(self, cls: type, line: Line, at: int) -> Event:
        name, sender, since, spec = _MESSAGES[cls]
        if sender not in (self.peer_role, BOTH):
            raise ProtocolError(f"{name} is not a message a {self.peer_role} sends", offset=at)
        if self.version is not None and since > self.version:
            raise ProtocolError(f"{name} needs protocol version {since}; this connection "
                                f"speaks {self.version}", offset=at)
        in_cs = cls in (Body, ChangeSetEnd)
        if in_cs != (self._in is not None):
            raise ProtocolError(f"{name} {'outside' if in_cs else 'inside'} a change set",
                                offset=at)
        self._check_phase(cls, name, at)
        f = node_fields(line.value.node)
        kwargs = {}
        for wire_name, attr, kind, required in spec:
            if wire_name not in f:
                if required:
                    raise ProtocolError(f"{name} without {wire_name}", offset=at)
                continue
            if _FIELD_SINCE.get((cls, wire_name), 1) > (self.version or 1):
                raise ProtocolError(f"{name} {wire_name} needs protocol version "
                                    f"{_FIELD_SINCE[cls, wire_name]}; this connection speaks "
                                    f"{self.version}", offset=at)
            kwargs[attr] = _check_field(wire_name, f[wire_name], kind)
        try:
            ev = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"{name}: {e}", offset=at)
        if isinstance(ev, Push) and ev.ack not in ACK_LEVELS:
            raise ProtocolError(f"PUSH: unknown ACK level {ev.ack!r}", offset=at)
        return ev

    def _check_phase(self, cls: type, name: str, at) -> None:
        ph = self.phase
        if self.role == S:
            ok = (cls is Hello) if ph == HELLO else (
                cls in (Auth, Logout) if ph == AUTH else cls not in (Hello, Auth))
        else:
            ok = (cls in (Welcome, Bye)) if ph == HELLO else (
                cls in (Ok, No, Bye) if ph == AUTH else cls is not Welcome)
        if not ok:
            raise ProtocolError(f"{name} is out of place ({ph} phase)", offset=at)

    def _after_receive(self, ev: Event) -> None:
        if isinstance(ev, Bye):
            self.phase = CLOSED
        elif isinstance(ev, Welcome):
            if ev.version not in self.versions:
                raise ProtocolError(f"the server chose protocol version {ev.version}, which this "
                                    f"end does not speak ({_list(self.versions)})", code="version")
            self.version = ev.version
            self.phase = AUTH
        elif isinstance(ev, Ok) and self.role == C and self.phase == AUTH:
            self.phase = READY

    # -- sending ---------------------------------------------------------------------------
    def choose_version(self, hello: Hello) -> int | None:
        """The version to serve a client at (the highest both speak), or None."""
        common = set(hello.versions) & set(self.versions)
        return max(common) if common else None

    def refusal(self, hello: Hello) -> Bye:
        """The BYE for a client that shares no version with us."""
        return Bye("version", f"this server speaks protocol versions {_list(self.versions)}; "
                              f"the client offered {_list(hello.versions) or 'none'}: upgrade "
                              f"the older side")

    def _frame(self, verb: str, node) -> bytes:
        payload = encode_line(Line._make(verb, _DASH, node, None))
        if len(payload) > self.max_frame:
            raise ProtocolError(f"{verb} would be a frame of {len(payload)} bytes",
                                code="too-large")
        return _LEN.pack(len(payload)) + payload

    def send(self, event: Event) -> bytes:
        """The bytes for one event.  ProtocolError if it is out of place here."""
        if self.phase == CLOSED:
            raise ProtocolError("the connection is closed")
        if isinstance(event, ChangeSetStart):
            if self.phase != READY or self._out is not None:
                raise ProtocolError("cannot start a change set here")
            data = self._frame(_CHANGESET, fields_node(header_fields(event.changeset,
                                                                     event.n_items)))
            self._out = _ChangeSetStream(event.n_items, event.changeset.bodies, 1 << 62)
            return data
        if isinstance(event, Items):
            if self._out is None:
                raise ProtocolError("ITEMS outside a change set")
            self._out.add_items(len(event.items), None)
            if self.version >= PACKED_VERSION:
                return self._frame(_ITEMS, (LITERAL, encode_items(event.items)))
            return self._frame(_ITEMS, (LIST, *map(item_node, event.items)))
        if isinstance(event, Bodies):
            if self._out is None:
                raise ProtocolError("BODIES outside a change set")
            for a, d in event.bodies:
                self._out.add_small(a, len(d), None)
            return self._frame(_BODIES, (LIST, *[(LIST, (LITERAL, a), (LITERAL, bytes(d)))
                                                 for a, d in event.bodies]))
        if isinstance(event, PackedBodies):
            if (self.version or 1) < PACKED_VERSION:
                raise ProtocolError(f"ZBODIES needs protocol version {PACKED_VERSION}; this "
                                    f"connection speaks {self.version}", code="version")
            if self._out is None:
                raise ProtocolError("ZBODIES outside a change set")
            for a, size, _method, _payload in event.bodies:
                self._out.add_small(a, size, None)
            return self._frame(_ZBODIES, (LITERAL, msgpack.packb(event.bodies)))
        spec = _MESSAGES.get(type(event))
        if spec is None:
            raise TypeError(f"{event!r} is not a protocol event")
        name, sender, since, fields = spec
        if sender not in (self.role, BOTH):
            raise ProtocolError(f"a {self.role} does not send {name}")
        if self.version is not None and since > self.version:
            raise ProtocolError(f"{name} needs protocol version {since}; this connection "
                                f"speaks {self.version}", code="version")
        in_cs = isinstance(event, (Body, ChangeSetEnd))
        if in_cs != (self._out is not None):
            raise ProtocolError(f"{name} {'outside' if in_cs else 'inside'} a change set")
        self._check_send_phase(event, name)
        if isinstance(event, Body):
            self._out.add_body(event, None)
        elif isinstance(event, ChangeSetEnd):
            self._out.end(event, None)
            self._out = None
        values = {}
        for wire_name, attr, kind, required in fields:
            v = getattr(event, attr)
            if v is None and not required:
                continue
            if _FIELD_SINCE.get((type(event), wire_name), 1) > (self.version or 1):
                raise ProtocolError(f"{name} {wire_name} needs protocol version "
                                    f"{_FIELD_SINCE[type(event), wire_name]}; this connection "
                                    f"speaks {self.version}", code="version")
            if kind in ("ints", "strs", "strs?"):
                v = list(v)
            values[wire_name] = v
        data = self._frame(name, fields_node(values))
        self._after_send(event)
        return data

    def _check_send_phase(self, ev: Event, name: str) -> None:
        ph = self.phase
        if self.role == C:
            ok = isinstance(ev, (Hello, Bye)) if ph == HELLO else (
                isinstance(ev, (Auth, Logout, Bye)) if ph == AUTH
                else not isinstance(ev, (Hello, Auth)))
            if ph == HELLO and isinstance(ev, Hello) and self._sent_hello:
                ok = False
        else:
            ok = isinstance(ev, (Welcome, Bye)) if ph == HELLO else (
                isinstance(ev, (Ok, No, Bye)) if ph == AUTH else not isinstance(ev, Welcome))
        if not ok:
            raise ProtocolError(f"cannot send {name} in the {ph} phase")

    def _after_send(self, ev: Event) -> None:
        if isinstance(ev, Bye):
            self.phase = CLOSED
        elif isinstance(ev, Hello):
            self._sent_hello = True
        elif isinstance(ev, Welcome):
            if ev.version not in self.versions:
                raise ProtocolError(f"cannot serve version {ev.version}")
            self.version = ev.version
            self.phase = AUTH
        elif isinstance(ev, Ok) and self.role == S and self.phase == AUTH:
            self.phase = READY


def changeset_events(cs: ChangeSet, read_body, *, read_packed=None, more: bool = False,
                     chunk: int = BODY_CHUNK, items_per_frame: int = ITEMS_PER_FRAME):
    """The events that send ``cs``: CHANGESET, ITEMS..., BODIES/ZBODIES/BODY..., END
    (``END MORE``: another part follows, version 3).

    ``read_body(address) -> bytes`` supplies each listed body when its turn
    comes (lazily, one body at a time).  With ``read_packed(addresses, limit)``
    yielding (address, (method, payload, size)), or (address, None) for a body
    over ``limit`` bytes (for a version-3 connection: ``Store.read_packed``),
    small bodies go as stored (ZBODIES), in the order it gives them, and only
    big ones are read whole.
    """
    yield ChangeSetStart(cs, len(cs.items))
    items = cs.items
    for i in range(0, len(items), items_per_frame):
        yield Items(tuple(items[i:i + items_per_frame]))
    end = ChangeSetEnd(more=True) if more else ChangeSetEnd()
    if read_packed is not None:
        yield from _packed_body_events(cs.bodies, read_body, read_packed, chunk)
        yield end
        return
    batch, batch_bytes = [], 0
    for address in cs.bodies:
        data = read_body(address)
        size = len(data)
        if size <= SMALL_BODY and size <= chunk:
            if batch_bytes + size > chunk and batch:
                yield Bodies(tuple(batch))
                batch, batch_bytes = [], 0
            batch.append((address, data))
            batch_bytes += size
            continue
        if batch:
            yield Bodies(tuple(batch))
            batch, batch_bytes = [], 0
        yield from _chunks(address, data, chunk)
    if batch:
        yield Bodies(tuple(batch))
    yield end


def parts_events(parts: list[ChangeSet], read_body, *, read_packed=None):
    """The events that send the parts of one transfer (``engine.changeset.split``)."""
    for k, part in enumerate(parts):
        yield from changeset_events(part, read_body, read_packed=read_packed,
                                    more=k < len(parts) - 1)


def _packed_body_events(addresses, read_body, read_packed, chunk: int):
    batch, batch_bytes = [], 0
    for address, stored in read_packed(addresses, min(SMALL_BODY, chunk)):
        if stored is not None:
            method, payload, size = stored
            if batch_bytes + len(payload) > chunk and batch:
                yield PackedBodies(tuple(batch))
                batch, batch_bytes = [], 0
            batch.append((address, size, method, payload))
            batch_bytes += len(payload)
            continue
        if batch:
            yield PackedBodies(tuple(batch))
            batch, batch_bytes = [], 0
        yield from _chunks(address, read_body(address), chunk)
    if batch:
        yield PackedBodies(tuple(batch))


def _chunks(address: bytes, data: bytes, chunk: int):
    view = memoryview(data)
    size = len(data)
    for off in range(0, size, chunk):
        yield Body(address, off, size, bytes(view[off:off + chunk]))


def _list(versions) -> str:
    return ", ".join(str(v) for v in versions)


__all__ = [
    "PROTOCOL_VERSIONS",
    "Ack",
    "Auth",
    "Bodies",
    "Body",
    "Bye",
    "ChangeSetEnd",
    "ChangeSetStart",
    "Changed",
    "Connection",
    "ConnectionClosed",
    "Follow",
    "GetState",
    "Hello",
    "Item",
    "Items",
    "ListUsers",
    "Lock",
    "Locked",
    "Logout",
    "No",
    "Ok",
    "PackedBodies",
    "ProtocolError",
    "Pull",
    "Push",
    "Result",
    "State",
    "Unfollow",
    "Unlock",
    "Users",
    "Welcome",
    "changeset_events",
    "parts_events",
]
