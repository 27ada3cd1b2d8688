"""Turning DLIST text into nodes: the parser's inner loop.

The parser (dlist.parser) cuts a line into *regions*: runs of text with no
literal inside, each ending at a physical line end or at a literal header.
:func:`scan_region` adds a region's values to the line's stack of open
containers.  A stack entry is a Python list ``[tag, item, item, ...]``; the
bottom entry is the line itself (tag ROOT, holding the key and the value).
Closed containers become tuple nodes (see dlist.model).

Two paths produce the same nodes:

* the fast path handles text the way Cyrus prints it (single spaces, quoted
  strings standing alone, ``%(`` only as an opener) with ``bytes.split`` and
  one Python step per parenthesis rather than per token.  It gives up
  (raises _Bail) on anything else, including every error;
* the exact path walks token by token with a regex, follows Cyrus's
  ``dlist_parse()`` / ``getxstring()`` grammar, and raises
  DlistProtocolError with the absolute offset of the offending byte.

The fast path runs first; if it gives up, the stack is restored and the exact
path redoes the region.  Tests check both paths agree.
"""
from __future__ import annotations

import gc
import re

from .errors import DlistProtocolError
from .model import FILE, KVLIST, LIST, LITERAL

#: Tag of the bottom stack entry: the line's ``key value`` pair.
ROOT = 0

_WS = frozenset(b" \t\n\r\x0b\x0c")  # C isspace(), which Cyrus's next_nonspace() uses
_BOUNDARY = frozenset(b" \t\n\r\x0b\x0c()")
_UNSAFE_IN_QUOTES = (b" ", b"\t", b"\x0b", b"\x0c", b"(", b")")

# Regions at least this big are scanned with the cyclic garbage collector
# paused: it would otherwise traverse the growing tree again and again (40% of
# the parse time of a 6 MB line); the tree holds no reference cycles.
_GC_PAUSE_BYTES = 64 * 1024

_TOKEN = re.compile(rb"""
    \s*
    (?:
      (\()                              # 1: open a list
    | (\))                              # 2: close
    | (%\()                             # 3: open a kvlist
    | ("(?:[^"\\\r\n]|\\[^\r\n])*")     # 4: quoted string, escapes kept
    | (\\[^\s()"]*)                     # 5: flag
    | ([^\s()"{%\\][^\s()"]*)           # 6: atom (also NIL)
    | (%[^\s()"]*)                      # 7: %-word: a key for Cyrus's getastring(), else an error
    | (\S)                              # 8: a byte nothing can start with
    )""", re.VERBOSE | re.DOTALL)

# Every empty list (most FLAGS of a mailbox) is this one tuple: nodes are
# immutable, and each saved allocation is also one object less for the GC.
_EMPTY = {LIST: (LIST,), KVLIST: (KVLIST,)}


class _Bail(Exception):
    """The fast path met something it does not handle; the exact path takes over."""


def scan_region(stack: list, text: bytes, base: int, max_depth: int) -> None:
    """Add the values in ``text`` (absolute offset ``base``) to the open containers in ``stack``.

    Raises DlistProtocolError for malformed text.  The caller guarantees that
    ``text`` holds no literal (those are cut out by the parser) and that
    every LF in it is whitespace inside a container or the line's end.
    """
    pause = len(text) >= _GC_PAUSE_BYTES and gc.isenabled()
    if pause:
        gc.disable()
    try:
        saved = [(c, len(c)) for c in stack]
        try:
            _fast_region(stack, text, max_depth)
        except _Bail:
            # Undo what the fast path did, then redo the region exactly.
            stack[:] = [c for c, _ in saved]
            for c, n in saved:
                del c[n:]
            _exact_region(stack, text, base, max_depth)
    finally:
        if pause:
            gc.enable()


def _fast_region(stack: list, text: bytes, max_depth: int) -> None:
    if b"{" in text:
        raise _Bail
    if b'"' not in text:
        _fast_build(stack, text, max_depth)
        return
    # bytes.split() keeps a quoted string whole if it stands alone (white space
    # or a paren on each side: a region's edge is always a token boundary) and
    # holds no white space or paren.  The empty strings Cyrus sends in every
    # annotation (USERID "") are such; blank them out (same length, so offsets
    # hold) and look at the few quoted strings left one by one.
    masked = text.replace(b' "" ', b" .. ").replace(b' "")', b" ..)")
    start = 0   # where the text not yet scanned begins
    end = len(text)
    find = masked.find
    opening = find(b'"')
    while opening >= 0:
        closing = find(b'"', opening + 1)
        if closing < 0:
            raise _Bail  # unterminated: the exact path reports it
        content = text[opening + 1:closing]
        if (b'"' in content or b"\\" in content or b"\r" in content or b"\n" in content
                or opening and text[opening - 1] not in _BOUNDARY
                or closing + 1 < end and text[closing + 1] not in _BOUNDARY):
            raise _Bail  # escapes, a masked "" inside, or a string glued to a neighbour
        if any(c in content for c in _UNSAFE_IN_QUOTES):
            # An ACL or "shared note": split() would cut it, so add it whole.
            _fast_build(stack, text[start:opening], max_depth)
            _fast_token(stack, text[opening:closing + 1])
            start = closing + 1
        opening = find(b'"', closing + 1)
    _fast_build(stack, text[start:] if start else text, max_depth)


def _fast_token(stack: list, token: bytes) -> None:
    cur = stack[-1]
    if cur[0] == ROOT and len(cur) > 2:
        raise _Bail
    cur.append(token)


def _fast_build(stack: list, text: bytes, max_depth: int) -> None:
    """Canonical text: tokens split by white space, containers found with split(b"(").

    Each part of the text after a "(" starts a new container.  If the part
    holds a ")", everything before it is the whole of that container (a
    leaf: built as a tuple in one go); each further ")" closes an ancestor.
    """
    cur = stack.pop()  # inside the loop, ``stack`` holds only the parents of ``cur``
    push = stack.append
    pop = stack.pop
    opener = None  # tag of the container that the "(" before this part opens
    kv_opens = 0
    try:
        for part in text.split(b"("):
            if opener is not None:
                if len(stack) >= max_depth or cur[0] != LIST and len(cur) & 1:
                    raise _Bail  # too deep, or a container where a key belongs
                if b")" in part:
                    segments = part.split(b")")
                    last = segments.pop()
                    leaf = segments[0]
                    leaf = (opener, *leaf.split()) if leaf else _EMPTY[opener]
                    if opener == KVLIST and not len(leaf) & 1:
                        raise _Bail  # a key without a value
                    cur.append(leaf)
                    del segments[0]
                else:
                    push(cur)
                    cur = [opener]
                    segments = ()
                    last = part
            elif b")" in part:
                segments = part.split(b")")
                last = segments.pop()
            else:
                segments = ()
                last = part
            for seg in segments:  # each closes the innermost open container
                if seg:
                    cur += seg.split()
                if cur[0] == KVLIST and not len(cur) & 1:
                    raise _Bail
                done = tuple(cur)
                cur = pop()  # IndexError: ")" at the top level
                cur.append(done)
            if not last:
                opener = LIST
            elif last[-1] != 37:
                cur += last.split()
                opener = LIST
            else:
                # "%" right before the next "(" opens a kvlist if it starts a
                # token ("x%(" is an atom and a list: the exact path's job).
                if len(last) > 1:
                    if last[-2] not in _WS:
                        raise _Bail
                    if len(last) > 2:
                        cur += last[:-1].split()
                opener = KVLIST
                kv_opens += 1
    except IndexError:
        raise _Bail from None
    finally:
        push(cur)
    if opener == KVLIST:
        kv_opens -= 1  # the text ended in "%" with no "(" after it
    root = stack[0]
    if kv_opens != text.count(b"%") or root[0] == ROOT and len(root) > 3:
        raise _Bail  # a stray "%", or more than one value on the line


def _error(message: str, offset: int, expected: str) -> DlistProtocolError:
    return DlistProtocolError(message, offset=offset, expected=expected)


def _exact_region(stack: list, text: bytes, base: int, max_depth: int) -> None:
    cur = stack[-1]
    match = _TOKEN.match
    pos = 0
    end = len(text)
    while pos < end:
        m = match(text, pos)
        if m is None:
            return  # only white space left
        pos = m.end()
        g = m.lastindex
        at = base + m.start(g)
        tag = cur[0]
        key_position = tag != LIST and len(cur) & 1
        if g == 6 or g == 4 or g == 5:
            if tag == ROOT and len(cur) > 2:
                raise _error("unexpected data after the line's value", at, "end of line")
            cur.append(m.group(g))
        elif g == 1 or g == 3:
            if key_position:
                raise _error("a list cannot be a key", at, "a key (atom or string)")
            if len(stack) > max_depth:
                raise _error(f"lists nested deeper than {max_depth}", at,
                             f"at most {max_depth} nested lists (limits.max_depth)")
            cur = [LIST if g == 1 else KVLIST]
            stack.append(cur)
        elif g == 2:
            if tag == ROOT:
                raise _error("unbalanced ')'", at, "a value or end of line")
            if tag == KVLIST and not len(cur) & 1:
                raise _error("a key without a value", at, "a value")
            done = tuple(cur)
            stack.pop()
            cur = stack[-1]
            cur.append(done)
        elif g == 7:
            word = m.group(7)
            if key_position and word[1:2] != b"{":
                if tag == ROOT and len(cur) > 2:
                    raise _error("unexpected data after the line's value", at, "end of line")
                cur.append(word)  # getastring() reads a key such as "%x" as an atom
            elif word[1:2] == b"{":
                raise _error("a file literal header must end its line", at, "CRLF after '}'")
            else:
                raise _error("'%' must be followed by '('", at, "%( or %{")
        else:
            c = m.group(8)
            if c == b'"':
                raise _error("unterminated quoted string", at, 'a closing "')
            if c == b"{":
                raise _error("malformed literal header", at, "{n} or {n+} then CRLF")
            raise _error(f"unexpected {c!r}", at, "a value")


def append_node(stack: list, node: tuple, offset: int) -> None:
    """Add a literal or file node (read by the parser) to the innermost open container."""
    cur = stack[-1]
    tag = cur[0]
    if tag == ROOT and len(cur) > 2:
        raise _error("unexpected data after the line's value", offset, "end of line")
    if tag != LIST and len(cur) & 1:
        if node[0] == FILE:
            raise _error("a file literal cannot be a key", offset, "a key (atom or string)")
        if node[0] == LITERAL and b"\0" in node[1]:
            raise _error("a key cannot contain a NUL byte", offset, "a key without NUL")
    cur.append(node)
