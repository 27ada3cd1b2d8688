"""``modsync serve``: the asyncio server of the native protocol.

One ``Server`` per store: TCP listeners (optionally TLS), Unix sockets,
and optionally a csync listener for Cyrus (``engine.csync``).  Each
connection is a ``Session`` that moves bytes between its socket and an
``engine.protocol.Connection``; the store work (password checks, building
and applying change sets) runs in worker threads, so many connections
proceed at once while the event loop only moves bytes.

Faults: a peer that breaks the protocol, goes quiet in the middle of a
frame or change set (``stall_timeout``), idles too long between commands
(``idle_timeout``) or sends a change set over ``max_changeset`` is cut
off, with the reason logged.  A change set is applied only once it has
arrived whole, in one transaction, and acknowledged only after that
transaction committed, so a cut-off peer leaves the store as it was and
retries from its last acknowledged state.

SIGTERM (or SIGINT): stop accepting, say BYE to idle connections, let
those in the middle of a command finish (within ``grace`` seconds), then
exit.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from collections import deque
from dataclasses import dataclass, field

from . import protocol as P
from .accounts import check_password
from .archive_protocol import ArchiveRequest
from .acl import AclDenied, may_read_user
from .apply import LegalityError
from .client import parse_address
from .errors import FullSyncNeeded, ModsyncError, NoSuchUser, UsageError
from .replication import (
    WATCH_INTERVAL,
    CommitWatch,
    UserLock,
    changes_for,
    dequeue,
    is_locked,
    local_state,
    queue_changeset,
    receive_push,
    replay_queue,
    visible_users,
)
from .store import Store
from .wire import BodySpool, Incoming

log = logging.getLogger("modsync.server")

#: Seconds to say HELLO and log in: a real client does both in one round trip.
HELLO_TIMEOUT = 10.0
#: Seconds a connection may sit between commands (a follower is never idle:
#: it is waiting for us).  Ten minutes: dead peers do not pile up, and a
#: pusher between bursts simply reconnects.
IDLE_TIMEOUT = 600.0
#: Seconds without a byte in the middle of a frame or change set before the
#: peer counts as stalled.  A sender streams as it reads, so a minute of
#: silence means it is gone or hostile.
STALL_TIMEOUT = 60.0
#: Seconds SIGTERM waits for commands in progress before closing anyway.
SHUTDOWN_GRACE = 30.0
#: Failed logins allowed per client address (and per account name) in
#: AUTH_WINDOW seconds before further attempts are refused outright; every
#: failure also waits AUTH_DELAY seconds before answering.  fail2ban's
#: default is 5 in 10 minutes; ours is stricter per minute and lifts itself.
AUTH_FAILURES, AUTH_WINDOW, AUTH_DELAY = 5, 60.0, 0.5
#: Failed AUTH attempts on one connection before it is closed.
AUTH_ATTEMPTS_PER_CONNECTION = 3
READ_SIZE = 256 * 1024
#: Bytes of outgoing frames gathered before one write + drain.
WRITE_BATCH = 1024 * 1024


@dataclass
class ServerSettings:
    """Everything ``modsync serve`` can be told (flags or the [serve] config table)."""

    listen: list = field(default_factory=list)        # "HOST:PORT"
    unix: list = field(default_factory=list)          # socket paths
    csync: list = field(default_factory=list)         # "HOST:PORT" for Cyrus sync_client
    tls_cert: str | None = None
    tls_key: str | None = None
    max_changeset: int = P.DEFAULT_MAX_CHANGESET
    idle_timeout: float = IDLE_TIMEOUT
    stall_timeout: float = STALL_TIMEOUT
    hello_timeout: float = HELLO_TIMEOUT
    grace: float = SHUTDOWN_GRACE
    auth_failures: int = AUTH_FAILURES
    auth_window: float = AUTH_WINDOW
    auth_delay: float = AUTH_DELAY
    versions: tuple = P.PROTOCOL_VERSIONS
    allow_mass_delete: bool = False
    sync: object = None                # engine.syncrep.SyncSettings, or None
    archives: str | None = None        # --archives DIR (engine.archive_service)


class AuthLimiter:
    """Counts failed logins per key (address, account) in a sliding window."""

    def __init__(self, limit: int, window: float):
        self.limit, self.window = limit, window
        self._fails: dict[str, deque] = {}

    def _recent(self, key: str, now: float) -> deque:
        d = self._fails.setdefault(key, deque())
        while d and now - d[0] > self.window:
            d.popleft()
        return d

    def blocked(self, keys, now: float) -> float:
        """Seconds until the first of ``keys`` may try again (0: not blocked)."""
        wait = 0.0
        for k in keys:
            d = self._recent(k, now)
            if len(d) >= self.limit:
                wait = max(wait, self.window - (now - d[0]))
        return wait

    def fail(self, keys, now: float) -> None:
        for k in keys:
            self._recent(k, now).append(now)


class Server:
    """A modsync server over one store."""

    def __init__(self, store: Store, settings: ServerSettings):
        self.store = store
        self.settings = settings
        self.sessions: set[Session] = set()
        self.stopping = False
        self.limiter = AuthLimiter(settings.auth_failures, settings.auth_window)
        self._servers: list[asyncio.AbstractServer] = []
        self.addresses: list[str] = []
        self._stop: asyncio.Event | None = None
        self._watch_task = None
        self.modseqs: dict[str, int] = {}
        self._commits = CommitWatch(store)
        self.syncrep = None
        self.archives = None             # engine.archive_service.ArchiveService
        self.stats = {"connections": 0, "cut_off": 0, "pushes": 0, "pulls": 0,
                      "auth_failures": 0}

    # -- life cycle ----------------------------------------------------------------------
    def tls_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
        return ctx

    async def start(self) -> list[str]:
        """Open every listener; returns the addresses bound (ports filled in)."""
        self._stop = asyncio.Event()
        if not (self.settings.listen or self.settings.unix):
            raise UsageError("nothing to listen on: give --listen HOST:PORT or --unix PATH")
        if self.settings.archives is not None:
            from .archive_service import ArchiveService
            self.archives = ArchiveService(self.settings.archives)
        n = await asyncio.to_thread(replay_queue, self.store,
                                    allow_mass_delete=self.settings.allow_mass_delete)
        if n:
            log.warning("applied %d change set(s) acknowledged before a restart", n)
        tls = self.tls_context()
        for text in self.settings.listen:
            _, host, port = parse_address(text)
            srv = await asyncio.start_server(self._accept, host, port, ssl=tls, limit=READ_SIZE)
            self._servers.append(srv)
            for sock in srv.sockets:
                h, p = sock.getsockname()[:2]
                self.addresses.append(f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
        for path in self.settings.unix:
            srv = await asyncio.start_unix_server(self._accept, path, ssl=tls)
            self._servers.append(srv)
            self.addresses.append(f"unix:{path}")
        for text in self.settings.csync:
            self.addresses.append(await self._start_csync(text))
        intents = self._commits.poll() or {}
        self.modseqs = {u: i.modseq for u, i in intents.items()}
        self._watch_task = asyncio.create_task(self._watch())
        if self.settings.sync is not None:
            from .syncrep import SyncReplicas
            self.syncrep = SyncReplicas(self.store, self.settings.sync)
            self.syncrep.start()
        return self.addresses

    async def _start_csync(self, text: str) -> str:
        try:
            from engine import csync
        except ImportError as e:
            raise UsageError(f"--csync needs the Cyrus replication module engine.csync, which "
                             f"this modsync does not have ({e})") from None
        _, host, port = parse_address(text)
        srv = await asyncio.start_server(csync.csync_handler(self.store), host, port)
        self._servers.append(srv)
        h, p = srv.sockets[0].getsockname()[:2]
        return f"csync:{h}:{p}"

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop, sig)
            except (NotImplementedError, RuntimeError):
                pass

    def request_stop(self, sig=None) -> None:
        if sig is not None:
            log.warning("received %s: finishing work in progress, then stopping",
                        signal.Signals(sig).name)
        self._stop.set()

    async def serve_until_stopped(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        self.stopping = True
        for srv in self._servers:
            srv.close()
        for s in list(self.sessions):
            s.stop_if_idle()
        deadline = time.monotonic() + self.settings.grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            for s in list(self.sessions):
                s.stop_if_idle()
        for s in list(self.sessions):
            log.warning("closing %s: still busy after %g s", s.peer, self.settings.grace)
            s.task.cancel()
        if self.sessions:
            await asyncio.gather(*(s.task for s in list(self.sessions)), return_exceptions=True)
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.syncrep is not None:
            await asyncio.to_thread(self.syncrep.stop)
            self.stats["sync"] = dict(self.syncrep.metrics)
        if self.archives is not None:
            self.archives.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stopping:
            writer.close()
            return
        session = Session(self, reader, writer)
        self.sessions.add(session)
        self.stats["connections"] += 1
        session.task = asyncio.current_task()
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    # -- watching for commits (for followers and synchronous replicas) ----------------------
    async def _watch(self) -> None:
        while True:
            try:
                await self.scan_commits()
            except asyncio.CancelledError:
                raise
            except Exception:   # pragma: no cover - keep watching whatever happens
                log.exception("watching the store for commits")
            await asyncio.sleep(WATCH_INTERVAL)

    async def scan_commits(self) -> None:
        """Tell followers about every user whose intent moved since the last scan
        (reading only those users' rows: engine.replication.CommitWatch)."""
        intents = self._commits.poll()
        if not intents:
            return
        changed = []
        for user, it in intents.items():
            if it.modseq > self.modseqs.get(user, 0):
                self.modseqs[user] = it.modseq
                changed.append((user, it.modseq))
        for s in list(self.sessions):
            if s.following is not None:
                for user, modseq in changed:
                    s.notify(user, modseq)


class Cutoff(Exception):
    """End a session with a logged reason (and a BYE when the connection still works)."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class Session:
    """One client connection."""

    def __init__(self, server: Server, reader, writer):
        self.server = server
        self.store = server.store
        self.reader, self.writer = reader, writer
        s = server.settings
        self.conn = P.Connection("server", versions=s.versions, max_changeset=s.max_changeset)
        peer = writer.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer, self.host = f"{peer[0]}:{peer[1]}", peer[0]
        else:
            self.peer, self.host = "unix:" + str(writer.get_extra_info("sockname") or "?"), "unix"
        self.events: deque = deque()
        self.account = None
        self.busy = False
        self.task = None
        self.following = None          # None: not following; "all" or a set of users
        self.locks: dict[str, UserLock] = {}
        self.send_lock = asyncio.Lock()
        self.received_in = 0.0
        self.part_follows = False       # the change set just received announced another

    # -- transport -----------------------------------------------------------------------
    async def _read_event(self, timeout: float) -> P.Event:
        while not self.events:
            stalled = self.conn.mid_frame or self.conn.receiving_changeset
            wait = self.server.settings.stall_timeout if stalled else timeout
            try:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), wait)
            except TimeoutError:
                if stalled:
                    where = "a change set" if self.conn.receiving_changeset else "a frame"
                    raise Cutoff("stalled", f"sent nothing for {wait:g} s in the middle of {where}")
                raise Cutoff("idle", f"idle for {wait:g} s")
            except (ConnectionError, ssl.SSLError) as e:
                raise Cutoff("disconnected", f"connection broke: {e}")
            self.events.extend(self.conn.receive_data(data))
        return self.events.popleft()

    async def send(self, *events: P.Event) -> None:
        async with self.send_lock:
            await self._write(b"".join(self.conn.send(e) for e in events))

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def notify(self, user: str, modseq: int) -> None:
        if self.following != "all" and user not in (self.following or ()):
            return
        if self.account is None:
            return
        if not (self.account.admin or self.account.name == user):
            try:
                if not may_read_user(self.store, self.account, user):
                    return
            except ModsyncError:
                return
        asyncio.ensure_future(self._notify(user, modseq))

    async def _notify(self, user: str, modseq: int) -> None:
        try:
            if self.following is not None and not self.conn.closed:
                await self.send(P.Changed(user, modseq))
        except (ConnectionError, P.ProtocolError):
            pass

    def stop_if_idle(self) -> None:
        if not self.busy and self.task is not None and not self.task.done():
            self.task.cancel()

    # -- the conversation -------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._handshake()
            while True:
                self.busy = False
                if self.server.stopping:
                    raise Cutoff("shutdown", "the server is shutting down")
                timeout = self.server.settings.idle_timeout
                if self.following is not None:
                    timeout = max(timeout, 24 * 3600)
                ev = await self._read_event(timeout)
                self.busy = True
                if isinstance(ev, P.ConnectionClosed):
                    log.info("%s closed the connection", self.peer)
                    return
                if isinstance(ev, P.Logout):
                    await self.send(P.Bye("logout", "goodbye"))
                    return
                await self._dispatch(ev)
        except asyncio.CancelledError:
            await self._bye("shutdown", "the server is shutting down")
        except Cutoff as e:
            quiet = e.code in ("logout", "shutdown", "disconnected")
            log.log(logging.INFO if quiet else logging.WARNING, "cut off %s%s: %s",
                    self.peer, self._who(), e.reason)
            if not quiet:
                self.server.stats["cut_off"] += 1
            await self._bye(e.code, e.reason)
        except P.ProtocolError as e:
            log.warning("cut off %s%s: protocol error: %s", self.peer, self._who(), e)
            self.server.stats["cut_off"] += 1
            await self._bye(e.code, f"protocol error: {e}")
        except (ConnectionError, ssl.SSLError, OSError) as e:
            log.info("%s%s: connection lost: %s", self.peer, self._who(), e)
        except Exception:
            log.exception("%s%s: internal error; closing the connection", self.peer, self._who())
            await self._bye("internal", "internal server error")
        finally:
            for lock in self.locks.values():
                lock.release()
            self.locks.clear()
            self.following = None
            try:
                self.writer.close()
            except Exception:   # pragma: no cover
                pass

    def _who(self) -> str:
        return f" ({self.account.name})" if self.account is not None else ""

    async def _bye(self, code: str, reason: str) -> None:
        try:
            if not self.conn.closed and not self.conn.sending_changeset:
                await asyncio.wait_for(self.send(P.Bye(code, reason)), 2)
        except Exception:
            pass

    async def _handshake(self) -> None:
        s = self.server.settings
        ev = await self._read_event(s.hello_timeout)
        if isinstance(ev, P.ConnectionClosed):
            raise Cutoff("disconnected", "closed before HELLO")
        version = self.conn.choose_version(ev)
        if version is None:
            bye = self.conn.refusal(ev)
            log.warning("refused %s: %s", self.peer, bye.text)
            await self.send(bye)
            raise Cutoff("disconnected", "no common protocol version")
        await self.send(P.Welcome(version, self.conn.versions, P.SOFTWARE, self.store.id))
        attempts = 0
        while True:
            ev = await self._read_event(s.hello_timeout)
            if isinstance(ev, P.ConnectionClosed):
                raise Cutoff("disconnected", "closed before logging in")
            if isinstance(ev, P.Logout):
                raise Cutoff("logout", "logged out before logging in")
            now = time.monotonic()
            keys = ("addr:" + self.host, "name:" + ev.name)
            wait = self.server.limiter.blocked(keys, now)
            if wait:
                log.warning("refused login of %r from %s: too many failed logins, %d s to wait",
                            ev.name, self.peer, int(wait) + 1)
                self.server.stats["auth_failures"] += 1
                await self.send(P.No("rate-limited", f"too many failed logins; try again in "
                                                     f"{int(wait) + 1} s"))
            else:
                account = await asyncio.to_thread(check_password, self.store, ev.name,
                                                  ev.password)
                if account is not None:
                    self.account = account
                    log.info("%s logged in as %s%s", self.peer, account.name,
                             " (admin)" if account.admin else "")
                    await self.send(P.Ok("welcome", account.name, account.admin))
                    return
                self.server.limiter.fail(keys, now)
                self.server.stats["auth_failures"] += 1
                log.warning("authentication failed for %r from %s", ev.name, self.peer)
                await asyncio.sleep(s.auth_delay)
                await self.send(P.No("auth", "unknown account or wrong password"))
            attempts += 1
            if attempts >= AUTH_ATTEMPTS_PER_CONNECTION:
                raise Cutoff("auth", f"{attempts} failed logins on one connection")

    async def _dispatch(self, ev: P.Event) -> None:
        if isinstance(ev, P.ListUsers):
            users = await asyncio.to_thread(visible_users, self.store, self.account)
            await self.send(P.Users(tuple(users)))
        elif isinstance(ev, P.GetState):
            await self._state(ev)
        elif isinstance(ev, P.Push):
            await self._push(ev)
        elif isinstance(ev, P.Pull):
            await self._pull(ev)
        elif isinstance(ev, P.Follow):
            self.following = "all" if ev.users is None else set(ev.users)
            await self.send(P.Ok("following"))
        elif isinstance(ev, P.Unfollow):
            self.following = None
            await self.send(P.Ok("not following"))
        elif isinstance(ev, P.Lock):
            await self._lock(ev)
        elif isinstance(ev, P.Unlock):
            lock = self.locks.pop(ev.user, None)
            if lock is not None:
                lock.release()
            await self.send(P.Ok("unlocked"))
        elif isinstance(ev, ArchiveRequest):
            from .archive_service import dispatch
            await dispatch(self, ev)
        elif isinstance(ev, P.ChangeSetStart):
            raise P.ProtocolError("a change set must follow PUSH")
        else:
            raise P.ProtocolError(f"unexpected {type(ev).__name__.upper()} from a client")

    async def _may_read(self, user: str) -> bool:
        if self.account.admin or self.account.name == user:
            return True
        try:
            return await asyncio.to_thread(may_read_user, self.store, self.account, user)
        except NoSuchUser:
            return False

    async def _state(self, ev: P.GetState) -> None:
        if not await self._may_read(ev.user):
            await self.send(P.No("acl", f"account {self.account.name!r} may not see user "
                                        f"{ev.user!r}", ev.user))
            return

        def read():
            try:
                return local_state(self.store, ev.user), self.store.user_info(ev.user).modseq
            except NoSuchUser:
                return {}, 0
        vv, modseq = await asyncio.to_thread(read)
        await self.send(P.State(ev.user, vv, modseq))

    async def _lock(self, ev: P.Lock) -> None:
        if not (self.account.admin or self.account.name == ev.user):
            await self.send(P.No("acl", "only an admin or the user's own account may lock a user",
                                 ev.user))
            return
        lock = self.locks.get(ev.user) or UserLock(self.store, ev.user)
        if await asyncio.to_thread(lock.acquire):
            self.locks[ev.user] = lock
            await self.send(P.Ok("locked"))
        else:
            await self.send(P.Locked(ev.user, "held by someone else"))

    # -- push ---------------------------------------------------------------------------------
    async def _receive(self, user: str, *, discard: bool = False):
        """Read one change set that follows a PUSH: (cs, spool), or None if discarded or
        aborted.  ``part_follows`` then says whether another part of it follows."""
        self.part_follows = False
        ev = await self._read_event(self.server.settings.stall_timeout)
        if not isinstance(ev, P.ChangeSetStart):
            raise P.ProtocolError(f"PUSH must be followed by a change set, not "
                                  f"{type(ev).__name__.upper()}")
        if ev.changeset.user != user:
            raise P.ProtocolError(f"PUSH for {user!r} carries a change set for "
                                  f"{ev.changeset.user!r}")
        incoming = None if discard else Incoming(ev.changeset, ev.n_items, BodySpool())
        try:
            while True:
                ev = await self._read_event(self.server.settings.stall_timeout)
                if incoming is None:
                    if isinstance(ev, P.ChangeSetEnd):
                        self.part_follows = bool(ev.more) and not ev.aborted
                        return None
                    continue
                if P.feed_changeset(incoming, ev):
                    continue
                if isinstance(ev, P.ChangeSetEnd):
                    if ev.aborted:
                        incoming.discard()
                        return None
                    self.part_follows = bool(ev.more)
                    return incoming.finish()
        except BaseException:
            if incoming is not None:
                incoming.discard()
            raise

    async def _discard(self, user: str, *, started: bool = False) -> None:
        """Read and drop a pushed change set, every part of it (``started``: the parts
        after the one just received)."""
        if not started:
            await self._receive(user, discard=True)
        while self.part_follows:
            await self._receive(user, discard=True)

    async def _push(self, ev: P.Push) -> None:
        user = ev.user
        self.server.stats["pushes"] += 1
        if user not in self.locks and await asyncio.to_thread(is_locked, self.store, user):
            # Answer at once; the pusher stops streaming when it sees this.
            await self.send(P.Locked(user, "the user is locked on the receiver"))
            await self._discard(user)
            return
        t0 = time.monotonic()
        got = await self._receive(user)
        more = self.part_follows
        self.received_in = time.monotonic() - t0
        if got is None:
            await self.send(P.No("aborted", "the change set was abandoned", user))
            return
        cs, spool = got
        if more and ev.ack != "applied":
            spool.close()
            raise P.ProtocolError(f"a PUSH with ACK {ev.ack} carries one change set, not parts")
        try:
            if ev.ack == "received":
                await self.send(P.Ack(user, "received"))
            lock = self.locks.get(user)
            own = lock is None
            if own:
                lock = UserLock(self.store, user)
                if not await asyncio.to_thread(lock.acquire):
                    await self.send(P.Locked(user, "the user is locked on the receiver"))
                    await self._discard(user, started=True)
                    return
            try:
                if more:
                    await self._apply_parts(ev, cs, spool)
                else:
                    await self._apply_push(ev, cs, spool)
            finally:
                if own:
                    lock.release()
        finally:
            spool.close()

    async def _apply_parts(self, ev: P.Push, cs, spool) -> None:
        """Apply a change set in parts, each as soon as it has arrived, while the next
        one arrives; answer once, after the last part or the first that failed."""
        user = ev.user
        pending = asyncio.ensure_future(self._apply_one(ev, cs, spool))
        stop = None              # the answer of the part that failed
        last, written, more = None, 0, True
        try:
            while pending is not None:
                t0 = time.monotonic()
                got = await self._receive(user) if more else None
                nxt_more = self.part_follows
                self.received_in = time.monotonic() - t0
                out = await pending
                pending = None
                if isinstance(out, P.No) or out.status == "rejected":
                    stop = out
                else:
                    last, written = out, written + out.written
                if more and got is None and stop is None:
                    stop = P.No("aborted", "the change set was abandoned", user)
                if stop is not None:
                    if got is not None:
                        got[1].close()
                    await self._discard(user, started=True)
                    break
                if got is not None:
                    pending = asyncio.ensure_future(self._apply_one(ev, *got))
                more = nxt_more
        except BaseException:
            if pending is not None:     # the part in hand commits or not, whole, before we go
                await asyncio.wait([pending])
            raise
        if isinstance(stop, P.No):
            await self.send(stop)
            return
        await self._answer(ev, stop or last, written)

    async def _apply_push(self, ev: P.Push, cs, spool) -> None:
        user = ev.user
        queued = None
        if ev.ack == "durable":
            queued = await asyncio.to_thread(queue_changeset, self.store, cs, spool.get)
            await self.send(P.Ack(user, "durable"))
        try:
            out = await self._apply_one(ev, cs, spool)
        finally:
            if queued is not None:
                await asyncio.to_thread(dequeue, self.store, queued)
        if isinstance(out, P.No):
            await self.send(out)
            return
        await self._answer(ev, out, out.written)

    async def _apply_one(self, ev: P.Push, cs, spool):
        """Apply one received change set (closing its spool): the ApplyResult, or the NO
        that refuses it."""
        user = ev.user
        s = self.server.settings
        try:
            # The sender may ask to remove most of a user's mail on its own account's
            # authority; otherwise only the server's setting allows it.
            mass = s.allow_mass_delete or (ev.mass_delete and (self.account.admin or
                                                               self.account.name == user))
            t0 = time.monotonic()
            result = await asyncio.to_thread(receive_push, self.store, self.account, cs,
                                             spool, allow_mass_delete=mass,
                                             acknowledged=ev.ack != "applied")
            log.info("%s (%s): push of %s: %s, %d items, %d bodies (%.1f MB) received in "
                     "%.3f s, applied in %.3f s", self.peer, self.account.name, user,
                     result.status, len(cs.items), len(cs.bodies), spool.total / 1e6,
                     self.received_in, time.monotonic() - t0)
            return result
        except AclDenied as e:
            log.warning("%s (%s): refused push of %s: %s", self.peer, self.account.name, user, e)
            return P.No("acl", str(e), user)
        except LegalityError as e:
            log.warning("%s (%s): refused push of %s: %s: %s", self.peer, self.account.name,
                        user, e.code, e)
            return P.No("legality", f"{e.code}: {e}", user)
        except FullSyncNeeded as e:
            return P.No("full-sync-needed", str(e), user)
        except ModsyncError as e:
            log.warning("%s: push of %s failed: %s", self.peer, user, e)
            return P.No(e.code, str(e), user)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            # A change set whose fields make no sense: apply ran in one
            # transaction, so nothing of it was written.
            log.warning("%s: malformed change set for %s refused: %s: %s", self.peer, user,
                        type(e).__name__, e)
            return P.No("malformed", f"malformed change set ({type(e).__name__}: {e})", user)
        finally:
            spool.close()

    async def _answer(self, ev: P.Push, result, written: int) -> None:
        """RESULT for an applied (or rejected) push, with the counter change set if any."""
        user = ev.user
        if result.status in ("applied", "merged") and self.server.syncrep is not None:
            await self.server.syncrep.wait_async(user, self.store.user_info(user).modseq)
        vv = await asyncio.to_thread(local_state, self.store, user)
        counter = result.counter if result.status == "rejected" else None
        has_counter = counter is not None and bool(counter.items)
        # parts applied as they arrived may have written it all: the last finds nothing
        status = "applied" if written and result.status == "nothing" else result.status
        await self.send(P.Result(user, status, result.code, result.reason, vv, written,
                                 has_counter))
        if has_counter:
            await self._send_changeset(counter)
        if written:
            await self.server.scan_commits()

    async def _send_changeset(self, cs) -> None:
        """Send a change set, or the parts of one (a list), reading bodies in a thread."""
        packed = self.store.read_packed if self.conn.version >= P.PACKED_VERSION else None
        events = P.parts_events(cs if isinstance(cs, list) else [cs], self.store.read_body,
                                read_packed=packed)

        def take() -> bytes:
            out, size = [], 0
            for e in events:
                b = self.conn.send(e)
                out.append(b)
                size += len(b)
                if size >= WRITE_BATCH:
                    break
            return b"".join(out)
        async with self.send_lock:
            while True:
                data = await asyncio.to_thread(take)
                if not data:
                    return
                await self._write(data)

    # -- pull ------------------------------------------------------------------------------------
    async def _pull(self, ev: P.Pull) -> None:
        self.server.stats["pulls"] += 1
        # A puller that holds nothing of the user may take it in parts (each applied
        # as it arrives); ACL-filtered answers go whole.
        parts = ev.parts and (self.account.admin or self.account.name == ev.user)
        try:
            cs = await asyncio.to_thread(changes_for, self.store, self.account, ev.user, ev.base,
                                         parts=bool(parts))
        except AclDenied as e:
            await self.send(P.No("acl", str(e), ev.user))
            return
        except NoSuchUser as e:
            await self.send(P.No("no-such-user", str(e), ev.user))
            return
        except FullSyncNeeded as e:
            await self.send(P.No("full-sync-needed", str(e), ev.user))
            return
        await self._send_changeset(cs)


async def serve(store: Store, settings: ServerSettings, *, ready=None) -> Server:
    """Run a server until SIGTERM/SIGINT; ``ready(addresses)`` is called once listening."""
    server = Server(store, settings)
    await server.start()
    server.install_signal_handlers()
    if ready is not None:
        ready(server.addresses)
    await server.serve_until_stopped()
    return server
