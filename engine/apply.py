"""Apply a change set: cleanly, or reject it with our own changes, or merge.

Given a change set built against base S by a sender at state V, and our
state R:

* S not <= R: the sender assumed things we do not have.  Rejected
  (``base-unknown``) with our state token, to diff from.
* R not <= V: we changed since S (or learnt something the sender has not
  seen).  Without ``merge`` it is rejected (``changed``) and the answer
  carries our changes the sender lacks, so it can merge and send again.
  With ``merge`` both are combined here (the caller may ship our changes
  back as a counter change set).
* Otherwise the apply is clean: every incoming object supersedes ours.

Before anything is committed, every incoming object is checked against
what we hold (``LegalityError`` with a code per rule, store untouched);
bodies are verified against their addresses; one mutation writes it all;
after a clean apply our CRCs must equal what the change set claims.
Afterwards our state includes the sender's (``R := max(R, V)``) and our
modseq counter is above every modseq we received (a Lamport clock).

The merge is a pure function of the two sides' states, so both sides of a
file exchange compute the same result.  Whenever the result differs from
the newest version it beat, it gets a fresh stamp of ours, so it spreads
as the newest version; and when we take note of a version without taking
it, we hold something newer that beats it (a tombstone if need be):

* subscriptions, seen sets, sieve scripts, annotations, ACL entries, quota:
  the newest stamp wins (Lamport modseq, then store id); only one sieve
  script stays active, the one activated last;
* messages: an expunge beats a concurrent change of the same message;
  otherwise flag by flag and annotation by annotation the newest stamp
  wins.  Different messages at one UID (concurrent appends; or a message
  here and another one's tombstone there) are all kept: every live one
  moves to a new UID above both sides' uidnext, in order of content
  address, and the old UID is expunged.  The copies remember the UID they
  came from, so an expunge of that message at its old UID, made
  concurrently elsewhere, still reaches them;
* mailboxes: folder attributes (name, special-use) by newest stamp,
  uidnext and uidvalidity by maximum.  A delete takes what the deleting
  side had seen; mail it had not seen (created after the deleter's state)
  keeps the mailbox alive, holding just that mail.  Two live mailboxes
  with one name: the lower unique id keeps it, the other becomes
  ``NAME~<id prefix>``.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import crc as cyrus_crc
from . import names
from .blobs import address_of, sha1_of, unpack_stored
from .changeset import ChangeSet, Item, build, covers, encode_token, state_of, vv_le
from .errors import EXIT_REJECTED, ModsyncError, NoSuchUser
from .model import (
    ACL, ANNOTATION, KIND_CLASSES, KIND_NAMES, MAILBOX, QUOTA, RECORD, SEEN, SIEVE,
    SUBSCRIPTION, U32, U64, AclEntry, Annotation, Mailbox, QuotaRoot, Record, SeenSet,
    SieveScript, Stamp, Subscription, normalize_flags, normalized_flags,
)
from .mutation import Mutation, annotation_stamp_key
from .store import IX_NAME, IX_UIDVALIDITY, IX_UNIQUEID, Store

DEFAULT_MASS_DELETE_SHARE = 0.5


class LegalityError(ModsyncError):
    """A change set breaks a rule; nothing was applied.  ``code`` names the rule."""

    exit_code = EXIT_REJECTED

    def __init__(self, code: str, message: str, *, subject=None):
        super().__init__(message, subject=subject)
        self.code = code


@dataclass
class ApplyResult:
    """What happened: ``applied``, ``merged``, ``nothing`` (already had it) or ``rejected``."""

    status: str
    user: str
    token: str = ""                    # our state afterwards: diff from this
    code: str = ""                     # for rejections: base-unknown, changed
    reason: str = ""
    counter: ChangeSet | None = None   # our changes the sender lacks
    written: int = 0

    @property
    def ok(self) -> bool:
        return self.status != "rejected"

    def as_dict(self) -> dict:
        return {"status": self.status, "user": self.user, "token": self.token,
                "code": self.code, "reason": self.reason, "written": self.written,
                "counter_items": len(self.counter.items) if self.counter else 0}


def _key(origin_id: str, om: int) -> tuple[int, str]:
    """Total order of stamps for last-writer-wins: Lamport modseq, then store id."""
    return (om, origin_id)


def _describe(item: Item) -> str:
    return f"{KIND_NAMES[item.kind]} {'/'.join(str(x) for x in item.ident)}"


# -- entry point ----------------------------------------------------------------------
def apply(store: Store, cs: ChangeSet, *, bodies=None, merge: bool = False,
          allow_mass_delete: bool = False,
          mass_delete_share: float = DEFAULT_MASS_DELETE_SHARE) -> ApplyResult:
    """Apply ``cs`` to ``store``; see the module docstring.

    ``bodies`` gives the bytes of the bodies the change set lists (a dict or
    a callable address -> bytes); bodies we already hold are not asked for.
    If it also has ``stored(address) -> (method, payload, size) | None``
    (``engine.wire.BodySpool``), bodies it holds as a pack stores them are
    checked (decompressed, by its ``unpack_many(entries)`` if it has one) and
    written as they came, not compressed again.
    Raises LegalityError (store unchanged) for an illegal change set.
    """
    user = cs.user
    try:
        local_vv = state_of(store, user)
    except NoSuchUser:
        local_vv = {}
    if not vv_le(cs.base, local_vv):
        return ApplyResult("rejected", user, encode_token(user, local_vv), "base-unknown",
                           "the change set was built for a state this store does not have; "
                           "diff again from this store's state token",
                           counter=_counter(store, user, cs.state, local_vv))
    concurrent = not vv_le(local_vv, cs.state)
    if concurrent and not merge:
        return ApplyResult("rejected", user, encode_token(user, local_vv), "changed",
                           "this store changed since the change set's base; merge these "
                           "changes and send again",
                           counter=_counter(store, user, cs.state, local_vv))
    if not cs.items and vv_le(cs.state, local_vv):
        return ApplyResult("nothing", user, encode_token(user, local_vv))
    _check_order(cs)
    fetched, packed = _fetch_bodies(store, cs, bodies)
    # Lamport: whatever we write now is newer than everything we received.
    lamport = max([cs.max_modseq, *cs.state.values()]) + 1

    def run(m: Mutation) -> int:
        ctx = _Context(store, m, cs, local_vv, concurrent)
        ctx.packed = packed
        _apply_items(ctx, fetched)
        if not concurrent:
            _check_claims(ctx)
        if not allow_mass_delete and ctx.expunged > mass_delete_share * ctx.live_before:
            raise LegalityError(
                "mass-delete", f"the change set would remove {ctx.expunged} of user "
                f"{user!r}'s {ctx.live_before} messages (more than {mass_delete_share:.0%}); "
                f"refused in case the source was emptied or unmounted. Allow it with "
                f"--allow-mass-delete if it is intended", subject=user)
        _absorb_state(ctx)
        return ctx.written

    written = store.mutate(user, run, create_user=True, modseq=lamport)
    after = state_of(store, user)
    status = ("merged" if concurrent else "applied") if written else "nothing"
    result = ApplyResult(status, user, encode_token(user, after), written=written)
    if concurrent:
        result.counter = build(store, user, cs.state)
    return result


def _counter(store: Store, user: str, sender_state: dict, local_vv: dict) -> ChangeSet | None:
    """Our changes that a sender at ``sender_state`` lacks."""
    if not local_vv:
        return None
    return build(store, user, sender_state)


def _fetch_bodies(store: Store, cs: ChangeSet, bodies) -> tuple[dict, dict]:
    """Bodies we lack, verified against their addresses before anything is written,
    and their stored form (method, payload): as they came, or compressed now, on
    every core, before the writer lock is taken."""
    getter = bodies.get if isinstance(bodies, dict) else bodies
    stored_of = getattr(bodies, "stored", None)
    unpack_many = getattr(bodies, "unpack_many", None)
    with store.db.read() as txn:
        lacking = [a for a in cs.bodies if txn.get("blobs", a) is None]
    fetched, packed, stored = {}, {}, []
    for address in lacking:
        entry = stored_of(address) if stored_of is not None else None
        if entry is not None:
            stored.append((address, entry))
            continue
        data = getter(address) if getter is not None else None
        if data is not None:        # else checked when a record needs it
            fetched[address] = _checked(address, data)
    datas = (unpack_many(stored) if unpack_many is not None
             else unpack_stored([e for _, e in stored]))
    for (address, (method, payload, size)), data in zip(stored, datas):
        if data is None:
            raise LegalityError("body-hash-mismatch", f"body {address.hex()} is not the "
                                f"{size} bytes it claims to be", subject=address.hex())
        fetched[address] = _checked(address, data)
        packed[address] = (method, payload)
    fresh = [a for a in fetched if a not in packed]
    packed.update(zip(fresh, store.blobs.compress_many([fetched[a] for a in fresh])))
    return fetched, packed


def _checked(address: bytes, data: bytes) -> bytes:
    if address_of(data) != address:
        raise LegalityError("body-hash-mismatch", f"body {address.hex()} does not hash to "
                            f"its address", subject=address.hex())
    return data


def _check_order(cs: ChangeSet) -> None:
    last: dict[str, int] = {}
    for item in cs.items:
        if item.kind != RECORD:
            continue
        mbid, uid = item.ident
        if not isinstance(uid, int) or not 0 < uid <= 0xFFFFFFFF:
            raise LegalityError("bad-uid", f"record {mbid}/{uid}: UID out of range")
        if uid <= last.get(mbid, 0):
            raise LegalityError("records-out-of-order", f"records of mailbox {mbid} are not in "
                                f"ascending UID order ({uid} after {last[mbid]})", subject=mbid)
        last[mbid] = uid


# -- context ------------------------------------------------------------------------------
class _Context:
    """What the item handlers share during one apply."""

    def __init__(self, store: Store, m: Mutation, cs: ChangeSet, local_vv: dict,
                 concurrent: bool):
        self.store, self.m, self.cs = store, m, cs
        self.local_vv = local_vv
        self.concurrent = concurrent
        self.origin_num: dict[str, int] = {}
        self.origin_id_of: dict[int, str] = {}
        self.mailboxes: dict[str, Mailbox | None] = {}   # unique id -> ours (this user)
        self.incoming_mb: dict[str, Item] = {}           # unique id -> incoming mailbox item
        self.uidnext_before: dict[str, int] = {}         # unique id -> our uidnext before
        self.revived: set[str] = set()                   # mailboxes kept alive by fresh mail
        self.retire: dict[str, Item] = {}                # mailboxes to delete after records
        self.clashes: list[Mailbox] = []                 # mailboxes whose name is taken
        self.moves: dict[int, list] = {}                 # mailbox num -> [(uid, movers, ...)]
        self.expunged = 0                                # our live messages removed
        self.live_before = 0
        self.written = 0
        self.packed: dict = {}                           # address -> compressed body
        for k, v in m.txn.prefix("objects", m.user.prefix + MAILBOX):
            mb = Mailbox.unpack(k[5:], v)
            if not mb.stamp.removed:
                self.live_before += mb.messages

    # origins: store id <-> local number
    def onum(self, store_id: str) -> int:
        n = self.origin_num.get(store_id)
        if n is None:
            n = self.store.origin_number(self.m.txn, store_id)
            self.origin_num[store_id] = n
            self.origin_id_of[n] = store_id
        return n

    def oid(self, num: int) -> str:
        s = self.origin_id_of.get(num)
        if s is None:
            s = self.store.origin_id(self.m.txn, num)
            self.origin_id_of[num] = s
            self.origin_num[s] = num
        return s

    def key_of(self, stamp: Stamp) -> tuple[int, str]:
        return _key(self.oid(stamp.origin), stamp.origin_modseq)

    def stamp_args(self, item: Item) -> dict:
        return {"origin": self.onum(item.origin), "origin_modseq": item.origin_modseq}

    def sender_saw(self, stamp: Stamp) -> bool:
        return covers(self.cs.state, self.oid(stamp.origin), stamp.origin_modseq)

    def relation(self, local: Stamp | None, item: Item) -> str:
        """new | same | incoming (supersedes ours) | local (ours supersedes) | concurrent."""
        if local is None:
            return "new"
        lid = self.oid(local.origin)
        if lid == item.origin and local.origin_modseq == item.origin_modseq:
            return "same"
        if covers(self.cs.state, lid, local.origin_modseq):
            if _key(item.origin, item.origin_modseq) <= _key(lid, local.origin_modseq):
                raise LegalityError("modseq-lowered", f"{_describe(item)}: the sender has seen our "
                                    f"version ({lid[:8]}:{local.origin_modseq}) but sends an "
                                    f"older one ({item.origin[:8]}:{item.origin_modseq})")
            return "incoming"
        if covers(self.local_vv, item.origin, item.origin_modseq):
            return "local"
        if not self.concurrent:   # cannot happen when our state is within the sender's
            raise LegalityError("changed", f"{_describe(item)} changed on both sides")
        return "concurrent"

    def local_mailbox(self, mailbox_id: str) -> Mailbox | None:
        if mailbox_id in self.mailboxes:
            return self.mailboxes[mailbox_id]
        raw = self.m.txn.get("index", IX_UNIQUEID + mailbox_id.encode())
        mb = None
        if raw is not None:
            if raw[:4] != self.m.user.prefix:
                raise LegalityError("mailbox-id-in-use", f"mailbox id {mailbox_id} belongs to "
                                    f"another user in this store", subject=mailbox_id)
            mb = self.m.mailbox(U64.unpack(raw[4:])[0])
            self.uidnext_before[mailbox_id] = mb.uidnext
        self.mailboxes[mailbox_id] = mb
        return mb

    def restamp(self, obj, mb: Mailbox | None, beaten: Item) -> None:
        """Keep our version, but newer than the concurrent one it beat, so it spreads."""
        if _key(beaten.origin, beaten.origin_modseq) <= self.key_of(obj.stamp):
            return
        if isinstance(obj, Record):
            self.m.put_record(mb, obj, obj.copy(), keep_stamps=True,
                              last_updated=obj.last_updated)
        elif isinstance(obj, Mailbox):
            self.m.folder_changed(obj)
        else:
            self.m.put_object(obj, mailbox=mb)
        self.written += 1

    def expunge(self, mb: Mailbox, rec: Record) -> None:
        old = rec.copy()
        rec.stamp.removed = True
        self.m.put_record(mb, rec, old, keep_stamps=True)
        self.expunged += 1
        self.written += 1


def _apply_items(ctx: _Context, fetched: dict) -> None:
    by_kind: dict[bytes, list[Item]] = {}
    for item in ctx.cs.items:
        by_kind.setdefault(item.kind, []).append(item)
    for item in by_kind.get(MAILBOX, ()):
        ctx.incoming_mb[item.ident[0]] = item
    records = by_kind.get(RECORD, [])
    fresh = _fresh_mail(ctx, records)
    for item in by_kind.get(MAILBOX, ()):
        _apply_mailbox(ctx, item, fresh)
    _place_names(ctx)
    for item in records:
        _apply_record(ctx, item, fetched)
    _renumber(ctx)
    for kind in (ACL, ANNOTATION, SUBSCRIPTION, SEEN, SIEVE, QUOTA):
        for item in by_kind.get(kind, ()):
            _apply_lww(ctx, item, fetched)
    for mbid, item in ctx.retire.items():
        _retire(ctx, ctx.mailboxes[mbid], item)
    if SIEVE in by_kind:
        _one_active_sieve(ctx)
    _rename_clashes(ctx)


def _fresh_mail(ctx: _Context, records: list[Item]) -> set[str]:
    """Mailboxes for which the change set brings live mail we have never seen created."""
    out = set()
    for r in records:
        if not r.removed:
            created_origin, created_om = r.fields[7]
            if not covers(ctx.local_vv, created_origin, created_om):
                out.add(r.ident[0])
    return out


# -- mailboxes --------------------------------------------------------------------------
def _apply_mailbox(ctx: _Context, item: Item, fresh: set[str]) -> None:
    m = ctx.m
    mbid = item.ident[0]
    name, uidvalidity, uidnext, specialuse, _createdmodseq = item.fields
    name = names.mailbox(name)
    local = ctx.local_mailbox(mbid)
    rel = ctx.relation(local.stamp if local else None, item)
    if local is None:
        mb = _new_mailbox(ctx, mbid, name, uidvalidity, uidnext, specialuse, item)
        if item.removed:
            mb.stamp.removed = True      # a tombstone we keep for others; it holds no name
        else:
            ctx.clashes.append(mb)       # placed by _place_names
        ctx.written += 1
        return
    if rel == "same":
        # Appends move uidnext without a new stamp on the mailbox (and the parts
        # of a first sync, changeset.split, raise it in steps): uidnext is the
        # maximum of both sides'.
        if uidnext > local.uidnext:
            local.uidnext = uidnext
            m.touch_mailbox(local)
        return
    if not ctx.concurrent and not item.removed and not local.stamp.removed:
        if uidvalidity < local.uidvalidity:
            raise LegalityError("uidvalidity-lowered", f"mailbox {local.name!r} ({mbid}): "
                                f"uidvalidity {uidvalidity} is below ours ({local.uidvalidity})",
                                subject=mbid)
        if rel == "incoming" and uidnext < local.uidnext:
            raise LegalityError("uidnext-lowered", f"mailbox {local.name!r} ({mbid}): uidnext "
                                f"{uidnext} is below ours ({local.uidnext})", subject=mbid)
    if uidnext > local.uidnext:
        local.uidnext = uidnext
        m.touch_mailbox(local)
    local.uidvalidity = max(local.uidvalidity, uidvalidity)
    ours_live, theirs_live = not local.stamp.removed, not item.removed
    if not ours_live and theirs_live and rel != "incoming" and mbid in fresh:
        # We deleted it; their mail we had not seen created brings it back
        # (whether or not we had seen their version of the mailbox itself).
        local.stamp.removed = False
        ctx.revived.add(mbid)
        _take_folder(ctx, local, name, specialuse, None)
        ctx.written += 1
        return
    if rel == "local":
        return

    if rel == "incoming":
        if ours_live and not theirs_live:
            ctx.retire[mbid] = item            # after the records (they may bring tombstones)
            if not ctx.concurrent:
                # It goes for certain: free its name now for a mailbox taking it.
                _release_name(m, local)
        elif not theirs_live:
            m.folder_changed(local, **ctx.stamp_args(item))     # both deleted: take theirs
        else:
            if not ours_live:
                local.stamp.removed = False     # they recreated it after seeing our delete
            _take_folder(ctx, local, name, specialuse, item)
        ctx.written += 1
        return

    # Concurrent.
    if ours_live and theirs_live:
        if _key(item.origin, item.origin_modseq) > ctx.key_of(local.stamp):
            _take_folder(ctx, local, name, specialuse, item)
            ctx.written += 1
        return
    if not ours_live and not theirs_live:
        if _key(item.origin, item.origin_modseq) > ctx.key_of(local.stamp):
            m.folder_changed(local, **ctx.stamp_args(item))
            ctx.written += 1
        return
    if ours_live:
        ctx.retire[mbid] = item   # they deleted it: decided after the records are in
        return
    # We deleted it and they have no mail we never saw: the delete stands.
    ctx.restamp(local, None, item)


def _release_name(m: Mutation, mb: Mailbox) -> None:
    """Drop mb's entry in the name index, if the name is indexed to mb."""
    key = IX_NAME + m.user.prefix + mb.name.encode()
    held = m.txn.get("index", key)
    if held is not None and U64.unpack(held)[0] == mb.num:
        m.txn.delete("index", key)


def _take_folder(ctx: _Context, mb: Mailbox, name: str, specialuse, item: Item | None) -> None:
    """Adopt name and special-use (with item's stamp, or a fresh one of ours)."""
    m = ctx.m
    _release_name(m, mb)      # _place_names indexes the new name
    mb.name = name
    mb.specialuse = tuple(specialuse)
    if item is None:
        m.folder_changed(mb)
    else:
        m.folder_changed(mb, **ctx.stamp_args(item))
    ctx.clashes.append(mb)


def _new_mailbox(ctx: _Context, mbid, name, uidvalidity, uidnext, specialuse, item) -> Mailbox:
    m = ctx.m
    num = ctx.store._next_mailbox_num(m.txn)
    mb = Mailbox(mbid, name, uidvalidity, uidnext=uidnext, createdmodseq=m.modseq,
                 specialuse=tuple(specialuse), cyrus_crc=cyrus_crc.CRC_INIT_BASIC,
                 cyrus_crc_annot=cyrus_crc.CRC_INIT_ANNOT, num=num)
    m.add_mailbox(mb, **ctx.stamp_args(item))
    m.txn.put("index", IX_UNIQUEID + mbid.encode(), m.user.prefix + U64.pack(num))
    ctx.mailboxes[mbid] = mb
    return mb


def _place_names(ctx: _Context) -> None:
    """Index the new names, after every rename has released its old name (swaps work)."""
    m = ctx.m
    pending, ctx.clashes = ctx.clashes, []
    for mb in pending:
        if mb.stamp.removed:
            continue
        key = IX_NAME + m.user.prefix + mb.name.encode()
        other = m.txn.get("index", key)
        if other is not None and U64.unpack(other)[0] != mb.num:
            if not ctx.concurrent:
                raise LegalityError("name-conflict", f"mailbox {mb.name!r} exists here with "
                                    f"another unique id", subject=mb.name)
            ctx.clashes.append(mb)   # _rename_clashes decides, after everything else
            continue
        m.txn.put("index", key, U64.pack(mb.num))
        _raise_uidvalidity_floor(m, mb.name, mb.uidvalidity)


def _has_unseen_mail(ctx: _Context, mb: Mailbox) -> bool:
    for r in _records_of(ctx.m, mb):
        if not r.stamp.removed and not covers(ctx.cs.state, ctx.oid(r.created[0]), r.created[1]):
            return True
    return False


def _retire(ctx: _Context, mb: Mailbox, item: Item) -> None:
    """Delete mb here.  In a merge, keep what the deleter had not seen created."""
    m = ctx.m
    if mb.stamp.removed:
        return
    if ctx.concurrent and _has_unseen_mail(ctx, mb):
        ctx.revived.add(mb.id)
        ctx.expunged += m.retire_contents(mb, keep=_unseen_by_sender(ctx))
        ctx.restamp(mb, None, item)
        return
    ctx.expunged += m.retire_contents(mb)
    _release_name(m, mb)
    newer_than_theirs = ctx.key_of(mb.stamp) > _key(item.origin, item.origin_modseq)
    mb.stamp.removed = True
    if newer_than_theirs:
        m.folder_changed(mb)      # their delete beat a newer version of ours: stamp it anew
    else:
        m.folder_changed(mb, **ctx.stamp_args(item))
    ctx.written += 1


def _unseen_by_sender(ctx: _Context):
    def keep(obj) -> bool:
        if isinstance(obj, Record):
            return not covers(ctx.cs.state, ctx.oid(obj.created[0]), obj.created[1])
        return not ctx.sender_saw(obj.stamp)
    return keep


def _raise_uidvalidity_floor(m: Mutation, name: str, uidvalidity: int) -> None:
    vkey = IX_UIDVALIDITY + m.user.prefix + name.encode()
    prev = m.txn.get("index", vkey)
    if prev is None or U32.unpack(prev)[0] < uidvalidity:
        m.txn.put("index", vkey, U32.pack(uidvalidity))


def _rename_clashes(ctx: _Context) -> None:
    """Two live mailboxes want one name: the lower unique id keeps it."""
    m = ctx.m
    for mb in ctx.clashes:
        key = IX_NAME + m.user.prefix + mb.name.encode()
        raw = m.txn.get("index", key)
        if raw is None:
            m.txn.put("index", key, U64.pack(mb.num))
            continue
        holder = m.mailbox(U64.unpack(raw)[0])
        if holder.num == mb.num:
            continue
        keeper, loser = sorted((holder, mb), key=lambda x: x.id)
        m.txn.put("index", key, U64.pack(keeper.num))
        base = f"{loser.name}~{loser.id[:6]}"
        new_name, n = base, 1
        while m.txn.get("index", IX_NAME + m.user.prefix + new_name.encode()) is not None:
            n += 1
            new_name = f"{base}{n}"
        loser.name = new_name
        m.txn.put("index", IX_NAME + m.user.prefix + new_name.encode(), U64.pack(loser.num))
        _raise_uidvalidity_floor(m, new_name, loser.uidvalidity)
        m.folder_changed(loser)
        ctx.written += 1


def _records_of(m: Mutation, mb: Mailbox):
    for k, v in list(m.txn.prefix("objects", m.user.prefix + RECORD + U64.pack(mb.num))):
        yield Record.unpack(k[5:], v)


# -- records --------------------------------------------------------------------------------
def _record_from_item(ctx: _Context, item: Item, mb: Mailbox) -> Record:
    (address, sha1, size, internaldate, savedate, flags, annotations, created,
     flag_stamps, renumbered_from, moved_to) = item.fields
    onum = ctx.onum
    rec = Record(item.ident[1], bytes(address), bytes(sha1), size, internaldate, savedate,
                 normalized_flags(flags), annotations=tuple(sorted(
                     (e, u, bytes(v)) for e, u, v in annotations)) if annotations else (),
                 stamp=Stamp(removed=item.removed), mailbox=mb.num,
                 created=[onum(created[0]), created[1]],
                 flag_stamps={k: [v[0], onum(v[1])] for k, v in flag_stamps.items()}
                 if flag_stamps else {})
    rec.createdmodseq = ctx.m.modseq
    rec.renumbered_from, rec.moved_to = renumbered_from, tuple(moved_to)
    return rec


def _apply_record(ctx: _Context, item: Item, fetched: dict) -> None:
    m = ctx.m
    mbid, uid = item.ident
    mb = ctx.local_mailbox(mbid)
    if mb is None or (mb.stamp.removed and mbid not in ctx.revived and not item.removed):
        if ctx.concurrent and mb is not None:
            # Deleted here, and not mail we never saw (that would have revived it):
            # our tombstone stands, newer than the change it beat.
            local = m.record(mb, uid)
            if local is not None:
                ctx.restamp(local, mb, item)
            else:
                # Never had it: hold a tombstone that beats it, or its version
                # would count as seen here with nothing to say it went.
                gone = _record_from_item(ctx, item, mb)
                gone.stamp.removed = True
                m.put_record(mb, gone, None, keep_stamps=True)
                ctx.written += 1
            return
        raise LegalityError("tombstoned", f"record {mbid}/{uid}: its mailbox is "
                            f"{'deleted' if mb else 'unknown'} here and the change set does not "
                            f"(re)create it", subject=mbid)
    local = m.record(mb, uid)
    rel = ctx.relation(local.stamp if local else None, item)
    if rel in ("same", "local"):
        return
    theirs = _record_from_item(ctx, item, mb)
    if local is None:
        before = ctx.uidnext_before.get(mbid)
        if not item.removed and not ctx.concurrent and before is not None and uid < before:
            raise LegalityError("uid-reused", f"record {mb.name!r}/{uid}: UID below uidnext "
                                f"{before} that this store never held: UIDs are never "
                                f"reused", subject=f"{mbid}/{uid}")
        if not item.removed and mbid in ctx.revived and \
                covers(ctx.local_vv, item.fields[7][0], item.fields[7][1]):
            return   # we deleted it with the mailbox, and had seen it
        _take(ctx, mb, theirs, None, item, fetched)
        if not theirs.stamp.removed and theirs.renumbered_from and \
                _expunged_here(m.record(mb, theirs.renumbered_from), theirs.address):
            ctx.expunge(mb, theirs)   # a copy of a message expunged at its old UID here
        return
    same_message = local.address == theirs.address
    if rel == "incoming":
        if not local.stamp.removed and not item.removed and not same_message:
            raise LegalityError("content-changed", f"record {mb.name!r}/{uid}: the change set "
                                f"gives it another body; a UID's content never changes",
                                subject=f"{mbid}/{uid}")
        if local.stamp.removed and not item.removed and same_message:
            raise LegalityError("unexpunge", f"record {mb.name!r}/{uid} is expunged here; an "
                                f"expunged message never comes back", subject=f"{mbid}/{uid}")
        if local.stamp.removed and not item.removed:
            raise LegalityError("uid-reused", f"record {mb.name!r}/{uid}: another message at an "
                                f"expunged UID; UIDs are never reused", subject=f"{mbid}/{uid}")
        _take(ctx, mb, theirs, local, item, fetched)
        return
    # Concurrent changes at one UID.
    if local.stamp.removed and item.removed:
        _merge_tombstones(ctx, mb, local, theirs, item, fetched)
        return
    if not same_message:
        # Different messages: every live one moves to a new UID, the UID is expunged.
        movers = [r for r in (local, theirs) if not r.stamp.removed]
        if theirs in movers:
            _need_body(ctx, theirs, fetched)
        ctx.moves.setdefault(mb.num, []).append((uid, movers, local, item))
        return
    if local.stamp.removed:
        ctx.restamp(local, mb, item)       # our expunge wins
        return
    if item.removed:
        ctx.expunge(mb, local)              # their expunge wins
        return
    _merge_flags(ctx, mb, local, theirs, item)


def _merge_tombstones(ctx: _Context, mb: Mailbox, local: Record, theirs: Record, item: Item,
                      fetched: dict) -> None:
    """Both sides hold a tombstone at one UID."""
    m = ctx.m
    if bool(local.moved_to) != bool(theirs.moved_to):
        # One side expunged the message at this UID, the other's merge moved the
        # messages from it elsewhere: the expunge follows the message into its
        # copies, and the tombstone that stays says "expunged", so copies that
        # arrive later are caught too.
        expunged, moved = (theirs, local) if local.moved_to else (local, theirs)
        for copy in _copies(m, mb, moved.moved_to, expunged.address):
            ctx.expunge(mb, copy)
        if expunged is local:
            ctx.restamp(local, mb, item)
        elif _key(item.origin, item.origin_modseq) > ctx.key_of(local.stamp):
            _take(ctx, mb, theirs, local, item, fetched)
        else:
            m.put_record(mb, theirs, local, keep_stamps=True)   # theirs, newer than ours
            ctx.written += 1
        return
    if _key(item.origin, item.origin_modseq) > ctx.key_of(local.stamp):
        _take(ctx, mb, theirs, local, item, fetched)


def _copies(m: Mutation, mb: Mailbox, uids, address: bytes) -> list[Record]:
    """Live copies of the message with address at uids, following moves of moves."""
    out, todo, seen = [], list(uids), set()
    while todo:
        uid = todo.pop()
        if uid in seen:
            continue
        seen.add(uid)
        rec = m.record(mb, uid)
        if rec is None or rec.address != address and not rec.moved_to:
            continue
        if not rec.stamp.removed and rec.address == address:
            out.append(rec)
        todo.extend(rec.moved_to)
    return out


def _expunged_here(rec: Record | None, address: bytes) -> bool:
    """Is rec the tombstone of an expunge (not of a move) of the message with address?"""
    return rec is not None and rec.stamp.removed and not rec.moved_to and rec.address == address


def _take(ctx: _Context, mb: Mailbox, theirs: Record, local: Record | None, item: Item,
          fetched: dict) -> None:
    """Write their version of a record as it is (their stamps)."""
    if not theirs.stamp.removed:
        _need_body(ctx, theirs, fetched)
    elif local is not None and not local.stamp.removed:
        ctx.expunged += 1
    ctx.m.put_record(mb, theirs, local, keep_stamps=True, last_updated=ctx.m.now,
                     origin=ctx.onum(item.origin), origin_modseq=item.origin_modseq)
    ctx.written += 1


def _merge_flags(ctx: _Context, mb: Mailbox, local: Record, theirs: Record, item: Item) -> None:
    """Concurrent changes to one live message: the newest stamp wins, key by key."""
    def view(rec: Record):
        created = _key(ctx.oid(rec.created[0]), rec.created[1])
        flags = {f.lower(): f for f in rec.flags}
        anns = {annotation_stamp_key(e, u): (e, u, v) for e, u, v in rec.annotations}
        stamps = {k: _key(ctx.oid(v[1]), v[0]) for k, v in rec.flag_stamps.items()}
        return created, flags, anns, stamps

    lc, lf, la, ls = view(local)
    tc, tf, ta, ts = view(theirs)
    flags, anns, stamps = [], [], {}
    for k in sorted(set(lf) | set(tf) | set(la) | set(ta) | set(ls) | set(ts)):
        lst, tst = ls.get(k, lc), ts.get(k, tc)
        src_f, src_a, st = (tf, ta, tst) if tst > lst else (lf, la, lst)
        if k in src_f:
            flags.append(src_f[k])
        if k in src_a:
            anns.append(src_a[k])
        stamps[k] = [st[0], ctx.onum(st[1])]
    merged = local.copy()
    merged.flags = normalize_flags(flags)
    merged.annotations = tuple(sorted(anns))
    # Keep the earlier creation stamp (both sides then agree) and per-key stamps.
    if tc < lc:
        merged.created = list(theirs.created)
    merged.flag_stamps = stamps
    if merged.flags == local.flags and merged.annotations == local.annotations \
            and merged.created == local.created and merged.flag_stamps == local.flag_stamps:
        ctx.restamp(local, mb, item)
        return
    ctx.m.put_record(mb, merged, local, keep_stamps=True)
    ctx.written += 1


def _need_body(ctx: _Context, rec: Record, fetched: dict) -> None:
    data = fetched.get(rec.address)
    if data is not None:
        if sha1_of(data) != rec.sha1:
            raise LegalityError("body-hash-mismatch", f"body {rec.address.hex()}: SHA-1 does "
                                f"not match the record's", subject=rec.address.hex())
        ctx.store.put_body(ctx.m.txn, data, rec.address, rec.sha1,
                           packed=ctx.packed.get(rec.address))
    elif ctx.m.txn.get("blobs", rec.address) is None:
        raise LegalityError("body-missing", f"the body {rec.address.hex()} of a new message is "
                            f"neither here nor in the change set", subject=rec.address.hex())


def _renumber(ctx: _Context) -> None:
    """Place the messages that met another message at their UID under new UIDs."""
    m = ctx.m
    for num, moves in ctx.moves.items():
        mb = m.mailbox(num)
        their_uidnext = ctx.incoming_mb[mb.id].fields[2] if mb.id in ctx.incoming_mb else 0
        nxt = max(mb.uidnext, their_uidnext)
        for uid, movers, local, _item in sorted(moves, key=lambda mv: mv[0]):
            moved_to = []
            for rec in sorted(movers, key=lambda r: r.address):
                new = rec.copy()
                new.uid = nxt
                new.mailbox = mb.num
                new.stamp = Stamp()
                # A copy of a copy still names the UID the message first stood at.
                new.renumbered_from, new.moved_to = rec.renumbered_from or uid, ()
                moved_to.append(nxt)
                nxt += 1
                m.put_record(mb, new, None)
                ctx.written += 1
                if _expunged_here(m.record(mb, new.renumbered_from), new.address):
                    ctx.expunge(mb, new)   # expunged at its first UID meanwhile
                    ctx.expunged -= 1
            # The old UID ends expunged, newer than either version that stood there,
            # and says where its messages went.
            old = local.copy()
            local.moved_to = tuple(sorted(set(local.moved_to) | set(moved_to)))
            if not local.stamp.removed:
                local.stamp.removed = True
                m.put_record(mb, local, old, keep_stamps=True)
            else:
                m.put_record(mb, local, old, keep_stamps=True, last_updated=local.last_updated)
            ctx.written += 1


# -- objects whose newest version wins ----------------------------------------------------------
def _apply_lww(ctx: _Context, item: Item, fetched: dict) -> None:
    m = ctx.m
    cls = KIND_CLASSES[item.kind]
    mb = None
    if item.kind in (ACL, ANNOTATION):
        mb = ctx.local_mailbox(item.ident[0])
        if mb is None or (mb.stamp.removed and not item.removed):
            if ctx.concurrent and mb is not None:
                gone = _object_from_item(item, mb)
                local = m.get(cls, gone.key())
                if local is not None:
                    ctx.restamp(local, mb, item)   # removed with the mailbox: stands
                else:
                    gone.stamp = Stamp(removed=True)   # a tombstone that beats it
                    m.put_object(gone, mailbox=mb)
                    ctx.written += 1
                return
            raise LegalityError("tombstoned", f"{_describe(item)}: the mailbox is deleted or "
                                f"unknown here", subject=item.ident[0])
        if mb.id in ctx.revived and not item.removed and \
                covers(ctx.local_vv, item.origin, item.origin_modseq):
            return   # removed with the mailbox we deleted (and we had seen this version)
    obj = _object_from_item(item, mb)
    local = m.get(cls, obj.key())
    rel = ctx.relation(local.stamp if local else None, item)
    if rel in ("same", "local"):
        return
    if rel == "concurrent" and _key(item.origin, item.origin_modseq) < ctx.key_of(local.stamp):
        return
    if item.kind == SIEVE and not item.removed:
        if obj.address in fetched:
            ctx.store.put_body(m.txn, fetched[obj.address], obj.address)
        elif m.txn.get("blobs", obj.address) is None:
            raise LegalityError("body-missing", f"sieve script {obj.name!r}: content "
                                f"{obj.address.hex()} is neither here nor in the change set")
    obj.stamp = Stamp(removed=item.removed)
    m.put_object(obj, mailbox=mb, **ctx.stamp_args(item))
    ctx.written += 1


def _object_from_item(item: Item, mb: Mailbox | None):
    f = item.fields
    if item.kind == SUBSCRIPTION:
        return Subscription(item.ident[0])
    if item.kind == SEEN:
        return SeenSet(item.ident[0], f[0], f[1], f[2], f[3])
    if item.kind == SIEVE:
        return SieveScript(item.ident[0], bytes(f[0]), f[1], bool(f[2]), f[3])
    if item.kind == ANNOTATION:
        return Annotation(mb.num, item.ident[1], item.ident[2], bytes(f[0]))
    if item.kind == ACL:
        return AclEntry(mb.num, item.ident[1], f[0])
    if item.kind == QUOTA:
        return QuotaRoot(item.ident[0], dict(f[0]))
    raise LegalityError("bad-kind", f"unexpected object kind {item.kind!r}")


def _one_active_sieve(ctx: _Context) -> None:
    m = ctx.m
    active = []
    for k, v in m.txn.prefix("objects", m.user.prefix + SIEVE):
        s = SieveScript.unpack(k[5:], v)
        if s.active and not s.stamp.removed:
            active.append(s)
    if len(active) <= 1:
        return
    active.sort(key=lambda s: ctx.key_of(s.stamp))
    for s in active[:-1]:
        s.active = False
        m.put_object(s)
        ctx.written += 1


# -- after ---------------------------------------------------------------------------------
def _check_claims(ctx: _Context) -> None:
    """After a clean apply we must hold exactly what the sender claims."""
    for mbid, want in ctx.cs.crcs.items():
        mb = ctx.local_mailbox(mbid)
        if mb is None or mb.stamp.removed:
            continue
        if mb.crc != want:
            raise LegalityError("crc-mismatch", f"mailbox {mb.name!r} ({mbid}): CRC after apply "
                                f"is {mb.crc:016x}, the change set claims {want:016x}; nothing "
                                f"was committed", subject=mbid)


def _absorb_state(ctx: _Context) -> None:
    """We now hold everything the sender's state includes (taken, or beaten by ours)."""
    versions = ctx.m.user.versions
    for origin, n in ctx.cs.state.items():
        num = ctx.onum(origin)
        if versions.get(num, 0) < n:
            versions[num] = n
            ctx.m._changed = True
