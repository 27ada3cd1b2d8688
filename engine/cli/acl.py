"""``modsync acl set|delete|list``: RFC 4314 rights on a user's mailbox."""
from __future__ import annotations

from .options import add_mailbox, add_user, add_verb

DOC = """\
set, delete and list the access rights others have on a mailbox

Rights are RFC 4314 letters: l lookup, r read, s keep seen, w write flags,
i insert, p post, k create mailboxes, x delete mailbox, t delete messages,
e expunge, a administer (and the legacy c, d).  The identifier is a user
name, "anyone", or a group; one starting with "-" (negative rights) must
follow "--" so that it is not taken for an option.
"""

SET_DOC = """\
set an identifier's rights on a mailbox

RIGHTS replaces the identifier's rights; "+RIGHTS" adds to them and
"-RIGHTS" takes away, as in IMAP SETACL (put "--" before a "-RIGHTS").
An identifier left with no rights loses its entry.

examples:
  modsync acl set -u alice -m Shared bob lrs
  modsync acl set -u alice -m Shared bob +wi
  modsync acl set -u alice -m Shared -- bob -w
"""

DELETE_DOC = """\
remove an identifier's entry from a mailbox's ACL
"""

LIST_DOC = """\
list a mailbox's ACL: identifier and rights
"""


def register(subparsers, parents) -> None:
    group = add_verb(subparsers, parents, "acl", None, DOC)
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True,
                                   title="actions")
    p = add_verb(actions, parents, "set", set_, SET_DOC)
    add_user(p)
    add_mailbox(p)
    p.add_argument("identifier", metavar="ID", help="a user, \"anyone\", or a group")
    p.add_argument("rights", metavar="RIGHTS", help="e.g. lrs; +RIGHTS adds, -RIGHTS takes away")
    p = add_verb(actions, parents, "delete", delete, DELETE_DOC)
    add_user(p)
    add_mailbox(p)
    p.add_argument("identifier", metavar="ID", help="a user, \"anyone\", or a group")
    p = add_verb(actions, parents, "list", list_, LIST_DOC)
    add_user(p)
    add_mailbox(p)


def set_(ctx) -> None:
    store = ctx.store()
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    ident, rights = ctx.args.identifier, ctx.args.rights
    if rights[:1] in ("+", "-"):
        current = store.acl(ctx.user, mb.name).get(ident, "")
        if rights[0] == "+":
            rights = current + rights[1:]
        else:
            rights = "".join(c for c in current if c not in rights[1:])
    if rights:
        store.set_acl(ctx.user, mb.name, ident, rights)
    elif ident in store.acl(ctx.user, mb.name):
        store.set_acl(ctx.user, mb.name, ident, None)   # no rights left: no entry, as Cyrus
    rights = store.acl(ctx.user, mb.name).get(ident, "")
    ctx.out.note({"user": ctx.user, "mailbox": mb.name, "identifier": ident, "rights": rights},
                 f"{ident} has rights {rights or '(none)'} on {mb.name}")


def delete(ctx) -> None:
    store = ctx.store()
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    store.set_acl(ctx.user, mb.name, ctx.args.identifier, None)
    ctx.out.note({"user": ctx.user, "mailbox": mb.name, "identifier": ctx.args.identifier},
                 f"removed {ctx.args.identifier} from the ACL of {mb.name}")


def list_(ctx) -> None:
    store = ctx.store(readonly=True)
    mb = store.mailbox(ctx.user, ctx.args.mailbox)
    entries = [{"identifier": i, "rights": r}
               for i, r in sorted(store.acl(ctx.user, mb.name).items())]
    ctx.out.emit({"user": ctx.user, "mailbox": mb.name, "acl": entries},
                 lambda: ctx.out.table(["IDENTIFIER", "RIGHTS"],
                                       [[e["identifier"], e["rights"]] for e in entries]))


