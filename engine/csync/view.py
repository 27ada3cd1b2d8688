"""The Cyrus view of modsync mailboxes, and its DLIST form.

Two ways to see a modsync mailbox as a Cyrus mailbox:

* :func:`synthesize` derives it from modsync alone: the mailbox's unique id,
  UIDs and modseqs (modsync's per-user modseqs are per-mailbox monotonic,
  which is all Cyrus needs), and the SYNC_CRCs the store keeps for exactly
  these values.  This is what ``push`` sends as a master, and what the
  replica reports for mailboxes no Cyrus master ever sent.
* for mailboxes a Cyrus master sent, csync's table holds what that master
  said (``state``), and :func:`reconcile` folds in anything changed in
  modsync since: each record changed behind the master's back gets the next
  Cyrus modseq of its mailbox, as a Cyrus replica changed over IMAP would,
  so the master's checksum-failure path (GET FULLMAILBOX, copy-back) sees it.

The functions take an LMDB transaction of the store and read modsync's
tables the way ``engine.apply`` does; they never write modsync objects.
"""
from __future__ import annotations

import binascii
import functools

from .. import crc as cyrus_crc
from ..db import prefix_end
from ..model import (ACL, ANNOTATION, MAILBOX, RECORD, U32, U64, AclEntry, Annotation,
                     Mailbox, Record)
from ..mutation import UserRecord
from ..store import IX_NAME, IX_UNIQUEID
from dlist import KvList, List
from dlist.model import KVLIST, LIST, node_atom, node_guid, node_map, node_num, wrap, string_node

from . import mapping, state
from .state import CREATEDMODSEQ, SAVEDATE, THRID, CyrusMailbox, CyrusRecord

# -- reading modsync inside a transaction ---------------------------------------------------------


def user_record(txn, user: str) -> UserRecord | None:
    raw = txn.get("users", user.encode())
    return None if raw is None else UserRecord.unpack(user, raw)


def mailbox_by_num(txn, u: UserRecord, num: int) -> Mailbox | None:
    raw = txn.get("objects", u.prefix + MAILBOX + U64.pack(num))
    return None if raw is None else Mailbox.unpack(U64.pack(num), raw)


def mailbox_by_name(txn, u: UserRecord, name: str) -> Mailbox | None:
    raw = txn.get("index", IX_NAME + u.prefix + name.encode())
    return None if raw is None else mailbox_by_num(txn, u, U64.unpack(raw)[0])


def mailbox_by_uniqueid(txn, uniqueid: str) -> tuple[int, Mailbox] | None:
    """(user number, mailbox) for a unique id, tombstones included."""
    raw = txn.get("index", IX_UNIQUEID + uniqueid.encode())
    if raw is None:
        return None
    unum, mnum = U32.unpack_from(raw)[0], U64.unpack_from(raw, 4)[0]
    mv = txn.get("objects", U32.pack(unum) + MAILBOX + U64.pack(mnum))
    return None if mv is None else (unum, Mailbox.unpack(U64.pack(mnum), mv))


def live_mailboxes(txn, u: UserRecord) -> list[Mailbox]:
    out = []
    for k, v in txn.prefix("objects", u.prefix + MAILBOX):
        mb = Mailbox.unpack(k[5:], v)
        if not mb.stamp.removed:
            out.append(mb)
    return sorted(out, key=lambda m: m.name)


def modsync_records(txn, u: UserRecord, mb: Mailbox, lo: int = 1):
    base = u.prefix + RECORD + U64.pack(mb.num)
    for k, v in txn.range("objects", base + U32.pack(lo), prefix_end(base)):
        yield Record.unpack(k[5:], v)


def modsync_record(txn, u: UserRecord, mb: Mailbox, uid: int) -> Record | None:
    raw = txn.get("objects", u.prefix + RECORD + U64.pack(mb.num) + U32.pack(uid))
    return None if raw is None else Record.unpack(U64.pack(mb.num) + U32.pack(uid), raw)


def acl_entries(txn, u: UserRecord, mb: Mailbox) -> dict[str, str]:
    out = {}
    for k, v in txn.prefix("objects", u.prefix + ACL + U64.pack(mb.num)):
        a = AclEntry.unpack(k[5:], v)
        if not a.stamp.removed:
            out[a.identifier] = a.rights
    return out


def mailbox_annotations(txn, u: UserRecord, mb: Mailbox) -> list[Annotation]:
    out = []
    for k, v in txn.prefix("objects", u.prefix + ANNOTATION + U64.pack(mb.num)):
        a = Annotation.unpack(k[5:], v)
        if not a.stamp.removed:
            out.append(a)
    return sorted(out, key=lambda a: (a.entry, a.userid))


# -- modsync -> Cyrus ------------------------------------------------------------------------------

def default_acl(user: str) -> str:
    if user.startswith(mapping.SHARED_USER):
        return ""
    return mapping.format_acl([(user, mapping.OWNER_RIGHTS)])


def acl_string(user: str, acl: dict[str, str], previous: str = "") -> str:
    if not acl:
        return default_acl(user)
    return mapping.merge_acl_order(previous, acl)


def master_acl(user: str, acl: dict[str, str]) -> str:
    """The ACL a modsync mailbox gets on a Cyrus replica.

    modsync lets a mailbox's owner in whatever its ACL says; Cyrus does not
    (its owner needs an entry of their own, which Cyrus itself always writes
    first), so an owner without an entry gets Cyrus's default rights.
    """
    if user.startswith(mapping.SHARED_USER):
        return mapping.format_acl(sorted(acl.items()))
    entries = [(user, acl.get(user, mapping.OWNER_RIGHTS))]
    entries += sorted((who, rights) for who, rights in acl.items() if who != user)
    return mapping.format_acl(entries)


def record_from_modsync(r: Record, modseq: int, base: CyrusRecord | None = None,
                        createdmodseq: int | None = None) -> CyrusRecord:
    """The Cyrus record for a modsync record, at Cyrus modseq ``modseq``.

    ``base`` is what Cyrus knew of the record before: its createdmodseq,
    thread id and the modseqs of unchanged annotations are kept.
    """
    old_ann = {}
    if base is not None:
        old_ann = {(e, u, v): m for e, u, m, v in base.annotations}
    anns = tuple((e, u, old_ann.get((e, u, bytes(v)), modseq), bytes(v))
                 for e, u, v in r.annotations)
    if createdmodseq is None:
        createdmodseq = base.createdmodseq if base is not None else modseq
    return CyrusRecord(r.uid, modseq, r.last_updated, tuple(r.flags), r.internaldate, r.size,
                       bytes(r.sha1), anns, r.savedate, createdmodseq,
                       base.cid if base is not None else 0, r.stamp.removed, r.stamp.modseq)


def synthesize(txn, u: UserRecord, mb: Mailbox, *, partition: str = "default",
               with_records: bool = True) -> tuple[CyrusMailbox, list[CyrusRecord]]:
    """The Cyrus view of a modsync mailbox from modsync's own state (see module docstring)."""
    user = u.name
    anns = [(a.entry, a.userid, a.stamp.modseq, bytes(a.value))
            for a in mailbox_annotations(txn, u, mb)]
    hdr = CyrusMailbox(
        uniqueid=mb.id, mboxname=mapping.internal_name(user, mb.name), user=user,
        partition=partition, acl=master_acl(user, acl_entries(txn, u, mb)),
        options=mapping.DEFAULT_OPTIONS, last_uid=mb.uidnext - 1,
        highestmodseq=mb.highestmodseq, uidvalidity=mb.uidvalidity,
        createdmodseq=mb.createdmodseq, foldermodseq=mb.foldermodseq, annotations=anns,
        crc_basic=mb.cyrus_crc, crc_annot=mb.cyrus_crc_annot, num=mb.num,
        synced=mb.highestmodseq)
    recs = []
    if with_records:
        for r in modsync_records(txn, u, mb):
            recs.append(record_from_modsync(r, r.stamp.modseq, createdmodseq=r.createdmodseq))
    return hdr, recs


def reconcile(txn, u: UserRecord, mb: Mailbox, hdr: CyrusMailbox, *,
              write: bool) -> tuple[CyrusMailbox, bool]:
    """Fold modsync changes made since csync last wrote ``mb`` into its Cyrus view.

    Returns (header, changed).  With ``write`` the updated records and
    header go to csync's table in ``txn``.
    """
    if hdr.is_shadow or mb is None or mb.highestmodseq == hdr.synced:
        return hdr, False
    side = {r.uid: r for r in state.records(txn, hdr.uniqueid)}
    modseq = hdr.highestmodseq
    basic, annot = hdr.crc_basic, hdr.crc_annot
    changed: list[CyrusRecord] = []
    for r in modsync_records(txn, u, mb):
        s = side.pop(r.uid, None)
        if s is not None and s.msm == r.stamp.modseq:
            continue
        if s is None and r.stamp.removed:
            continue   # expunged in modsync before Cyrus ever saw it
        modseq += 1
        new = record_from_modsync(r, modseq, s)
        if s is not None:
            b, a = s.crcs()
            basic ^= b
            annot ^= a
        b, a = new.crcs()
        basic ^= b
        annot ^= a
        changed.append(new)
    for s in side.values():
        if s.msm and not s.expunged:
            # modsync no longer holds the record at all: expunged and expired there.
            b, a = s.crcs()
            basic ^= b
            annot ^= a
            modseq += 1
            s.expunged = True
            s.modseq = modseq
            changed.append(s)
    # Folder-level state: name, ACL, annotations, uidvalidity, uidnext.
    folder = False
    name = mapping.internal_name(u.name, mb.name)
    if name != hdr.mboxname:
        hdr.mboxname = name
        folder = True
    acl = acl_entries(txn, u, mb)
    if dict(mapping.parse_acl(hdr.acl)) != acl:
        hdr.acl = acl_string(u.name, acl, hdr.acl)
        folder = True
    local_anns = {(a.entry, a.userid): bytes(a.value) for a in mailbox_annotations(txn, u, mb)}
    if {(e, uid): v for e, uid, _m, v in hdr.annotations} != local_anns:
        prev = {(e, uid, v): m for e, uid, m, v in hdr.annotations}
        hdr.annotations = [(e, uid, prev.get((e, uid, v), modseq + 1), v)
                           for (e, uid), v in sorted(local_anns.items())]
        folder = True
    if mb.uidvalidity > hdr.uidvalidity:
        hdr.uidvalidity = mb.uidvalidity
        folder = True
    if folder:
        modseq += 1
        hdr.foldermodseq = modseq
    if mb.uidnext - 1 > hdr.last_uid:
        hdr.last_uid = mb.uidnext - 1
    hdr.highestmodseq = modseq
    hdr.crc_basic, hdr.crc_annot = basic, annot
    hdr.synced = mb.highestmodseq
    if write:
        for rec in changed:
            state.put_record(txn, hdr.uniqueid, rec)
        state.put_mailbox(txn, hdr)
    return hdr, True


# -- DLIST: headers and records ---------------------------------------------------------------------

def _num(n: int) -> bytes:
    return b"%d" % n


def _atom(s: str) -> bytes | tuple:
    return string_node(s.encode("utf-8", "surrogateescape"))


def _flag_nodes(flags, expunged: bool) -> tuple:
    out = [LIST]
    for f in mapping.wire_flags(flags, expunged):
        out.append(f.encode("utf-8", "surrogateescape") if f.startswith("\\") else _atom(f))
    return tuple(out)


def annotation_nodes(anns, virtual: tuple = ()) -> tuple:
    items = [LIST]
    for entry, userid, modseq, value in anns:
        items.append((KVLIST, b"ENTRY", _atom(entry), b"USERID", _atom(userid),
                      b"MODSEQ", _num(modseq), b"VALUE", string_node(bytes(value))))
    for entry, value in virtual:
        items.append((KVLIST, b"ENTRY", entry.encode(), b"USERID", b'""', b"MODSEQ", b"0",
                      b"VALUE", value))
    return tuple(items)


def record_node(rec: CyrusRecord) -> tuple:
    """A RECORD item exactly as sync_prepare_dlists prints it for a 3.6 mailbox."""
    virtual = []
    if rec.cid:
        virtual.append((THRID, b"%016x" % rec.cid))
    if rec.savedate:
        virtual.append((SAVEDATE, _num(rec.savedate)))
    if rec.createdmodseq:
        virtual.append((CREATEDMODSEQ, _num(rec.createdmodseq)))
    node = [KVLIST, b"UID", _num(rec.uid), b"MODSEQ", _num(rec.modseq),
            b"LAST_UPDATED", _num(rec.last_updated),
            b"FLAGS", _flag_nodes(rec.flags, rec.expunged),
            b"INTERNALDATE", _num(rec.internaldate), b"SIZE", _num(rec.size),
            b"GUID", rec.guid.hex().encode()]
    if rec.annotations or virtual:
        node += [b"ANNOTATIONS", annotation_nodes(sorted(rec.annotations), tuple(virtual))]
    return tuple(node)


def mailbox_kvlist(hdr: CyrusMailbox, *, quotaroot: str | None = None, records=None,
                   since: CyrusMailbox | None = None, partition: str | None = None) -> KvList:
    """The MAILBOX kvlist of sync_prepare_dlists (GET replies and APPLY MAILBOX)."""
    n = [KVLIST, b"UNIQUEID", _atom(hdr.uniqueid), b"MBOXNAME", _atom(hdr.mboxname)]
    if hdr.mbtype:
        n += [b"MBOXTYPE", _atom(hdr.mbtype)]
    if "i" in hdr.mbtype:
        # An intermediate: the stub sync_mailbox_byentry prints.
        n += [b"SYNC_CRC", b"0", b"LAST_UID", b"0", b"HIGHESTMODSEQ", b"0", b"RECENTUID", b"0",
              b"RECENTTIME", b"0", b"LAST_APPENDDATE", b"0", b"POP3_LAST_LOGIN", b"0",
              b"POP3_SHOW_AFTER", b"0", b"UIDVALIDITY", _num(hdr.uidvalidity),
              b"PARTITION", _atom(hdr.partition), b"ACL", _atom(hdr.acl),
              b"OPTIONS", b'""', b"CREATEDMODSEQ", _num(hdr.createdmodseq),
              b"FOLDERMODSEQ", _num(hdr.foldermodseq)]
        return wrap(tuple(n))
    n += [b"SYNC_CRC", _num(hdr.crc_basic), b"SYNC_CRC_ANNOT", _num(hdr.crc_annot),
          b"LAST_UID", _num(hdr.last_uid), b"HIGHESTMODSEQ", _num(hdr.highestmodseq),
          b"RECENTUID", _num(hdr.recentuid), b"RECENTTIME", _num(hdr.recenttime),
          b"LAST_APPENDDATE", _num(hdr.last_appenddate),
          b"POP3_LAST_LOGIN", _num(hdr.pop3_last_login),
          b"POP3_SHOW_AFTER", _num(hdr.pop3_show_after)]
    if hdr.xconvmodseq:
        n += [b"XCONVMODSEQ", _num(hdr.xconvmodseq)]
    if hdr.raclmodseq:
        n += [b"RACLMODSEQ", _num(hdr.raclmodseq)]
    n += [b"UIDVALIDITY", _num(hdr.uidvalidity),
          b"PARTITION", _atom(partition or hdr.partition), b"ACL", _atom(hdr.acl),
          b"OPTIONS", _atom(hdr.options)]
    if quotaroot:
        n += [b"QUOTAROOT", _atom(quotaroot)]
    if hdr.createdmodseq:
        n += [b"CREATEDMODSEQ", _num(hdr.createdmodseq)]
    if hdr.foldermodseq:
        n += [b"FOLDERMODSEQ", _num(hdr.foldermodseq)]
    if hdr.annotations:
        n += [b"ANNOTATIONS", annotation_nodes(hdr.annotations)]
    if since is not None and since.highestmodseq:
        n += [b"SINCE_MODSEQ", _num(since.highestmodseq), b"SINCE_CRC", _num(since.crc_basic),
              b"SINCE_CRC_ANNOT", _num(since.crc_annot)]
    if records is not None:
        n += [b"RECORD", (LIST, *(record_node(r) for r in records))]
    return wrap(tuple(n))


# -- DLIST -> Cyrus records ---------------------------------------------------------------------------

class BadRecord(Exception):
    """A RECORD item that parse_upload would refuse."""


_REQUIRED_RECORD = (b"UID", b"MODSEQ", b"LAST_UPDATED", b"FLAGS", b"INTERNALDATE", b"SIZE",
                    b"GUID")


def parse_record(node) -> CyrusRecord:
    """A RECORD kvlist node -> CyrusRecord (Cyrus's parse_upload rules)."""
    if (type(node) is tuple and (len(node) == 15 or len(node) == 17 and node[15] == b"ANNOTATIONS")
            and node[0] == KVLIST and node[1:15:2] == _REQUIRED_RECORD):
        rec = _canonical_record(node)
        if rec is not None:
            return rec
    if type(node) is not tuple or not node or node[0] != KVLIST:
        raise BadRecord("RECORD item is not a kvlist")
    fields: dict = {}
    for i in range(1, len(node) - 1, 2):
        k = node[i]
        if type(k) is not bytes or k[:1] == b'"':
            k = node_map(k)
        fields.setdefault(k, node[i + 1])
    try:
        for k in _REQUIRED_RECORD:
            if k not in fields:
                raise BadRecord(f"RECORD without {k.decode()}")
        uid = node_num(fields[b"UID"]) & 0xFFFFFFFF
        modseq = node_num(fields[b"MODSEQ"])
        last_updated = node_num(fields[b"LAST_UPDATED"])
        fl = fields[b"FLAGS"]
        if type(fl) is not tuple or fl[0] != LIST:
            raise BadRecord("FLAGS is not a list")
        flags, expunged = mapping.split_flags(node_atom(f) for f in fl[1:])
        internaldate = node_num(fields[b"INTERNALDATE"])
        size = node_num(fields[b"SIZE"]) & 0xFFFFFFFF
        guid = bytes.fromhex(node_guid(fields[b"GUID"]))
        anns = []
        savedate = createdmodseq = cid = 0
        an = fields.get(b"ANNOTATIONS")
        if an is not None:
            if type(an) is not tuple or an[0] != LIST:
                raise BadRecord("ANNOTATIONS is not a list")
            for e, u, m, v in parse_annotations(an):
                if e == THRID:
                    cid = int(v.decode() or "0", 16)
                elif e == SAVEDATE:
                    savedate = int(v.decode() or "0")
                elif e == CREATEDMODSEQ:
                    createdmodseq = int(v.decode() or "0")
                else:
                    anns.append((e, u, m, v))
    except BadRecord:
        raise
    except Exception as e:   # DlistProtocolError, ValueError from a bad number
        raise BadRecord(str(e)) from None
    return CyrusRecord(uid, modseq, last_updated, flags, internaldate, size, guid,
                       tuple(sorted(anns)), savedate, createdmodseq, cid, expunged)


# -- the fast path: a RECORD exactly as a Cyrus 3.6 sync_client prints it ------------------------
#
# An initial sync of a 20,000-message folder is one APPLY MAILBOX with 20,000
# RECORDs; decoding them field by field through the generic getters costs more
# than storing them.  Cyrus prints every record with the same keys in the same
# order, numbers as bare atoms and, without conversations, only the virtual
# savedate/createdmodseq annotations; such a record is read straight off its
# node.  Anything else (other order, quoted or literal values, other
# annotations) returns None and goes through parse_record's general rules,
# which give the same result for what both accept (tests/csync/test_view.py).

_ANNOTATION_KEYS = (b"ENTRY", b"USERID", b"MODSEQ", b"VALUE")
_VIRTUAL = {SAVEDATE.encode(): 0, CREATEDMODSEQ.encode(): 1, THRID.encode(): 2}
_NIL = b"NIL"
_MAX_FAST_DIGITS = 19       # below 2**64 whatever the digits; longer ones take the checked path


def _plain_number(v) -> bool:
    return type(v) is bytes and v.isdigit() and len(v) <= _MAX_FAST_DIGITS


@functools.lru_cache(maxsize=4096)      # a folder's records share a few FLAGS lists
def _canonical_flags(fl):
    if type(fl) is not tuple or fl[0] != LIST:
        return None
    for f in fl[1:]:
        if type(f) is not bytes or f[:1] == b'"' or f == _NIL or b"\0" in f:
            return None
    return mapping.split_flags(f.decode("utf-8", "surrogateescape") for f in fl[1:])


def _canonical_record(node) -> CyrusRecord | None:
    uid, modseq, last_updated, fl, internaldate, size, guid = node[2:15:2]
    try:
        # all five plain digit atoms (a list or literal would not concatenate to bytes)
        digits = uid + modseq + last_updated + internaldate + size
    except TypeError:
        return None
    if (type(digits) is not bytes or not digits.isdigit() or type(guid) is not bytes
            or len(guid) != 40 or len(uid) > _MAX_FAST_DIGITS
            or len(modseq) > _MAX_FAST_DIGITS or len(last_updated) > _MAX_FAST_DIGITS
            or len(internaldate) > _MAX_FAST_DIGITS or len(size) > _MAX_FAST_DIGITS
            or not (uid and modseq and last_updated and internaldate and size)):
        return None
    flags = _canonical_flags(fl)
    if flags is None:
        return None
    try:
        sha1 = binascii.unhexlify(guid)
    except binascii.Error:
        return None
    virtual = [0, 0, 0]     # savedate, createdmodseq, thread id
    if len(node) == 17:
        an = node[16]
        if type(an) is not tuple or an[0] != LIST:
            return None
        for item in an[1:]:
            if (type(item) is not tuple or len(item) != 9 or item[0] != KVLIST
                    or item[1:9:2] != _ANNOTATION_KEYS or item[4] != b'""'
                    or not _plain_number(item[6])):
                return None
            which = _VIRTUAL.get(item[2])
            value = item[8]
            if which is None or type(value) is not bytes or value[:1] == b'"' or value == _NIL:
                return None
            try:
                virtual[which] = int(value, 16 if which == 2 else 10)
            except ValueError:
                return None
    return CyrusRecord(int(uid) & 0xFFFFFFFF, int(modseq), int(last_updated), flags[0],
                       int(internaldate), int(size) & 0xFFFFFFFF, sha1, (), virtual[0],
                       virtual[1], virtual[2], flags[1])


def parse_annotations(node) -> list[tuple[str, str, int, bytes]]:
    """An ANNOTATIONS list -> [(entry, userid, modseq, value)] (decode_annotations' rules)."""
    out = []
    for item in node[1:]:
        if type(item) is not tuple or not item or item[0] != KVLIST or not len(item) & 1:
            raise BadRecord("annotation is not a kvlist")
        f = {}
        for i in range(1, len(item) - 1, 2):
            k = item[i]
            if type(k) is not bytes or k[:1] == b'"':
                k = node_map(k)
            f.setdefault(k, item[i + 1])
        try:
            entry = node_atom(f[b"ENTRY"])
            userid = node_atom(f[b"USERID"])
            modseq = node_num(f[b"MODSEQ"])
            value = node_map(f[b"VALUE"])
        except KeyError as e:
            raise BadRecord(f"annotation without {e.args[0].decode()}") from None
        if entry is None or userid is None or value is None:
            raise BadRecord("annotation with a NIL field")
        out.append((entry, userid, modseq, value))
    return out


def list_atoms(value) -> list[str]:
    if not isinstance(value, List):
        raise BadRecord("expected a list")
    return [a for a in value.atoms() if a is not None]


def _mbtype_key(mbtype: str) -> tuple[str, frozenset]:
    """Type and syncable flags of an MBOXTYPE string (mboxlist_string_to_mbtype; no 'l')."""
    kind = "e"
    if mbtype and mbtype[0] in "abcenps":
        kind, mbtype = mbtype[0], mbtype[1:]
    return kind, frozenset(mbtype) - {"l"}


def crceq(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """mailbox_crceq(): a component that is 0 on either side counts as equal."""
    return all(x == 0 or y == 0 or x == y for x, y in zip(a, b))


INIT_CRCS = (cyrus_crc.CRC_INIT_BASIC, cyrus_crc.CRC_INIT_ANNOT)
