"""``modsync metadata set|unset|list``: mailbox annotations (RFC 5464 METADATA)."""
from __future__ import annotations

import base64

from ..errors import NoSuchObject, UsageError
from .options import add_mailbox, add_user, add_verb
from .output import text_or_none

DOC = """\
set, unset and list a mailbox's annotations (IMAP METADATA)

Entries are named as in IMAP: /private/comment is the user's own value,
/shared/comment the value everyone sees.  They are stored as Cyrus stores
them: the entry without its /private or /shared prefix (/comment), with
the user's name as userid for private values and "" for shared ones.  An
entry given without either prefix is shared, or private with --private.
Setting /private/specialuse also sets the mailbox's special use.
"""

SET_DOC = """\
set an annotation

examples:
  modsync metadata set -u alice -m INBOX /shared/comment "Main inbox"
  modsync metadata set -u alice -m Archive /private/specialuse '\\Archive'
"""

UNSET_DOC = """\
remove an annotation
"""

LIST_DOC = """\
list a mailbox's annotations: entry, userid (private values), value
"""

PRIVATE, SHARED = "/private", "/shared"


def register(subparsers, parents) -> None:
    group = add_verb(subparsers, parents, "metadata", None, DOC)
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True,
                                   title="actions")
    p = add_verb(actions, parents, "set", set_, SET_DOC)
    add_user(p)
    add_mailbox(p)
    p.add_argument("entry", metavar="ENTRY", help="/private/NAME or /shared/NAME")
    p.add_argument("value", metavar="VALUE", help="the value (text)")
    p.add_argument("--private", action="store_true",
                   help="an entry without /private or /shared is the user's own")
    p = add_verb(actions, parents, "unset", unset, UNSET_DOC)
    add_user(p)
    add_mailbox(p)
    p.add_argument("entry", metavar="ENTRY", help="/private/NAME or /shared/NAME")
    p.add_argument("--private", action="store_true",
                   help="an entry without /private or /shared is the user's own")
    p = add_verb(actions, parents, "list", list_, LIST_DOC)
    add_user(p)
    add_mailbox(p)


def split_entry(entry: str, user: str, private: bool) -> tuple[str, str]:
    """'/private/comment' -> ('/comment', user); '/shared/comment' -> ('/comment', '')."""
    if not entry.isprintable():
        # The store keys entries as entry NUL userid: a NUL would make it another entry.
        raise UsageError(f"annotation entry {entry!r} holds a control character")
    for prefix, userid in ((PRIVATE, user), (SHARED, "")):
        if entry.startswith(prefix + "/"):
            if private and prefix == SHARED:
                raise UsageError(f"--private with the shared entry {entry!r}")
            rest = entry[len(prefix):]
            if rest == "/":
                break
            return rest, userid
    if not entry.startswith("/") or entry.endswith("/") or "//" in entry or entry in (
            PRIVATE, SHARED):
        raise UsageError(f"bad annotation entry {entry!r}: use /private/NAME or /shared/NAME")
    return entry, (user if private else "")


def display_entry(entry: str, userid: str) -> str:
    return (PRIVATE if userid else SHARED) + entry


def set_(ctx) -> None:
    store = ctx.store()
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    entry, userid = split_entry(ctx.args.entry, ctx.user, ctx.args.private)
    store.set_annotation(ctx.user, mb.name, entry, ctx.args.value.encode("utf-8"),
                         userid=userid)
    shown = display_entry(entry, userid)
    ctx.out.note({"user": ctx.user, "mailbox": mb.name, "entry": shown, "stored_entry": entry,
                  "userid": userid, "value": ctx.args.value},
                 f"set {shown} on {mb.name}")


def unset(ctx) -> None:
    store = ctx.store()
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    entry, userid = split_entry(ctx.args.entry, ctx.user, ctx.args.private)
    shown = display_entry(entry, userid)
    # The store would record a tombstone even for an entry that never existed.
    if not any(a.entry == entry and a.userid == userid
               for a in store.annotations(ctx.user, mb.name)):
        raise NoSuchObject(f"{mb.name!r} has no annotation {shown}", subject=shown)
    store.set_annotation(ctx.user, mb.name, entry, None, userid=userid)
    ctx.out.note({"user": ctx.user, "mailbox": mb.name, "entry": shown, "stored_entry": entry,
                  "userid": userid}, f"removed {shown} from {mb.name}")


def list_(ctx) -> None:
    store = ctx.store(readonly=True)
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    rows = []
    for a in sorted(store.annotations(ctx.user, mb.name), key=lambda a: (a.entry, a.userid)):
        row = {"entry": display_entry(a.entry, a.userid), "stored_entry": a.entry,
               "userid": a.userid, "value": text_or_none(a.value)}
        if row["value"] is None:
            row["value_base64"] = base64.b64encode(a.value).decode("ascii")
        rows.append(row)
    ctx.out.emit({"user": ctx.user, "mailbox": mb.name, "annotations": rows},
                 lambda: ctx.out.table(
                     ["ENTRY", "USERID", "VALUE"],
                     [[r["entry"], r["userid"] or None,
                       r["value"] if r["value"] is not None else
                       f"<{len(base64.b64decode(r['value_base64']))} bytes, not text>"]
                      for r in rows]))
