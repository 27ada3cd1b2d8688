"""Synchronous replicas: a commit returns only once enough replicas acknowledge it.

A ``SyncReplicas`` keeps one connection per configured replica, each
driven by a thread that pushes (``engine.replication.Pusher``) every user
with commits the replica has not acknowledged, watching the intent log like
a rolling push.  Writers commit as usual and then ``wait(user, modseq)``
(or use ``commit(user, fn)``, which does both); ``modsync serve`` waits
this way before answering a push it accepted.

Levels (what the replica has done when it acknowledges):

* ``received``: the whole change set is in the replica's memory;
* ``durable``: it is in the replica's LMDB, fsynced (queued; applied right
  after, and again after a crash: ``engine.replication.replay_queue``);
* ``applied``: it is applied (and fsynced) in the replica's store.

Quorum: ``any N`` (any N of the replicas), or ``first N`` (the N replicas
earliest in the list among those currently connected, as PostgreSQL's
``FIRST n``: a replica that is down hands its place to the next).

Group commit: each replica thread sends, per user, everything committed
since the replica's last acknowledgement in one change set, applied there
in one transaction; writers that committed meanwhile are released by the
same acknowledgement.  So N concurrent writers cost about one replica
fsync per round, not one per commit.

Timeout (``timeout`` seconds without a quorum): ``block`` keeps waiting
(and logs a warning every ``timeout``); ``async`` returns anyway, logs an
error, counts it (``metrics["fallbacks"]``) and records the modseq range
acknowledged only locally (``engine.replication.record_local_only``; shown
by `modsync status`).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import protocol as P
from .client import Client, client_tls_context, parse_address
from .errors import UsageError
from .replication import Pusher, record_local_only
from .store import Store

log = logging.getLogger("modsync.syncrep")

LEVEL_RANK = {level: i for i, level in enumerate(P.ACK_LEVELS)}   # received < durable < applied


@dataclass
class ReplicaSpec:
    address: str
    name: str = ""
    priority: int = 0          # lower first ("first N")


def parse_replicas(value) -> list[ReplicaSpec]:
    """Replicas from flags (addresses) or the config file (addresses or tables with
    ``address`` and optionally ``name`` and ``priority``); the order is the priority."""
    out = []
    for i, v in enumerate(value or []):
        if isinstance(v, str):
            spec = ReplicaSpec(v, v, i)
        elif isinstance(v, dict) and isinstance(v.get("address"), str):
            spec = ReplicaSpec(v["address"], str(v.get("name") or v["address"]),
                               int(v.get("priority", i)))
        else:
            raise UsageError(f"synchronous replica {v!r}: give an address, or a table with "
                             f"address (and optionally name and priority)")
        parse_address(spec.address)
        out.append(spec)
    return sorted(out, key=lambda r: r.priority)


def parse_quorum(text: str, n_replicas: int) -> tuple[str, int]:
    parts = str(text).split()
    if len(parts) != 2 or parts[0] not in ("any", "first") or not parts[1].isdigit():
        raise UsageError(f"quorum {text!r}: use 'any N' or 'first N'")
    n = int(parts[1])
    if not 1 <= n <= n_replicas:
        raise UsageError(f"quorum {text!r}: N must be between 1 and the {n_replicas} "
                         f"replica(s) named")
    return parts[0], n


@dataclass
class SyncSettings:
    replicas: list
    level: str = "applied"
    quorum: str = "any 1"
    timeout: float = 5.0
    on_timeout: str = "block"
    account: str = "replication"
    password: str = ""
    tls_ca: str | None = None

    def __post_init__(self):
        if self.level not in LEVEL_RANK:
            raise UsageError(f"synchronous level {self.level!r}: use received, durable or "
                             f"applied")
        if self.on_timeout not in ("block", "async"):
            raise UsageError(f"on_timeout {self.on_timeout!r}: use block or async")
        if not self.replicas:
            raise UsageError("synchronous replication needs at least one replica")
        self.mode, self.n = parse_quorum(self.quorum, len(self.replicas))


class _ReplicaPusher(Pusher):
    """A Pusher that says when its connection breaks (for "first N")."""

    on_drop: Callable[[], None] = staticmethod(lambda: None)

    def drop(self) -> None:
        super().drop()
        self.on_drop()


class _Replica:
    def __init__(self, spec: ReplicaSpec):
        self.spec = spec
        self.connected = False
        self.acked: dict[str, int] = {}       # user -> our modseq acknowledged at the level
        self.thread: threading.Thread | None = None
        self.pusher: Pusher | None = None


class SyncReplicas:
    """Ships commits to the configured replicas and releases writers on a quorum."""

    def __init__(self, store: Store, settings: SyncSettings, *,
                 connect: Callable[[ReplicaSpec], Client] | None = None):
        self.store = store
        self.settings = settings
        self.replicas = [_Replica(r) for r in settings.replicas]
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connect = connect or self._default_connect
        self._done: dict[str, int] = {}       # user -> highest modseq a quorum acknowledged
        self.metrics = {"commits": 0, "acknowledged": 0, "fallbacks": 0, "batches": 0}

    def _default_connect(self, spec: ReplicaSpec) -> Client:
        s = self.settings
        tls = client_tls_context(ca=s.tls_ca) if s.tls_ca else None
        return Client(spec.address, account=s.account, password=s.password, tls=tls,
                      timeout=max(s.timeout * 4, 10.0))

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        for r in self.replicas:
            r.pusher = _ReplicaPusher(
                self.store, self._connector(r), address=r.spec.address,
                ack=self.settings.level,
                on_ack=lambda user, level, modseq, _r=r: self._ack(_r, user, level, modseq))
            r.pusher.on_drop = lambda _r=r: self._set_connected(_r, False)
            r.thread = threading.Thread(target=self._run, args=(r,), daemon=True,
                                        name=f"syncrep {r.spec.name}")
            r.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for r in self.replicas:
            if r.thread is not None:
                r.thread.join(30)
            if r.pusher is not None:
                r.pusher.disconnect()
        with self._cond:
            self._cond.notify_all()

    def _connector(self, r: _Replica):
        def connect() -> Client:
            try:
                c = self._connect(r.spec)
            except Exception:
                self._set_connected(r, False)
                raise
            self._set_connected(r, True)
            return c
        return connect

    def _set_connected(self, r: _Replica, up: bool) -> None:
        with self._cond:
            if r.connected != up:
                log.log(logging.INFO if up else logging.WARNING, "synchronous replica %s %s",
                        r.spec.name, "connected" if up else "unreachable")
            r.connected = up
            self._cond.notify_all()

    def _run(self, r: _Replica) -> None:
        def on_pass(report):
            self.metrics["batches"] += sum(o.status == "sent" for o in report.outcomes)
            if not report.progress:
                self._set_connected(r, r.pusher.client is not None)
        while not self._stop.is_set():
            try:
                r.pusher.rolling(self._stop, on_pass=on_pass, wake=self._wake)
            except Exception:   # pragma: no cover - keep the replica thread alive
                log.exception("synchronous replica %s", r.spec.name)
                self._set_connected(r, False)
                self._stop.wait(1.0)

    # -- acknowledgements ------------------------------------------------------------------
    def _ack(self, r: _Replica, user: str, level: str, modseq: int) -> None:
        if LEVEL_RANK[level] < LEVEL_RANK[self.settings.level]:
            return
        with self._cond:
            r.connected = True
            if modseq > r.acked.get(user, 0):
                r.acked[user] = modseq
                self._cond.notify_all()

    def _satisfied(self, user: str, modseq: int) -> bool:
        s = self.settings
        if s.mode == "any":
            return sum(r.acked.get(user, 0) >= modseq for r in self.replicas) >= s.n
        # first N: the N earliest replicas that are connected must all have it.
        chosen = [r for r in self.replicas if r.connected][:s.n]
        return len(chosen) == s.n and all(r.acked.get(user, 0) >= modseq for r in chosen)

    # -- writers ---------------------------------------------------------------------------
    def notify(self) -> None:
        """A commit was made: wake the replica threads now (rather than at their next look)."""
        self._wake.set()

    def wait(self, user: str, modseq: int) -> bool:
        """Block until a quorum acknowledged ``user`` up to ``modseq``.

        True when it did; False when it timed out and the settings say to go
        on asynchronously (the range is then recorded as local only).
        """
        s = self.settings
        self.metrics["commits"] += 1
        self.notify()
        deadline = time.monotonic() + s.timeout
        with self._cond:
            while not self._satisfied(user, modseq):
                if self._stop.is_set():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    if s.on_timeout == "block":
                        log.warning("synchronous replicas have not acknowledged %s modseq %d "
                                    "after %g s; still waiting (on_timeout = block)",
                                    user, modseq, s.timeout)
                        deadline = time.monotonic() + s.timeout
                        continue
                    lo = self._done.get(user, 0) + 1
                    self.metrics["fallbacks"] += 1
                    break
                self._cond.wait(min(left, 1.0))
            else:
                self.metrics["acknowledged"] += 1
                if modseq > self._done.get(user, 0):
                    self._done[user] = modseq
                return True
        log.error("synchronous replicas did not acknowledge %s modseq %d within %g s: "
                  "continuing asynchronously; modseqs %d..%d are acknowledged only locally",
                  user, modseq, s.timeout, lo, modseq)
        record_local_only(self.store, user, lo, modseq)
        return False

    async def wait_async(self, user: str, modseq: int) -> bool:
        return await asyncio.to_thread(self.wait, user, modseq)

    def commit(self, user: str, fn, **kwargs):
        """``store.mutate(user, fn)``, returning once the replicas acknowledged it (see wait)."""
        modseq = []

        def run(m):
            out = fn(m)
            modseq.append(m.modseq)
            return out
        result = self.store.mutate(user, run, **kwargs)
        self.wait(user, modseq[-1])
        return result

    def status(self) -> list[dict]:
        with self._cond:
            return [{"replica": r.spec.name, "address": r.spec.address, "connected": r.connected,
                     "acknowledged": dict(r.acked)} for r in self.replicas]
