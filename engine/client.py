"""The blocking network client of modsync's native protocol, and ``RemoteSource``.

``Client`` moves bytes between a socket (TCP, TLS or a Unix socket) and
``engine.protocol.Connection``; it knows the order of the conversation,
nothing about stores.  ``engine.replication`` drives it for push, pull,
drain and follow; backups read a live server through ``RemoteSource``.

Addresses are ``HOST:PORT``, ``[IPv6]:PORT`` or ``unix:/path/to/socket``.
"""
from __future__ import annotations

import select
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import protocol as P
from .changeset import ChangeSet
from .errors import ModsyncError, UsageError
from .wire import BodySpool, Incoming

#: Seconds a blocking read or write may wait before the peer counts as
#: stalled.  A change set is streamed as it is built, so even a first sync
#: never leaves the socket silent for long; one minute absorbs a busy
#: receiver's fsync storms.
DEFAULT_TIMEOUT = 60.0

#: Bytes of frames gathered before one sendall(): large enough that a 4 KB
#: message costs no system call of its own.
SEND_BUFFER = 1024 * 1024


class RemoteError(ModsyncError):
    """The peer refused something (``NO``) or closed the connection (``BYE``).

    ``code`` is the peer's code: ``auth``, ``rate-limited``, ``acl``,
    ``legality``, ``version``, ``no-such-user``, ``full-sync-needed``...
    """

    def __init__(self, code: str, text: str, *, subject=None):
        super().__init__(f"{text} ({code})" if code else text, subject=subject)
        self.code = code
        self.text = text


class Disconnected(ModsyncError):
    """The connection broke (closed, reset, timed out): retry from the last acknowledged state."""

    code = "disconnected"


def parse_address(text: str) -> tuple:
    """("unix", path) or ("tcp", host, port) for an address as written on the command line."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise UsageError(f"address {text!r}: give the socket's path after 'unix:'")
        return ("unix", path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"address {text!r}: use HOST:PORT, [IPv6]:PORT or unix:/path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return ("tcp", host, int(port))


def client_tls_context(*, ca: str | None = None, cert: str | None = None,
                       key: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """A TLS context for connecting: verify the server against ``ca`` (or the system's CAs)."""
    ctx = ssl.create_default_context(cafile=ca)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


@dataclass
class PushReply:
    """What the receiver said to a PUSH: a RESULT (maybe with a counter change set) or LOCKED."""

    result: P.Result | None = None
    locked: P.Locked | None = None
    counter: ChangeSet | None = None
    counter_bodies: BodySpool | None = None
    acked: str = ""          # the early acknowledgement level received, if any

    def close(self) -> None:
        if self.counter_bodies is not None:
            self.counter_bodies.close()


class Client:
    """One logged-in connection to a modsync server.  Not thread-safe.

    ``peer_id`` is the server's store id and ``version`` the protocol
    version negotiated.  Every method raises RemoteError when the server
    refuses, Disconnected when the connection breaks, and
    engine.protocol.ProtocolError when the server breaks the protocol.
    """

    def __init__(self, address: str, *, account: str, password: str,
                 tls: ssl.SSLContext | None = None, versions=P.PROTOCOL_VERSIONS,
                 timeout: float = DEFAULT_TIMEOUT, store_id: str | None = None,
                 max_changeset: int = P.DEFAULT_MAX_CHANGESET, spool_dir: str | None = None):
        self.address = address
        self.timeout = timeout
        self.spool_dir = spool_dir
        self.conn = P.Connection("client", versions=versions, max_changeset=max_changeset)
        self._events: deque = deque()
        self.notifications: deque = deque()
        self.following = False
        self.sock = self._connect(address, tls, timeout)
        try:
            self._send(P.Hello(tuple(versions), P.SOFTWARE, store_id))
            ev = self._next()
            if isinstance(ev, P.Bye):
                raise RemoteError(ev.code, ev.text)
            self.version: int = ev.version
            self.peer_id: str | None = ev.store_id
            self.peer_software = ev.software
            self._send(P.Auth(account, password))
            ev = self._next()
            if isinstance(ev, (P.No, P.Bye)):
                raise RemoteError(ev.code, ev.text)
            self.account = ev.account or account
            self.admin = ev.admin
        except BaseException:
            self._close_socket()
            raise

    # -- transport ----------------------------------------------------------------------
    @staticmethod
    def _connect(address: str, tls, timeout: float) -> socket.socket:
        where = parse_address(address)
        try:
            if where[0] == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(where[1])
            else:
                sock = socket.create_connection((where[1], where[2]), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=where[1] if where[0] == "tcp" else None)
        except (OSError, ssl.SSLError) as e:
            raise Disconnected(f"cannot connect to {address}: {e}", subject=address) from None
        sock.settimeout(timeout)
        return sock

    def _send(self, ev: P.Event) -> None:
        self._sendall(self.conn.send(ev))

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            raise Disconnected(f"connection to {self.address} broke while sending: {e}") from None

    def _fill(self, timeout: float | None) -> bool:
        """Read once; False if nothing arrived within ``timeout`` (None: self.timeout)."""
        if timeout is not None and not self._readable(timeout):
            return False
        try:
            data = self.sock.recv(256 * 1024)
        except TimeoutError:
            raise Disconnected(f"{self.address} sent nothing for {self.timeout:g} s "
                               f"(stalled)") from None
        except (OSError, ssl.SSLError) as e:
            raise Disconnected(f"connection to {self.address} broke: {e}") from None
        if not data and self.conn.closed:
            raise Disconnected(f"{self.address} closed the connection")
        for ev in self.conn.receive_data(data):
            if isinstance(ev, P.Changed):
                self.notifications.append(ev)
            else:
                self._events.append(ev)
        return True

    def _readable(self, timeout: float) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        r, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        return bool(r)

    def _next(self) -> P.Event:
        while not self._events:
            self._fill(None)
        ev = self._events.popleft()
        if isinstance(ev, P.ConnectionClosed):
            raise Disconnected(f"{self.address} closed the connection")
        return ev

    def _reply(self, *want: type) -> P.Event:
        ev = self._next()
        if isinstance(ev, want):
            return ev
        if isinstance(ev, P.No):
            raise RemoteError(ev.code, ev.text, subject=ev.user)
        if isinstance(ev, P.Bye):
            raise RemoteError(ev.code, ev.text)
        raise P.ProtocolError(f"expected {' or '.join(t.__name__.upper() for t in want)}, "
                              f"got {type(ev).__name__.upper()}")

    def _receive_changeset(self) -> tuple[ChangeSet, BodySpool, bool]:
        """One change set: (change set, its bodies, whether another part follows)."""
        start = self._reply(P.ChangeSetStart)
        incoming = Incoming(start.changeset, start.n_items, BodySpool(self.spool_dir))
        try:
            while True:
                ev = self._next()
                if P.feed_changeset(incoming, ev):
                    continue
                if isinstance(ev, P.ChangeSetEnd):
                    if ev.aborted:
                        raise RemoteError("aborted", "the server gave up sending the change set")
                    return (*incoming.finish(), bool(ev.more))
        except BaseException:
            incoming.discard()
            raise

    # -- commands -----------------------------------------------------------------------
    def users(self) -> list[str]:
        """The users this account may replicate (the server decides)."""
        self._send(P.ListUsers())
        return list(self._reply(P.Users).users)

    def state(self, user: str) -> P.State:
        """The server's state of ``user`` (an empty vector for a user it does not have)."""
        self._send(P.GetState(user))
        return self._reply(P.State)

    def push(self, cs: ChangeSet | list[ChangeSet], read_body: Callable[[bytes], bytes], *,
             read_packed=None, ack: str = "applied",
             on_ack: Callable[[str], None] | None = None,
             mass_delete: bool = False) -> PushReply:
        """Send a change set, or the parts of one (version 3, ACK applied:
        ``engine.changeset.split``); return the server's answer (see PushReply).

        Streams as it reads bodies; with ``read_packed`` (``Store.read_packed``)
        a version-3 server gets small bodies as they are stored.  A LOCKED
        answer that arrives while we are still sending stops the stream at
        once (END ABORTED).
        """
        parts = cs if isinstance(cs, list) else [cs]
        if ack != "applied" and self.version < 2:
            raise P.ProtocolError(f"acknowledgement level {ack!r} needs protocol version 2; "
                                  f"the server speaks {self.version}", code="version")
        if len(parts) > 1 and (ack != "applied" or self.version < P.PACKED_VERSION):
            raise P.ProtocolError("a change set in parts needs protocol version 3 and ACK "
                                  "applied", code="version")
        self._send(P.Push(parts[0].user, ack, mass_delete))
        reply = PushReply()
        buf: list[bytes] = []
        size = 0
        if self.version < P.PACKED_VERSION:
            read_packed = None
        for ev in P.parts_events(parts, read_body, read_packed=read_packed):
            if isinstance(ev, P.ChangeSetEnd) and not ev.more:
                break
            data = self.conn.send(ev)
            buf.append(data)
            size += len(data)
            if size >= SEND_BUFFER:
                self._sendall(b"".join(buf))
                buf, size = [], 0
                if self.conn.sending_changeset and self._readable(0):
                    self._fill(None)
                    if any(isinstance(e, (P.Locked, P.No)) for e in self._events):
                        self._sendall(self.conn.send(P.ChangeSetEnd(aborted=True)))
                        break
        if self.conn.sending_changeset:
            buf.append(self.conn.send(P.ChangeSetEnd()))
        if buf:
            self._sendall(b"".join(buf))
        while True:
            ev = self._reply(P.Result, P.Locked, P.Ack)
            if isinstance(ev, P.Ack):
                reply.acked = ev.level
                if on_ack is not None:
                    on_ack(ev.level)
                continue
            if isinstance(ev, P.Locked):
                reply.locked = ev
                return reply
            reply.result = ev
            if ev.counter:
                reply.counter, reply.counter_bodies, _ = self._receive_changeset()
            return reply

    def pull(self, user: str, base: dict) -> tuple[ChangeSet, BodySpool]:
        """The change set that takes a store at ``base`` to the server's state of ``user``.

        The bodies come in a BodySpool (call ``close()`` on it when done).
        """
        self._send(P.Pull(user, dict(base)))
        self._expect_changeset()
        cs, spool, _ = self._receive_changeset()
        return cs, spool

    def pull_parts(self, user: str) -> Iterator[tuple[ChangeSet, BodySpool]]:
        """A first full replication of ``user`` for a store that holds nothing of it:
        (change set, its bodies) for each part as it arrives (one, from a server
        older than version 3).  Apply each before asking for the next; read to the
        end even when one fails, or the connection is out of step."""
        if self.version < P.PACKED_VERSION:
            yield self.pull(user, {})
            return
        self._send(P.Pull(user, {}, True))
        self._expect_changeset()
        more = True
        while more:
            cs, spool, more = self._receive_changeset()
            yield cs, spool

    def _expect_changeset(self) -> None:
        ev = self._next()
        if isinstance(ev, P.ChangeSetStart):
            self._events.appendleft(ev)
            return
        if isinstance(ev, P.No):
            raise RemoteError(ev.code, ev.text, subject=ev.user)
        if isinstance(ev, P.Bye):
            raise RemoteError(ev.code, ev.text)
        raise P.ProtocolError(f"expected a change set, got {type(ev).__name__.upper()}")

    def follow(self, users=None) -> None:
        """Ask to be told (CHANGED) whenever one of ``users`` (None: all visible) changes."""
        self._send(P.Follow(None if users is None else tuple(users)))
        self._reply(P.Ok)
        self.following = True

    def unfollow(self) -> None:
        self._send(P.Unfollow())
        self._reply(P.Ok)
        self.following = False

    def wait_changed(self, timeout: float) -> P.Changed | None:
        """The next CHANGED notification, waiting up to ``timeout`` seconds (None if none)."""
        if not self.notifications:
            if not self._events:
                self._fill(timeout)
            if self._events and isinstance(self._events[0], (P.ConnectionClosed, P.Bye)):
                ev = self._events.popleft()
                why = f": {ev.text} ({ev.code})" if isinstance(ev, P.Bye) else ""
                raise Disconnected(f"{self.address} closed the connection{why}")
        return self.notifications.popleft() if self.notifications else None

    def lock(self, user: str) -> bool:
        """Hold ``user`` locked on the server until unlock() or disconnect; False if held elsewhere."""
        self._send(P.Lock(user))
        return isinstance(self._reply(P.Ok, P.Locked), P.Ok)

    def unlock(self, user: str) -> None:
        self._send(P.Unlock(user))
        self._reply(P.Ok)

    def close(self) -> None:
        """Log out (politely if the connection still works) and close."""
        if self.sock is None:
            return
        try:
            if not self.conn.closed and not self.conn.sending_changeset:
                self.sock.settimeout(2)
                self._send(P.Logout())
        except (ModsyncError, OSError):
            pass
        self._close_socket()

    def _close_socket(self) -> None:
        sock, self.sock = getattr(self, "sock", None), None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RemoteSource:
    """Read access to a running modsync server, for backups.

    ``RemoteSource(host, port, *, account, password, tls=None)`` logs in
    (``host`` may also be ``"unix:/path"`` with ``port`` None; ``tls`` is an
    ``ssl.SSLContext``, see ``client_tls_context``) and offers:

    * ``users() -> list[str]``: the users the account may replicate;
    * ``state(user) -> dict``: the server's version vector for ``user``
      ({store id: modseq}; ``{}`` for a user it does not have);
    * ``changes(user, base_vv) -> (ChangeSet, bodies)``: the change set that
      takes a store at ``base_vv`` to the server's state (``{}`` for
      everything); ``bodies(address) -> bytes`` returns each listed body
      (None for one the server did not send).  The bodies stay readable
      until the next ``changes()`` call or ``close()``;
    * ``close()`` (also a context manager).

    Errors: ``engine.client.RemoteError`` (refused: e.g. code
    ``full-sync-needed`` when ``base_vv`` is below the server's tombstone
    horizon, then ask again with ``{}``; ``acl`` for a user the account may
    not read), ``Disconnected``, and ``engine.protocol.ProtocolError``.
    """

    def __init__(self, host: str, port: int | None, *, account: str, password: str,
                 tls: ssl.SSLContext | None = None, timeout: float = DEFAULT_TIMEOUT):
        if port is None:
            address = host
        else:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.client = Client(address, account=account, password=password, tls=tls,
                             timeout=timeout)
        self._spool: BodySpool | None = None

    @property
    def store_id(self) -> str | None:
        return self.client.peer_id

    def users(self) -> list[str]:
        return self.client.users()

    def state(self, user: str) -> dict:
        return dict(self.client.state(user).state)

    def changes(self, user: str, base_vv: dict) -> tuple[ChangeSet, Callable[[bytes], bytes]]:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        cs, spool = self.client.pull(user, base_vv)
        self._spool = spool
        return cs, spool.get

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
