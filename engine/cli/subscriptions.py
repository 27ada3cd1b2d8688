"""``modsync subscribe`` and ``modsync unsubscribe``."""
from __future__ import annotations

from .. import names
from .options import add_user, add_verb

SUBSCRIBE_DOC = """\
subscribe a user to a mailbox name

The mailbox need not exist (IMAP allows subscribing to any name); the user
is created if new.  `modsync mailbox list --subscribed` lists subscriptions.

example:
  modsync subscribe -u alice "Lists/python-dev"
"""

UNSUBSCRIBE_DOC = """\
remove a user's subscription to a mailbox name

example:
  modsync unsubscribe -u alice "Lists/python-dev"
"""


def register(subparsers, parents) -> None:
    for name, handler, doc in (("subscribe", subscribe, SUBSCRIBE_DOC),
                               ("unsubscribe", unsubscribe, UNSUBSCRIBE_DOC)):
        p = add_verb(subparsers, parents, name, handler, doc)
        add_user(p)
        p.add_argument("name", metavar="NAME", help="the mailbox name")


def subscribe(ctx) -> None:
    name = names.mailbox(ctx.args.name)
    ctx.store().subscribe(ctx.user, name)
    ctx.out.note({"user": ctx.user, "name": name, "subscribed": True},
                 f"subscribed {ctx.user} to {name}")


def unsubscribe(ctx) -> None:
    name = names.mailbox(ctx.args.name)
    ctx.store().unsubscribe(ctx.user, name)
    ctx.out.note({"user": ctx.user, "name": name, "subscribed": False},
                 f"unsubscribed {ctx.user} from {name}")
