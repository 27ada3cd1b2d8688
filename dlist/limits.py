"""Named limits that keep a hostile or broken peer from exhausting memory or disk.

Exceeding any of them is a :class:`~dlist.errors.DlistProtocolError` at the
offset where the limit was crossed, never a crash.  Cyrus 3.6 itself enforces
almost none of these (``maxword``/``maxquoted``/``maxliteral`` default to
unlimited), so each default below is derived from what Cyrus actually sends.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Bytes one command or response line may occupy in memory: its text, its
#: ``{n}`` literals and file bodies collected by the default in-memory sink.
#: One ``APPLY MAILBOX`` carries every record of a mailbox, about 310 bytes
#: each: 6.2 MB for 20,000 records in transcript 11.  64 MiB allows a single
#: mailbox of about 200,000 messages; raise it for larger ones.  The parsed
#: value takes about five times the line's size in memory (33 MB for 6.2 MB).
MAX_LINE = 64 * 1024 * 1024

#: Bytes in one ``{n}`` literal (held in memory).  Cyrus sends literals for
#: annotation values and sieve scripts; timsieved caps scripts at 32 KB by
#: default and METADATA values are far smaller than this.  Cyrus's own parser
#: stops at 2**31-1 (getint32), which is never allowed here.
MAX_LITERAL = 16 * 1024 * 1024

#: Open lists and kvlists at once.  Cyrus 3.6 nests at most five levels
#: (MAILBOX kvlist > RECORD list > record kvlist > ANNOTATIONS list >
#: annotation kvlist); its recursive parser has no limit of its own.
MAX_DEPTH = 64

#: The deepest value the printer writes (it recurses, about three Python
#: frames a level, well inside Python's default limit of 1000).  max_depth
#: may not exceed it: the parser must not accept what cannot be printed.
MAX_PRINT_DEPTH = 200

#: Bytes in one ``%{partition guid size}`` file literal (a message).  Cyrus
#: reads the size with getuint32, so 4 GiB-1 is the protocol's ceiling, and its
#: ``maxmessagesize`` defaults to unlimited; 1 GiB is far above real mail and
#: keeps one header from claiming the whole disk.
MAX_FILE = 1024 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """The limits one :class:`~dlist.parser.Parser` enforces (all in bytes, except depth)."""

    max_line: int = MAX_LINE
    max_literal: int = MAX_LITERAL
    max_depth: int = MAX_DEPTH
    max_file: int = MAX_FILE

    def __post_init__(self) -> None:
        for name in ("max_line", "max_literal", "max_depth", "max_file"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.max_depth > MAX_PRINT_DEPTH:
            raise ValueError(f"max_depth cannot exceed {MAX_PRINT_DEPTH} (MAX_PRINT_DEPTH)")


DEFAULT_LIMITS = Limits()
