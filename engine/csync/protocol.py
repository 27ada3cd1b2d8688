"""csync framing with no I/O: bytes in, lines out, lines in, bytes out.

:class:`Connection` is one end of a csync connection.  It owns the DLIST
parser for what the peer sends and the printer for what this end sends,
and, once both ends agreed to ``COMPRESS DEFLATE``, the raw deflate streams
(RFC 4978 style: windowBits -15, every flush a Z_SYNC_FLUSH), so the I/O
layer above it only moves bytes::

    conn = Connection("server", sink=session.sink)
    out = conn.send(session.banner())          # bytes to write
    conn.receive_data(data)                    # bytes read
    while (line := conn.next_line()) is not None: ...

The literal rule of Cyrus 3.6 (cyrus-replication §1.2) lives in the role:
a client prints ``{n+}`` literals, a server ``{n}``.
"""
from __future__ import annotations

import zlib

from dlist import Line, Parser, iter_line, print_line
from dlist.limits import DEFAULT_LIMITS, Limits

#: Inflate at most this much per call, so a tiny compressed "bomb" cannot
#: blow up memory before the parser's own limits apply.
MAX_INFLATE_CHUNK = 1 << 20


class Connection:
    """One end of a csync connection (role ``server`` or ``client``)."""

    def __init__(self, role: str, *, sink=None, limits: Limits = DEFAULT_LIMITS):
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        self.role = role
        # A client reads the server's banner first: "* SASL ..." lines are
        # capabilities, not DLIST.
        self.parser = Parser(sink=sink, limits=limits, banner=(role == "client"))
        self._inflate = None
        self._deflate = None

    # -- receiving ----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer (compressed ones once compression is on)."""
        if self._inflate is not None:
            while data:
                plain = self._inflate.decompress(data, MAX_INFLATE_CHUNK)
                self.parser.feed(plain)
                data = self._inflate.unconsumed_tail
        else:
            self.parser.feed(data)

    def receive_eof(self) -> None:
        self.parser.feed_eof()

    def next_line(self) -> Line | None:
        return self.parser.next_line()

    @property
    def inside_line(self) -> bool:
        """Whether the peer is in the middle of sending a line (see Parser.inside_line)."""
        return self.parser.inside_line

    # -- sending ----------------------------------------------------------------------------------
    def send(self, lines, bodies=None) -> bytes:
        """The bytes for ``lines`` (one Line or several), compressed when compression is on."""
        if isinstance(lines, Line):
            lines = [lines]
        data = b"".join(print_line(line, self.role, bodies) for line in lines)
        return self._pack(data)

    def send_chunks(self, line: Line, bodies=None):
        """Like send() for one line, in pieces (for long lines with many file bodies)."""
        for chunk in iter_line(line, self.role, bodies):
            yield self._pack(chunk, flush=False)
        if self._deflate is not None:
            yield self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def _pack(self, data: bytes, flush: bool = True) -> bytes:
        if self._deflate is None:
            return data
        out = self._deflate.compress(data)
        if flush:
            out += self._deflate.flush(zlib.Z_SYNC_FLUSH)
        return out

    # -- compression --------------------------------------------------------------------------------
    def start_compression(self) -> None:
        """Switch both directions to raw deflate (after ``OK DEFLATE active``).

        Bytes already received past that point were compressed: the caller
        must not have fed them yet.  The server sends the OK uncompressed and
        then calls this; the client calls it when it reads the OK.
        """
        self._inflate = zlib.decompressobj(-15)
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)

    @property
    def compressing(self) -> bool:
        return self._deflate is not None
