"""The one write path.

Every change to a user's data happens inside a ``Mutation``: one LMDB write
transaction that allocates one modseq and, for each object it touches,

* writes the object with its new stamp (modseq, origin, origin modseq),
* moves the object's entry in the change index to the new modseq, so that
  the index holds exactly one entry per object, at its latest modseq,
* XORs the object's visible digest out of (old) and into (new) the user's
  digest, and for records the mailbox's CRCs,
* keeps tombstones for removed objects.

At the end it writes each touched mailbox once (highestmodseq, uidnext,
counters, CRCs) and the user record (modseq counter, digest, version
vector).  ``engine.store.Store`` wraps the public operations around this;
nothing else writes objects.
"""
from __future__ import annotations

import time

from . import crc as cyrus_crc
from .errors import (FullSyncNeeded, NoSuchMailbox, NoSuchObject, NoSuchUser, StoreCorrupt,
                     UsageError)
from .model import (
    ACL, ANNOTATION, MAILBOX, MAX_MODSEQ, RECORD, U32, U64,
    KIND_CLASSES, Mailbox, Record, SieveScript, Stamp, _pack, lower_flags, record_crc64,
    unpackb,
)

DIGEST_ZERO = bytes(16)
# LMDB keys hold at most 511 bytes; the per-origin index adds 17 to an object's key.
MAX_OBJECT_KEY = 511 - 17


def xor16(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(16, "big")


class UserRecord:
    """Per-user counters: number (key prefix), modseq, tombstone horizon, digest, versions."""

    __slots__ = ("name", "num", "modseq", "horizon", "digest", "created", "versions", "expired",
                 "prefix")

    def __init__(self, name, num, modseq=0, horizon=0, digest=DIGEST_ZERO, created=0,
                 versions=None, expired=None):
        self.name = name
        self.num = num
        self.prefix = U32.pack(num)     # every key of the user's objects starts with it
        self.modseq = modseq
        self.horizon = horizon
        self.digest = digest
        self.created = created
        # origin number -> highest origin modseq included (the version vector)
        self.versions = versions if versions is not None else {}
        # origin number -> highest origin modseq of an expired tombstone: a
        # receiver whose state does not cover these may have missed a deletion.
        self.expired = expired if expired is not None else {}

    def pack(self) -> bytes:
        return _pack([self.num, self.modseq, self.horizon, self.digest, self.created,
                      self.versions, self.expired])

    @classmethod
    def unpack(cls, name: str, b: bytes) -> "UserRecord":
        v = unpackb(b)
        return cls(name, v[0], v[1], v[2], v[3], v[4], {int(k): n for k, n in v[5].items()},
                   {int(k): n for k, n in v[6].items()})


def object_key(user: UserRecord, kind: bytes, key: bytes) -> bytes:
    return user.prefix + kind + key


def change_key(user: UserRecord, modseq: int, kind: bytes, key: bytes) -> bytes:
    return user.prefix + U64.pack(modseq) + kind + key


def origin_key(user: UserRecord, origin: int, origin_modseq: int, kind: bytes, key: bytes) -> bytes:
    return user.prefix + U32.pack(origin) + U64.pack(origin_modseq) + kind + key


class Mutation:
    """One atomic change to one user's data.  Created by ``Store.mutate``."""

    def __init__(self, store, txn, user: UserRecord, *, modseq: int | None = None):
        self.store = store
        self.txn = txn
        self.user = user
        want = user.modseq + 1 if modseq is None else max(modseq, user.modseq + 1)
        if want > MAX_MODSEQ:
            raise StoreCorrupt(f"user {user.name!r}: modseq would exceed 2^63-1", subject=user.name)
        self.modseq = want
        self.now = int(time.time())
        self._mailboxes: dict[int, Mailbox] = {}      # touched, written at finish()
        self._mailbox_digest: dict[int, bytes] = {}   # their visible digest before
        self._mailbox_old_stamp: dict[int, Stamp | None] = {}  # their stamp before
        self._changed = False

    # -- generic object write -------------------------------------------------
    def _index(self, kind: bytes, key: bytes, old: Stamp | None, new: Stamp | None) -> None:
        """Move an object's entries in the change index and the per-origin index.

        (The keys are change_key() and origin_key(), built inline: this runs
        for every object written.)
        """
        p, txn, tail = self.user.prefix, self.txn, kind + key
        if old is not None:
            txn.delete("changes", p + U64.pack(old.modseq) + tail)
            txn.delete("byorigin", p + U32.pack(old.origin) + U64.pack(old.origin_modseq) + tail)
        if new is not None:
            txn.put("changes", p + U64.pack(new.modseq) + tail, b"")
            txn.put("byorigin", p + U32.pack(new.origin) + U64.pack(new.origin_modseq) + tail,
                    b"")

    def _write(self, obj, old_stamp: Stamp | None, old_digest: bytes | None,
               new_digest: bytes | None, *, origin: int = 0,
               origin_modseq: int | None = None) -> None:
        """Write obj with a fresh stamp, replacing a version stamped old_stamp.

        old_digest / new_digest are the visible digests to XOR out of and into
        the user's digest (None for tombstones, which users do not see).
        """
        kind, key = obj.KIND, obj.key()
        if len(key) > MAX_OBJECT_KEY:
            raise UsageError(f"{KIND_CLASSES[kind].__name__} name too long "
                             f"({len(key)} bytes; at most {MAX_OBJECT_KEY}): {key[:40]!r}...")
        if old_digest is not None:
            self.user.digest = xor16(self.user.digest, old_digest)
        obj.stamp.modseq = self.modseq
        obj.stamp.origin = origin
        obj.stamp.origin_modseq = self.modseq if origin_modseq is None else origin_modseq
        self.txn.put("objects", object_key(self.user, kind, key), obj.pack())
        self._index(kind, key, old_stamp, obj.stamp)
        if new_digest is not None and not obj.stamp.removed:
            self.user.digest = xor16(self.user.digest, new_digest)
        self._note_version(obj.stamp)

    def _note_version(self, stamp: Stamp) -> None:
        v = self.user.versions
        if v.get(stamp.origin, 0) < stamp.origin_modseq:
            v[stamp.origin] = stamp.origin_modseq
        self._changed = True

    def _drop(self, kind: bytes, key: bytes, stamp: Stamp, digest: bytes | None) -> None:
        """Remove an object and its change entry outright, leaving no tombstone.

        Only for objects whose removal another tombstone already implies (the
        records of a deleted mailbox) and for tombstone expiry.
        """
        self.txn.delete("objects", object_key(self.user, kind, key))
        self._index(kind, key, stamp, None)
        if digest is not None:
            self.user.digest = xor16(self.user.digest, digest)
        self._changed = True

    def get(self, cls, key: bytes):
        raw = self.txn.get("objects", object_key(self.user, cls.KIND, key))
        return None if raw is None else cls.unpack(key, raw)

    def get_raw(self, kind: bytes, key: bytes) -> bytes | None:
        return self.txn.get("objects", object_key(self.user, kind, key))

    # -- mailboxes ------------------------------------------------------------
    def mailbox(self, num: int) -> Mailbox:
        """The mailbox with local number num, as this mutation sees it (cached)."""
        mb = self._mailboxes.get(num)
        if mb is None:
            raw = self.get_raw(MAILBOX, U64.pack(num))
            if raw is None:
                raise NoSuchMailbox(f"mailbox #{num} of user {self.user.name!r} does not exist")
            mb = Mailbox.unpack(U64.pack(num), raw)
            self._mailboxes[num] = mb
            self._mailbox_digest[num] = None if mb.stamp.removed else mb.visible_digest()
            self._mailbox_old_stamp[num] = Stamp(mb.stamp.modseq, mb.stamp.origin,
                                                 mb.stamp.origin_modseq, mb.stamp.removed)
        return mb

    def mailbox_by_name(self, name: str) -> Mailbox:
        num = self.store._mailbox_num(self.txn, self.user, name)
        if num is None:
            raise NoSuchMailbox(f"user {self.user.name!r} has no mailbox {name!r}; "
                                f"`modsync mailbox list` shows what exists", subject=name)
        return self.mailbox(num)

    def add_mailbox(self, mb: Mailbox, *, origin: int = 0, origin_modseq: int | None = None) -> None:
        """Register a new mailbox (or one recreated under a tombstoned number)."""
        old = self.get_raw(MAILBOX, mb.key())
        self._mailboxes[mb.num] = mb
        self._mailbox_digest[mb.num] = None
        self._mailbox_old_stamp[mb.num] = None if old is None else Mailbox.unpack(mb.key(), old).stamp
        mb.stamp = Stamp(0, 0, 0, False)
        self.folder_changed(mb, origin=origin, origin_modseq=origin_modseq)

    def touch_mailbox(self, mb: Mailbox, *, folder: bool = False) -> None:
        """Note that something in mb changed: it takes this mutation's modseq."""
        if folder:
            mb.foldermodseq = self.modseq
        mb.highestmodseq = self.modseq

    def folder_changed(self, mb: Mailbox, *, origin: int = 0,
                       origin_modseq: int | None = None) -> None:
        """The mailbox itself (name, uidvalidity, special-use, existence) changed.

        The mailbox's stamp origin records who made its last folder-level
        change; record changes inside it do not move it.
        """
        mb.stamp.origin = origin
        mb.stamp.origin_modseq = self.modseq if origin_modseq is None else origin_modseq
        self.touch_mailbox(mb, folder=True)

    def remove_mailbox(self, mb: Mailbox, *, origin: int = 0,
                       origin_modseq: int | None = None) -> None:
        """Turn mb into a tombstone, and everything in it too.

        Its records are expunged and its ACL entries and annotations removed,
        each leaving a tombstone of its own: a replica learns exactly which
        messages the delete took, and an expunge that came before the delete
        is never forgotten.
        """
        self.retire_contents(mb)
        mb.stamp.removed = True
        self.folder_changed(mb, origin=origin, origin_modseq=origin_modseq)

    def retire_contents(self, mb: Mailbox, keep=lambda obj: False) -> int:
        """Tombstone every live record, ACL entry and annotation of mb unless keep(obj).

        Returns the number of live messages expunged.
        """
        prefix = self.user.prefix
        expunged = 0
        for k, v in list(self.txn.prefix("objects", prefix + RECORD + U64.pack(mb.num))):
            r = Record.unpack(k[5:], v)
            if not r.stamp.removed and not keep(r):
                old = r.copy()
                r.stamp.removed = True
                self.put_record(mb, r, old)
                expunged += 1
        for kind in (ACL, ANNOTATION):
            cls = KIND_CLASSES[kind]
            for k, v in list(self.txn.prefix("objects", prefix + kind + U64.pack(mb.num))):
                obj = cls.unpack(k[5:], v)
                if not obj.stamp.removed and not keep(obj):
                    obj.stamp.removed = True
                    self.put_object(obj, mailbox=mb)
        return expunged

    # -- records --------------------------------------------------------------
    def put_record(self, mb: Mailbox, rec: Record, old: Record | None, *, origin: int = 0,
                   origin_modseq: int | None = None, last_updated: int | None = None,
                   keep_stamps: bool = False) -> None:
        """Write a record (new, changed or expunged) and keep mb's counters and CRCs.

        Local changes stamp each flag and annotation that changed; records
        copied from another store (``keep_stamps``) keep the stamps they bring.
        """
        rec.mailbox = mb.num
        old_stamp = old_digest = None
        if old is not None:
            old_stamp = old.stamp
            if not old.stamp.removed:
                # old is the version stored here: what it added when written
                shares = old.shares
                if shares is not None:
                    old_digest, b, a = shares
                else:
                    old_digest = old.visible_digest(mb.id)
                    b, a = cyrus_crc.record_crcs(old)
                mb.crc ^= record_crc64(old_digest)
                mb.messages -= 1
                mb.size -= old.size
                mb.cyrus_crc ^= b
                mb.cyrus_crc_annot ^= a
        rec.last_updated = self.now if last_updated is None else last_updated
        if origin_modseq is None:
            origin_modseq = self.modseq
        if keep_stamps:
            pass   # a replicated record brings its own creation and flag stamps
        elif old is None:
            rec.created = [origin, origin_modseq]
            rec.flag_stamps = {}
        elif not old.stamp.removed:
            _stamp_flag_changes(old, rec, [origin_modseq, origin])
        new_digest = None
        if rec.stamp.removed:
            rec.shares = None
        else:
            # The Cyrus CRC covers the modseq _write gives it: set it first.
            rec.stamp.modseq = self.modseq
            new_digest = rec.visible_digest(mb.id)
            b, a = cyrus_crc.record_crcs(rec)
            rec.shares = [new_digest, b, a]
            mb.crc ^= record_crc64(new_digest)
            mb.messages += 1
            mb.size += rec.size
            mb.cyrus_crc ^= b
            mb.cyrus_crc_annot ^= a
        self._write(rec, old_stamp, old_digest, new_digest, origin=origin,
                    origin_modseq=origin_modseq)
        if rec.uid >= mb.uidnext:
            mb.uidnext = rec.uid + 1
        self.touch_mailbox(mb)

    def record(self, mb: Mailbox, uid: int) -> Record | None:
        return self.get(Record, mb.key() + U32.pack(uid))

    # -- other kinds ----------------------------------------------------------
    def put_object(self, obj, *, origin: int = 0, origin_modseq: int | None = None,
                   mailbox: Mailbox | None = None, if_changed: bool = False) -> None:
        """Write a subscription, seen set, sieve script, annotation, ACL entry or quota.

        A tombstone is an object whose ``stamp.removed`` is set: pass the
        object with removed=True to delete it.  Mailbox-scoped kinds need
        ``mailbox`` (their digest names the mailbox by its unique id).
        With ``if_changed``, an object equal to what is stored is not
        written (no modseq, nothing to replicate).
        """
        key = obj.key()
        old_raw = self.get_raw(obj.KIND, key)
        old_stamp = old_digest = None
        args = (mailbox.id,) if mailbox is not None else ()
        if old_raw is not None:
            old = type(obj).unpack(key, old_raw)
            if if_changed:
                mine = obj.stamp
                obj.stamp = old.stamp
                same = obj.pack() == old_raw
                obj.stamp = mine
                if same and mine.removed == old.stamp.removed:
                    return
            old_stamp = old.stamp
            if not old.stamp.removed:
                old_digest = old.visible_digest(*args)
        self._write(obj, old_stamp, old_digest, obj.visible_digest(*args), origin=origin,
                    origin_modseq=origin_modseq)
        if mailbox is not None:
            self.touch_mailbox(mailbox, folder=True)

    def remove(self, obj, *, mailbox: Mailbox | None = None, missing: str) -> None:
        """Tombstone an existing, live object; NoSuchObject(missing) if there is none.

        ``obj`` only needs its key fields set: the current value is read and
        kept in the tombstone.
        """
        cur = self.get(type(obj), obj.key())
        if cur is None or cur.stamp.removed:
            raise NoSuchObject(missing)
        cur.stamp.removed = True
        if isinstance(cur, SieveScript):
            cur.active = False
        self.put_object(cur, mailbox=mailbox)

    # -- finishing --------------------------------------------------------------
    def finish(self) -> None:
        """Write each changed mailbox once, then the user record (called by Store.mutate)."""
        for num, mb in self._mailboxes.items():
            if mb.highestmodseq != self.modseq:
                continue  # only read
            old_digest = self._mailbox_digest.get(num)
            if old_digest is not None:
                self.user.digest = xor16(self.user.digest, old_digest)
            key = mb.key()
            mb.stamp.modseq = self.modseq
            self.txn.put("objects", object_key(self.user, MAILBOX, key), mb.pack())
            self._index(MAILBOX, key, self._mailbox_old_stamp.get(num), mb.stamp)
            if not mb.stamp.removed:
                self.user.digest = xor16(self.user.digest, mb.visible_digest())
            self._note_version(mb.stamp)
        if self._changed:
            self.user.modseq = self.modseq
            self.txn.put("users", self.user.name.encode(), self.user.pack())
            # Replication (issue 5): the intent to replicate this change goes
            # in the same transaction, so no committed change can escape every
            # later replication run (engine.replication reads these).
            record_intent(self.txn, self.user.name, self.modseq)

    @property
    def changed(self) -> bool:
        return self._changed


# -- replication intents (issue 5; read by engine.replication) ---------------------
INTENT_USER = b"u"      # intents table: b"u" + user name -> [modseq, time_ms, time log, seq]
INTENT_LOG_LEN = 32     # (modseq, second) pairs kept: when the first unreplicated commit was
# Which users committed lately, so that watchers read O(changed users), not every
# user's row: b"t" + u64 seq -> user name, one row per user at its latest commit
# sequence number; b"s" -> u64, the last sequence number given.
INTENT_RECENT = b"t"
INTENT_SEQ = b"s"


def record_intent(txn, user: str, modseq: int) -> None:
    """Note that ``user`` has changes up to ``modseq`` to replicate (inside the change's txn).

    The log holds the first modseq committed in each of the last
    INTENT_LOG_LEN distinct seconds, so `modsync status` can say how many
    seconds a replica is behind without a row per commit.
    """
    key = INTENT_USER + user.encode()
    now = time.time()
    raw = txn.get("intents", key)
    old = unpackb(raw) if raw is not None else None
    log = old[2] if old is not None else []
    second = int(now)
    if not log or log[-1][1] != second:
        log.append([modseq, second])
        del log[:-INTENT_LOG_LEN]
    last = txn.get("intents", INTENT_SEQ)
    seq = (U64.unpack(last)[0] if last is not None else 0) + 1
    txn.put("intents", INTENT_SEQ, U64.pack(seq))
    if old is not None and len(old) > 3:
        txn.delete("intents", INTENT_RECENT + U64.pack(old[3]))
    txn.put("intents", INTENT_RECENT + U64.pack(seq), user.encode())
    txn.put("intents", key, _pack([modseq, int(now * 1000), log, seq]))


def annotation_stamp_key(entry: str, userid: str) -> str:
    return entry + "\0" + userid


def _stamp_flag_changes(old, new, stamp: list) -> None:
    """Give every flag and annotation whose state differs between old and new this stamp."""
    stamps = dict(old.flag_stamps)
    if old.flags != new.flags:
        for f in set(lower_flags(old.flags)) ^ set(lower_flags(new.flags)):
            stamps[f] = stamp
    if old.annotations != new.annotations:
        old_ann = {annotation_stamp_key(e, u): v for e, u, v in old.annotations}
        new_ann = {annotation_stamp_key(e, u): v for e, u, v in new.annotations}
        for k in old_ann.keys() | new_ann.keys():
            if old_ann.get(k) != new_ann.get(k):
                stamps[k] = stamp
    new.flag_stamps = stamps


def check_since(user: UserRecord, since: int) -> None:
    if 0 < since < user.horizon:
        raise FullSyncNeeded(user.name, since, user.horizon)


def require_user(user: UserRecord | None, name: str) -> UserRecord:
    if user is None:
        raise NoSuchUser(f"no user {name!r} in this store; `modsync status` lists users",
                         subject=name)
    return user
