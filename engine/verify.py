"""Verify a store: recompute everything that is kept incrementally and compare.

Read-only and safe to run from cron while the store is in use: it reads one
consistent LMDB snapshot.  It checks

* every blob: its bytes decompress and hash to its address, its SHA-1 index;
* every record and sieve script points at a blob that exists;
* per mailbox: message count, size, modsync CRC and both Cyrus CRCs against
  a from-scratch recomputation; uidnext above every UID; highestmodseq at
  least every modseq inside it;
* per user: the digest, the version vector, the modseq counter;
* the change index holds exactly one entry per object, at its modseq;
* the name and unique-id indexes agree with the mailboxes.

It reports what is wrong and never repairs by deleting.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import crc as cyrus_crc
from .blobs import Location, sha1_of
from .errors import StoreCorrupt
from .model import (
    KIND_CLASSES, KIND_NAMES, MAILBOX, RECORD, SIEVE, U32, U64, Mailbox, record_crc64, unpackb,
)
from .mutation import DIGEST_ZERO, UserRecord, xor16
from .progress import Progress
from .store import IX_NAME, IX_UNIQUEID, Store


@dataclass
class Problem:
    what: str          # short category: "blob", "crc", "digest", "index", ...
    subject: str       # the object: user/mailbox/uid, blob address, ...
    message: str

    def as_dict(self) -> dict:
        return {"what": self.what, "subject": self.subject, "message": self.message}


@dataclass
class VerifyReport:
    problems: list = field(default_factory=list)
    users: int = 0
    mailboxes: int = 0
    records: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, what: str, subject: str, message: str) -> None:
        self.problems.append(Problem(what, subject, message))

    def as_dict(self) -> dict:
        return {"ok": self.ok, "users": self.users, "mailboxes": self.mailboxes,
                "records": self.records, "blobs": self.blobs, "blob_bytes": self.blob_bytes,
                "seconds": round(self.seconds, 3),
                "problems": [p.as_dict() for p in self.problems]}


def verify_store(store: Store, *, progress: Progress | None = None,
                 check_blobs: bool = True) -> VerifyReport:
    """Check the whole store; see the module docstring for what is checked."""
    progress = progress or Progress()
    report = VerifyReport()
    t0 = time.monotonic()
    with store.db.read() as txn:
        referenced: set[bytes] = set()
        for name_b, raw in txn.range("users"):
            user = UserRecord.unpack(name_b.decode(), raw)
            report.users += 1
            _verify_user(store, txn, user, report, referenced)
        _verify_indexes(txn, report)
        if check_blobs:
            _verify_blobs(store, txn, report, referenced, progress)
    report.seconds = time.monotonic() - t0
    return report


def _verify_user(store: Store, txn, user: UserRecord, report: VerifyReport,
                 referenced: set) -> None:
    prefix = user.prefix
    digest = DIGEST_ZERO
    versions: dict[int, int] = {}
    mailboxes: dict[int, Mailbox] = {}
    seen_modseqs: dict[tuple[bytes, bytes], int] = {}
    seen_origins: dict[tuple[bytes, bytes], tuple[int, int]] = {}
    # Mailbox totals recomputed from the records.
    totals: dict[int, list] = {}

    for k, v in txn.prefix("objects", prefix + MAILBOX):
        mb = Mailbox.unpack(k[5:], v)
        mailboxes[mb.num] = mb
        totals[mb.num] = [0, 0, 0, cyrus_crc.CRC_INIT_BASIC, cyrus_crc.CRC_INIT_ANNOT, 0, 0]
        if not mb.stamp.removed:
            digest = xor16(digest, mb.visible_digest())
            report.mailboxes += 1

    for k, v in txn.prefix("objects", prefix):
        kind, key = k[4:5], k[5:]
        cls = KIND_CLASSES.get(kind)
        if cls is None:
            report.add("object", f"{user.name}", f"unknown object kind {kind!r}")
            continue
        obj = mailboxes[U64.unpack(key)[0]] if kind == MAILBOX else cls.unpack(key, v)
        st = obj.stamp
        seen_modseqs[(kind, key)] = st.modseq
        seen_origins[(kind, key)] = (st.origin, st.origin_modseq)
        if st.modseq > user.modseq:
            report.add("modseq", f"{user.name}", f"{KIND_NAMES[kind]} object has modseq "
                       f"{st.modseq} above the user's counter {user.modseq}")
        if versions.get(st.origin, 0) < st.origin_modseq:
            versions[st.origin] = st.origin_modseq
        if kind == MAILBOX:
            continue
        if kind == RECORD:
            report.records += not st.removed
            t = totals.setdefault(obj.mailbox, [0, 0, 0, 0, 0, 0, 0])
            t[5] = max(t[5], obj.uid)
            t[6] = max(t[6], st.modseq)
            if st.removed:
                continue
            referenced.add(obj.address)
            blob = txn.get("blobs", obj.address)
            if blob is not None:
                bv = unpackb(blob)
                if bv[5] != obj.sha1 or bv[3] != obj.size:
                    report.add("record", f"{user.name}/#{obj.mailbox}/{obj.uid}",
                               "record's SHA-1 or size disagrees with the body it points at")
            mb = mailboxes.get(obj.mailbox)
            if mb is None:
                report.add("record", f"{user.name}/#{obj.mailbox}/{obj.uid}",
                           "record belongs to no mailbox")
                continue
            d = obj.visible_digest(mb.id)
            digest = xor16(digest, d)
            b, a = cyrus_crc.record_crcs(obj)
            t[0] += 1
            t[1] += obj.size
            t[2] ^= record_crc64(d)
            t[3] ^= b
            t[4] ^= a
            continue
        if kind == SIEVE and not st.removed:
            referenced.add(obj.address)
        if st.removed:
            continue
        if hasattr(obj, "mailbox"):   # ACL entries and annotations
            mb = mailboxes.get(obj.mailbox)
            if mb is None or mb.stamp.removed:
                report.add("object", f"{user.name}/#{obj.mailbox}",
                           f"{KIND_NAMES[kind]} belongs to no live mailbox")
                continue
            t = totals[obj.mailbox]
            t[6] = max(t[6], st.modseq)
            digest = xor16(digest, obj.visible_digest(mb.id))
        else:
            digest = xor16(digest, obj.visible_digest())

    for num, mb in mailboxes.items():
        t = totals[num]
        where = f"{user.name}/{mb.name}"
        if mb.stamp.removed:
            if t[0]:
                report.add("mailbox", where, "deleted mailbox still holds records")
            continue
        for label, stored, fresh in (("message count", mb.messages, t[0]),
                                     ("size", mb.size, t[1]),
                                     ("modsync CRC", mb.crc, t[2]),
                                     ("Cyrus SYNC_CRC", mb.cyrus_crc, t[3]),
                                     ("Cyrus SYNC_CRC_ANNOT", mb.cyrus_crc_annot, t[4])):
            if stored != fresh:
                report.add("crc", where, f"{label} is {stored} but recomputes to {fresh}")
        if mb.uidnext <= t[5]:
            report.add("mailbox", where, f"uidnext {mb.uidnext} is not above UID {t[5]}")
        if mb.highestmodseq < t[6]:
            report.add("mailbox", where, f"highestmodseq {mb.highestmodseq} is below a "
                       f"modseq inside it ({t[6]})")

    if digest != user.digest:
        report.add("digest", user.name, f"user digest {user.digest.hex()} recomputes to "
                   f"{digest.hex()}")
    for origin, m in versions.items():
        if user.versions.get(origin, 0) < m:
            report.add("versions", user.name, f"version vector has {user.versions.get(origin, 0)} "
                       f"for origin #{origin} but an object carries {m}")

    # The change index: one entry per object, at the object's modseq.
    indexed = 0
    for k in txn.prefix("changes", prefix, values=False):
        modseq = U64.unpack_from(k, 4)[0]
        kind, key = k[12:13], k[13:]
        want = seen_modseqs.get((kind, key))
        if want is None:
            report.add("changes", user.name, f"change entry at modseq {modseq} for a missing "
                       f"{KIND_NAMES.get(kind, kind)} object")
        elif want != modseq:
            report.add("changes", user.name, f"change entry at modseq {modseq} but the "
                       f"{KIND_NAMES[kind]} object is at {want}")
        else:
            indexed += 1
    if indexed != len(seen_modseqs):
        report.add("changes", user.name, f"{len(seen_modseqs) - indexed} object(s) missing "
                   f"from the change index")

    indexed = 0
    for k in txn.prefix("byorigin", prefix, values=False):
        origin, om = U32.unpack_from(k, 4)[0], U64.unpack_from(k, 8)[0]
        want = seen_origins.get((k[16:17], k[17:]))
        if want == (origin, om):
            indexed += 1
        else:
            report.add("changes", user.name, f"per-origin index entry ({origin}, {om}) does not "
                       f"match its object ({want})")
    if indexed != len(seen_origins):
        report.add("changes", user.name, f"{len(seen_origins) - indexed} object(s) missing "
                   f"from the per-origin index")

    for num, mb in mailboxes.items():
        raw = txn.get("index", IX_NAME + prefix + mb.name.encode())
        live = raw is not None and U64.unpack(raw)[0] == num
        if live == mb.stamp.removed:
            report.add("index", f"{user.name}/{mb.name}", "name index disagrees with the mailbox "
                       f"({'tombstone indexed' if live else 'live mailbox not indexed'})")
        uraw = txn.get("index", IX_UNIQUEID + mb.id.encode())
        if uraw is None or uraw != prefix + U64.pack(num):
            report.add("index", f"{user.name}/{mb.name}", f"unique id {mb.id} not indexed")


def _verify_indexes(txn, report: VerifyReport) -> None:
    for k, v in txn.prefix("index", IX_NAME):
        user_prefix = k[1:5]
        raw = txn.get("objects", user_prefix + MAILBOX + v)
        if raw is None or unpackb(raw)[3]:
            report.add("index", k[5:].decode(errors="replace"),
                       "name index points at no live mailbox")


def _verify_blobs(store: Store, txn, report: VerifyReport, referenced: set,
                  progress: Progress) -> None:
    entries = [(k, unpackb(v)) for k, v in txn.range("blobs")]
    entries.sort(key=lambda e: (e[1][0], e[1][1]))  # pack, offset: read packs in order
    present = set()
    progress.start("verify blobs", len(entries), sum(e[1][3] for e in entries))
    for address, v in entries:
        present.add(address)
        loc = Location.from_list(v)
        report.blobs += 1
        report.blob_bytes += loc.size
        try:
            data = store.blobs.read(address, loc)
        except StoreCorrupt as e:
            report.add("blob", address.hex(), str(e))
            progress.advance(1, loc.size)
            continue
        if sha1_of(data) != v[5]:
            report.add("blob", address.hex(), "SHA-1 recorded for the blob does not match it")
        elif txn.get("sha1", v[5]) != address:
            report.add("blob", address.hex(), "SHA-1 index does not point at the blob")
        progress.advance(1, loc.size)
    progress.finish()
    for address in referenced - present:
        report.add("blob", address.hex(), "referenced by a message or script but not stored")
