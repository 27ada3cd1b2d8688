"""The client side of the archive service: an archive a `modsync serve --archives` holds.

``RemoteArchive`` is a backup target: ``engine.backup.backup`` writes to it
as to an archive on this machine (``engine.backup.LocalTarget`` has the same
methods), sending for each user only the changes since the archive's last
point and the bodies the archive lacks.  It also lists points and asks for
compaction.  What the account may do is the server's to decide
(``engine.archive_service``): an append-only account may add points and
nothing else.

Archives are named by ``modsync://HOST:PORT/NAME`` (``[IPv6]:PORT`` too):
NAME is the archive in the server's ``--archives`` directory.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

from . import archive_protocol as A
from . import protocol as P
from .backup import (PROGRESS_MIN_BODIES, CompactReport, RetentionPolicy, needed_bodies,
                     source_bodies)
from .changeset import ChangeSet
from .client import DEFAULT_TIMEOUT, SEND_BUFFER, Client, Disconnected, RemoteError, parse_address
from .errors import ModsyncError, ProtocolError, UsageError
from .progress import Progress

SCHEME = "modsync://"

#: Seconds to wait for the answer to a pushed point: the server writes every
#: new body (compressing it) after the change set has arrived, a few seconds
#: for a 220 MB first backup here, so an hour bounds any real user.
POINT_TIMEOUT = 3600.0
#: Seconds to wait for a compaction, which rewrites chunks before answering.
COMPACT_TIMEOUT = 24 * 3600.0
def parse_url(text: str) -> tuple[str, str]:
    """(HOST:PORT, archive name) of ``modsync://HOST:PORT/NAME``."""
    address, sep, name = text[len(SCHEME):].partition("/")
    if not text.startswith(SCHEME) or not sep or not name:
        raise UsageError(f"{text!r}: name a served archive as modsync://HOST:PORT/NAME (NAME: "
                         f"an archive in the server's --archives directory)", subject=text)
    if parse_address(address)[0] != "tcp":
        raise UsageError(f"{text!r}: a served archive is reached over TCP (HOST:PORT)",
                         subject=text)
    if not A.NAME.fullmatch(name):
        raise UsageError(f"{text!r}: an archive name is 1 to 128 letters, digits, '.', '_' or "
                         f"'-', not starting with '.', '_' or '-'", subject=text)
    return address, name


class RemoteArchive:
    """A logged-in connection to one served archive.  Not thread-safe.

    Opening it checks the archive exists (``create``: or creates it, as a
    first backup does).  ``append_only``, ``locked``, ``created`` and ``id``
    describe it as the server does for this account.  Refusals raise
    ``engine.client.RemoteError`` with the server's code (``append-only``,
    ``acl``, ``not-an-archive``, ``archive-busy``, ``does-not-continue``...).
    """

    def __init__(self, url: str, *, account: str, password: str, tls=None,
                 timeout: float = DEFAULT_TIMEOUT, create: bool = False):
        self.address, self.name = parse_url(url)
        self.path = f"{SCHEME}{self.address}/{self.name}"
        self.bytes_written = 0
        self._pool: ThreadPoolExecutor | None = None
        self.client = Client(self.address, account=account, password=password, tls=tls,
                             timeout=timeout)
        try:
            info = self._request(A.ArchiveOpen(self.name, create), A.ArchiveInfo)
        except BaseException:
            self.client.close()
            raise
        self.id, self.created = info.id, info.created
        self.append_only, self.locked = info.append_only, info.locked

    # -- the conversation ----------------------------------------------------------------
    def _request(self, ev: P.Event, want: type, *, timeout: float | None = None):
        self.client._send(ev)
        return self._reply(want, timeout=timeout)

    def _reply(self, want: type, *, timeout: float | None = None):
        client = self.client
        saved = client.timeout
        if timeout is not None:
            client.timeout = timeout
            client.sock.settimeout(timeout)
        try:
            return client._reply(want)
        except RemoteError as e:
            if e.code == "protocol" and "unknown message" in e.text:
                raise ModsyncError(f"the server at {self.address} does not serve archives "
                                   f"(it is a modsync without the archive service: {e.text})",
                                   subject=self.address) from None
            raise
        finally:
            if timeout is not None and client.sock is not None:
                client.timeout = saved
                client.sock.settimeout(saved)

    def _send_changeset(self, cs: ChangeSet, read_body) -> None:
        """Stream ``cs``; if reading a body fails, end it ABORTED (the server keeps
        nothing of it and says so) and raise what failed."""
        conn, buf, size = self.client.conn, [], 0
        try:
            for ev in P.changeset_events(cs, read_body):
                data = conn.send(ev)
                buf.append(data)
                size += len(data)
                if size >= SEND_BUFFER:
                    self.client._sendall(b"".join(buf))
                    buf, size = [], 0
        except Disconnected:
            raise
        except ModsyncError:
            if conn.sending_changeset and not conn.closed:
                buf.append(conn.send(P.ChangeSetEnd(aborted=True)))
                self.client._sendall(b"".join(buf))
                try:
                    self._reply(P.No)
                except ModsyncError:
                    pass
            raise
        if buf:
            self.client._sendall(b"".join(buf))

    # -- what a backup needs (engine.backup.LocalTarget's interface) ---------------------
    def last_state(self, user: str) -> dict | None:
        """The version vector of the user's last point (None: the archive has none)."""
        listing = self._request(A.ArchivePoints(self.name, user, True), A.PointList).listing
        points = _points_of(listing, user)
        return dict(points[-1]["state"]) if points else None

    def missing(self, addresses: list[bytes]) -> list[bytes]:
        """Those of ``addresses`` the archive lacks, in order."""
        out = []
        for i in range(0, len(addresses), A.MAX_ADDRESSES):
            asked = addresses[i:i + A.MAX_ADDRESSES]
            got = self._request(A.ArchiveMissing(self.name, tuple(asked)), A.MissingBodies)
            if not set(got.bodies) <= set(asked):
                raise ProtocolError(f"{self.path}: the server lists as missing bodies it was "
                                    f"not asked about")
            out.extend(got.bodies)
        return out

    def add_point(self, user: str, cs: ChangeSet, *, base: dict, modseq: int, get_body,
                  checked: bool, progress: Progress | None = None) -> dict:
        """Send ``cs`` (from ``base``: the last point's state, or ``{}``) and the bodies
        the archive lacks; the server stores it as the user's next point.  The
        backup's entry for the user."""
        progress = progress or Progress()
        needed, sizes = needed_bodies(cs)
        missing = self.missing(needed)
        big = len(missing) >= PROGRESS_MIN_BODIES
        fetched = source_bodies(get_body, missing, self._readers() if checked else None,
                                checked, user)

        def read_body(address: bytes) -> bytes:
            a, data = next(fetched)
            if a != address:
                raise ProtocolError(f"body {address.hex()} of user {user!r} asked for out of "
                                    f"order", subject=address.hex())
            if big:
                progress.advance(1, len(data))
            return data
        if big:
            progress.start(f"backup {user} to {self.path}", total_items=len(missing),
                           total_bytes=sum(sizes[a] for a in missing))
        try:
            self.client._send(A.ArchivePush(self.name, user, modseq))
            self._send_changeset(dataclasses.replace(cs, base=dict(base), bodies=missing),
                                 read_body)
        finally:
            if big:
                progress.finish()
        added = self._reply(A.PointAdded, timeout=POINT_TIMEOUT)
        self.bytes_written += added.written
        self.created = self.created or added.created
        return _entry(added.point, user)

    def abandon(self) -> None:
        """After a failed user: nothing to undo (the server kept nothing of it)."""

    # -- listing and compaction -----------------------------------------------------------------
    def list_points(self, user: str | None = None) -> dict:
        """What ``engine.backup.list_points`` returns for a local archive."""
        listing = self._request(A.ArchivePoints(self.name, user, False), A.PointList).listing
        for u in listing.get("users", []):
            _points_of(listing, u.get("user"))
            for p in u["points"]:
                p.pop("state", None)
        return {"archive": self.path} | listing

    def compact(self, policy: RetentionPolicy, *, users: list[str] | None = None,
                dry_run: bool = False, repack_unused: float = 0.05,
                admin_key: bytes | None = None) -> CompactReport:
        keep = {k: v for k, v in (("last", policy.keep_last), ("daily", policy.keep_daily),
                                  ("weekly", policy.keep_weekly),
                                  ("monthly", policy.keep_monthly)) if v}
        if policy.keep_days is not None:
            keep["seconds"] = round(policy.keep_days * 86400)
        ev = A.ArchiveCompact(self.name, keep, tuple(users) if users is not None else None,
                              dry_run, round(repack_unused * A.PPM), admin_key)
        report = self._request(ev, A.Compacted, timeout=COMPACT_TIMEOUT).report
        try:
            fields = {f.name: report[f.name] for f in dataclasses.fields(CompactReport)
                      if f.name not in ("archive", "dry_run", "policy", "seconds")}
            return CompactReport(self.path, dry_run, policy.as_dict(), seconds=report["ms"] / 1000,
                                 **fields)
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"{self.path}: malformed compaction report ({e})") from None

    # -- the rest ----------------------------------------------------------------------------
    def _readers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _points_of(listing: dict, user: str) -> list[dict]:
    """The points a server listed for ``user``, their shape checked."""
    try:
        for u in listing["users"]:
            if u["user"] == user:
                for p in u["points"]:
                    if type(p["point"]) is not int or type(p["state"]) is not dict or any(
                            type(o) is not str or type(n) is not int
                            for o, n in p["state"].items()):
                        raise TypeError("a point without a number or state")
                return u["points"]
    except (KeyError, TypeError) as e:
        raise ProtocolError(f"the server sent a malformed list of points ({e})") from None
    return []


_ENTRY = {"user": str, "point": int, "full": bool, "modseq": int, "items": int,
          "new_bodies": int, "new_bytes": int}


def _entry(point: dict, user: str) -> dict:
    """The server's description of a point it added, checked (as backup reports it)."""
    if point.get("user") != user:
        raise ProtocolError(f"the server answered for user {point.get('user')!r}, not {user!r}")
    if point.get("point") is None and point.get("unchanged") is True:
        return {"user": user, "point": None, "unchanged": True}
    if set(point) != set(_ENTRY) or any(type(point[k]) is not t for k, t in _ENTRY.items()):
        raise ProtocolError(f"the server's description of the new point of {user!r} is "
                            f"malformed")
    return dict(point)
