"""``modsync state``, ``diff``, ``apply`` and ``sync``: change sets between stores.

Two sites that can only exchange files converge like this::

    site B:  modsync state -u alice                      -> TOKEN (send it to A)
    site A:  modsync diff -u alice --since TOKEN --out a.diff
    site B:  modsync apply a.diff --counter-diff b.diff  (send b.diff back)
    site A:  modsync apply b.diff
"""
from __future__ import annotations

from ..errors import EXIT_REJECTED, NoSuchUser, UsageError
from .options import add_user, add_verb
from .output import error_line, human_size, plural

STATE_DOC = """\
print a token describing a user's state in this store

The token (a short printable string) is what a sender needs to build a
diff for this store: `modsync diff --since TOKEN`.  A user this store does
not have yet is the empty state, printed as 0.

examples:
  modsync state -u alice
"""

DIFF_DOC = """\
write a self-contained diff file for a receiver in a given state

The file holds every change the receiver (described by its state token,
or 0 for a receiver that has nothing) lacks, and the message bodies it may
need, zstd-compressed and checksummed.  Ship it by any means and run
`modsync apply` on the other side.

examples:
  modsync diff -u alice --since 0 --out alice-full.diff
  modsync diff -u alice --since "$(ssh b modsync state -u alice)" --out alice.diff
"""

APPLY_DOC = """\
verify a diff file and apply it

The file's checksum is verified first; then its changes are checked against
every legality rule (no modseq lowered, no UID reused or unexpunged, bodies
matching their hashes, ...) and applied in one transaction, or not at all.

If this store changed since the diff was made, the two are merged (the
merge is deterministic: both sites end with the same mail), unless
--no-merge is given, in which case the diff is rejected.  --counter-diff
writes this store's own changes that the sender lacks, to ship back.  A diff
made for a state this store does not have is rejected with the token the
sender must diff from.  Applying the same file twice does nothing.

exit codes: 0 applied or nothing to do, 3 rejected (the reason and what to
do next are printed), 1 other errors.

examples:
  modsync apply alice.diff
  modsync apply alice.diff --counter-diff back-to-a.diff
"""

SYNC_DOC = """\
two-way sync with another local store (master/master on one machine)

Each store's changes are sent to the other; if both changed, they are
merged and both end with the same mail (equal status digests).

examples:
  modsync sync --store /srv/a --peer /srv/b
  modsync sync --store /srv/a --peer /srv/b -u alice --json
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "state", run_state, STATE_DOC)
    add_user(p)

    p = add_verb(subparsers, parents, "diff", run_diff, DIFF_DOC)
    add_user(p)
    p.add_argument("--since", required=True, metavar="TOKEN",
                   help="the receiver's state token, or 0 for a receiver with nothing")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the diff")

    p = add_verb(subparsers, parents, "apply", run_apply, APPLY_DOC)
    p.add_argument("file", metavar="FILE", help="a diff file written by `modsync diff`")
    p.add_argument("--no-merge", action="store_true",
                   help="reject the diff if this store changed since it was made")
    p.add_argument("--counter-diff", metavar="OUT",
                   help="write this store's changes the sender lacks to OUT")
    p.add_argument("--allow-mass-delete", action="store_true",
                   help="allow a diff that removes more than half of the user's mail")

    p = add_verb(subparsers, parents, "sync", run_sync, SYNC_DOC)
    p.add_argument("--peer", required=True, metavar="PATH", help="the other store")
    add_user(p, required=False)
    p.add_argument("--allow-mass-delete", action="store_true",
                   help="allow syncing a change that removes more than half of a user's mail")


def _state(store, user: str) -> dict:
    from ..changeset import state_of
    try:
        return state_of(store, user)
    except NoSuchUser:
        return {}


def run_state(ctx) -> None:
    store = ctx.store(readonly=True)
    vv = _state(store, ctx.user)
    from ..changeset import encode_token
    token = encode_token(ctx.user, vv) if vv else "0"
    ctx.out.emit({"user": ctx.user, "token": token, "store_id": store.id}, token)


def run_diff(ctx) -> None:
    from ..changeset import decode_token
    from ..difffile import write_diff
    store = ctx.store(readonly=True)
    user_in_token, base = decode_token(ctx.args.since)
    if user_in_token is not None and user_in_token != ctx.user:
        raise UsageError(f"the token describes user {user_in_token!r}, not {ctx.user!r}")
    store.user_info(ctx.user)   # NoSuchUser with its message
    cs, size = write_diff(store, ctx.user, base, ctx.args.out)
    ctx.out.emit({"user": ctx.user, "out": ctx.args.out, "items": len(cs.items),
                  "bodies": len(cs.bodies), "bytes": size},
                 f"wrote {ctx.args.out}: {len(cs.items)} changes, {len(cs.bodies)} bodies, "
                 f"{human_size(size)}")


def run_apply(ctx) -> int | None:
    from ..apply import apply as apply_changes
    from ..difffile import read_diff, write_diff
    store = ctx.store()
    header, cs, bodies = read_diff(ctx.args.file)
    result = apply_changes(store, cs, bodies=bodies, merge=not ctx.args.no_merge,
                           allow_mass_delete=ctx.args.allow_mass_delete)
    counter = None
    if ctx.args.counter_diff and result.status in ("merged", "rejected"):
        ccs, size = write_diff(store, cs.user, cs.state, ctx.args.counter_diff)
        counter = {"out": ctx.args.counter_diff, "items": len(ccs.items), "bytes": size}
    data = result.as_dict() | {"file": ctx.args.file, "origin": header.origin,
                               "counter_diff": counter}
    ctx.out.emit(data, _describe(result, ctx.args.file, counter), ok=result.ok)
    if result.status == "rejected":
        error_line(f"{ctx.args.file} rejected ({result.code}): {result.reason}")
        return EXIT_REJECTED
    return None


def _describe(result, path: str, counter: dict | None) -> str:
    lines = []
    if result.status == "rejected":
        lines.append(f"rejected {path}: {result.reason}")
        if result.code == "base-unknown":
            lines.append(f"ask the sender for: modsync diff -u {result.user} --since {result.token}")
    elif result.status == "nothing":
        lines.append(f"{path}: nothing to do (already applied)")
    else:
        lines.append(f"{result.status} {path}: {plural(result.written, 'object')} written")
    if counter:
        lines.append(f"wrote {counter['out']}: {counter['items']} changes for the sender")
    lines.append(f"state: {result.token}")
    return "\n".join(lines)


def run_sync(ctx) -> int | None:
    from ..store import Store
    from ..sync import sync_stores
    store = ctx.store()
    peer = Store.open(ctx.args.peer)
    try:
        users = [ctx.args.user] if ctx.args.user else None
        if users and not any(users[0] in s.users() for s in (store, peer)):
            raise NoSuchUser(f"neither store has a user {users[0]!r}", subject=users[0])
        reports = sync_stores(store, peer, users, allow_mass_delete=ctx.args.allow_mass_delete)
    finally:
        peer.close()
    ok = all(r.converged for r in reports)
    ctx.out.emit({"peer": ctx.args.peer, "converged": ok, "users": [r.as_dict() for r in reports]},
                 lambda: ctx.out.table(["USER", "STEPS", "CONVERGED", "DIGEST"], [
                     [r.user, ", ".join(f"{d} {s}" for d, s, _ in r.steps),
                      "yes" if r.converged else "NO", r.digest] for r in reports]), ok=ok)
    if not ok:
        error_line("the stores did not converge: " + ", ".join(
            r.user for r in reports if not r.converged))
        return EXIT_REJECTED
    return None
