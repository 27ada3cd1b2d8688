"""The streaming DLIST parser: bytes in, :class:`~dlist.model.Line` objects out, no I/O.

Feed it bytes as they arrive with :meth:`Parser.feed`, take complete lines
with :meth:`Parser.next_line`, and call :meth:`Parser.feed_eof` when the
peer closes.  It reads both directions of a Cyrus 3.6 sync session:

* ``APPLY``, ``GET`` and ``RESTORE`` (any case) and untagged ``*`` lines
  carry a DLIST ``key value`` pair;
* every other line (``OK success``, ``NO IMAP_... text``, ``RESTART``,
  ``AUTHENTICATE PLAIN <b64>``, ``COMPRESS DEFLATE``, ``C01 CAPABILITY``) is
  a verb and its text.  So are the ``*`` lines of a sync_server's banner when
  the parser is created with ``banner=True``: they are capabilities, not
  DLIST, up to and including the ``* OK`` line that ends the banner.

Framing follows Cyrus's ``dlist_parse()``: separators inside lists are any
run of white space, CR and LF included; ``{n}`` and ``{n+}`` literals are
both accepted in both directions and must be followed by CRLF; a file literal
``%{partition guid size}`` may end in LF with or without CR and its body is
handed to a sink while it streams in (see dlist.sinks).  After the value,
only ``[CR] LF`` may follow.

Cost: while a line arrives in pieces, ``feed`` looks for an LF in the new
bytes, and once SCAN_AHEAD bytes of the line wait, tokenizes them up to the
last token boundary (white space outside quoted strings, before any brace):
each byte is tokenized once, mostly while the rest of the line is still on
its way, so little is left to do when its LF arrives.  Literal and file
bodies are consumed by length without being scanned.

What is not kept, so re-printing differs from the input only here: runs of
white space between items (printed as one space), bare-LF line ends
(printed as CRLF), and the ``+`` of a literal header (the printer's role
decides it).  Everything Cyrus itself prints comes back byte-identical.

Stricter than Cyrus on purpose: a key alone at the end of a line is an error
(Cyrus would read the value from the next line); a quoted string may not
contain a backslash-escaped CR or LF; ``%(`` where a key belongs is an error;
a file literal's partition may not contain a brace.
"""
from __future__ import annotations

import hashlib
import re
from collections import deque

from .errors import DlistProtocolError
from .limits import DEFAULT_LIMITS, Limits
from .model import FILE, LIST, LITERAL, File, Line, decode_text, node_map, wrap
from .scan import ROOT, append_node, scan_region
from .sinks import MemorySink, SinkFactory

_DLIST_VERBS = frozenset((b"APPLY", b"GET", b"RESTORE"))
_WS = frozenset(b" \t\n\r\x0b\x0c")
_BOUNDARY = frozenset(b' \t\n\r\x0b\x0c()"')

_LITERAL_HEADER = re.compile(rb"\{(\d+)(\+?)\}\r\n")
# A file literal header's partition and GUID (astrings for Cyrus).  Neither
# may hold a brace, so the last "{" of a physical line is its header's own.
_HEADER_WORD = rb'(?:[^\s(){}"%\\][^\s(){}"]*|"(?:[^"\\\r\n{}]|\\[^\r\n{}])*")'
_FILE_HEADER = re.compile(rb"%\{(" + _HEADER_WORD + rb") (" + _HEADER_WORD + rb") (\d+)\}(\r?)\n")
_GUID_TOKEN = re.compile(rb"[0-9a-fA-F]{40}")

# getint32()/getuint32(): Cyrus gives up beyond these.
_MAX_LITERAL_HEADER = 2 ** 31 - 1
_MAX_FILE_HEADER = 2 ** 32 - 1

# Modes
_HEAD, _BODY, _LITERAL, _FILE, _BROKEN = range(5)

#: Tokenize a line that is still arriving once this many of its bytes wait.
#: A 3.6 sync_client prints a 20,000-record APPLY MAILBOX (6 MB) in pieces of
#: a few KB over a good fraction of a second; scanning it as it comes takes
#: the scan off the time between the line's last byte and the answer.
SCAN_AHEAD = 4096


def _token_boundary(buf: bytearray, start: int, limit: int) -> int:
    """Just past the last space in buf[start:limit] outside quoted strings (or start).

    Everything before that point is whole tokens, so it can be scanned as a
    region of its own.  Outside a quoted string every ``"`` opens one (no
    atom or flag may hold a quote); inside, a quote preceded by an odd run of
    backslashes is escaped.
    """
    after = start       # where the text after the last closed quoted string begins
    if buf.find(b'\\"', start, limit) < 0:
        # No escaped quote: the quotes pair up in order, so counting them says
        # whether the last one opens a string (Cyrus's records are full of "").
        last = buf.rfind(b'"', start, limit)
        if last >= 0 and buf.count(b'"', start, limit) % 2:
            limit = last        # it opens a string that goes on: stay before it
            last = buf.rfind(b'"', start, limit)
        if last >= 0:
            after = last + 1
        i = buf.rfind(b" ", after, limit)
        return i + 1 if i >= 0 else start
    q = buf.find(b'"', start, limit)
    while q >= 0:
        close = buf.find(b'"', q + 1, limit)
        while close >= 0:
            k = close - 1
            while buf[k] == 92:     # backslash
                k -= 1
            if (close - 1 - k) % 2 == 0:
                break
            close = buf.find(b'"', close + 1, limit)
        if close < 0:
            limit = q       # an unterminated string: stay before it
            break
        after = close + 1
        q = buf.find(b'"', after, limit)
    i = buf.rfind(b" ", after, limit)
    return i + 1 if i >= 0 else start


class Parser:
    """A streaming parser for one direction of a Cyrus sync (csync) connection.

    ``limits`` bounds memory (see dlist.limits).  ``sink`` is a factory for
    file literal bodies (see dlist.sinks); by default bodies are collected in
    memory and count against ``limits.max_line``.  ``banner=True`` reads the
    sync_server banner first (use it on the client side of a connection).

    A file body whose SHA-1 differs from the GUID in its header does not stop
    the parser: the framing is still sound, and Cyrus too only checks at
    append time.  The sink is closed with ``verified=False`` and the line
    lists the file in ``Line.corrupt_files``; such a body must not be stored.

    Any malformed input raises :class:`~dlist.errors.DlistProtocolError`;
    after that the parser is unusable (every call raises the same error).
    """

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS, sink: SinkFactory | None = None,
                 banner: bool = False):
        self._limits = limits
        self._sink_factory = sink
        self._banner = banner
        self._buf = bytearray()
        self._base = 0      # absolute stream offset of _buf[0]
        self._pos = 0       # next unconsumed byte in _buf
        self._scan = 0      # where the search for the next LF resumes
        self._mode = _HEAD
        self._ready: deque[Line] = deque()
        self._error: DlistProtocolError | None = None
        self._eof = False
        # The line being read.
        self._verb = ""
        self._stack: list = []
        self._line_start = 0    # absolute offset
        self._line_size = 0     # bytes of this line held in memory so far
        self._corrupt: list[File] = []
        # The literal or file body being read.
        self._need = 0
        self._item_start = 0    # absolute offset of its header
        self._file_header: tuple = ()
        self._sink = None
        self._sha1 = None

    # -- public -------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Take bytes from the stream; complete lines become available from next_line()."""
        if self._error is not None:
            raise self._error
        if self._eof:
            raise ValueError("feed() after feed_eof()")
        self._buf += data
        try:
            self._run()
        except DlistProtocolError as e:
            self._fail(e)
            raise
        except BaseException:
            # A sink failed: the body it was writing is lost, and so is the framing.
            self._fail(DlistProtocolError("the parser was interrupted by an exception"))
            raise

    def feed_eof(self) -> None:
        """The peer closed the stream.  Raises DlistProtocolError if it stopped inside a line."""
        if self._error is not None:
            raise self._error
        self._eof = True
        if self._mode == _HEAD and self._pos == len(self._buf):
            return
        at = self._base + len(self._buf)
        missing = self._need - (len(self._buf) - self._pos)
        expected = {_HEAD: "end of line", _BODY: "end of line",
                    _LITERAL: f"{missing} more literal bytes",
                    _FILE: f"{self._need} more file literal bytes"}[self._mode]
        error = DlistProtocolError("stream ended inside a line", offset=at, expected=expected)
        self._fail(error)
        raise error

    def next_line(self) -> Line | None:
        """The next complete line, or None until more bytes are fed."""
        return self._ready.popleft() if self._ready else None

    @property
    def inside_line(self) -> bool:
        """Whether bytes of a line that has not ended yet were fed (more must follow)."""
        return self._mode != _HEAD or self._pos < len(self._buf)

    # -- machinery ----------------------------------------------------------

    def _fail(self, error: DlistProtocolError) -> None:
        self._error = error
        self._mode = _BROKEN
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.close(False)  # let it discard the partial body

    def _run(self) -> None:
        while True:
            mode = self._mode
            if mode == _HEAD:
                progressed = self._read_head()
            elif mode == _BODY:
                progressed = self._read_body()
            elif mode == _LITERAL:
                progressed = self._read_literal()
            else:
                progressed = self._read_file()
            if not progressed:
                break
        if self._pos:
            # bytearray deletes from the front in O(1) amortised.
            del self._buf[:self._pos]
            self._base += self._pos
            self._scan -= self._pos
            self._pos = 0

    def _too_long(self, held: int) -> None:
        """Raise if this line would hold more than max_line bytes after ``held`` more."""
        limit = self._limits.max_line
        if self._line_size + held > limit:
            raise DlistProtocolError(
                f"line longer than {limit} bytes",
                offset=self._line_start + limit, expected="a shorter line (limits.max_line)")

    def _find_lf(self) -> int:
        lf = self._buf.find(b"\n", self._scan)
        if lf < 0:
            self._scan = len(self._buf)
            self._too_long(len(self._buf) - self._pos)
        return lf

    def _read_head(self) -> bool:
        buf = self._buf
        pos = self._pos
        self._line_start = self._base + pos
        self._line_size = 0
        lf = self._find_lf()
        if lf < 0:
            return len(buf) - pos >= SCAN_AHEAD and self._early_body(pos)
        self._too_long(lf + 1 - pos)
        end = lf - 1 if lf > pos and buf[lf - 1] == 13 else lf
        sp = buf.find(b" ", pos, end)
        verb = bytes(buf[pos:sp if sp >= 0 else end])
        text = bytes(buf[sp + 1:end]) if sp >= 0 else None
        if self._banner:
            # The banner is "* CAPABILITY ..." lines up to and including "* OK ...".
            if verb != b"*":
                self._banner = False
            else:
                if text is None or text == b"OK" or text.startswith(b"OK "):
                    self._banner = False
                self._ready.append(Line._make("*", None, None, text))
                self._pos = self._scan = lf + 1
                return True
        if sp >= 0 and (verb == b"*" or verb.upper() in _DLIST_VERBS):
            if buf[sp + 1] in _WS:
                raise DlistProtocolError("missing key", offset=self._base + sp + 1,
                                         expected="a key after one space")
            self._start_value(verb, pos, sp)
            self._scan = lf
            return True
        self._ready.append(Line._make(decode_text(verb), None, None, text))
        self._pos = self._scan = lf + 1
        return True

    def _early_body(self, pos: int) -> bool:
        """Start reading a long DLIST line's value before its LF is there (see SCAN_AHEAD)."""
        buf = self._buf
        if self._banner:
            return False
        sp = buf.find(b" ", pos, pos + 16)
        if sp < 0 or sp + 1 >= len(buf) or buf[sp + 1] in _WS:
            return False        # not a verb and a key (the LF will tell what it is)
        verb = bytes(buf[pos:sp])
        if verb != b"*" and verb.upper() not in _DLIST_VERBS:
            return False
        self._start_value(verb, pos, sp)
        return True

    def _start_value(self, verb: bytes, pos: int, sp: int) -> None:
        """A DLIST line's verb ends at ``sp``: read its key and value from there on."""
        self._verb = decode_text(verb)
        self._stack = [[ROOT]]
        self._corrupt = []
        self._line_size = sp + 1 - pos
        self._pos = sp + 1
        self._mode = _BODY

    def _read_body(self) -> bool:
        buf = self._buf
        pos = self._pos
        lf = self._find_lf()
        if lf < 0:
            if len(buf) - pos >= SCAN_AHEAD:
                self._scan_ahead(pos)
            return False
        stop = lf + 1
        self._too_long(stop - pos)
        self._line_size += stop - pos
        header = self._header_before(pos, lf)
        region_end = header.start() if header is not None else stop
        # Between two file literals of an APPLY MESSAGE the region is one
        # space: nothing to scan (white space adds no value anywhere).
        if region_end > pos and not (region_end - pos == 1 and buf[pos] == 32):
            scan_region(self._stack, bytes(memoryview(buf)[pos:region_end]), self._base + pos,
                        self._limits.max_depth)
        self._pos = self._scan = stop
        if header is not None:
            self._item_start = self._base + region_end
            if header.re is _LITERAL_HEADER:
                self._start_literal(header)
            else:
                self._start_file(header)
            return True
        if len(self._stack) == 1:
            self._finish_line(pos, lf)
        return True

    def _scan_ahead(self, pos: int) -> None:
        """Tokenize the complete tokens of a line whose LF has not arrived yet."""
        buf = self._buf
        end = len(buf)
        # A literal or file literal header can only end the physical line, so
        # it starts after the last brace at the earliest: stay before that.
        brace = buf.rfind(b"{", pos, end)
        cut = _token_boundary(buf, pos, brace if brace >= 0 else end)
        if cut <= pos:
            return
        self._line_size += cut - pos
        scan_region(self._stack, bytes(memoryview(buf)[pos:cut]), self._base + pos,
                    self._limits.max_depth)
        self._pos = cut

    def _header_before(self, pos: int, lf: int):
        """The literal or file literal header that ends this physical line, if any."""
        buf = self._buf
        i = buf.rfind(b"{", pos, lf)
        if i < 0:
            return None
        m = _LITERAL_HEADER.fullmatch(buf, i, lf + 1)
        if m is None and i > pos and buf[i - 1] == 37:  # '%'
            i -= 1
            m = _FILE_HEADER.fullmatch(buf, i, lf + 1)
        # A header only counts at the start of a token: after white space, a
        # paren, a closing quote, or where the region starts (after a literal).
        if m is None or i > pos and buf[i - 1] not in _BOUNDARY:
            return None
        return m

    def _start_literal(self, header) -> None:
        size = int(header.group(1))
        limit = self._limits.max_literal
        if size > limit or size > _MAX_LITERAL_HEADER:
            raise DlistProtocolError(f"literal of {size} bytes is too big", offset=self._item_start,
                                     expected=f"at most {limit} bytes (limits.max_literal)")
        self._too_long(size)
        self._line_size += size
        self._need = size
        self._mode = _LITERAL

    def _read_literal(self) -> bool:
        pos = self._pos
        if len(self._buf) - pos < self._need:
            return False
        end = pos + self._need
        append_node(self._stack, (LITERAL, bytes(self._buf[pos:end])), self._item_start)
        self._pos = self._scan = end
        self._mode = _BODY
        return True

    def _start_file(self, header) -> None:
        at = self._item_start
        partition, guid, size, cr = header.groups()
        if _GUID_TOKEN.fullmatch(guid) is None:
            raise DlistProtocolError("bad GUID in file literal", offset=at + 3 + len(partition),
                                     expected="40 hex digits")
        size = int(size)
        limit = self._limits.max_file
        if size > limit or size > _MAX_FILE_HEADER:
            raise DlistProtocolError(f"file literal of {size} bytes is too big", offset=at,
                                     expected=f"at most {limit} bytes (limits.max_file)")
        cur = self._stack[-1]
        if cur[0] != LIST and len(cur) & 1:
            raise DlistProtocolError("a file literal cannot be a key", offset=at,
                                     expected="a key (atom or string)")
        if cur[0] == ROOT and len(cur) > 2:
            raise DlistProtocolError("unexpected data after the line's value", offset=at,
                                     expected="end of line")
        part_text = decode_text(node_map(partition))
        guid_text = guid.decode("ascii").lower()
        if self._sink_factory is None:
            self._too_long(size)  # held in memory
            self._line_size += size
            self._sink = MemorySink()
        else:
            self._sink = self._sink_factory(part_text, guid_text, size)
        self._file_header = (partition, guid, size, not cr)
        self._sha1 = hashlib.sha1()
        self._need = size
        self._mode = _FILE

    def _read_file(self) -> bool:
        pos = self._pos
        n = min(len(self._buf) - pos, self._need)
        if n:
            chunk = bytes(self._buf[pos:pos + n])
            self._sha1.update(chunk)
            self._sink.write(chunk)
            self._need -= n
            self._pos = self._scan = pos + n
        if self._need:
            return False
        partition, guid, size, bare_lf = self._file_header
        verified = self._sha1.hexdigest() == guid.decode("ascii").lower()
        sink, self._sink = self._sink, None
        body = sink.close(verified)
        if body is not None and (type(body) is not bytes or len(body) != size):
            raise TypeError(f"sink.close() must return None or the {size} body bytes")
        node = (FILE, partition, guid, size, body, bare_lf)
        append_node(self._stack, node, self._item_start)
        if not verified:
            self._corrupt.append(wrap(node))
        self._mode = _BODY
        return True

    def _finish_line(self, pos: int, lf: int) -> None:
        buf = self._buf
        root = self._stack[0]
        eol = lf - 1 if lf > pos and buf[lf - 1] == 13 else lf
        if len(root) < 3:
            raise DlistProtocolError("line ended before its value", offset=self._base + eol,
                                     expected="a key and a value")
        # Cyrus's sync_parseline() wants [CR] LF right after the value.
        if eol > pos and buf[eol - 1] in _WS:
            raise DlistProtocolError("white space before the end of the line",
                                     offset=self._base + eol - 1, expected="CRLF after the value")
        self._ready.append(Line._make(self._verb, root[1], root[2], None, tuple(self._corrupt)))
        self._stack = []
        self._corrupt = []
        self._mode = _HEAD
