"""``modsync mailbox create|rename|delete|list``."""
from __future__ import annotations

from ..errors import UsageError
from .options import add_user, add_verb
from .output import human_size

DOC = """\
create, rename, delete and list a user's mailboxes

Names are Unicode with "/" between levels (Work/2024/Q1).  Dots, "^",
spaces and non-ASCII are ordinary characters; "INBOX" is case-insensitive.
"""

CREATE_DOC = """\
create a mailbox (and the user, if new)

Parents are not created: Work/2024 can exist without Work.  The mailbox
gets a fresh unique id and a uidvalidity above any the name had before.

examples:
  modsync mailbox create -u alice "Work/Q1 reports"
  modsync mailbox create -u alice Junk --special-use '\\Junk'
"""

RENAME_DOC = """\
rename a mailbox and its children

The unique id and uidvalidity stay, so replicas and clients keep their
caches.  Renaming INBOX moves its messages to NEW and leaves INBOX empty,
as IMAP requires.

example:
  modsync mailbox rename -u alice Work Archive/Work
"""

DELETE_DOC = """\
delete a mailbox and its messages

Leaves a tombstone (unique id, last name, uidvalidity) so replicas delete
it too; bodies stay in the blob store until `modsync gc` removes them.
Children are not deleted.
"""

LIST_DOC = """\
list a user's mailboxes with their counters

Columns: name, messages, size, uidvalidity, uidnext, highestmodseq.
--subscribed lists the user's subscriptions instead, including names that
have no mailbox (IMAP allows subscribing to those).
"""

# RFC 6154 and RFC 8457 (\Important).
SPECIAL_USES = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash",
                "\\Important")


def register(subparsers, parents) -> None:
    group = add_verb(subparsers, parents, "mailbox", None, DOC)
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True,
                                   title="actions")

    p = add_verb(actions, parents, "create", create, CREATE_DOC)
    add_user(p)
    p.add_argument("name", metavar="NAME", help="the new mailbox's name")
    p.add_argument("--special-use", action="append", metavar="USE", default=[],
                   help="RFC 6154 special use: \\Sent, \\Trash, \\Junk, \\Drafts, \\Archive, "
                        "\\All, \\Flagged (repeatable)")

    p = add_verb(actions, parents, "rename", rename, RENAME_DOC)
    add_user(p)
    p.add_argument("old", metavar="OLD", help="the mailbox's name now")
    p.add_argument("new", metavar="NEW", help="its new name")

    p = add_verb(actions, parents, "delete", delete, DELETE_DOC)
    add_user(p)
    p.add_argument("name", metavar="NAME", help="the mailbox to delete")

    p = add_verb(actions, parents, "list", list_, LIST_DOC)
    add_user(p)
    p.add_argument("--subscribed", action="store_true", help="list subscriptions instead")


def special_uses(values: list[str]) -> list[str]:
    out = []
    for v in values:
        for word in v.split():
            canon = {s.lower(): s for s in SPECIAL_USES}.get(word.lower())
            if canon is None:
                raise UsageError(f"unknown special use {word!r}; use one of "
                                 f"{' '.join(SPECIAL_USES)}")
            if canon not in out:
                out.append(canon)
    return out


def create(ctx) -> None:
    uses = special_uses(ctx.args.special_use)
    mb = ctx.store().create_mailbox(ctx.user, ctx.args.name, specialuse=uses)
    ctx.out.note({"user": ctx.user, "mailbox": describe(mb)},
                 f"created mailbox {mb.name} (id {mb.id}, uidvalidity {mb.uidvalidity})")


def rename(ctx) -> None:
    store = ctx.store()
    store.rename_mailbox(ctx.user, ctx.args.old, ctx.args.new)
    mb = store.mailbox(ctx.user, ctx.args.new)
    ctx.out.note({"user": ctx.user, "old": ctx.args.old, "mailbox": describe(mb)},
                 f"renamed {ctx.args.old} to {mb.name}")


def delete(ctx) -> None:
    store = ctx.store()
    mb = store.mailbox(ctx.user, ctx.args.name)
    store.delete_mailbox(ctx.user, mb.name)
    ctx.out.note({"user": ctx.user, "mailbox": {"name": mb.name, "id": mb.id}},
                 f"deleted mailbox {mb.name} ({mb.messages} messages)")


def describe(mb, *, subscribed: bool | None = None) -> dict:
    d = {"name": mb.name, "id": mb.id, "messages": mb.messages, "size": mb.size,
         "uidvalidity": mb.uidvalidity, "uidnext": mb.uidnext,
         "highestmodseq": mb.highestmodseq, "specialuse": list(mb.specialuse)}
    if subscribed is not None:
        d["subscribed"] = subscribed
    return d


def list_(ctx) -> None:
    store = ctx.store(readonly=True)
    user = ctx.user
    mbs = {m.name: m for m in store.mailboxes(user)}
    subscribed = set(store.subscriptions(user))
    if ctx.args.subscribed:
        rows = []
        for name in sorted(subscribed):
            mb = mbs.get(name)
            rows.append(describe(mb, subscribed=True) if mb else
                        {"name": name, "id": None, "messages": None, "size": None,
                         "uidvalidity": None, "uidnext": None, "highestmodseq": None,
                         "specialuse": [], "subscribed": True})
    else:
        rows = [describe(m, subscribed=m.name in subscribed) for m in mbs.values()]

    def text():
        cols = ["name", "messages", "size", "uidvalidity", "uidnext", "highestmodseq"]
        with_use = any(r["specialuse"] for r in rows)
        ctx.out.table([c.upper() for c in cols] + (["SPECIAL-USE"] if with_use else []),
                      [[r["name"], r["messages"], human_size(r["size"]), r["uidvalidity"],
                        r["uidnext"], r["highestmodseq"]]
                       + ([" ".join(r["specialuse"]) or None] if with_use else [])
                       for r in rows])
    ctx.out.emit({"user": user, "mailboxes": rows}, text)
