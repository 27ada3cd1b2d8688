"""Maildir++ in and out of the store, as Dovecot 2.3 writes and reads it.

    report = import_maildir(store, "alice", "/home/alice/Maildir")
    report = export_maildir(store, "alice", "/srv/restore/alice/Maildir")

Layout (Dovecot's default ``maildir:`` location, LAYOUT=Maildir++):

* the root directory is INBOX; each other folder is a directory ``.A.B`` next
  to ``cur/ new/ tmp/``, where ``.`` separates hierarchy levels;
* a message is one file in ``cur/`` or ``new/``, named
  ``<unique>[,S=<size>][,W=<vsize>][:2,<letters>]``; its mtime is its
  internal date;
* flag letters, in ASCII order: D \\Draft, F \\Flagged, R \\Answered, S \\Seen,
  T \\Deleted, then ``a``..``z`` for keywords, which the folder's
  ``dovecot-keywords`` file maps (``0 $Junk`` makes ``a`` mean $Junk);
* ``dovecot-uidlist`` gives each file its UID; ``subscriptions`` (root) lists
  subscribed folders.

Folder names.  Each ``.``-separated part of a folder directory is a
modified UTF-7 name (RFC 3501 5.1.3, Dovecot's default, ``&APw-`` is "ü")
and becomes one ``/``-separated part of the modsync name: ``.Sub.Folder`` is
``Sub/Folder``, ``.Entw&APw-rfe`` is ``Entwürfe``.  A part that is not valid
modified UTF-7 (Dovecot's decoder is followed to the letter) is taken
literally, as Dovecot lists it; a part that is not UTF-8 is refused.

Dovecot 2.3 cannot hold ``.`` in a Maildir++ name part (checked with
doveadm 2.3.19): with its default settings ``.`` is the hierarchy
separator, so a mailbox "v1.2" reads back as "v1" > "2", and with the
common ``separator = /`` it refuses the name ("Character not allowed in
mailbox name: '.'").  Export therefore refuses, by name, a mailbox with
``.`` in a name part, one whose name begins with ``~`` (Dovecot lists
such a folder but refuses to open it: "Begins with '~'"), and one whose
directory name would exceed 255 bytes; it writes every other mailbox, and
the report is not ``ok``.  Every folder Dovecot can open imports under the
name Dovecot shows (NFC-normalised, as every modsync name is), and export
writes that name back.

Import reads the messages of each folder in Dovecot's UID order
(``dovecot-uidlist``, then new files in the order Dovecot would number
them), appends them in batches and never duplicates (the rule is in
``engine.mailfile``).  Files starting with ``.`` and files in ``tmp/`` are
not messages.  A ``.INBOX`` folder is refused: the root is INBOX, and
Dovecot never lists or opens that directory.  A file is refused, by name,
when it cannot be read, is not a regular file, is bigger than
``MAX_MESSAGE_BYTES``, or is shorter or longer than the ``S=`` size in its
name (truncated after delivery); the import goes on with the other files.
Bodies are stored byte for byte, whatever they hold (NUL bytes, bare LF,
long lines, nothing at all).

Flags on import follow Dovecot: unknown upper-case letters are ignored and a
keyword letter that ``dovecot-keywords`` does not name becomes
``unknown-<n>``, as Dovecot names it.  One addition: ``P`` (passed, which
Dovecot ignores) is imported as $Forwarded, the keyword mail clients use
for it.  Keywords past the 26th of a folder live only in Dovecot's index
files, which are not read.  A keyword the store refuses (not an IMAP atom,
e.g. with a space or a non-ASCII letter) is left off, the message imported
without it, and the keyword reported once per folder.

Export writes a new Maildir (the directory must be missing or empty) that
Dovecot opens as it is: each message is written to ``tmp/``, made durable
and renamed into ``cur/`` as ``<internaldate>.M<uid>P<pid>.<host>,S=..,W=..:2,<letters>``
with mtime = internal date; each folder gets ``dovecot-keywords``, a
``maildirfolder`` marker and a ``dovecot-uidlist`` carrying the store's UIDs
and UIDVALIDITY, so Dovecot keeps them; the root gets ``subscriptions``.
A folder with more than 26 keywords keeps the 26 most used; the others are
reported, since no Maildir file name can carry them.
"""
from __future__ import annotations

import base64
import ctypes
import os
import re
import socket
import stat
from collections import Counter
from dataclasses import dataclass, field

from . import names
from .errors import ImportError_, InvalidName, UsageError
from .mailfile import MAX_MESSAGE_BYTES, ImportReport, ImportRun, display_path
from .progress import Progress
from .store import Store

__all__ = [
    "ExportReport",
    "ImportReport",
    "decode_mutf7",
    "encode_mutf7",
    "export_maildir",
    "flags_from_letters",
    "folder_dirname",
    "format_keywords",
    "import_maildir",
    "letters_from_flags",
    "mailbox_name",
    "parse_keywords",
]

KEYWORDS_FILE = "dovecot-keywords"
UIDLIST_FILE = "dovecot-uidlist"
SUBSCRIPTIONS_FILE = "subscriptions"
FOLDER_MARKER = "maildirfolder"

# Maildir "2," info letters Dovecot understands, and the flags they stand for.
SYSTEM_LETTERS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen",
                  "T": "\\Deleted"}
LETTER_OF_SYSTEM = {flag: letter for letter, flag in SYSTEM_LETTERS.items()}
# "Passed" in the Maildir spec (mutt sets it on forwarding); Dovecot ignores it.
PASSED_LETTER, PASSED_KEYWORD = "P", "$Forwarded"
# Dovecot's MAILDIR_MAX_KEYWORDS: one lower-case letter each.
MAX_KEYWORDS = 26
# NAME_MAX of Linux file systems: a Maildir++ folder's whole path is one directory name.
NAME_MAX = 255
# Messages written to tmp/ between two syncs of the file system (export).
EXPORT_BATCH_MESSAGES = 1000
EXPORT_BATCH_BYTES = 64 << 20


# ---------------------------------------------------------------------------
# Modified UTF-7 (RFC 3501 5.1.3), decoded exactly as Dovecot's imap-utf7.c
# ---------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}


def encode_mutf7(text: str) -> str:
    """Modified UTF-7 of text: printable ASCII as itself ("&" as "&-"), the rest base64'd UTF-16."""
    out: list[str] = []
    run: list[str] = []

    def flush():
        if run:
            b64 = base64.b64encode("".join(run).encode("utf-16-be")).decode()
            out.append("&" + b64.rstrip("=").replace("/", ",") + "-")
            run.clear()

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def decode_mutf7(text: str) -> str:
    """Text of a modified UTF-7 string; ValueError for anything Dovecot's decoder rejects.

    Rejected, as by Dovecot: 8-bit or control characters, an unterminated or
    empty run, bad base64, an odd number of bytes, broken surrogate pairs, an
    encoded NUL or printable ASCII character, and two encoded runs in a row.
    """
    for ch in text:
        if not 0x20 <= ord(ch) <= 0x7E:
            raise ValueError(f"{ch!r} is not printable 7-bit ASCII")
    out: list[str] = []
    i, n = 0, len(text)
    after_run = False
    while i < n:
        ch = text[i]
        if ch != "&":
            out.append(ch)
            after_run = False
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ValueError("'&' without a closing '-'")
        if end == i + 1:
            out.append("&")
            after_run = False
            i = end + 1
            continue
        if after_run:
            raise ValueError("two encoded runs in a row")
        chunk = text[i + 1:end]
        if len(chunk) % 4 == 1:
            raise ValueError(f"truncated base64 in {chunk!r}")
        bits = nbits = 0
        data = bytearray()
        for c in chunk:
            v = _B64_VALUE.get(c)
            if v is None:
                raise ValueError(f"{c!r} is not modified base64")
            bits = (bits << 6) | v
            nbits += 6
            if nbits >= 8:
                nbits -= 8
                data.append((bits >> nbits) & 0xFF)
        if len(data) % 2:
            raise ValueError(f"{chunk!r} is not whole UTF-16 characters")
        decoded = bytes(data).decode("utf-16-be")   # strict: unpaired surrogates raise
        for c in decoded:
            if c == "\0" or 0x20 <= ord(c) <= 0x7E:
                raise ValueError(f"{chunk!r} encodes {c!r}, which must be written as itself")
        out.append(decoded)
        after_run = True
        i = end + 1
    return "".join(out)


# ---------------------------------------------------------------------------
# Folder names
# ---------------------------------------------------------------------------

def _decode_part(part: str) -> str:
    if any("\udc80" <= c <= "\udcff" for c in part):   # os.fsdecode's escapes for non-UTF-8 bytes
        raise InvalidName(f"folder name {display_path(part)!r} is not UTF-8; rename the "
                          f"directory (to UTF-8, e.g. with convmv) and import again", subject=part)
    try:
        return decode_mutf7(part)
    except ValueError:
        # Dovecot lists a name it cannot decode as it is; so do we.
        return part


def mailbox_name(dirname: str) -> str:
    """The modsync name of a Maildir++ folder directory ("" is the root: INBOX).

    ``.Sub.Folder`` -> ``Sub/Folder``; each part is decoded from modified
    UTF-7.  InvalidName when the result is not a valid name (an empty part
    as in ``.a..b``, control characters) or the directory name is not UTF-8.
    """
    if dirname == "":
        return "INBOX"
    if not dirname.startswith(".") or dirname in (".", ".."):
        raise InvalidName(f"{display_path(dirname)!r} is not a Maildir++ folder name "
                          f"(those start with '.')", subject=dirname)
    parts = dirname[1:].split(".")
    if "" in parts:
        raise InvalidName(f"{display_path(dirname)!r} has an empty folder level ('..', or a "
                          f"'.' at the end)", subject=dirname)
    return names.mailbox("/".join(_decode_part(p) for p in parts))


def _folder_parts(mailbox: str) -> list[str]:
    """The modified UTF-7 parts of a mailbox's Maildir++ name; InvalidName if Dovecot can't read it."""
    name = names.mailbox(mailbox)
    parts = name.split(names.SEPARATOR)
    for p in parts:
        if "." in p:
            raise InvalidName(
                f"mailbox {name!r} cannot be written to a Maildir++ folder: '.' separates "
                f"folder levels in Dovecot's default Maildir++ layout, so {p!r} would read back "
                f"as {p.replace('.', '/')!r}; rename the mailbox (e.g. to "
                f"{name.replace('.', '_')!r}) before exporting", subject=name)
    if parts[0].startswith("~"):
        raise InvalidName(f"mailbox {name!r} cannot be written to a Maildir++ folder: Dovecot "
                          f"refuses to open folders whose name begins with '~'", subject=name)
    return [encode_mutf7(p) for p in parts]


def folder_dirname(mailbox: str) -> str:
    """The Maildir++ directory of a modsync mailbox ("" for INBOX, the root).

    ``Sub/Folder`` -> ``.Sub.Folder``, each part in modified UTF-7.
    InvalidName for names Dovecot would not read back as the same mailbox
    (see the module docstring).
    """
    if names.mailbox(mailbox) == "INBOX":
        return ""
    dirname = "." + ".".join(_folder_parts(mailbox))
    if len(os.fsencode(dirname)) > NAME_MAX:
        raise InvalidName(f"mailbox {mailbox!r} cannot be written to a Maildir++ folder: its "
                          f"directory name would be {len(os.fsencode(dirname))} bytes, and file "
                          f"systems allow {NAME_MAX}", subject=mailbox)
    return dirname


# ---------------------------------------------------------------------------
# Flags and the keywords file
# ---------------------------------------------------------------------------

def flags_from_letters(letters: str, keywords: dict[int, str]) -> list[str]:
    """IMAP flags of a file's "2," letters; keywords maps index (a = 0) to name."""
    flags = []
    for ch in letters:
        if ch in SYSTEM_LETTERS:
            flags.append(SYSTEM_LETTERS[ch])
        elif "a" <= ch <= "z":
            idx = ord(ch) - ord("a")
            flags.append(keywords.get(idx) or f"unknown-{idx}")
        elif ch == PASSED_LETTER:
            flags.append(PASSED_KEYWORD)
    return flags


def letters_from_flags(flags, letter_of: dict[str, str]) -> str:
    """The "2," letters for flags: system letters, then keyword letters (letter_of: lower-case keyword -> letter)."""
    system = sorted(LETTER_OF_SYSTEM[f] for f in flags if f in LETTER_OF_SYSTEM)
    kws = sorted({letter_of[f.lower()] for f in flags
                  if not f.startswith("\\") and f.lower() in letter_of})
    return "".join(system) + "".join(kws)


def parse_keywords(data: bytes) -> dict[int, str]:
    """A ``dovecot-keywords`` file: lines "<index> <name>"; bad lines are skipped, as Dovecot does."""
    out = {}
    for line in data.split(b"\n"):
        idx, sp, name = line.rstrip(b"\r").partition(b" ")
        if sp and name and idx.isdigit() and int(idx) < MAX_KEYWORDS:
            out[int(idx)] = name.decode("utf-8", "backslashreplace")
    return out


def format_keywords(keywords: list[str]) -> bytes:
    """A ``dovecot-keywords`` file naming keywords[0] as a, keywords[1] as b, ..."""
    if len(keywords) > MAX_KEYWORDS:
        raise ValueError(f"{len(keywords)} keywords; a Maildir holds {MAX_KEYWORDS}")
    return "".join(f"{i} {k}\n" for i, k in enumerate(keywords)).encode()


_SIZE_IN_NAME = re.compile(r",S=(\d+)(?=[,:]|$)")
_ARRIVAL = re.compile(r"(\d*)(?:\.[^.:]*?M(\d+))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _split_name(filename: str) -> tuple[str, str]:
    """(base, flag letters) of a message file name; Dovecot reads the info after the last ':'."""
    base, sep, info = filename.rpartition(":")
    if not sep:
        return filename, ""
    if info.startswith("2,"):
        return base, info[2:].split(",", 1)[0]
    return base, ""


def _read_uidlist(folder: str) -> dict[str, int]:
    """base name -> UID from a version 3 ``dovecot-uidlist``; {} if there is none (order only)."""
    try:
        with open(os.path.join(folder, UIDLIST_FILE), "rb") as fh:
            lines = fh.read().split(b"\n")
    except OSError:
        return {}
    if not lines[0].startswith(b"3 "):
        return {}
    uids = {}
    for line in lines[1:]:
        uid, _, rest = line.partition(b" ")
        # Extension fields ("W123", "GAbc") come first; the base name follows ":".
        if rest.startswith(b":"):
            base = rest[1:]
        else:
            _, _, base = rest.partition(b" :")
        if uid.isdigit() and base:
            uids[os.fsdecode(base)] = int(uid)
    return uids


def _arrival_key(filename: str, uids: dict[str, int]):
    """Dovecot's numbering order: files it has UIDs for, then the rest by time in the name."""
    base = filename.partition(":")[0]
    uid = uids.get(base)
    if uid is not None:
        return (0, uid, 0, base)
    m = _ARRIVAL.match(base)
    return (1, int(m.group(1) or 0), int(m.group(2) or 0), base)


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------

def _is_maildir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "cur")) or os.path.isdir(os.path.join(path, "new"))


def _folders(root: str, report: ImportReport) -> list[tuple[str, str]]:
    """(mailbox name, directory) of every folder under root, INBOX first; bad ones refused."""
    found: dict[str, str] = {}
    if _is_maildir(root):
        found["INBOX"] = root
    try:
        with os.scandir(root) as it:
            entries = sorted((e for e in it if e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise ImportError_(f"{display_path(root)}: cannot list: {err.strerror}", subject=root)
    for e in entries:
        if not e.is_dir() or not _is_maildir(e.path):
            continue   # a file, or a directory that is no folder (Dovecot ignores both)
        try:
            name = mailbox_name(e.name)
        except InvalidName as err:
            report.refuse(e.path, f"folder not imported: {err}")
            continue
        if name == "INBOX":
            # Even when the root has no cur/ yet: Dovecot makes one there and
            # never lists or opens this directory (checked with doveadm 2.3.19).
            report.refuse(e.path, "folder not imported: it would be mailbox 'INBOX', but the "
                                  "Maildir root is INBOX, and Dovecot never shows this folder")
            continue
        if name in found:
            report.refuse(e.path, f"folder not imported: it would be mailbox {name!r}, but "
                                  f"{display_path(found[name])} has the same name")
            continue
        found[name] = e.path
    return sorted(found.items(), key=lambda kv: (kv[0] != "INBOX", kv[0]))


def _message_files(folder: str, report: ImportReport) -> list[tuple[str, str, bool]]:
    """(path, file name, is a regular file) of the messages in folder, in Dovecot's UID order."""
    files = []
    for sub in ("cur", "new"):
        d = os.path.join(folder, sub)
        try:
            with os.scandir(d) as it:
                # Maildir: names starting with "." are not messages.
                files.extend((e.path, e.name, e.is_file()) for e in it if not e.name.startswith("."))
        except FileNotFoundError:
            continue
        except OSError as err:
            report.refuse(d, f"cannot list the folder's messages: {err.strerror}")
    uids = _read_uidlist(folder)
    files.sort(key=lambda f: _arrival_key(f[1], uids))
    return files


def _read_message(path: str, filename: str) -> tuple[bytes, int]:
    """(body, mtime) of a message file; ImportError_ naming what is wrong with it."""
    try:
        # O_NONBLOCK: a FIFO dropped into cur/ must not hang the import.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise ImportError_(f"cannot open: {err.strerror}", subject=path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImportError_("not a regular file", subject=path)
        if st.st_size > MAX_MESSAGE_BYTES:
            raise ImportError_(f"{st.st_size} bytes; messages over {MAX_MESSAGE_BYTES} bytes "
                               f"are not imported", subject=path)
        chunks = [os.read(fd, st.st_size)]
        got = len(chunks[0])
        while got < st.st_size:
            chunk = os.read(fd, st.st_size - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as err:
        raise ImportError_(f"cannot read: {err.strerror}", subject=path)
    finally:
        os.close(fd)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(body) != st.st_size:
        raise ImportError_(f"changed while being read ({st.st_size} bytes, then {len(body)})",
                           subject=path)
    m = _SIZE_IN_NAME.search(filename.partition(":")[0])
    if m and int(m.group(1)) != len(body):
        raise ImportError_(f"the file has {len(body)} bytes but its name says S={m.group(1)}: "
                           f"it was truncated or changed after delivery", subject=path)
    return body, st.st_mtime_ns // 1_000_000_000


def _irregular_file(path: str) -> ImportError_:
    """The error for a directory entry that is not a regular file, saying what is wrong."""
    try:
        os.stat(path)
    except OSError as err:   # e.g. a symbolic link to nowhere
        return ImportError_(f"cannot open: {err.strerror}", subject=path)
    return ImportError_("not a regular file", subject=path)


def _read_keywords(folder: str, report: ImportReport) -> dict[int, str]:
    path = os.path.join(folder, KEYWORDS_FILE)
    try:
        with open(path, "rb") as fh:
            return parse_keywords(fh.read())
    except FileNotFoundError:
        return {}
    except OSError as err:
        report.refuse(path, f"cannot read ({err.strerror}); keyword letters were imported as "
                            f"unknown-<n>")
        return {}


def _tab_unescape(part: bytes) -> bytes:
    # Dovecot's str_tabescape(): \001 is the escape character.
    return re.sub(rb"\x01([01tnr])",
                  lambda m: {b"0": b"\0", b"1": b"\x01", b"t": b"\t", b"n": b"\n",
                             b"r": b"\r"}[m.group(1)], part)


def _import_subscriptions(root: str, run: ImportRun) -> None:
    path = os.path.join(root, SUBSCRIPTIONS_FILE)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return
    except OSError as err:
        run.report.refuse(path, f"cannot read the subscriptions: {err.strerror}")
        return
    v2 = data.startswith(b"V\t2\n\n")
    for line in data[5:].split(b"\n") if v2 else data.split(b"\n"):
        if not line:
            continue
        parts = [_tab_unescape(p) for p in line.split(b"\t")] if v2 else line.split(b".")
        try:
            name = names.mailbox("/".join(_decode_part(os.fsdecode(p)) for p in parts))
        except InvalidName as err:
            run.report.refuse(path, f"subscription {display_path(line)!r} not imported: {err}")
            continue
        run.subscribe(name)


def import_maildir(store: Store, user: str, path: str | os.PathLike, *,
                   progress: Progress | None = None) -> ImportReport:
    """Import a Maildir++ tree into user's mailboxes; see the module docstring.

    Refused files and folders are listed in the report and the import goes on;
    ImportError_ only when path is not a Maildir at all.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise ImportError_(f"{display_path(root)}: no such directory", subject=root)
    run = ImportRun(store, user, root, progress)
    folders = _folders(root, run.report)
    if not folders and not run.report.refused:
        raise ImportError_(f"{display_path(root)} is not a Maildir: it has no cur/ or new/ "
                           f"directory and no .Folder directories", subject=root)
    plan = [(name, d, _message_files(d, run.report)) for name, d in folders]
    run.progress.start(f"import {display_path(root)}", total_items=sum(len(f) for *_, f in plan))
    try:
        for name, folder, files in plan:
            keywords = _read_keywords(folder, run.report)
            into = run.into(name, folder)
            for fpath, fname, regular in files:
                try:
                    if not regular:
                        raise _irregular_file(fpath)
                    body, mtime = _read_message(fpath, fname)
                except ImportError_ as err:
                    run.report.refuse(fpath, str(err))
                    run.progress.advance(1)
                    continue
                into.offer(body, flags_from_letters(_split_name(fname)[1], keywords), mtime)
            into.finish()
        _import_subscriptions(root, run)
    except BaseException:
        run.close(failing=True)
        raise
    run.close()
    return run.report


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------

@dataclass
class ExportReport:
    """What an export wrote.  ``ok`` is False when anything could not be written.

    ``refused`` lists ``{"mailbox": ..., "reason": ...}``: mailboxes whose
    names a Maildir++ tree cannot hold (not written at all), and keywords or
    subscriptions that could not be written (the messages were).
    """

    path: str
    exported: int = 0
    bytes: int = 0
    mailboxes: list[str] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused

    def refuse(self, mailbox: str, reason: str) -> None:
        self.refused.append({"mailbox": mailbox, "reason": reason})

    def as_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "exported": self.exported, "bytes": self.bytes,
                "mailboxes": list(self.mailboxes), "refused_count": len(self.refused),
                "refused": [dict(r) for r in self.refused]}


def _unique_host() -> str:
    # The Maildir spec's escapes for the characters that would break a file name.
    return (socket.gethostname() or "localhost").replace("/", r"\057").replace(
        ":", r"\072").replace(",", r"\054")


_libc_syncfs = None


def _sync_filesystem(path: str) -> None:
    """Make everything written under path durable.

    One syncfs(2) per batch instead of an fsync per file: fsync costs about
    1.5 ms per message here (30 s for 20,000), syncfs a few ms per batch.
    """
    global _libc_syncfs
    if _libc_syncfs is None:
        try:
            _libc_syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        except (AttributeError, OSError):
            _libc_syncfs = False
    if not _libc_syncfs:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc_syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def _write_new(path: str, data: bytes, mtime: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def _make_maildir(path: str, *, subfolder: bool) -> None:
    for sub in ("", "cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
    if subfolder:
        _write_new(os.path.join(path, FOLDER_MARKER), b"")


def _keyword_letters(mailbox: str, records, report: ExportReport) -> list[str]:
    """The keywords to name in the folder's keywords file (index = letter), problems reported."""
    uses: Counter = Counter()
    spelling: dict[str, str] = {}     # IMAP keywords are case-insensitive: first spelling wins
    for r in records:
        for f in r.flags:
            if not f.startswith("\\"):
                uses[f.lower()] += 1
                spelling.setdefault(f.lower(), f)
    writable = []
    for low, kw in spelling.items():
        if _CONTROL.search(kw):
            report.refuse(mailbox, f"keyword {kw!r} holds a control character, which "
                                   f"{KEYWORDS_FILE} cannot hold; not written on "
                                   f"{uses[low]} message(s)")
        else:
            writable.append(low)
    order = {low: i for i, low in enumerate(writable)}
    chosen = set(sorted(writable, key=lambda k: (-uses[k], order[k]))[:MAX_KEYWORDS])
    dropped = [k for k in writable if k not in chosen]
    if dropped:
        report.refuse(mailbox, f"{len(writable)} keywords, but Maildir file names hold "
                               f"{MAX_KEYWORDS} (a-z); not written: "
                               + ", ".join(f"{spelling[k]} ({uses[k]} message(s))" for k in dropped))
    return [spelling[k] for k in sorted(chosen, key=order.__getitem__)]


def _export_mailbox(store: Store, user: str, mb, folder: str, report: ExportReport,
                    progress: Progress) -> None:
    records = store.records(user, mb.name)
    keywords = _keyword_letters(mb.name, records, report)
    if keywords:
        _write_new(os.path.join(folder, KEYWORDS_FILE), format_keywords(keywords))
    letter_of = {k.lower(): chr(ord("a") + i) for i, k in enumerate(keywords)}
    unique = f"P{os.getpid()}.{_unique_host()}"
    tmp, cur = os.path.join(folder, "tmp"), os.path.join(folder, "cur")
    uidlist = [f"3 V{mb.uidvalidity} N{mb.uidnext}\n"]
    pending: list[tuple[str, str]] = []
    pending_bytes = 0

    def commit():
        # Maildir's rule: a file appears in cur/ only once its bytes are durable.
        _sync_filesystem(folder)
        for src, dst in pending:
            os.rename(src, dst)
        pending.clear()

    for rec in records:
        body = store.read_body(rec.address)
        vsize = len(body) + body.count(b"\n") - body.count(b"\r\n")   # size with CRLF line ends
        base = f"{max(rec.internaldate, 0)}.M{rec.uid}{unique},S={len(body)},W={vsize}"
        _write_new(os.path.join(tmp, base), body, rec.internaldate)
        pending.append((os.path.join(tmp, base),
                        os.path.join(cur, f"{base}:2,{letters_from_flags(rec.flags, letter_of)}")))
        pending_bytes += len(body)
        uidlist.append(f"{rec.uid} :{base}\n")
        report.exported += 1
        report.bytes += len(body)
        if len(pending) >= EXPORT_BATCH_MESSAGES or pending_bytes >= EXPORT_BATCH_BYTES:
            commit()
            pending_bytes = 0
        progress.advance(1, len(body))
    commit()
    # Written last: with it, Dovecot keeps the store's UIDs and UIDVALIDITY.
    _write_new(os.path.join(folder, UIDLIST_FILE), "".join(uidlist).encode())


def _tab_escape(part: str) -> str:
    return (part.replace("\x01", "\x011").replace("\t", "\x01t").replace("\n", "\x01n")
            .replace("\r", "\x01r"))


def export_maildir(store: Store, user: str, path: str | os.PathLike, *,
                   progress: Progress | None = None) -> ExportReport:
    """Write user's mailboxes as a new Maildir++ tree Dovecot reads; see the module docstring.

    path must be missing or an empty directory (UsageError otherwise).
    Mailboxes whose names cannot be folder names are reported, not written.
    """
    root = os.fspath(path)
    if os.path.lexists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise UsageError(f"{display_path(root)} is not an empty directory; export writes a new "
                         f"Maildir, so give it a new or empty directory", subject=root)
    progress = progress or Progress()
    report = ExportReport(path=display_path(root))
    plan = []
    for mb in store.mailboxes(user):
        try:
            plan.append((mb, folder_dirname(mb.name)))
        except InvalidName as err:
            report.refuse(mb.name, str(err))
    refused_names = {r["mailbox"] for r in report.refused}
    progress.start(f"export {user}", total_items=sum(mb.messages for mb, _ in plan),
                   total_bytes=sum(mb.size for mb, _ in plan))
    try:
        _make_maildir(root, subfolder=False)
        for mb, dirname in plan:
            folder = os.path.join(root, dirname) if dirname else root
            if dirname:
                _make_maildir(folder, subfolder=True)
            _export_mailbox(store, user, mb, folder, report, progress)
            report.mailboxes.append(mb.name)
        lines = []
        for name in store.subscriptions(user):
            try:
                # The same test as for a folder (a name too long for one is refused too).
                dirname = folder_dirname(name)
                parts = ["INBOX"] if not dirname else dirname[1:].split(".")
            except InvalidName as err:
                if name not in refused_names:
                    report.refuse(name, f"subscription not written: {err}")
                continue
            lines.append("\t".join(_tab_escape(p) for p in parts) + "\n")
        if lines:
            # Version 2 of Dovecot's file: levels separated by TAB.
            _write_new(os.path.join(root, SUBSCRIPTIONS_FILE), ("V\t2\n\n" + "".join(lines)).encode())
        _sync_filesystem(root)
    finally:
        progress.finish()
    return report
