"""Cyrus IMAP 3.6's SYNC_CRC and SYNC_CRC_ANNOT, computed from modsync records.

Both are XORs over the live records of a mailbox, so the store keeps them
incrementally (XOR a record's share out before a change and in after it).
The algorithm is Cyrus's, fixed since 2.4 (see reference: cyrus-replication
§3): CRC-32 (zlib's) of a formatted line per record, and of one line per
message annotation including the virtual ``savedate`` and ``createdmodseq``
annotations of mailbox minor version 17.
"""
from __future__ import annotations

import binascii
import functools
import zlib

CRC_INIT_BASIC = 0
CRC_INIT_ANNOT = 12345678
VIRTUAL_PREFIX = "/vendor/cmu/cyrus-imapd/"   # thrid, savedate, createdmodseq, ...
SAVEDATE = "/vendor/cmu/cyrus-imapd/savedate"
CREATEDMODSEQ = "/vendor/cmu/cyrus-imapd/createdmodseq"

_SYSTEM_FLAG_CRC = {
    name: zlib.crc32(name.encode())
    for name in ("\\deleted", "\\answered", "\\flagged", "\\draft", "\\seen")
}


def _crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def flags_crc(flags) -> int:
    """XOR of the CRCs of a record's flag names, lower-cased as Cyrus does."""
    if type(flags) is tuple:
        return _tuple_flags_crc(flags)   # a mailbox's records share a handful of flag sets
    return _flags_crc(flags)


def _flags_crc(flags) -> int:
    f = 0
    for name in flags:
        low = name.lower()
        c = _SYSTEM_FLAG_CRC.get(low)
        if c is None:
            if low.startswith("\\"):
                continue        # not a flag Cyrus stores
            c = zlib.crc32(low.encode())
        f ^= c
    return f


_tuple_flags_crc = functools.lru_cache(maxsize=4096)(_flags_crc)


def record_basic(uid: int, modseq: int, last_updated: int, flags, internaldate: int,
                 sha1: bytes) -> int:
    return zlib.crc32(b"%d %d %d (%d) %d %s" % (uid, modseq, last_updated, flags_crc(flags),
                                                internaldate, binascii.hexlify(sha1)))


def annotation_crc(uid: int, entry: str, userid: str, value: bytes) -> int:
    return _crc(("%u %s %s " % (uid, entry, userid)).encode() + value)


# The lines of the two virtual annotations every record has (see annotation_crc:
# "uid entry userid value" with an empty userid), formatted in one step.
_SAVEDATE_LINE = b"%d " + SAVEDATE.encode() + b"  %d"
_CREATEDMODSEQ_LINE = b"%d " + CREATEDMODSEQ.encode() + b"  %d"


def record_annot(uid: int, savedate: int, createdmodseq: int, annotations) -> int:
    """A record's share of SYNC_CRC_ANNOT: virtual annotations plus its own."""
    c = 0
    if savedate:
        c ^= zlib.crc32(_SAVEDATE_LINE % (uid, savedate))
    if createdmodseq:
        c ^= zlib.crc32(_CREATEDMODSEQ_LINE % (uid, createdmodseq))
    for entry, userid, value in annotations:
        c ^= annotation_crc(uid, entry, userid, value)
    return c


def record_crcs(rec) -> tuple[int, int]:
    """(basic, annot) shares of an ``engine.model.Record``; (0, 0) when expunged."""
    if rec.stamp.removed:
        return 0, 0
    return (record_basic(rec.uid, rec.stamp.modseq, rec.last_updated, rec.flags,
                         rec.internaldate, rec.sha1),
            record_annot(rec.uid, rec.savedate, rec.createdmodseq, rec.annotations))
