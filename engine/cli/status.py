"""``modsync status``: what two replicas compare to know they agree."""
from __future__ import annotations

from .options import add_user, add_verb
from .output import human_size, plural

DOC = """\
show each user's modseq and digest, and each mailbox's ids and counters

Per user: the modseq counter, the tombstone horizon (changes since a modseq
below it need a full sync) and the content digest, which is equal on two
stores exactly when they hold the same mail, whatever their history.  Per
mailbox: name, unique id, uidvalidity, uidnext, highestmodseq, message
count, size and the mailbox CRC.  Without --user, every user.

examples:
  modsync status --store /srv/modsync
  modsync status -u alice --json
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "status", run, DOC)
    add_user(p, required=False)


def run(ctx) -> None:
    store = ctx.store(readonly=True)
    users = [ctx.user] if ctx.args.user else store.users()
    statuses = [store.status(u) for u in users]

    def text():
        ctx.out.line(f"store {store.path} (id {store.id}), {plural(len(statuses), 'user')}")
        for s in statuses:
            horizon = f", tombstone horizon {s['horizon']}" if s["horizon"] else ""
            ctx.out.line()
            ctx.out.line(f"user {s['user']}: modseq {s['modseq']}{horizon}, "
                         f"digest {s['digest']}")
            ctx.out.table(
                ["NAME", "ID", "UIDVALIDITY", "UIDNEXT", "HIGHESTMODSEQ", "MESSAGES", "SIZE",
                 "CRC"],
                [[m["name"], m["id"], m["uidvalidity"], m["uidnext"], m["highestmodseq"],
                  m["messages"], human_size(m["size"]), m["crc"]] for m in s["mailboxes"]],
                indent="  ")
    ctx.out.emit({"store": {"path": str(store.path), "id": store.id}, "users": statuses}, text)
