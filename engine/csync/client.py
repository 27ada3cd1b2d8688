"""A blocking csync client: one TCP connection to a Cyrus 3.6 sync_server.

Connection start as sync_client does it (sync_connect in sync_support.c):
read the banner (capabilities up to ``* OK``), ``AUTHENTICATE PLAIN`` with
the initial response inline, ``COMPRESS DEFLATE`` when offered, then
``APPLY CAPABILITIES (SIEVE-MAILBOX)`` when offered.  Every request then
gets zero or more untagged ``*`` lines and one ``OK``/``NO``/``BAD``/``BYE``.
The framing is :class:`engine.csync.protocol.Connection` (role client:
literals go out as ``{n+}``, which every 3.6.x server accepts).
"""
from __future__ import annotations

import base64
import socket
from dataclasses import dataclass, field

from dlist import Line, List

from .protocol import Connection

READ_CHUNK = 256 * 1024
#: sync_client's default sync_timeout is 30 minutes; a single GET FULLMAILBOX
#: of a large mailbox or an APPLY MESSAGE batch can take a while on a loaded server.
DEFAULT_TIMEOUT = 600.0

# sync_parse_response(): NO texts mapped to codes by their prefix (with the space).
_CODES = ("IMAP_INVALID_USER", "IMAP_MAILBOX_NONEXISTENT", "IMAP_MAILBOX_LOCKED",
          "IMAP_MAILBOX_MOVED", "IMAP_MAILBOX_NOTSUPPORTED", "IMAP_SYNC_CHECKSUM",
          "IMAP_SYNC_CHANGED", "IMAP_SYNC_BADSIEVE", "IMAP_PROTOCOL_ERROR",
          "IMAP_PROTOCOL_BAD_PARAMETERS")


class CsyncError(Exception):
    """The server broke the protocol or refused the connection's set-up."""


@dataclass
class Response:
    """Untagged lines and the status of one request."""

    lines: list = field(default_factory=list)
    status: str = "OK"          # OK, NO, BAD, BYE
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def code(self) -> str:
        """The IMAP_... code of a NO (as Cyrus's client maps it), "" for OK."""
        if self.status == "OK":
            return ""
        if self.status == "NO":
            for c in _CODES:
                if self.text.startswith(c + " ") or self.text == c:
                    return c
            return "IMAP_REMOTE_DENIED"
        return "IMAP_PROTOCOL_ERROR"

    def named(self, key: str) -> list:
        return [x.value for x in self.lines if x.is_dlist and x.key == key]


class CsyncClient:
    """One authenticated csync session (see the module docstring)."""

    def __init__(self, host: str, port: int, *, authname: str, password: str,
                 compress: bool = True, sieve_mailbox: bool = True,
                 timeout: float = DEFAULT_TIMEOUT):
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = Connection("client")
        self.capabilities: set[str] = set()
        self.banner = ""
        self.sieve_mailbox = False
        self.bytes_sent = 0
        try:
            self._read_banner()
            self._authenticate(authname, password)
            if compress and "COMPRESS=DEFLATE" in self.capabilities:
                r = self._request(Line("COMPRESS", text="DEFLATE"))
                if r.ok:
                    self.conn.start_compression()
            if sieve_mailbox and "SIEVE-MAILBOX" in self.capabilities:
                r = self.request(Line("APPLY", "CAPABILITIES", List(["SIEVE-MAILBOX"])))
                enabled = [a for v in r.named("ENABLED") for a in v.atoms()]
                self.sieve_mailbox = r.ok and "SIEVE-MAILBOX" in enabled
        except BaseException:
            self.sock.close()
            raise

    # -- start -------------------------------------------------------------------------------
    def _next(self) -> Line:
        while True:
            line = self.conn.next_line()
            if line is not None:
                return line
            data = self.sock.recv(READ_CHUNK)
            if not data:
                self.conn.receive_eof()
                raise CsyncError(f"csync server {self.host}:{self.port} closed the connection")
            self.conn.receive_data(data)

    def _read_banner(self) -> None:
        while True:
            line = self._next()
            if line.verb != "*":
                raise CsyncError(f"unexpected banner line {line!r}")
            text = (line.text or b"").decode("utf-8", "replace")
            words = text.split()
            if words and words[0] == "OK":
                self.banner = text
                return
            if words:
                if words[0] == "SASL":
                    self.capabilities.update("SASL=" + w for w in words[1:])
                elif words[0] == "COMPRESS" and len(words) > 1:
                    self.capabilities.add("COMPRESS=" + words[1])
                else:
                    self.capabilities.add(words[0])

    def _authenticate(self, authname: str, password: str) -> None:
        token = base64.b64encode(b"\0" + authname.encode() + b"\0" + password.encode()).decode()
        r = self._request(Line("AUTHENTICATE", text=f"PLAIN {token}"))
        if not r.ok:
            raise CsyncError(f"csync server {self.host}:{self.port} refused {authname!r}: "
                             f"{r.status} {r.text}")

    # -- requests ---------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        self.sock.sendall(data)

    def _request(self, line: Line, bodies=None) -> Response:
        if bodies is None:
            self._send(self.conn.send(line))
        else:
            for chunk in self.conn.send_chunks(line, bodies):
                self._send(chunk)
        r = Response()
        while True:
            reply = self._next()
            if reply.verb == "*":
                r.lines.append(reply)
                continue
            r.status = reply.verb
            r.text = (reply.text or b"").decode("utf-8", "replace")
            return r

    def request(self, line: Line, bodies=None) -> Response:
        """Send one command and read its answer.  A BAD or BYE raises CsyncError."""
        r = self._request(line, bodies)
        if r.status in ("BAD", "BYE") or r.status not in ("OK", "NO"):
            raise CsyncError(f"{line.verb} {line.key or ''}: {r.status} {r.text}")
        return r

    def close(self) -> None:
        try:
            self._request(Line("EXIT"))
        except (OSError, CsyncError):
            pass
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
