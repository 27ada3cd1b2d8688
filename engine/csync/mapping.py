"""How Cyrus 3.6 names and encodes things, and what they are in modsync.

Mailbox names.  Cyrus replicates *internal* names, whatever namespace its
IMAP clients see (reference: cyrus-replication §1.4, running-real-peers §4.8):

=====================================  ===========================================
Cyrus internal name                    modsync
=====================================  ===========================================
``user.test``                          user ``test``, mailbox ``INBOX``
``user.test.Archive.2024``             user ``test``, mailbox ``Archive/2024``
``user.test.Lists.cyrus^devel``        user ``test``, mailbox ``Lists/cyrus.devel``
``user.test.Entw&APw-rfe``             user ``test``, mailbox ``Entwürfe``
``user.john^doe``                      user ``john.doe``, ``INBOX``
``example.com!user.bob.Sent``          user ``bob@example.com``, ``Sent``
``user.test.#sieve``                   user ``test``'s sieve scripts (not a mailbox)
``DELETED.user.test.Old.6B01DF0C``     a delayed delete of ``Old``: a modsync tombstone
``shared.folder``                      pseudo-user ``%SHARED``, mailbox ``shared/folder``
=====================================  ===========================================

``.`` separates levels; a ``.`` inside a name is ``^``; each level is IMAP
modified UTF-7 (RFC 3501 §5.1.3).  modsync names are Unicode with ``/``.

ACLs travel as one string ``who<TAB>rights<TAB>who<TAB>rights<TAB>``; quota
roots are mailbox names; sieve scripts in SIEVE-MAILBOX mode are messages
in ``user.<u>.#sieve`` whose Subject is the script name.
"""
from __future__ import annotations

import base64
import email.header
import email.utils
import hashlib
import re
from dataclasses import dataclass

from ..errors import UsageError

SEP = "."
DOT = "^"
USER_PREFIX = "user"
DELETED_PREFIX = "DELETED"
SIEVE_FOLDER = "#sieve"
SHARED_USER = "%SHARED"
INBOX = "INBOX"

# Cyrus's default rights for the owner of a personal mailbox (what
# mboxlist_createmailbox gives user.<u> and its children).
OWNER_RIGHTS = "lrswipkxtecdan"

_DELETED_TAIL = re.compile(r"\.[0-9A-F]{8}$")


class NameError_(UsageError):
    """A name that has no counterpart on the other side."""

    code = "csync-name"


# -- IMAP modified UTF-7 (RFC 3501 5.1.3) ---------------------------------------------------

def mutf7_encode(text: str) -> str:
    """Unicode -> modified UTF-7: printable ASCII as is ("&" as "&-"), the rest in &...-."""
    out = []
    run: list[str] = []

    def flush():
        if run:
            data = "".join(run).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            run.clear()

    for ch in text:
        o = ord(ch)
        if 0x20 <= o <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def mutf7_decode(text: str) -> str:
    """Modified UTF-7 -> Unicode.  Malformed shift sequences raise NameError_."""
    out = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise NameError_(f"unterminated modified UTF-7 in {text!r}")
        chunk = text[i + 1:end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            try:
                out.append(base64.b64decode(b64, validate=True).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                raise NameError_(f"bad modified UTF-7 {chunk!r} in {text!r}") from None
        i = end + 1
    return "".join(out)


# -- mailbox names ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CyrusName:
    """What an internal Cyrus name stands for.

    ``kind`` is ``mailbox`` (a modsync mailbox), ``sieve`` (the user's
    #sieve folder), ``deleted`` (a delayed delete: ``name`` is what the
    mailbox was called) or ``shared`` (outside any user; mapped to the
    pseudo-user %SHARED).
    """

    kind: str
    user: str
    name: str          # modsync mailbox name ("" for the sieve folder)
    internal: str


def _level_in(part: str) -> str:
    return mutf7_decode(part.replace(DOT, "."))


def _level_out(part: str) -> str:
    if DOT in part:
        raise NameError_(f"mailbox level {part!r} holds {DOT!r}, which Cyrus uses to stand for "
                         f"'.' in internal names; rename it before replicating to Cyrus")
    return mutf7_encode(part).replace(".", DOT)


def user_in(internal_user: str, domain: str | None) -> str:
    user = internal_user.replace(DOT, ".")
    return f"{user}@{domain}" if domain else user


def user_out(user: str) -> tuple[str, str | None]:
    """(internal userid, domain or None) for a modsync user name."""
    local, at, domain = user.rpartition("@")
    if at and local and domain:
        return local.replace(".", DOT), domain
    return user.replace(".", DOT), None


def parse_name(internal: str) -> CyrusName:
    """The modsync meaning of an internal Cyrus mailbox name."""
    domain = None
    rest = internal
    if "!" in rest:
        domain, _, rest = rest.partition("!")
    if rest.startswith(DELETED_PREFIX + SEP):
        inner = rest[len(DELETED_PREFIX) + 1:]
        m = _DELETED_TAIL.search(inner)
        if m:
            inner = inner[:m.start()]
        orig = parse_name((domain + "!" if domain else "") + inner)
        return CyrusName("deleted", orig.user, orig.name, internal)
    parts = rest.split(SEP)
    if parts[0] == USER_PREFIX and len(parts) >= 2 and parts[1]:
        user = user_in(parts[1], domain)
        levels = parts[2:]
        if not levels:
            return CyrusName("mailbox", user, INBOX, internal)
        if levels == [SIEVE_FOLDER]:
            return CyrusName("sieve", user, "", internal)
        name = "/".join(_level_in(p) for p in levels)
        if name.upper() == INBOX:
            raise NameError_(f"{internal!r}: a folder called INBOX under INBOX has no modsync name")
        return CyrusName("mailbox", user, name, internal)
    user = SHARED_USER + ("@" + domain if domain else "")
    return CyrusName("shared", user, "/".join(_level_in(p) for p in parts), internal)


def internal_name(user: str, name: str) -> str:
    """The internal Cyrus name of modsync user ``user``'s mailbox ``name``."""
    if user == SHARED_USER or user.startswith(SHARED_USER + "@"):
        domain = user.partition("@")[2] or None
        body = SEP.join(_level_out(p) for p in name.split("/"))
        return f"{domain}!{body}" if domain else body
    uid, domain = user_out(user)
    base = f"{USER_PREFIX}{SEP}{uid}"
    if name != INBOX:
        base += SEP + SEP.join(_level_out(p) for p in name.split("/"))
    return f"{domain}!{base}" if domain else base


def sieve_folder(user: str) -> str:
    uid, domain = user_out(user)
    base = f"{USER_PREFIX}{SEP}{uid}{SEP}{SIEVE_FOLDER}"
    return f"{domain}!{base}" if domain else base


def user_of_internal(internal: str) -> str | None:
    """The modsync user owning an internal name, or None when it is not parseable."""
    try:
        return parse_name(internal).user
    except NameError_:
        return None


def wire_userid(user: str) -> str:
    """A modsync user name as Cyrus writes userids in SUB/SEEN/UNUSER (``bob@example.com``)."""
    return user


# -- quota roots ------------------------------------------------------------------------------

def quota_root_in(root: str) -> tuple[str, str]:
    """(user, modsync quota root) for a Cyrus quota root; the user's whole tree is ''."""
    cn = parse_name(root)
    if cn.kind == "mailbox":
        return cn.user, "" if cn.name == INBOX else cn.name
    raise NameError_(f"quota root {root!r} is not a user's mailbox")


def quota_root_out(user: str, root: str) -> str:
    return internal_name(user, root or INBOX)


#: Cyrus 3.6 quota resources in the order sync_encode_quota_limits prints them.
QUOTA_RESOURCES = ("STORAGE", "MESSAGE", "X-ANNOTATION-STORAGE", "X-NUM-FOLDERS")
#: What ``LIMIT 4294967295`` means (QUOTA_UNLIMITED travels as UINT_MAX).
UNLIMITED32 = 0xFFFFFFFF


# -- ACL strings --------------------------------------------------------------------------------

def parse_acl(acl: str) -> list[tuple[str, str]]:
    """``"a\\tlrs\\tb\\tlr\\t"`` -> [("a", "lrs"), ("b", "lr")] in the string's order."""
    parts = acl.split("\t")
    if parts and parts[-1] == "":
        parts.pop()
    if len(parts) % 2:
        parts.append("")
    return [(parts[i], parts[i + 1]) for i in range(0, len(parts), 2) if parts[i]]


def format_acl(entries) -> str:
    return "".join(f"{who}\t{rights}\t" for who, rights in entries)


def merge_acl_order(previous: str, current: dict[str, str]) -> str:
    """An ACL string for ``current`` that keeps the order of ``previous`` where it can."""
    out = []
    seen = set()
    for who, _ in parse_acl(previous):
        if who in current and who not in seen:
            out.append((who, current[who]))
            seen.add(who)
    for who in sorted(current):
        if who not in seen:
            out.append((who, current[who]))
    return format_acl(out)


# -- options ------------------------------------------------------------------------------------

#: New mailboxes get POP3_NEW_UIDL ("P"), as Cyrus's default configuration does.
DEFAULT_OPTIONS = "P"


# -- sieve scripts as messages of the #sieve folder (SIEVE-MAILBOX mode) --------------------------

SIEVE_EXTENSION = ".sieve"


def build_sieve_message(user: str, servername: str, name: str, script: bytes,
                        last_update: int, script_id: str | None = None) -> bytes:
    """The message Cyrus 3.6 keeps a script in (sieve_db.c store_script), deterministically.

    The id and the date derive from the inputs, so the same script always
    gives the same bytes, hence the same GUID on every push.
    """
    contentid = hashlib.sha1(script).hexdigest()
    if script_id is None:
        script_id = hashlib.sha1(f"{user}\0{name}".encode()).hexdigest()[:24]
    if "@" in user:
        sender = f"<{user}>"
    else:
        sender = f"<{user}@{servername}>"
    subject = name
    if any(ord(c) > 0x7E or ord(c) < 0x20 for c in name):
        subject = email.header.Header(name, "utf-8").encode()
    date = email.utils.formatdate(last_update, usegmt=False).replace("-0000", "+0000")
    head = (f"From: {sender}\r\n"
            f"Subject: {subject}\r\n"
            f"Date: {date}\r\n"
            f"Message-ID: <{contentid}@{servername}>\r\n"
            f"Content-Type: application/sieve; charset=utf-8\r\n"
            f"Content-Length: {len(script)}\r\n"
            f"Content-Disposition: attachment;\r\n\tfilename=\"{script_id}{SIEVE_EXTENSION}\"\r\n"
            f"MIME-Version: 1.0\r\n\r\n")
    return head.encode() + script


@dataclass(frozen=True)
class SieveMessage:
    name: str
    script_id: str
    script: bytes


def parse_sieve_message(message: bytes) -> SieveMessage:
    """Script name (Subject), id (filename less .sieve) and script of a #sieve message."""
    sep = message.find(b"\r\n\r\n")
    skip = 4
    if sep < 0:
        sep = message.find(b"\n\n")
        skip = 2
    if sep < 0:
        raise NameError_("sieve message without a header/body separator")
    head = message[:sep].decode("utf-8", "replace")
    body = message[sep + skip:]
    unfolded = re.sub(r"\r?\n[ \t]+", " ", head)
    fields: dict[str, str] = {}
    for line in unfolded.splitlines():
        k, colon, v = line.partition(":")
        if colon:
            fields.setdefault(k.strip().lower(), v.strip())
    subject = fields.get("subject", "")
    try:
        name = str(email.header.make_header(email.header.decode_header(subject)))
    except (ValueError, LookupError):
        name = subject
    disp = fields.get("content-disposition", "")
    m = re.search(r'filename="?([^";]+)"?', disp, re.I)
    sid = m.group(1) if m else ""
    if sid.endswith(SIEVE_EXTENSION):
        sid = sid[:-len(SIEVE_EXTENSION)]
    if not name:
        raise NameError_("sieve message without a Subject (the script name)")
    return SieveMessage(name, sid, body)


# -- flags ---------------------------------------------------------------------------------------

EXPUNGED = "\\Expunged"
_SYSTEM_ORDER = ("\\Deleted", "\\Answered", "\\Flagged", "\\Draft", "\\Expunged", "\\Seen")
_SYSTEM = {f.lower(): f for f in _SYSTEM_ORDER}


def split_flags(flags) -> tuple[tuple[str, ...], bool]:
    """Cyrus wire flags -> (flags as modsync stores them, expunged?).

    System flags are matched case-insensitively; unknown system flags are
    dropped (Cyrus logs and ignores them).
    """
    out = []
    expunged = False
    seen = set()
    for f in flags:
        if f is None:
            continue
        low = f.lower()
        if low.startswith("\\"):
            canon = _SYSTEM.get(low)
            if canon is None:
                continue
            if canon == EXPUNGED:
                expunged = True
                continue
            f = canon
        if low in seen:
            continue
        seen.add(low)
        out.append(f)
    return tuple(out), expunged


def wire_flags(flags, expunged: bool) -> list[str]:
    """Flags in the order Cyrus prints them: system flags, then user flags."""
    system = {f.lower() for f in flags if f.startswith("\\")}
    if expunged:
        system.add("\\expunged")
    out = [f for f in _SYSTEM_ORDER if f.lower() in system]
    out += [f for f in flags if not f.startswith("\\")]
    return out
