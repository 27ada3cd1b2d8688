"""``modsync status``: what two replicas compare to know they agree, and how far peers lag."""
from __future__ import annotations

import time

from .options import add_user, add_verb
from .output import human_size, human_time, plural

DOC = """\
show each user's modseq and digest, each mailbox's ids and counters, and each peer's lag

Per user: the modseq counter, the tombstone horizon (changes since a modseq
below it need a full sync) and the content digest, which is equal on two
stores exactly when they hold the same mail, whatever their history.  Per
mailbox: name, unique id, uidvalidity, uidnext, highestmodseq, message
count, size and the mailbox CRC.  Without --user, every user.

Per peer this store replicates with (`modsync push` to a replica, or
`modsync pull` from a master): how far behind the replica is, in modseqs
and in seconds (since the oldest change it lacks was committed), how many
users are queued for it, and the last error.  Peers appear once a push or
pull has tried them; in --json they are under "peers".

examples:
  modsync status --store /srv/modsync
  modsync status -u alice --json
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "status", run, DOC)
    add_user(p, required=False)


def peer_view(store, only_user: str | None = None) -> list[dict]:
    """Each peer's lag, as `status` shows it (see DOC)."""
    # Imported here: the replication engine loads the network client.
    from ..changeset import vv_le
    from ..replication import list_peers, local_only_ranges, local_state, read_intents
    now = time.time()
    intents = read_intents(store)
    out = []
    for p in list_peers(store):
        users = []
        for user, pu in sorted(p.users.items()):
            if only_user is not None and user != only_user:
                continue
            mine = local_state(store, user)
            it = intents.get(user)
            if p.direction == "push":
                behind = not vv_le(mine, pu.vv)
                modseqs = max(1, it.modseq - pu.acked_modseq) if (behind and it) else 0
                since = it.first_commit_after(pu.acked_modseq) if (behind and it) else None
                seconds = max(0.0, now - since) if since is not None else 0.0
            else:
                behind = not vv_le(pu.vv, mine)
                modseqs = sum(max(0, n - mine.get(o, 0)) for o, n in pu.vv.items())
                seconds = max(0.0, now - pu.acked_ms / 1000) if behind else 0.0
            users.append({"user": user, "queued": behind, "modseqs_behind": modseqs,
                          "seconds_behind": round(seconds, 3),
                          "acked_at": human_time(pu.acked_ms // 1000) if pu.acked_ms else None,
                          "error": pu.error or None})
        out.append({
            "peer_id": None if p.peer_id.startswith("@") else p.peer_id,
            "direction": p.direction, "address": p.address,
            "software": p.software or None, "version": p.version or None,
            "last_contact": human_time(p.last_contact_ms // 1000) if p.last_contact_ms else None,
            "last_error": p.last_error or None,
            "last_error_at": human_time(p.last_error_ms // 1000) if p.last_error_ms else None,
            "users_queued": sum(u["queued"] for u in users),
            "modseqs_behind": sum(u["modseqs_behind"] for u in users),
            "seconds_behind": max((u["seconds_behind"] for u in users), default=0.0),
            "users": users,
        })
    for user, ranges in sorted(local_only_ranges(store).items()):
        if only_user is not None and user != only_user:
            continue
        out.append({
            "peer_id": None, "direction": "sync", "address": "", "software": None,
            "version": None, "last_contact": None,
            "last_error": f"{plural(len(ranges), 'range')} of {user}'s modseqs acknowledged "
                          f"only locally (synchronous replicas timed out)",
            "last_error_at": human_time(int(ranges[-1][2])) if ranges else None,
            "users_queued": 0, "modseqs_behind": 0, "seconds_behind": 0.0, "users": [],
            "local_only": {"user": user, "ranges": [
                {"from": r[0], "to": r[1], "at": human_time(int(r[2]))} for r in ranges]}})
    return out


def run(ctx) -> None:
    store = ctx.store(readonly=True)
    users = [ctx.user] if ctx.args.user else store.users()
    statuses = [store.status(u) for u in users]
    peers = peer_view(store, ctx.user if ctx.args.user else None)

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
        if peers:
            ctx.out.line()
            ctx.out.line("peers:")
            ctx.out.table(
                ["DIRECTION", "ADDRESS", "USERS QUEUED", "MODSEQS BEHIND", "SECONDS BEHIND",
                 "LAST CONTACT", "LAST ERROR"],
                [[p["direction"], p["address"] or "-", p["users_queued"], p["modseqs_behind"],
                  f"{p['seconds_behind']:.1f}", p["last_contact"], p["last_error"]]
                 for p in peers], indent="  ")

    data = {"store": {"path": str(store.path), "id": store.id}, "users": statuses}
    # Only when there are peers: schemas/cli/status.schema.json (owned by the
    # CLI) does not list "peers" yet; docs/replication.md gives its shape.
    if peers:
        data["peers"] = peers
    ctx.out.emit(data, text)
