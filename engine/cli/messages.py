"""Messages: ``save``, ``fetch``, ``flags``, ``expunge``, ``copy``, ``move``.

UID sets are IMAP's: ``1:5,9,12:*``, where ``*`` is the highest UID the
mailbox has given out.  UIDs in a set that do not exist are skipped, as
IMAP does; the output says how many messages were affected.
"""
from __future__ import annotations

import base64
import logging
import sys
from datetime import datetime, timezone

from .. import uidset
from ..errors import NoSuchMessage, UsageError
from ..model import SYSTEM_FLAGS
from .options import MAX_NUMBER, add_mailbox, add_user, add_verb
from .output import plural

log = logging.getLogger("modsync.cli")

SAVE_DOC = """\
append one message, read byte-exact from stdin; prints its UID

The bytes on standard input are stored exactly as they are (line endings
included).  --flags takes IMAP flags separated by spaces; --internaldate
takes seconds since the epoch or ISO 8601 (UTC unless it names an offset;
default: now).

examples:
  modsync save -u alice -m INBOX < message.eml
  modsync save -u alice -m Sent --flags '\\Seen $Forwarded' \\
      --internaldate 2024-03-01T09:30:00+01:00 < sent.eml
"""

FETCH_DOC = """\
write one message's body, byte-exact, to stdout

The body is read from the blob store and checked against its hash; a body
that fails the check is reported as damage (exit 4).  With --json the
result is an object with the metadata and the body in base64.

example:
  modsync fetch -u alice -m INBOX --uid 42 > 42.eml
"""

FLAGS_DOC = """\
add, remove or replace flags on the messages in a UID set

System flags are \\Answered \\Flagged \\Deleted \\Seen \\Draft (any case);
other flags are keywords such as $Junk or $Forwarded (ASCII, no spaces or
( ) { % * " \\ ]).  \\Recent is a session state and cannot be stored.
"""

FLAGS_ACTION_DOC = {
    "add": "add flags to messages\n\nexample:\n  modsync flags add -u alice -m INBOX "
           "--uid 1:* '\\Seen'\n",
    "remove": "remove flags from messages\n\nexample:\n  modsync flags remove -u alice -m INBOX"
              " --uid 7 '$Junk'\n",
    "replace": "set messages' flags to exactly the ones given (none: clear all)\n\nexample:\n"
               "  modsync flags replace -u alice -m INBOX --uid 3,5 '\\Seen' '\\Flagged'\n",
}

EXPUNGE_DOC = """\
expunge the messages in a UID set

Each expunged message leaves a tombstone (UID, modseq) so replicas learn
exactly what vanished; `modsync expire` drops old tombstones and
`modsync gc` removes bodies nothing refers to any more.

example:
  modsync expunge -u alice -m Trash --uid 1:*
"""

COPY_DOC = """\
copy messages to another mailbox of the same user

The copies get new UIDs in DEST (printed as old -> new, like UIDPLUS
COPYUID); bodies are shared, not duplicated.

example:
  modsync copy -u alice -m INBOX --uid 3:5 Archive
"""

MOVE_DOC = """\
move messages to another mailbox of the same user

Like copy, and the originals are expunged in the same transaction.

example:
  modsync move -u alice -m INBOX --uid 3:5 Archive
"""

_SYSTEM = {f.lower(): f for f in SYSTEM_FLAGS}
_ATOM_SPECIALS = set('(){ %*"\\]')


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "save", save, SAVE_DOC)
    add_user(p)
    add_mailbox(p, help="the mailbox to append to")
    p.add_argument("--flags", default="", metavar="FLAGS",
                   help="flags separated by spaces, e.g. '\\Seen $Junk'")
    p.add_argument("--internaldate", metavar="DATE",
                   help="epoch seconds or ISO 8601 (default: now)")

    p = add_verb(subparsers, parents, "fetch", fetch, FETCH_DOC)
    add_user(p)
    add_mailbox(p)
    p.add_argument("--uid", required=True, metavar="UID", help="one UID (or '*': the last)")

    group = add_verb(subparsers, parents, "flags", None, FLAGS_DOC)
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True,
                                   title="actions")
    for mode, doc in FLAGS_ACTION_DOC.items():
        p = add_verb(actions, parents, mode, set_flags, doc)
        add_user(p)
        add_mailbox(p)
        p.add_argument("--uid", required=True, metavar="SET", help="UID set, e.g. 1:5,9,12:*")
        p.add_argument("flags", nargs="*" if mode == "replace" else "+", metavar="FLAG")

    p = add_verb(subparsers, parents, "expunge", expunge, EXPUNGE_DOC)
    add_user(p)
    add_mailbox(p)
    p.add_argument("--uid", required=True, metavar="SET", help="UID set, e.g. 1:5,9,12:*")

    for name, handler, doc in (("copy", copy, COPY_DOC), ("move", move, MOVE_DOC)):
        p = add_verb(subparsers, parents, name, handler, doc)
        add_user(p)
        add_mailbox(p, help="the source mailbox")
        p.add_argument("--uid", required=True, metavar="SET", help="UID set, e.g. 1:5,9,12:*")
        p.add_argument("dest", metavar="DEST", help="the destination mailbox")


def check_flags(flags) -> list[str]:
    """Flags as the store should get them, or UsageError naming the bad one."""
    out = []
    for f in flags:
        if f.startswith("\\"):
            canon = _SYSTEM.get(f.lower())
            if canon is None:
                why = (" (a session state, never stored)" if f.lower() == "\\recent" else "")
                raise UsageError(f"unknown system flag {f}{why}; system flags are "
                                 f"{' '.join(SYSTEM_FLAGS)}; keywords have no backslash")
            out.append(canon)
        elif not f or any(c in _ATOM_SPECIALS or not 0x20 < ord(c) < 0x7F for c in f):
            raise UsageError(f"bad flag keyword \"{f}\": keywords are ASCII without spaces or "
                             f"( ) {{ % * \" \\ ]")
        else:
            out.append(f)
    return out


def parse_internaldate(text: str) -> int:
    """Epoch seconds, or ISO 8601 (a time without an offset is UTC)."""
    if text.isdigit():
        if int(text) > MAX_NUMBER:
            raise UsageError(f"internaldate {text!r} is too large")
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"internaldate {text!r}: give epoch seconds or ISO 8601 such as "
                         f"2024-03-01T09:30:00+01:00") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    when = int(dt.timestamp())
    if when < 0:
        raise UsageError(f"internaldate {text!r} is before 1970")
    return when


def save(ctx) -> None:
    flags = check_flags(ctx.args.flags.split())
    when = None if ctx.args.internaldate is None else parse_internaldate(ctx.args.internaldate)
    if sys.stdin.isatty():
        log.warning("reading the message from the terminal; end it with Ctrl-D")
    log.debug("reading the message from standard input")
    body = sys.stdin.buffer.read()
    if not body:
        raise UsageError("no message on standard input (an empty message cannot be saved)")
    store = ctx.store()
    rec = store.append(ctx.user, ctx.args.mailbox, body, flags=flags, internaldate=when)
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    ctx.out.emit({"user": ctx.user, "mailbox": mb.name, "uid": rec.uid,
                  "uidvalidity": mb.uidvalidity, "size": rec.size, "flags": list(rec.flags),
                  "internaldate": rec.internaldate, "address": rec.address.hex()},
                 str(rec.uid))


def fetch(ctx) -> None:
    store = ctx.store(readonly=True)
    ranges = ctx.uid_ranges(ctx.args.mailbox, ctx.args.uid)
    if len(ranges) != 1 or ranges[0][0] != ranges[0][1]:
        raise UsageError(f"fetch takes one UID, not the set {ctx.args.uid!r}")
    uid = ranges[0][0]
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    recs = store.records(ctx.user, mb.name, uids=ranges)
    if not recs:
        raise NoSuchMessage(f"{mb.name!r} of user {ctx.user!r} has no message with UID {uid}",
                            subject=uid)
    rec = recs[0]
    body = store.read_body(rec.address)
    if ctx.out.json:
        ctx.out.emit({"user": ctx.user, "mailbox": mb.name, "uid": rec.uid,
                      "uidvalidity": mb.uidvalidity, "size": rec.size, "flags": list(rec.flags),
                      "internaldate": rec.internaldate, "modseq": rec.stamp.modseq,
                      "address": rec.address.hex(), "sha1": rec.sha1.hex(),
                      "body_base64": base64.b64encode(body).decode("ascii")})
    else:
        ctx.out.raw(body)


def set_flags(ctx) -> None:
    store = ctx.store()
    mode = ctx.args.action
    flags = check_flags(ctx.args.flags)
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    ranges = ctx.uid_ranges(mb.name, ctx.args.uid)
    n = store.set_flags(ctx.user, mb.name, ranges, flags, mode=mode)
    verb = {"add": "added flags on", "remove": "removed flags from",
            "replace": "replaced flags on"}[mode]
    ctx.out.note({"user": ctx.user, "mailbox": mb.name, "uids": uidset.format(ranges),
                  "mode": mode, "flags": flags, "changed": n},
                 f"{verb} {plural(n, 'message')}")


def expunge(ctx) -> None:
    store = ctx.store()
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    ranges = ctx.uid_ranges(mb.name, ctx.args.uid)
    n = store.expunge(ctx.user, mb.name, ranges)
    ctx.out.note({"user": ctx.user, "mailbox": mb.name, "uids": uidset.format(ranges),
                  "expunged": n}, f"expunged {plural(n, 'message')} from {mb.name}")


def copy(ctx) -> None:
    _copy(ctx, move=False)


def move(ctx) -> None:
    _copy(ctx, move=True)


def _copy(ctx, *, move: bool) -> None:
    store = ctx.store()
    src = store.mailbox(ctx.user, ctx.args.mailbox)
    dst = store.mailbox(ctx.user, ctx.args.dest)
    ranges = ctx.uid_ranges(src.name, ctx.args.uid)
    mapping = store.copy(ctx.user, src.name, ranges, dst.name, move=move)
    verb = "moved" if move else "copied"
    text = f"{verb} {plural(len(mapping), 'message')} from {src.name} to {dst.name}"
    if mapping:
        text += (f": UIDs {uidset.format(uidset.from_uids(mapping))} -> "
                 f"{uidset.format(uidset.from_uids(mapping.values()))}")
    ctx.out.note({"user": ctx.user, "mailbox": src.name, "dest": dst.name,
                  "dest_uidvalidity": dst.uidvalidity,
                  "uids": [{"uid": old, "new_uid": new} for old, new in mapping.items()]},
                 text)

