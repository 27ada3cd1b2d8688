"""``modsync changes``: a user's changes since a modseq, one line per object."""
from __future__ import annotations

from ..model import (AclEntry, Annotation, Mailbox, QuotaRoot, Record, SeenSet, SieveScript,
                     Subscription)
from .metadata import display_entry
from .options import add_user, add_verb, nonnegative_int
from .output import text_or_none

DOC = """\
list everything that changed for a user since a modseq

One line per object that changed after modseq N, in modseq order, each in
its current state (an expunged message or a deleted mailbox shows as
removed): modseq, kind, identity, state.  Kinds: mailbox, record,
subscription, seen, sieve, annotation, acl, quota.  Records are named
MAILBOX;UID=n.  --since 0 lists the whole state.

If tombstones below N have been expired (`modsync expire`), the exact
changes cannot be known: the command fails (exit 1) and says that a full
sync, from 0, is needed.

examples:
  modsync changes -u alice --since 0
  modsync changes -u alice --since 1200 --json | jq '.changes[].identity'
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "changes", run, DOC)
    add_user(p)
    p.add_argument("--since", type=nonnegative_int, required=True, metavar="N",
                   help="the modseq the caller already has (0: everything)")


def run(ctx) -> None:
    store = ctx.store(readonly=True)
    user = ctx.user
    # One snapshot: every change up to `modseq` is in the list, so a caller can
    # pass it as the next --since.
    result = store.changes(user, ctx.args.since)
    rows = [describe(c) for c in result.changes]
    ctx.out.emit({"user": user, "since": ctx.args.since, "modseq": result.modseq,
                  "horizon": result.horizon, "changes": rows},
                 lambda: ctx.out.table(["MODSEQ", "KIND", "IDENTITY", "STATE"],
                                       [[r["modseq"], r["kind"], r["identity"], r["state"]]
                                        for r in rows]))


def describe(change) -> dict:
    """modseq, kind, identity, state (text for people) and the object's fields (for JSON)."""
    obj, mb = change.object, change.mailbox
    removed = obj.stamp.removed
    where = mb.name if mb is not None else None
    if isinstance(obj, Mailbox):
        identity = obj.name
        state = "deleted" if removed else (f"uidvalidity {obj.uidvalidity}, uidnext "
                                           f"{obj.uidnext}, {obj.messages} messages")
        fields = {"id": obj.id, "name": obj.name, "uidvalidity": obj.uidvalidity,
                  "uidnext": obj.uidnext, "highestmodseq": obj.highestmodseq,
                  "messages": obj.messages}
    elif isinstance(obj, Record):
        identity = f"{where if where is not None else '#' + str(obj.mailbox)};UID={obj.uid}"
        state = "expunged" if removed else f"({' '.join(obj.flags)}) {obj.size} bytes"
        fields = {"mailbox": where, "mailbox_id": mb.id if mb else None, "uid": obj.uid,
                  "flags": list(obj.flags), "size": obj.size,
                  "internaldate": obj.internaldate, "address": obj.address.hex()}
    elif isinstance(obj, SeenSet):
        identity = obj.mailbox_id
        state = "removed" if removed else f"seen {obj.uids or '(none)'}"
        fields = {"mailbox_id": obj.mailbox_id, "uids": obj.uids, "lastuid": obj.lastuid}
    elif isinstance(obj, SieveScript):
        identity = obj.name
        state = "deleted" if removed else f"{'active' if obj.active else 'inactive'}, " \
                                          f"{obj.size} bytes"
        fields = {"name": obj.name, "active": obj.active, "size": obj.size}
    elif isinstance(obj, Annotation):
        entry = display_entry(obj.entry, obj.userid)
        identity = f"{where} {entry}"
        value = text_or_none(obj.value)
        state = "removed" if removed else (repr(value) if value is not None
                                           else f"<{len(obj.value)} bytes>")
        fields = {"mailbox": where, "entry": entry, "stored_entry": obj.entry,
                  "userid": obj.userid, "value": value}
    elif isinstance(obj, AclEntry):
        identity = f"{where} {obj.identifier}"
        state = "removed" if removed else f"rights {obj.rights}"
        fields = {"mailbox": where, "identifier": obj.identifier, "rights": obj.rights}
    elif isinstance(obj, QuotaRoot):
        identity = obj.root or '""'
        state = "removed" if removed else ", ".join(
            f"{k} {v}" for k, v in sorted(obj.limits.items())) or "no limits"
        fields = {"root": obj.root, "limits": dict(obj.limits)}
    else:
        assert isinstance(obj, Subscription), obj
        identity = obj.name
        state = "unsubscribed" if removed else "subscribed"
        fields = {"name": obj.name}
    return {"modseq": change.modseq, "kind": change.kind, "removed": removed,
            "identity": identity, "state": state, "object": fields}
