"""Change sets: "for user U, from base state S, these changes, giving state T".

A *state* is a version vector: for each origin store (by store id), the
highest of that origin's modseqs included.  Every object carries the stamp
(origin, origin modseq) of its last change, so what a receiver at state S
lacks is exactly the objects whose stamp S does not cover; the store's
per-origin index finds them in O(changes), across chains (A to B to C) and
among any number of masters.

A change set holds the *current state* of each changed object (tombstones
included), in a store-independent form: mailboxes by unique id, origins by
store id.  It also claims what the receiver will hold afterwards (mailbox
CRCs, user digest) so a clean apply can be checked, and lists the bodies a
receiver may need.  ``engine.apply`` applies, rejects or merges them.

Wire form: msgpack arrays behind a format version (``encode``/``decode``);
positional fields keep it small and fast to decode.
"""
from __future__ import annotations

import base64
import bisect
import gc
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import msgpack

from .db import prefix_end
from .errors import FullSyncNeeded, ProtocolError
from .model import (
    ACL, ANNOTATION, KIND_CLASSES, KIND_NAMES, MAILBOX, QUOTA, RECORD, SEEN, SIEVE, SUBSCRIPTION,
    U32, U64, Mailbox, unpackb,
)
from .mutation import UserRecord, object_key, require_user
from .store import IX_UNIQUEID

FORMAT_VERSION = 1
# The order in which kinds are applied: mailboxes before what lives in them.
KIND_ORDER = (MAILBOX, RECORD, ACL, ANNOTATION, SUBSCRIPTION, SEEN, SIEVE, QUOTA)


# -- version vectors -----------------------------------------------------------
def covers(vv: dict[str, int], origin: str, origin_modseq: int) -> bool:
    return vv.get(origin, 0) >= origin_modseq


def vv_le(a: dict[str, int], b: dict[str, int]) -> bool:
    """a <= b: everything a includes, b includes."""
    return all(n <= b.get(o, 0) for o, n in a.items() if n)


def vv_max(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for o, n in b.items():
        if n > out.get(o, 0):
            out[o] = n
    return out


def encode_token(user: str, vv: dict[str, int]) -> str:
    """A short printable token for a state (what `modsync state` prints)."""
    raw = msgpack.packb([1, user, sorted([bytes.fromhex(o), n] for o, n in vv.items() if n)],
                        use_bin_type=True)
    return "ms1." + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[str | None, dict[str, int]]:
    """(user, version vector) from a token; "0" or "" is the empty state of a first sync."""
    if token in ("0", ""):
        return None, {}
    if not token.startswith("ms1."):
        raise ProtocolError(f"state token {token[:20]!r} is not a modsync state token "
                            f"(they start with 'ms1.'; `modsync state` prints one)")
    try:
        body = token[4:]
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        version, user, pairs = msgpack.unpackb(raw, raw=False)
        if version != 1:
            raise ValueError(f"token version {version}")
        return user, {bytes(o).hex(): int(n) for o, n in pairs}
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"state token is damaged ({e}); ask the receiver for a fresh one "
                            f"with `modsync state`")


# -- validating what comes off the wire ------------------------------------------
def _uint(bits: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << bits)


def _sint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(1 << 63) <= v < (1 << 63)


def _list_of(check, n: int | None = None):
    return lambda v: isinstance(v, list) and (n is None or len(v) == n) and all(map(check, v))


def _tuple_of(*checks):
    return lambda v: isinstance(v, list) and len(v) == len(checks) and all(
        c(x) for c, x in zip(checks, v))


def _bytes(n: int | None = None):
    return lambda v: isinstance(v, bytes) and (n is None or len(v) == n)


_HEX_ID = re.compile(r"[0-9a-f]{32}")


def _is_hex_id(v) -> bool:
    return type(v) is str and _HEX_ID.fullmatch(v) is not None


def _fits(value, shape) -> bool:
    return isinstance(value, list) and len(value) == len(shape) and all(
        check(x) for check, x in zip(shape, value))


_STR = lambda v: isinstance(v, str)               # noqa: E731
_BOOL = lambda v: isinstance(v, bool)             # noqa: E731
_MODSEQ = _uint(63)
_U32 = _uint(32)
_STORE_ID = _bytes(16)
_STAMP = _tuple_of(_MODSEQ, _is_hex_id)
_SHAPES = {
    MAILBOX: ((_STR,), (_STR, _U32, _uint(33), _list_of(_STR), _MODSEQ)),
    RECORD: ((_STR, _U32), (
        _bytes(32), _bytes(20), _uint(63), _sint, _sint, _list_of(_STR),
        _list_of(_tuple_of(_STR, _STR, _bytes())), _tuple_of(_is_hex_id, _MODSEQ),
        lambda v: isinstance(v, dict) and all(_STR(k) and _STAMP(x) for k, x in v.items()),
        _U32, _list_of(_U32))),
    SUBSCRIPTION: ((_STR,), ()),
    SEEN: ((_STR,), (_STR, _sint, _U32, _sint)),
    SIEVE: ((_STR,), (_bytes(32), _uint(63), _BOOL, _sint)),
    ANNOTATION: ((_STR, _STR, _STR), (_bytes(),)),
    ACL: ((_STR, _STR), (_STR,)),
    QUOTA: ((_STR,), (lambda v: isinstance(v, dict) and all(
        _STR(k) and _uint(63)(x) for k, x in v.items()),)),
}
_VV = _list_of(_tuple_of(_STORE_ID, _MODSEQ))


# -- store-independent objects -------------------------------------------------
@dataclass(slots=True)
class Item:
    """One changed object in store-independent form.

    ``kind`` is a model kind byte; ``ident`` names the object across stores
    (e.g. (mailbox id, uid) for a record); ``fields`` are its values; the
    stamp is (origin store id, origin modseq) and ``removed`` marks tombstones.
    """

    kind: bytes
    ident: tuple
    fields: list
    origin: str
    origin_modseq: int
    removed: bool

    def to_wire(self, origin: bytes | None = None) -> list:
        """The item as a list (``origin``: the origin's bytes, if the caller has them)."""
        return [self.kind, list(self.ident), self.fields,
                bytes.fromhex(self.origin) if origin is None else origin,
                self.origin_modseq, self.removed]

    @classmethod
    def from_wire(cls, v) -> "Item":
        if not isinstance(v, list) or len(v) != 6:
            raise ProtocolError("change set holds a malformed object entry")
        kind, ident, fields_, origin, om, removed = v
        if not isinstance(kind, bytes) or kind not in _SHAPES:
            raise ProtocolError(f"change set holds an object of unknown kind {kind!r}")
        if not _STORE_ID(origin) or not _MODSEQ(om) or not isinstance(removed, bool):
            raise ProtocolError(f"change set: bad stamp on a {KIND_NAMES[kind]} object")
        ident_shape, fields_shape = _SHAPES[kind]
        if not _fits(ident, ident_shape) or not _fits(fields_, fields_shape):
            raise ProtocolError(f"change set: malformed {KIND_NAMES[kind]} object "
                                f"{str(ident)[:80]}")
        return cls(kind, tuple(ident), list(fields_), origin.hex(), om, removed)

    @property
    def stamp_key(self) -> tuple[int, str]:
        """Total order of stamps (Lamport time, then store id) for last-writer-wins."""
        return (self.origin_modseq, self.origin)


@dataclass
class ChangeSet:
    """Everything a receiver at ``base`` needs to reach the sender's ``state``."""

    user: str
    sender: str                       # store id of the sender
    base: dict[str, int]              # the receiver state it was built against
    state: dict[str, int]             # the sender's state (version vector)
    items: list[Item] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)   # addresses the receiver may lack
    crcs: dict[str, int] = field(default_factory=dict)  # mailbox id -> modsync CRC after
    digest: bytes = b""               # the sender's user digest
    max_modseq: int = 0               # highest origin modseq inside (Lamport clock)

    def encode(self) -> bytes:
        return msgpack.packb([
            FORMAT_VERSION, self.user, bytes.fromhex(self.sender),
            [[bytes.fromhex(o), n] for o, n in self.base.items()],
            [[bytes.fromhex(o), n] for o, n in self.state.items()],
            _items_to_wire(self.items), self.bodies,
            [[k, v] for k, v in self.crcs.items()], self.digest, self.max_modseq,
        ], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "ChangeSet":
        try:
            v = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if not isinstance(v, list) or not v:
                raise ValueError("not a change set")
            if v[0] != FORMAT_VERSION:
                raise ProtocolError(f"change set format version {v[0]} is not supported "
                                    f"(this modsync reads version {FORMAT_VERSION})")
            if len(v) != 10:
                raise ValueError(f"{len(v)} fields instead of 10")
            (_, user, sender, base, state, items, bodies, crcs, digest, max_modseq) = v
            if not (_STR(user) and _STORE_ID(sender) and _VV(base) and _VV(state)
                    and isinstance(items, list) and _list_of(_bytes(32))(bodies)
                    and _list_of(_tuple_of(_STR, _uint(64)))(crcs) and _bytes()(digest)
                    and _MODSEQ(max_modseq)):
                raise ValueError("a field has the wrong type")
            return cls(user, sender.hex(), {o.hex(): n for o, n in base},
                       {o.hex(): n for o, n in state},
                       _items_from_wire(items), list(bodies),
                       {k: n for k, n in crcs}, digest, max_modseq)
        except ProtocolError:
            raise
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise ProtocolError(f"malformed change set ({e})")

    def is_empty(self) -> bool:
        return not self.items


# -- items alone (the native protocol's ITEMS frames, version 3) ----------------
# Frames of items this big are decoded with the cyclic GC paused (gc_paused):
# 1,000 records make ~30,000 containers; decoding took 1.5 times as long.
_GC_PAUSE_BYTES = 64 * 1024


def encode_items(items) -> bytes:
    """Items in the change set's wire form (a msgpack array of ``Item.to_wire``)."""
    return msgpack.packb(_items_to_wire(items), use_bin_type=True)


def _items_to_wire(items) -> list:
    origins: dict[str, bytes] = {}      # each origin's bytes, made once
    out = []
    for i in items:
        o = origins.get(i.origin)
        if o is None:
            o = origins[i.origin] = bytes.fromhex(i.origin)
        out.append(i.to_wire(o))
    return out


def _items_from_wire(v: list) -> list[Item]:
    """Items from their wire form, every field checked (records by the fast path)."""
    known: dict = {}     # origin bytes -> hex, and store ids checked already
    return [_record_from_wire(i, known) or Item.from_wire(i) for i in v]


def decode_items(data: bytes) -> list[Item]:
    """The items of ``encode_items``, every field type-checked (ProtocolError if not)."""
    with gc_paused(len(data) >= _GC_PAUSE_BYTES):
        try:
            v = msgpack.unpackb(data, raw=False)
            if not isinstance(v, list):
                raise ProtocolError("change set items are not a list")
            return _items_from_wire(v)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise ProtocolError(f"malformed change set items ({e})") from None


@contextmanager
def gc_paused(pause: bool = True):
    """The cyclic GC off while many acyclic containers are made (items: lists, dicts
    and tuples of scalars), which it would otherwise traverse again and again as they
    pile up: building a first sync of 20,000 records took 1.6 times as long, and
    decoding an archive point of as many messages three times as long."""
    pause = pause and gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if pause:
            gc.enable()


_RECORD_TYPES = (bytes, bytes, int, int, int, list, list, list, dict, int, list)
_STR_ONLY = {str}


def _record_from_wire(v, known: dict) -> Item | None:
    """A record item checked inline (records are nearly every item of a big change set);
    None for anything else, including a malformed record: Item.from_wire then checks
    it by _SHAPES and names what is wrong.  tests/changes checks both agree.  ``known``
    remembers store ids (and their bytes' hex form) already checked."""
    if type(v) is not list or len(v) != 6 or v[0] != RECORD:
        return None
    _, ident, f, origin, om, removed = v
    if not (type(ident) is list and len(ident) == 2 and type(ident[0]) is str
            and type(ident[1]) is int and 0 <= ident[1] <= 0xFFFFFFFF
            and type(f) is list and len(f) == 11
            and type(om) is int and 0 <= om < 1 << 63 and type(removed) is bool):
        return None
    origin_id = known.get(origin) if type(origin) is bytes else None
    if origin_id is None:
        if type(origin) is not bytes or len(origin) != 16:
            return None
        origin_id = known[origin] = origin.hex()
    if tuple(map(type, f)) != _RECORD_TYPES:
        return None
    address, sha1, size, idate, sdate, flags, anns, created, stamps, renumbered, moved = f
    if not (len(address) == 32 and len(sha1) == 20 and 0 <= size < 1 << 63
            and -(1 << 63) <= idate < 1 << 63 and -(1 << 63) <= sdate < 1 << 63
            and len(created) == 2 and (created[0] in known or _is_hex_id(created[0]))
            and type(created[1]) is int and 0 <= created[1] < 1 << 63
            and 0 <= renumbered <= 0xFFFFFFFF):
        return None
    known[created[0]] = True
    if flags and set(map(type, flags)) != _STR_ONLY:
        return None
    for a in anns:
        if not (type(a) is list and len(a) == 3 and type(a[0]) is str and type(a[1]) is str
                and type(a[2]) is bytes):
            return None
    for k, st in stamps.items():
        if not (type(k) is str and type(st) is list and len(st) == 2 and type(st[0]) is int
                and 0 <= st[0] < 1 << 63 and _is_hex_id(st[1])):
            return None
    for x in moved:
        if type(x) is not int or not 0 <= x <= 0xFFFFFFFF:
            return None
    return Item(RECORD, (ident[0], ident[1]), f, origin_id, om, removed)


# -- conversion between store objects and items --------------------------------
def to_item(obj, mailbox_id: str | None, origin_ids: dict[int, str]) -> Item:
    """A store object as an Item; ``mailbox_id`` for mailbox-scoped kinds."""
    st = obj.stamp
    origin = origin_ids[st.origin]
    if obj.KIND == MAILBOX:
        ident = (obj.id,)
        fields_ = [obj.name, obj.uidvalidity, obj.uidnext, list(obj.specialuse), obj.createdmodseq]
    elif obj.KIND == RECORD:
        ident = (mailbox_id, obj.uid)
        fields_ = [obj.address, obj.sha1, obj.size, obj.internaldate, obj.savedate,
                   list(obj.flags), [list(a) for a in obj.annotations],
                   [origin_ids[obj.created[0]], obj.created[1]],
                   {k: [v[0], origin_ids[v[1]]] for k, v in obj.flag_stamps.items()},
                   obj.renumbered_from, list(obj.moved_to)]
    elif obj.KIND == SUBSCRIPTION:
        ident, fields_ = (obj.name,), []
    elif obj.KIND == SEEN:
        ident, fields_ = (obj.mailbox_id,), [obj.uids, obj.lastread, obj.lastuid, obj.lastchange]
    elif obj.KIND == SIEVE:
        ident, fields_ = (obj.name,), [obj.address, obj.size, obj.active, obj.last_update]
    elif obj.KIND == ANNOTATION:
        ident, fields_ = (mailbox_id, obj.entry, obj.userid), [obj.value]
    elif obj.KIND == ACL:
        ident, fields_ = (mailbox_id, obj.identifier), [obj.rights]
    elif obj.KIND == QUOTA:
        ident, fields_ = (obj.root,), [dict(obj.limits)]
    else:  # pragma: no cover - KIND_CLASSES is closed
        raise ValueError(obj.KIND)
    return Item(obj.KIND, ident, fields_, origin, st.origin_modseq, st.removed)


# -- building ------------------------------------------------------------------
def state_of(store, user: str) -> dict[str, int]:
    """The user's state in ``store`` as a version vector keyed by store id."""
    with store.db.read() as txn:
        u = require_user(store._user(txn, user), user)
        return {store.origin_id(txn, n): m for n, m in u.versions.items() if m}


def build(store, user: str, base: dict[str, int], *, with_bodies: bool = True,
          whole: frozenset[str] = frozenset()) -> ChangeSet:
    """The change set that takes a receiver at ``base`` to this store's state.

    ``whole``: unique ids of mailboxes to send entirely (every record, ACL
    entry and annotation, and the bodies of the live records), whatever
    ``base`` covers: for a receiver that may not hold them (engine.acl: a
    mailbox that became readable to it).

    Raises FullSyncNeeded when ``base`` is below the tombstone horizon (the
    receiver might miss a deletion); an empty base is always answerable.
    """
    with store.db.read() as txn, gc_paused():
        u: UserRecord = require_user(store._user(txn, user), user)
        origin_ids = {}
        for k, v in txn.prefix("meta", b"origin#"):
            origin_ids[U32.unpack(k[7:])[0]] = v.hex()
        full = not any(base.values())
        if not full:
            # Expired tombstones are gone: a receiver that has not seen every
            # deletion up to them would never learn of those deletions.
            for num, top in u.expired.items():
                if base.get(origin_ids.get(num, ""), 0) < top:
                    raise FullSyncNeeded(user, base.get(origin_ids.get(num, ""), 0), top)
        cs = ChangeSet(user, store.id, dict(base),
                       {origin_ids[n]: m for n, m in u.versions.items() if m},
                       digest=u.digest)
        objects = _all_objects(txn, u) if full else _changed_objects(txn, u, base, origin_ids,
                                                                     whole)
        mailboxes: dict[bytes, Mailbox] = {}
        whole_nums: set[bytes] = set()
        bodies: set[bytes] = set()
        items = cs.items
        max_modseq = 0
        for kind, key, raw in objects:
            if kind == RECORD:
                mb = mailboxes[key[:8]]
                item, created = _record_item(key, raw, mb.id, origin_ids)
                if with_bodies and not item.removed and (
                        full or key[:8] in whole_nums
                        or not covers(base, created[0], created[1])):
                    bodies.add(item.fields[0])
            else:
                obj = KIND_CLASSES[kind].unpack(key, raw)
                if kind == MAILBOX:
                    mailboxes[key] = obj
                    if obj.id in whole:
                        whole_nums.add(key)
                mb = mailboxes.get(key[:8]) if kind in (ACL, ANNOTATION) else None
                item = to_item(obj, mb.id if mb is not None else None, origin_ids)
                if kind == SIEVE and not obj.stamp.removed and with_bodies:
                    if not covers(base, item.origin, item.origin_modseq):
                        bodies.add(obj.address)
            items.append(item)
            if item.origin_modseq > max_modseq:
                max_modseq = item.origin_modseq
        cs.max_modseq = max_modseq
        for mb in mailboxes.values():
            if not mb.stamp.removed:
                cs.crcs[mb.id] = mb.crc
        cs.bodies = sorted(bodies)
        return cs


def _all_objects(txn, u: UserRecord) -> list[tuple[bytes, bytes, bytes]]:
    """(kind, key, value) of every object of the user, mailboxes first (KIND_ORDER)."""
    out = []
    for kind in KIND_ORDER:
        p = u.prefix + kind
        n = len(p)
        out.extend((kind, k[n:], v) for k, v in txn.prefix("objects", p))
    return out


def _changed_objects(txn, u: UserRecord, base: dict, origin_ids: dict,
                     whole) -> list[tuple[bytes, bytes, bytes]]:
    """(kind, key, value) of the objects whose stamp ``base`` does not cover, with the
    mailboxes of those living in one, and everything in the ``whole`` mailboxes;
    in KIND_ORDER, then by key."""
    keys: set[tuple[bytes, bytes]] = set()
    for num, top in u.versions.items():
        seen = base.get(origin_ids.get(num, ""), 0)
        if top <= seen:
            continue
        start = u.prefix + U32.pack(num) + U64.pack(seen + 1)
        for k in txn.range("byorigin", start, prefix_end(u.prefix + U32.pack(num)),
                           values=False):
            keys.add((k[16:17], k[17:]))
    for mbid in whole:
        raw = txn.get("index", IX_UNIQUEID + mbid.encode())
        if raw is None or raw[:4] != u.prefix:
            continue
        num = raw[4:12]
        for kind in (RECORD, ACL, ANNOTATION):
            p = u.prefix + kind + num
            keys.update((kind, k[len(u.prefix) + 1:]) for k in txn.prefix("objects", p,
                                                                          values=False))
        keys.add((MAILBOX, num))
    # Records and mailbox-scoped objects travel with their mailbox's current
    # state (uidnext, name) so the receiver can check and place them.
    for kind, key in list(keys):
        if kind in (RECORD, ACL, ANNOTATION):
            keys.add((MAILBOX, key[:8]))
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    out = []
    for kind, key in sorted(keys, key=lambda kk: (order[kk[0]], kk[1])):
        raw = txn.get("objects", object_key(u, kind, key))
        if raw is not None:
            out.append((kind, key, raw))
    return out


def _record_item(key: bytes, raw: bytes, mailbox_id: str, origin_ids: dict) -> tuple:
    """A stored record as an Item (what ``to_item`` makes of ``Record.unpack``, without
    the Record: a first sync converts every record), and its creation stamp."""
    v = unpackb(raw)
    created = [origin_ids[v[13][0]], v[13][1]]
    fields_ = [v[4], v[5], v[6], v[7], v[8], v[9], v[12], created,
               {k: [x[0], origin_ids[x[1]]] for k, x in v[14].items()} if v[14] else {},
               v[15], v[16]]
    return Item(RECORD, (mailbox_id, U32.unpack_from(key, 8)[0]), fields_, origin_ids[v[1]],
                v[2], v[3]), created


# -- a first full replication in parts --------------------------------------------
#: Items per part when a first full replication is split (``split``): big
#: enough that a part's commit (two fsyncs) costs little per message, small
#: enough that the receiver applies one part while the next arrives.
PART_ITEMS = 2000


def split(cs: ChangeSet, part_items: int | None = None) -> list[ChangeSet]:
    """A change set from an empty base as consecutive change sets ("parts").

    Each part is a legal, self-contained change set: part k's base is part
    k-1's state, and its state is exact: the receiver then holds every
    object that state covers and nothing this sender has beyond it.  So
    applying the parts one by one (each in one transaction) ends exactly
    where applying ``cs`` would, and stopping after any part leaves a state
    from which an ordinary change set continues.

    Parts are cut between the stamps of the objects in Lamport order
    (origin modseq, then store id), at ~``part_items`` (PART_ITEMS) items,
    only where such a cut is possible:

    * a record, ACL entry or annotation goes no earlier than its mailbox's
      item (and later parts repeat that item: records travel with their
      mailbox);
    * within a mailbox, every live record of a later part has a UID above
      every record of the earlier parts (a receiver refuses a new message
      below its uidnext: UIDs are never reused), and the mailbox's item
      says uidnext = the lowest UID still to come, the real uidnext in the
      mailbox's last part;
    * a live record goes no later than the first part whose state covers
      its creation (``build`` counts on a receiver at a state holding the
      messages created within it, bodies included).

    A store filled by appends (an import) splits anywhere; a mailbox whose
    old messages changed lately, or that was renamed, keeps what lies
    between in one part.  With a base that is not empty (the receiver may
    hold any of it) there is one part: ``[cs]``.
    """
    part_items = part_items or PART_ITEMS
    if any(cs.base.values()) or len(cs.items) <= part_items:
        return [cs]
    with gc_paused():
        return _split(cs, part_items)


def _split(cs: ChangeSet, part_items: int) -> list[ChangeSet]:
    items = cs.items
    n = len(items)
    stamps = [(it.origin_modseq, it.origin) for it in items]
    order = sorted(range(n), key=stamps.__getitem__)
    pos = [0] * n
    for p, i in enumerate(order):
        pos[i] = p
    # A cut "after p" ends a part with the item at position p of ``order``;
    # forbidden[p] > 0 where that would break a rule above.
    forbidden = [0] * (n + 1)

    def forbid(first: int, stop: int) -> None:      # no cut after first .. stop-1
        if first < stop:
            forbidden[first] += 1
            forbidden[stop] -= 1
    mailbox_at = {it.ident[0]: pos[i] for i, it in enumerate(items) if it.kind == MAILBOX}
    by_origin: dict[str, tuple[list, list]] = {}     # origin -> (modseqs, positions)
    for p, i in enumerate(order):
        om, origin = stamps[i]
        oms, at = by_origin.setdefault(origin, ([], []))
        oms.append(om)
        at.append(p)
    records: dict[str, list] = {}
    for i, it in enumerate(items):
        if it.kind in (RECORD, ACL, ANNOTATION):
            at = mailbox_at.get(it.ident[0])
            if at is None:
                return [cs]    # its mailbox travels elsewhere: cannot happen from an empty base
            forbid(pos[i], at)
            if it.kind == RECORD:
                records.setdefault(it.ident[0], []).append((pos[i], it.ident[1], it.removed))
                if not it.removed:
                    # From the first cut whose state covers its creation, a receiver
                    # counts as holding its body (build sends bodies of messages created
                    # after the base): no cut from there until the record itself.
                    oms, at = by_origin.get(it.fields[7][0], ((), ()))
                    j = bisect.bisect_left(oms, it.fields[7][1])
                    if j < len(at):
                        forbid(at[j], pos[i])
    # mailbox -> (positions of its records, lowest live UID from each on)
    lowest_from: dict[str, tuple[list, list]] = {}
    for mbid, recs in records.items():
        recs.sort()
        low = [_NO_UID] * (len(recs) + 1)
        for j in range(len(recs) - 1, -1, -1):
            low[j] = low[j + 1] if recs[j][2] else min(low[j + 1], recs[j][1])
        top = 0
        for j in range(len(recs) - 1):
            top = max(top, recs[j][1])
            if top >= low[j + 1]:
                forbid(recs[j][0], recs[j + 1][0])
        lowest_from[mbid] = ([r[0] for r in recs], low)
    cuts, size, bad = [], 0, 0
    for p in range(n - 1):
        bad += forbidden[p]
        size += 1
        if size >= part_items and not bad and stamps[order[p]] != stamps[order[p + 1]]:
            cuts.append(p)
            size = 0
    if not cuts:
        return [cs]
    return _parts(cs, order, cuts + [n - 1], lowest_from)


_NO_UID = 1 << 32      # above every UID


def _parts(cs: ChangeSet, order: list[int], ends: list[int], lowest_from: dict) -> list:
    items = cs.items
    listed = set(cs.bodies)
    mailbox_at = {it.ident[0]: i for i, it in enumerate(items) if it.kind == MAILBOX}
    spans = list(zip([-1] + ends[:-1], ends))
    last_part: dict[str, int] = {}
    for k, (start, end) in enumerate(spans):
        for i in order[start + 1:end + 1]:
            if items[i].kind in (MAILBOX, RECORD, ACL, ANNOTATION):
                last_part[items[i].ident[0]] = k
    state: dict[str, int] = {}
    sent: set[bytes] = set()
    parts: list[ChangeSet] = []
    for k, (start, end) in enumerate(spans):
        final = k == len(spans) - 1
        mine = [items[i] for i in sorted(order[start + 1:end + 1])]
        for it in mine:
            if state.get(it.origin, 0) < it.origin_modseq:
                state[it.origin] = it.origin_modseq
        boxes = {it.ident[0] for it in mine if it.kind in (MAILBOX, RECORD, ACL, ANNOTATION)}
        part_items = [_mailbox_for_part(items[mailbox_at[mbid]], lowest_from.get(mbid), end)
                      for mbid in sorted(boxes, key=mailbox_at.__getitem__)]
        part_items += [it for it in mine if it.kind != MAILBOX]
        bodies = []
        for it in part_items:
            if it.kind in (RECORD, SIEVE) and not it.removed:
                address = it.fields[0]
                if address in listed and address not in sent:
                    sent.add(address)
                    bodies.append(address)
        parts.append(ChangeSet(
            cs.user, cs.sender, dict(parts[-1].state) if parts else dict(cs.base),
            dict(cs.state) if final else dict(state), part_items, sorted(bodies),
            {m: c for m, c in cs.crcs.items() if last_part.get(m) == k},
            cs.digest if final else b"",
            max((it.origin_modseq for it in part_items), default=0)))
    return parts


def _mailbox_for_part(item: Item, records: tuple | None, end: int) -> Item:
    """The mailbox's item for the part that ends at position ``end``: its uidnext no
    higher than the lowest UID of the live records still to come after it."""
    if records is None:
        return item
    positions, low = records
    after = low[bisect.bisect_right(positions, end)]
    if after >= item.fields[2]:
        return item
    fields_ = list(item.fields)
    fields_[2] = after
    return Item(item.kind, item.ident, fields_, item.origin, item.origin_modseq, item.removed)
