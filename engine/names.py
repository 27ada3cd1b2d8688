"""Mailbox and user names: what the store accepts, and how it normalises them.

modsync names are Unicode with ``/`` as hierarchy separator.  Any name a
real server can hold is accepted (dots, ``^``, spaces, non-ASCII); refused
are only names that no server can represent: empty, an empty component
(``a//b``, a leading or trailing ``/``), control characters, and names over
the size limit.  ``INBOX`` is case-insensitive as IMAP requires.
"""
from __future__ import annotations

import unicodedata

from .errors import InvalidName

# Cyrus's MAX_MAILBOX_NAME is 490 bytes; LMDB keys hold at most 511 bytes and
# the longest key a name goes into has 17 bytes besides it.
MAX_NAME_BYTES = 490
MAX_USER_BYTES = 255
SEPARATOR = "/"


def mailbox(name: str) -> str:
    """The canonical form of a mailbox name, or InvalidName saying what is wrong."""
    if not isinstance(name, str):
        raise InvalidName(f"mailbox name must be text, not {type(name).__name__}")
    name = unicodedata.normalize("NFC", name)
    if not name:
        raise InvalidName("empty mailbox name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidName(f"mailbox name longer than {MAX_NAME_BYTES} bytes: {name[:40]!r}...",
                          subject=name)
    for ch in name:
        if ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF:
            raise InvalidName(f"mailbox name {name!r} holds a control character or an "
                              f"unpaired surrogate", subject=name)
    parts = name.split(SEPARATOR)
    if any(p == "" for p in parts):
        raise InvalidName(f"mailbox name {name!r} has an empty component "
                          f"(a leading, trailing or doubled {SEPARATOR!r})", subject=name)
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return SEPARATOR.join(parts)


def user(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName("empty user name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_USER_BYTES:
        raise InvalidName(f"user name longer than {MAX_USER_BYTES} bytes", subject=name)
    for ch in name:
        if ord(ch) <= 0x20 or ord(ch) == 0x7F or ch == SEPARATOR or 0xD800 <= ord(ch) <= 0xDFFF:
            raise InvalidName(f"user name {name!r} holds a space, {SEPARATOR!r} or a control "
                              f"character", subject=name)
    return name


def parent(name: str) -> str | None:
    head, sep, _ = name.rpartition(SEPARATOR)
    return head if sep else None
