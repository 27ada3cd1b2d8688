"""Replication over the network: push (once, rolling, drain), pull (once, follow).

The pieces, and where their state lives (all in the store's ``intents``
table, never replicated):

* **Intents.**  Every committed change also writes ``b"u" + user`` ->
  ``[modseq, time_ms, log]`` in the same LMDB transaction
  (``engine.mutation.record_intent``), so no committed change escapes
  replication: a pusher that crashed, or was never running, finds every
  user whose changes a replica has not acknowledged.  The same transaction
  moves the user's row in a recent-commit index (``b"t"`` + commit sequence
  number), so watchers (``CommitWatch``) read only the users who committed.
* **Peer cache.**  A pusher remembers, per replica (by its store id) and
  user, the replica's last acknowledged state (version vector) and the
  local modseq it covered: ``b"p" + peer + b"\\0" + user``.  It builds change
  sets against that state and sends them without asking first
  (speculative); a rejection brings the replica's real state and, when it
  changed meanwhile, its changes, which are merged here and sent again.
  ``b"P" + peer`` holds the peer's address, last contact and last error
  for ``modsync status``.  A puller keeps the same per master under
  ``b"f"`` / ``b"F"``; the master keeps nothing about its replicas.
* **User locks.**  ``STORE/locks/<hex of user>.lock``, held with flock by
  whoever needs a user to stand still (a backup being verified, an admin
  over the protocol's LOCK).  A receiver never waits for one: it answers
  LOCKED, and the pusher requeues that user and carries on with others.

Receivers call ``receive_push`` (authorise, apply, counter) and
``changes_for`` (build, cut to what the account may read).
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from . import acl
from .apply import ApplyResult, LegalityError, apply
from .changeset import ChangeSet, build, split, state_of, vv_le
from .client import Client, Disconnected, RemoteError
from .errors import FullSyncNeeded, ModsyncError, NoSuchUser, ProtocolError
from .protocol import PACKED_VERSION
from .db import prefix_end
from .model import U64
from .mutation import INTENT_RECENT, INTENT_SEQ, INTENT_USER
from .store import Store

log = logging.getLogger("modsync.replication")

PUSH_PEER_USER, PUSH_PEER = b"p", b"P"
PULL_PEER_USER, PULL_PEER = b"f", b"F"
LOCAL_ONLY = b"L"     # synchronous commits acknowledged only locally: b"L" + user
QUEUE = b"Q"          # change sets acknowledged "durable", not yet applied: b"Q" + u64 seq

#: Rounds of push / reject / merge / push again before giving up on a user
#: for this pass: one rejection is normal, two mean the replica is being
#: written fast by someone else; more and we let other users go first.
MAX_ROUNDS = 4

#: How often a rolling pusher or a server looks for new commits (it reads
#: LMDB's last transaction id, a few microseconds): well inside the 100 ms
#: the issue allows from commit to replica.
WATCH_INTERVAL = 0.005

#: After a pass in which no user made progress (all locked or failing), wait
#: this long before the next one: brief, because locks are short.
NO_PROGRESS_PAUSE = 0.2
#: A locked (or failing) user is retried after this long, doubling up to
#: RETRY_MAX.
RETRY, RETRY_MAX = 0.25, 5.0
#: After a failed connection, wait this long before reconnecting, doubling
#: up to RECONNECT_MAX.
RECONNECT, RECONNECT_MAX = 0.1, 5.0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pack(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def _unpack(b: bytes):
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


# -- intents ---------------------------------------------------------------------------
@dataclass
class Intent:
    """A user's last committed change: modseq, when (ms), and the per-second log."""

    user: str
    modseq: int
    time_ms: int
    log: list

    def first_commit_after(self, modseq: int) -> float | None:
        """When (epoch seconds) the first change after ``modseq`` was committed, roughly.

        To the second while it is among the logged seconds; for older ones
        the oldest logged second (a lower bound on how long ago).
        """
        if modseq >= self.modseq:
            return None
        best = None
        for m, sec in self.log:
            if m <= modseq + 1:
                best = sec
            else:
                break
        if best is None:
            best = self.log[0][1] if self.log else self.time_ms / 1000
        return float(best)


def read_intents(store: Store) -> dict[str, Intent]:
    """Every user's intent (for ``modsync status``; watchers use CommitWatch)."""
    with store.db.read() as txn:
        return _all_intents(txn)


def _all_intents(txn) -> dict[str, Intent]:
    out = {}
    for k, v in txn.prefix("intents", INTENT_USER):
        user = k[1:].decode()
        out[user] = _intent(user, v)
    return out


def _intent(user: str, raw: bytes) -> Intent:
    m, t, lg = _unpack(raw)[:3]
    return Intent(user, m, t, lg)


class CommitWatch:
    """Which users committed since the last look, at a cost of O(those users).

    For watchers (a rolling pusher, a server telling its followers): each
    commit also moves its user's row in the intents table's recent-commit
    index (``engine.mutation.record_intent``), so a look reads only the rows
    of users who committed since the previous one.
    """

    def __init__(self, store: Store):
        self.store = store
        self.snapshot: int | None = None   # the LMDB snapshot last read
        self._seq: int | None = None       # the commit sequence number it reached

    def poll(self) -> dict[str, Intent] | None:
        """The intents of the users who committed since the last poll (the first poll:
        every user's), or None when nothing was committed since.

        Compares LMDB's last transaction id with the snapshot last read (not with
        ``Database.last_txnid()`` as last seen, which a committing writer moves a
        moment before new readers see its data).
        """
        if self.snapshot is not None and self.store.db.last_txnid() == self.snapshot:
            return None
        with self.store.db.read() as txn:
            self.snapshot = txn.snapshot_id()
            last = txn.get("intents", INTENT_SEQ)
            seq = U64.unpack(last)[0] if last is not None else 0
            if self._seq is None:
                out = _all_intents(txn)
            else:
                out = {}
                start = INTENT_RECENT + U64.pack(self._seq + 1)
                for _k, name in txn.range("intents", start, prefix_end(INTENT_RECENT)):
                    raw = txn.get("intents", INTENT_USER + name)
                    if raw is not None:
                        out[name.decode()] = _intent(name.decode(), raw)
            self._seq = seq
        return out


def local_modseq(store: Store, user: str) -> int:
    try:
        return store.user_info(user).modseq
    except NoSuchUser:
        return 0


def local_state(store: Store, user: str) -> dict:
    try:
        return state_of(store, user)
    except NoSuchUser:
        return {}


# -- the peer cache -----------------------------------------------------------------------
@dataclass
class PeerUser:
    """What we know of one user at one peer."""

    vv: dict = field(default_factory=dict)   # the peer's state, as last acknowledged
    acked_modseq: int = 0                     # our modseq that state covers (push)
    acked_ms: int = 0
    error: str = ""
    error_ms: int = 0

    def pack(self) -> bytes:
        return _pack([self.vv, self.acked_modseq, self.acked_ms, self.error, self.error_ms])

    @classmethod
    def unpack(cls, b: bytes) -> PeerUser:
        v = _unpack(b)
        return cls(dict(v[0]), v[1], v[2], v[3], v[4])


@dataclass
class PeerInfo:
    peer_id: str
    direction: str                 # "push" (the peer is our replica) or "pull" (our master)
    address: str = ""
    last_contact_ms: int = 0
    last_error: str = ""
    last_error_ms: int = 0
    software: str = ""
    version: int = 0
    users: dict = field(default_factory=dict)   # user -> PeerUser

    def pack(self) -> bytes:
        return _pack([self.address, self.last_contact_ms, self.last_error, self.last_error_ms,
                      self.software, self.version])

    @classmethod
    def unpack(cls, peer_id: str, direction: str, raw: bytes) -> PeerInfo:
        v = _unpack(raw)
        return cls(peer_id, direction, v[0], v[1], v[2], v[3], v[4], v[5])


def _keys(direction: str) -> tuple[bytes, bytes]:
    return (PUSH_PEER_USER, PUSH_PEER) if direction == "push" else (PULL_PEER_USER, PULL_PEER)


class PeerBook:
    """The cache of one peer's state, kept in memory and written through to the store."""

    def __init__(self, store: Store, direction: str, peer_id: str, address: str):
        self.store = store
        self.direction = direction
        self.peer_id = peer_id
        user_prefix, info_prefix = _keys(direction)
        self._ukey = user_prefix + peer_id.encode() + b"\0"
        self._info_key = info_prefix + peer_id.encode()
        self.info = PeerInfo(peer_id, direction, address)
        with store.db.read() as txn:
            raw = txn.get("intents", self._info_key)
            if raw is not None:
                self.info = PeerInfo.unpack(peer_id, direction, raw)
                self.info.address = address or self.info.address
            for k, v in txn.prefix("intents", self._ukey):
                self.info.users[k[len(self._ukey):].decode()] = PeerUser.unpack(v)

    def user(self, user: str) -> PeerUser | None:
        return self.info.users.get(user)

    def _write(self, users: list[str]) -> None:
        rows = [(self._ukey + u.encode(), self.info.users[u].pack()) for u in users]
        info = (self._info_key, self.info.pack())

        def fn(txn):
            txn.put("intents", *info)
            for k, v in rows:
                txn.put("intents", k, v)
        self.store.db.write(fn)

    def contact(self, *, software: str = "", version: int = 0) -> None:
        self.info.last_contact_ms = _now_ms()
        if software:
            self.info.software, self.info.version = software, version
        self._write([])

    def ack(self, user: str, vv: dict, modseq: int) -> None:
        pu = self.info.users.get(user)
        if pu is not None and pu.vv == vv and pu.acked_modseq == modseq and not pu.error:
            return      # nothing new: no write (a no-op sync costs no fsync)
        pu = self.info.users.setdefault(user, PeerUser())
        pu.vv, pu.acked_modseq, pu.acked_ms = dict(vv), modseq, _now_ms()
        pu.error = ""
        self.info.last_contact_ms = pu.acked_ms
        self._write([user])

    def error(self, user: str | None, message: str) -> None:
        now = _now_ms()
        self.info.last_error, self.info.last_error_ms = message, now
        users = []
        if user is not None:
            pu = self.info.users.setdefault(user, PeerUser())
            pu.error, pu.error_ms = message, now
            users.append(user)
        try:
            self._write(users)
        except ModsyncError:     # e.g. a read-only store: the log line is enough
            pass


def record_connection_error(store: Store, direction: str, address: str, message: str) -> None:
    """Note a failure to reach a peer: on the row of the peer last seen at that address,
    else on a row keyed by the address until we learn the peer's store id."""
    prefix = _keys(direction)[1]
    try:
        with store.db.read() as txn:
            rows = [(k, PeerInfo.unpack(k[1:].decode(), direction, v))
                    for k, v in txn.prefix("intents", prefix)]
        known = sorted((p.last_contact_ms, k, p) for k, p in rows
                       if p.address == address and not p.peer_id.startswith("@"))
        key, info = (known[-1][1], known[-1][2]) if known else (None, None)
        if info is None:
            info = PeerInfo("@" + address, direction, address)
            key = prefix + info.peer_id.encode()
        info.last_error, info.last_error_ms = message, _now_ms()
        store.db.write(lambda txn: txn.put("intents", key, info.pack()))
    except ModsyncError:
        pass


def list_peers(store: Store) -> list[PeerInfo]:
    """Every peer this store has pushed to or pulled from, with its per-user rows."""
    peers: dict[tuple, PeerInfo] = {}
    with store.db.read() as txn:
        for direction in ("push", "pull"):
            ukey, ikey = _keys(direction)
            for k, v in txn.prefix("intents", ikey):
                pid = k[1:].decode()
                peers[(direction, pid)] = PeerInfo.unpack(pid, direction, v)
            for k, v in txn.prefix("intents", ukey):
                pid, _, user = k[1:].partition(b"\0")
                p = peers.setdefault((direction, pid.decode()), PeerInfo(pid.decode(), direction))
                p.users[user.decode()] = PeerUser.unpack(v)
    # A peer first known by its address only (it could not be reached) and
    # reached since: show the row with its store id.
    reached = {(p.direction, p.address): p for p in peers.values()
               if not p.peer_id.startswith("@")}
    out = []
    for p in peers.values():
        if p.peer_id.startswith("@"):
            twin = reached.get((p.direction, p.address))
            if twin is not None and twin.last_contact_ms >= p.last_error_ms:
                continue
        out.append(p)
    return sorted(out, key=lambda p: (p.direction, p.address, p.peer_id))


def local_only_ranges(store: Store) -> dict[str, list]:
    """user -> [[from modseq, to modseq, time], ...] committed while synchronous replicas
    did not acknowledge (engine.syncrep's fallback to asynchronous)."""
    out = {}
    with store.db.read() as txn:
        for k, v in txn.prefix("intents", LOCAL_ONLY):
            out[k[1:].decode()] = _unpack(v)
    return out


def record_local_only(store: Store, user: str, lo: int, hi: int) -> None:
    """Remember that ``user``'s modseqs lo..hi were acknowledged only locally."""
    key = LOCAL_ONLY + user.encode()

    def fn(txn):
        raw = txn.get("intents", key)
        ranges = _unpack(raw) if raw is not None else []
        if ranges and ranges[-1][1] >= lo - 1:
            ranges[-1][1] = max(ranges[-1][1], hi)
        else:
            ranges.append([lo, hi, int(time.time())])
        txn.put("intents", key, _pack(ranges[-100:]))
    store.db.write(fn)


# -- user locks ------------------------------------------------------------------------------
class UserLock:
    """An exclusive, advisory lock on one user of a store (flock on STORE/locks/).

    Whoever needs a user to stand still takes it (a backup verifying it, an
    admin over the protocol's LOCK); receivers answer LOCKED instead of
    waiting.  ``acquire()`` never blocks unless asked to.
    """

    def __init__(self, store: Store | os.PathLike, user: str):
        root = Path(store.path if isinstance(store, Store) else store)
        self.path = root / "locks" / (user.encode().hex() + ".lock")
        self.user = user
        self._fh = None

    def acquire(self, *, blocking: bool = False) -> bool:
        if self._fh is not None:
            return True
        self.path.parent.mkdir(exist_ok=True)
        fh = open(self.path, "a+b")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            return False
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def __enter__(self):
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc):
        self.release()


def is_locked(store: Store, user: str) -> bool:
    """Whether someone holds ``user``'s lock right now (a probe: takes and drops it)."""
    lock = UserLock(store, user)
    if lock.acquire():
        lock.release()
        return False
    return True


# -- the receiving side ------------------------------------------------------------------------
def authorize_push(store: Store, account, cs: ChangeSet) -> None:
    """Raise acl.AclDenied unless ``account`` may apply ``cs``."""
    if account.append_only:
        for it in cs.items:
            if it.removed:
                raise acl.AclDenied(f"account {account.name!r} is append-only: it may not remove "
                                    f"anything (the change set removes "
                                    f"{it.kind.decode()} {'/'.join(map(str, it.ident))})",
                                    subject=cs.user)
    if account.admin or account.name == cs.user:
        return
    acl.check_push(store, account.name, cs)


def receive_push(store: Store, account, cs: ChangeSet, bodies, *,
                 allow_mass_delete: bool = False, acknowledged: bool = False) -> ApplyResult:
    """Authorise and apply a pushed change set.

    From an admin or the user's own account: no merge here, so a concurrent
    change rejects it with our changes as the counter (the sender merges
    and sends again).  Merged here, by the same rules, when it was already
    ``acknowledged`` (received or durable: a promise to apply it) and when
    it comes from another account, which sees only the mailboxes the ACLs
    show it and so can never hold the user's whole state.
    """
    authorize_push(store, account, cs)
    full_view = account.admin or account.name == cs.user
    result = apply(store, cs, bodies=bodies, merge=acknowledged or not full_view,
                   allow_mass_delete=allow_mass_delete)
    if result.counter is not None and not full_view:
        try:       # the sender gets back only what it may read, as from a pull
            result.counter = readable_part(store, account, result.counter)
        except acl.AclDenied:
            result.counter = None
    return result


def changes_for(store: Store, account, user: str, base: dict, *,
                parts: bool = False) -> ChangeSet | list[ChangeSet]:
    """What a puller at ``base`` lacks of ``user``, cut to what ``account`` may read;
    with ``parts``, as the parts of a first full replication (``changeset.split``)."""
    cs = build(store, user, base)
    if not (account.admin or account.name == user):
        cs = readable_part(store, account, cs)
    return split(cs) if parts else cs


def readable_part(store: Store, account, cs: ChangeSet) -> ChangeSet:
    """``cs`` cut to the mailboxes ``account`` may read, with those that became
    readable since ``cs.base`` whole (``acl.became_readable``)."""
    whole = acl.became_readable(store, account.name, cs)
    if whole:
        cs = build(store, cs.user, cs.base, whole=whole)
    return acl.filter_pull(store, account.name, cs)


def visible_users(store: Store, account) -> list[str]:
    """The users LISTUSERS shows: all for an admin, else the account's own user."""
    users = store.users()
    if account.admin:
        return users
    return [account.name] if account.name in users else []


# -- durable queue (acknowledgements at "durable") -------------------------------------------
def queue_changeset(store: Store, cs: ChangeSet, bodies) -> bytes:
    """Write a received change set and its bodies to the store (fsynced); its queue key."""
    blob = _pack([cs.encode(), {a: d for a in cs.bodies if (d := bodies(a)) is not None}])

    def fn(txn):
        last = txn.last("intents", QUEUE, QUEUE + b"\xff" * 9)
        seq = int.from_bytes(last[0][1:9], "big") + 1 if last else 1
        key = QUEUE + seq.to_bytes(8, "big")
        txn.put("intents", key, blob)
        return key
    return store.db.write(fn)


def dequeue(store: Store, key: bytes) -> None:
    store.db.write(lambda txn: txn.delete("intents", key))


def replay_queue(store: Store, *, allow_mass_delete: bool = False) -> int:
    """Apply change sets acknowledged durable but not applied before a crash; how many."""
    with store.db.read() as txn:
        queued = list(txn.prefix("intents", QUEUE))
    for key, blob in queued:
        raw, bodies = _unpack(blob)
        cs = ChangeSet.decode(raw)
        try:
            res = apply(store, cs, bodies=dict(bodies), merge=True,
                        allow_mass_delete=allow_mass_delete)
            log.warning("applied a change set for %s acknowledged before a restart: %s",
                        cs.user, res.status)
        except ModsyncError as e:
            log.error("a change set for %s acknowledged before a restart cannot be applied: %s",
                      cs.user, e)
        dequeue(store, key)
    return len(queued)


# -- pushing -----------------------------------------------------------------------------------
@dataclass
class UserOutcome:
    user: str
    status: str               # sent | nothing | locked | error
    detail: str = ""
    written: int = 0
    rounds: int = 0

    def as_dict(self) -> dict:
        return {"user": self.user, "status": self.status, "detail": self.detail,
                "written": self.written, "rounds": self.rounds}


@dataclass
class PassReport:
    outcomes: list = field(default_factory=list)

    @property
    def progress(self) -> bool:
        return any(o.status in ("sent", "nothing") for o in self.outcomes)


@dataclass
class DrainReport:
    users: list
    left: dict          # user -> why

    @property
    def complete(self) -> bool:
        return not self.left


class _PeerLink:
    """One connection to a peer, opened on demand, and the peer's book in our store."""

    direction = ""   # "push" or "pull": which book the peer is kept in

    def __init__(self, store: Store, connect: Callable[[], Client], *, address: str,
                 allow_mass_delete: bool = False):
        self.store = store
        self._connect = connect
        self.address = address
        self.allow_mass_delete = allow_mass_delete
        self.client: Client | None = None
        self.book: PeerBook | None = None

    def connection(self) -> Client:
        if self.client is None:
            try:
                self.client = self._connect()
            except (Disconnected, RemoteError) as e:
                record_connection_error(self.store, self.direction, self.address, str(e))
                raise
            peer = self.client.peer_id or "@" + self.address
            if self.book is None or self.book.peer_id != peer:
                self.book = PeerBook(self.store, self.direction, peer, self.address)
            self.book.contact(software=self.client.peer_software, version=self.client.version)
        return self.client

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def drop(self) -> None:
        """Forget a broken connection without a polite goodbye."""
        if self.client is not None:
            self.client._close_socket()
            self.client = None


class Pusher(_PeerLink):
    """Pushes one store's users to one replica.  ``connect()`` returns a logged-in Client."""

    direction = "push"

    def __init__(self, store: Store, connect: Callable[[], Client], *, address: str,
                 ack: str = "applied", allow_mass_delete: bool = False,
                 on_ack: Callable[[str, str, int], None] | None = None):
        super().__init__(store, connect, address=address, allow_mass_delete=allow_mass_delete)
        self.ack = ack
        self.on_ack = on_ack

    # -- one user ------------------------------------------------------------------
    def push_user(self, user: str) -> UserOutcome:
        """Bring the replica up to date with ``user`` (speculatively; see the module docstring).

        Raises Disconnected / ProtocolError when the connection fails: the
        caller reconnects and retries from the last acknowledged state.
        """
        client = self.connection()
        book = self.book
        pu = book.user(user)
        peer_vv = dict(pu.vv) if pu is not None else None
        for rnd in range(1, MAX_ROUNDS + 1):
            if peer_vv is None:
                peer_vv = dict(client.state(user).state)
            modseq = local_modseq(self.store, user)
            if vv_le(local_state(self.store, user), peer_vv):
                book.ack(user, peer_vv, modseq)
                return UserOutcome(user, "nothing", rounds=rnd)
            try:
                cs = build(self.store, user, peer_vv)
            except FullSyncNeeded:
                log.warning("%s is below our tombstone horizon for %s; sending the full state",
                            self.address, user)
                cs = build(self.store, user, {})
            if not peer_vv and self.ack == "applied" and client.version >= PACKED_VERSION \
                    and (client.admin or client.account == user):
                # A first full replication: in parts, each applied as it arrives.
                cs = split(cs)
            # Even without items the change set is sent: the replica takes in its
            # state (our vector covers stamps that newer changes have superseded).

            def acked(level: str, _user=user, _modseq=modseq) -> None:
                if self.on_ack is not None:
                    self.on_ack(_user, level, _modseq)
            try:
                reply = client.push(cs, self.store.read_body, read_packed=self.store.read_packed,
                                    ack=self.ack, on_ack=acked,
                                    mass_delete=self.allow_mass_delete)
            except RemoteError as e:
                book.error(user, f"{e.code}: {e.text}")
                return UserOutcome(user, "error", f"{e.code}: {e.text}", rounds=rnd)
            try:
                if reply.locked is not None:
                    book.error(user, f"locked: {reply.locked.text}")
                    return UserOutcome(user, "locked", reply.locked.text, rounds=rnd)
                res = reply.result
                peer_vv = dict(res.state)
                if res.status != "rejected":
                    book.ack(user, peer_vv, modseq)
                    if self.on_ack is not None:
                        self.on_ack(user, "applied", modseq)
                    return UserOutcome(user, "sent", res.status, res.written, rnd)
                if reply.counter is not None and reply.counter.items:
                    merged = apply(self.store, reply.counter, bodies=reply.counter_bodies,
                                   merge=True, allow_mass_delete=self.allow_mass_delete)
                    log.info("%s: %s changed there too; merged %d of its changes (%s)",
                             self.address, user, merged.written, merged.status)
            except LegalityError as e:
                book.error(user, f"merge: {e}")
                return UserOutcome(user, "error", f"merging the replica's changes: {e}",
                                   rounds=rnd)
            finally:
                reply.close()
        book.error(user, f"no agreement after {MAX_ROUNDS} rounds")
        return UserOutcome(user, "error", f"still rejected after {MAX_ROUNDS} rounds (the "
                                          f"replica keeps changing); retried later",
                           rounds=MAX_ROUNDS)

    def pending(self, user: str) -> bool:
        """Whether ``user`` has changes the replica has not acknowledged (as far as we know)."""
        pu = self.book.user(user) if self.book is not None else None
        return pu is None or not vv_le(local_state(self.store, user), pu.vv)

    # -- passes ----------------------------------------------------------------------
    def push_once(self, users: list[str] | None = None, *, retries: int = 3) -> PassReport:
        """Push ``users`` (default: every user) once, reconnecting after a broken
        connection up to ``retries`` times; a locked user is reported, not waited for."""
        have = set(self.store.users())
        todo = list(users if users is not None else sorted(have))
        report = PassReport()
        failures = 0
        delay = RECONNECT
        while todo:
            if todo[0] not in have:
                report.outcomes.append(UserOutcome(todo.pop(0), "error",
                                                   "no such user in this store"))
                continue
            try:
                out = self.push_user(todo[0])
            except (Disconnected, ProtocolError) as e:
                self.drop()
                failures += 1
                if failures > retries:
                    report.outcomes += [UserOutcome(u, "error", str(e)) for u in todo]
                    break
                log.warning("push to %s: %s; reconnecting", self.address, e)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            todo.pop(0)
            report.outcomes.append(out)
        return report

    def drain(self, users: list[str] | None = None, *, timeout: float = 60.0) -> DrainReport:
        """Push until the replica has everything or ``timeout`` passes, then check with it."""
        deadline = time.monotonic() + timeout
        have = set(self.store.users())
        users = list(users if users is not None else sorted(have))
        pending = [u for u in users if u in have]     # a user we lack has nothing to send
        last: dict[str, UserOutcome] = {}
        pause = NO_PROGRESS_PAUSE
        while pending and time.monotonic() < deadline:
            report = self.push_once(pending, retries=2)
            for o in report.outcomes:
                last[o.user] = o
            pending = [o.user for o in report.outcomes if o.status in ("locked", "error")]
            if pending and not report.progress:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, 2.0)
        left: dict[str, str] = {}
        try:
            client = self.connection()
            for user in users:
                mine = local_state(self.store, user)
                theirs = dict(client.state(user).state)
                if vv_le(mine, theirs):
                    self.book.ack(user, theirs, local_modseq(self.store, user))
                    continue
                behind = sum(n - theirs.get(o, 0) for o, n in mine.items()
                             if n > theirs.get(o, 0))
                why = last[user].detail if user in last and last[user].status != "sent" else ""
                status = last[user].status if user in last else ""
                left[user] = (f"{behind} modseqs behind"
                              + (f" ({status}: {why})" if status in ("locked", "error") else ""))
        except (Disconnected, ProtocolError, RemoteError) as e:
            for user in users:
                left.setdefault(user, f"cannot check: {e}")
        return DrainReport(users, left)

    def rolling(self, stop: threading.Event, *, users: list[str] | None = None,
                on_pass: Callable[[PassReport], None] | None = None,
                wake: threading.Event | None = None) -> None:
        """Keep the replica up to date until ``stop`` is set.

        New commits are seen within WATCH_INTERVAL (the intent log); each
        user's changes since the replica's last acknowledged state go in one
        change set, so a busy user's commits are batched.  A locked or
        failing user is retried with back-off while the others carry on; a
        pass that moves nothing pauses briefly.
        """
        only = set(users) if users is not None else None
        idle = stop.wait if wake is None else (lambda t: wake.wait(t) and wake.clear())
        due: dict[str, float] = {}             # user -> when to push it next
        backoff: dict[str, float] = {}
        seen: dict[str, int] = {}              # intent modseq already queued
        watch = CommitWatch(self.store)
        delay = RECONNECT
        first = True
        while not stop.is_set():
            intents = watch.poll()
            if intents is not None:
                for user, it in intents.items():
                    if (only is None or user in only) and (first or it.modseq > seen.get(user, -1)):
                        seen[user] = it.modseq
                        # A new commit makes a backed-off user due again (it may have
                        # been unlocked meanwhile); batching happens naturally.
                        due[user] = 0.0 if user not in backoff else min(
                            due.get(user, 0.0), time.monotonic() + backoff[user])
                first = False
            now = time.monotonic()
            ready = sorted((t, u) for u, t in due.items() if t <= now)
            if not ready:
                nxt = min(due.values(), default=now + WATCH_INTERVAL)
                idle(min(max(nxt - now, 0.0), WATCH_INTERVAL))
                continue
            report = PassReport()
            try:
                self.connection()
                delay = RECONNECT
                for _, user in ready:
                    if stop.is_set():
                        break
                    out = self.push_user(user)
                    report.outcomes.append(out)
                    if out.status in ("sent", "nothing"):
                        due.pop(user, None)
                        backoff.pop(user, None)
                    else:
                        b = min(backoff.get(user, RETRY / 2) * 2, RETRY_MAX)
                        backoff[user] = b
                        due[user] = time.monotonic() + b
                        if out.status == "error":
                            log.warning("push %s to %s: %s", user, self.address, out.detail)
            except (Disconnected, ProtocolError, RemoteError) as e:
                self.drop()
                log.warning("push to %s: %s; retrying in %.1f s", self.address, e, delay)
                if self.book is not None:
                    self.book.error(None, str(e))
                stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            if on_pass is not None:
                on_pass(report)
            if report.outcomes and not report.progress:
                stop.wait(NO_PROGRESS_PAUSE)


# -- pulling --------------------------------------------------------------------------------------
class Puller(_PeerLink):
    """Pulls users from one master into a local store.  The master keeps no record of us."""

    direction = "pull"

    def pull_user(self, user: str) -> UserOutcome:
        """Fetch ``user``'s changes since our own state and merge them in."""
        client = self.connection()
        lock = UserLock(self.store, user)
        if not lock.acquire():
            return UserOutcome(user, "locked", "locked in this store")
        try:
            base = local_state(self.store, user)
            if not base:
                return self._pull_parts(client, user)
            try:
                cs, spool = client.pull(user, base)
            except RemoteError as e:
                if e.code != "full-sync-needed":
                    self.book.error(user, f"{e.code}: {e.text}")
                    return UserOutcome(user, "error", f"{e.code}: {e.text}")
                cs, spool = client.pull(user, {})
            try:
                if not cs.items and vv_le(cs.state, base):
                    self.book.ack(user, cs.state, 0)
                    return UserOutcome(user, "nothing")
                res = apply(self.store, cs, bodies=spool, merge=True,
                            allow_mass_delete=self.allow_mass_delete)
            except ModsyncError as e:
                self.book.error(user, str(e))
                return UserOutcome(user, "error", str(e))
            finally:
                spool.close()
            self.book.ack(user, cs.state, 0)
            return UserOutcome(user, "sent" if res.written else "nothing", res.status,
                               res.written)
        finally:
            lock.release()

    def _pull_parts(self, client: Client, user: str) -> UserOutcome:
        """A first full replication: each part is applied (in a thread) while the next
        one arrives.  After a failure the rest is read and dropped; what was applied
        stays, an exact state the next pull continues from."""
        written, failure, res, state = 0, None, None, {}
        pending = None

        def settle():
            nonlocal written, failure, res, pending
            fut, spool = pending
            pending = None
            try:
                res = fut.result()
                written += res.written
            except ModsyncError as e:
                failure = failure or str(e)
            finally:
                spool.close()
        try:
            parts = client.pull_parts(user)
            with ThreadPoolExecutor(1, thread_name_prefix="modsync-apply") as ex:
                try:
                    for cs, spool in parts:
                        if pending is not None:
                            settle()
                        if failure is not None:
                            spool.close()
                            continue
                        pending = (ex.submit(apply, self.store, cs, bodies=spool, merge=True,
                                             allow_mass_delete=self.allow_mass_delete), spool)
                        state = cs.state
                finally:
                    if pending is not None:
                        settle()
        except RemoteError as e:
            self.book.error(user, f"{e.code}: {e.text}")
            return UserOutcome(user, "error", f"{e.code}: {e.text}")
        if failure is not None:
            self.book.error(user, failure)
            return UserOutcome(user, "error", failure)
        self.book.ack(user, state, 0)
        return UserOutcome(user, "sent" if written else "nothing", res.status, written)

    def pull_once(self, users: list[str] | None = None, *, retries: int = 3) -> PassReport:
        report = PassReport()
        failures = 0
        delay = RECONNECT
        todo = None
        while True:
            try:
                if todo is None:
                    todo = list(users) if users is not None else self.connection().users()
                if not todo:
                    break
                out = self.pull_user(todo[0])
            except (Disconnected, ProtocolError) as e:
                self.drop()
                failures += 1
                if failures > retries:
                    left = todo if todo is not None else (users or ["*"])
                    report.outcomes += [UserOutcome(u, "error", str(e)) for u in left]
                    break
                log.warning("pull from %s: %s; reconnecting", self.address, e)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            todo.pop(0)
            report.outcomes.append(out)
        return report

    def follow(self, stop: threading.Event, *, users: list[str] | None = None,
               on_pull: Callable[[UserOutcome], None] | None = None) -> None:
        """Pull, then stay connected and pull each user the master says has changed.

        The master notifies (CHANGED) as soon as it sees a commit, so the
        replica catches up within milliseconds, without polling.  A broken
        connection is reopened (with back-off) and everything pulled again.
        """
        delay = RECONNECT
        retry: dict[str, float] = {}
        while not stop.is_set():
            try:
                client = self.connection()
                if client.version < 2:
                    raise RemoteError("version", f"{self.address} speaks protocol version "
                                                 f"{client.version}; --follow needs version 2")
                client.follow(users)
                todo = set(users) if users is not None else set(client.users())
                delay = RECONNECT
                while not stop.is_set():
                    for user in sorted(todo):
                        retry.pop(user, None)
                        out = self.pull_user(user)
                        if out.status == "locked":
                            retry[user] = time.monotonic() + RETRY
                        if on_pull is not None:
                            on_pull(out)
                    wait = 0.25
                    if retry:
                        wait = max(0.0, min(wait, min(retry.values()) - time.monotonic()))
                    note = client.wait_changed(wait)
                    todo = set()
                    if note is not None:
                        todo.add(note.user)
                        while client.notifications:
                            todo.add(client.notifications.popleft().user)
                    now = time.monotonic()
                    todo |= {u for u, t in retry.items() if t <= now}
            except (Disconnected, ProtocolError, RemoteError) as e:
                self.drop()
                if isinstance(e, RemoteError) and e.code in ("auth", "version", "acl"):
                    raise
                log.warning("follow %s: %s; reconnecting in %.1f s", self.address, e, delay)
                stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX)
        self.disconnect()


__all__ = [
    "CommitWatch",
    "DrainReport",
    "Intent",
    "PassReport",
    "PeerBook",
    "PeerInfo",
    "PeerUser",
    "Puller",
    "Pusher",
    "UserLock",
    "UserOutcome",
    "changes_for",
    "dequeue",
    "is_locked",
    "list_peers",
    "local_only_ranges",
    "queue_changeset",
    "read_intents",
    "receive_push",
    "record_local_only",
    "replay_queue",
    "visible_users",
]
