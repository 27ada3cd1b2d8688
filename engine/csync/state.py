"""What a Cyrus peer knows that modsync's model does not: csync's own table.

A Cyrus master feeding modsync expects its replica to echo back, exactly,
per mailbox: the per-mailbox modseqs of every record, LAST_UID,
HIGHESTMODSEQ, RECENTUID/RECENTTIME, the POP3 fields, PARTITION, OPTIONS,
the ACL string in its own order, MBOXTYPE, and the SYNC_CRCs computed from
*its* modseqs (cyrus-replication §4.2 is_unchanged).  modsync numbers
modseqs per user, so these cannot live in modsync's records; they live here,
in one LMDB table ``csync`` inside the store's own environment, written in
the same transactions as the modsync objects they describe.

Keys (all under the table ``csync``)::

    M <uniqueid>                     -> CyrusMailbox  (header, cached CRCs)
    R <uniqueid> \\0 <uid u32>        -> CyrusRecord   (full Cyrus record metadata, and
                                        optionally its two CRC shares)
    N <internal name>                -> uniqueid      (every tracked mailbox)
    U <user> \\0 <uniqueid>           -> b""           (a user's tracked mailboxes)
    Q <internal quota root>          -> [modseq, {resource: limit}]
    I <modsync mailbox id>           -> uniqueid, for a modsync mailbox whose id is
                                        not the Cyrus uniqueid it holds (a folder
                                        moved between users or brought back from
                                        DELETED.*: modsync ids are never reused)

A header with ``num`` = 0 is a *shadow*: a mailbox that exists for Cyrus but
not as a modsync mailbox (``DELETED.*`` delayed deletes, the ``#sieve``
folder).  For the others, ``synced`` is the modsync mailbox's highestmodseq
after csync last wrote it: when they differ, the mailbox was changed in
modsync behind the Cyrus master's back (see ``view.reconcile``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

from .. import crc as cyrus_crc
from ..model import U32

TABLE = "csync"

K_MAILBOX = b"M"
K_RECORD = b"R"
K_NAME = b"N"
K_USER = b"U"
K_QUOTA = b"Q"
K_ALIAS = b"I"

THRID = "/vendor/cmu/cyrus-imapd/thrid"
SAVEDATE = cyrus_crc.SAVEDATE
CREATEDMODSEQ = cyrus_crc.CREATEDMODSEQ
VIRTUAL_ANNOTATIONS = (THRID, SAVEDATE, CREATEDMODSEQ)

_pack = msgpack.Packer(use_bin_type=True).pack


def _unpack(b: bytes):
    return msgpack.unpackb(b, raw=False, use_list=True, strict_map_key=False)


def ensure_table(store) -> None:
    """Open (creating if needed) csync's table in the store's LMDB environment.

    The store's ``Database`` knows its own tables only; csync adds its one
    table to the same environment so that its state commits atomically with
    the modsync objects it describes.
    """
    store.db.ensure_table(TABLE)


@dataclass(slots=True)
class CyrusMailbox:
    """A Cyrus mailbox header as the replica reports it (sync_prepare_dlists' fields)."""

    uniqueid: str
    mboxname: str
    user: str
    mbtype: str = ""
    partition: str = "default"
    acl: str = ""
    options: str = "P"
    last_uid: int = 0
    highestmodseq: int = 0
    recentuid: int = 0
    recenttime: int = 0
    last_appenddate: int = 0
    pop3_last_login: int = 0
    pop3_show_after: int = 0
    xconvmodseq: int = 0
    raclmodseq: int = 0
    uidvalidity: int = 0
    createdmodseq: int = 0
    foldermodseq: int = 0
    # mailbox annotations: [entry, userid, modseq, value bytes], sorted by (entry, userid)
    annotations: list = field(default_factory=list)
    crc_basic: int = cyrus_crc.CRC_INIT_BASIC
    crc_annot: int = cyrus_crc.CRC_INIT_ANNOT
    num: int = 0             # modsync mailbox number; 0 = shadow
    synced: int = -1         # modsync highestmodseq when csync last wrote it

    def pack(self) -> bytes:
        return _pack([self.mboxname, self.user, self.mbtype, self.partition, self.acl,
                      self.options, self.last_uid, self.highestmodseq, self.recentuid,
                      self.recenttime, self.last_appenddate, self.pop3_last_login,
                      self.pop3_show_after, self.xconvmodseq, self.raclmodseq,
                      self.uidvalidity, self.createdmodseq, self.foldermodseq,
                      [list(a) for a in self.annotations], self.crc_basic, self.crc_annot,
                      self.num, self.synced])

    @classmethod
    def unpack(cls, uniqueid: str, b: bytes) -> "CyrusMailbox":
        v = _unpack(b)
        return cls(uniqueid, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9],
                   v[10], v[11], v[12], v[13], v[14], v[15], v[16], v[17],
                   [tuple(a) for a in v[18]], v[19], v[20], v[21], v[22])

    @property
    def is_shadow(self) -> bool:
        return self.num == 0


@dataclass(slots=True)
class CyrusRecord:
    """One index record as Cyrus knows it, with the modsync stamp it was written at."""

    uid: int
    modseq: int
    last_updated: int
    flags: tuple              # system flags canonical, then user flags; never \\Expunged
    internaldate: int
    size: int
    guid: bytes               # SHA-1, 20 bytes
    annotations: tuple = ()   # ((entry, userid, modseq, value bytes), ...) without virtual ones
    savedate: int = 0
    createdmodseq: int = 0
    cid: int = 0
    expunged: bool = False
    msm: int = 0              # modsync record stamp modseq at csync's last write (0: none)

    def fields(self) -> list:
        """The stored fields, in the order of the stored form (see F_*)."""
        return [self.modseq, self.last_updated, list(self.flags), self.internaldate,
                self.size, self.guid, [list(a) for a in self.annotations], self.savedate,
                self.createdmodseq, self.cid, self.expunged, self.msm]

    def pack(self, crcs: tuple[int, int] | None = None) -> bytes:
        """The stored form; ``crcs``, if given, must be ``self.crcs()`` (kept beside it)."""
        v = self.fields()
        if crcs is not None:
            v += crcs
        return _pack(v)

    @classmethod
    def unpack(cls, uid: int, b: bytes) -> "CyrusRecord":
        return cls.from_fields(uid, _unpack(b))

    @classmethod
    def from_fields(cls, uid: int, v: list) -> "CyrusRecord":
        return cls(uid, v[0], v[1], tuple(v[2]), v[3], v[4], v[5],
                   tuple(tuple(a) for a in v[6]), v[7], v[8], v[9], v[10], v[11])

    def crcs(self) -> tuple[int, int]:
        """(SYNC_CRC share, SYNC_CRC_ANNOT share) exactly as Cyrus 3.6 computes them."""
        if self.expunged:
            return 0, 0
        basic = cyrus_crc.record_basic(self.uid, self.modseq, self.last_updated, self.flags,
                                       self.internaldate, self.guid)
        annot = cyrus_crc.record_annot(self.uid, self.savedate, self.createdmodseq,
                                       [(e, u, v) for e, u, _m, v in self.annotations])
        if self.cid:
            # 3.6 (mailbox minor version 17) CRCs thrid as unpadded hex.
            annot ^= cyrus_crc.annotation_crc(self.uid, THRID, "", b"%x" % self.cid)
        return basic, annot


# -- table access -------------------------------------------------------------------------------

def _rkey(uniqueid: str, uid: int) -> bytes:
    return K_RECORD + uniqueid.encode() + b"\0" + U32.pack(uid)


def get_mailbox(txn, uniqueid: str) -> CyrusMailbox | None:
    raw = txn.get(TABLE, K_MAILBOX + uniqueid.encode())
    return None if raw is None else CyrusMailbox.unpack(uniqueid, raw)


def uniqueid_by_name(txn, mboxname: str) -> str | None:
    raw = txn.get(TABLE, K_NAME + mboxname.encode())
    return None if raw is None else raw.decode()


def mailbox_by_name(txn, mboxname: str) -> CyrusMailbox | None:
    uid = uniqueid_by_name(txn, mboxname)
    return None if uid is None else get_mailbox(txn, uid)


def put_mailbox(txn, hdr: CyrusMailbox) -> None:
    old = get_mailbox(txn, hdr.uniqueid)
    if old is not None:
        if old.mboxname != hdr.mboxname:
            if uniqueid_by_name(txn, old.mboxname) == hdr.uniqueid:
                txn.delete(TABLE, K_NAME + old.mboxname.encode())
        if old.user != hdr.user:
            txn.delete(TABLE, K_USER + old.user.encode() + b"\0" + hdr.uniqueid.encode())
    txn.put(TABLE, K_MAILBOX + hdr.uniqueid.encode(), hdr.pack())
    txn.put(TABLE, K_NAME + hdr.mboxname.encode(), hdr.uniqueid.encode())
    txn.put(TABLE, K_USER + hdr.user.encode() + b"\0" + hdr.uniqueid.encode(), b"")


def put_alias(txn, mailbox_id: str, uniqueid: str) -> None:
    """Remember that the modsync mailbox ``mailbox_id`` is Cyrus's ``uniqueid``."""
    txn.put(TABLE, K_ALIAS + mailbox_id.encode(), uniqueid.encode())


def cyrus_uniqueid(txn, mailbox_id: str) -> str:
    """The Cyrus uniqueid of a modsync mailbox (its own id unless it was given another)."""
    raw = txn.get(TABLE, K_ALIAS + mailbox_id.encode())
    return mailbox_id if raw is None else raw.decode()


def header_of(txn, mb) -> CyrusMailbox | None:
    """The Cyrus view csync keeps of modsync mailbox ``mb``, if any."""
    hdr = get_mailbox(txn, cyrus_uniqueid(txn, mb.id))
    return hdr if hdr is not None and hdr.num == mb.num else None


def delete_mailbox(txn, uniqueid: str) -> None:
    old = get_mailbox(txn, uniqueid)
    if old is None:
        return
    if uniqueid_by_name(txn, old.mboxname) == uniqueid:
        txn.delete(TABLE, K_NAME + old.mboxname.encode())
    txn.delete(TABLE, K_USER + old.user.encode() + b"\0" + uniqueid.encode())
    txn.delete(TABLE, K_MAILBOX + uniqueid.encode())
    for k in list(txn.prefix(TABLE, K_RECORD + uniqueid.encode() + b"\0", values=False)):
        txn.delete(TABLE, k)


def user_mailboxes(txn, user: str) -> list[CyrusMailbox]:
    out = []
    prefix = K_USER + user.encode() + b"\0"
    for k in txn.prefix(TABLE, prefix, values=False):
        hdr = get_mailbox(txn, k[len(prefix):].decode())
        if hdr is not None:
            out.append(hdr)
    return out


def records(txn, uniqueid: str) -> list[CyrusRecord]:
    prefix = K_RECORD + uniqueid.encode() + b"\0"
    n = len(prefix)
    return [CyrusRecord.unpack(U32.unpack(k[n:])[0], v) for k, v in txn.prefix(TABLE, prefix)]


def get_record(txn, uniqueid: str, uid: int) -> CyrusRecord | None:
    raw = txn.get(TABLE, _rkey(uniqueid, uid))
    return None if raw is None else CyrusRecord.unpack(uid, raw)


# Positions in the stored form of a record (CyrusRecord.fields(), then the CRC shares).
F_MODSEQ, F_GUID, F_EXPUNGED, F_MSM, F_CRCS = 0, 5, 10, 11, 12


class MailboxRecords:
    """One mailbox's stored records inside a transaction, as field lists (APPLY MAILBOX's loop).

    ``fields(uid)`` is the stored form (indexes F_*) or None; ``crcs(uid, fields)``
    the record's CRC shares; ``put(rec, crcs)`` stores a record with its shares.
    """

    __slots__ = ("_get", "_put", "_prefix")

    def __init__(self, txn, uniqueid: str):
        self._get = txn.get
        self._put = txn.put
        self._prefix = K_RECORD + uniqueid.encode() + b"\0"

    def fields(self, uid: int) -> list | None:
        raw = self._get(TABLE, self._prefix + U32.pack(uid))
        return None if raw is None else _unpack(raw)

    @staticmethod
    def crcs(uid: int, fields: list) -> tuple[int, int]:
        if len(fields) > F_CRCS + 1:
            return fields[F_CRCS], fields[F_CRCS + 1]
        return CyrusRecord.from_fields(uid, fields).crcs()    # stored without them

    def put(self, rec: CyrusRecord, crcs: tuple[int, int]) -> None:
        self._put(TABLE, self._prefix + U32.pack(rec.uid), rec.pack(crcs))


def put_record(txn, uniqueid: str, rec: CyrusRecord, crcs: tuple[int, int] | None = None) -> None:
    """Store a record; pass ``crcs`` = ``rec.crcs()`` when at hand, to keep them beside it."""
    txn.put(TABLE, _rkey(uniqueid, rec.uid), rec.pack(crcs))


def delete_record(txn, uniqueid: str, uid: int) -> None:
    txn.delete(TABLE, _rkey(uniqueid, uid))


def move_records(txn, old_uniqueid: str, new_uniqueid: str) -> None:
    for rec in records(txn, old_uniqueid):
        delete_record(txn, old_uniqueid, rec.uid)
        put_record(txn, new_uniqueid, rec)


def get_quota(txn, root: str) -> tuple[int, dict] | None:
    raw = txn.get(TABLE, K_QUOTA + root.encode())
    if raw is None:
        return None
    v = _unpack(raw)
    return v[0], v[1]


def put_quota(txn, root: str, modseq: int, limits: dict) -> None:
    txn.put(TABLE, K_QUOTA + root.encode(), _pack([modseq, limits]))


def delete_quota(txn, root: str) -> None:
    txn.delete(TABLE, K_QUOTA + root.encode())


def recompute_crcs(recs) -> tuple[int, int]:
    basic, annot = cyrus_crc.CRC_INIT_BASIC, cyrus_crc.CRC_INIT_ANNOT
    for r in recs:
        b, a = r.crcs()
        basic ^= b
        annot ^= a
    return basic, annot
