"""The archive service's messages: backups into archives a `modsync serve` holds.

Like ``engine.protocol`` (which frames, checks and orders them: this module
registers them there when imported), these are immutable events with no
I/O.  A server started with ``--archives DIR`` answers them
(``engine.archive_service``); ``engine.archive_client.RemoteArchive`` asks
them.  They belong to protocol version 2 and later::

    C: ARCHIVEOPEN %(ARCHIVE name CREATE T|F)
                                S: ARCHIVEINFO %(ARCHIVE name ID hex CREATED T|F
                                                 APPENDONLY T|F LOCKED T|F)
    C: ARCHIVEPOINTS %(ARCHIVE name USER u|NIL LAST T|F)
                                S: POINTS %(ARCHIVE name LISTING %(...))
    C: ARCHIVEMISSING %(ARCHIVE name BODIES (address ...))
                                S: MISSING %(ARCHIVE name BODIES (address ...))
    C: ARCHIVEPUSH %(ARCHIVE name USER u MODSEQ n) + change set
                                S: POINTADDED %(ARCHIVE name USER u POINT %(...) WRITTEN n
                                                CREATED T|F)
    C: ARCHIVECOMPACT %(ARCHIVE name KEEP %(...) USERS (u ...)|NIL DRYRUN T|F
                        REPACK ppm ADMINKEY {n}|NIL)
                                S: COMPACTED %(ARCHIVE name REPORT %(...))
    any of them may be answered NO %(CODE TEXT), the connection carrying on:
    codes acl (neither an admin nor an append-only account), append-only (a
    removal or rewrite asked by an append-only account), not-an-archive,
    archive-busy, does-not-continue, no-archives (the server holds none) ...

A backup of one user is ARCHIVEPOINTS (LAST: the state the next point
continues from), ARCHIVEMISSING (which of the bodies the point needs the
archive lacks), then ARCHIVEPUSH with the change set from that state and
exactly those bodies.  The server numbers and times the point; a client can
add points, and nothing it sends names an existing one.  LISTING is what
`modsync backup list --json` shows of a local archive (each point with its
``state`` added); KEEP is a retention policy (``last``, ``daily``,
``weekly``, ``monthly``, and ``seconds`` for --keep-days); REPORT is
compaction's report, with ``ms`` for its duration.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import protocol as P
from .wire import WireError

#: Archive names: one path component under the server's --archives directory.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: Addresses per ARCHIVEMISSING / MISSING message: 100,000 are 3.4 MB of
#: frame, well under protocol.MAX_FRAME (16 MiB); a first backup of a larger
#: user asks in several messages.
MAX_ADDRESSES = 100_000

#: Parts per million in REPACK (compact --repack-unused is a percentage).
PPM = 1_000_000

KEEP_KEYS = ("last", "daily", "weekly", "monthly", "seconds")


# -- field checks (protocol.register_message takes them as field types) ---------------------
def archive_name(field_name: str, value) -> str:
    if type(value) is not str or not NAME.fullmatch(value):
        raise WireError(f"{field_name}: an archive name is 1 to 128 letters, digits, '.', "
                        f"'_' or '-', not starting with '.', '_' or '-'")
    return value


def addresses(field_name: str, value) -> tuple:
    if type(value) is not list or len(value) > MAX_ADDRESSES or \
            any(type(a) is not bytes or len(a) != 32 for a in value):
        raise WireError(f"{field_name}: a list of at most {MAX_ADDRESSES} 32-byte addresses")
    return tuple(value)


def mapping(field_name: str, value) -> dict:
    """A dict whose meaning the receiving side checks where it uses it."""
    if type(value) is not dict:
        raise WireError(f"{field_name}: must be a dict")
    return value


def optional_bytes(field_name: str, value) -> bytes | None:
    if value is not None and type(value) is not bytes:
        raise WireError(f"{field_name}: must be a literal or NIL")
    return value


def keep_policy(field_name: str, value) -> dict:
    if type(value) is not dict or set(value) - set(KEEP_KEYS) or \
            any(type(n) is not int or n < 0 for n in value.values()):
        raise WireError(f"{field_name}: a retention policy: {', '.join(KEEP_KEYS)} as "
                        f"numbers")
    return value


def parts_per_million(field_name: str, value) -> int:
    if type(value) is not int or not 0 <= value <= PPM:
        raise WireError(f"{field_name}: parts per million, 0 to {PPM}")
    return value


# -- events --------------------------------------------------------------------------------
class ArchiveRequest(P.Event):
    """A client's request to the archive service (every one names its archive)."""

    archive: str


@dataclass(frozen=True)
class ArchiveOpen(ArchiveRequest):
    archive: str
    create: bool = False


@dataclass(frozen=True)
class ArchivePoints(ArchiveRequest):
    archive: str
    user: str | None = None
    last: bool = False


@dataclass(frozen=True)
class ArchiveMissing(ArchiveRequest):
    archive: str
    bodies: tuple = field(default=(), repr=False)


@dataclass(frozen=True)
class ArchivePush(ArchiveRequest):
    """A change set for ``user`` follows; ``modseq`` is the source's modseq for it."""
    archive: str
    user: str
    modseq: int = 0


@dataclass(frozen=True)
class ArchiveCompact(ArchiveRequest):
    archive: str
    keep: dict = field(default_factory=dict)
    users: tuple | None = None
    dry_run: bool = False
    repack: int = 50_000
    admin_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ArchiveInfo(P.Event):
    archive: str
    id: str
    created: bool = False
    append_only: bool = False
    locked: bool = False


@dataclass(frozen=True)
class PointList(P.Event):
    archive: str
    listing: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MissingBodies(P.Event):
    archive: str
    bodies: tuple = field(default=(), repr=False)


@dataclass(frozen=True)
class PointAdded(P.Event):
    """``point`` is the backup's entry for the user (``point`` None: unchanged)."""
    archive: str
    user: str
    point: dict = field(default_factory=dict)
    written: int = 0
    created: bool = False


@dataclass(frozen=True)
class Compacted(P.Event):
    archive: str
    report: dict = field(default_factory=dict)


_A = ("ARCHIVE", "archive", archive_name, True)
for _cls, _name, _sender, _fields in (
        (ArchiveOpen, "ARCHIVEOPEN", P.C, (_A, ("CREATE", "create", bool, False))),
        (ArchivePoints, "ARCHIVEPOINTS", P.C, (_A, ("USER", "user", "str?", False),
                                               ("LAST", "last", bool, False))),
        (ArchiveMissing, "ARCHIVEMISSING", P.C, (_A, ("BODIES", "bodies", addresses, True))),
        (ArchivePush, "ARCHIVEPUSH", P.C, (_A, ("USER", "user", str, True),
                                           ("MODSEQ", "modseq", int, False))),
        (ArchiveCompact, "ARCHIVECOMPACT", P.C, (
            _A, ("KEEP", "keep", keep_policy, True), ("USERS", "users", "strs?", False),
            ("DRYRUN", "dry_run", bool, False), ("REPACK", "repack", parts_per_million, False),
            ("ADMINKEY", "admin_key", optional_bytes, False))),
        (ArchiveInfo, "ARCHIVEINFO", P.S, (_A, ("ID", "id", str, True),
                                           ("CREATED", "created", bool, False),
                                           ("APPENDONLY", "append_only", bool, False),
                                           ("LOCKED", "locked", bool, False))),
        (PointList, "POINTS", P.S, (_A, ("LISTING", "listing", mapping, True))),
        (MissingBodies, "MISSING", P.S, (_A, ("BODIES", "bodies", addresses, True))),
        (PointAdded, "POINTADDED", P.S, (_A, ("USER", "user", str, True),
                                         ("POINT", "point", mapping, True),
                                         ("WRITTEN", "written", int, False),
                                         ("CREATED", "created", bool, False))),
        (Compacted, "COMPACTED", P.S, (_A, ("REPORT", "report", mapping, True)))):
    P.register_message(_cls, _name, _sender, 2, _fields)
del _cls, _name, _sender, _fields
