"""modsync as a Cyrus 3.6 master: replicate a modsync user into a real sync_server.

:func:`push_user` follows sync_client's user sync (sync_do_user in
imap/sync_support.c; reference cyrus-replication §4):

1. ``GET USER`` for the replica's folders, quota roots, seen sets,
   subscriptions (and sieve scripts when SIEVE-MAILBOX is off);
2. folders matched by unique id: a different name is an ``APPLY RENAME``
   (then the user is fetched again), a replica folder whose unique id is a
   modsync tombstone is deleted (``APPLY UNMAILBOX``), other replica-only
   folders are left alone, as Cyrus leaves them;
3. ``APPLY RESERVE`` of the new messages' GUIDs against all replica folders,
   ``APPLY MESSAGE`` (at most 1024 files a command) of what is MISSING, each
   body uploaded once per session however many folders hold it;
4. per folder, unless it compares unchanged (is_unchanged: header fields,
   ACL, annotations, CRCs), ``APPLY MAILBOX`` with every record whose modseq
   is above the replica's HIGHESTMODSEQ, and SINCE_MODSEQ/SINCE_CRC from it;
5. the retry ladder: ``IMAP_SYNC_CHECKSUM`` -> fetch the folder again and
   resend without SINCE; still failing -> full update (``GET FULLMAILBOX``,
   merge record by record into modsync -- the replica's newer flags win,
   messages only the replica has are fetched with ``GET FETCH`` and copied
   back, clashing UIDs are renumbered on both sides -- ``APPLY EXPUNGE``
   of the replica's renumbered UIDs, resend);
6. quota (``APPLY QUOTA``/``UNQUOTA``), subscriptions (``SUB``/``UNSUB``),
   sieve (the ``#sieve`` folder when SIEVE-MAILBOX is on, else
   ``SIEVE``/``UNSIEVE``/``ACTIVATE_SIEVE``) and seen sets (``APPLY SEEN``).

The Cyrus view of each modsync mailbox is ``view.synthesize``: modsync's
unique ids, UIDs and modseqs, whose SYNC_CRCs the store keeps up to date,
so a second push sends only what changed since the first.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

from dlist import File, KvList, Line, List
from dlist.model import wrap

from ..model import QUOTA, SEEN, SIEVE, SUBSCRIPTION, QuotaRoot, Record, SeenSet, SieveScript, \
    Stamp, Subscription, normalize_flags
from ..mutation import Mutation
from ..progress import Progress
from ..store import Store
from . import mapping, state, view
from .client import CsyncClient, CsyncError, Response
from .state import CyrusMailbox, CyrusRecord

log = logging.getLogger("modsync.csync")

#: Files per APPLY MESSAGE and GUIDs per RESERVE, as sync_client sends them (§2.6).
UPLOAD_BATCH = 1024
RESERVE_BATCH = 8192
#: sync_do_user gives up after three rounds (renames, changed replica).
MAX_ROUNDS = 3


@dataclass
class PushReport:
    """What a push did.  ``ok`` is False when the replica is not known to hold the user."""

    user: str
    target: str
    ok: bool = False
    mailboxes: int = 0            # folders the master has
    updated: int = 0              # APPLY MAILBOX sent and accepted
    unchanged: int = 0
    renamed: int = 0
    deleted: int = 0
    uploaded: int = 0             # message bodies sent
    uploaded_bytes: int = 0
    reserved: int = 0             # bodies the replica already had
    full_updates: int = 0         # checksum-failure repairs
    copied_back: int = 0          # replica-only messages copied into modsync
    renumbered: int = 0
    deleted_user: bool = False
    left_alone: list = field(default_factory=list)   # replica-only folders
    errors: list = field(default_factory=list)
    seconds: float = 0.0
    wire_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class PushFailed(Exception):
    """A step of the push failed; ``code`` is the server's IMAP_... code, if any."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


def push_user(store: Store, user: str, host: str, port: int, *, authname: str, password: str,
              progress: Progress | None = None, as_user: str | None = None,
              partition: str = "default", compress: bool = True, force: bool = False,
              servername: str = "modsync") -> PushReport:
    """Replicate modsync user ``user`` into the Cyrus sync_server at host:port.

    ``as_user`` names the user on the Cyrus side (default: the same name).
    ``force`` sends ``APPLY FORCE`` first (sync_client -O): the replica
    then replaces folders whose unique ids clash instead of refusing.
    Returns a report; errors are in ``report.errors`` (``report.ok`` False).
    """
    target = as_user or user
    report = PushReport(user, target)
    t0 = time.monotonic()
    state.ensure_table(store)
    client = None
    try:
        client = CsyncClient(host, port, authname=authname, password=password,
                             compress=compress)
        if force:
            _check(client.request(Line("APPLY", "FORCE", KvList())), "FORCE")
        push = _UserPush(store, client, user, target, report, progress or Progress(),
                         partition, servername)
        for attempt in range(MAX_ROUNDS):
            try:
                if push.run():
                    report.ok = not report.errors
                    break
            except PushFailed as e:
                if e.code in ("IMAP_SYNC_CHANGED", "IMAP_MAILBOX_MOVED") \
                        and attempt < MAX_ROUNDS - 1:
                    log.info("push %s: %s; fetching the replica's state again", user, e)
                    continue
                raise
        else:
            report.errors.append(f"user {user}: still changing after {MAX_ROUNDS} rounds")
    except (PushFailed, CsyncError, OSError) as e:
        report.errors.append(str(e))
        report.ok = False
    finally:
        if client is not None:
            report.wire_bytes = client.bytes_sent
            client.close()
        report.seconds = round(time.monotonic() - t0, 3)
    return report


def restore_to_cyrus(store: Store, user: str, host: str, port: int, *, authname: str,
                     password: str, as_user: str | None = None, progress: Progress | None = None,
                     partition: str = "default", force: bool = False) -> PushReport:
    """Restore a user from any store (a backup's temporary store, say) into a real Cyrus.

    The same as :func:`push_user`; with ``as_user`` the mail lands under
    another Cyrus user.  The replica's unique ids are modsync's, so a
    restore over a different, existing Cyrus user usually needs ``force``.
    """
    return push_user(store, user, host, port, authname=authname, password=password,
                     as_user=as_user, progress=progress, partition=partition, force=force)


def _check(r: Response, what: str) -> Response:
    if not r.ok:
        raise PushFailed(f"{what}: {r.status} {r.text}", r.code)
    return r


# =============================================================================================

@dataclass
class _Replica:
    folders: dict          # uniqueid -> CyrusMailbox
    by_name: dict          # name -> CyrusMailbox
    quota: dict            # root -> {resource: limit}
    seen: dict             # uniqueid -> (lastread, lastuid, lastchange, seenuids)
    lsub: list
    sieve: dict            # filename -> (last_update, guid, isactive)


def parse_mailbox(kl: KvList) -> CyrusMailbox:
    """A ``* MAILBOX`` kvlist from a replica -> CyrusMailbox (sync_kl_parse's fields)."""
    anns = []
    a = kl.get("ANNOTATIONS")
    if isinstance(a, List):
        anns = sorted(view.parse_annotations(a.node))
    name = kl.get_atom("MBOXNAME")
    return CyrusMailbox(
        uniqueid=kl.get_atom("UNIQUEID"), mboxname=name,
        user=mapping.user_of_internal(name) or "", mbtype=kl.get_atom("MBOXTYPE", "") or "",
        partition=kl.get_atom("PARTITION", "default") or "default",
        acl=kl.get_atom("ACL", "") or "", options=kl.get_atom("OPTIONS", "") or "",
        last_uid=kl.get_num32("LAST_UID", 0), highestmodseq=kl.get_num("HIGHESTMODSEQ", 0),
        recentuid=kl.get_num32("RECENTUID", 0), recenttime=kl.get_date("RECENTTIME", 0),
        last_appenddate=kl.get_date("LAST_APPENDDATE", 0),
        pop3_last_login=kl.get_date("POP3_LAST_LOGIN", 0),
        pop3_show_after=kl.get_date("POP3_SHOW_AFTER", 0),
        xconvmodseq=kl.get_num("XCONVMODSEQ", 0), raclmodseq=kl.get_num("RACLMODSEQ", 0),
        uidvalidity=kl.get_num32("UIDVALIDITY", 0), createdmodseq=kl.get_num("CREATEDMODSEQ", 0),
        foldermodseq=kl.get_num("FOLDERMODSEQ", 0), annotations=anns,
        crc_basic=kl.get_num32("SYNC_CRC", 0), crc_annot=kl.get_num32("SYNC_CRC_ANNOT", 0))


def is_unchanged(local: CyrusMailbox, remote: CyrusMailbox | None) -> bool:
    """sync_client's is_unchanged(): nothing to send for this folder."""
    if remote is None:
        return False
    if view._mbtype_key(local.mbtype) != view._mbtype_key(remote.mbtype):
        return False
    if (local.last_uid, local.highestmodseq, local.uidvalidity, local.recentuid,
            local.recenttime, local.pop3_last_login, local.pop3_show_after) != (
            remote.last_uid, remote.highestmodseq, remote.uidvalidity, remote.recentuid,
            remote.recenttime, remote.pop3_last_login, remote.pop3_show_after):
        return False
    if local.options != remote.options:
        return False
    if remote.foldermodseq and remote.foldermodseq != local.foldermodseq:
        return False
    if local.acl != remote.acl:
        return False
    if [(e, u, v) for e, u, _m, v in local.annotations] != \
            [(e, u, v) for e, u, _m, v in remote.annotations]:
        return False
    return view.crceq((local.crc_basic, local.crc_annot), (remote.crc_basic, remote.crc_annot))


class _UserPush:
    def __init__(self, store: Store, client: CsyncClient, user: str, target: str,
                 report: PushReport, progress: Progress, partition: str, servername: str):
        self.store = store
        self.client = client
        self.user = user
        self.target = target
        self.report = report
        self.progress = progress
        self.partition = partition
        self.servername = servername
        self.uploaded: set[bytes] = set()      # SHA-1s the replica has staged this session
        self.reserved: set[bytes] = set()

    # -- names between the two sides --------------------------------------------------------------
    def cyrus_name(self, name: str) -> str:
        return mapping.internal_name(self.target, name)

    def request(self, line: Line, what: str, bodies=None) -> Response:
        return _check(self.client.request(line, bodies), what)

    # -- the user sync --------------------------------------------------------------------------------
    def run(self) -> bool:
        """One round; False when the replica must be fetched again (after renames)."""
        replica = self.get_user()
        self.report.left_alone = []
        local = self.local_mailboxes()
        self.report.mailboxes = len(local)
        if not local:
            # Every folder deleted in modsync: the user is gone (sync_client sends
            # UNUSER for a user that no longer exists on the master).
            if replica.folders:
                self.request(Line("APPLY", "UNUSER", self.target), f"UNUSER {self.target}")
                self.report.deleted_user = True
            return True
        if self.renames_and_deletes(replica, local):
            return False
        self.reserve(replica, local)
        for hdr in sorted(local.values(), key=lambda h: h.mboxname):
            self.update_mailbox(hdr, replica.folders.get(hdr.uniqueid))
        self.quota(replica)
        self.subscriptions(replica)
        if self.client.sieve_mailbox:
            self.sieve_folder(replica)
        else:
            self.sieve_scripts(replica)
        self.seen(replica)
        return True

    def get_user(self) -> _Replica:
        r = self.request(Line("GET", "USER", self.target), "GET USER")
        rep = _Replica({}, {}, {}, {}, [], {})
        for line in r.lines:
            if not line.is_dlist:
                continue
            v = line.value
            if line.key == "MAILBOX":
                hdr = parse_mailbox(v)
                rep.folders[hdr.uniqueid] = hdr
                rep.by_name[hdr.mboxname] = hdr
            elif line.key == "QUOTA":
                rep.quota[v.get_atom("ROOT")] = _quota_limits(v)
            elif line.key == "SEEN":
                rep.seen[v.get_atom("UNIQUEID")] = (
                    v.get_date("LASTREAD"), v.get_num32("LASTUID"), v.get_date("LASTCHANGE"),
                    v.get_atom("SEENUIDS") or "")
            elif line.key == "LSUB":
                rep.lsub = [a for a in v.atoms() if a]
            elif line.key == "SIEVE":
                rep.sieve[v.get_atom("FILENAME")] = (
                    v.get_date("LAST_UPDATE", 0), v.get_atom("GUID", "") or "",
                    v.get_num32("ISACTIVE", 0))
        return rep

    def local_mailboxes(self) -> dict[str, CyrusMailbox]:
        out = {}
        with self.store.db.read() as txn:
            u = view.user_record(txn, self.user)
            if u is None:
                raise PushFailed(f"no user {self.user!r} in this store")
            for mb in view.live_mailboxes(txn, u):
                try:
                    name = self.cyrus_name(mb.name)
                except mapping.NameError_ as e:
                    self.report.errors.append(f"{mb.name!r} not pushed: {e}")
                    continue
                hdr, _ = view.synthesize(txn, u, mb, partition=self.partition,
                                         with_records=False)
                hdr.mboxname = name
                hdr.user = self.target
                if self.target != self.user:
                    hdr.acl = _retarget_acl(hdr.acl, self.user, self.target)
                out[hdr.uniqueid] = hdr
        return out

    def renames_and_deletes(self, replica: _Replica, local: dict) -> bool:
        """APPLY RENAME / UNMAILBOX as needed; True when something was renamed."""
        renames = []
        for uid, r in replica.folders.items():
            if "f" in r.mbtype or "d" in r.mbtype:
                continue
            if r.mboxname.startswith(mapping.DELETED_PREFIX + mapping.SEP):
                continue
            mine = local.get(uid)
            if mine is not None:
                if mine.mboxname != r.mboxname:
                    renames.append((r, mine))
                continue
            with self.store.db.read() as txn:
                found = view.mailbox_by_uniqueid(txn, uid)
            if found is not None and found[1].stamp.removed:
                self.request(Line("APPLY", "UNMAILBOX", r.mboxname), f"UNMAILBOX {r.mboxname}")
                self.report.deleted += 1
            elif any(x.mboxname == r.mboxname for x in local.values()):
                continue   # our folder of that name will meet it in APPLY MAILBOX
            else:
                self.report.left_alone.append(r.mboxname)
        if not renames:
            return False
        occupied = {r.mboxname for r in replica.folders.values()}
        pending = list(renames)
        while pending:
            for i, (r, mine) in enumerate(pending):
                if mine.mboxname not in occupied:
                    break
            else:
                # a cycle: move one aside first (Cyrus answers IMAP_AGAIN here)
                r, mine = pending[0]
                aside = f"{r.mboxname}.csync-{int(time.time()) & 0xFFFFFF:06x}"
                self._rename(r, aside, occupied)
                continue
            pending.pop(i)
            self._rename(r, mine.mboxname, occupied)
        return True

    def _rename(self, r: CyrusMailbox, new: str, occupied: set) -> None:
        self.request(Line("APPLY", "RENAME", KvList(
            OLDMBOXNAME=r.mboxname, NEWMBOXNAME=new, PARTITION=r.partition,
            UIDVALIDITY=r.uidvalidity)), f"RENAME {r.mboxname}")
        occupied.discard(r.mboxname)
        occupied.add(new)
        r.mboxname = new
        self.report.renamed += 1

    # -- messages -----------------------------------------------------------------------------------
    def _records(self, hdr: CyrusMailbox, above_modseq: int = 0) -> list[tuple[CyrusRecord, bytes]]:
        """(Cyrus record, content address) of a local mailbox, modseq above a floor."""
        out = []
        with self.store.db.read() as txn:
            u = view.user_record(txn, self.user)
            mb = view.mailbox_by_num(txn, u, hdr.num)
            for r in view.modsync_records(txn, u, mb):
                if r.stamp.modseq > above_modseq:
                    out.append((view.record_from_modsync(r, r.stamp.modseq,
                                                         createdmodseq=r.createdmodseq),
                                r.address))
        return out

    def reserve(self, replica: _Replica, local: dict) -> None:
        """RESERVE new messages' GUIDs against the replica's folders (only when it has some)."""
        if not replica.folders:
            return
        want = []
        seen = set()
        for hdr in local.values():
            remote = replica.folders.get(hdr.uniqueid)
            if is_unchanged(hdr, remote):
                continue
            last = remote.last_uid if remote is not None else 0
            floor = remote.highestmodseq if remote is not None else 0
            for rec, _ in self._records(hdr, floor):
                if rec.uid > last and not rec.expunged and rec.guid not in seen:
                    seen.add(rec.guid)
                    want.append(rec.guid)
        names = sorted(replica.by_name)
        for i in range(0, len(want), RESERVE_BATCH):
            batch = want[i:i + RESERVE_BATCH]
            r = self.request(Line("APPLY", "RESERVE", KvList(
                PARTITION=self.partition, MBOXNAME=List(names),
                GUID=List([wrap(g.hex().encode()) for g in batch]))), "RESERVE")
            missing = {bytes.fromhex(a) for v in r.named("MISSING") for a in v.atoms()}
            for g in batch:
                if g not in missing:
                    self.reserved.add(g)
                    self.report.reserved += 1

    def upload(self, pairs: list[tuple[CyrusRecord, bytes]]) -> None:
        """APPLY MESSAGE for bodies the replica has neither reserved nor been sent."""
        todo = []
        seen = set()
        for rec, address in pairs:
            g = rec.guid
            if g in self.uploaded or g in self.reserved or g in seen:
                continue
            seen.add(g)
            todo.append((rec, address))
        if not todo:
            return
        self.progress.start(f"push {self.user}: upload", total_items=len(todo))
        for i in range(0, len(todo), UPLOAD_BATCH):
            batch = todo[i:i + UPLOAD_BATCH]
            files = []
            nbytes = 0
            for rec, address in batch:
                body = self.store.read_body(address)
                nbytes += len(body)
                files.append(File(self.partition, rec.guid.hex(), body=body))
            self.request(Line("APPLY", "MESSAGE", List(files)), "MESSAGE")
            for rec, _ in batch:
                self.uploaded.add(rec.guid)
            self.report.uploaded += len(batch)
            self.report.uploaded_bytes += nbytes
            self.progress.advance(len(batch), nbytes)
        self.progress.finish()

    # -- one folder ------------------------------------------------------------------------------------
    def update_mailbox(self, hdr: CyrusMailbox, remote: CyrusMailbox | None) -> None:
        r = self._update_once(hdr, remote, repeat=False)
        if r == "IMAP_SYNC_CHECKSUM":
            log.info("push %s: CRC failure on %s, fetching it again", self.user, hdr.mboxname)
            r = self._update_once(hdr, None, repeat=True)
        if r in ("IMAP_SYNC_CHECKSUM", "AGAIN"):
            log.info("push %s: %s: full update", self.user, hdr.mboxname)
            self.full_update(hdr)
            r = self._update_once(self._reload(hdr), None, repeat=True)
        if r:
            raise PushFailed(f"APPLY MAILBOX {hdr.mboxname}: {r}", r)

    def _reload(self, hdr: CyrusMailbox) -> CyrusMailbox:
        return self.local_mailboxes().get(hdr.uniqueid, hdr)

    def _fetch_remote(self, name: str) -> CyrusMailbox | None:
        r = self.request(Line("GET", "MAILBOXES", List([name])), "GET MAILBOXES")
        for v in r.named("MAILBOX"):
            return parse_mailbox(v)
        return None

    def _update_once(self, hdr: CyrusMailbox, remote: CyrusMailbox | None, *,
                     repeat: bool) -> str:
        """update_mailbox_once(): "" when done, else the failure code."""
        if repeat:
            hdr = self._reload(hdr)
            remote = self._fetch_remote(hdr.mboxname)
        if remote is not None:
            # deletedmodseq > the replica's highestmodseq: tombstones it never saw are gone
            with self.store.db.read() as txn:
                horizon = view.user_record(txn, self.user).horizon
            if not repeat and horizon > remote.highestmodseq and remote.highestmodseq:
                return "AGAIN"
            # adopt what the replica has higher
            if remote.uidvalidity > hdr.uidvalidity:
                hdr.uidvalidity = remote.uidvalidity
            if remote.foldermodseq > hdr.foldermodseq:
                hdr.foldermodseq = remote.foldermodseq
        if is_unchanged(hdr, remote):
            self.report.unchanged += 1
            return ""
        floor = remote.highestmodseq if remote is not None else 0
        pairs = self._records(hdr, floor)
        last = remote.last_uid if remote is not None else 0
        self.upload([(rec, a) for rec, a in pairs if rec.uid > last and not rec.expunged])
        line = Line("APPLY", "MAILBOX", view.mailbox_kvlist(
            hdr, records=[rec for rec, _ in pairs],
            since=remote if (remote is not None and not repeat) else None))
        r = self.client.request(line)
        if r.ok:
            self.report.updated += 1
            return ""
        if r.code in ("IMAP_SYNC_CHANGED", "IMAP_MAILBOX_MOVED"):
            raise PushFailed(f"APPLY MAILBOX {hdr.mboxname}: {r.text}", r.code)
        return r.code

    # -- split-brain repair ------------------------------------------------------------------------------
    def full_update(self, hdr: CyrusMailbox) -> None:
        """mailbox_full_update(): merge the replica's records into modsync, then clean it up."""
        self.report.full_updates += 1
        r = self.request(Line("GET", "FULLMAILBOX", hdr.mboxname), "GET FULLMAILBOX")
        found = r.named("MAILBOX")
        if not found:
            return
        kl = found[0]
        remote = parse_mailbox(kl)
        rrecs = {}
        rl = kl.get("RECORD")
        if isinstance(rl, List):
            for node in rl.node[1:]:
                rec = view.parse_record(node)
                rrecs[rec.uid] = rec
        fetched: dict[bytes, bytes] = {}
        expunge_remote: list[int] = []

        def need_body(rec: CyrusRecord) -> bool:
            if rec.guid in fetched:
                return True
            with self.store.db.read() as txn:
                if txn.get("sha1", rec.guid) is not None:
                    return True
            fr = self.request(Line("GET", "FETCH", KvList(
                MBOXNAME=hdr.mboxname, PARTITION=remote.partition, UNIQUEID=remote.uniqueid,
                GUID=rec.guid.hex(), UID=rec.uid)), f"GET FETCH {rec.uid}")
            for v in fr.named("MESSAGE"):
                if isinstance(v, File) and v.body is not None and v.guid == rec.guid.hex():
                    fetched[rec.guid] = v.body
                    return True
            return False

        with self.store.db.read() as txn:
            u = view.user_record(txn, self.user)
            mb = view.mailbox_by_num(txn, u, hdr.num)
            local = {r.uid: r for r in view.modsync_records(txn, u, mb)}
        # Work out what to do first (it may need bodies from the replica), then do it
        # in one mutation whose modseq is above everything the replica has.
        actions = []
        for uid in sorted(set(local) | set(rrecs)):
            lr, rr = local.get(uid), rrecs.get(uid)
            if lr is not None and rr is not None:
                if lr.stamp.removed and rr.expunged:
                    continue
                if bytes(lr.sha1) != rr.guid:
                    log.warning("push %s: %s uid %d: guid mismatch (split brain)", self.user,
                                hdr.mboxname, uid)
                    if not rr.expunged and need_body(rr):
                        actions.append(("copyback", rr))
                    if not lr.stamp.removed:
                        actions.append(("renumber", lr))
                    expunge_remote.append(uid)
                    continue
                mine = view.record_from_modsync(lr, lr.stamp.modseq,
                                                createdmodseq=lr.createdmodseq)
                if _same_record(mine, rr):
                    continue
                if lr.stamp.removed:
                    actions.append(("bump", lr))
                elif rr.expunged:
                    actions.append(("expunge", lr))
                elif rr.modseq > mine.modseq and rr.last_updated >= mine.last_updated:
                    actions.append(("adopt", (lr, rr)))
                else:
                    actions.append(("bump", lr))
            elif lr is not None:
                if lr.stamp.removed:
                    continue
                if uid <= remote.last_uid:
                    actions.append(("renumber", lr))
                elif lr.stamp.modseq <= remote.highestmodseq:
                    actions.append(("bump", lr))
            else:
                if rr.expunged:
                    continue
                if uid <= hdr.last_uid:
                    if rr.modseq < self._horizon():
                        expunge_remote.append(uid)
                    elif need_body(rr):
                        actions.append(("copyback", rr))
                        expunge_remote.append(uid)
                elif need_body(rr):
                    actions.append(("append", rr))
        report = self.report

        def fn(m: Mutation):
            mbx = m.mailbox(hdr.num)
            for kind, item in actions:
                if kind == "append":
                    _append(m, mbx, item, item.uid, fetched)
                    report.copied_back += 1
                elif kind == "copyback":
                    _append(m, mbx, item, max(mbx.uidnext, remote.last_uid + 1), fetched)
                    report.copied_back += 1
                elif kind == "renumber":
                    lr = m.record(mbx, item.uid)
                    new = lr.copy()
                    new.uid = max(mbx.uidnext, remote.last_uid + 1)
                    new.stamp = Stamp()
                    m.put_record(mbx, new, None)
                    old = lr.copy()
                    lr.stamp.removed = True
                    m.put_record(mbx, lr, old)
                    report.renumbered += 1
                elif kind == "expunge":
                    lr = m.record(mbx, item.uid)
                    old = lr.copy()
                    lr.stamp.removed = True
                    m.put_record(mbx, lr, old)
                elif kind == "bump":
                    lr = m.record(mbx, item.uid)
                    m.put_record(mbx, lr.copy(), lr, last_updated=lr.last_updated)
                elif kind == "adopt":
                    lr0, rr = item
                    lr = m.record(mbx, lr0.uid)
                    old = lr.copy()
                    lr.flags = normalize_flags(rr.flags)
                    lr.annotations = tuple(sorted((e, u, bytes(v)) for e, u, _m, v
                                                  in rr.annotations))
                    m.put_record(mbx, lr, old, last_updated=rr.last_updated)
            if mbx.uidnext <= remote.last_uid:
                mbx.uidnext = remote.last_uid + 1
                m.touch_mailbox(mbx)
            if remote.uidvalidity > mbx.uidvalidity:
                mbx.uidvalidity = remote.uidvalidity
                m.folder_changed(mbx)
            if remote.highestmodseq >= mbx.highestmodseq:
                m.touch_mailbox(mbx)    # go above the replica's highestmodseq
        self.store.mutate(self.user, fn, modseq=remote.highestmodseq + 1)
        if expunge_remote:
            r = self.client.request(Line("APPLY", "EXPUNGE", KvList(
                MBOXNAME=hdr.mboxname, UNIQUEID=remote.uniqueid,
                UID=List(sorted(expunge_remote)))))
            if not r.ok:
                log.warning("push %s: cleanup EXPUNGE in %s failed: %s", self.user,
                            hdr.mboxname, r.text)

    def _horizon(self) -> int:
        with self.store.db.read() as txn:
            return view.user_record(txn, self.user).horizon

    # -- per-user things ------------------------------------------------------------------------------
    def quota(self, replica: _Replica) -> None:
        with self.store.db.read() as txn:
            u = view.user_record(txn, self.user)
            roots = {}
            for k, v in txn.prefix("objects", u.prefix + QUOTA):
                q = QuotaRoot.unpack(k[5:], v)
                if not q.stamp.removed:
                    roots[mapping.quota_root_out(self.target, q.root)] = q
        for root, q in roots.items():
            limits = {k: v for k, v in q.limits.items() if k in mapping.QUOTA_RESOURCES}
            if replica.quota.get(root) == limits:
                continue
            pairs = [("ROOT", root), ("LIMIT", limits.get("STORAGE", mapping.UNLIMITED32))]
            pairs += [(res, limits[res]) for res in mapping.QUOTA_RESOURCES if res in limits]
            pairs.append(("MODSEQ", q.stamp.modseq))
            self.request(Line("APPLY", "QUOTA", KvList(pairs)), f"QUOTA {root}")
        for root in replica.quota:
            if root not in roots:
                self.request(Line("APPLY", "UNQUOTA", root), f"UNQUOTA {root}")

    def subscriptions(self, replica: _Replica) -> None:
        from .replica import _sub_internal
        with self.store.db.read() as txn:
            u = view.user_record(txn, self.user)
            mine = set()
            for k, v in txn.prefix("objects", u.prefix + SUBSCRIPTION):
                s = Subscription.unpack(k[5:], v)
                if s.stamp.removed:
                    continue
                try:
                    mine.add(_sub_internal(self.target, s.name))
                except mapping.NameError_:
                    continue
        theirs = set(replica.lsub)
        for name in sorted(mine - theirs):
            self.request(Line("APPLY", "SUB", KvList(USERID=self.target, MBOXNAME=name)),
                         f"SUB {name}")
        for name in sorted(theirs - mine):
            self.request(Line("APPLY", "UNSUB", KvList(USERID=self.target, MBOXNAME=name)),
                         f"UNSUB {name}")

    def seen(self, replica: _Replica) -> None:
        with self.store.db.read() as txn:
            u = view.user_record(txn, self.user)
            sets = [SeenSet.unpack(k[5:], v) for k, v in txn.prefix("objects", u.prefix + SEEN)]
        for s in sets:
            if s.stamp.removed:
                continue
            mine = (s.lastread, s.lastuid, s.lastchange, s.uids)
            if replica.seen.get(s.mailbox_id) == mine:
                continue
            self.request(Line("APPLY", "SEEN", KvList(
                USERID=self.target, UNIQUEID=s.mailbox_id, LASTREAD=s.lastread,
                LASTUID=s.lastuid, LASTCHANGE=s.lastchange, SEENUIDS=s.uids)), "SEEN")

    def _scripts(self) -> dict[str, tuple[bytes, bool, int]]:
        with self.store.db.read() as txn:
            u = view.user_record(txn, self.user)
            scripts = [SieveScript.unpack(k[5:], v)
                       for k, v in txn.prefix("objects", u.prefix + SIEVE)]
        return {s.name: (self.store.read_body(s.address), s.active, s.last_update)
                for s in scripts if not s.stamp.removed}

    def sieve_scripts(self, replica: _Replica) -> None:
        """SIEVE mode (no SIEVE-MAILBOX): sync_do_user_sieve."""
        mine = self._scripts()
        for name, (script, _active, last_update) in mine.items():
            fname = name + ".script"
            theirs = replica.sieve.get(fname)
            if theirs is not None and theirs[1] == hashlib.sha1(script).hexdigest():
                continue
            if theirs is not None:
                # 3.6.1-3.6.5 store an empty script when one already exists: delete first
                self.request(Line("APPLY", "UNSIEVE", KvList(USERID=self.target,
                                                             FILENAME=fname)), "UNSIEVE")
            self.request(Line("APPLY", "SIEVE", KvList(
                USERID=self.target, FILENAME=fname, LAST_UPDATE=last_update,
                CONTENT=script)), f"SIEVE {fname}")
        for fname in replica.sieve:
            if fname.endswith(".script") and fname[:-7] not in mine:
                self.request(Line("APPLY", "UNSIEVE", KvList(USERID=self.target,
                                                             FILENAME=fname)), "UNSIEVE")
        active = [n for n, (_, a, _) in mine.items() if a]
        if active:
            self.request(Line("APPLY", "ACTIVATE_SIEVE", KvList(
                USERID=self.target, FILENAME=active[0] + ".bc")), "ACTIVATE_SIEVE")
        elif any(v[2] for v in replica.sieve.values()):
            self.request(Line("APPLY", "UNACTIVATE_SIEVE", KvList(USERID=self.target)),
                         "UNACTIVATE_SIEVE")

    def sieve_folder(self, replica: _Replica) -> None:
        """SIEVE-MAILBOX mode: scripts are the messages of the #sieve folder."""
        name = mapping.sieve_folder(self.target)
        mine = self._scripts()
        remote = replica.by_name.get(name)
        if remote is None and not mine:
            return
        msgs = {}
        for sname, (script, active, last_update) in mine.items():
            msg = mapping.build_sieve_message(self.target, self.servername, sname, script,
                                              last_update or 1)
            msgs[hashlib.sha1(msg).digest()] = (msg, active, last_update or 1)
        rrecs: dict[int, CyrusRecord] = {}
        if remote is not None:
            r = self.request(Line("GET", "FULLMAILBOX", name), "GET FULLMAILBOX #sieve")
            for kl in r.named("MAILBOX"):
                remote = parse_mailbox(kl)
                rl = kl.get("RECORD")
                if isinstance(rl, List):
                    for node in rl.node[1:]:
                        rec = view.parse_record(node)
                        rrecs[rec.uid] = rec
        hms = remote.highestmodseq if remote is not None else 0
        modseq = hms + 1
        changed: list[CyrusRecord] = []
        have = set()
        for rec in rrecs.values():
            if rec.expunged:
                continue
            want = msgs.get(rec.guid)
            if want is None:
                rec.expunged = True
            else:
                have.add(rec.guid)
                flags = ("\\Flagged",) if want[1] else ()
                if set(rec.flags) == set(flags):
                    continue
                rec.flags = flags
            rec.modseq = modseq
            changed.append(rec)
        last_uid = remote.last_uid if remote is not None else 0
        uploads = []
        now = int(time.time())
        for guid, (msg, active, when) in sorted(msgs.items(), key=lambda kv: kv[1][2]):
            if guid in have:
                continue
            last_uid += 1
            rec = CyrusRecord(last_uid, modseq, now, ("\\Flagged",) if active else (), when,
                              len(msg), guid, (), now, modseq)
            changed.append(rec)
            rrecs[rec.uid] = rec
            uploads.append(File(self.partition, guid.hex(), body=msg))
        if not changed:
            return
        for rec in changed:
            rrecs[rec.uid] = rec
        basic, annot = state.recompute_crcs(rrecs.values())
        if uploads:
            self.request(Line("APPLY", "MESSAGE", List(uploads)), "MESSAGE #sieve")
        if remote is None:
            remote = CyrusMailbox(uniqueid=_new_uniqueid(), mboxname=name, user=self.target,
                                  partition=self.partition,
                                  acl=view.default_acl(self.target),
                                  options=mapping.DEFAULT_OPTIONS,
                                  uidvalidity=int(time.time()), createdmodseq=modseq,
                                  foldermodseq=modseq)
            since = None
        else:
            since = CyrusMailbox(remote.uniqueid, name, self.target,
                                 highestmodseq=remote.highestmodseq,
                                 crc_basic=remote.crc_basic, crc_annot=remote.crc_annot)
        hdr = remote
        hdr.mbtype = "f"
        hdr.last_uid = last_uid
        hdr.highestmodseq = modseq
        hdr.crc_basic, hdr.crc_annot = basic, annot
        self.request(Line("APPLY", "MAILBOX", view.mailbox_kvlist(
            hdr, records=sorted(changed, key=lambda r: r.uid), since=since)),
            "APPLY MAILBOX #sieve")


def _append(m: Mutation, mb, rr: CyrusRecord, uid: int, fetched: dict) -> None:
    """Copy a replica-only message into modsync under ``uid``."""
    body = fetched.get(rr.guid)
    if body is not None:
        address, _ = m.store.put_body(m.txn, body)
    else:
        address = m.txn.get("sha1", rr.guid)
    rec = Record(uid, address, rr.guid, rr.size, rr.internaldate, savedate=rr.savedate,
                 flags=normalize_flags(rr.flags), createdmodseq=m.modseq,
                 annotations=tuple(sorted((e, u, bytes(v)) for e, u, _m, v in rr.annotations)))
    m.put_record(mb, rec, None, last_updated=rr.last_updated)


def _same_record(a: CyrusRecord, b: CyrusRecord) -> bool:
    """compare_one_record()'s field list."""
    return (a.modseq == b.modseq and a.last_updated == b.last_updated
            and a.internaldate == b.internaldate
            and {f.lower() for f in a.flags} == {f.lower() for f in b.flags}
            and a.expunged == b.expunged and a.savedate == b.savedate
            and a.createdmodseq == b.createdmodseq
            and sorted((e, u, v) for e, u, _m, v in a.annotations)
            == sorted((e, u, v) for e, u, _m, v in b.annotations))


def _quota_limits(kv: KvList) -> dict:
    limits = {}
    legacy = kv.get_num32("LIMIT", None)
    if legacy is not None and legacy != mapping.UNLIMITED32:
        limits["STORAGE"] = legacy
    for res in mapping.QUOTA_RESOURCES:
        n = kv.get_num32(res, None)
        if n is not None:
            limits[res] = n
    return limits


def _retarget_acl(acl: str, user: str, target: str) -> str:
    return mapping.format_acl([(target if who == user else who, rights)
                               for who, rights in mapping.parse_acl(acl)])


def _new_uniqueid() -> str:
    from ..store import new_unique_id
    return new_unique_id()
