"""The store: users' mail metadata in LMDB, bodies in the blob store.

This is modsync's public embedding API::

    from engine import Store
    store = Store.init("/srv/modsync")           # or Store.open(path)
    inbox = store.create_mailbox("alice", "INBOX")
    rec = store.append("alice", "INBOX", b"From: ...", flags=["\\\\Seen"])
    store.set_flags("alice", "INBOX", [rec.uid], ["$Junk"], mode="add")
    for change in store.changes_since("alice", 0): ...

Every public mutation is one call of ``Store.mutate``: one LMDB transaction,
one modseq (see ``engine.mutation``).  Reads take a consistent snapshot each.

On disk (see ARCHITECTURE.md and schemas/store-v1.md)::

    STORE/FORMAT        marker: "modsync-store <version>" and the store id
    STORE/db/           the LMDB environment
    STORE/blobs/*.pack  compressed bodies
"""
from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from . import names, uidset
from .blobs import BlobStore, Location, Pending, address_of, sha1_of
from .db import Database, Txn, prefix_end
from .errors import (
    MailboxExists, NoSuchMailbox, NoSuchMessage, NoSuchObject, NotAStore, SchemaVersionError,
    StoreCorrupt, UsageError,
)
from .model import (
    ACL, ANNOTATION, KIND_CLASSES, KIND_NAMES, MAILBOX, QUOTA, RECORD, SEEN, SIEVE,
    SUBSCRIPTION, U32, U64, AclEntry, Annotation, Mailbox, QuotaRoot, Record, SeenSet,
    SieveScript, Subscription, _pack, normalize_flags, stamp_of, unpackb, validated_flags,
)
from .mutation import Mutation, UserRecord, check_since, object_key, require_user
from . import crc as cyrus_crc

T = TypeVar("T")

SCHEMA_VERSION = 1
FORMAT_FILE = "FORMAT"
FORMAT_MAGIC = "modsync-store"

# Index keys (table "index").
IX_NAME = b"n"        # user | name -> mailbox number (live mailboxes)
IX_UNIQUEID = b"u"    # unique id -> user | mailbox number (also tombstones)
IX_UIDVALIDITY = b"v" # user | name -> highest uidvalidity ever used for the name


@dataclass(frozen=True, slots=True)
class Change:
    """One object changed since a modseq: its kind, and its current state (maybe a tombstone).

    ``mailbox`` is the mailbox the object belongs to, for records, ACL
    entries and annotations (possibly a tombstone itself).
    """

    modseq: int
    kind: str
    object: object
    mailbox: Mailbox | None = None


@dataclass(frozen=True, slots=True)
class ChangeList:
    """Changes since a modseq, and the user's modseq and horizon when they were read."""

    changes: list
    modseq: int
    horizon: int


@dataclass(frozen=True, slots=True)
class Message:
    """A message to append: body bytes and metadata."""

    body: bytes
    flags: tuple = ()
    internaldate: int | None = None
    annotations: tuple = ()
    address: bytes | None = None    # blake3 of body, if the caller computed it already


@dataclass(slots=True)
class PreparedAppend:
    """Messages checked and hashed by ``Store.prepare_append``, bodies being compressed."""

    messages: list          # (Message, address, sha1, flags)
    missing: list           # addresses of the bodies the store lacked when prepared
    compressed: Pending     # .result(): (method, payload) per missing body, in order


ACL_RIGHTS = "lrswipkxtecdan0123456789"


def _address(msg: Message) -> bytes:
    address = address_of(msg.body)
    if msg.address is not None and msg.address != address:
        raise UsageError("a message's given content address does not match its body")
    return address


def _flags(flags) -> tuple:
    try:
        return validated_flags(flags)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_entry(entry: str) -> None:
    if not entry.startswith("/") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in entry):
        raise UsageError(f"annotation entry {entry!r} must start with '/' and hold no control "
                         f"characters (e.g. /comment)")


def new_unique_id() -> str:
    """A mailbox unique id in Cyrus 3.6's form: 24 characters of [0-9a-z] (~124 bits)."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    n = secrets.randbits(124)
    out = []
    for _ in range(24):
        n, r = divmod(n, 36)
        out.append(alphabet[r])
    return "".join(out)


class Store:
    """An initialised modsync store.  Thread-safe; one writer at a time."""

    def __init__(self, path: Path, db: Database, blobs: BlobStore, store_id: str):
        self.path = path
        self.db = db
        self.blobs = blobs
        self.id = store_id
        self._lock = threading.RLock()

    # -- opening ----------------------------------------------------------------
    @classmethod
    def init(cls, path: str | os.PathLike, *, compression_level: int = 3) -> "Store":
        """Create a store in an empty (or missing) directory."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if (path / FORMAT_FILE).exists():
                raise UsageError(f"{path} is already a modsync store", subject=path)
            raise UsageError(f"{path} is not empty; a store needs an empty directory",
                             subject=path)
        path.mkdir(parents=True, exist_ok=True)
        store_id = secrets.token_hex(16)
        db = Database(path / "db", create=True)

        def setup(txn: Txn):
            txn.put("meta", b"schema", U32.pack(SCHEMA_VERSION))
            txn.put("meta", b"store_id", bytes.fromhex(store_id))
            txn.put("meta", b"created", U64.pack(int(time.time())))
            txn.put("meta", b"compression_level", U32.pack(compression_level))
            txn.put("meta", b"next_user", U32.pack(1))
            txn.put("meta", b"next_mailbox", U64.pack(1))
            txn.put("meta", b"origin:" + bytes.fromhex(store_id), U32.pack(0))
            txn.put("meta", b"origin#" + U32.pack(0), bytes.fromhex(store_id))
            txn.put("meta", b"next_origin", U32.pack(1))
        db.write(setup)
        # The marker is written last, so a crash during init leaves no half store
        # that later commands would accept.
        tmp = path / (FORMAT_FILE + ".tmp")
        tmp.write_text(f"{FORMAT_MAGIC} {SCHEMA_VERSION}\nid {store_id}\n")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.rename(path / FORMAT_FILE)
        from .blobs import fsync_dir
        fsync_dir(path)
        return cls(path, db, BlobStore(path / "blobs", level=compression_level), store_id)

    @classmethod
    def open(cls, path: str | os.PathLike, *, readonly: bool = False) -> "Store":
        """Open an initialised store; NotAStore for anything else (e.g. an unmounted volume)."""
        path = Path(path)
        marker = path / FORMAT_FILE
        if not path.is_dir():
            raise NotAStore(f"{path}: no such directory; create a store with "
                            f"`modsync init --store {path}` or check the mount", subject=path)
        if not marker.is_file():
            raise NotAStore(f"{path} is not a modsync store (no {FORMAT_FILE} file); create one "
                            f"with `modsync init --store {path}`, or check that the volume is "
                            f"mounted", subject=path)
        try:
            head = marker.read_text().split()
        except (OSError, UnicodeDecodeError) as e:
            raise NotAStore(f"{marker}: unreadable ({e})", subject=path)
        if len(head) < 4 or head[0] != FORMAT_MAGIC or head[2] != "id":
            raise NotAStore(f"{marker}: not a modsync store marker", subject=path)
        if not head[1].isdigit() or int(head[1]) > SCHEMA_VERSION:
            raise SchemaVersionError(f"{path}: store schema version {head[1]} is newer than this "
                                     f"modsync understands ({SCHEMA_VERSION}); upgrade modsync",
                                     subject=path)
        db = Database(path / "db", readonly=readonly)
        with db.read() as txn:
            level = U32.unpack(txn.get("meta", b"compression_level") or U32.pack(3))[0]
            sid = txn.get("meta", b"store_id")
            schema = txn.get("meta", b"schema")
        if schema is None or U32.unpack(schema)[0] > SCHEMA_VERSION:
            db.close()
            raise SchemaVersionError(f"{path}: the database's schema version is newer than "
                                     f"this modsync understands ({SCHEMA_VERSION}); upgrade "
                                     f"modsync", subject=path)
        if sid is None or sid.hex() != head[3]:
            raise NotAStore(f"{path}: database and {FORMAT_FILE} disagree about the store id",
                            subject=path)
        return cls(path, db, BlobStore(path / "blobs", level=level), head[3])

    def close(self) -> None:
        self.blobs.close()
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the write path ---------------------------------------------------------
    def mutate(self, user: str, fn: Callable[[Mutation], T], *, create_user: bool = False,
               modseq: int | None = None) -> T:
        """Run fn(mutation) as one atomic change of one user's data; return its result.

        Bodies appended during fn are made durable before the transaction
        commits.  If nothing was changed, nothing is written and no modseq is used.
        """
        user = names.user(user)
        with self._lock:
            def run(txn: Txn):
                m = self._mutation(txn, user, create_user, modseq)
                result = fn(m)
                m.finish()
                return result
            return self.db.write(run, before_commit=self.blobs.sync)

    def mutate_users(self, users, fn: Callable[[dict], T], *, create_user: bool = False) -> T:
        """Run fn({user: mutation}) as one atomic change of several users' data.

        For what moves between users (a Cyrus master moving a folder from one
        user to another): each user still gets a mutation of its own, with its
        own modseq and change log, and all of them commit together or not at all.
        """
        wanted = list(dict.fromkeys(names.user(u) for u in users))
        with self._lock:
            def run(txn: Txn):
                ms = {user: self._mutation(txn, user, create_user) for user in wanted}
                result = fn(ms)
                for m in ms.values():
                    m.finish()
                return result
            return self.db.write(run, before_commit=self.blobs.sync)

    def _mutation(self, txn: Txn, user: str, create_user: bool,
                  modseq: int | None = None) -> Mutation:
        rec = self._user(txn, user)
        if rec is None:
            if not create_user:
                require_user(None, user)
            rec = self._create_user(txn, user)
        return Mutation(self, txn, rec, modseq=modseq)

    def _create_user(self, txn: Txn, name: str) -> UserRecord:
        num = U32.unpack(txn.get("meta", b"next_user"))[0]
        txn.put("meta", b"next_user", U32.pack(num + 1))
        rec = UserRecord(name, num, created=int(time.time()))
        txn.put("users", name.encode(), rec.pack())
        return rec

    def _user(self, txn: Txn, name: str) -> UserRecord | None:
        raw = txn.get("users", name.encode())
        return None if raw is None else UserRecord.unpack(name, raw)

    def _next_mailbox_num(self, txn: Txn) -> int:
        num = U64.unpack(txn.get("meta", b"next_mailbox"))[0]
        txn.put("meta", b"next_mailbox", U64.pack(num + 1))
        return num

    @staticmethod
    def _mailbox_num(txn: Txn, user: UserRecord, name: str) -> int | None:
        raw = txn.get("index", IX_NAME + user.prefix + name.encode())
        return None if raw is None else U64.unpack(raw)[0]

    # -- origins (other stores whose changes we hold) -----------------------------
    def origin_number(self, txn: Txn, store_id: str) -> int:
        """The local number of a store id, allocated on first sight (write txns only)."""
        raw = txn.get("meta", b"origin:" + bytes.fromhex(store_id))
        if raw is not None:
            return U32.unpack(raw)[0]
        num = U32.unpack(txn.get("meta", b"next_origin"))[0]
        txn.put("meta", b"next_origin", U32.pack(num + 1))
        txn.put("meta", b"origin:" + bytes.fromhex(store_id), U32.pack(num))
        txn.put("meta", b"origin#" + U32.pack(num), bytes.fromhex(store_id))
        return num

    def origin_id(self, txn: Txn, num: int) -> str:
        raw = txn.get("meta", b"origin#" + U32.pack(num))
        if raw is None:
            raise NoSuchObject(f"origin #{num} unknown in this store")
        return raw.hex()

    # -- blobs --------------------------------------------------------------------
    def put_body(self, txn: Txn, body: bytes, address: bytes | None = None,
                 sha1: bytes | None = None, packed=None) -> tuple[bytes, bytes]:
        """Store a body unless present; return (address, sha1).  Inside a write txn.

        ``packed`` is the body already compressed by ``BlobStore.compress_many``.
        """
        if address is None:
            address = address_of(body)
        if txn.get("blobs", address) is None:
            if sha1 is None:
                sha1 = sha1_of(body)
            loc = self.blobs.append(address, body, packed=packed)
            txn.put("blobs", address, _pack(loc.to_list() + [sha1, int(time.time()), 0]))
            txn.put("sha1", sha1, address)
        elif sha1 is None:
            sha1 = unpackb(txn.get("blobs", address))[5]
        return address, sha1

    def has_body(self, address: bytes) -> bool:
        with self.db.read() as txn:
            return txn.get("blobs", address) is not None

    def address_for_sha1(self, sha1: bytes) -> bytes | None:
        with self.db.read() as txn:
            return txn.get("sha1", sha1)

    def read_body(self, address: bytes) -> bytes:
        """A body by content address, byte-exact and hash-checked."""
        with self.db.read() as txn:
            raw = txn.get("blobs", address)
        if raw is None:
            raise NoSuchMessage(f"no body with address {address.hex()} in this store",
                                subject=address.hex())
        return self.blobs.read(address, Location.from_list(unpackb(raw)))

    def read_packed(self, addresses, max_size: int | None = None):
        """Bodies as their packs store them: (address, (method, payload, size)) for each,
        or (address, None) for one bigger than ``max_size`` (those last), in pack order
        so that neighbours are read together.  Not decompressed, so not checked against
        their addresses: for handing bodies to a peer that stores them as they are and
        checks them itself."""
        with self.db.read() as txn:
            found = []
            for address in addresses:
                raw = txn.get("blobs", address)
                if raw is None:
                    raise NoSuchMessage(f"no body with address {address.hex()} in this store",
                                        subject=address.hex())
                found.append((address, Location.from_list(unpackb(raw))))
        small = sorted((f for f in found if max_size is None or f[1].size <= max_size),
                       key=lambda f: (f[1].pack, f[1].offset))
        entries = self.blobs.read_stored_many([loc for _, loc in small])
        for (address, loc), (method, header_address, payload) in zip(small, entries):
            if header_address != address:
                raise StoreCorrupt(f"blob {address.hex()}: pack {loc.pack} holds another blob "
                                   f"at offset {loc.offset}", subject=address.hex())
            yield address, (method, payload, loc.size)
        for address, loc in found:
            if max_size is not None and loc.size > max_size:
                yield address, None

    # -- reads ----------------------------------------------------------------------
    def users(self) -> list[str]:
        with self.db.read() as txn:
            return [k.decode() for k in txn.range("users", values=False)]

    def user_info(self, user: str) -> UserRecord:
        with self.db.read() as txn:
            return require_user(self._user(txn, user), user)

    def mailboxes(self, user: str, *, include_removed: bool = False) -> list[Mailbox]:
        """A user's mailboxes, sorted by name (tombstones last when included)."""
        with self.db.read() as txn:
            u = require_user(self._user(txn, user), user)
            out = [Mailbox.unpack(k[5:], v) for k, v in
                   txn.prefix("objects", u.prefix + MAILBOX)]
        out = [m for m in out if include_removed or not m.stamp.removed]
        return sorted(out, key=lambda m: (m.stamp.removed, m.name))

    def mailbox(self, user: str, name: str) -> Mailbox:
        name = names.mailbox(name)
        with self.db.read() as txn:
            u = require_user(self._user(txn, user), user)
            num = self._mailbox_num(txn, u, name)
            if num is None:
                raise NoSuchMailbox(f"user {user!r} has no mailbox {name!r}; "
                                    f"`modsync mailbox list` shows what exists", subject=name)
            return Mailbox.unpack(U64.pack(num), txn.get("objects", object_key(u, MAILBOX, U64.pack(num))))

    def find_mailbox_id(self, unique_id: str) -> tuple[str, Mailbox] | None:
        """(owner, mailbox) for a unique id, tombstones included; None if unknown."""
        with self.db.read() as txn:
            raw = txn.get("index", IX_UNIQUEID + unique_id.encode())
            if raw is None:
                return None
            unum, mnum = U32.unpack_from(raw)[0], U64.unpack_from(raw, 4)[0]
            for k, v in txn.range("users"):
                if unpackb(v)[0] == unum:
                    mv = txn.get("objects", U32.pack(unum) + MAILBOX + U64.pack(mnum))
                    return k.decode(), Mailbox.unpack(U64.pack(mnum), mv)
        return None

    def records(self, user: str, mailbox: str, *, uids=None,
                include_expunged: bool = False) -> list[Record]:
        """Records of a mailbox in UID order; ``uids`` is a list of (lo, hi) ranges."""
        mb = self.mailbox(user, mailbox)
        with self.db.read() as txn:
            u = self._user(txn, user)
            base = u.prefix + RECORD + U64.pack(mb.num)
            spans = uids if uids is not None else [(1, 0xFFFFFFFF)]
            out = []
            for lo, hi in spans:
                stop = base + U32.pack(hi + 1) if hi < 0xFFFFFFFF else prefix_end(base)
                for k, v in txn.range("objects", base + U32.pack(lo), stop):
                    r = Record.unpack(k[5:], v)
                    if include_expunged or not r.stamp.removed:
                        out.append(r)
            return out

    def _scoped(self, user: str, kind: bytes, mailbox: str | None, cls):
        with self.db.read() as txn:
            u = require_user(self._user(txn, user), user)
            prefix = u.prefix + kind
            if mailbox is not None:
                prefix += U64.pack(self.mailbox(user, mailbox).num)
            return [cls.unpack(k[5:], v) for k, v in txn.prefix("objects", prefix)
                    if not unpackb(v)[3]]

    def subscriptions(self, user: str) -> list[str]:
        return [s.name for s in self._scoped(user, SUBSCRIPTION, None, Subscription)]

    def seen_sets(self, user: str) -> list[SeenSet]:
        return self._scoped(user, SEEN, None, SeenSet)

    def sieve_scripts(self, user: str) -> list[SieveScript]:
        return self._scoped(user, SIEVE, None, SieveScript)

    def sieve_script(self, user: str, name: str) -> bytes:
        for s in self.sieve_scripts(user):
            if s.name == name:
                return self.read_body(s.address)
        raise NoSuchObject(f"user {user!r} has no sieve script {name!r}", subject=name)

    def acl(self, user: str, mailbox: str) -> dict[str, str]:
        return {a.identifier: a.rights for a in self._scoped(user, ACL, mailbox, AclEntry)}

    def annotations(self, user: str, mailbox: str) -> list[Annotation]:
        return self._scoped(user, ANNOTATION, mailbox, Annotation)

    def quota(self, user: str) -> list[dict]:
        """Each quota root with its limits and current usage (STORAGE in KiB, MESSAGE count)."""
        roots = self._scoped(user, QUOTA, None, QuotaRoot)
        mbs = self.mailboxes(user)
        out = []
        for q in sorted(roots, key=lambda q: q.root):
            under = [m for m in mbs if q.root == "" or m.name == q.root
                     or m.name.startswith(q.root + names.SEPARATOR)]
            usage = {"STORAGE": (sum(m.size for m in under) + 1023) // 1024,
                     "MESSAGE": sum(m.messages for m in under)}
            out.append({"root": q.root, "limits": dict(q.limits), "usage": usage})
        return out

    def changes(self, user: str, since: int) -> "ChangeList":
        """Like changes_since, with the user's modseq and horizon from the same snapshot.

        ``modseq`` is where to continue from next time: every change up to
        it is in this list.
        """
        with self.db.read() as txn:
            u = require_user(self._user(txn, user), user)
            check_since(u, since)
            return ChangeList(list(self._changes(txn, u, since)), u.modseq, u.horizon)

    def changes_since(self, user: str, since: int) -> list[Change]:
        """Every object of the user changed after modseq ``since``, in modseq order.

        Each object appears once, in its current state (tombstones included).
        Costs O(number of changes).  Raises FullSyncNeeded when ``since`` is
        below the tombstone horizon (0 is always answerable: the full state).
        """
        with self.db.read() as txn:
            u = require_user(self._user(txn, user), user)
            check_since(u, since)
            return list(self._changes(txn, u, since))

    def _changes(self, txn: Txn, u: UserRecord, since: int) -> Iterator[Change]:
        start = u.prefix + U64.pack(since + 1)
        mailboxes: dict[int, Mailbox] = {}

        def mailbox(num: int) -> Mailbox | None:
            if num not in mailboxes:
                raw = txn.get("objects", object_key(u, MAILBOX, U64.pack(num)))
                mailboxes[num] = None if raw is None else Mailbox.unpack(U64.pack(num), raw)
            return mailboxes[num]

        for k in txn.range("changes", start, prefix_end(u.prefix), values=False):
            modseq = U64.unpack_from(k, 4)[0]
            kind, key = k[12:13], k[13:]
            raw = txn.get("objects", object_key(u, kind, key))
            if raw is None:
                continue   # cannot happen in a sound store; verify reports it
            obj = KIND_CLASSES[kind].unpack(key, raw)
            mb = None
            if kind in (RECORD, ACL, ANNOTATION):
                mb = mailbox(U64.unpack_from(key)[0])
            yield Change(modseq, KIND_NAMES[kind], obj, mb)

    def status(self, user: str) -> dict:
        """What `modsync status` shows for one user."""
        u = self.user_info(user)
        mbs = self.mailboxes(user)
        return {
            "user": user,
            "modseq": u.modseq,
            "horizon": u.horizon,
            "digest": u.digest.hex(),
            "mailboxes": [{
                "name": m.name, "id": m.id, "uidvalidity": m.uidvalidity,
                "uidnext": m.uidnext, "highestmodseq": m.highestmodseq,
                "messages": m.messages, "size": m.size, "crc": f"{m.crc:016x}",
                "cyrus_sync_crc": m.cyrus_crc, "cyrus_sync_crc_annot": m.cyrus_crc_annot,
            } for m in mbs],
        }

    # -- mutations: mailboxes ---------------------------------------------------------
    def create_mailbox(self, user: str, name: str, *, unique_id: str | None = None,
                       uidvalidity: int | None = None, specialuse: Iterable[str] = ()) -> Mailbox:
        name = names.mailbox(name)

        def fn(m: Mutation) -> Mailbox:
            return self._create_mailbox(m, name, unique_id, uidvalidity, tuple(specialuse))
        return self.mutate(user, fn, create_user=True)

    def _create_mailbox(self, m: Mutation, name: str, unique_id: str | None,
                        uidvalidity: int | None, specialuse: tuple, *, origin: int = 0,
                        origin_modseq: int | None = None) -> Mailbox:
        txn, u = m.txn, m.user
        if self._mailbox_num(txn, u, name) is not None:
            raise MailboxExists(f"user {u.name!r} already has a mailbox {name!r}", subject=name)
        unique_id = unique_id or new_unique_id()
        if txn.get("index", IX_UNIQUEID + unique_id.encode()) is not None:
            raise MailboxExists(f"mailbox unique id {unique_id} is already in use", subject=unique_id)
        vkey = IX_UIDVALIDITY + u.prefix + name.encode()
        prev = txn.get("index", vkey)
        floor = U32.unpack(prev)[0] + 1 if prev else 1
        if floor > 0xFFFFFFFF:
            raise UsageError(f"no uidvalidity is left for {name!r} (the name used the largest "
                             f"one, 2^32-1); choose another name")
        if uidvalidity is None:
            uidvalidity = max(int(time.time()) & 0xFFFFFFFF, floor)
        elif not 0 < uidvalidity <= 0xFFFFFFFF:
            raise UsageError(f"uidvalidity {uidvalidity} is out of range 1..2^32-1")
        elif uidvalidity < floor:
            raise UsageError(f"uidvalidity {uidvalidity} for {name!r} would not be above the "
                             f"{floor - 1} it had before; uidvalidity only goes up")
        num = self._next_mailbox_num(txn)
        mb = Mailbox(unique_id, name, uidvalidity, uidnext=1, createdmodseq=m.modseq,
                     specialuse=specialuse, cyrus_crc=cyrus_crc.CRC_INIT_BASIC,
                     cyrus_crc_annot=cyrus_crc.CRC_INIT_ANNOT, num=num)
        m.add_mailbox(mb, origin=origin, origin_modseq=origin_modseq)
        txn.put("index", IX_NAME + u.prefix + name.encode(), U64.pack(num))
        txn.put("index", IX_UNIQUEID + unique_id.encode(), u.prefix + U64.pack(num))
        txn.put("index", vkey, U32.pack(uidvalidity))
        return mb

    def rename_mailbox(self, user: str, old: str, new: str) -> None:
        """Rename a mailbox and its children; renaming INBOX moves its messages (IMAP rule)."""
        old, new = names.mailbox(old), names.mailbox(new)

        def fn(m: Mutation):
            txn, u = m.txn, m.user
            if self._mailbox_num(txn, u, new) is not None:
                raise MailboxExists(f"user {user!r} already has a mailbox {new!r}", subject=new)
            if new.startswith(old + names.SEPARATOR) and old != "INBOX":
                raise UsageError(f"cannot rename {old!r} into its own child {new!r}")
            if old == "INBOX":
                src = m.mailbox_by_name(old)
                dst = self._create_mailbox(m, new, None, None, ())
                uids = [r.uid for r in self._live_records(m, src)]
                self._copy(m, src, uids, dst, expunge_source=True)
                return
            # The mailbox and its children; a parent that is only implied by its
            # children (no mailbox of its own) can be renamed as well.
            moving = list(txn.prefix("index", IX_NAME + u.prefix + (old + names.SEPARATOR).encode()))
            own = txn.get("index", IX_NAME + u.prefix + old.encode())
            if own is not None:
                moving.insert(0, (IX_NAME + u.prefix + old.encode(), own))
            if not moving:
                m.mailbox_by_name(old)   # raises NoSuchMailbox with the usual message
            # Every target name must be free or be one of the names moving away;
            # old names are released before new ones are taken, so the order of
            # the moves does not matter.
            leaving = {k for k, _ in moving}
            for name_key, num_raw in moving:
                target = IX_NAME + u.prefix + (new + name_key[len(IX_NAME) + 4 + len(
                    old.encode()):].decode()).encode()
                if txn.get("index", target) is not None and target not in leaving:
                    raise MailboxExists(f"cannot rename {old!r} to {new!r}: user {user!r} "
                                        f"already has {target[len(IX_NAME) + 4:].decode()!r}",
                                        subject=new)
            for name_key, _ in moving:
                txn.delete("index", name_key)
            for name_key, num_raw in moving:
                mb = m.mailbox(U64.unpack(num_raw)[0])
                new_name = new + mb.name[len(old):]
                txn.put("index", IX_NAME + u.prefix + new_name.encode(), num_raw)
                vkey = IX_UIDVALIDITY + u.prefix + new_name.encode()
                prev = txn.get("index", vkey)
                if prev is None or U32.unpack(prev)[0] < mb.uidvalidity:
                    txn.put("index", vkey, U32.pack(mb.uidvalidity))
                mb.name = new_name
                m.folder_changed(mb)
        self.mutate(user, fn)

    def delete_mailbox(self, user: str, name: str) -> None:
        """Delete a mailbox, leaving a tombstone (id, last name, uidvalidity, uidnext, modseq)."""
        name = names.mailbox(name)

        def fn(m: Mutation):
            mb = m.mailbox_by_name(name)
            m.txn.delete("index", IX_NAME + m.user.prefix + name.encode())
            m.remove_mailbox(mb)
        self.mutate(user, fn)

    # -- mutations: messages ------------------------------------------------------------
    def append(self, user: str, mailbox: str, body: bytes, *, flags: Iterable[str] = (),
               internaldate: int | None = None) -> Record:
        return self.append_many(user, mailbox, [Message(body, tuple(flags), internaldate)])[0]

    def append_many(self, user: str, mailbox: str, messages: Iterable[Message]) -> list[Record]:
        """Append messages in one mutation (one modseq, one fsync), in order."""
        return self.append_prepared(user, mailbox, self.prepare_append(messages))

    def prepare_append(self, messages: Iterable[Message]) -> "PreparedAppend":
        """Check and hash messages and start compressing the bodies this store lacks.

        Compression runs on other threads while the caller goes on; hand the
        result to ``append_prepared``.  Bulk importers prepare batch N+1
        before committing batch N, so that compressing one batch overlaps
        the bookkeeping of the other.
        """
        prepared = [(msg, _address(msg), sha1_of(msg.body), _flags(msg.flags))
                    for msg in messages]
        with self.db.read() as txn:
            missing = {p[1]: p[0].body for p in prepared if txn.get("blobs", p[1]) is None}
        return PreparedAppend(prepared, list(missing),
                              self.blobs.compress_many_async(list(missing.values())))

    def append_prepared(self, user: str, mailbox: str, batch: "PreparedAppend") -> list[Record]:
        """Append a batch from ``prepare_append`` in one mutation; see ``append_many``."""
        mailbox = names.mailbox(mailbox)
        packed = dict(zip(batch.missing, batch.compressed.result()))

        def fn(m: Mutation) -> list[Record]:
            mb = m.mailbox_by_name(mailbox)
            out = []
            now = int(time.time())
            for msg, address, sha1, flags in batch.messages:
                self.put_body(m.txn, msg.body, address, sha1, packed.get(address))
                rec = Record(mb.uidnext, address, sha1, len(msg.body),
                             now if msg.internaldate is None else int(msg.internaldate),
                             savedate=m.now, flags=flags,
                             createdmodseq=m.modseq, annotations=tuple(sorted(msg.annotations)))
                m.put_record(mb, rec, None)
                out.append(rec)
            return out
        return self.mutate(user, fn)

    def _live_records(self, m: Mutation, mb: Mailbox, uids=None) -> list[Record]:
        base = m.user.prefix + RECORD + U64.pack(mb.num)
        out = []
        # Merged, so that overlapping ranges ("1:5,3") visit each record once.
        for lo, hi in (uidset.merge(uids) if uids is not None else [(1, 0xFFFFFFFF)]):
            stop = base + U32.pack(hi + 1) if hi < 0xFFFFFFFF else prefix_end(base)
            for k, v in m.txn.range("objects", base + U32.pack(lo), stop):
                r = Record.unpack(k[5:], v)
                if not r.stamp.removed:
                    out.append(r)
        return out

    def set_flags(self, user: str, mailbox: str, uids, flags: Iterable[str], *,
                  mode: str = "add") -> int:
        """Add, remove or replace flags on the messages in ``uids`` (ranges); returns count changed."""
        if mode not in ("add", "remove", "replace"):
            raise UsageError(f"flag mode {mode!r}: use add, remove or replace")
        mailbox = names.mailbox(mailbox)
        change = _flags(flags)
        lowered = {f.lower() for f in change}

        def fn(m: Mutation) -> int:
            mb = m.mailbox_by_name(mailbox)
            n = 0
            for r in self._live_records(m, mb, uids):
                if mode == "add":
                    new = normalize_flags(r.flags + change)
                elif mode == "remove":
                    new = tuple(f for f in r.flags if f.lower() not in lowered)
                else:
                    new = change
                if new != r.flags:
                    old = r.copy()
                    r.flags = new
                    m.put_record(mb, r, old)
                    n += 1
            return n
        return self.mutate(user, fn)

    def expunge(self, user: str, mailbox: str, uids) -> int:
        """Expunge messages, leaving tombstones; their bodies stay until garbage collection."""
        mailbox = names.mailbox(mailbox)

        def fn(m: Mutation) -> int:
            mb = m.mailbox_by_name(mailbox)
            recs = self._live_records(m, mb, uids)
            for r in recs:
                self._expunge_record(m, mb, r)
            return len(recs)
        return self.mutate(user, fn)

    @staticmethod
    def _expunge_record(m: Mutation, mb: Mailbox, r: Record) -> None:
        old = r.copy()
        r.stamp.removed = True
        m.put_record(mb, r, old)

    def copy(self, user: str, mailbox: str, uids, dest: str, *, move: bool = False) -> dict[int, int]:
        """Copy (or move) messages; bodies are shared, not copied.  Returns {old uid: new uid}."""
        mailbox, dest = names.mailbox(mailbox), names.mailbox(dest)

        def fn(m: Mutation) -> dict[int, int]:
            src, dst = m.mailbox_by_name(mailbox), m.mailbox_by_name(dest)
            if src.num == dst.num:
                raise UsageError(f"copying {mailbox!r} onto itself")
            return self._copy(m, src, [r.uid for r in self._live_records(m, src, uids)], dst,
                              expunge_source=move)
        return self.mutate(user, fn)

    def _copy(self, m: Mutation, src: Mailbox, uids: list[int], dst: Mailbox, *,
              expunge_source: bool) -> dict[int, int]:
        mapping = {}
        for uid in uids:
            r = m.record(src, uid)
            new = Record(dst.uidnext, r.address, r.sha1, r.size, r.internaldate, savedate=m.now,
                         flags=r.flags, createdmodseq=m.modseq, annotations=r.annotations)
            m.put_record(dst, new, None)
            mapping[uid] = new.uid
            if expunge_source:
                self._expunge_record(m, src, r)
        return mapping

    def set_message_annotation(self, user: str, mailbox: str, uid: int, entry: str,
                               userid: str, value: bytes | None) -> None:
        """Set (or with value None, remove) a per-message annotation (see set_annotation)."""
        mailbox = names.mailbox(mailbox)
        _check_entry(entry)
        if entry.startswith(cyrus_crc.VIRTUAL_PREFIX):
            raise UsageError(f"{entry!r} is computed by the server (Cyrus's virtual "
                             f"annotations); it cannot be set")

        def fn(m: Mutation):
            mb = m.mailbox_by_name(mailbox)
            r = m.record(mb, uid)
            if r is None or r.stamp.removed:
                raise NoSuchMessage(f"{mailbox!r} has no message with UID {uid}", subject=uid)
            old = r.copy()
            ann = {(e, u): v for e, u, v in r.annotations}
            if value is None:
                ann.pop((entry, userid), None)
            else:
                ann[(entry, userid)] = bytes(value)
            r.annotations = tuple(sorted((e, u, v) for (e, u), v in ann.items()))
            if r.annotations != old.annotations:
                m.put_record(mb, r, old)
        self.mutate(user, fn)

    # -- mutations: per-user objects --------------------------------------------------
    def subscribe(self, user: str, name: str) -> None:
        name = names.mailbox(name)
        self.mutate(user, lambda m: m.put_object(Subscription(name), if_changed=True),
                    create_user=True)

    def unsubscribe(self, user: str, name: str) -> None:
        name = names.mailbox(name)
        self.mutate(user, lambda m: m.remove(
            Subscription(name), missing=f"user {user!r} is not subscribed to {name!r}"))

    def set_seen(self, user: str, mailbox_id: str, uids: str, *, lastuid: int = 0) -> None:
        """Record which UIDs of a (possibly other user's) mailbox ``user`` has read.

        The UID set is stored in canonical form ("1,2,3" and "1:3" are one set).
        """
        canonical = uidset.format(uidset.parse(uids)) if uids else ""
        now = int(time.time())

        def fn(m: Mutation):
            old = m.get(SeenSet, mailbox_id.encode())
            if old is not None and not old.stamp.removed and old.uids == canonical \
                    and old.lastuid == lastuid:
                return   # nothing seen changed
            m.put_object(SeenSet(mailbox_id, canonical, lastread=now, lastuid=lastuid,
                                 lastchange=now))
        self.mutate(user, fn, create_user=True)

    def delete_seen(self, user: str, mailbox_id: str) -> None:
        self.mutate(user, lambda m: m.remove(
            SeenSet(mailbox_id), missing=f"user {user!r} has no seen set for mailbox {mailbox_id}"))

    def sieve_put(self, user: str, name: str, script: bytes) -> None:
        if not name or "/" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            raise UsageError(f"bad sieve script name {name!r}: no '/' or control characters")

        def fn(m: Mutation):
            address, _ = self.put_body(m.txn, script)
            old = m.get(SieveScript, name.encode())
            active = bool(old and not old.stamp.removed and old.active)
            m.put_object(SieveScript(name, address, len(script), active, m.now))
        self.mutate(user, fn, create_user=True)

    def sieve_activate(self, user: str, name: str | None) -> None:
        """Make ``name`` the active script (None: no script active)."""
        def fn(m: Mutation):
            found = False
            for k, v in list(m.txn.prefix("objects", m.user.prefix + SIEVE)):
                s = SieveScript.unpack(k[5:], v)
                if s.stamp.removed:
                    continue
                want = s.name == name
                found |= want
                if s.active != want:
                    s.active = want
                    m.put_object(s)
            if name is not None and not found:
                raise NoSuchObject(f"user {user!r} has no sieve script {name!r}", subject=name)
        self.mutate(user, fn)

    def sieve_delete(self, user: str, name: str) -> None:
        self.mutate(user, lambda m: m.remove(
            SieveScript(name), missing=f"user {user!r} has no sieve script {name!r}"))

    def set_acl(self, user: str, mailbox: str, identifier: str, rights: str | None) -> None:
        """Set the RFC 4314 rights of identifier on mailbox (None: delete the entry)."""
        mailbox = names.mailbox(mailbox)
        if not identifier or any(ord(c) < 0x21 or ord(c) == 0x7F for c in identifier):
            raise UsageError(f"bad ACL identifier {identifier!r}")
        if rights is not None:
            bad = set(rights) - set(ACL_RIGHTS)
            if bad:
                raise UsageError(f"unknown ACL rights {''.join(sorted(bad))!r} (RFC 4314: "
                                 f"lrswipkxtea, legacy cd)")
            rights = "".join(sorted(set(rights), key=ACL_RIGHTS.index))

        def fn(m: Mutation):
            mb = m.mailbox_by_name(mailbox)
            if rights is None:
                m.remove(AclEntry(mb.num, identifier), mailbox=mb,
                         missing=f"{mailbox!r} has no ACL entry for {identifier!r}")
            else:
                m.put_object(AclEntry(mb.num, identifier, rights), mailbox=mb, if_changed=True)
        self.mutate(user, fn)

    def set_annotation(self, user: str, mailbox: str, entry: str, value: bytes | None, *,
                       userid: str = "") -> None:
        """Set (value None: remove) a mailbox annotation.

        As in Cyrus, ``entry`` is the name without its /private or /shared
        prefix (``/comment``, ``/specialuse``) and ``userid`` says which: ""
        for the shared value, a user name for that user's private value.
        """
        mailbox = names.mailbox(mailbox)
        _check_entry(entry)

        def fn(m: Mutation):
            mb = m.mailbox_by_name(mailbox)
            if value is None:
                m.remove(Annotation(mb.num, entry, userid), mailbox=mb,
                         missing=f"{mailbox!r} has no annotation {entry!r} for "
                                 f"{'shared' if not userid else userid!r}")
            else:
                m.put_object(Annotation(mb.num, entry, userid, bytes(value)), mailbox=mb,
                             if_changed=True)
            if entry == "/specialuse" and userid == user:
                # Only the owner's own value is the mailbox's SPECIAL-USE (as in Cyrus).
                use = tuple(value.decode(errors="replace").split()) if value else ()
                if use != mb.specialuse:
                    mb.specialuse = use
                    m.folder_changed(mb)
        self.mutate(user, fn)

    def set_quota(self, user: str, root: str, limits: dict | None) -> None:
        """Set the limits of a quota root ({"STORAGE": KiB, "MESSAGE": n}); None removes it.

        A root is a mailbox name ("" for the user's whole tree), canonical as one.
        """
        root = names.mailbox(root) if root else ""
        for k, v in (limits or {}).items():
            if k not in ("STORAGE", "MESSAGE") or not isinstance(v, int) or v < 0:
                raise UsageError(f"bad quota limit {k}={v!r}: use STORAGE=<KiB> or MESSAGE=<count>")
        if limits is None:
            self.mutate(user, lambda m: m.remove(
                QuotaRoot(root), missing=f"user {user!r} has no quota root {root!r}"))
        else:
            self.mutate(user, lambda m: m.put_object(QuotaRoot(root, dict(limits)),
                                                     if_changed=True), create_user=True)

    # -- maintenance -------------------------------------------------------------------
    def expire_tombstones(self, user: str, below: int) -> int:
        """Drop tombstones stamped below modseq ``below``; raise the horizon to it.

        Afterwards, changes since any modseq in (0, below) need a full sync.
        """
        def fn(m: Mutation) -> int:
            u = m.user
            n = 0
            # Nothing at or above the next modseq can be a tombstone yet.
            top = min(below, u.modseq + 1)
            for k in list(m.txn.range("changes", u.prefix, u.prefix + U64.pack(top),
                                      values=False)):
                kind, key = k[12:13], k[13:]
                raw = m.get_raw(kind, key)
                if raw is not None and unpackb(raw)[3]:
                    st = stamp_of(raw)
                    m._drop(kind, key, st, None)
                    if u.expired.get(st.origin, 0) < st.origin_modseq:
                        u.expired[st.origin] = st.origin_modseq
                    if kind == MAILBOX:
                        mb = Mailbox.unpack(key, raw)
                        m.txn.delete("index", IX_UNIQUEID + mb.id.encode())
                    n += 1
            if top > u.horizon:
                u.horizon = top
                m._changed = True
            return n
        return self.mutate(user, fn)
