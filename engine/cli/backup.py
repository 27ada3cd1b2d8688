"""``modsync backup``, ``backup list``, ``restore`` and ``compact``: backup archives.

The work is done by ``engine.backup`` (operations) and ``engine.archive``
(the format); docs/backup.md is the guide, schemas/archive-v1.md the format.
``verify --archive``, ``export --archive`` and ``import FILE`` live with
their verbs (engine/cli/verify.py, engine/cli/importexport.py) and use the
helpers here.  The engine modules are imported when a verb runs, so the
other verbs do not pay for loading them.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import uidset
from ..errors import EXIT_ERROR, UsageError
from ..progress import for_terminal
from .options import add_verb, nonnegative_int
from .output import error_line, human_size, human_time, plural

BACKUP_DOC = """\
back up users' mail into an archive (a new point in time per changed user)

From a store on this machine (--store) or, with the replication protocol,
from a running server (--from HOST:PORT), so the backup host needs no
access to the mail server's disks.  Each run appends, for every user whose
mail changed, the changes since the archive's last point and the message
bodies the archive lacks (each body is stored once per archive).  Nothing in
the archive is ever rewritten, and nothing the source deletes is deleted
from it: earlier points keep it until `modsync compact` applies retention.

The archive is created on the first run if ARCHIVE does not exist (an
existing empty directory needs --init: it may be an unmounted volume).
--admin-key-file at creation locks the archive: compaction then needs that
key, and everyone else can only add (see docs/backup.md, "Append-only").

--to modsync://HOST:PORT/NAME sends the backup to archive NAME of a
`modsync serve --archives DIR` (logging in with --account and
--password-file; --tls): the backup host then holds the archive, and an
account made there with `modsync account add --append-only` may add
points but never compact, delete or rewrite anything.

Long runs show a progress bar on a terminal and a log line every 10 s
otherwise.

examples:
  modsync backup --store /srv/modsync --to /backup/mail
  modsync backup --store /srv/modsync --to /backup/mail -u alice
  modsync backup --from mail.example.org:2005 --account backup \\
      --password-file /etc/modsync/backup.pw --to /backup/mail
  modsync backup --store /srv/modsync --to modsync://backup.example.org:4190/mail \\
      --account mail1 --password-file /etc/modsync/backup.pw --tls
  modsync backup list --archive /backup/mail -u alice
"""

LIST_DOC = """\
show the points in time an archive holds (per user)

Columns: user, point number, time (UTC), the source's modseq then, full
(a base point) or incremental, changes, new bodies and their size.  Any of
these can be restored: `modsync restore --at point:K`, `--at modseq:N` or
`--at TIME`.  --archive modsync://HOST:PORT/NAME lists an archive a
`modsync serve --archives` holds (with --account, --password-file).

example:
  modsync backup list --archive /backup/mail -u alice
"""

RESTORE_DOC = """\
restore a user, a mailbox or single messages as they were at a point in time

--at picks the point: a time (2024-05-01T12:00Z, 2024-05-01 = the end of
that day, @EPOCH; UTC unless an offset is given) = the last point taken at
or before it; modseq:N = the last point whose source modseq was <= N;
point:K (see `backup list`); default the latest.  Mail expunged or
mailboxes deleted at the source are restorable from any point before the
deletion.

Targets: --store (a modsync store), --maildir DIR (a new or empty
directory; UIDs and UIDVALIDITY kept), --csync HOST:PORT (a Cyrus server,
via `engine.csync`).  Restoring into a live store never changes what is
there:
  * a whole user the store does not have is restored exactly (same mailbox
    ids, UIDs, flags; the user's digest equals the source's at that point);
  * otherwise messages are appended as new messages (new UIDs, archived
    flags, dates and annotations) to the mailbox of the same name, or to
    --into NAME (one mailbox) / NAME/<mailbox> (several); mailboxes that do
    not exist are created with a new unique id.

examples:
  modsync restore --archive /backup/mail -u alice --store /srv/new
  modsync restore --archive /backup/mail -u alice -m INBOX --uid 1200:1210 \\
      --at 2024-05-01 --store /srv/modsync --into "Restored"
  modsync restore --archive /backup/mail -u alice --guid 3f2a...e9 --maildir /tmp/one
  modsync restore --archive /backup/mail -u alice --csync cyrus.example.org:2005 \\
      --authname admin --password-file /etc/modsync/cyrus.pw
"""

COMPACT_DOC = """\
apply a retention policy: drop old points, remove unused bodies, reclaim space

A point is kept if any rule keeps it (the latest point of each user is
always kept): --keep-days N (taken in the last N days), --keep-last N,
--keep-daily N / --keep-weekly N / --keep-monthly N (the newest point of
each of the last N days / ISO weeks / months that have points).  History
before the oldest kept point is squashed into one full point; dropped
points between kept ones are merged into the next kept one, so every kept
point restores exactly as before.  Bodies no kept point uses are removed
(a body chunk is rewritten once --repack-unused percent of it is unused).

Crash-safe: new chunks are written and synced, one index transaction swaps
them in, and only then are old chunks deleted; killed at any moment, the
archive stays valid.  Refused on an append-only handle; a locked archive
needs --admin-key-file.  --archive modsync://HOST:PORT/NAME compacts an
archive a `modsync serve --archives` holds: only an admin account may.

examples:
  modsync compact --archive /backup/mail --keep-daily 14 --keep-weekly 8 --keep-monthly 12
  modsync compact --archive /backup/mail --keep-days 90 --dry-run
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "backup", run_backup, BACKUP_DOC)
    p.add_argument("--to", metavar="ARCHIVE",
                   help="the archive (created if missing): a directory, or "
                        "modsync://HOST:PORT/NAME for one a server holds")
    p.add_argument("--from", dest="source", metavar="HOST:PORT",
                   help="pull from a running modsync server instead of --store "
                        "(or unix:/path)")
    p.add_argument("-u", "--user", action="append", metavar="USER",
                   help="back up this user (repeatable; default: every user of the source)")
    add_login(p, "with --from or a modsync:// archive")
    p.add_argument("--init", action="store_true",
                   help="create the archive in an existing empty directory")
    p.add_argument("--admin-key-file", metavar="FILE",
                   help="when creating the archive: lock it with the key in FILE (a new "
                        "random key is written there if FILE does not exist)")
    add_append_only(p)
    p.add_argument("--level", type=int, default=None, metavar="N",
                   help="zstd level for new chunks (default 3; config [backup] level)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=False,
                               title="actions")
    lp = add_verb(actions, parents, "list", run_list, LIST_DOC)
    lp.add_argument("--archive", required=True, metavar="ARCHIVE",
                    help="the archive (or modsync://HOST:PORT/NAME)")
    lp.add_argument("-u", "--user", metavar="USER", help="only this user")
    add_login(lp, "with a modsync:// archive")

    p = add_verb(subparsers, parents, "restore", run_restore, RESTORE_DOC)
    p.add_argument("--archive", required=True, metavar="ARCHIVE", help="the archive")
    p.add_argument("-u", "--user", required=True, metavar="USER", help="whose mail")
    p.add_argument("-m", "--mailbox", metavar="MAILBOX",
                   help="only this mailbox (its name, or unique id, at that point)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--uid", metavar="SET", help="only these UIDs (needs --mailbox)")
    which.add_argument("--guid", metavar="HEX",
                       help="only the message with this SHA-1 (Cyrus GUID) or blake3 address")
    p.add_argument("--at", metavar="WHEN", help="TIME, modseq:N or point:K (default: latest)")
    p.add_argument("--into", metavar="NAME",
                   help="restore into this mailbox (NAME/<mailbox> when several)")
    p.add_argument("--maildir", metavar="DIR", help="target: a new Maildir++ tree")
    p.add_argument("--csync", metavar="HOST:PORT", help="target: a Cyrus server (csync)")
    p.add_argument("--authname", metavar="NAME", help="with --csync: the admin login")
    p.add_argument("--password-file", metavar="FILE",
                   help="with --csync: file holding the password (default $MODSYNC_PASSWORD)")
    p.add_argument("--tmpdir", metavar="DIR",
                   help="where to build the temporary store for --maildir/--csync")

    p = add_verb(subparsers, parents, "compact", run_compact, COMPACT_DOC)
    p.add_argument("--archive", required=True, metavar="ARCHIVE",
                   help="the archive (or modsync://HOST:PORT/NAME)")
    p.add_argument("--keep-days", type=float, metavar="N", help="keep points of the last N days")
    p.add_argument("--keep-last", type=positive_int, metavar="N", help="keep the last N points")
    p.add_argument("--keep-daily", type=positive_int, metavar="N",
                   help="keep the newest point of each of the last N days")
    p.add_argument("--keep-weekly", type=positive_int, metavar="N",
                   help="keep the newest point of each of the last N ISO weeks")
    p.add_argument("--keep-monthly", type=positive_int, metavar="N",
                   help="keep the newest point of each of the last N months")
    p.add_argument("-u", "--user", action="append", metavar="USER",
                   help="apply the rules to this user only (repeatable; default: all)")
    p.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    p.add_argument("--repack-unused", type=float, default=5.0, metavar="PERCENT",
                   help="rewrite a body chunk once this share of it is unused (default 5)")
    p.add_argument("--admin-key-file", metavar="FILE", help="the key of a locked archive")
    add_append_only(p)
    add_login(p, "with a modsync:// archive")


def add_login(p, when: str) -> None:
    """How to log in to a server: as a backup source (--from) or holding the archive."""
    p.add_argument("--account", metavar="NAME", help=f"{when}: the login name")
    p.add_argument("--password-file", metavar="FILE",
                   help=f"{when}: file holding the password (default $MODSYNC_PASSWORD)")
    p.add_argument("--tls", action="store_true", help=f"{when}: use TLS")
    p.add_argument("--ca", metavar="FILE",
                   help="with --tls: the CA certificate(s) to verify the server against")


def positive_int(text: str) -> int:
    n = nonnegative_int(text)
    if n == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def add_append_only(p) -> None:
    p.add_argument("--append-only", action="store_true", default=None,
                   help="open the archive append-only: add, never remove (also "
                        "MODSYNC_APPEND_ONLY=1, config [backup] append_only)")


# -- helpers shared with verify, export and import -----------------------------------------

def append_only(ctx) -> bool:
    flag = getattr(ctx.args, "append_only", None)
    if os.environ.get("MODSYNC_APPEND_ONLY", "") not in ("", "0"):
        return True
    return bool(ctx.setting(flag, "backup.append_only", False))


def served(path) -> bool:
    """Whether --archive / --to names an archive a server holds (see engine.archive_client)."""
    return isinstance(path, str) and path.startswith("modsync://")


def open_served(ctx, url: str, *, create: bool = False):
    """A logged-in ``engine.archive_client.RemoteArchive`` (closed by the caller)."""
    from ..archive_client import RemoteArchive
    args = ctx.args
    if not args.account:
        raise UsageError(f"{url}: give --account NAME, an account of that server (made with "
                         f"`modsync account add`, --append-only for backups)")
    secret = password(ctx)
    if secret is None:
        raise UsageError(f"{url}: give --password-file FILE (or set $MODSYNC_PASSWORD)")
    return RemoteArchive(url, account=args.account, password=secret, tls=tls_context(ctx),
                         create=create)


def tls_context(ctx):
    if not (ctx.args.tls or ctx.args.ca):
        return None
    from ..client import client_tls_context
    return client_tls_context(ca=ctx.args.ca)


def open_archive(ctx, path: str, *, readonly: bool = False, write: bool = False):
    """Open --archive PATH for this command (closed by the caller)."""
    from ..archive import Archive, read_key_file
    if served(path):
        raise UsageError(f"{path}: this command works on an archive on this machine; an "
                         f"archive a server holds can be backed up to (`backup --to`), listed "
                         f"(`backup list`) and compacted (`compact`)", subject=path)
    key_file = getattr(ctx.args, "admin_key_file", None)
    key = read_key_file(key_file) if key_file and not readonly else None
    return Archive.open(Path(path).expanduser(), readonly=readonly,
                        append_only=append_only(ctx) if write else False, admin_key=key)


def open_or_create(ctx, path: Path):
    """(archive, created): open ARCHIVE, or create it where nothing is yet."""
    from ..archive import Archive, NotAnArchive, new_key_file, read_key_file
    args = ctx.args
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        return open_archive(ctx, str(path), write=True), False
    if path.exists() and not getattr(args, "init", False):
        raise NotAnArchive(f"{path} is an empty directory, not an archive; if this is where "
                           f"the archive should be (and not an unmounted volume), add --init",
                           subject=path)
    if not path.parent.is_dir():
        raise NotAnArchive(f"{path.parent}: no such directory; check the path or the mount",
                           subject=path)
    key = None
    if getattr(args, "admin_key_file", None):
        kf = Path(args.admin_key_file)
        key = read_key_file(kf) if kf.exists() else new_key_file(kf)
    archive = Archive.create(path, admin_key=key)
    if append_only(ctx):
        archive.append_only = archive.forced_append_only = True
    return archive, True


def password(ctx) -> str | None:
    f = getattr(ctx.args, "password_file", None)
    if f:
        try:
            return Path(f).read_text().strip("\r\n")
        except OSError as e:
            raise UsageError(f"{f}: cannot read the password ({e.strerror})", subject=f)
    return os.environ.get("MODSYNC_PASSWORD")


# -- backup ---------------------------------------------------------------------------------

def run_backup(ctx) -> int | None:
    from ..backup import LocalSource, backup, remote_source
    args = ctx.args
    if not args.to:
        raise UsageError("backup needs --to ARCHIVE (or `backup list --archive ARCHIVE`)")
    if args.source and args.store:
        raise UsageError("give either --store or --from, not both")
    level = ctx.setting(args.level, "backup.level", 3)
    remote = served(args.to)
    if remote and args.source:
        raise UsageError("a backup to a served archive (modsync://) goes from a store on this "
                         "machine: give --store, not --from")
    if remote and (args.init or args.admin_key_file):
        raise UsageError(f"{args.to}: a served archive is created by the server; to lock one "
                         f"with an admin key, create it on the server's machine")
    if args.source:
        source = remote_source(args.source, account=args.account, password=password(ctx),
                               tls=tls_context(ctx))
        what = {"from": args.source}
    else:
        source = LocalSource(ctx.store(readonly=True))
        what = {"store": str(ctx.store_path())}
    where = args.to if remote else Path(args.to).expanduser()
    try:
        if remote:
            archive, created = open_served(ctx, args.to, create=True), False
        else:
            archive, created = open_or_create(ctx, where)
        try:
            report = backup(archive, source, args.user, progress=for_terminal(ctx.out.quiet),
                            level=level)
        finally:
            archive.close()
        created = created or getattr(archive, "created", False)
    finally:
        source.close()
    data = report.as_dict() | {"source": what, "created": created}

    def text():
        if ctx.out.quiet:
            return
        if created:
            ctx.out.line(f"created archive {where}")
        for u in report.users:
            if u.get("error"):
                ctx.out.line(f"{u['user']}: FAILED: {u['error']}")
            elif u.get("point") is None:
                ctx.out.line(f"{u['user']}: unchanged")
            else:
                kind = "full" if u["full"] else "incremental"
                ctx.out.line(f"{u['user']}: point {u['point']} ({kind}, modseq {u['modseq']}), "
                             f"{plural(u['items'], 'change')}, "
                             f"{plural(u['new_bodies'], 'new body', 'new bodies')} "
                             f"({human_size(u['new_bytes'])})")
        ctx.out.line(f"{plural(report.points, 'point')} added, "
                     f"{human_size(report.bytes_written)} written in {report.seconds:.1f} s")
    ctx.out.emit(data, text, ok=report.ok)
    if not report.ok:
        error_line(f"{plural(report.errors, 'user')} not backed up (the others were)")
        return EXIT_ERROR
    return None


def run_list(ctx) -> None:
    from ..backup import list_points
    if served(ctx.args.archive):
        with open_served(ctx, ctx.args.archive) as remote:
            data = remote.list_points(ctx.args.user)
    else:
        archive = open_archive(ctx, ctx.args.archive, readonly=True)
        try:
            data = list_points(archive, ctx.args.user)
        finally:
            archive.close()

    def text():
        rows = []
        for u in data["users"]:
            for p in u["points"]:
                rows.append([u["user"], p["point"], human_time(p["time"]), p["modseq"],
                             "full" if p["full"] else "incr", p["items"], p["new_bodies"],
                             human_size(p["new_bytes"])])
        if not rows:
            ctx.out.line(f"{data['archive']}: no points yet")
            return
        ctx.out.table(["USER", "POINT", "TIME", "MODSEQ", "KIND", "CHANGES", "NEW BODIES",
                       "SIZE"], rows)
    ctx.out.emit(data, text)


# -- restore --------------------------------------------------------------------------------

def run_restore(ctx) -> None:
    from ..backup import restore
    args = ctx.args
    targets = [t for t in (args.maildir, args.csync) if t]
    if len(targets) > 1 or (targets and args.store):
        raise UsageError("give one target: --store, --maildir or --csync")
    uids = None
    if args.uid is not None:
        if not args.mailbox:
            raise UsageError("--uid needs --mailbox: UIDs are per mailbox")
        uids = uidset.parse(args.uid, star=0xFFFFFFFF)
    archive = open_archive(ctx, args.archive, readonly=True)
    try:
        store = None if targets else ctx.store()
        report = restore(archive, ctx.user, at=args.at, mailbox=args.mailbox, uids=uids,
                         guid=args.guid, into=args.into, store=store, maildir=args.maildir,
                         csync=args.csync, authname=args.authname,
                         password=password(ctx) if args.csync else None,
                         progress=for_terminal(ctx.out.quiet), tmpdir=args.tmpdir)
    finally:
        archive.close()
    data = report.as_dict()

    def text():
        p = report.point
        where = " ".join(f"{k} {v}" for k, v in report.target.items())
        line = (f"restored {plural(report.messages, 'message')} ({human_size(report.bytes)}) "
                f"of {report.user} as at point {p['point']} ({human_time(p['time'])}, modseq "
                f"{p['modseq']}) into {where}: {report.mode}")
        if report.digest_ok:
            line += ", digest matches the source's"
        ctx.out.line(line)
        if report.mode == "append" and not ctx.out.quiet:
            for m in report.mailboxes:
                made = "created" if m["created"] else "existing"
                ctx.out.line(f"  {m['from']} -> {m['name']} ({made}): "
                             f"{plural(m['messages'], 'message')}")
        for s in report.skipped:
            ctx.out.line(f"  skipped {s['what']}: {s['reason']}")
    ctx.out.emit(data, text)


# -- compact --------------------------------------------------------------------------------

def run_compact(ctx) -> None:
    from ..backup import RetentionPolicy, compact
    args = ctx.args
    policy = RetentionPolicy(args.keep_days, args.keep_last, args.keep_daily, args.keep_weekly,
                             args.keep_monthly)
    if not policy.given():
        raise UsageError("compact needs a retention rule: --keep-days, --keep-last, "
                         "--keep-daily, --keep-weekly or --keep-monthly")
    if not 0 <= args.repack_unused <= 100:
        raise UsageError("--repack-unused is a percentage (0 to 100)")
    if served(args.archive):
        report = _compact_served(ctx, policy)
    else:
        archive = open_archive(ctx, args.archive, write=True)
        try:
            report = compact(archive, policy, users=args.user, dry_run=args.dry_run,
                             repack_unused=args.repack_unused / 100,
                             progress=for_terminal(ctx.out.quiet))
        finally:
            archive.close()

    def text():
        verb = "would drop" if report.dry_run else "dropped"
        ctx.out.line(f"{verb} {plural(report.points_dropped, 'point')}, "
                     f"{plural(report.bodies_dropped, 'body', 'bodies')}; "
                     f"{plural(report.points_rewritten, 'point')} rewritten")
        if not report.dry_run:
            ctx.out.line(f"{human_size(report.bytes_before)} -> {human_size(report.bytes_after)} "
                         f"in {report.seconds:.1f} s")
    ctx.out.emit(report.as_dict(), text)


def _compact_served(ctx, policy):
    from ..archive import AppendOnly, read_key_file
    args = ctx.args
    if append_only(ctx) and not args.dry_run:
        raise AppendOnly(f"{args.archive}: refusing to compact the archive: this command is "
                         f"append-only (--append-only, MODSYNC_APPEND_ONLY or [backup] "
                         f"append_only)", subject=args.archive)
    key = read_key_file(args.admin_key_file) if args.admin_key_file else None
    with open_served(ctx, args.archive) as remote:
        return remote.compact(policy, users=args.user, dry_run=args.dry_run,
                              repack_unused=args.repack_unused / 100, admin_key=key)
