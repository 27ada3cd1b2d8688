"""``modsync push``, ``pull`` and ``drain``: replicate with a `modsync serve` over the network.

The network client and the replication engine are imported when a verb
runs, so that the other verbs (and ``--help``) do not load them."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from ..errors import EXIT_ERROR, UsageError
from ..progress import for_terminal
from .options import add_verb
from .output import error_line, plural

ENV_ACCOUNT = "MODSYNC_ACCOUNT"
ENV_PASSWORD = "MODSYNC_PASSWORD"
ENV_PASSWORD_FILE = "MODSYNC_PASSWORD_FILE"

PUSH_DOC = """\
send this store's changes to a replica (`modsync serve`), once or continuously

For each user (every user, or those given with --user), the change set the
replica lacks is built against the replica's last acknowledged state and
sent without asking first; if the replica changed meanwhile it answers
with its own changes, which are merged here and sent again.  A user the
replica has locked (a backup being verified, an admin holding it) is
skipped and retried; it never holds up the others.

--rolling keeps running: every commit (recorded with an intent to
replicate it, in the same transaction) is sent within milliseconds;
commits made while a push is in flight go together in the next one.
Stops on SIGTERM or Ctrl-C.

--csync HOST:PORT --user U pushes to a Cyrus replica instead (engine.csync).

Log in with --account and a password from --password-file, $MODSYNC_PASSWORD
or $MODSYNC_PASSWORD_FILE.

exit codes: 0 every user sent (or nothing to send), 1 some user was not
(named in the output), 2 usage.

examples:
  modsync push --store /srv/modsync --to replica.example.org:4190 --account repl \\
      --password-file /etc/modsync/repl.pw --tls
  modsync push --to 10.0.0.2:4190 --user alice --rolling
  modsync push --csync cyrus.example.org:2005 --user alice --csync-user admin \\
      --csync-password-file /etc/modsync/cyrus.pw
"""

PULL_DOC = """\
fetch a master's changes into this store, once or following them as they happen

Asks the master (`modsync serve`) for each user's changes since this
store's own state; the master keeps no record of its replicas.  Changes
made here meanwhile are merged (master/master).  Without --user, every user
the account may replicate.

--follow stays connected: the master announces each commit (IDLE-style)
and the change is pulled at once.  Stops on SIGTERM or Ctrl-C.

examples:
  modsync pull --store /srv/replica --from master:4190 --account repl --password-file pw
  modsync pull --from master:4190 --user alice --follow
"""

DRAIN_DOC = """\
push everything pending and succeed only when the replica has it all

The safe step before a failover: pushes every user (or --user), retrying
locked users until --drain-timeout, then asks the replica for each user's
state.  Exit 0 only if the replica holds everything this store holds;
otherwise exit 1 and name each user left, how far behind and why.

example:
  modsync drain --store /srv/modsync --to replica:4190 --account repl --password-file pw
"""


def _auth_options(p) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--account", metavar="NAME",
                   help=f"account on the server (default: ${ENV_ACCOUNT})")
    g.add_argument("--password-file", metavar="FILE",
                   help=f"file whose first line is the password (default: ${ENV_PASSWORD}, "
                        f"else ${ENV_PASSWORD_FILE})")
    g.add_argument("--tls", action="store_true", help="use TLS, verifying with the system's CAs")
    g.add_argument("--tls-ca", metavar="FILE", help="use TLS, verifying against this CA")
    g.add_argument("--tls-insecure", action="store_true",
                   help="use TLS without verifying the server (tests only)")
    g.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="network timeout in seconds (default 60)")
    p.add_argument("-u", "--user", action="append", dest="users", metavar="USER",
                   help="only this user (repeatable; default: all users)")
    p.add_argument("--allow-mass-delete", action="store_true",
                   help="allow change sets that remove more than half of a user's mail")


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "push", run_push, PUSH_DOC)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="HOST:PORT", help="the replica (or unix:/path)")
    target.add_argument("--csync", metavar="HOST:PORT", help="a Cyrus replica (sync_server)")
    p.add_argument("--rolling", action="store_true", help="keep pushing new changes until stopped")
    p.add_argument("--ack", choices=("received", "durable", "applied"), default="applied",
                   help="when the replica acknowledges (default applied)")
    p.add_argument("--csync-user", metavar="NAME", help="the Cyrus admin to authenticate as")
    p.add_argument("--csync-password-file", metavar="FILE", help="that admin's password")
    _auth_options(p)

    p = add_verb(subparsers, parents, "pull", run_pull, PULL_DOC)
    p.add_argument("--from", dest="source", required=True, metavar="HOST:PORT",
                   help="the master (or unix:/path)")
    p.add_argument("--follow", action="store_true",
                   help="stay connected and pull each change as the master announces it")
    _auth_options(p)

    p = add_verb(subparsers, parents, "drain", run_drain, DRAIN_DOC)
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the replica (or unix:/path)")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="give up on locked users after this long (default 60)")
    _auth_options(p)


def _password(path: str | None) -> str:
    if path is None:
        if os.environ.get(ENV_PASSWORD):
            return os.environ[ENV_PASSWORD]
        path = os.environ.get(ENV_PASSWORD_FILE)
    if not path:
        raise UsageError(f"no password: give --password-file FILE, or set ${ENV_PASSWORD} or "
                         f"${ENV_PASSWORD_FILE}")
    try:
        return Path(path).read_text(encoding="utf-8").split("\n", 1)[0].removesuffix("\r")
    except OSError as e:
        raise UsageError(f"password file {path}: {e.strerror}") from None


def connector(ctx, address: str):
    """A function that opens a logged-in Client to ``address`` with the command's options."""
    from ..client import Client, client_tls_context, parse_address
    a = ctx.args
    parse_address(address)
    account = a.account or os.environ.get(ENV_ACCOUNT)
    if not account:
        raise UsageError(f"no account: give --account NAME or set ${ENV_ACCOUNT}")
    password = _password(a.password_file)
    tls = None
    if a.tls or a.tls_ca or a.tls_insecure:
        tls = client_tls_context(ca=a.tls_ca, insecure=a.tls_insecure)

    def connect():
        return Client(address, account=account, password=password, tls=tls, timeout=a.timeout)
    return connect


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def _table(ctx, outcomes) -> None:
    ctx.out.table(["USER", "STATUS", "WRITTEN", "DETAIL"],
                  [[o.user, o.status, o.written, o.detail] for o in outcomes])


# -- push ---------------------------------------------------------------------------------------
def run_push(ctx) -> int | None:
    if ctx.args.csync:
        return _push_csync(ctx)
    from ..replication import Pusher
    store = ctx.store()
    pusher = Pusher(store, connector(ctx, ctx.args.to), address=ctx.args.to, ack=ctx.args.ack,
                    allow_mass_delete=ctx.args.allow_mass_delete)
    users = ctx.args.users
    totals = None
    try:
        if ctx.args.rolling:
            stop = _stop_on_signals()
            totals = {"sent": 0, "nothing": 0, "locked": 0, "error": 0}
            last: dict = {}

            def on_pass(report):
                for o in report.outcomes:
                    totals[o.status] = totals.get(o.status, 0) + 1
                    last[o.user] = o
            pusher.rolling(stop, users=users, on_pass=on_pass)
            outcomes = list(last.values())
        else:
            outcomes = pusher.push_once(users).outcomes
    finally:
        pusher.disconnect()
    ok = ctx.args.rolling or all(o.status in ("sent", "nothing") for o in outcomes)
    data = {"to": ctx.args.to, "peer": pusher.book.peer_id if pusher.book else None,
            "rolling": ctx.args.rolling, "users": [o.as_dict() for o in outcomes]}
    if totals is not None:
        data["totals"] = totals

    def text():
        if outcomes:
            _table(ctx, outcomes)
        left = [o for o in outcomes if o.status not in ("sent", "nothing")]
        ctx.out.line(f"pushed to {ctx.args.to}: "
                     f"{plural(sum(o.status == 'sent' for o in outcomes), 'user')} sent"
                     + (f", not sent: {', '.join(o.user for o in left)}" if left else ""))
    ctx.out.emit(data, text, ok=ok)
    return None if ok else _not_all(outcomes, "pushed")


def _not_all(outcomes, done: str) -> int:
    """The final error line of a push or pull that left users out; EXIT_ERROR."""
    left = [o for o in outcomes if o.status not in ("sent", "nothing")]
    error_line(f"{plural(len(left), 'user')} not {done} ({', '.join(o.user for o in left)}); "
               f"the table above (or --json) says why for each")
    return EXIT_ERROR


def _push_csync(ctx) -> int | None:
    a = ctx.args
    if not a.users or len(a.users) != 1:
        raise UsageError("--csync pushes one user: give --user U")
    try:
        from engine import csync
    except ImportError as e:
        raise UsageError(f"--csync needs the Cyrus replication module engine.csync, which "
                         f"this modsync does not have ({e})") from None
    from ..client import parse_address
    _, host, port = parse_address(a.csync)
    authname = a.csync_user or a.account or os.environ.get(ENV_ACCOUNT)
    if not authname:
        raise UsageError("--csync needs --csync-user NAME (the Cyrus admin)")
    password = _password(a.csync_password_file or a.password_file)
    store = ctx.store()
    report = csync.push_user(store, a.users[0], host, port, authname=authname,
                             password=password, progress=for_terminal(ctx.out.quiet))
    d = report.as_dict() if hasattr(report, "as_dict") else dict(report)
    ok = bool(d.get("ok", True))
    ctx.out.emit({"csync": a.csync, "user": a.users[0], "report": d},
                 f"pushed {a.users[0]} to Cyrus at {a.csync}", ok=ok)
    if not ok:
        error_line(f"the Cyrus replica at {a.csync} did not take all of {a.users[0]!r}: "
                   f"{d.get('error') or 'see the report'}")
        return EXIT_ERROR
    return None


# -- pull ---------------------------------------------------------------------------------------
def run_pull(ctx) -> int | None:
    from ..replication import Puller
    store = ctx.store()
    puller = Puller(store, connector(ctx, ctx.args.source), address=ctx.args.source,
                    allow_mass_delete=ctx.args.allow_mass_delete)
    try:
        if ctx.args.follow:
            stop = _stop_on_signals()
            last: dict = {}
            puller.follow(stop, users=ctx.args.users,
                          on_pull=lambda o: last.__setitem__(o.user, o))
            outcomes = list(last.values())
        else:
            outcomes = puller.pull_once(ctx.args.users).outcomes
    finally:
        puller.disconnect()
    ok = all(o.status in ("sent", "nothing") for o in outcomes)
    data = {"from": ctx.args.source, "peer": puller.book.peer_id if puller.book else None,
            "follow": ctx.args.follow, "users": [o.as_dict() for o in outcomes]}

    def text():
        if outcomes:
            _table(ctx, outcomes)
        ctx.out.line(f"pulled from {ctx.args.source}: "
                     f"{plural(sum(o.status == 'sent' for o in outcomes), 'user')} updated")
    ctx.out.emit(data, text, ok=ok)
    return None if ok else _not_all(outcomes, "pulled")


# -- drain --------------------------------------------------------------------------------------
def run_drain(ctx) -> int | None:
    from ..replication import Pusher
    store = ctx.store()
    pusher = Pusher(store, connector(ctx, ctx.args.to), address=ctx.args.to,
                    allow_mass_delete=ctx.args.allow_mass_delete)
    try:
        report = pusher.drain(ctx.args.users, timeout=ctx.args.drain_timeout)
    finally:
        pusher.disconnect()
    data = {"to": ctx.args.to, "peer": pusher.book.peer_id if pusher.book else None,
            "complete": report.complete, "users": report.users,
            "left": [{"user": u, "why": w} for u, w in sorted(report.left.items())]}

    def text():
        if report.complete:
            ctx.out.line(f"drained: {ctx.args.to} has everything "
                         f"({plural(len(report.users), 'user')})")
        else:
            ctx.out.line(f"NOT drained: {ctx.args.to} lacks changes of "
                         f"{plural(len(report.left), 'user')}:")
            for u, w in sorted(report.left.items()):
                ctx.out.line(f"  {u}: {w}")
    ctx.out.emit(data, text, ok=report.complete)
    if not report.complete:
        error_line(f"{ctx.args.to} is not up to date for {plural(len(report.left), 'user')} "
                   f"({', '.join(sorted(report.left))}): do not fail over yet")
        return EXIT_ERROR
    return None
