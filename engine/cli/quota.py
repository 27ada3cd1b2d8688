"""``modsync quota set|delete|list``."""
from __future__ import annotations

from .. import names
from ..errors import UsageError
from .options import add_user, add_verb, nonnegative_int
from .output import human_size

DOC = """\
set, delete and list a user's quota roots

A quota root limits the mailboxes at and below it: "" (an empty argument)
is the user's whole tree, "Archive" covers Archive and Archive/*.  Limits
are STORAGE in KiB and MESSAGE counts, as in IMAP QUOTA.  modsync records
and replicates quotas; enforcing them is the mail server's job.
"""

SET_DOC = """\
set a quota root's limits (a limit not given is removed)

examples:
  modsync quota set -u alice "" --storage 1048576 --messages 100000
  modsync quota set -u alice Archive --storage 524288
"""

DELETE_DOC = """\
delete a quota root
"""

LIST_DOC = """\
list quota roots with usage and limits
"""


def register(subparsers, parents) -> None:
    group = add_verb(subparsers, parents, "quota", None, DOC)
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True,
                                   title="actions")
    p = add_verb(actions, parents, "set", set_, SET_DOC)
    add_user(p)
    p.add_argument("root", metavar="ROOT", help='the quota root ("" for the whole tree)')
    p.add_argument("--storage", type=nonnegative_int, metavar="KIB", help="storage limit in KiB")
    p.add_argument("--messages", type=nonnegative_int, metavar="N", help="message count limit")
    p = add_verb(actions, parents, "delete", delete, DELETE_DOC)
    add_user(p)
    p.add_argument("root", metavar="ROOT", help="the quota root (\"\" for the whole tree)")
    add_user(add_verb(actions, parents, "list", list_, LIST_DOC))


def _root_label(root: str) -> str:
    return root if root else '""'


def set_(ctx) -> None:
    limits = {}
    if ctx.args.storage is not None:
        limits["STORAGE"] = ctx.args.storage
    if ctx.args.messages is not None:
        limits["MESSAGE"] = ctx.args.messages
    if not limits:
        raise UsageError("quota set needs --storage KIB and/or --messages N "
                         "(`modsync quota delete` removes a root)")
    root = _canonical(ctx.args.root)
    ctx.store().set_quota(ctx.user, root, limits)
    shown = ", ".join(f"{k} {v}" for k, v in limits.items())
    ctx.out.note({"user": ctx.user, "root": root, "limits": limits},
                 f"quota root {_root_label(root)} of {ctx.user}: {shown}")


def _canonical(root: str) -> str:
    """A quota root is a mailbox name ("" for the whole tree), canonical like one."""
    return names.mailbox(root) if root else ""


def delete(ctx) -> None:
    root = _canonical(ctx.args.root)
    ctx.store().set_quota(ctx.user, root, None)   # NoSuchObject if there is none
    ctx.out.note({"user": ctx.user, "root": root},
                 f"deleted quota root {_root_label(root)} of {ctx.user}")


def list_(ctx) -> None:
    roots = ctx.store(readonly=True).quota(ctx.user)

    def cell(q, resource, size=False):
        used, limit = q["usage"].get(resource), q["limits"].get(resource)
        show = (lambda n: human_size(n * 1024)) if size else str
        return f"{show(used)} of {show(limit)}" if limit is not None else f"{show(used)}"
    ctx.out.emit({"user": ctx.user, "roots": roots}, lambda: ctx.out.table(
        ["ROOT", "STORAGE", "MESSAGES"],
        [[_root_label(q["root"]), cell(q, "STORAGE", True), cell(q, "MESSAGE")]
         for q in roots]))
