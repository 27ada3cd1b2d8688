"""IMAP UID sets: ``1:5,9,12:*``.  Parsing, printing and membership."""
from __future__ import annotations

from .errors import UsageError
from .model import MAX_UID


def parse(text: str, *, star: int | None = None) -> list[tuple[int, int]]:
    """Parse a UID set into sorted, merged, inclusive ranges.

    ``*`` stands for ``star`` (the highest UID in use); without one it is refused.
    """
    ranges = []
    if not text or not text.strip():
        raise UsageError(f"empty UID set {text!r}; give UIDs like 1:5,9")
    for part in text.split(","):
        lo_s, sep, hi_s = part.strip().partition(":")
        lo = _one(lo_s, star, text)
        hi = _one(hi_s, star, text) if sep else lo
        if lo > hi:
            lo, hi = hi, lo
        ranges.append((lo, hi))
    return merge(ranges)


def _one(s: str, star: int | None, whole: str) -> int:
    s = s.strip()
    if s == "*":
        if star is None:
            raise UsageError(f"'*' in UID set {whole!r} needs a mailbox to refer to")
        return max(star, 1)
    if not s.isdigit():
        raise UsageError(f"bad UID {s!r} in UID set {whole!r}; give UIDs like 1:5,9")
    n = int(s)
    if not 1 <= n <= MAX_UID:
        raise UsageError(f"UID {n} in {whole!r} is out of range 1..{MAX_UID}")
    return n


def merge(ranges) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def from_uids(uids) -> list[tuple[int, int]]:
    return merge((u, u) for u in uids)


def format(ranges) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in ranges)


def contains(ranges, uid: int) -> bool:
    return any(lo <= uid <= hi for lo, hi in ranges)


def iterate(ranges):
    for lo, hi in ranges:
        yield from range(lo, hi + 1)
