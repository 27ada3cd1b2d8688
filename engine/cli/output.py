"""What the CLI writes: one JSON object per command with ``--json``, aligned text otherwise.

Every command produces its result as a dict (the ``--json`` object) and,
for people, either a text rendering of it or nothing.  Handlers never
``print``; they call ``Output.emit`` so the two forms cannot drift apart.

Streams are looked up on each write (not bound at import), so tests that
swap ``sys.stdout`` see everything.
"""
from __future__ import annotations

import json
import sys
import time
import unicodedata
from typing import Callable, Iterable, Sequence

PROG = "modsync"


class Output:
    """Where a command's result goes, and in which form."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False, command: str = ""):
        self.json = json_mode
        self.quiet = quiet
        self.command = command

    # -- results ---------------------------------------------------------------
    def emit(self, data: dict, text: str | Callable[[], None] | None = None, *,
             ok: bool = True) -> None:
        """The command's result: ``data`` as JSON, or ``text`` (a string or a printer)."""
        if self.json:
            obj = {"command": self.command, "ok": ok}
            obj.update(data)
            self.write_json(obj)
        elif callable(text):
            text()
        elif text is not None:
            self.line(text)

    def note(self, data: dict, text: str) -> None:
        """A confirmation ("created mailbox X"): JSON, or text unless --quiet."""
        self.emit(data, None if self.quiet else text)

    def write_json(self, obj: dict) -> None:
        # Names as they are when stdout takes UTF-8; \u escapes when it cannot.
        utf8 = (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"
        sys.stdout.write(json.dumps(obj, ensure_ascii=not utf8) + "\n")
        sys.stdout.flush()

    def line(self, text: str = "") -> None:
        sys.stdout.write(text + "\n")

    def raw(self, data: bytes) -> None:
        """Bytes to stdout exactly as they are (message bodies, sieve scripts)."""
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def table(self, columns: Sequence[str], rows: Iterable[Sequence], *,
              indent: str = "") -> None:
        """Rows under headers; numbers and sizes right-aligned, text left-aligned."""
        for line in format_table(columns, rows):
            self.line(indent + line)


def error_line(message: str) -> None:
    """The one line every failure ends with, on stderr."""
    sys.stdout.flush()
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


# -- formatting -------------------------------------------------------------------

def format_table(columns: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    rows = [["-" if v is None else v for v in row] for row in rows]
    if not rows:
        return []
    right = [_numeric_column([r[i] for r in rows]) for i in range(len(columns))]
    cells = [[str(c) for c in columns]] + [[one_line(str(v)) for v in r] for r in rows]
    widths = [max(display_width(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for r in cells:
        parts = []
        for i, v in enumerate(r):
            pad = " " * (widths[i] - display_width(v))
            last = i == len(r) - 1
            parts.append(pad + v if right[i] else (v if last else v + pad))
        out.append("  ".join(parts).rstrip())
    return out


def _numeric_column(values) -> bool:
    """Counts and humanised sizes ("1.2 KiB") read best right-aligned; "-" is blank."""
    def numeric(v):
        return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
            isinstance(v, str) and v[:1].isdigit()
            and v.endswith((" B", " KiB", " MiB", " GiB", " TiB", " PiB")))
    return any(numeric(v) for v in values) and all(numeric(v) or v == "-" for v in values)


def one_line(s: str) -> str:
    """Control characters (a newline in an annotation value) escaped, so a row stays a row."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or c == " " else
                   c.encode("unicode_escape").decode("ascii") for c in s)


def display_width(s: str) -> int:
    """Terminal columns a string takes: wide East Asian characters count twice."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else
               0 if unicodedata.combining(c) else 1 for c in s)


def human_size(n: int | None) -> str | None:
    """1536 -> '1.5 KiB'.  Binary units, because quotas are counted in KiB."""
    if n is None:
        return None
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def human_time(epoch: int | None) -> str | None:
    """An epoch time as ISO 8601 in UTC, or None for 'never'."""
    if not epoch:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def text_or_none(value: bytes) -> str | None:
    """bytes as UTF-8 text for JSON, or None when they are not UTF-8 (see *_base64)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"
