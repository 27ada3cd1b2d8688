"""modsync as a Cyrus 3.6 replica: csync commands in, responses out.

:class:`ReplicaSession` is the server side of one csync connection as a
state machine over parsed lines: ``handle(line) -> Reply``.  It never
touches a socket; the asyncio layer (``engine.csync.server``) and the tests
(which replay real Cyrus transcripts) feed it :class:`dlist.Line` objects.

What it keeps from Cyrus's sync_server (imap/sync_server.c, sync_support.c
in 3.6.1; reference cyrus-replication §2 and §5):

* the command set and its literal reply texts (``OK success``,
  ``NO IMAP_SYNC_CHECKSUM Checksum Failure``, ``BAD IMAP_PROTOCOL_ERROR
  Unrecognized command``, ...), so a 3.6 sync_client maps them to the same
  error codes and runs its retry ladder;
* the legality rules of APPLY MAILBOX, in Cyrus's order: uniqueid checks,
  the SINCE_MODSEQ/SINCE_CRC precondition, modseq/uidvalidity/last_uid
  never lowered, the two passes over RECORD (GUID mismatch, higher modseq
  here, un-expunge and lost messages are checksum failures), then commit
  and the final CRC check (reported after the commit, as Cyrus does);
* SYNC_CRC and SYNC_CRC_ANNOT over Cyrus's own modseqs, kept in csync's
  table (``state``), so ``is_unchanged`` on the master short-circuits.

Where the data goes: Cyrus names map to modsync users and mailboxes
(``mapping``); records, flags, ACLs, annotations, quota, subscriptions,
seen sets and sieve scripts become modsync objects through ``Store.mutate``
(so each change gets a modseq and tombstones in modsync's log); ``DELETED.*``
delayed deletes become modsync mailbox deletions while csync keeps the
deleted folder's Cyrus view; the ``#sieve`` folder becomes sieve scripts.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from dlist import File, KvList, Line, List
from dlist.model import wrap, string_node

from ..accounts import check_password
from ..blobs import Location, address_of
from ..errors import ModsyncError
from ..model import (QUOTA, SEEN, SIEVE, SUBSCRIPTION, U32, U64, AclEntry, Annotation,
                     Mailbox, QuotaRoot, Record, SeenSet, SieveScript, Stamp, Subscription,
                     normalized_flags, unpackb)
from ..mutation import Mutation
from ..store import IX_NAME, IX_UIDVALIDITY, IX_UNIQUEID, Store
from . import mapping, state, view
from .state import CyrusMailbox, CyrusRecord

log = logging.getLogger("modsync.csync")

VERSION = "modsync-csync-1"

# sync_response(): the exact lines a 3.6 sync_client matches by prefix.
RESPONSES = {
    "IMAP_INVALID_USER": "IMAP_INVALID_USER No Such User",
    "IMAP_MAILBOX_NONEXISTENT": "IMAP_MAILBOX_NONEXISTENT No Such Mailbox",
    "IMAP_MAILBOX_LOCKED": "IMAP_MAILBOX_LOCKED Mailbox locked",
    "IMAP_MAILBOX_MOVED": "IMAP_MAILBOX_MOVED Mailbox exists with another name or uniqueid",
    "IMAP_MAILBOX_NOTSUPPORTED": "IMAP_MAILBOX_NOTSUPPORTED Operation is not supported on mailbox",
    "IMAP_SYNC_CHECKSUM": "IMAP_SYNC_CHECKSUM Checksum Failure",
    "IMAP_SYNC_CHANGED": "IMAP_SYNC_CHANGED Changed since last sync",
    "IMAP_SYNC_BADSIEVE": "IMAP_SYNC_BADSIEVE Sieve script compilation failure",
    "IMAP_PROTOCOL_ERROR": "IMAP_PROTOCOL_ERROR Protocol error",
    # Cyrus sends this one bare, which its own client then misreads (§2.2);
    # with text after the code every 3.6 client maps it right.
    "IMAP_PROTOCOL_BAD_PARAMETERS": "IMAP_PROTOCOL_BAD_PARAMETERS Bad parameters",
    "UNKNOWN": "Unknown error",
}

# Files per APPLY MESSAGE and GUIDs per RESERVE that a 3.6 client sends at most
# (1024 and 8193, §2.6); a little headroom, then a protocol error.
MAX_FILES_PER_MESSAGE = 4096
MAX_RESERVE = 65536


class CsyncNo(Exception):
    """A command failed with one of Cyrus's result codes (``code`` is a RESPONSES key)."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


@dataclass
class Reply:
    """Untagged lines, then the status line; what the transport should do after sending."""

    lines: list = field(default_factory=list)
    status: Line | None = None
    close: bool = False
    start_compress: bool = False

    def all(self) -> list[Line]:
        return self.lines + ([self.status] if self.status is not None else [])


def ok(text: str = "success", lines=None) -> Reply:
    return Reply(list(lines or []), Line("OK", text=text))


def no(code: str) -> Reply:
    return Reply([], Line("NO", text=RESPONSES.get(code, RESPONSES["UNKNOWN"])))


def bad(text: str) -> Reply:
    return Reply([], Line("BAD", text=text))


class StagedBody:
    """A file literal's body while it streams in (the parser's sink)."""

    __slots__ = ("guid", "size", "chunks", "verified")

    def __init__(self, guid: str, size: int):
        self.guid = guid
        self.size = size
        self.chunks: list[bytes] = []
        self.verified = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def close(self, verified: bool):
        self.verified = verified
        return None

    def body(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks = [data]
        return data


class ReplicaSession:
    """One csync connection of a Cyrus master to this store.  See the module docstring."""

    def __init__(self, store: Store, servername: str = "modsync", *, compress: bool = True,
                 sieve_mailbox: bool = True, authenticate: bool = True):
        state.ensure_table(store)
        self.store = store
        self.servername = servername
        self.offer_compress = compress
        self.offer_sieve_mailbox = sieve_mailbox
        self.need_auth = authenticate
        self.userid: str | None = None if authenticate else "admin"
        self.admin = not authenticate
        self.compressing = False
        self.sieve_mailbox = False
        self.force = False
        self.staged: dict[str, StagedBody] = {}     # guid -> body parsed, not yet stored
        self.reserved: set[bytes] = set()           # SHA-1s staged in this session
        self._sasl_mech: str | None = None
        self.closed = False
        self.stats = None       # engine.csync.server.Stats, when a server counts
        # APPLY MESSAGE bodies are written by one background thread, so that
        # storing a batch overlaps with the client reading and sending the next
        # one (sync_client waits for each OK).  Whatever reads the store waits.
        self._writer = None
        self._pending: list = []
        self._pending_guids: set[bytes] = set()

    # -- connection start ------------------------------------------------------------------
    def banner(self) -> list[Line]:
        lines = [Line("*", text="SASL PLAIN")]
        if self.offer_compress:
            lines.append(Line("*", text="COMPRESS DEFLATE"))
        if self.offer_sieve_mailbox:
            lines.append(Line("*", text="SIEVE-MAILBOX"))
        lines.append(Line("*", text=f"OK {self.servername} Cyrus sync server {VERSION}"))
        return lines

    def sink(self, partition: str, guid: str, size: int) -> StagedBody:
        """The parser's sink factory: file bodies of the line being read."""
        body = StagedBody(guid, size)
        self.staged[guid] = body
        return body

    # -- dispatch ----------------------------------------------------------------------------
    def handle(self, line: Line) -> Reply:
        """Answer one command line."""
        # APPLY MAILBOX waits for the bodies itself, once it has decoded its
        # records (which overlaps with the last bodies being stored).
        if self._pending and not (line.verb.upper() == "APPLY" and line.is_dlist
                                  and line.key.upper() in ("MESSAGE", "RESERVE", "MAILBOX")):
            failed = self._flush_or_fail()
            if failed is not None:
                return failed
        return self._handle(line)

    def answers_at_once(self, line: Line) -> bool:
        """Whether ``handle(line)`` neither reads nor writes the store (so need not wait).

        The session's housekeeping commands (COMPRESS, NOOP, RESTART, EXIT,
        APPLY CAPABILITIES) while no uploaded bodies are being stored, and a
        PLAIN login whose check is remembered: a server can answer these on
        its event loop instead of handing them to a thread.
        """
        if self._pending or self._sasl_mech is not None:
            return False
        verb = line.verb.upper()
        if self.userid is None:
            # A login checked a moment ago (sync_client connects for every run)
            # is a lookup, not an scrypt computation.
            words = (line.text or b"").split() if verb == "AUTHENTICATE" else ()
            if len(words) != 2 or words[0].upper() != b"PLAIN":
                return False
            creds = _plain_credentials(words[1])
            return creds is not None and bool(creds[1]) and \
                _remembered(self.store, creds[1], creds[2])[2] is not None
        if line.is_dlist:
            return verb == "APPLY" and line.key.upper() == "CAPABILITIES"
        return verb in ("COMPRESS", "NOOP", "RESTART", "EXIT")

    def _flush_or_fail(self) -> Reply | None:
        try:
            self.flush()
        except Exception as e:     # the bodies were not stored: like a failed upload
            log.error("csync: storing uploaded bodies failed: %s", e)
            return no("UNKNOWN")
        return None

    def flush(self) -> None:
        """Wait until every body received so far is in the store (raises its error, if any)."""
        pending, self._pending = self._pending, []
        try:
            for fut in pending:
                fut.result()
        finally:
            self._pending_guids.clear()

    def close(self) -> None:
        """End of the connection: finish the writes in flight, stop the writer."""
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def _handle(self, line: Line) -> Reply:
        if self._sasl_mech is not None:
            return self._sasl_continue(line)
        verb = line.verb
        if not verb:
            return bad("Null command")
        cmd = verb.upper()
        if self.userid is not None and not self.admin:
            return Reply([], Line("NO", text="Permission denied"))
        if not line.is_dlist and cmd not in _SIMPLE and _looks_like_tag(verb):
            return self._imap_probe(line)
        if cmd == "AUTHENTICATE":
            return self._authenticate(line)
        if cmd == "COMPRESS":
            return self._compress(line)
        if cmd == "EXIT":
            if line.text:
                return bad("Unexpected extra arguments to Exit")
            self._restart()
            self.closed = True
            return Reply([], Line("OK", text="Finished"), close=True)
        if cmd == "NOOP":
            if line.text:
                return bad("Unexpected extra arguments to Noop")
            return ok("Noop completed")
        if cmd == "RESTART":
            if line.text:
                return bad("Unexpected extra arguments to Restart")
            self._restart()
            return ok("Restarting")
        if cmd in ("GET", "APPLY", "RESTORE"):
            if self.userid is None:
                return Reply([], Line("NO", text="Please authenticate first"))
            if not line.is_dlist:
                return bad(f"IMAP_PROTOCOL_ERROR Failed to parse {cmd} line")
            try:
                if cmd == "GET":
                    return self._get(line.key.upper(), line.value)
                if cmd == "APPLY":
                    return self._apply(line.key.upper(), line.value)
                return no("IMAP_PROTOCOL_ERROR")
            except CsyncNo as e:
                if e.detail:
                    log.info("csync %s %s: %s", cmd, line.key, e)
                return no(e.code)
            except view.BadRecord as e:
                log.info("csync %s %s: bad parameters: %s", cmd, line.key, e)
                return no("IMAP_PROTOCOL_BAD_PARAMETERS")
            except ModsyncError as e:
                log.warning("csync %s %s: %s", cmd, line.key, e)
                return no("UNKNOWN")
        return bad("IMAP_PROTOCOL_ERROR Unrecognized command")

    # -- session commands ---------------------------------------------------------------------
    def _imap_probe(self, line: Line) -> Reply:
        """An unconfigured sync_client first speaks IMAP (``C01 CAPABILITY``): say no, at once.

        Cyrus's own sync_server answers untagged, so the client waits for its
        timeout (§2.1); a tagged BAD ends the probe immediately, and the
        client then reconnects with csync.
        """
        words = (line.text or b"").split()
        if words and words[0].upper() == b"LOGOUT":
            return Reply([Line("*", text="BYE csync server")],
                         Line(line.verb, text="OK Completed"), close=True)
        return Reply([], Line(line.verb, text="BAD This is a csync server, not IMAP"))

    def _authenticate(self, line: Line) -> Reply:
        words = (line.text or b"").split()
        if not words:
            return bad("Missing required argument to Authenticate")
        if self.userid is not None:
            return bad("Already authenticated")
        mech = words[0].decode("ascii", "replace").upper().strip('"')
        if mech != "PLAIN":
            return Reply([], Line("NO", text="Error authenticating"))
        if len(words) > 2:
            return bad("Unexpected extra arguments to Authenticate")
        if len(words) == 1:
            self._sasl_mech = mech
            return Reply([], Line("+", text=""))
        return self._plain(words[1])

    def _sasl_continue(self, line: Line) -> Reply:
        self._sasl_mech = None
        raw = line.verb.encode() + (b" " + line.text if line.text else b"")
        if raw.strip() == b"*":
            return bad("Client canceled authentication")
        return self._plain(raw.strip())

    def _plain(self, b64: bytes) -> Reply:
        creds = _plain_credentials(b64)
        if creds is None:
            return Reply([], Line("NO", text="Error reading client response: bad PLAIN response"))
        authzid_s, authcid_s, password_s = creds
        account = _check_password(self.store, authcid_s, password_s) if authcid_s else None
        if account is None or (authzid_s and authzid_s != authcid_s and not account.admin):
            return Reply([], Line("NO", text="authentication failure"))
        self.userid = authzid_s or authcid_s
        self.admin = account.admin
        return ok("Success (no protection)")

    def _compress(self, line: Line) -> Reply:
        words = (line.text or b"").split()
        if len(words) != 1:
            return bad("Missing required argument to Compress" if not words
                       else "Unexpected extra arguments to Compress")
        alg = words[0].decode("ascii", "replace")
        if self.compressing:
            return Reply([], Line("NO", text=f"Compression already active: {alg}"))
        if alg.upper() != "DEFLATE" or not self.offer_compress:
            return Reply([], Line("NO", text=f"Unknown compression algorithm: {alg}"))
        self.compressing = True
        return Reply([], Line("OK", text=f"{alg} active"), start_compress=True)

    def _restart(self) -> None:
        """RESTART/EXIT forget what was reserved or uploaded in this session (not stored bodies)."""
        self.reserved.clear()
        self.staged.clear()

    # =========================================================================================
    # GET
    # =========================================================================================
    def _get(self, key: str, value) -> Reply:
        handler = {
            "USER": self._get_user, "MAILBOXES": self._get_mailboxes,
            "UNIQUEIDS": self._get_uniqueids, "FULLMAILBOX": self._get_fullmailbox,
            "META": self._get_meta, "QUOTA": self._get_quota,
            "ANNOTATION": self._get_annotation, "FETCH": self._get_fetch,
            "FETCH_SIEVE": self._get_fetch_sieve,
        }.get(key)
        if handler is None:
            raise CsyncNo("IMAP_PROTOCOL_ERROR", f"unknown GET {key}")
        return handler(value)

    def _view(self, txn, hdr: CyrusMailbox | None, mb: Mailbox | None, u) -> CyrusMailbox | None:
        """The current Cyrus view of a mailbox (reconciled, not written)."""
        if hdr is None:
            if mb is None or mb.stamp.removed:
                return None
            return view.synthesize(txn, u, mb, with_records=False)[0]
        if not hdr.is_shadow and u is not None:
            mb = view.mailbox_by_num(txn, u, hdr.num)
            if mb is None or mb.stamp.removed:
                return None
            hdr, _ = view.reconcile(txn, u, mb, hdr, write=False)
        return hdr

    def _settle(self, user: str) -> None:
        """Persist reconciliations of a user's mailboxes changed in modsync (rarely needed)."""
        with self.store.db.read() as txn:
            u = view.user_record(txn, user)
            if u is None:
                return
            stale = [h.uniqueid for h in state.user_mailboxes(txn, user)
                     if not h.is_shadow and (mb := view.mailbox_by_num(txn, u, h.num)) is not None
                     and mb.highestmodseq != h.synced]
        if not stale:
            return

        def fn(m: Mutation):
            for uniqueid in stale:
                hdr = state.get_mailbox(m.txn, uniqueid)
                if hdr is None or hdr.is_shadow:
                    continue
                mb = view.mailbox_by_num(m.txn, m.user, hdr.num)
                if mb is None or mb.stamp.removed:
                    continue
                view.reconcile(m.txn, m.user, mb, hdr, write=True)
        self.store.mutate(user, fn)

    def _lookup_name(self, txn, mboxname: str):
        """(header or None, modsync mailbox or None, user record or None) for an internal name."""
        hdr = state.mailbox_by_name(txn, mboxname)
        try:
            cn = mapping.parse_name(mboxname)
        except mapping.NameError_:
            cn = None
        user = hdr.user if hdr is not None else (cn.user if cn else None)
        u = view.user_record(txn, user) if user else None
        mb = None
        if hdr is not None:
            if not hdr.is_shadow and u is not None:
                mb = view.mailbox_by_num(txn, u, hdr.num)
        elif cn is not None and cn.kind in ("mailbox", "shared") and u is not None:
            mb = view.mailbox_by_name(txn, u, cn.name)
            if mb is not None:
                hdr = state.header_of(txn, mb)
        return hdr, mb, u

    def _mailbox_line(self, hdr: CyrusMailbox, txn=None, records=None) -> Line:
        return Line("*", "MAILBOX", view.mailbox_kvlist(
            hdr, quotaroot=self._quotaroot(txn, hdr) if txn is not None else None,
            records=records))

    def _quotaroot(self, txn, hdr: CyrusMailbox) -> str | None:
        if hdr.user.startswith(mapping.SHARED_USER):
            return None
        try:
            cn = mapping.parse_name(hdr.mboxname)
        except mapping.NameError_:
            return None
        if cn.kind == "deleted":
            return None
        u = view.user_record(txn, hdr.user)
        if u is None:
            return None
        roots = []
        for k, v in txn.prefix("objects", u.prefix + QUOTA):
            q = QuotaRoot.unpack(k[5:], v)
            if not q.stamp.removed:
                roots.append(q.root)
        name = cn.name or mapping.INBOX
        best = None
        for r in roots:
            if r == "" or name == r or name.startswith(r + "/"):
                if best is None or len(r) > len(best):
                    best = r
        return None if best is None else mapping.quota_root_out(hdr.user, best)

    def _user_views(self, txn, user: str) -> list[tuple[CyrusMailbox, int]]:
        """Every mailbox the user has for Cyrus (modsync ones and shadows), sorted by name."""
        out = {}
        u = view.user_record(txn, user)
        for hdr in state.user_mailboxes(txn, user):
            v = self._view(txn, hdr, None, u)
            if v is not None:
                out[v.uniqueid] = v
        if u is not None:
            known = {v.num for v in out.values() if not v.is_shadow}
            for mb in view.live_mailboxes(txn, u):
                if mb.num not in known:
                    v = self._view(txn, state.header_of(txn, mb), mb, u)
                    if v is not None:
                        out[v.uniqueid] = v
        # mboxlist order: the user's tree, then the DELETED namespace
        return sorted(out.values(), key=lambda h: (h.mboxname.startswith(
            mapping.DELETED_PREFIX + mapping.SEP), h.mboxname))

    def _get_user(self, value) -> Reply:
        user = value.as_atom() if value is not None else None
        if not user:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        self._settle(user)
        lines = []
        with self.store.db.read() as txn:
            views = self._user_views(txn, user)
            roots = []
            exists = False
            for hdr in views:
                if hdr.is_shadow and "d" in hdr.mbtype:
                    continue
                if "i" not in hdr.mbtype:
                    exists = True
                qr = self._quotaroot(txn, hdr)
                if qr and qr not in roots:
                    roots.append(qr)
                if "f" in hdr.mbtype and not self.sieve_mailbox:
                    continue
                lines.append(self._mailbox_line(hdr, txn))
            for root in roots:
                q = self._quota_line(txn, root)
                if q is not None:
                    lines.append(q)
            if exists:
                lines += self._meta_lines(txn, user)
        return ok(lines=lines)

    def _get_mailboxes(self, value) -> Reply:
        names = view.list_atoms(value)
        users = set()
        with self.store.db.read() as txn:
            for name in names:
                hdr, mb, u = self._lookup_name(txn, name)
                if hdr is not None and u is not None and mb is not None:
                    if mb.highestmodseq != hdr.synced:
                        users.add(hdr.user)
        for user in users:
            self._settle(user)
        lines = []
        with self.store.db.read() as txn:
            for name in names:
                hdr, mb, u = self._lookup_name(txn, name)
                v = self._view(txn, hdr, mb, u)
                if v is None or v.mboxname != name:
                    continue
                if "f" in v.mbtype and not self.sieve_mailbox:
                    continue
                lines.append(self._mailbox_line(v, txn))
        return ok(lines=lines)

    def _get_uniqueids(self, value) -> Reply:
        ids = view.list_atoms(value)
        lines = []
        with self.store.db.read() as txn:
            for uniqueid in ids:
                hdr = state.get_mailbox(txn, uniqueid)
                mb = u = None
                if hdr is not None:
                    u = view.user_record(txn, hdr.user)
                else:
                    found = view.mailbox_by_uniqueid(txn, uniqueid)
                    if found is not None:
                        mb = found[1]
                        for k, v in txn.range("users"):
                            if unpackb(v)[0] == found[0]:
                                u = view.user_record(txn, k.decode())
                                break
                v = self._view(txn, hdr, mb, u)
                if v is not None:
                    lines.append(self._mailbox_line(v, txn))
        return ok(lines=lines)

    def _full_records(self, txn, hdr: CyrusMailbox, mb: Mailbox | None, u) -> list[CyrusRecord]:
        if state.get_mailbox(txn, hdr.uniqueid) is None and mb is not None:
            return view.synthesize(txn, u, mb)[1]
        return state.records(txn, hdr.uniqueid)

    def _get_fullmailbox(self, value) -> Reply:
        name = value.as_atom() if value is not None else None
        if not name:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        with self.store.db.read() as txn:
            hdr, mb, u = self._lookup_name(txn, name)
            stale = hdr is not None and mb is not None and mb.highestmodseq != hdr.synced
        if stale:
            self._settle(hdr.user)
        with self.store.db.read() as txn:
            hdr, mb, u = self._lookup_name(txn, name)
            v = self._view(txn, hdr, mb, u)
            if v is None or v.mboxname != name:
                raise CsyncNo("IMAP_MAILBOX_NONEXISTENT")
            recs = self._full_records(txn, v, mb, u)
            return ok(lines=[self._mailbox_line(v, txn, records=recs)])

    def _meta_lines(self, txn, user: str) -> list[Line]:
        u = view.user_record(txn, user)
        if u is None:
            return []
        lines = []
        for k, v in txn.prefix("objects", u.prefix + SEEN):
            s = SeenSet.unpack(k[5:], v)
            if s.stamp.removed:
                continue
            lines.append(Line("*", "SEEN", KvList(
                UNIQUEID=state.cyrus_uniqueid(txn, s.mailbox_id), LASTREAD=s.lastread,
                LASTUID=s.lastuid, LASTCHANGE=s.lastchange, SEENUIDS=s.uids)))
        subs = []
        for k, v in txn.prefix("objects", u.prefix + SUBSCRIPTION):
            s = Subscription.unpack(k[5:], v)
            if not s.stamp.removed:
                try:
                    subs.append(_sub_internal(user, s.name))
                except mapping.NameError_:
                    continue
        if subs:
            lines.append(Line("*", "LSUB", List(sorted(subs))))
        if not self.sieve_mailbox:
            for k, v in txn.prefix("objects", u.prefix + SIEVE):
                s = SieveScript.unpack(k[5:], v)
                if s.stamp.removed:
                    continue
                body = self._body(txn, s.address)
                guid = _sha1_hex(body) if body is not None else "0" * 40
                lines.append(Line("*", "SIEVE", KvList(
                    FILENAME=s.name + ".script", LAST_UPDATE=s.last_update, GUID=guid,
                    ISACTIVE=1 if s.active else 0)))
                if s.active:
                    lines.append(Line("*", "SIEVE", KvList(
                        FILENAME=s.name + ".bc", LAST_UPDATE=0, GUID="0" * 40, ISACTIVE=1)))
        return lines

    def _get_meta(self, value) -> Reply:
        user = value.as_atom() if value is not None else None
        if not user:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        with self.store.db.read() as txn:
            return ok(lines=self._meta_lines(txn, user))

    def _quota_line(self, txn, root: str) -> Line | None:
        try:
            user, mroot = mapping.quota_root_in(root)
        except mapping.NameError_:
            return None
        u = view.user_record(txn, user)
        if u is None:
            return None
        raw = txn.get("objects", u.prefix + QUOTA + mroot.encode())
        if raw is None:
            return None
        q = QuotaRoot.unpack(mroot.encode(), raw)
        if q.stamp.removed:
            return None
        side = state.get_quota(txn, root)
        limits = dict(side[1]) if side is not None else {}
        # modsync's own limits win for the resources it models.
        for res in ("STORAGE", "MESSAGE"):
            if res in q.limits:
                limits[res] = q.limits[res]
            else:
                limits.pop(res, None)
        modseq = side[0] if side is not None else q.stamp.modseq
        return Line("*", "QUOTA", KvList(_quota_pairs(root, limits, modseq)))

    def _get_quota(self, value) -> Reply:
        root = value.as_atom() if value is not None else None
        with self.store.db.read() as txn:
            line = self._quota_line(txn, root or "")
        return ok(lines=[line] if line is not None else [])

    def _get_annotation(self, value) -> Reply:
        name = value.as_atom() if value is not None else ""
        lines = []
        with self.store.db.read() as txn:
            if name:
                hdr, mb, u = self._lookup_name(txn, name)
                v = self._view(txn, hdr, mb, u)
                if v is not None:
                    for entry, userid, _m, val in v.annotations:
                        lines.append(Line("*", "ANNOTATION", KvList(
                            MBOXNAME=name, ENTRY=entry, USERID=userid, VALUE=wrap(string_node(val)))))
        return ok(lines=lines)

    def _body(self, txn, address: bytes) -> bytes | None:
        raw = txn.get("blobs", address)
        if raw is None:
            return None
        return self.store.blobs.read(address, Location.from_list(unpackb(raw)))

    def _body_by_sha1(self, txn, sha1: bytes) -> bytes | None:
        address = txn.get("sha1", sha1)
        return None if address is None else self._body(txn, address)

    def _get_fetch(self, value) -> Reply:
        _, partition, _, guid, _ = _required(value, MBOXNAME="atom", PARTITION="atom",
                                             UNIQUEID="atom", GUID="guid", UID="num32")
        with self.store.db.read() as txn:
            body = self._body_by_sha1(txn, bytes.fromhex(guid))
        if body is None:
            raise CsyncNo("IMAP_MAILBOX_NONEXISTENT", f"no body {guid}")
        return ok(lines=[Line("*", "MESSAGE", File(partition or "default", guid, body=body))])

    def _get_fetch_sieve(self, value) -> Reply:
        if not isinstance(value, KvList):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        user = value.get_atom("USERID", None)
        filename = value.get_atom("FILENAME", None)
        if not user or not filename:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        name = filename[:-len(".script")] if filename.endswith(".script") else filename
        with self.store.db.read() as txn:
            u = view.user_record(txn, user)
            raw = txn.get("objects", u.prefix + SIEVE + name.encode()) if u else None
            s = SieveScript.unpack(name.encode(), raw) if raw else None
            body = self._body(txn, s.address) if s and not s.stamp.removed else None
        if body is None:
            raise CsyncNo("IMAP_MAILBOX_NONEXISTENT")
        return ok(lines=[Line("*", "SIEVE", KvList(USERID=user, FILENAME=filename,
                                                   CONTENT=wrap(string_node(body))))])

    # =========================================================================================
    # APPLY
    # =========================================================================================
    def _apply(self, key: str, value) -> Reply:
        if key.startswith("LOCAL_") and key[6:] in ("MAILBOX", "RENAME", "UNMAILBOX", "UNUSER"):
            key = key[6:]
        handler = {
            "MESSAGE": self._apply_message, "RESERVE": self._apply_reserve,
            "MAILBOX": self._apply_mailbox, "RENAME": self._apply_rename,
            "UNMAILBOX": self._apply_unmailbox, "UNUSER": self._apply_unuser,
            "EXPUNGE": self._apply_expunge, "SUB": self._apply_sub, "UNSUB": self._apply_sub,
            "SEEN": self._apply_seen, "QUOTA": self._apply_quota, "UNQUOTA": self._apply_unquota,
            "ANNOTATION": self._apply_annotation, "UNANNOTATION": self._apply_annotation,
            "SIEVE": self._apply_sieve, "UNSIEVE": self._apply_unsieve,
            "ACTIVATE_SIEVE": self._apply_activate_sieve,
            "UNACTIVATE_SIEVE": self._apply_unactivate_sieve,
            "DEACTIVATE_SIEVE": self._apply_unactivate_sieve,
            "FORCE": self._apply_force, "CAPABILITIES": self._apply_capabilities,
        }.get(key)
        if handler is None:
            raise CsyncNo("IMAP_PROTOCOL_ERROR", f"unknown APPLY {key}")
        if key in ("SUB", "UNSUB", "ANNOTATION", "UNANNOTATION"):
            return handler(value, key)
        return handler(value)

    # -- bodies --------------------------------------------------------------------------------
    def _apply_message(self, value) -> Reply:
        if not isinstance(value, List):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        if len(value) > MAX_FILES_PER_MESSAGE:
            raise CsyncNo("IMAP_PROTOCOL_ERROR", f"{len(value)} files in one APPLY MESSAGE")
        bodies: list[tuple[bytes, bytes]] = []   # (sha1, body)
        for item in value:
            if not isinstance(item, File):
                continue    # "XXX - complain more?" -- Cyrus skips what is not a file
            guid = item.guid
            if item.body is not None:
                data, verified = item.body, _sha1_hex(item.body) == guid
            else:
                staged = self.staged.pop(guid, None)
                if staged is None:
                    continue
                data, verified = staged.body(), staged.verified
            if not verified:
                log.warning("csync: APPLY MESSAGE body for %s does not hash to its GUID; "
                            "not stored", guid)
                continue
            bodies.append((bytes.fromhex(guid), data))
        if self.stats is not None:
            self.stats.files += len(bodies)
            self.stats.file_bytes += sum(len(d) for _, d in bodies)
        # At most two batches in flight: memory stays bounded, the pipe full.
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        todo: dict[bytes, bytes] = {}    # the bodies neither stored nor on their way
        with self.store.db.read() as txn:
            for sha1, data in bodies:
                if (sha1 not in todo and sha1 not in self._pending_guids
                        and txn.get("sha1", sha1) is None):
                    todo[sha1] = data
        for sha1, _ in bodies:
            self.reserved.add(sha1)
            self._pending_guids.add(sha1)
        if todo:
            # Compression starts now, on the store's compression threads, while
            # the writer may still be storing the previous batch.
            packed = self.store.blobs.compress_many_async(list(todo.values()))
            if self._writer is None:
                from concurrent.futures import ThreadPoolExecutor
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="csync-bodies")
            self._pending.append(self._writer.submit(self._store_bodies, todo, packed))
        return ok()

    def _store_bodies(self, todo: dict[bytes, bytes], packed) -> None:
        """Write bodies (sha1 -> body) in one transaction, once ``packed`` has compressed them."""
        store = self.store
        items = [(address_of(d), s, d) for s, d in todo.items()]

        def fn(txn):
            for (address, sha1, data), p in zip(items, packed.result()):
                store.put_body(txn, data, address, sha1, p)
        with store._lock:
            store.db.write(fn, before_commit=store.blobs.sync)

    def _apply_reserve(self, value) -> Reply:
        _, _, nodes = _required(value, PARTITION="atom", MBOXNAME="list", GUID="list")
        try:
            guids = [g.as_guid() for g in nodes]
        except Exception:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS") from None
        if len(guids) > MAX_RESERVE:
            raise CsyncNo("IMAP_PROTOCOL_ERROR", f"{len(guids)} GUIDs in one RESERVE")
        missing = []
        with self.store.db.read() as txn:
            for g in guids:
                sha1 = bytes.fromhex(g)
                if sha1 not in self._pending_guids and txn.get("sha1", sha1) is None:
                    missing.append(g)
                else:
                    self.reserved.add(sha1)
        lines = []
        if missing:
            lines.append(Line("*", "MISSING", List([wrap(g.encode()) for g in missing])))
        return ok(lines=lines)

    # -- APPLY MAILBOX ----------------------------------------------------------------------
    def _apply_mailbox(self, value) -> Reply:
        if not isinstance(value, KvList):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        try:
            inc = _IncomingMailbox.parse(value, self.sieve_mailbox)
        finally:
            failed = self._flush_or_fail() if self._pending else None
        if failed is not None:
            return failed
        try:
            cn = mapping.parse_name(inc.mboxname)
        except mapping.NameError_ as e:
            raise CsyncNo("IMAP_MAILBOX_NOTSUPPORTED", str(e)) from None
        result: list[str] = []

        def fn(m: Mutation):
            result.append(_MailboxApply(self, m, inc, cn).run())
        self.store.mutate(cn.user, fn, create_user=True)
        code = result[0]
        return ok() if code == "OK" else no(code)

    # -- renames and deletes ------------------------------------------------------------------
    def _apply_rename(self, value) -> Reply:
        if not isinstance(value, KvList):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        old = value.get_atom("OLDMBOXNAME", None)
        new = value.get_atom("NEWMBOXNAME", None)
        partition = value.get_atom("PARTITION", None)
        if not old or not new or partition is None:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        uidvalidity = value.get_num32("UIDVALIDITY", 0)
        try:
            ocn, ncn = mapping.parse_name(old), mapping.parse_name(new)
        except mapping.NameError_ as e:
            raise CsyncNo("IMAP_MAILBOX_NOTSUPPORTED", str(e)) from None
        backed = ("mailbox", "shared")
        if ncn.kind in backed:
            lost = self._restore_needs_lost_bodies(old, ocn)
            if lost is not None:
                return lost

        def fn(ms: dict[str, Mutation]):
            # One mutation per user: a folder moved between users leaves the
            # old user's mailbox a tombstone and is a new mailbox of the new
            # user, in the same transaction.
            mo, mn = ms[ocn.user], ms[ncn.user]
            txn = mo.txn
            hdr = state.mailbox_by_name(txn, old)
            mb = None
            if hdr is not None and not hdr.is_shadow:
                mb = mo.mailbox(hdr.num)
                if mb.stamp.removed:
                    mb = None
            elif hdr is None and ocn.kind in backed:
                mb = _mailbox_by_name(mo, ocn.name)
                if mb is not None:
                    hdr = _adopt(mo, mb)     # first time Cyrus sees it: keep its view too
            if hdr is None:
                raise CsyncNo("IMAP_MAILBOX_NONEXISTENT")
            if state.mailbox_by_name(txn, new) is not None:
                raise CsyncNo("UNKNOWN", f"rename target {new} exists")
            target = _mailbox_by_name(mn, ncn.name) if ncn.kind in backed else None
            if target is not None and (mb is None or target.num != mb.num):
                raise CsyncNo("UNKNOWN", f"rename target {new} exists")
            if mb is not None:
                hdr, _ = view.reconcile(txn, mo.user, mb, hdr, write=True)
            hdr.mboxname = new
            hdr.user = ncn.user
            hdr.partition = partition or hdr.partition
            # mboxlist_renamemailbox writes the new entry at the mailbox's highestmodseq
            hdr.foldermodseq = hdr.highestmodseq
            if uidvalidity > hdr.uidvalidity:
                hdr.uidvalidity = uidvalidity
            if ncn.kind not in backed:          # into DELETED.* or #sieve: Cyrus's view only
                if mb is not None:
                    _delete_modsync_mailbox(mo, mb)
                hdr.num = 0
                hdr.synced = -1
            elif mb is not None and mo is mn:   # an ordinary rename
                _rename_modsync_mailbox(mo, mb, ncn.name)
                if uidvalidity > mb.uidvalidity:
                    mb.uidvalidity = uidvalidity
                hdr.synced = mb.highestmodseq
            else:
                # moved to another user, or restored from DELETED.*
                if mb is not None:
                    _delete_modsync_mailbox(mo, mb)
                _materialize(mn, hdr, ncn.name, retired=mb)
            state.put_mailbox(txn, hdr)
        self.store.mutate_users([ocn.user, ncn.user], fn, create_user=True)
        return ok()

    def _restore_needs_lost_bodies(self, old: str, ocn) -> Reply | None:
        """A ``DELETED.*`` folder to restore whose bodies gc collected: forget it, answer NO.

        Its messages can no longer be brought back from this store, and a
        refusal alone would make the master retry the same RENAME for ever.
        Without csync's view of the deleted folder, the master's next sync
        finds the restored folder missing here and uploads it whole.
        """
        with self.store.db.read() as txn:
            hdr = state.mailbox_by_name(txn, old)
            if hdr is None or not hdr.is_shadow:
                return None
            missing = next((r for r in state.records(txn, hdr.uniqueid)
                            if not r.expunged and txn.get("sha1", r.guid) is None), None)
        if missing is None:
            return None
        log.warning("csync: cannot restore %s: body %s of UID %d was collected; forgetting "
                    "the deleted folder so that the master uploads it again", old,
                    missing.guid.hex(), missing.uid)

        def fn(m: Mutation):
            state.delete_mailbox(m.txn, hdr.uniqueid)
        self.store.mutate(ocn.user, fn, create_user=True)
        return no("IMAP_MAILBOX_NONEXISTENT")

    def _apply_unmailbox(self, value) -> Reply:
        name = value.as_atom() if value is not None else None
        if not name:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        try:
            cn = mapping.parse_name(name)
        except mapping.NameError_ as e:
            raise CsyncNo("IMAP_MAILBOX_NOTSUPPORTED", str(e)) from None

        def fn(m: Mutation):
            hdr = state.mailbox_by_name(m.txn, name)
            mb = None
            if hdr is not None and not hdr.is_shadow:
                mb = m.mailbox(hdr.num)
            elif hdr is None and cn.kind in ("mailbox", "shared"):
                mb = _mailbox_by_name(m, cn.name)
            if hdr is None and mb is None:
                raise CsyncNo("IMAP_MAILBOX_NONEXISTENT")
            if mb is not None and not mb.stamp.removed:
                _delete_modsync_mailbox(m, mb)
            if hdr is not None:
                if cn.kind == "sieve":
                    _sync_sieve_scripts(self, m, [])
                state.delete_mailbox(m.txn, hdr.uniqueid)
        self.store.mutate(cn.user, fn, create_user=True)
        return ok()

    def _apply_unuser(self, value) -> Reply:
        user = value.as_atom() if value is not None else None
        if not user:
            return ok()     # "nothing to do if there's no userid"
        with self.store.db.read() as txn:
            exists = view.user_record(txn, user) is not None
        if not exists:
            return ok()

        def fn(m: Mutation):
            txn = m.txn
            for kind, cls in ((SUBSCRIPTION, Subscription), (SEEN, SeenSet),
                              (SIEVE, SieveScript), (QUOTA, QuotaRoot)):
                for k, v in list(txn.prefix("objects", m.user.prefix + kind)):
                    obj = cls.unpack(k[5:], v)
                    if not obj.stamp.removed:
                        m.remove(obj, missing="")
            for mb in view.live_mailboxes(txn, m.user):
                _delete_modsync_mailbox(m, mb)
            for hdr in state.user_mailboxes(txn, user):
                if not hdr.is_shadow or "f" in hdr.mbtype:
                    state.delete_mailbox(txn, hdr.uniqueid)
            for k in list(txn.prefix(state.TABLE, state.K_QUOTA, values=False)):
                root = k[1:].decode()
                if mapping.user_of_internal(root) == user:
                    state.delete_quota(txn, root)
        self.store.mutate(user, fn)
        return ok()

    def _apply_expunge(self, value) -> Reply:
        if not isinstance(value, KvList):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        name = value.get_atom("MBOXNAME", None)
        uniqueid = value.get_atom("UNIQUEID", None)
        uids = value.get("UID")
        if not name or not uniqueid or not isinstance(uids, List):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        uids = [u.as_num32() for u in uids]
        cn = mapping.parse_name(name)

        def fn(m: Mutation):
            txn = m.txn
            hdr = state.get_mailbox(txn, uniqueid)
            byname = state.mailbox_by_name(txn, name)
            if byname is None:
                mb = _mailbox_by_name(m, cn.name) if cn.kind in ("mailbox", "shared") else None
                if mb is None:
                    raise CsyncNo("IMAP_MAILBOX_NONEXISTENT")
                if state.cyrus_uniqueid(txn, mb.id) != uniqueid:
                    raise CsyncNo("IMAP_MAILBOX_MOVED")
                hdr = _adopt(m, mb)
            elif byname.uniqueid != uniqueid or hdr is None:
                raise CsyncNo("IMAP_MAILBOX_MOVED")
            mb = None
            if not hdr.is_shadow:
                mb = m.mailbox(hdr.num)
                hdr, _ = view.reconcile(txn, m.user, mb, hdr, write=True)
            for uid in uids:
                rec = state.get_record(txn, uniqueid, uid)
                if rec is None or rec.expunged:
                    continue
                b, a = rec.crcs()
                hdr.crc_basic ^= b
                hdr.crc_annot ^= a
                rec.expunged = True   # silentupdate: no modseq bump
                if mb is not None:
                    r = m.record(mb, uid)
                    if r is not None and not r.stamp.removed:
                        old = r.copy()
                        r.stamp.removed = True
                        m.put_record(mb, r, old, last_updated=r.last_updated)
                        rec.msm = r.stamp.modseq
                state.put_record(txn, uniqueid, rec)
            if mb is not None:
                hdr.synced = mb.highestmodseq
            state.put_mailbox(txn, hdr)
        self.store.mutate(cn.user, fn, create_user=True)
        return ok()

    # -- per-user things ----------------------------------------------------------------------
    def _apply_sub(self, value, key: str) -> Reply:
        if not isinstance(value, KvList):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        name = value.get_atom("MBOXNAME", None)
        user = value.get_atom("USERID", None)
        if not name or not user:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        try:
            sub = _sub_modsync(user, name)
        except mapping.NameError_ as e:
            raise CsyncNo("IMAP_MAILBOX_NOTSUPPORTED", str(e)) from None

        def fn(m: Mutation):
            cur = m.get(Subscription, sub.encode())
            live = cur is not None and not cur.stamp.removed
            if key == "SUB" and not live:
                m.put_object(Subscription(sub))
            elif key == "UNSUB" and live:
                m.remove(Subscription(sub), missing="")
        self.store.mutate(user, fn, create_user=True)
        return ok()

    def _apply_seen(self, value) -> Reply:
        user, uniqueid, lastread, lastuid, lastchange, uids = _required(
            value, USERID="atom", UNIQUEID="atom", LASTREAD="date", LASTUID="num32",
            LASTCHANGE="date", SEENUIDS="atom")
        if not user or not uniqueid or uids is None:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")

        def fn(m: Mutation):
            # modsync keys seen sets by its mailbox id, which is the uniqueid
            # unless the folder was moved between users or restored
            mbid = _modsync_mailbox_id(m.txn, uniqueid)
            cur = m.get(SeenSet, mbid.encode())
            if cur is not None and not cur.stamp.removed and (
                    cur.uids, cur.lastread, cur.lastuid, cur.lastchange) == (
                    uids, lastread, lastuid, lastchange):
                return
            m.put_object(SeenSet(mbid, uids, lastread, lastuid, lastchange))
            if mbid != uniqueid:
                stale = m.get(SeenSet, uniqueid.encode())   # kept under the old id
                if stale is not None and not stale.stamp.removed:
                    m.remove(stale, missing="")
        self.store.mutate(user, fn, create_user=True)
        return ok()

    def _apply_quota(self, value) -> Reply:
        if not isinstance(value, KvList):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        root = value.get_atom("ROOT", None)
        if root is None:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        limits = {}
        legacy = value.get_num32("LIMIT", None)
        if legacy is not None and legacy != mapping.UNLIMITED32:
            limits["STORAGE"] = legacy
        for res in mapping.QUOTA_RESOURCES:
            n = value.get_num32(res, None)
            if n is not None:
                limits[res] = n
        modseq = value.get_num("MODSEQ", 0)
        try:
            user, mroot = mapping.quota_root_in(root)
        except mapping.NameError_ as e:
            raise CsyncNo("IMAP_MAILBOX_NOTSUPPORTED", str(e)) from None
        ours = {k: v for k, v in limits.items() if k in ("STORAGE", "MESSAGE")}

        def fn(m: Mutation):
            cur = m.get(QuotaRoot, mroot.encode())
            if cur is None or cur.stamp.removed or cur.limits != ours:
                m.put_object(QuotaRoot(mroot, ours))
            state.put_quota(m.txn, root, modseq, limits)
        self.store.mutate(user, fn, create_user=True)
        return ok()

    def _apply_unquota(self, value) -> Reply:
        root = value.as_atom() if value is not None else None
        if not root:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        try:
            user, mroot = mapping.quota_root_in(root)
        except mapping.NameError_ as e:
            raise CsyncNo("IMAP_MAILBOX_NOTSUPPORTED", str(e)) from None
        with self.store.db.read() as txn:
            if view.user_record(txn, user) is None:
                raise CsyncNo("UNKNOWN", f"no quota root {root}")

        def fn(m: Mutation):
            cur = m.get(QuotaRoot, mroot.encode())
            if cur is None or cur.stamp.removed:
                raise CsyncNo("UNKNOWN", f"no quota root {root}")
            m.remove(QuotaRoot(mroot), missing="")
            state.delete_quota(m.txn, root)
        self.store.mutate(user, fn)
        return ok()

    def _apply_annotation(self, value, key: str) -> Reply:
        if not isinstance(value, KvList):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        name = value.get_atom("MBOXNAME", None)
        entry = value.get_atom("ENTRY", None)
        userid = value.get_atom("USERID", None)
        val = value.get_map("VALUE", None) if key == "ANNOTATION" else b""
        if name is None or entry is None or userid is None or val is None:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        if not name:
            return ok()    # server annotations: modsync has none
        cn = mapping.parse_name(name)

        def fn(m: Mutation):
            txn = m.txn
            hdr = state.mailbox_by_name(txn, name)
            mb = None
            if hdr is not None and not hdr.is_shadow:
                mb = m.mailbox(hdr.num)
            elif hdr is None and cn.kind in ("mailbox", "shared"):
                mb = _mailbox_by_name(m, cn.name)
                if mb is not None:
                    hdr = _adopt(m, mb)
            if hdr is None:
                raise CsyncNo("IMAP_MAILBOX_NONEXISTENT")
            if mb is not None:
                hdr, _ = view.reconcile(txn, m.user, mb, hdr, write=True)
            anns = {(e, u): (mo, v) for e, u, mo, v in hdr.annotations}
            if val:
                anns[(entry, userid)] = (hdr.highestmodseq, bytes(val))
            else:
                anns.pop((entry, userid), None)
            hdr.annotations = [(e, u, mo, v) for (e, u), (mo, v) in sorted(anns.items())]
            if mb is not None:
                _set_modsync_annotation(m, mb, entry, userid, bytes(val) if val else None)
                hdr.synced = mb.highestmodseq
            state.put_mailbox(txn, hdr)
        self.store.mutate(cn.user, fn, create_user=True)
        return ok()

    # -- sieve (SIEVE mode, without SIEVE-MAILBOX) ----------------------------------------------
    def _apply_sieve(self, value) -> Reply:
        user, filename, last_update, content = _required(
            value, USERID="atom", FILENAME="atom", LAST_UPDATE="date", CONTENT="map")
        if not user or not filename or content is None:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        if not filename.endswith(".script"):
            return ok()     # only scripts; bytecode is silently ignored
        name = filename[:-len(".script")]

        def fn(m: Mutation):
            address, _ = self.store.put_body(m.txn, content)
            old = m.get(SieveScript, name.encode())
            active = bool(old and not old.stamp.removed and old.active)
            if old is not None and not old.stamp.removed and old.address == address:
                return
            m.put_object(SieveScript(name, address, len(content), active, last_update))
        self.store.mutate(user, fn, create_user=True)
        return ok()

    def _apply_unsieve(self, value) -> Reply:
        if not isinstance(value, KvList):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        user = value.get_atom("USERID", None)
        filename = value.get_atom("FILENAME", None)
        if not user or not filename:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        if not filename.endswith(".script"):
            return ok()
        name = filename[:-len(".script")]

        def fn(m: Mutation):
            cur = m.get(SieveScript, name.encode())
            if cur is None or cur.stamp.removed:
                raise CsyncNo("UNKNOWN", f"no sieve script {name}")
            m.remove(SieveScript(name), missing="")
        self.store.mutate(user, fn, create_user=True)
        return ok()

    def _apply_activate_sieve(self, value) -> Reply:
        if not isinstance(value, KvList):
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        user = value.get_atom("USERID", None)
        filename = value.get_atom("FILENAME", None)
        if not user or not filename:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        # The server strips three characters: the ".bc" of the bytecode name.
        name = filename[:-3] if len(filename) > 3 else filename
        self.store.mutate(user, lambda m: _activate(m, name), create_user=True)
        return ok()

    def _apply_unactivate_sieve(self, value) -> Reply:
        user = value.get_atom("USERID", None) if isinstance(value, KvList) else None
        if not user:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
        self.store.mutate(user, lambda m: _activate(m, None), create_user=True)
        return ok()

    # -- session settings -----------------------------------------------------------------------
    def _apply_force(self, value) -> Reply:
        self.force = True
        return ok()

    def _apply_capabilities(self, value) -> Reply:
        enabled = []
        if isinstance(value, List):
            for capa in value.atoms():
                if capa and capa.upper() == "SIEVE-MAILBOX" and self.offer_sieve_mailbox:
                    self.sieve_mailbox = True
                    enabled.append(capa)
        return ok(lines=[Line("*", "ENABLED", List(enabled))])


# =============================================================================================
# APPLY MAILBOX, step by step
# =============================================================================================

@dataclass
class _IncomingMailbox:
    uniqueid: str
    mboxname: str
    highestmodseq: int
    mbtype: str
    createdmodseq: int
    partition: str = "default"
    last_uid: int = 0
    recentuid: int = 0
    recenttime: int = 0
    last_appenddate: int = 0
    pop3_last_login: int = 0
    pop3_show_after: int = 0
    uidvalidity: int = 0
    acl: str = ""
    options: str = ""
    records: list = field(default_factory=list)
    annotations: list | None = None
    xconvmodseq: int = 0
    raclmodseq: int = 0
    foldermodseq: int = 0
    crcs: tuple = (0, 0)
    since_modseq: int = 0
    since_crcs: tuple = (0, 0)
    stub: bool = False      # intermediate or deleted entry: mboxlist only

    @classmethod
    def parse(cls, kl: KvList, sieve_mailbox: bool) -> "_IncomingMailbox":
        def req(getter, key):
            try:
                v = getter(key)
            except Exception:
                raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS", f"missing or bad {key}") from None
            if v is None:
                raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS", f"NIL {key}")
            return v

        def opt(getter, key, default=0):
            try:
                return getter(key, default)
            except Exception:
                return default

        inc = cls(req(kl.get_atom, "UNIQUEID"), req(kl.get_atom, "MBOXNAME"),
                  req(kl.get_num, "HIGHESTMODSEQ"), opt(kl.get_atom, "MBOXTYPE", "") or "",
                  opt(kl.get_num, "CREATEDMODSEQ"))
        if "f" in inc.mbtype and not sieve_mailbox:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS", "#sieve mailbox without SIEVE-MAILBOX")
        if "i" in inc.mbtype or "d" in inc.mbtype:
            inc.stub = True
            inc.foldermodseq = inc.highestmodseq
            return inc
        inc.partition = req(kl.get_atom, "PARTITION")
        inc.last_uid = req(kl.get_num32, "LAST_UID")
        inc.recentuid = req(kl.get_num32, "RECENTUID")
        inc.recenttime = req(kl.get_date, "RECENTTIME")
        inc.last_appenddate = req(kl.get_date, "LAST_APPENDDATE")
        inc.pop3_last_login = req(kl.get_date, "POP3_LAST_LOGIN")
        inc.uidvalidity = req(kl.get_num32, "UIDVALIDITY")
        inc.acl = req(kl.get_atom, "ACL")
        inc.options = req(kl.get_atom, "OPTIONS")
        try:
            rl = kl.get_list("RECORD")
        except Exception:
            raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS", "missing RECORD") from None
        ann = kl.get("ANNOTATIONS")
        if ann is not None:
            if not isinstance(ann, List):
                raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS", "ANNOTATIONS is not a list")
            try:
                inc.annotations = sorted(view.parse_annotations(ann.node))
            except view.BadRecord as e:
                raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS", str(e)) from None
        inc.pop3_show_after = opt(kl.get_date, "POP3_SHOW_AFTER")
        inc.xconvmodseq = opt(kl.get_num, "XCONVMODSEQ")
        inc.raclmodseq = opt(kl.get_num, "RACLMODSEQ")
        inc.foldermodseq = opt(kl.get_num, "FOLDERMODSEQ")
        inc.crcs = (opt(kl.get_num32, "SYNC_CRC"), opt(kl.get_num32, "SYNC_CRC_ANNOT"))
        inc.since_modseq = opt(kl.get_num, "SINCE_MODSEQ")
        inc.since_crcs = (opt(kl.get_num32, "SINCE_CRC"), opt(kl.get_num32, "SINCE_CRC_ANNOT"))
        try:
            inc.records = [view.parse_record(n) for n in rl.node[1:]]
        except view.BadRecord as e:
            # parse_upload failing inside compare_update: IMAP_PROTOCOL_ERROR
            raise CsyncNo("IMAP_PROTOCOL_ERROR", str(e)) from None
        return inc


class _MailboxApply:
    """sync_apply_mailbox() against a modsync store, inside one mutation."""

    def __init__(self, session: ReplicaSession, m: Mutation, inc: _IncomingMailbox,
                 cn: mapping.CyrusName):
        self.s = session
        self.m = m
        self.txn = m.txn
        self.inc = inc
        self.cn = cn
        self.backed = cn.kind in ("mailbox", "shared")   # a modsync mailbox holds it

    def run(self) -> str:
        inc, txn = self.inc, self.txn
        hdr, mb = self._existing()
        if inc.stub:
            return self._stub(hdr)
        created = False
        if hdr is None:
            other = state.get_mailbox(txn, inc.uniqueid)
            if other is not None and other.mboxname != inc.mboxname:
                raise CsyncNo("IMAP_MAILBOX_MOVED", f"{inc.uniqueid} is {other.mboxname}")
            found = view.mailbox_by_uniqueid(txn, inc.uniqueid)
            if found is not None and not found[1].stamp.removed:
                raise CsyncNo("IMAP_MAILBOX_MOVED", f"{inc.uniqueid} is in use")
            hdr, mb = self._create()
            created = True
        elif hdr.uniqueid != inc.uniqueid:
            if not (self.s.force or hdr.last_uid == 0):
                raise CsyncNo("IMAP_MAILBOX_MOVED", "mailbox uniqueid changed - retry")
            # Replace the never-used (or forced) mailbox.
            if mb is not None:
                _delete_modsync_mailbox(self.m, mb)
            state.delete_mailbox(txn, hdr.uniqueid)
            hdr, mb = self._create()
            created = True
        if mb is not None and not created:
            hdr, _ = view.reconcile(txn, self.m.user, mb, hdr, write=True)

        # The precondition of a delta: the master's idea of us must be right.
        if inc.since_modseq:
            # (a mailbox created just now has highestmodseq 0, as in Cyrus)
            if inc.since_modseq != hdr.highestmodseq or not view.crceq(
                    inc.since_crcs, (hdr.crc_basic, hdr.crc_annot)):
                return "IMAP_SYNC_CHANGED"
        if _mbtype_sync(hdr.mbtype) != _mbtype_sync(inc.mbtype) and not created:
            return "UNKNOWN"     # IMAP_MAILBOX_BADTYPE
        force = self.s.force
        if not created:
            if inc.highestmodseq < hdr.highestmodseq and not force:
                return "IMAP_SYNC_CHECKSUM"
            if inc.uidvalidity < hdr.uidvalidity and not force:
                return "IMAP_SYNC_CHECKSUM"
            if inc.last_uid < hdr.last_uid and not force:
                return "IMAP_SYNC_CHECKSUM"

        # First pass: read only.  Stored records are looked at as field lists.
        stored = state.MailboxRecords(txn, hdr.uniqueid)
        plan = []
        last = 0
        for rec in inc.records:
            if rec.uid <= last:
                raise CsyncNo("IMAP_PROTOCOL_ERROR", "RECORD not in ascending UID order")
            last = rec.uid
            local = None if created else stored.fields(rec.uid)
            if local is not None:
                if rec.expunged and local[state.F_EXPUNGED]:
                    continue
                if rec.guid != local[state.F_GUID]:
                    return "IMAP_SYNC_CHECKSUM"
                if local[state.F_MODSEQ] > rec.modseq and not force:
                    return "IMAP_SYNC_CHECKSUM"
                if local[state.F_EXPUNGED] and not rec.expunged:
                    return "IMAP_SYNC_CHECKSUM"
                rec.msm = local[state.F_MSM]
                if rec.fields() == local[:state.F_CRCS]:
                    continue    # sent again as it is here (a full update): nothing to do
                plan.append((rec, stored.crcs(rec.uid, local)))
            elif rec.uid <= hdr.last_uid:
                if not rec.expunged:
                    return "IMAP_SYNC_CHECKSUM"
            else:
                plan.append((rec, None))
        if rec_uid_above(inc.records, inc.last_uid) and not force:
            # Cyrus asserts here (a RECORD above LAST_UID); refuse instead.
            raise CsyncNo("IMAP_PROTOCOL_ERROR", "RECORD with UID above LAST_UID")
        # Bodies of new live messages must be here before anything is written.
        addresses = {}
        for rec, old_shares in plan:
            if old_shares is None and not rec.expunged and rec.guid not in addresses:
                address = txn.get("sha1", rec.guid)
                if address is None:
                    raise CsyncNo("UNKNOWN", f"no body for {rec.guid.hex()}: upload it first")
                addresses[rec.guid] = address

        # Commit.
        self._header(hdr, created)
        if mb is not None:
            _set_folder_meta(self.m, mb, inc.acl, inc.annotations)
        basic, annot = hdr.crc_basic, hdr.crc_annot
        # A mailbox made just now has no records to look up.
        fresh = created and mb is not None and mb.uidnext == 1
        for rec, old_shares in plan:
            if old_shares is not None:
                basic ^= old_shares[0]
                annot ^= old_shares[1]
            shares = rec.crcs()
            basic ^= shares[0]
            annot ^= shares[1]
            if mb is not None:
                _put_modsync_record(self.m, mb, rec, addresses.get(rec.guid), fresh)
            stored.put(rec, shares)
        hdr.crc_basic, hdr.crc_annot = basic, annot
        if mb is not None:
            if mb.uidnext <= inc.last_uid:
                mb.uidnext = inc.last_uid + 1
                self.m.touch_mailbox(mb)
            if inc.uidvalidity > mb.uidvalidity:
                mb.uidvalidity = inc.uidvalidity
                _raise_uidvalidity_floor(self.m, mb.name, mb.uidvalidity)
                self.m.folder_changed(mb)
            hdr.synced = mb.highestmodseq
        state.put_mailbox(txn, hdr)
        if self.cn.kind == "sieve":
            _sync_sieve_scripts(self.s, self.m, state.records(txn, hdr.uniqueid))
        if not view.crceq(inc.crcs, (hdr.crc_basic, hdr.crc_annot)):
            log.info("csync: %s: CRCs after apply %d/%d, master says %d/%d", inc.mboxname,
                     hdr.crc_basic, hdr.crc_annot, *inc.crcs)
            return "IMAP_SYNC_CHECKSUM"
        return "OK"

    # -- helpers ----------------------------------------------------------------------------
    def _existing(self) -> tuple[CyrusMailbox | None, Mailbox | None]:
        txn, inc = self.txn, self.inc
        hdr = state.mailbox_by_name(txn, inc.mboxname)
        mb = None
        if hdr is not None:
            if not hdr.is_shadow:
                mb = self.m.mailbox(hdr.num)
                if mb.stamp.removed:
                    # deleted in modsync behind Cyrus's back: forget the view
                    state.delete_mailbox(txn, hdr.uniqueid)
                    hdr, mb = None, None
        elif self.backed:
            mb = _mailbox_by_name(self.m, self.cn.name)
            if mb is not None:
                hdr = _adopt(self.m, mb)
        return hdr, mb

    def _create(self) -> tuple[CyrusMailbox, Mailbox | None]:
        inc = self.inc
        mb = None
        if self.backed:
            mb = _create_modsync_mailbox(self.m, self.cn.name, inc.uniqueid, inc.uidvalidity)
        hdr = CyrusMailbox(uniqueid=inc.uniqueid, mboxname=inc.mboxname, user=self.cn.user,
                           mbtype=inc.mbtype, partition=inc.partition, acl=inc.acl,
                           options=inc.options, uidvalidity=inc.uidvalidity,
                           createdmodseq=inc.createdmodseq, foldermodseq=inc.foldermodseq,
                           num=mb.num if mb is not None else 0)
        return hdr, mb

    def _stub(self, hdr: CyrusMailbox | None) -> str:
        inc = self.inc
        if hdr is None:
            hdr = CyrusMailbox(uniqueid=inc.uniqueid, mboxname=inc.mboxname, user=self.cn.user)
        elif not hdr.is_shadow:
            return "OK"    # a real mailbox here; Cyrus would just rewrite its mboxlist entry
        hdr.mbtype = inc.mbtype
        hdr.foldermodseq = inc.highestmodseq
        hdr.createdmodseq = inc.createdmodseq
        state.put_mailbox(self.txn, hdr)
        return "OK"

    def _header(self, hdr: CyrusMailbox, created: bool) -> None:
        inc = self.inc
        hdr.mbtype = inc.mbtype
        hdr.partition = inc.partition
        hdr.acl = inc.acl
        hdr.annotations = list(inc.annotations or [])
        hdr.last_uid = inc.last_uid
        hdr.recentuid = inc.recentuid
        hdr.highestmodseq = inc.highestmodseq
        hdr.recenttime = inc.recenttime
        hdr.last_appenddate = inc.last_appenddate
        hdr.pop3_last_login = inc.pop3_last_login
        hdr.pop3_show_after = inc.pop3_show_after
        hdr.createdmodseq = inc.createdmodseq
        hdr.options = inc.options
        if inc.uidvalidity > hdr.uidvalidity:
            hdr.uidvalidity = inc.uidvalidity
        hdr.xconvmodseq = max(hdr.xconvmodseq, inc.xconvmodseq)
        if inc.raclmodseq:
            hdr.raclmodseq = inc.raclmodseq
        hdr.foldermodseq = inc.foldermodseq or inc.highestmodseq


def _set_folder_meta(m: Mutation, mb: Mailbox, acl: str, annotations) -> None:
    """ACL and mailbox annotations: always the master's (they are not versioned)."""
    txn = m.txn
    want = dict(mapping.parse_acl(acl))
    have = view.acl_entries(txn, m.user, mb)
    for who, rights in want.items():
        rights = _canon_rights(rights)
        if have.get(who) != rights:
            m.put_object(AclEntry(mb.num, who, rights), mailbox=mb)
    for who in have:
        if who not in want:
            m.remove(AclEntry(mb.num, who), mailbox=mb, missing="")
    want_ann = {(e, u): v for e, u, _m, v in (annotations or [])}
    have_ann = {(a.entry, a.userid): bytes(a.value)
                for a in view.mailbox_annotations(txn, m.user, mb)}
    for (e, u), v in want_ann.items():
        if have_ann.get((e, u)) != v:
            _set_modsync_annotation(m, mb, e, u, v)
    for (e, u) in have_ann:
        if (e, u) not in want_ann:
            _set_modsync_annotation(m, mb, e, u, None)


def _put_modsync_record(m: Mutation, mb: Mailbox, rec: CyrusRecord, address: bytes | None,
                        fresh: bool) -> None:
    """Make the modsync record what Cyrus's record says (``fresh``: mb has no records).

    Sets ``rec.msm`` to the modsync record's stamp modseq.
    """
    old = None if fresh else m.record(mb, rec.uid)
    anns = tuple(sorted((e, u, bytes(v)) for e, u, _m, v in rec.annotations)
                 ) if rec.annotations else ()
    flags = normalized_flags(rec.flags)
    if old is None:
        if address is None:
            address = m.txn.get("sha1", rec.guid)
        if address is None:
            return      # expunged before we ever had its body: Cyrus's view only
        new = Record(rec.uid, address, rec.guid, rec.size, rec.internaldate,
                     savedate=rec.savedate, flags=flags, createdmodseq=m.modseq,
                     annotations=anns, stamp=Stamp(removed=rec.expunged))
        m.put_record(mb, new, None, last_updated=rec.last_updated)
        rec.msm = new.stamp.modseq
        return
    if old.stamp.removed:
        rec.msm = old.stamp.modseq
        return
    if (old.flags == flags and old.annotations == anns and not rec.expunged
            and old.internaldate == rec.internaldate and old.savedate == rec.savedate
            and old.last_updated == rec.last_updated):
        rec.msm = old.stamp.modseq
        return
    cur = old.copy()
    cur.flags = flags
    cur.annotations = anns
    cur.internaldate = rec.internaldate
    cur.savedate = rec.savedate
    if rec.expunged:
        cur.stamp.removed = True
    m.put_record(mb, cur, old, last_updated=rec.last_updated)
    rec.msm = cur.stamp.modseq


def rec_uid_above(records, last_uid: int) -> bool:
    return bool(records) and records[-1].uid > last_uid


_mbtype_sync = view._mbtype_key


def _canon_rights(rights: str) -> str:
    from ..store import ACL_RIGHTS
    known = [c for c in rights if c in ACL_RIGHTS]
    return "".join(sorted(set(known), key=ACL_RIGHTS.index))


# =============================================================================================
# modsync-side helpers (all inside a Mutation)
# =============================================================================================

def _required(value, **kinds) -> list:
    """A kvlist's fields, each read with its getter (``USERID="atom"``: get_atom).

    Not a kvlist, a field missing or malformed: IMAP_PROTOCOL_BAD_PARAMETERS,
    Cyrus's answer.
    """
    if not isinstance(value, KvList):
        raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS")
    try:
        return [getattr(value, "get_" + kind)(key) for key, kind in kinds.items()]
    except Exception:
        raise CsyncNo("IMAP_PROTOCOL_BAD_PARAMETERS") from None


def _modsync_mailbox_id(txn, uniqueid: str) -> str:
    """The id of the modsync mailbox holding Cyrus mailbox ``uniqueid`` (else uniqueid)."""
    hdr = state.get_mailbox(txn, uniqueid)
    if hdr is not None and not hdr.is_shadow:
        u = view.user_record(txn, hdr.user)
        mb = view.mailbox_by_num(txn, u, hdr.num) if u is not None else None
        if mb is not None:
            return mb.id
    return uniqueid


def _mailbox_by_name(m: Mutation, name: str) -> Mailbox | None:
    raw = m.txn.get("index", IX_NAME + m.user.prefix + name.encode())
    return None if raw is None else m.mailbox(U64.unpack(raw)[0])


def _adopt(m: Mutation, mb: Mailbox) -> CyrusMailbox:
    """Start keeping a Cyrus view of a modsync mailbox no Cyrus master has written yet."""
    hdr = state.header_of(m.txn, mb)
    if hdr is not None:
        return hdr
    hdr, recs = view.synthesize(m.txn, m.user, mb)
    for r in recs:
        state.put_record(m.txn, mb.id, r)
    state.put_mailbox(m.txn, hdr)
    return hdr


def _raise_uidvalidity_floor(m: Mutation, name: str, uidvalidity: int) -> None:
    vkey = IX_UIDVALIDITY + m.user.prefix + name.encode()
    prev = m.txn.get("index", vkey)
    if prev is None or U32.unpack(prev)[0] < uidvalidity:
        m.txn.put("index", vkey, U32.pack(uidvalidity))


def _create_modsync_mailbox(m: Mutation, name: str, uniqueid: str, uidvalidity: int,
                            retired: Mailbox | None = None) -> Mailbox:
    """A new modsync mailbox for Cyrus mailbox ``uniqueid`` (with its uidvalidity if legal).

    Its id is Cyrus's uniqueid, unless a deleted modsync mailbox (of any
    user) has that id: a folder moved between users, brought back from
    ``DELETED.*``, or recreated by the master.  modsync never revives a
    tombstone (its messages stay expunged for whoever saw them go), so the
    mailbox gets an id of its own, csync remembers which Cyrus mailbox it is,
    and its uidvalidity is raised above the name's earlier ones if needed.
    ``retired`` is a mailbox being deleted in this same transaction.
    """
    from .. import crc as cyrus_crc
    from ..store import new_unique_id
    txn = m.txn
    found = view.mailbox_by_uniqueid(txn, uniqueid)
    if (found is not None and not found[1].stamp.removed
            and (retired is None or found[1].num != retired.num)):
        raise CsyncNo("IMAP_MAILBOX_MOVED", f"unique id {uniqueid} is in use")
    mbid = uniqueid
    if found is not None:
        mbid = new_unique_id()
        state.put_alias(txn, mbid, uniqueid)
    vkey = IX_UIDVALIDITY + m.user.prefix + name.encode()
    floor = txn.get("index", vkey)
    if floor is not None and uidvalidity <= U32.unpack(floor)[0]:
        uidvalidity = U32.unpack(floor)[0] + 1
    num = m.store._next_mailbox_num(txn)
    mb = Mailbox(mbid, name, uidvalidity, uidnext=1, createdmodseq=m.modseq,
                 cyrus_crc=cyrus_crc.CRC_INIT_BASIC,
                 cyrus_crc_annot=cyrus_crc.CRC_INIT_ANNOT, num=num)
    m.add_mailbox(mb)
    txn.put("index", IX_UNIQUEID + mbid.encode(), m.user.prefix + U64.pack(num))
    txn.put("index", IX_NAME + m.user.prefix + name.encode(), U64.pack(mb.num))
    txn.put("index", vkey, U32.pack(mb.uidvalidity))     # above the floor read above
    return mb


def _materialize(m: Mutation, hdr: CyrusMailbox, name: str,
                 retired: Mailbox | None = None) -> Mailbox:
    """A modsync mailbox ``name`` holding what csync's view ``hdr`` of a Cyrus mailbox holds.

    For a Cyrus mailbox that gets a modsync mailbox without an APPLY
    MAILBOX bringing its records: one moved from another user, or one
    restored from ``DELETED.*``.  Its live records are copied from csync's
    view (their bodies must still be in the store), its ACL and mailbox
    annotations too; ``hdr`` then describes the new mailbox.
    """
    txn = m.txn
    recs = state.records(txn, hdr.uniqueid)
    addresses = {}
    for rec in recs:
        if not rec.expunged and rec.guid not in addresses:
            address = txn.get("sha1", rec.guid)
            if address is None:
                raise CsyncNo("UNKNOWN", f"{hdr.mboxname}: the body {rec.guid.hex()} of UID "
                              f"{rec.uid} is no longer in this store (collected by gc)")
            addresses[rec.guid] = address
    mb = _create_modsync_mailbox(m, name, hdr.uniqueid, hdr.uidvalidity, retired)
    _set_folder_meta(m, mb, hdr.acl, hdr.annotations)
    for rec in recs:
        if not rec.expunged:
            _put_modsync_record(m, mb, rec, addresses[rec.guid], True)
            state.put_record(txn, hdr.uniqueid, rec, rec.crcs())
    if mb.uidnext <= hdr.last_uid:
        mb.uidnext = hdr.last_uid + 1
        m.touch_mailbox(mb)
    hdr.num = mb.num
    hdr.synced = mb.highestmodseq
    return mb


def _delete_modsync_mailbox(m: Mutation, mb: Mailbox) -> None:
    key = IX_NAME + m.user.prefix + mb.name.encode()
    raw = m.txn.get("index", key)
    if raw is not None and U64.unpack(raw)[0] == mb.num:
        m.txn.delete("index", key)
    m.remove_mailbox(mb)


def _rename_modsync_mailbox(m: Mutation, mb: Mailbox, new: str) -> None:
    """Rename one mailbox (Cyrus renames each mailbox of a tree with its own RENAME)."""
    if mb.name == new:
        return
    txn = m.txn
    if txn.get("index", IX_NAME + m.user.prefix + new.encode()) is not None:
        raise CsyncNo("UNKNOWN", f"mailbox {new!r} exists")
    key = IX_NAME + m.user.prefix + mb.name.encode()
    raw = txn.get("index", key)
    if raw is not None and U64.unpack(raw)[0] == mb.num:
        txn.delete("index", key)
    txn.put("index", IX_NAME + m.user.prefix + new.encode(), U64.pack(mb.num))
    _raise_uidvalidity_floor(m, new, mb.uidvalidity)
    mb.name = new
    m.folder_changed(mb)


def _set_modsync_annotation(m: Mutation, mb: Mailbox, entry: str, userid: str,
                            value: bytes | None) -> None:
    cur = m.get(Annotation, U64.pack(mb.num) + entry.encode() + b"\0" + userid.encode())
    live = cur is not None and not cur.stamp.removed
    if value is None:
        if live:
            m.remove(Annotation(mb.num, entry, userid), mailbox=mb, missing="")
    elif not live or bytes(cur.value) != value:
        m.put_object(Annotation(mb.num, entry, userid, value), mailbox=mb)
    if entry == "/specialuse":
        mb.specialuse = tuple(value.decode(errors="replace").split()) if value else ()
        m.folder_changed(mb)


def _activate(m: Mutation, name: str | None) -> None:
    for k, v in list(m.txn.prefix("objects", m.user.prefix + SIEVE)):
        s = SieveScript.unpack(k[5:], v)
        if s.stamp.removed:
            continue
        want = s.name == name
        if s.active != want:
            s.active = want
            m.put_object(s)


def _sync_sieve_scripts(session: ReplicaSession, m: Mutation, records: list[CyrusRecord]) -> None:
    """Make modsync's sieve scripts what the #sieve folder's live messages say."""
    txn = m.txn
    want: dict[str, tuple[bytes, bool, int]] = {}
    for rec in sorted(records, key=lambda r: r.uid):
        if rec.expunged:
            continue
        body = session._body_by_sha1(txn, rec.guid)
        if body is None:
            log.warning("csync: #sieve message %s has no body here", rec.guid.hex())
            continue
        try:
            sm = mapping.parse_sieve_message(body)
        except mapping.NameError_ as e:
            log.warning("csync: #sieve message %s: %s", rec.guid.hex(), e)
            continue
        want[sm.name] = (sm.script, "\\Flagged" in rec.flags, rec.internaldate)
    have = {}
    for k, v in list(txn.prefix("objects", m.user.prefix + SIEVE)):
        s = SieveScript.unpack(k[5:], v)
        if not s.stamp.removed:
            have[s.name] = s
    for name, (script, active, date) in want.items():
        address, _ = session.store.put_body(txn, script)
        cur = have.get(name)
        if cur is None or cur.address != address or cur.active != active:
            m.put_object(SieveScript(name, address, len(script), active, date))
    for name in have:
        if name not in want:
            m.remove(SieveScript(name), missing="")


# =============================================================================================
# small things
# =============================================================================================

# A sync_client authenticates once per connection, and rolling or per-user
# runs connect often; scrypt costs ~0.1-0.3 s a check.  Successful checks are
# remembered for a while, keyed by an HMAC of the password under a key that
# never leaves this process, and only while the account's stored record is
# byte-for-byte the one that was checked (a changed password or a removed
# account is noticed at once).
AUTH_CACHE_SECONDS = 600
_AUTH_KEY = os.urandom(32)
_auth_cache: dict[tuple[str, str, bytes], tuple[bytes, object, float]] = {}
_auth_lock = threading.Lock()


def _plain_credentials(b64: bytes) -> tuple[str, str, str] | None:
    """(authzid, authcid, password) of a SASL PLAIN response, None if it is malformed."""
    try:
        data = b"" if b64 == b"=" else base64.b64decode(b64, validate=True)
        authzid, authcid, password = data.split(b"\0")
        return authzid.decode(), authcid.decode(), password.decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def _remembered(store, name: str, password: str):
    """(account record bytes, cache key, the account if this check is remembered, else None)."""
    with store.db.read() as txn:
        raw = txn.get("accounts", name.encode())
    if raw is None:
        return None, None, None
    key = (str(store.path), name, hmac.new(_AUTH_KEY, password.encode("utf-8", "surrogatepass"),
                                           hashlib.sha256).digest())
    with _auth_lock:
        hit = _auth_cache.get(key)
    if hit is not None and hit[0] == raw and hit[2] > time.monotonic():
        return raw, key, hit[1]
    return raw, key, None


def _check_password(store, name: str, password: str):
    raw, key, account = _remembered(store, name, password)
    if raw is None:
        return check_password(store, name, password)
    if account is not None:
        return account
    now = time.monotonic()
    account = check_password(store, name, password)
    if account is not None:
        with _auth_lock:
            if len(_auth_cache) > 1024:
                _auth_cache.clear()
            _auth_cache[key] = (raw, account, now + AUTH_CACHE_SECONDS)
    return account


_SIMPLE = frozenset(("AUTHENTICATE", "COMPRESS", "EXIT", "NOOP", "RESTART", "STARTTLS",
                     "GET", "APPLY", "RESTORE"))


def _looks_like_tag(verb: str) -> bool:
    """IMAP tags a sync_client probe uses: C01, A01, S01, Z01, N01, Q01."""
    return len(verb) == 3 and verb[0].isalpha() and verb[1:].isdigit()


def _sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _sub_modsync(user: str, internal: str) -> str:
    """A subscription's modsync name: the user's own mailbox name, or the internal name."""
    cn = mapping.parse_name(internal)
    if cn.kind in ("mailbox", "shared") and cn.user == user:
        return cn.name
    # Another user's (or a shared) folder: keep Cyrus's name, under a prefix no
    # modsync mailbox name of this user can have.
    return "\u2063cyrus/" + internal


def _sub_internal(user: str, name: str) -> str:
    if name.startswith("\u2063cyrus/"):
        return name[len("\u2063cyrus/"):]
    return mapping.internal_name(user, name)


def _quota_pairs(root: str, limits: dict, modseq: int) -> list:
    pairs = [("ROOT", root),
             ("LIMIT", limits.get("STORAGE", mapping.UNLIMITED32))]
    for res in mapping.QUOTA_RESOURCES:
        if res in limits and limits[res] >= 0:
            pairs.append((res, limits[res]))
    pairs.append(("MODSEQ", modseq))
    return pairs
