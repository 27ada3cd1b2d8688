"""``modsync seen``: seen sets for mailboxes a user reads but does not own."""
from __future__ import annotations

import argparse
import logging

from .. import uidset
from ..errors import UsageError
from .options import add_verb, nonnegative_int
from .output import PROG, human_time

log = logging.getLogger("modsync.cli")

DOC = """\
record which messages of another user's mailbox a user has read

A user's seen state in their own mailboxes is the \\Seen flag (see
`modsync flags`).  For a mailbox shared with them by someone else it is a
seen set, kept per reader and named by the mailbox's unique id (shown by
`modsync mailbox list --json` and `modsync status`).  Setting a seen set
replaces the previous one.  `*` in --uid stands for the mailbox's last UID.

examples:
  modsync seen -u bob --mailbox-id 0q3u1mzb4kgj7c2vx9w8ey5a --uid 1:40,42
  modsync seen list -u bob
"""

LIST_DOC = """\
list a user's seen sets

Columns: mailbox id, owner and mailbox (when the id is in this store),
UID set, last UID, when it was last read.
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "seen", set_seen, DOC,
                 usage="%(prog)s [-h] -u USER --mailbox-id ID --uid SET [--lastuid N]\n"
                       "       %(prog)s list [-h] -u USER")
    p.add_argument("-u", "--user", metavar="USER", help="the reader")
    p.add_argument("--mailbox-id", metavar="ID", help="the mailbox's unique id")
    p.add_argument("--uid", metavar="SET", help="the UIDs read, e.g. 1:40,42")
    p.add_argument("--lastuid", type=nonnegative_int, default=0, metavar="N",
                   help="the last UID the reader has seen arrive (default 0)")
    # The custom usage above would otherwise become the prefix of `seen list`'s usage.
    actions = p.add_subparsers(dest="action", metavar="ACTION", title="actions",
                               prog=f"{PROG} seen")
    lp = add_verb(actions, parents, "list", list_, LIST_DOC)
    lp.add_argument("-u", "--user", metavar="USER", default=argparse.SUPPRESS,
                    help="the reader")


def _user(ctx) -> str:
    if not ctx.args.user:
        raise UsageError(f"{ctx.out.command or 'seen'} needs -u USER")
    return ctx.user


def set_seen(ctx) -> None:
    args = ctx.args
    user = _user(ctx)
    if not args.mailbox_id or not args.uid:
        raise UsageError("seen needs --mailbox-id ID and --uid SET (or the action `list`)")
    store = ctx.store()
    found = store.find_mailbox_id(args.mailbox_id)
    owner = mailbox = None
    star = None
    if found is None:
        log.warning("mailbox id %s is not in this store; recording the seen set anyway",
                    args.mailbox_id)
    else:
        owner, mb = found
        mailbox, star = mb.name, mb.uidnext - 1
        if owner == user:
            raise UsageError(f"{args.mailbox_id} is {user}'s own mailbox {mb.name!r}; the "
                             f"owner's seen state is the \\Seen flag (`modsync flags add`)")
    uids = uidset.format(uidset.parse(args.uid, star=star))
    store.set_seen(user, args.mailbox_id, uids, lastuid=args.lastuid)
    ctx.out.note({"user": user, "mailbox_id": args.mailbox_id, "owner": owner,
                  "mailbox": mailbox, "uids": uids, "lastuid": args.lastuid},
                 f"{user} has seen {uids} of {mailbox or args.mailbox_id}"
                 + (f" (owner {owner})" if owner else ""))


def list_(ctx) -> None:
    user = _user(ctx)
    store = ctx.store(readonly=True)
    rows = []
    for s in store.seen_sets(user):
        found = store.find_mailbox_id(s.mailbox_id)
        rows.append({"mailbox_id": s.mailbox_id,
                     "owner": found[0] if found else None,
                     "mailbox": found[1].name if found else None,
                     "uids": s.uids, "lastuid": s.lastuid, "lastread": s.lastread,
                     "lastchange": s.lastchange})
    ctx.out.emit({"user": user, "seen": rows}, lambda: ctx.out.table(
        ["MAILBOX-ID", "OWNER", "MAILBOX", "UIDS", "LASTUID", "LASTREAD"],
        [[r["mailbox_id"], r["owner"], r["mailbox"], r["uids"] or None, r["lastuid"],
          human_time(r["lastread"])] for r in rows]))
