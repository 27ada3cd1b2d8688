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
from dataclasses import dataclass, field

import msgpack

from .db import prefix_end
from .errors import FullSyncNeeded, ProtocolError
from .model import (
    ACL, ANNOTATION, KIND_CLASSES, KIND_NAMES, MAILBOX, QUOTA, RECORD, SEEN, SIEVE, SUBSCRIPTION,
    U32, U64, Mailbox,
)
from .mutation import UserRecord, object_key, require_user

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


def _is_hex_id(v) -> bool:
    return isinstance(v, str) and len(v) == 32 and all(c in "0123456789abcdef" for c in v)


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
@dataclass
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

    def to_wire(self) -> list:
        return [self.kind, list(self.ident), self.fields, bytes.fromhex(self.origin),
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
            [i.to_wire() for i in self.items], self.bodies,
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
                       [Item.from_wire(i) for i in items], list(bodies),
                       {k: n for k, n in crcs}, digest, max_modseq)
        except ProtocolError:
            raise
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise ProtocolError(f"malformed change set ({e})")

    def is_empty(self) -> bool:
        return not self.items


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


def build(store, user: str, base: dict[str, int], *, with_bodies: bool = True) -> ChangeSet:
    """The change set that takes a receiver at ``base`` to this store's state.

    Raises FullSyncNeeded when ``base`` is below the tombstone horizon (the
    receiver might miss a deletion); an empty base is always answerable.
    """
    with store.db.read() as txn:
        u: UserRecord = require_user(store._user(txn, user), user)
        origin_ids = {}
        for k, v in txn.prefix("meta", b"origin#"):
            origin_ids[U32.unpack(k[7:])[0]] = v.hex()
        if any(base.values()):
            # Expired tombstones are gone: a receiver that has not seen every
            # deletion up to them would never learn of those deletions.
            for num, top in u.expired.items():
                if base.get(origin_ids.get(num, ""), 0) < top:
                    raise FullSyncNeeded(user, base.get(origin_ids.get(num, ""), 0), top)
        keys: set[tuple[bytes, bytes]] = set()
        for num, top in u.versions.items():
            seen = base.get(origin_ids.get(num, ""), 0)
            if top <= seen:
                continue
            start = u.prefix + U32.pack(num) + U64.pack(seen + 1)
            for k in txn.range("byorigin", start, prefix_end(u.prefix + U32.pack(num)),
                               values=False):
                keys.add((k[16:17], k[17:]))
        # Records and mailbox-scoped objects travel with their mailbox's current
        # state (uidnext, name) so the receiver can check and place them.
        for kind, key in list(keys):
            if kind in (RECORD, ACL, ANNOTATION):
                keys.add((MAILBOX, key[:8]))
        mailboxes: dict[bytes, Mailbox] = {}
        for kind, key in keys:
            if kind == MAILBOX:
                raw = txn.get("objects", object_key(u, MAILBOX, key))
                mailboxes[key] = Mailbox.unpack(key, raw)
        cs = ChangeSet(user, store.id, dict(base),
                       {origin_ids[n]: m for n, m in u.versions.items() if m},
                       digest=u.digest)
        bodies: set[bytes] = set()
        order = {k: i for i, k in enumerate(KIND_ORDER)}
        for kind, key in sorted(keys, key=lambda kk: (order[kk[0]], kk[1])):
            raw = txn.get("objects", object_key(u, kind, key))
            if raw is None:
                continue
            obj = KIND_CLASSES[kind].unpack(key, raw)
            mb = mailboxes.get(key[:8]) if kind in (RECORD, ACL, ANNOTATION) else None
            item = to_item(obj, mb.id if mb is not None else None, origin_ids)
            cs.items.append(item)
            cs.max_modseq = max(cs.max_modseq, item.origin_modseq)
            if kind == RECORD and not obj.stamp.removed and with_bodies:
                created_origin = origin_ids[obj.created[0]]
                if not covers(base, created_origin, obj.created[1]):
                    bodies.add(obj.address)
            elif kind == SIEVE and not obj.stamp.removed and with_bodies:
                if not covers(base, item.origin, item.origin_modseq):
                    bodies.add(obj.address)
        for mb in mailboxes.values():
            if not mb.stamp.removed:
                cs.crcs[mb.id] = mb.crc
        cs.bodies = sorted(bodies)
        return cs
