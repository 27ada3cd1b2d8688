"""Backups: points in time of users' mail in an archive, and everything done with them.

* ``backup``: for each user, the change set from the archive's last point
  to the source's current state, and the bodies it introduces (each stored
  once per archive), become a new point.  A source is a local store or a
  server reached with the replication protocol (``engine.client.RemoteSource``);
  both offer ``users()``, ``state(user)``, ``changes(user, base)`` and
  ``close()``.  Nothing in the archive is rewritten, and nothing the source
  deleted is deleted from it: deletions are recorded at the point they
  happened, and earlier points still hold the mail.
* ``restore``: the user's state at any point is the fold of the change sets
  from the last full point up to it (each item is an object's whole state,
  so a later item replaces an earlier one).  That state, or a selection of
  it, goes into a store (exactly, or appended without clobbering anything),
  a Maildir, or a Cyrus server.
* ``compact``: retention rules pick the points to keep; the history before
  the oldest kept point is squashed into one full point, dropped points
  between kept ones are merged into the next kept one, bodies no kept point
  uses are removed, and chunks are rewritten into new files before the old
  ones go (``engine.archive.Writer.commit``).
* ``verify``: ``engine.archive.verify_archive``, with resumable sampling.
* ``export_user`` / ``import_export``: one user's points and bodies as one
  portable checksummed file, and taking such a file into an archive or store.

The rules for restoring into a live store are in ``restore``'s docstring and
docs/backup.md.
"""
from __future__ import annotations

import json
import os
import random
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import blake3
import msgpack

from . import names
from .archive import (
    DEFAULT_LEVEL,
    KIND_BODIES,
    Archive,
    ArchiveCorrupt,
    BodyPacker,
    ChunkEntry,
    PointInfo,
    check_chunk,
    chunk_files,
    decode_entries,
    decode_point_payload,
    decompress_block,
    encode_point_payload,
    read_chunk_header,
    referenced_bodies,
    verify_archive,
)
from .blobs import address_of
from .changeset import (KIND_ORDER, ChangeSet, Item, build, encode_token, gc_paused, state_of,
                        vv_le)
from .errors import (
    FullSyncNeeded,
    ModsyncError,
    NoSuchMailbox,
    NoSuchMessage,
    NoSuchUser,
    ProtocolError,
    UsageError,
)
from .model import ACL, ANNOTATION, MAILBOX, MAILBOX_SCOPED, RECORD, SIEVE, SUBSCRIPTION
from .progress import Progress
from .store import Message, Store

# A per-user progress bar is shown for users with at least this many new
# bodies: below that a user takes well under a second.
PROGRESS_MIN_BODIES = 500
# Bodies fetched from a source and appended to a store in batches of this size.
BATCH_BODIES = 1000
BATCH_BYTES = 32 << 20
# Bodies read ahead from a local store on the writer's thread pool.
FETCH_AHEAD = 64


# == sources ===============================================================================

class LocalSource:
    """A store on this machine, offering what a backup needs of a source."""

    # Store.read_body checks every body against its address.
    bodies_checked = True

    def __init__(self, store: Store):
        self.store = store
        self._modseq: dict[str, int] = {}

    def users(self) -> list[str]:
        return self.store.users()

    def state(self, user: str) -> dict:
        return state_of(self.store, user)

    def changes(self, user: str, base: dict):
        """(change set from base, body getter); FullSyncNeeded if base is below the horizon."""
        # The user's modseq must describe the same snapshot as the change
        # set: read it on both sides of the build and retry if it moved.
        for _ in range(5):
            before = self.store.user_info(user).modseq
            cs = build(self.store, user, base)
            after = self.store.user_info(user).modseq
            if before == after:
                break
        self._modseq[user] = after
        return cs, self.store.read_body

    def modseq(self, user: str) -> int:
        return self._modseq.get(user) or self.store.user_info(user).modseq

    def close(self) -> None:
        pass


def remote_source(address: str, *, account: str | None, password: str | None, tls=None):
    """A ``engine.client.RemoteSource`` for HOST:PORT or unix:/path (issue 5's client)."""
    if address.startswith("unix:") and len(address) > 5:
        host, port = address, None
    else:
        host, port = parse_host_port(address)
    try:
        from .client import RemoteSource
    except ImportError as e:
        raise ModsyncError(f"backup --from needs the network client (engine.client."
                           f"RemoteSource), which this build does not have ({e})") from None
    return RemoteSource(host, port, account=account, password=password, tls=tls)


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{text!r} is not HOST:PORT (e.g. mail.example.org:2005)")
    return host.strip("[]"), int(port)


# == backup ================================================================================

@dataclass
class BackupReport:
    archive: str
    users: list[dict] = field(default_factory=list)
    points: int = 0
    bodies: int = 0
    body_bytes: int = 0
    bytes_written: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"archive": self.archive, "points": self.points, "bodies": self.bodies,
                "body_bytes": self.body_bytes, "bytes_written": self.bytes_written,
                "errors": self.errors, "seconds": round(self.seconds, 3), "users": self.users}


def backup(archive, source, users: Iterable[str] | None = None, *,
           progress: Progress | None = None, level: int = DEFAULT_LEVEL,
           now: int | None = None) -> BackupReport:
    """Append a point for each user (all the source has by default) that changed.

    ``archive`` is an ``Archive`` on this machine, or another target with
    ``LocalTarget``'s methods (``engine.archive_client.RemoteArchive``: an
    archive a `modsync serve --archives` holds).  Each user's point is
    committed on its own (with the bodies it needs), so an interrupted run
    keeps the users it finished.  A user whose state has not changed since
    the last point gets no new point.  A user that fails (the source
    refuses, a body does not check out) is reported and the others are
    still backed up; what was written for it is left uncommitted.
    """
    t0 = time.monotonic()
    progress = progress or Progress()
    local = isinstance(archive, Archive)
    target = LocalTarget(archive, level=level, now=now) if local else archive
    written_before = target.bytes_written
    report = BackupReport(target.path)
    todo = list(users) if users is not None else list(source.users())
    try:
        for user in todo:
            try:
                entry = _backup_user(target, source, names.user(user), progress)
            except ModsyncError as e:
                target.abandon()
                entry = {"user": user, "point": None, "error": str(e)}
                report.errors += 1
            report.users.append(entry)
            if entry.get("point"):
                report.points += 1
                report.bodies += entry["new_bodies"]
                report.body_bytes += entry["new_bytes"]
    finally:
        if local:
            target.close()
    report.bytes_written = target.bytes_written - written_before
    report.seconds = time.monotonic() - t0
    return report


class LocalTarget:
    """An archive on this machine, as ``backup`` writes to it (holding its writer lock).

    The interface of a backup target: ``path``, ``bytes_written``,
    ``last_state(user)``, ``add_point(...)`` (see ``write_point``),
    ``abandon()`` after a user failed, ``close()``.
    """

    def __init__(self, archive: Archive, *, level: int = DEFAULT_LEVEL, now: int | None = None):
        self.archive = archive
        self.path = str(archive.path)
        self.level, self.now = level, now
        self.bytes_written = 0
        self.w = archive.writer(level=level)
        _cleanup_leftovers(archive)

    def last_state(self, user: str) -> dict | None:
        """The version vector of the user's last point (None: the archive has none)."""
        last = self.archive.last_point(user)
        return None if last is None else last.state

    def add_point(self, user: str, cs: ChangeSet, **kw) -> dict:
        return write_point(self.archive, self.w, user, cs, now=self.now, **kw)

    def abandon(self) -> None:
        # Start again with a writer that knows nothing of the failed user's
        # uncommitted chunks (their sequence numbers are reused).
        self.bytes_written += self.w.bytes_written
        self.w.close()
        self.w = self.archive.writer(level=self.level)

    def close(self) -> None:
        self.bytes_written += self.w.bytes_written
        self.w.close()


def _changes(source, user: str, base: dict):
    """(change set, body getter, full): from ``base``, or from scratch when the source
    can no longer say what changed since it."""
    try:
        cs, get_body = source.changes(user, base)
        return cs, get_body, not base
    except FullSyncNeeded:
        pass
    except ModsyncError as e:          # a remote source's refusal carries the same code
        if getattr(e, "code", "") != "full-sync-needed":
            raise
    cs, get_body = source.changes(user, {})
    return cs, get_body, True


def _backup_user(target, source, user: str, progress: Progress) -> dict:
    last = target.last_state(user)
    base = last if last is not None else {}
    # Tombstones the last point relies on may have expired at the source: then
    # a fresh full point (restores before it still use the old ones).
    cs, get_body, full = _changes(source, user, base)
    if cs.user != user:
        raise ProtocolError(f"the source sent a change set for {cs.user!r}, not {user!r}")
    if not full and not vv_le(base, cs.state):
        # The source does not descend from the last point (a user moved to
        # another store, a source restored from an older copy): what the
        # archive holds that the source lacks would never be seen deleted.
        cs, get_body = source.changes(user, {})
        full = True
    if last is not None and not full and (cs.is_empty() or cs.state == last):
        return {"user": user, "point": None, "unchanged": True}
    modseq = source.modseq(user) if hasattr(source, "modseq") else max(cs.state.values(),
                                                                       default=0)
    # A local store checks each body against its address as it reads it;
    # anything else is checked by the target.
    return target.add_point(user, cs, base={} if full else base, modseq=int(modseq or 0),
                            get_body=get_body, checked=getattr(source, "bodies_checked", False),
                            progress=progress)


def needed_bodies(cs: ChangeSet) -> tuple[list[bytes], dict[bytes, int]]:
    """The bodies a point of ``cs`` needs in the archive (every live record's and sieve
    script's, not only those the source listed), in order, and their sizes."""
    needed, sizes = [], {}
    for item in cs.items:
        if not item.removed and item.kind in (RECORD, SIEVE):
            a = bytes(item.fields[0])
            if a not in sizes:
                sizes[a] = item.fields[2] if item.kind == RECORD else item.fields[1]
                needed.append(a)
    return needed, sizes


def source_bodies(get_body, addresses, pool, checked: bool, user: str):
    """(address, bytes) of the bodies a point adds, read with ``get_body``: each must
    be there, and hash to its address unless ``checked`` (a store checks what it
    reads, then on ``pool``)."""
    for a, data in fetch_bodies(get_body, addresses, pool if checked else None):
        if data is None:
            raise ProtocolError(f"body {a.hex()} of user {user!r}, which the archive "
                                f"lacks, was not sent", subject=a.hex())
        if not checked and address_of(data) != a:
            raise ProtocolError(f"body {a.hex()} from the source does not hash to its "
                                f"address", subject=a.hex())
        yield a, data


def write_point(archive: Archive, w, user: str, cs: ChangeSet, *, base: dict, modseq: int,
                get_body, checked: bool, progress: Progress | None = None,
                now: int | None = None) -> dict:
    """Store ``cs`` as the user's next point and commit; the backup's entry for the user.

    ``base`` is the state ``cs`` starts from: the last point's, or ``{}`` for a
    full point.  Of the bodies the point needs, those the archive lacks are
    read with ``get_body(address)`` (None: not available) and, unless
    ``checked`` (a store checks what it reads), hash-checked here.
    """
    progress = progress or Progress()
    needed, sizes = needed_bodies(cs)
    missing = [a for a in archive.missing_bodies(needed) if a not in w.packer]
    new_bytes = 0
    big = len(missing) >= PROGRESS_MIN_BODIES
    if big:
        progress.start(f"backup {user}", total_items=len(missing),
                       total_bytes=sum(sizes[a] for a in missing))
    try:
        for a, data in source_bodies(get_body, missing, w.pool, checked, user):
            w.add_new_body(a, data)
            new_bytes += len(data)
            if big:
                progress.advance(1, len(data))
    finally:
        if big:
            progress.finish()
    full = not base
    info = PointInfo(user, w.next_point_number(user), 0, int(time.time()) if now is None
                     else int(now), int(modseq), encode_token(user, cs.state), full,
                     dict(cs.state), bytes(cs.digest), len(cs.items), len(missing), new_bytes,
                     dict(base))
    w.add_point(info, encode_point_payload(cs, w.level))
    w.commit()
    return {"user": user, "point": info.point, "full": full, "modseq": info.modseq,
            "items": info.items, "new_bodies": info.new_bodies, "new_bytes": new_bytes}


def fetch_bodies(get_body, addresses: list[bytes], pool) -> Iterator[tuple[bytes, bytes]]:
    """(address, body) in order; with a pool, up to FETCH_AHEAD bodies are read ahead
    on other threads (a store's read decompresses and hashes, outside the GIL)."""
    if pool is None:
        for a in addresses:
            yield a, get_body(a)
        return
    pending = []
    it = iter(addresses)
    for a in it:
        pending.append((a, pool.submit(get_body, a)))
        if len(pending) >= FETCH_AHEAD:
            break
    while pending:
        a, fut = pending.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(get_body, nxt)))
        yield a, fut.result()


def _cleanup_leftovers(archive: Archive) -> None:
    """Delete files a committed compaction removed but did not get to delete."""
    removed = {e.name for e in archive.chunks() if not e.live}
    for name in chunk_files(archive):
        if name in removed:
            archive.unlink_chunk(name)


# == listing ===============================================================================

def list_points(archive: Archive, user: str | None = None, *, last: bool = False,
                states: bool = False) -> dict:
    """What `backup list` shows: per user (``user``, or all), every point (``last``:
    only the latest, and a user with none is listed without points); ``states``
    adds each point's version vector (``state``)."""
    users = [user] if user is not None else archive.users()
    out = []
    for u in users:
        if last:
            points = [p for p in [archive.last_point(u)] if p is not None]
        else:
            points = archive.points(u)
            if user is not None and not points:
                raise NoSuchUser(f"archive {archive.path} holds no backup of user {u!r}",
                                 subject=u)
        out.append({"user": u, "points": [p.as_dict() | {"state": dict(p.state)} if states
                                          else p.as_dict() for p in points]})
    _, head = archive.head()
    return {"archive": str(archive.path), "id": archive.id, "head": head.hex(),
            "append_only": archive.append_only, "locked": archive.locked, "users": out}


# == the state at a point ================================================================

def choose_point(points: list[PointInfo], at: str | None) -> PointInfo:
    """The point ``at`` names: None = the latest; ``modseq:N`` = the latest whose source
    modseq is <= N; ``point:K``; a time (ISO 8601, UTC unless it says otherwise, or
    @EPOCH) = the latest taken at or before it."""
    if not points:
        raise NoSuchUser("no points")
    if at is None or at in ("", "latest"):
        return points[-1]
    if at.startswith("modseq:"):
        n = _int(at[7:], at)
        found = [p for p in points if p.modseq <= n]
        if not found:
            raise UsageError(f"no point at or before modseq {n}: the oldest is at modseq "
                             f"{points[0].modseq}")
        return found[-1]
    if at.startswith("point:"):
        k = _int(at[6:], at)
        for p in points:
            if p.point == k:
                return p
        raise UsageError(f"no point {k}; `modsync backup list` shows the points")
    t = parse_time(at)
    found = [p for p in points if p.time <= t]
    if not found:
        raise UsageError(f"no point at or before {format_time(t)}: the oldest is from "
                         f"{format_time(points[0].time)}")
    return found[-1]


def _int(text: str, whole: str) -> int:
    if not text.isdigit():
        raise UsageError(f"--at {whole!r}: expected a number after the colon")
    return int(text)


def parse_time(text: str) -> int:
    text = text.strip()
    if text.startswith("@") and text[1:].isdigit():
        return int(text[1:])
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text!r}: give a time (2024-05-01T12:00Z, 2024-05-01, "
                         f"@1714564800), modseq:N or point:K") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
        if len(text) == 10:        # a date alone: the end of that day
            return int(dt.timestamp()) + 86399
    return int(dt.timestamp())


def format_time(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def fold(reader, infos: list[PointInfo], target: PointInfo, *, start: PointInfo | None = None,
         keep=None) -> tuple[dict, dict, ChangeSet]:
    """Every object's state at ``target``: ({(kind, ident): item}, crcs, target's change set).

    Replays from ``start`` (default: the last full point at or before target);
    ``keep`` picks the items decoded of each point (``decode_point_payload``).
    """
    idx = next(i for i, p in enumerate(infos) if p.point == target.point)
    if start is None:
        first = max(i for i in range(idx + 1) if infos[i].full)
    else:
        first = next(i for i, p in enumerate(infos) if p.point == start.point)
    items: dict = {}
    crcs: dict = {}
    cs = None
    for info in infos[first:idx + 1]:
        cs = reader.read_point(info, keep=keep)
        for item in cs.items:
            items[(item.kind, item.ident)] = item
        crcs.update(cs.crcs)
    return items, crcs, cs


def _sort_key(order: dict):
    return lambda item: (order[item.kind], item.ident)


def full_changeset(user: str, last: ChangeSet, items: dict, crcs: dict) -> ChangeSet:
    """The change set from the empty state to the folded state (the user's full state).

    What a deleted mailbox held goes: its tombstone says enough, and apply
    refuses records in a mailbox the same change set deletes.
    """
    dead = {ident[0] for (kind, ident), it in items.items() if kind == MAILBOX and it.removed}
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    kept = [it for (kind, ident), it in items.items()
            if not (kind in (RECORD, ACL, ANNOTATION) and ident[0] in dead)]
    kept.sort(key=_sort_key(order))
    live_mailboxes = {it.ident[0] for it in kept if it.kind == MAILBOX and not it.removed}
    return ChangeSet(user, last.sender, {}, dict(last.state), kept,
                     sorted(_bodies_of(kept)), {k: v for k, v in crcs.items()
                                                if k in live_mailboxes},
                     last.digest, max((it.origin_modseq for it in kept), default=0))


def _bodies_of(items: Iterable[Item]) -> set[bytes]:
    return {bytes(it.fields[0]) for it in items if not it.removed and it.kind in (RECORD, SIEVE)}


def state_at(reader, user: str, at: str | None = None, *, mailbox: str | None = None,
             uids=None, guid: bytes | None = None) -> tuple[PointInfo, ChangeSet]:
    """(the point ``at`` names, the user's full state there as a change set).

    Given ``mailbox``, ``uids`` or ``guid`` (what ``select`` will pick), the
    state holds every mailbox but, of what lives in mailboxes, only what that
    selection can take: the records (with those UIDs, or that SHA-1 or blake3
    address), annotations and ACL entries of the mailbox it names at the
    point (of every mailbox when only ``guid`` is given).
    """
    infos = reader.points(user)
    if not infos:
        raise NoSuchUser(f"{_where(reader)} holds no backup of user {user!r}", subject=user)
    target = choose_point(infos, at)
    with gc_paused():
        if mailbox is None and guid is None:
            items, crcs, last = fold(reader, infos, target)
        else:
            items, crcs, last = _fold_scoped(reader, infos, target, mailbox, uids, guid)
        return target, full_changeset(user, last, items, crcs)


def _fold_scoped(reader, infos, target, mailbox, uids, guid) -> tuple[dict, dict, ChangeSet]:
    """``fold``, decoding only what a restore of ``mailbox`` / ``uids`` / ``guid`` needs.

    Which mailbox a name means is known only at the target point (mailboxes
    are renamed), so the first pass decodes the mailboxes of every point and
    keeps the rest of each point undecoded; the second decodes, of that, the
    objects of the mailbox chosen.
    """
    undecoded: list = []

    def mailboxes_only(entries):
        undecoded.append(entries)
        return [i for i, e in enumerate(entries) if e[0] == MAILBOX]
    items, crcs, last = fold(reader, infos, target, keep=mailboxes_only)
    live = [it for (kind, _), it in items.items() if kind == MAILBOX and not it.removed]
    ids = {m.ident[0] for m in (live if mailbox is None else _named(live, mailbox))}

    whole = uids is None and guid is None
    field_no = 1 if guid is not None and len(guid) == 20 else 0
    for entries in undecoded:
        # Comprehensions, not a function per entry: a point has 10^4 of them.
        picked = [e for e in entries if e[0] in MAILBOX_SCOPED and e[1][0] in ids]
        if not whole:
            picked = [e for e in picked if e[0] == RECORD]
        if uids is not None:
            picked = [e for e in picked if any(lo <= e[1][1] <= hi for lo, hi in uids)]
        if guid is not None:
            picked = [e for e in picked if e[2][field_no] == guid]
        for it in decode_entries(picked):
            items[(it.kind, it.ident)] = it
    return items, crcs, last


def _named(mailboxes: list[Item], mailbox: str) -> list[Item]:
    """The mailboxes ``mailbox`` names: by name at this point, else by unique id."""
    try:
        want = names.mailbox(mailbox)
    except UsageError:
        want = None
    return [m for m in mailboxes if m.fields[0] == want] or \
        [m for m in mailboxes if m.ident[0] == mailbox]


def _where(reader) -> str:
    return f"archive {reader.path}" if isinstance(reader, Archive) else str(reader.path)


# == restore ===============================================================================

@dataclass
class RestoreReport:
    archive: str
    user: str
    point: dict
    target: dict
    mode: str = ""                  # exact | append
    messages: int = 0
    bytes: int = 0
    mailboxes: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    digest: str | None = None       # the source's digest at the point (whole-user restores)
    digest_ok: bool | None = None   # exact restores: the restored digest equals it
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"archive": self.archive, "user": self.user, "point": self.point,
                "target": self.target, "mode": self.mode, "messages": self.messages,
                "bytes": self.bytes, "mailboxes": self.mailboxes, "skipped": self.skipped,
                "digest": self.digest, "digest_ok": self.digest_ok,
                "seconds": round(self.seconds, 3)}


@dataclass
class Selection:
    whole_user: bool
    mailboxes: list[Item]                       # live mailbox items selected
    records: dict[str, list[Item]]              # mailbox id -> live record items, UID order
    whole_mailboxes: set[str]                   # mailbox ids restored with all their mail


def select(cs: ChangeSet, *, mailbox: str | None = None, uids=None,
           guid: str | None = None) -> Selection:
    """What of the full state ``cs`` a restore takes (see ``restore``)."""
    mbs = {it.ident[0]: it for it in cs.items if it.kind == MAILBOX and not it.removed}
    records: dict[str, list[Item]] = {}
    for it in cs.items:
        if it.kind == RECORD and not it.removed and it.ident[0] in mbs:
            records.setdefault(it.ident[0], []).append(it)
    if uids is not None and mailbox is None:
        raise UsageError("--uid needs --mailbox: UIDs are per mailbox")
    chosen = list(mbs.values())
    if mailbox is not None:
        chosen = _named(chosen, mailbox)
        if not chosen:
            have = ", ".join(sorted(m.fields[0] for m in mbs.values())) or "none"
            raise NoSuchMailbox(f"there is no mailbox {mailbox!r} at this point (mailboxes "
                                f"then: {have}); a mailbox deleted later is restorable from a "
                                f"point before its deletion", subject=mailbox)
    ids = {m.ident[0] for m in chosen}
    picked = {mbid: list(recs) for mbid, recs in records.items() if mbid in ids}
    whole = set(ids)
    if uids is not None:
        picked = {mbid: [r for r in recs if any(lo <= r.ident[1] <= hi for lo, hi in uids)]
                  for mbid, recs in picked.items()}
        whole = set()
        if not any(picked.values()):
            raise NoSuchMessage(f"no message with those UIDs in {mailbox!r} at this point")
    if guid is not None:
        raw = guid_bytes(guid)
        g = raw.hex()
        field_no = 1 if len(raw) == 20 else 0
        picked = {mbid: [r for r in recs if bytes(r.fields[field_no]) == raw]
                  for mbid, recs in picked.items()}
        picked = {k: v for k, v in picked.items() if v}
        whole = set()
        if not picked:
            raise NoSuchMessage(f"no message with GUID {g} at this point", subject=g)
        chosen = [m for m in chosen if m.ident[0] in picked]
    chosen.sort(key=lambda m: m.fields[0])
    return Selection(mailbox is None and uids is None and guid is None, chosen, picked, whole)


def guid_bytes(guid: str) -> bytes:
    """A message's SHA-1 (Cyrus's GUID, 40 hex digits) or blake3 address (64) as bytes."""
    try:
        raw = bytes.fromhex(guid.strip().lower())
    except ValueError:
        raise UsageError(f"--guid {guid!r}: give the message's SHA-1 (40 hex digits, "
                         f"Cyrus's GUID) or blake3 address (64 hex digits)") from None
    if len(raw) not in (20, 32):
        raise UsageError(f"--guid {guid!r}: 40 (SHA-1) or 64 (blake3) hex digits")
    return raw


def _target_name(mb_name: str, into: str | None, single: bool) -> str:
    if into is None:
        return mb_name
    into = names.mailbox(into)
    return into if single else f"{into}/{mb_name}"


def selection_changeset(cs: ChangeSet, sel: Selection, into: str | None) -> ChangeSet:
    """The selection as a change set from the empty state, for a store of its own
    (a temporary one, for Maildir and Cyrus restores)."""
    if sel.whole_user and into is None:
        return cs
    ids = {m.ident[0] for m in sel.mailboxes}
    single = len(sel.mailboxes) == 1 and not sel.whole_user
    items = []
    for it in cs.items:
        if it.kind == MAILBOX and it.ident[0] in ids:
            f = list(it.fields)
            f[0] = _target_name(f[0], into, single)
            items.append(Item(it.kind, it.ident, f, it.origin, it.origin_modseq, it.removed))
        elif it.kind in (ACL, ANNOTATION) and it.ident[0] in sel.whole_mailboxes or it.kind not in (MAILBOX, RECORD, ACL, ANNOTATION) and sel.whole_user:
            items.append(it)
    for mbid in ids:
        items.extend(sel.records.get(mbid, []))
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    items.sort(key=_sort_key(order))
    crcs = {k: v for k, v in cs.crcs.items() if k in sel.whole_mailboxes}
    return ChangeSet(cs.user, cs.sender, {}, dict(cs.state), items, sorted(_bodies_of(items)),
                     crcs, cs.digest, cs.max_modseq)


def restore(reader, user: str, *, at: str | None = None, mailbox: str | None = None,
            uids=None, guid: str | None = None, into: str | None = None,
            store: Store | None = None, maildir: str | os.PathLike | None = None,
            csync: str | None = None, authname: str | None = None,
            password: str | None = None, progress: Progress | None = None,
            tmpdir: str | None = None) -> RestoreReport:
    """Restore a user, a mailbox or single messages as they were at a point.

    ``reader`` is an Archive or an ExportFile; exactly one target is given.

    Into a store (``store``), nothing that is there is ever changed:

    * a whole user the store does not have is restored *exactly*: the same
      mailbox ids, UIDs, flags, modseq stamps; afterwards the store's digest
      for the user equals the source's at that point (checked);
    * otherwise restored messages are *appended* as new messages (new UIDs,
      the archived flags, internal dates and annotations), in UID order, to
      the mailbox of the same name, or to ``into`` (one mailbox restored)
      or ``into``/NAME (several); a mailbox that does not exist is created,
      always with a new unique id and uidvalidity, so it can never be taken
      for the mailbox it was copied from; for a whole user, subscriptions
      and sieve scripts the user lacks are added (none replaced, none
      activated).

    Into a Maildir (a new or empty directory) or a Cyrus server
    (``csync``, HOST:PORT), the selection is first restored exactly into a
    temporary store, keeping UIDs and uidvalidity, then exported
    (``engine.maildir.export_maildir``) or pushed (``engine.csync.push_user``).
    """
    t0 = time.monotonic()
    progress = progress or Progress()
    user = names.user(user)
    targets = [t for t in (store, maildir, csync) if t is not None]
    if len(targets) != 1:
        raise UsageError("restore needs exactly one target: a store, a Maildir or a Cyrus "
                         "server")
    if uids is not None and mailbox is None:
        raise UsageError("--uid needs --mailbox: UIDs are per mailbox")
    info, cs = state_at(reader, user, at, mailbox=mailbox, uids=uids,
                        guid=None if guid is None else guid_bytes(guid))
    sel = select(cs, mailbox=mailbox, uids=uids, guid=guid)
    target = ({"store": str(store.path)} if store is not None else
              {"maildir": os.fspath(maildir)} if maildir is not None else {"csync": csync})
    report = RestoreReport(str(reader.path), user, info.as_dict(), target)
    if sel.whole_user:
        report.digest = info.digest.hex()
    if store is not None:
        if sel.whole_user and into is None and user not in store.users():
            try:
                _restore_exact(reader, store, cs, report, progress)
            except ModsyncError as e:
                if getattr(e, "code", "") != "mailbox-id-in-use":
                    raise
                report.skipped.append({"what": "exact", "reason": f"{e}; appended instead"})
                report.mailboxes, report.messages, report.bytes = [], 0, 0
                _restore_append(reader, store, user, cs, sel, into, report, progress)
        else:
            _restore_append(reader, store, user, cs, sel, into, report, progress)
    else:
        part = selection_changeset(cs, sel, into)
        with tempfile.TemporaryDirectory(prefix="modsync-restore-", dir=tmpdir) as tmp:
            temp = Store.init(Path(tmp) / "store")
            try:
                _restore_exact(reader, temp, part, report, progress,
                               check_digest=sel.whole_user and into is None)
                if maildir is not None:
                    from .maildir import export_maildir
                    exported = export_maildir(temp, user, maildir, progress=progress)
                    for r in exported.refused:
                        report.skipped.append({"what": r.get("mailbox", ""),
                                               "reason": r["reason"]})
                else:
                    _push_csync(temp, user, csync, authname, password, progress)
            finally:
                temp.close()
    report.seconds = time.monotonic() - t0
    return report


def split_changeset(cs: ChangeSet) -> Iterator[ChangeSet]:
    """A full change set as several that apply cleanly one after the other, each with
    at most about BATCH_BODIES bodies or BATCH_BYTES, so a restore never holds a
    whole user's mail in memory.

    Every part claims the final state (so each applies cleanly on the last);
    a mailbox appears in the first part and in each part holding its
    records, with its uidnext just above the records given so far (UIDs
    below uidnext are never new), its real uidnext once all are in.  Only
    the last part carries the CRC claims.
    """
    mailboxes = [it for it in cs.items if it.kind == MAILBOX]
    records = [it for it in cs.items if it.kind == RECORD]
    others = [it for it in cs.items if it.kind not in (MAILBOX, RECORD)]
    groups: list[list[Item]] = [[]]
    size = 0
    for r in records:
        if len(groups[-1]) >= BATCH_BODIES or size >= BATCH_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(r)
        size += 0 if r.removed else r.fields[2]
    last_group = {}
    for i, g in enumerate(groups):
        for r in g:
            last_group[r.ident[0]] = i
    top: dict[str, int] = {}
    for i, g in enumerate(groups):
        final = i == len(groups) - 1
        for r in g:
            top[r.ident[0]] = max(top.get(r.ident[0], 0), r.ident[1])
        in_group = {r.ident[0] for r in g}
        items = []
        for mb in mailboxes:
            if i and mb.ident[0] not in in_group:
                continue
            f = list(mb.fields)
            if last_group.get(mb.ident[0], -1) > i:
                f[2] = top.get(mb.ident[0], 0) + 1
            items.append(Item(mb.kind, mb.ident, f, mb.origin, mb.origin_modseq, mb.removed))
        items.extend(g)
        if final:
            items.extend(others)
        yield ChangeSet(cs.user, cs.sender, {}, dict(cs.state), items,
                        sorted(_bodies_of(items)), cs.crcs if final else {}, cs.digest,
                        cs.max_modseq)


def _restore_exact(reader, store: Store, cs: ChangeSet, report: RestoreReport,
                   progress: Progress, *, check_digest: bool = True) -> None:
    from .apply import apply
    report.mode = "exact"
    live = [it for it in cs.items if it.kind == RECORD and not it.removed]
    progress.start(f"restore {cs.user}", total_items=len(live),
                   total_bytes=sum(it.fields[2] for it in live))
    try:
        for part in split_changeset(cs):
            bodies = dict(reader.iter_bodies(part.bodies))
            result = apply(store, part, bodies=bodies, allow_mass_delete=True)
            if not result.ok:
                raise ModsyncError(f"the restore was refused by the store: {result.reason}")
            done = [it for it in part.items if it.kind == RECORD and not it.removed]
            progress.advance(len(done), sum(it.fields[2] for it in done))
    finally:
        progress.finish()
    by_mb: dict[str, int] = {}
    for it in live:
        by_mb[it.ident[0]] = by_mb.get(it.ident[0], 0) + 1
        report.messages += 1
        report.bytes += it.fields[2]
    for it in cs.items:
        if it.kind == MAILBOX and not it.removed:
            report.mailboxes.append({"name": it.fields[0], "from": it.fields[0],
                                     "id": it.ident[0], "created": True,
                                     "messages": by_mb.get(it.ident[0], 0)})
    if check_digest:
        report.digest = cs.digest.hex()
        report.digest_ok = store.status(cs.user)["digest"] == cs.digest.hex()
        if not report.digest_ok:
            raise ArchiveCorrupt(f"the restored state of {cs.user!r} does not have the digest "
                                 f"the source had at this point; the archive or this modsync "
                                 f"is faulty (run `modsync verify --archive`)")


def _restore_append(reader, store: Store, user: str, cs: ChangeSet, sel: Selection,
                    into: str | None, report: RestoreReport, progress: Progress) -> None:
    report.mode = "append"
    single = len(sel.mailboxes) == 1 and not sel.whole_user
    total = sum(len(sel.records.get(m.ident[0], [])) for m in sel.mailboxes)
    total_bytes = sum(r.fields[2] for m in sel.mailboxes for r in sel.records.get(m.ident[0], []))
    progress.start(f"restore {user}", total_items=total, total_bytes=total_bytes)
    try:
        for mb in sel.mailboxes:
            name = _target_name(mb.fields[0], into, single)
            recs = sel.records.get(mb.ident[0], [])
            created = False
            try:
                store.mailbox(user, name)
            except (NoSuchMailbox, NoSuchUser):
                store.create_mailbox(user, name)
                created = True
            uid_map = []
            for batch in _batches(recs):
                bodies = reader.read_bodies([bytes(r.fields[0]) for r in batch])
                msgs = [Message(bodies[bytes(r.fields[0])], tuple(r.fields[5]), r.fields[3],
                                tuple((e, u, bytes(v)) for e, u, v in r.fields[6]),
                                bytes(r.fields[0])) for r in batch]
                added = store.append_many(user, name, msgs)
                uid_map.extend([r.ident[1], a.uid] for r, a in zip(batch, added))
                nbytes = sum(r.fields[2] for r in batch)
                report.messages += len(batch)
                report.bytes += nbytes
                progress.advance(len(batch), nbytes)
            entry = {"name": name, "from": mb.fields[0], "id": store.mailbox(user, name).id,
                     "created": created, "messages": len(recs)}
            if len(uid_map) <= 1000:
                entry["uids"] = uid_map
            report.mailboxes.append(entry)
    finally:
        progress.finish()
    if sel.whole_user:
        have_subs = set(store.subscriptions(user))
        have_sieve = {s.name for s in store.sieve_scripts(user)}
        for it in cs.items:
            if it.removed:
                continue
            if it.kind == SUBSCRIPTION and it.ident[0] not in have_subs:
                store.subscribe(user, it.ident[0])
            elif it.kind == SIEVE:
                if it.ident[0] in have_sieve:
                    report.skipped.append({"what": f"sieve script {it.ident[0]}",
                                           "reason": "the user has a script of that name"})
                else:
                    store.sieve_put(user, it.ident[0], reader.read_body(bytes(it.fields[0])))


def _batches(recs: list[Item]) -> Iterator[list[Item]]:
    batch, size = [], 0
    for r in recs:
        batch.append(r)
        size += r.fields[2]
        if len(batch) >= BATCH_BODIES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _push_csync(store: Store, user: str, address: str, authname, password, progress) -> None:
    host, port = parse_host_port(address)
    try:
        from .csync import push_user
    except ImportError as e:
        raise ModsyncError(f"restore --csync needs the Cyrus replication client "
                           f"(engine.csync.push_user), which this build does not have "
                           f"({e})") from None
    pushed = push_user(store, user, host, port, authname=authname, password=password,
                       progress=progress)
    if pushed is not None and not getattr(pushed, "ok", True):
        errors = "; ".join(str(e) for e in getattr(pushed, "errors", [])) or "no reason given"
        raise ModsyncError(f"the Cyrus server at {address} did not take user {user!r}: "
                           f"{errors}", subject=user)


# == retention and compaction =============================================================

@dataclass
class RetentionPolicy:
    """Which points to keep; a point is kept if any rule keeps it (as restic's forget).
    The latest point of each user is always kept."""

    keep_days: float | None = None
    keep_last: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.keep_days, self.keep_last, self.keep_daily,
                                           self.keep_weekly, self.keep_monthly))

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def keep(self, points: list[PointInfo], now: float) -> set[int]:
        keep = {points[-1].point} if points else set()
        newest_first = list(reversed(points))
        if self.keep_last:
            keep.update(p.point for p in newest_first[:self.keep_last])
        if self.keep_days is not None:
            keep.update(p.point for p in points if p.time >= now - self.keep_days * 86400)
        for n, bucket in ((self.keep_daily, lambda t: time.gmtime(t)[:3]),
                          (self.keep_weekly, lambda t: datetime.fromtimestamp(
                              t, UTC).isocalendar()[:2]),
                          (self.keep_monthly, lambda t: time.gmtime(t)[:2])):
            if not n:
                continue
            seen = []
            for p in newest_first:
                b = bucket(p.time)
                if b not in seen:
                    seen.append(b)
                    if len(seen) > n:
                        break
                    keep.add(p.point)
        return keep


@dataclass
class CompactReport:
    archive: str
    dry_run: bool = False
    policy: dict = field(default_factory=dict)
    users: list[dict] = field(default_factory=list)
    points_dropped: int = 0
    points_rewritten: int = 0
    bodies_dropped: int = 0
    chunks_removed: int = 0
    chunks_written: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    unreferenced_kept: int = 0      # dead bodies left in chunks not worth rewriting
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"archive": self.archive, "dry_run": self.dry_run, "policy": self.policy,
                "users": self.users, "points_dropped": self.points_dropped,
                "points_rewritten": self.points_rewritten,
                "bodies_dropped": self.bodies_dropped, "chunks_removed": self.chunks_removed,
                "chunks_written": self.chunks_written, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "unreferenced_kept": self.unreferenced_kept,
                "seconds": round(self.seconds, 3)}


# A body chunk is rewritten when at least this share of its bytes is dead
# (restic's prune repacks at 5 % unused by default): rewriting a 32 MiB
# chunk to reclaim a few KB is not worth the I/O.
REPACK_UNUSED = 0.05


def compact(archive: Archive, policy: RetentionPolicy, *, users: list[str] | None = None,
            now: float | None = None, dry_run: bool = False,
            repack_unused: float = REPACK_UNUSED, progress: Progress | None = None
            ) -> CompactReport:
    """Apply a retention policy; see the module docstring and docs/backup.md.

    Crash-safe: new chunks are written and made durable, then one index
    transaction swaps them in and marks the old ones removed, then the old
    files are deleted.  Killed at any moment, the archive is valid.
    """
    if not policy.given():
        raise UsageError("compact needs a retention rule (--keep-days, --keep-last, "
                         "--keep-daily, --keep-weekly or --keep-monthly)")
    if not dry_run:
        archive.require_admin("compact the archive")
    t0 = time.monotonic()
    now = time.time() if now is None else now
    progress = progress or Progress()
    report = CompactReport(str(archive.path), dry_run, policy.as_dict())
    report.bytes_before = sum(e.size for e in archive.chunks() if e.live)
    archive.lock()
    w = None if dry_run else archive.writer()
    try:
        if w is not None:
            _remove_strays(archive)
        referenced: set[bytes] = set()
        changed = False
        todo = users if users is not None else archive.users()
        everyone = archive.users()
        progress.start("compact", total_items=len(everyone))
        for user in everyone:
            infos = archive.points(user)
            keep = policy.keep(infos, now) if user in todo else {p.point for p in infos}
            entry, refs = _compact_user(archive, w, user, infos, keep, report)
            referenced |= refs
            if entry["dropped"] or entry["rewritten"]:
                report.users.append(entry)
                changed = True
            progress.advance(1)
        progress.finish()
        changed = _plan_bodies(archive, w, referenced, repack_unused, report) or changed
        if w is not None and changed:
            w.write_compaction_record(policy.as_dict())
            report.chunks_written = len(w._new_chunks)
            w.commit()
    finally:
        if w is not None:
            w.close()
        archive.unlock()
    report.bytes_after = sum(e.size for e in archive.chunks() if e.live) if not dry_run \
        else report.bytes_before
    report.seconds = time.monotonic() - t0
    return report


def _remove_strays(archive: Archive) -> None:
    """Under the writer lock: files the index does not list (an interrupted run's) or
    lists as removed (a compaction that died before deleting them)."""
    known = {e.name: e for e in archive.chunks()}
    for name in chunk_files(archive):
        e = known.get(name)
        if e is None or not e.live:
            archive.unlink_chunk(name)


def _compact_user(archive: Archive, w, user: str, infos: list[PointInfo], keep: set[int],
                  report: CompactReport) -> tuple[dict, set[bytes]]:
    entry = {"user": user, "points": len(infos), "kept": len(keep), "dropped": 0,
             "rewritten": 0}
    refs: set[bytes] = set()
    pending: list[PointInfo] = []
    prev_kept: PointInfo | None = None
    for info in infos:
        if info.point not in keep:
            pending.append(info)
            continue
        if prev_kept is None and (pending or not info.full):
            # The oldest kept point becomes a full one: the whole state then.
            items, crcs, last = fold(archive, infos, info)
            new_cs = full_changeset(user, last, items, crcs)
            _rewrite_point(archive, w, info, pending, new_cs, True, {}, report)
            entry["rewritten"] += 1
            refs |= referenced_bodies(new_cs)
        elif prev_kept is not None and pending:
            # Dropped points between two kept ones merge into the later one.
            items, crcs, last = fold(archive, infos, info, start=pending[0])
            order = {k: i for i, k in enumerate(KIND_ORDER)}
            merged = sorted(items.values(), key=_sort_key(order))
            new_cs = ChangeSet(user, last.sender, dict(prev_kept.state), dict(last.state),
                               merged, sorted(_bodies_of(merged)), crcs, last.digest,
                               max((it.origin_modseq for it in merged), default=0))
            _rewrite_point(archive, w, info, pending, new_cs, False, prev_kept.state, report)
            entry["rewritten"] += 1
            refs |= referenced_bodies(new_cs)
        else:
            refs |= referenced_bodies(archive.read_point(info))
        entry["dropped"] += len(pending)
        report.points_dropped += len(pending)
        pending = []
        prev_kept = info
    return entry, refs


def _rewrite_point(archive: Archive, w, info: PointInfo, dropped: list[PointInfo],
                   cs: ChangeSet, full: bool, base: dict, report: CompactReport) -> None:
    report.points_rewritten += 1
    report.chunks_removed += len(dropped) + 1
    if w is None:
        return
    new = PointInfo(info.user, info.point, 0, info.time, info.modseq, info.token, full,
                    dict(info.state), info.digest, len(cs.items),
                    info.new_bodies + sum(p.new_bodies for p in dropped),
                    info.new_bytes + sum(p.new_bytes for p in dropped), dict(base))
    for p in dropped + [info]:
        w.remove_chunk(archive.chunk(p.seq))
    for p in dropped:
        w.drop_point(p.user, p.point)
    w.add_point(new, encode_point_payload(cs, w.level))


def _plan_bodies(archive: Archive, w, referenced: set[bytes], repack_unused: float,
                 report: CompactReport) -> bool:
    """Remove dead bodies: drop chunks holding only dead ones, rewrite those with
    enough dead bytes (copying whole live blocks as they are)."""
    changed = False
    for e in archive.chunks():
        if not e.live or e.kind != KIND_BODIES:
            continue
        path = archive.chunk_path(e.name)
        header, start = read_chunk_header(path, f"chunk {e.name}")
        blocks = header.meta["blocks"]
        bodies = [(bytes(a), b, o, s) for a, b, o, s in header.meta["bodies"]]
        dead = [(a, s) for a, b, o, s in bodies if a not in referenced]
        if not dead:
            continue
        dead_bytes = sum(s for _, s in dead)
        raw_total = sum(s for _, _, _, s in bodies) or 1
        if len(dead) < len(bodies) and dead_bytes / raw_total < repack_unused:
            report.unreferenced_kept += len(dead)
            continue
        changed = True
        report.bodies_dropped += len(dead)
        report.chunks_removed += 1
        if w is None:
            continue
        data = path.read_bytes()
        _, start, checksum = check_chunk(data, f"chunk {e.name}")
        if checksum != e.checksum:
            raise ArchiveCorrupt(f"chunk {e.name}: checksum differs from the index's; run "
                                 f"`modsync verify --archive` before compacting")
        w.remove_chunk(e)
        for a, _ in dead:
            w.drop_body(a)
        by_block: dict[int, list] = {}
        for a, b, o, s in bodies:
            by_block.setdefault(b, []).append((a, o, s))
        payload = memoryview(data)[start:-32]
        for i, (boff, stored, raw, method) in enumerate(blocks):
            members = by_block.get(i, [])
            live = [m for m in members if m[0] in referenced]
            if not live:
                continue
            if len(live) == len(members):
                w.add_stored_block(method, bytes(payload[boff:boff + stored]), raw, live)
                continue
            block = decompress_block(method, bytes(payload[boff:boff + stored]), raw,
                                     f"chunk {e.name}")
            for a, o, s in live:
                w.move_body(a, block[o:o + s])
    return changed


# == verify with resumable sampling ====================================================

def verify(archive: Archive, *, sample: float | None = None,
           max_duration: float | None = None, state_file: str | os.PathLike | None = None,
           progress: Progress | None = None):
    """``verify_archive``, reading all body chunks or a random ``sample`` percent of
    their bytes, for at most ``max_duration`` seconds; progress through the body
    chunks is kept in ``state_file`` (default ARCHIVE/verify-state.json), so
    repeated runs cover every chunk before any is read twice."""
    if sample is not None and not 0 < sample <= 100:
        raise UsageError(f"--sample {sample}: give a percentage above 0 and at most 100")
    deadline = time.monotonic() + max_duration if max_duration is not None else None
    if sample is None and max_duration is None:
        return verify_archive(archive, progress=progress)
    path = Path(state_file) if state_file is not None else archive.path / "verify-state.json"
    state = _load_state(path, archive.id)

    def choose(entries: list[ChunkEntry]):
        live = {e.seq for e in entries}
        done = set(state["done"]) & live
        remaining = [e for e in entries if e.seq not in done]
        if not remaining:
            state["cycle"] += 1
            done = set()
            remaining = list(entries)
        state["done"] = sorted(done)
        random.Random(f"{archive.id}:{state['cycle']}").shuffle(remaining)
        if sample is None:
            return [e.seq for e in remaining]
        budget = sum(e.size for e in entries) * sample / 100
        out, total = [], 0
        for e in remaining:
            if out and total >= budget:
                break
            out.append(e.seq)
            total += e.size
        return out

    def verified(seq: int) -> None:
        state["done"].append(seq)

    rep = verify_archive(archive, select_body_chunks=choose, progress=progress,
                         deadline=deadline, on_chunk_verified=verified)
    rep.sample = sample
    rep.cycle_done = len(set(state["done"]))
    try:
        _save_state(path, state)
    except OSError as e:
        rep.notes.append(f"could not save sampling progress to {path} ({e.strerror}); the "
                         f"next run starts a new cycle")
    return rep


def _load_state(path: Path, archive_id: str) -> dict:
    try:
        state = json.loads(path.read_text())
        if state.get("archive") == archive_id and isinstance(state.get("done"), list):
            return state
    except (OSError, ValueError):
        pass
    return {"archive": archive_id, "cycle": 1, "done": []}


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


# == export and import =====================================================================

EXPORT_MAGIC = b"MSAXPRT1"
EXPORT_VERSION = 1
_U32 = struct.Struct(">I")
FRAME = struct.Struct(">cI")          # type, length
MAX_FRAME = 1 << 31


@dataclass
class ExportReport:
    user: str
    out: str
    points: int = 0
    bodies: int = 0
    body_bytes: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"user": self.user, "out": self.out, "points": self.points,
                "bodies": self.bodies, "body_bytes": self.body_bytes, "bytes": self.bytes,
                "seconds": round(self.seconds, 3)}


def export_user(archive: Archive, user: str, out: str | os.PathLike, *,
                progress: Progress | None = None, level: int = DEFAULT_LEVEL) -> ExportReport:
    """Write one user's points and the bodies they use as one checksummed file.

    Layout: ``MSAXPRT1``, a msgpack header, frames (``P``: a point's
    description and compressed change set; ``B``: a block of bodies, only
    this user's), ``E``, and blake3 of everything before it.  Written to a
    temporary name, fsynced, renamed.
    """
    from concurrent.futures import ThreadPoolExecutor
    t0 = time.monotonic()
    progress = progress or Progress()
    user = names.user(user)
    infos = archive.points(user)
    if not infos:
        raise NoSuchUser(f"archive {archive.path} holds no backup of user {user!r}",
                         subject=user)
    out = Path(out)
    report = ExportReport(user, str(out))
    tmp = out.with_name(out.name + ".tmp")
    h = blake3.blake3()
    with open(tmp, "wb") as fh:
        def put(b: bytes) -> None:
            fh.write(b)
            h.update(b)

        def frame(kind: bytes, payload: bytes) -> None:
            put(FRAME.pack(kind, len(payload)))
            put(payload)
        header = msgpack.packb([EXPORT_VERSION, user, archive.id, int(time.time()), len(infos)],
                               use_bin_type=True)
        put(EXPORT_MAGIC)
        put(_U32.pack(len(header)))
        put(header)
        refs: set[bytes] = set()
        for info in infos:
            _, payload, _ = archive.read_chunk(info.seq)
            cs = decode_point_payload(payload, f"chunk {info.seq}", validate=False)
            refs |= referenced_bodies(cs)
            frame(b"P", msgpack.packb([info.meta(), payload], use_bin_type=True))
            report.points += 1
        progress.start(f"export {user}", total_items=len(refs))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            packer = BodyPacker(pool, level)

            def drain():
                meta, parts, _ = packer.take()
                by_block: dict[int, list] = {}
                for a, b, o, s in meta["bodies"]:
                    by_block.setdefault(b, []).append([a, o, s])
                for i, (boff, stored, raw, method) in enumerate(meta["blocks"]):
                    frame(b"B", msgpack.packb([method, raw, by_block.get(i, []), parts[i]],
                                              use_bin_type=True))
            for a, data in archive.iter_bodies(sorted(refs)):
                packer.add(a, data)
                report.bodies += 1
                report.body_bytes += len(data)
                progress.advance(1, len(data))
                if packer.pending_raw >= 16 << 20:
                    drain()
            drain()
        progress.finish()
        frame(b"E", b"")
        fh.write(h.digest())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(out)
    report.bytes = out.stat().st_size
    report.seconds = time.monotonic() - t0
    return report


class ExportFile:
    """A checked export file, readable like an archive by ``restore``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            fh = open(self.path, "rb")
        except OSError as e:
            raise UsageError(f"{path}: cannot read the export file ({e.strerror})",
                             subject=str(path))
        self._fh = fh
        size = os.fstat(fh.fileno()).st_size
        if size < len(EXPORT_MAGIC) + 4 + 32 or fh.read(len(EXPORT_MAGIC)) != EXPORT_MAGIC:
            fh.close()
            raise ProtocolError(f"{path} is not a modsync export file (wrong magic or too "
                                f"short)", subject=str(path))
        h = blake3.blake3()
        fh.seek(0)
        remaining = size - 32
        while remaining:
            b = fh.read(min(remaining, 8 << 20))
            if not b:
                break
            h.update(b)
            remaining -= len(b)
        if h.digest() != fh.read(32):
            fh.close()
            raise ProtocolError(f"{path}: checksum mismatch: the export file is damaged or "
                                f"truncated", subject=str(path))
        self._parse(size - 32)

    def _parse(self, end: int) -> None:
        fh = self._fh
        fh.seek(len(EXPORT_MAGIC))
        try:
            n = _U32.unpack(fh.read(4))[0]
            version, user, archive_id, created, npoints = msgpack.unpackb(fh.read(n), raw=False)
            if version != EXPORT_VERSION:
                raise ProtocolError(f"{self.path}: export format {version} is not supported "
                                    f"(this modsync reads {EXPORT_VERSION})")
            self.user, self.source_archive, self.created = user, archive_id, created
            self._points: list[tuple[PointInfo, bytes]] = []
            self._bodies: dict[bytes, tuple[int, int, int, int, int, int]] = {}
            self.blocks: list[tuple[int, int, int, int, list]] = []
            while True:
                kind, length = FRAME.unpack(fh.read(FRAME.size))
                pos = fh.tell()
                if kind == b"E":
                    break
                if pos + length > end or length > MAX_FRAME:
                    raise ValueError("a frame runs past the end of the file")
                if kind == b"P":
                    meta, payload = msgpack.unpackb(fh.read(length), raw=False,
                                                    strict_map_key=False)
                    info = PointInfo.from_meta(len(self._points), meta)
                    self._points.append((info, bytes(payload)))
                elif kind == b"B":
                    method, raw, directory, stored = msgpack.unpackb(fh.read(length), raw=False)
                    # The stored bytes are the last thing in the frame.
                    soff = pos + length - len(stored)
                    self.blocks.append((method, raw, soff, len(stored),
                                        [(bytes(a), o, s) for a, o, s in directory]))
                    for a, o, s in directory:
                        self._bodies[bytes(a)] = (method, raw, soff, len(stored), o, s)
                else:
                    raise ValueError(f"unknown frame type {kind!r}")
        except ProtocolError:
            raise
        except (struct.error, ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise ProtocolError(f"{self.path}: the export file is malformed ({e})",
                                subject=str(self.path))
        if len(self._points) != npoints:
            raise ProtocolError(f"{self.path}: holds {len(self._points)} points, its header "
                                f"says {npoints}")
        self._block_cache = None

    def close(self) -> None:
        self._fh.close()

    def users(self) -> list[str]:
        return [self.user]

    def points(self, user: str) -> list[PointInfo]:
        return [p for p, _ in self._points] if user == self.user else []

    def read_point(self, info: PointInfo, *, keep=None) -> ChangeSet:
        # The file's checksum was verified when it was opened.
        return decode_point_payload(self._points[info.seq][1], f"{self.path} point {info.point}",
                                    validate=False, keep=keep)

    def point_payload(self, info: PointInfo) -> bytes:
        return self._points[info.seq][1]

    def stored_block(self, i: int) -> bytes:
        _, _, soff, slen, _ = self.blocks[i]
        return os.pread(self._fh.fileno(), slen, soff)

    def _block(self, method, raw, soff, slen) -> bytes:
        if self._block_cache is not None and self._block_cache[0] == soff:
            return self._block_cache[1]
        block = decompress_block(method, os.pread(self._fh.fileno(), slen, soff), raw,
                                 str(self.path))
        self._block_cache = (soff, block)
        return block

    def iter_bodies(self, addresses) -> Iterator[tuple[bytes, bytes]]:
        places = []
        for a in addresses:
            p = self._bodies.get(a)
            if p is None:
                raise NoSuchMessage(f"body {a.hex()} is not in {self.path}", subject=a.hex())
            places.append((a, p))
        places.sort(key=lambda ap: (ap[1][2], ap[1][4]))
        for a, (method, raw, soff, slen, o, s) in places:
            data = self._block(method, raw, soff, slen)[o:o + s]
            if address_of(data) != a:
                raise ProtocolError(f"{self.path}: body {a.hex()} does not match its address")
            yield a, data

    def read_bodies(self, addresses) -> dict[bytes, bytes]:
        return dict(self.iter_bodies(addresses))

    def read_body(self, address: bytes) -> bytes:
        return self.read_bodies([address])[address]


@dataclass
class ImportReport:
    file: str
    user: str
    archive: str | None = None
    points: int = 0
    skipped_points: int = 0
    bodies: int = 0
    restore: dict | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"file": self.file, "user": self.user, "archive": self.archive,
                "points": self.points, "skipped_points": self.skipped_points,
                "bodies": self.bodies, "restore": self.restore,
                "seconds": round(self.seconds, 3)}


def import_export(path: str | os.PathLike, *, archive: Archive | None = None,
                  store: Store | None = None, as_user: str | None = None,
                  at: str | None = None, progress: Progress | None = None) -> ImportReport:
    """Take an export file into an archive (its points and bodies) or a store (the
    user's state at its latest point, or ``at``, under ``restore``'s rules).

    Into an archive that already has points for the user, only points that
    continue its last one are added (importing the same file twice adds
    nothing); a file whose history diverges is refused: import it under
    another name with ``as_user``.
    """
    t0 = time.monotonic()
    if (archive is None) == (store is None):
        raise UsageError("import of an export file needs --archive or --store")
    ef = ExportFile(path)
    try:
        user = names.user(as_user) if as_user else ef.user
        report = ImportReport(str(path), user)
        if store is not None:
            if user != ef.user:
                raise UsageError("--user to rename goes with --archive; a store restore keeps "
                                 "the user name")
            r = restore(ef, user, at=at, store=store, progress=progress)
            report.restore = r.as_dict()
        else:
            report.archive = str(archive.path)
            _import_into_archive(ef, archive, user, report)
    finally:
        ef.close()
    report.seconds = time.monotonic() - t0
    return report


def _import_into_archive(ef: ExportFile, archive: Archive, user: str,
                         report: ImportReport) -> None:
    infos = ef.points(ef.user)
    existing = archive.points(user)
    start = 0
    if existing:
        last = existing[-1]
        match = [i for i, p in enumerate(infos) if p.state == last.state]
        if not match:
            raise ModsyncError(f"archive {archive.path} already holds user {user!r} with a "
                               f"history this file does not continue; import it under another "
                               f"name with --user NEWNAME", subject=user)
        start = match[-1] + 1
        report.skipped_points = start
    with archive.writer() as w:
        for i, (method, raw, _, _, directory) in enumerate(ef.blocks):
            missing = [d for d in directory if not w.has_body(d[0])]
            if not missing:
                continue
            if len(missing) == len(directory):
                w.add_stored_block(method, ef.stored_block(i), raw, directory)
            else:
                for a, data in ef.iter_bodies([d[0] for d in missing]):
                    w.add_new_body(a, data)
            report.bodies += len(missing)
        for info in infos[start:]:
            payload = ef.point_payload(info)
            if user != ef.user:
                cs = ef.read_point(info)
                cs.user = user
                payload = encode_point_payload(cs, w.level)
            new = PointInfo(user, w.next_point_number(user), 0, info.time, info.modseq,
                            encode_token(user, info.state), info.full, dict(info.state),
                            info.digest, info.items, info.new_bodies, info.new_bytes,
                            dict(info.base))
            w.add_point(new, payload)
            report.points += 1
        w.commit()
