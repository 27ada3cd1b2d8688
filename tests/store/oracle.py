"""Independent recomputations the store tests compare the engine against.

Nothing here reuses the engine's incremental code: snapshots come from the
read API, Cyrus CRCs are written again from the reference pseudo-code
(shared/reference/cyrus-replication.md §3), and change sets are derived by
diffing two full snapshots.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

from engine import Message, Store
from engine.errors import FullSyncNeeded
from engine.model import U64, record_crc64

# --- Cyrus SYNC_CRC / SYNC_CRC_ANNOT, straight from the reference ----------------

CRC_INIT_BASIC = 0
CRC_INIT_ANNOT = 12345678
_SYSTEM = ("\\deleted", "\\answered", "\\flagged", "\\draft", "\\seen")
VIRTUAL_SAVEDATE = "/vendor/cmu/cyrus-imapd/savedate"
VIRTUAL_CREATEDMODSEQ = "/vendor/cmu/cyrus-imapd/createdmodseq"
VIRTUAL_THRID = "/vendor/cmu/cyrus-imapd/thrid"
VIRTUAL_ENTRIES = (VIRTUAL_SAVEDATE, VIRTUAL_CREATEDMODSEQ, VIRTUAL_THRID)


def crc32(x) -> int:
    return zlib.crc32(x if isinstance(x, bytes) else x.encode()) & 0xFFFFFFFF


def cyrus_flag_crc(flags) -> int:
    f = 0
    for name in flags:
        low = name.lower()
        assert not (low.startswith("\\") and low not in _SYSTEM), \
            f"record stores {name!r}, which is not a flag Cyrus keeps in a record"
        f ^= crc32(low)
    return f


def cyrus_crc_basic(uid, modseq, last_updated, flags, internaldate, guid_hex40) -> int:
    # printf formats as in Cyrus's mailbox.c, kept verbatim on purpose
    s = "%u %u %d (%u) %d %s" % (uid, modseq, last_updated, cyrus_flag_crc(flags),  # noqa: UP031
                                 internaldate, guid_hex40)
    return crc32(s)


def cyrus_crc_annot(uid, entry, userid, value: bytes) -> int:
    line = "%u %s %s " % (uid, entry, "" if userid is None else userid)  # noqa: UP031
    return crc32(line.encode() + value)


def cyrus_record_annot(uid, savedate, createdmodseq, annotations) -> int:
    c = 0
    if savedate:
        c ^= cyrus_crc_annot(uid, VIRTUAL_SAVEDATE, "", str(savedate).encode())
    if createdmodseq:
        c ^= cyrus_crc_annot(uid, VIRTUAL_CREATEDMODSEQ, "", str(createdmodseq).encode())
    for entry, userid, value in annotations:
        if entry in VIRTUAL_ENTRIES:
            continue   # Cyrus computes these from the record, never from stored values
        c ^= cyrus_crc_annot(uid, entry, userid, value)
    return c


def cyrus_mailbox_crcs(records) -> tuple[int, int]:
    """(SYNC_CRC, SYNC_CRC_ANNOT) over the live records of one mailbox."""
    basic, annot = CRC_INIT_BASIC, CRC_INIT_ANNOT
    for r in records:
        if r.stamp.removed:
            continue
        basic ^= cyrus_crc_basic(r.uid, r.stamp.modseq, r.last_updated, r.flags,
                                 r.internaldate, r.sha1.hex())
        annot ^= cyrus_record_annot(r.uid, r.savedate, r.createdmodseq, r.annotations)
    return basic, annot


@dataclass
class MailboxTotals:
    messages: int
    size: int
    crc: int
    cyrus_crc: int
    cyrus_crc_annot: int


def mailbox_totals(mailbox_id: str, records) -> MailboxTotals:
    live = [r for r in records if not r.stamp.removed]
    crc = 0
    for r in live:
        crc ^= record_crc64(r.visible_digest(mailbox_id))
    b, a = cyrus_mailbox_crcs(live)
    return MailboxTotals(len(live), sum(r.size for r in live), crc, b, a)


def check_mailbox_totals(store: Store, user: str) -> None:
    """Every live mailbox's counters and CRCs equal a recomputation from its records."""
    for mb in store.mailboxes(user):
        t = mailbox_totals(mb.id, store.records(user, mb.name, include_expunged=True))
        got = MailboxTotals(mb.messages, mb.size, mb.crc, mb.cyrus_crc, mb.cyrus_crc_annot)
        assert got == t, f"mailbox {mb.name!r}: stored {got} but recomputed {t}"


# --- snapshots and change sets -------------------------------------------------------

Identity = tuple  # (kind name, key bytes)


def identity(change) -> Identity:
    return (change.kind, change.object.key())


def snapshot(store: Store, user: str) -> dict[Identity, object]:
    """Every object of the user (tombstones included): identity -> object."""
    out = {}
    for c in store.changes_since(user, 0):
        ident = identity(c)
        assert ident not in out, f"changes_since(0) lists {ident} twice"
        out[ident] = c.object
    return out


def state(obj) -> bytes:
    """The full stored state of an object (stamp included)."""
    return obj.pack()


def scoped_mailbox(ident: Identity) -> int | None:
    kind, key = ident
    if kind in ("record", "acl", "annotation"):
        return U64.unpack_from(key)[0]
    return None


def check_changes_since(store: Store, user: str, since: int, then: dict, now: dict) -> None:
    """changes_since(user, since) must equal the diff of the snapshots `then` (at since) and `now`.

    Changed or new objects must be listed, unchanged ones must not.  An
    object may vanish without being listed only when a listed mailbox
    tombstone implies it (records, ACL entries and annotations of a deleted
    mailbox) or when it was already a tombstone at `since` (expired, or gone
    with its deleted mailbox).
    """
    changes = store.changes_since(user, since)
    got = [identity(c) for c in changes]
    assert len(got) == len(set(got)), f"changes_since({since}) lists an object twice"
    modseqs = [c.modseq for c in changes]
    assert modseqs == sorted(modseqs), f"changes_since({since}) is not in modseq order"
    for c in changes:
        assert c.modseq > since, f"{identity(c)} listed at modseq {c.modseq} <= {since}"
        assert c.object.stamp.modseq == c.modseq
        mnum = scoped_mailbox(identity(c))
        if mnum is not None:
            assert c.mailbox is not None and c.mailbox.num == mnum
    want = {i for i, o in now.items() if i not in then or state(then[i]) != state(o)}
    missing = want - set(got)
    extra = set(got) - want
    assert not missing, f"changes_since({since}) misses changed objects {sorted(missing)}"
    assert not extra, f"changes_since({since}) lists unchanged objects {sorted(extra)}"
    listed_tombstones = {i[1] for i in got if i[0] == "mailbox" and now[i].stamp.removed}
    for ident in then.keys() - now.keys():
        if then[ident].stamp.removed:
            continue
        mnum = scoped_mailbox(ident)
        assert mnum is not None and U64.pack(mnum) in listed_tombstones, (
            f"{ident} vanished after modseq {since} and changes_since({since}) says nothing "
            f"that implies it")


def assert_full_sync_needed(store: Store, user: str, since: int) -> None:
    try:
        store.changes_since(user, since)
    except FullSyncNeeded as e:
        assert e.since == since
        return
    raise AssertionError(f"changes_since({since}) answered although the horizon is "
                         f"{store.user_info(user).horizon}")


# --- visible state, and rebuilding it in another store ------------------------------

def visible_state(store: Store, user: str) -> dict:
    """Everything a user can see, in plain Python values (no modseqs, no local numbers)."""
    mbs = {}
    for mb in store.mailboxes(user):
        mbs[mb.name] = {
            "id": mb.id, "uidvalidity": mb.uidvalidity, "uidnext": mb.uidnext,
            "specialuse": sorted(mb.specialuse),
            "records": {r.uid: (r.address, r.internaldate, tuple(f.lower() for f in r.flags),
                                tuple(r.annotations))
                        for r in store.records(user, mb.name)},
            "acl": store.acl(user, mb.name),
            "annotations": sorted((a.entry, a.userid, a.value)
                                  for a in store.annotations(user, mb.name)),
        }
    return {
        "mailboxes": mbs,
        "subscriptions": sorted(store.subscriptions(user)),
        "seen": sorted((s.mailbox_id, s.uids) for s in store.seen_sets(user)),
        "sieve": sorted((s.name, s.address, s.active) for s in store.sieve_scripts(user)),
        "quota": sorted((q["root"], sorted(q["limits"].items())) for q in store.quota(user)),
    }


def rebuild(src: Store, user: str, dst: Store) -> None:
    """Recreate src's visible state for user in dst by the shortest route.

    No flag is ever added and removed, nothing renamed or deleted except the
    placeholder messages that make the UIDs line up, so dst's history is as
    different from src's as it can be.
    """
    dst.create_mailbox(user, "placeholder-for-user")   # creates the user
    for mb in src.mailboxes(user):
        dst.create_mailbox(user, mb.name, unique_id=mb.id, uidvalidity=mb.uidvalidity,
                           specialuse=mb.specialuse)
        live = {r.uid: r for r in src.records(user, mb.name)}
        batch = []
        for uid in range(1, mb.uidnext):
            r = live.get(uid)
            if r is None:
                batch.append(Message(b"placeholder"))
            else:
                batch.append(Message(src.read_body(r.address), r.flags, r.internaldate,
                                     r.annotations))
        if batch:
            dst.append_many(user, mb.name, batch)
        gaps = [(u, u) for u in range(1, mb.uidnext) if u not in live]
        if gaps:
            dst.expunge(user, mb.name, gaps)
        for ident, rights in src.acl(user, mb.name).items():
            dst.set_acl(user, mb.name, ident, rights)
        for a in src.annotations(user, mb.name):
            dst.set_annotation(user, mb.name, a.entry, a.value, userid=a.userid)
    dst.delete_mailbox(user, "placeholder-for-user")
    for name in src.subscriptions(user):
        dst.subscribe(user, name)
    for s in src.seen_sets(user):
        dst.set_seen(user, s.mailbox_id, s.uids, lastuid=s.lastuid)
    active = None
    for s in src.sieve_scripts(user):
        dst.sieve_put(user, s.name, src.read_body(s.address))
        if s.active:
            active = s.name
    if active is not None:
        dst.sieve_activate(user, active)
    for q in src.quota(user):
        dst.set_quota(user, q["root"], q["limits"])
