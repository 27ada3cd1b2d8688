"""The archive service of `modsync serve --archives DIR`: backups pushed over the network.

The server answers the messages of ``engine.archive_protocol`` with the
archives DIR/NAME (each created by the first backup pushed to NAME).  Who
may do what is the account's kind (``engine.accounts``):

* an **admin** account may do everything: add points, list them, compact;
* an **append-only** account may add points and list them, nothing else:
  every request that would remove or rewrite something (compaction: it
  drops points and deletes bodies) is refused with ``append-only`` before
  anything is touched, and the archive is opened append-only for it
  (``Archive.view(append_only=True)``), so no code path reachable from its
  requests can remove anything either;
* any other account is refused (``acl``).

Whatever the account, what a client sends is checked as if hostile: a
point must continue the archive's last point of its user (or be a full
one), its change set must decode with every check, and every body it adds
must hash to its address.  The server numbers and times points itself; no
request names an existing point or body, so nothing can be overwritten.  A
locked archive (``--admin-key-file``) stays append-only for every account
unless a compaction request brings the key.

``ArchiveService`` does the work (blocking: the server runs it in worker
threads); ``dispatch`` is the asyncio glue ``engine.server`` calls for each
request.  One index handle per archive is kept open for the server's
lifetime (LMDB must not be opened twice by one process); every request gets
its own ``Archive.view`` with its own writer lock, so two backups into one
archive at once get ``archive-busy`` for the second, not a corrupt index.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from . import archive_protocol as A
from . import names
from . import protocol as P
from .acl import AclDenied
from .archive import AppendOnly, Archive, NotAnArchive
from .backup import RetentionPolicy, compact, list_points, write_point
from .changeset import ChangeSet, vv_le
from .errors import ModsyncError, UsageError

log = logging.getLogger("modsync.server.archives")


class NoArchives(ModsyncError):
    """The server was not started with --archives."""

    code = "no-archives"


class DoesNotContinue(ModsyncError):
    """A pushed change set does not start from the archive's last point of its user."""

    code = "does-not-continue"


def may_use_archives(account) -> None:
    """AclDenied unless ``account`` is an admin or append-only account."""
    if not (account.admin or account.append_only):
        raise AclDenied(f"account {account.name!r} may not use this server's archives: only "
                        f"admin accounts and accounts made with `modsync account add "
                        f"--append-only` may", subject=account.name)


def _norm(vv: dict) -> dict:
    return {o: n for o, n in vv.items() if n}


class ArchiveService:
    """The archives in one directory, as a server's accounts may use them."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise UsageError(f"--archives {root}: no such directory; create it (archives are "
                             f"made inside it on their first backup)", subject=str(root))
        self._open: dict[str, Archive] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for a in self._open.values():
                a.close()
            self._open.clear()

    # -- handles ---------------------------------------------------------------------------
    def handle(self, account, name: str, *, create: bool = False,
               admin_key: bytes | None = None) -> tuple[Archive, bool]:
        """(a handle on archive ``name`` for ``account``, whether it was created now)."""
        may_use_archives(account)
        A.archive_name("archive", name)
        created = False
        with self._lock:
            base = self._open.get(name)
            if base is None:
                path = self.root / name
                if create and not path.exists():
                    base = Archive.create(path)
                    created = True
                    log.info("created archive %s for account %s", name, account.name)
                else:
                    try:
                        base = Archive.open(path)
                    except NotAnArchive:
                        raise NotAnArchive(
                            f"this server holds no archive {name!r}; the first backup to it "
                            f"creates it (modsync backup --to modsync://HOST:PORT/{name})",
                            subject=name) from None
                self._open[name] = base
        reason = (f"account {account.name!r} is append-only: it may add points to archive "
                  f"{name!r}, never compact it, delete or rewrite anything in it; use an "
                  f"admin account") if account.append_only else None
        try:
            view = base.view(append_only=account.append_only, reason=reason,
                             admin_key=admin_key)
        except AppendOnly:
            raise AppendOnly(f"archive {name!r}: the admin key does not match the archive's",
                             subject=name) from None
        except UsageError:
            raise UsageError(f"archive {name!r} is not locked with an admin key; do not send "
                             f"one", subject=name) from None
        return view, created

    # -- requests ------------------------------------------------------------------------------
    def info(self, account, name: str, *, create: bool = False) -> dict:
        h, created = self.handle(account, name, create=create)
        try:
            return {"id": h.id, "created": created, "append_only": h.append_only,
                    "locked": h.locked}
        finally:
            h.close()

    def points(self, account, name: str, user: str | None, *, last: bool = False) -> dict:
        h, _ = self.handle(account, name)
        try:
            listing = list_points(h, names.user(user) if user is not None else None, last=last,
                                  states=True)
        finally:
            h.close()
        listing.pop("archive")          # the server's path is none of the client's business
        return listing

    def missing(self, account, name: str, addresses) -> list[bytes]:
        h, _ = self.handle(account, name)
        try:
            return h.missing_bodies(addresses)
        finally:
            h.close()

    def add_point(self, account, name: str, user: str, modseq: int, cs: ChangeSet,
                  get_body, *, items_checked: bool = False) -> tuple[dict, int, bool]:
        """Check a pushed change set and store it as ``user``'s next point:
        (the backup's entry for the user, bytes written, whether the archive was created).

        ``items_checked``: the items were decoded with every field checked
        (protocol version 3 does that as they arrive).
        """
        user = names.user(user)
        if not items_checked:
            # Items off a version 1-2 wire carry only the DLIST shape; a point
            # is decoded later without checks (archive.decode_point_payload),
            # so check now.
            cs = ChangeSet.decode(cs.encode())
        h, created = self.handle(account, name, create=True)
        try:
            last = h.last_point(user)
            base = _norm(cs.base)
            if base and (last is None or base != _norm(last.state)):
                where = f"point {last.point}" if last is not None else "none: send a full one"
                raise DoesNotContinue(
                    f"the change set for {user!r} does not start from the state of the "
                    f"archive's last point of that user ({where}); ask for it again "
                    f"(ARCHIVEPOINTS LAST) and send the changes since it", subject=user)
            if not vv_le(base, cs.state):
                raise DoesNotContinue(f"the change set for {user!r} ends in a state that does "
                                      f"not include the one it starts from", subject=user)
            if last is not None and base and (cs.is_empty() or cs.state == last.state):
                return {"user": user, "point": None, "unchanged": True}, 0, created
            w = h.writer()
            try:
                entry = write_point(h, w, user, cs, base=base, modseq=modseq, get_body=get_body,
                                    checked=False)
                return entry, w.bytes_written, created
            finally:
                w.close()
        finally:
            h.close()

    def compact(self, account, name: str, policy: RetentionPolicy, *, users=None,
                dry_run: bool = False, repack_unused: float = 0.05,
                admin_key: bytes | None = None) -> dict:
        if account.append_only and not dry_run:
            raise AppendOnly(f"account {account.name!r} is append-only: it may add points to "
                             f"archive {name!r}, never compact it (compaction drops points and "
                             f"deletes bodies); nothing was changed", subject=name)
        h, _ = self.handle(account, name, admin_key=admin_key)
        try:
            report = compact(h, policy, users=users, dry_run=dry_run,
                             repack_unused=repack_unused)
        finally:
            h.close()
        out = report.as_dict()
        out.pop("archive")
        out.pop("policy")               # the client's own, with floats the wire does not carry
        out["ms"] = round(out.pop("seconds") * 1000)
        return out


def policy_from_wire(keep: dict) -> RetentionPolicy:
    seconds = keep.get("seconds")
    return RetentionPolicy(keep_days=None if seconds is None else seconds / 86400,
                           keep_last=keep.get("last") or None,
                           keep_daily=keep.get("daily") or None,
                           keep_weekly=keep.get("weekly") or None,
                           keep_monthly=keep.get("monthly") or None)


# -- the asyncio side ------------------------------------------------------------------------
async def dispatch(session, ev: A.ArchiveRequest) -> None:
    """Answer one archive request on a server ``Session`` (engine.server).

    Refusals are answered NO and the connection carries on; a break of the
    protocol itself (engine.protocol.ProtocolError) ends it, as for any command.
    """
    if isinstance(ev, A.ArchivePush):
        await _push(session, ev)
        return
    try:
        reply = await _answer(session, _service(session), ev)
    except P.ProtocolError:
        raise
    except ModsyncError as e:
        await _refuse(session, ev, e)
        return
    await session.send(reply)


def _service(session) -> ArchiveService:
    service = session.server.archives
    if service is None:
        raise NoArchives("this server holds no archives; start it with --archives DIR (or "
                         "[serve] archives in its config file)")
    return service


async def _answer(session, service: ArchiveService, ev: A.ArchiveRequest) -> P.Event:
    account = session.account
    if isinstance(ev, A.ArchiveOpen):
        d = await asyncio.to_thread(service.info, account, ev.archive, create=ev.create)
        return A.ArchiveInfo(ev.archive, d["id"], d["created"], d["append_only"], d["locked"])
    if isinstance(ev, A.ArchivePoints):
        listing = await asyncio.to_thread(service.points, account, ev.archive, ev.user,
                                          last=ev.last)
        return A.PointList(ev.archive, listing)
    if isinstance(ev, A.ArchiveMissing):
        lacking = await asyncio.to_thread(service.missing, account, ev.archive, ev.bodies)
        return A.MissingBodies(ev.archive, tuple(lacking))
    if isinstance(ev, A.ArchiveCompact):
        report = await asyncio.to_thread(
            service.compact, account, ev.archive, policy_from_wire(ev.keep),
            users=list(ev.users) if ev.users is not None else None, dry_run=ev.dry_run,
            repack_unused=ev.repack / A.PPM, admin_key=ev.admin_key)
        log.info("%s (%s): compacted archive %s%s", session.peer, account.name, ev.archive,
                 " (dry run)" if ev.dry_run else "")
        return A.Compacted(ev.archive, report)
    raise P.ProtocolError(f"unexpected {type(ev).__name__} from a client")


async def _push(session, ev: A.ArchivePush) -> None:
    account = session.account
    try:
        service = _service(session)
        may_use_archives(account)
    except ModsyncError as e:
        # The change set is on its way: read it to the end, keep none of it.
        await session._receive(ev.user, discard=True)
        await _refuse(session, ev, e)
        return
    got = await session._receive(ev.user)
    if got is None:
        await session.send(P.No("aborted", "the change set was abandoned", ev.user))
        return
    cs, spool = got
    try:
        entry, written, created = await asyncio.to_thread(
            service.add_point, account, ev.archive, ev.user, ev.modseq, cs, spool.get,
            items_checked=(session.conn.version or 1) >= P.PACKED_VERSION)
    except ModsyncError as e:
        await _refuse(session, ev, e)
        return
    finally:
        spool.close()
    log.info("%s (%s): archive %s: %s", session.peer, account.name, ev.archive,
             f"user {ev.user} unchanged" if entry.get("point") is None else
             f"point {entry['point']} of {ev.user} ({entry['items']} items, "
             f"{entry['new_bodies']} new bodies, {written} bytes)")
    await session.send(A.PointAdded(ev.archive, entry["user"], entry, written, created))


async def _refuse(session, ev: A.ArchiveRequest, e: ModsyncError) -> None:
    log.warning("%s (%s): refused %s on archive %s: %s", session.peer, session.account.name,
                type(ev).__name__, ev.archive, e)
    # Errors name archives by their path here; the client knows them by name.
    service = session.server.archives
    text = str(e) if service is None else str(e).replace(f"{service.root}/", "")
    await session.send(P.No(e.code, text, getattr(ev, "user", None)))
