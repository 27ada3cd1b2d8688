"""mbox files (mboxrd) into the store.

    report = import_mbox(store, "alice", "/var/mail/alice", "INBOX")

What is read as a message boundary and what is kept:

* A message starts at a From_ line, ``From <sender> <asctime date>`` (as
  Dovecot, mutt, Python's mailbox module and most MTAs write it), at the
  start of the file or of a line.  A line starting with ``From `` whose date
  does not parse is body text, so that an mboxo file with an unquoted
  "From here on..." does not split a message in two.
* The blank line a writer puts between messages is not part of either: a
  message that ends in an empty line loses that one line terminator.  (A
  writer that adds no blank line leaves no way to know; mboxrd requires it.)
* mboxrd quoting is undone: a line matching ``^>+From `` loses one ``>``.
* Everything else is kept byte for byte: headers (Status: and friends
  included), line endings (LF or CRLF, as in the file), NUL bytes, long lines.

The internal date comes from the From_ line (UTC unless the line carries a
numeric offset).  Flags come from the headers mbox-serving programs keep,
read without changing the body: ``Status:`` R is \\Seen; ``X-Status:`` A
\\Answered, F \\Flagged, T \\Draft, D \\Deleted; ``X-Keywords:`` keywords
separated by spaces or commas.  A keyword the store refuses (not an IMAP
atom) is left off, the message imported without it, and the keyword
reported once for the file.

Bytes before the first From_ line, and messages over ``MAX_MESSAGE_BYTES``,
are refused (named in the report by line number); the rest is imported.
Re-running an import adds nothing (the rule is in ``engine.mailfile``).
"""
from __future__ import annotations

import calendar
import mmap
import os
import re
import stat

from .errors import ImportError_
from .mailfile import MAX_MESSAGE_BYTES, ImportReport, ImportRun, display_path
from .progress import Progress
from .store import Store

__all__ = ["ImportReport", "import_mbox", "parse_from_line"]

_MONTHS = {m: i for i, m in enumerate(
    (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
     b"Dec"), 1)}
# The asctime() date at the end of a From_ line, with the variants writers use:
# no seconds, a zone name or numeric offset before or after the year.
_FROM_DATE = re.compile(
    rb"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun),? +)?"
    rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) +(\d{1,2}) +"
    rb"(\d{1,2}):(\d{2})(?::(\d{2}))? +"
    rb"(?:([A-Za-z]{1,5}|[+-]\d{4}) +)?(\d{4})(?: +([+-]\d{4}))?[ \t]*\r?$")
# A From_ line is short; anything longer starting with "From " is body text.
MAX_FROM_LINE = 1000
_QUOTED_FROM = re.compile(rb"(?m)^>(>*From )")
_X_STATUS_FLAGS = {ord("A"): "\\Answered", ord("F"): "\\Flagged", ord("T"): "\\Draft",
                   ord("D"): "\\Deleted"}


def parse_from_line(line: bytes) -> int | None:
    """The internal date (Unix time) of a From_ line, or None if line is not one."""
    if not line.startswith(b"From ") or len(line) > MAX_FROM_LINE:
        return None
    # The date ends the line and is at most ~40 bytes long: search only the tail.
    m = _FROM_DATE.search(line, max(5, len(line) - 48))
    if m is None:
        return None
    mon, day, hh, mm, ss = _MONTHS[m.group(1)], int(m.group(2)), int(m.group(3)), \
        int(m.group(4)), int(m.group(5) or 0)
    year = int(m.group(7))
    if not (1 <= day <= calendar.monthrange(year, mon)[1] and hh < 24 and mm < 60 and ss <= 60):
        return None
    t = calendar.timegm((year, mon, day, hh, mm, ss))
    offset = m.group(8) or (m.group(6) if m.group(6) and m.group(6)[:1] in b"+-" else None)
    if offset:
        sign = -1 if offset[:1] == b"-" else 1
        t -= sign * (int(offset[1:3]) * 3600 + int(offset[3:5]) * 60)
    return t


def _header(head: bytes, lowered: bytes, name: bytes) -> bytes | None:
    """The value of the first header called name (lower-case) in a header block."""
    # lowered is b"\n" + head.lower(): one C-speed pass instead of a
    # case-insensitive regex per header, which took 1.5 s per 20,000 messages.
    i = lowered.find(b"\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 1            # in head: just after the colon
    end = head.find(b"\n", start)
    return head[start:end if end >= 0 else len(head)].strip()


def flags_from_headers(body: bytes) -> list[str]:
    """Flags recorded in a message's Status:, X-Status: and X-Keywords: headers."""
    end = body.find(b"\n\n")
    end_crlf = body.find(b"\n\r\n", 0, len(body) if end < 0 else end)
    if end_crlf >= 0:
        end = end_crlf
    head = body if end < 0 else body[:end]
    lowered = b"\n" + head.lower()
    flags = []
    status = _header(head, lowered, b"status")
    if status and b"R" in status:
        flags.append("\\Seen")
    x_status = _header(head, lowered, b"x-status")
    if x_status:
        flags.extend(_X_STATUS_FLAGS[c] for c in set(x_status) if c in _X_STATUS_FLAGS)
    keywords = _header(head, lowered, b"x-keywords")
    if keywords:
        flags.extend(k.decode("utf-8", "backslashreplace")
                     for k in re.split(rb"[\s,]+", keywords) if k)
    return flags


def _next_from(mm, pos: int) -> int:
    i = mm.find(b"\nFrom ", pos)
    return -1 if i < 0 else i + 1


def _boundaries(mm) -> list[tuple[int, int, int]]:
    """(From_ line start, message start, internal date) of each message in mm."""
    out = []
    start = 0 if mm[:5] == b"From " else _next_from(mm, 0)
    while start >= 0:
        eol = mm.find(b"\n", start)
        body = len(mm) if eol < 0 else eol + 1
        date = parse_from_line(mm[start:min(body, start + MAX_FROM_LINE + 2)].rstrip(b"\n"))
        if date is not None:
            out.append((start, body, date))
        start = -1 if eol < 0 else _next_from(mm, eol)
    return out


def _message(mm, start: int, end: int) -> bytes:
    """The message in mm[start:end], the bytes between its From_ line and the next one."""
    # The writer's blank line is the last line of the chunk when that line is
    # empty; it is left out before slicing, so the body is copied only once.
    tail = mm[max(start, end - 3):end]
    if tail[-2:] == b"\n\n" or (end - start == 1 and tail == b"\n"):
        end -= 1
    elif tail == b"\n\r\n" or (end - start == 2 and tail == b"\r\n"):
        end -= 2
    body = mm[start:end]
    if b">From " in body:
        body = _QUOTED_FROM.sub(rb"\1", body)
    return body


def _where(mm, index: int, start: int) -> str:
    """A message's place in the file, for a report (counting lines is slow: only then)."""
    line = mm[:start].count(b"\n") + 1
    return f"message {index + 1} (From_ line at line {line})"


def _import_messages(mm, path: str, mailbox: str, run: ImportRun) -> None:
    bounds = _boundaries(mm)
    first = bounds[0][0] if bounds else len(mm)
    if mm[:first].strip():
        if not bounds:
            run.report.refuse(path, "the file has no From_ line: it is not an mbox")
            return
        run.report.refuse(path, f"{first} bytes before the first From_ line are not a message")
    into = run.into(mailbox, path)
    run.progress.start(f"import {display_path(path)}", total_items=len(bounds),
                       total_bytes=len(mm))
    try:
        for i, (start, body_start, date) in enumerate(bounds):
            end = bounds[i + 1][0] if i + 1 < len(bounds) else len(mm)
            if end - body_start > MAX_MESSAGE_BYTES + 2:   # + the blank separator line
                run.report.refuse(path, f"{_where(mm, i, start)}: {end - body_start} bytes; "
                                        f"messages over {MAX_MESSAGE_BYTES} bytes are not imported")
                run.progress.advance(1, end - body_start)
                continue
            body = _message(mm, body_start, end)
            into.offer(body, flags_from_headers(body), date)
        into.finish()
    except BaseException:
        run.close(failing=True)
        raise
    run.close()


def import_mbox(store: Store, user: str, path: str | os.PathLike, mailbox: str, *,
                progress: Progress | None = None) -> ImportReport:
    """Import the messages of an mbox file into one mailbox (created if missing).

    Refused parts of the file are listed in the report and the import goes
    on; ImportError_ only when the file cannot be opened at all or is not a
    regular file (a pipe or a device).
    """
    path = os.fspath(path)
    shown = display_path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK), "rb")
    except OSError as err:
        raise ImportError_(f"{shown}: cannot open: {err.strerror}", subject=path)
    with fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            # A pipe (`--mbox <(zcat old.mbox.gz)`) would look empty: say so, import nothing.
            raise ImportError_(f"{shown}: not a regular file; an mbox is read in place, so "
                               f"decompress or copy it to a file first", subject=path)
        run = ImportRun(store, user, path, progress)
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
        except (OSError, ValueError) as err:
            raise ImportError_(f"{shown}: cannot read: {err}", subject=path)
        try:
            _import_messages(mm, path, mailbox, run)
        finally:
            if isinstance(mm, mmap.mmap):
                mm.close()
    return run.report
