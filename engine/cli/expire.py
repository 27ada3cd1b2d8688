"""``modsync expire``: drop a user's old tombstones."""
from __future__ import annotations

from .options import add_user, add_verb, nonnegative_int
from .output import plural

DOC = """\
drop a user's tombstones below a modseq

Tombstones (expunged messages, deleted mailboxes, removed subscriptions,
...) let a replica learn exactly what vanished.  Dropping those below
MODSEQ raises the user's tombstone horizon to it: afterwards a replica
that last synced below MODSEQ needs a full sync (`modsync changes` says
so).  Pick MODSEQ below what every replica has.

example:
  modsync expire -u alice --below 1200
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "expire", run, DOC)
    add_user(p)
    p.add_argument("--below", type=nonnegative_int, required=True, metavar="MODSEQ",
                   help="drop tombstones stamped below this modseq")


def run(ctx) -> None:
    store = ctx.store()
    n = store.expire_tombstones(ctx.user, ctx.args.below)
    horizon = store.user_info(ctx.user).horizon
    ctx.out.note({"user": ctx.user, "below": ctx.args.below, "dropped": n, "horizon": horizon},
                 f"dropped {plural(n, 'tombstone')} of {ctx.user}; tombstone horizon is now "
                 f"{horizon}")
