"""``modsync import`` and ``modsync export``: Maildir and mbox in and out.

The work is done by ``engine.maildir`` and ``engine.mbox``; they are
imported when the verb runs, so every other verb works in a build without
them, and these verbs say plainly that they are missing.  The ``--archive``
forms (one user's backup as a portable file) are ``engine.backup``'s.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import EXIT_REJECTED, ModsyncError, UsageError
from ..progress import for_terminal
from .options import add_user, add_verb
from .output import error_line, human_size, plural

IMPORT_DOC = """\
import a Maildir (all folders) or an mbox file for a user

--maildir DIR imports a Maildir++ tree: DIR itself becomes INBOX and each
.Folder.Sub below it the mailbox Folder/Sub; flags come from the file
names (:2,FRS...) and dovecot-keywords.  --mbox FILE imports one mbox file
into --mailbox.  The user is created if needed.  Bodies are stored
byte-exact; a message already in the store is not stored twice.

Files that cannot be read or parsed are refused and listed; the rest is
imported and the exit code is 3.

With FILE (a file written by `modsync export --archive`), takes one user's
backup into an archive (--archive B: its points in time and bodies; points
the archive has already are skipped, a history that does not continue the
archive's is refused unless -u gives the user another name) or into a store
(--store: the user's latest state, restored as `modsync restore` does).

examples:
  modsync import --store /srv/modsync -u alice --maildir /home/alice/Maildir
  modsync import -u alice --mbox archive-2019.mbox --mailbox Archive/2019
  modsync import --archive /backup/site-b alice.msexport
  modsync import --store /srv/modsync alice.msexport
"""

EXPORT_DOC = """\
write a user's mail out as a Maildir++ tree

INBOX goes to DIR itself, every other mailbox to DIR/.Name.Sub, flags into
the file names and dovecot-keywords.  Message files are byte-exact copies of
the stored bodies.  Messages that cannot be written are listed and the exit
code is 3.

With --archive, writes one user's backup (every point in time, and the
bodies they use, nothing of other users) as one portable, checksummed file
for `modsync import` on another machine.

examples:
  modsync export --store /srv/modsync -u alice --maildir /tmp/alice-Maildir
  modsync export --archive /backup/mail -u alice --out alice.msexport
"""


class Unavailable(ModsyncError):
    """A verb whose engine module is not part of this build."""

    code = "unavailable"


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "import", run_import, IMPORT_DOC)
    p.add_argument("-u", "--user", metavar="USER",
                   help="the user whose data to work on (with FILE and --archive: import "
                        "under this name)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--maildir", metavar="DIR", help="a Maildir++ directory")
    source.add_argument("--mbox", metavar="FILE", help="an mbox file (needs --mailbox)")
    p.add_argument("-m", "--mailbox", metavar="MAILBOX", help="with --mbox: the target mailbox")
    p.add_argument("file", nargs="?", metavar="FILE",
                   help="an export file from `modsync export --archive`")
    p.add_argument("--archive", metavar="ARCHIVE",
                   help="with FILE: import into this archive (created if missing)")
    p.add_argument("--at", metavar="WHEN",
                   help="with FILE into a store: the point to restore (default: latest)")
    p.add_argument("--append-only", action="store_true", default=None,
                   help="with --archive: open the archive append-only")

    p = add_verb(subparsers, parents, "export", run_export, EXPORT_DOC)
    add_user(p)
    p.add_argument("--maildir", metavar="DIR", help="where to write the Maildir++ tree")
    p.add_argument("--archive", metavar="ARCHIVE",
                   help="export the user's backup from this archive (needs --out)")
    p.add_argument("--out", metavar="FILE", help="with --archive: the file to write")


def engine_module(name: str, what: str):
    """engine.<name>, or Unavailable if this build does not have it."""
    full = __package__.rpartition(".")[0] + "." + name
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name != full:
            raise
        raise Unavailable(
            f"{what} is not available: this build of modsync has no {full}") from None


def run_import(ctx) -> int:
    args = ctx.args
    if args.file is not None:
        return run_import_file(ctx)
    if args.archive is not None or args.at is not None:
        raise UsageError("--archive and --at go with an export FILE")
    if not args.user:
        raise UsageError("the following arguments are required: -u/--user")
    if args.maildir is None and args.mbox is None:
        raise UsageError("one of the arguments --maildir --mbox (or an export FILE) is "
                         "required")
    if args.mbox is not None and not args.mailbox:
        raise UsageError("--mbox needs --mailbox NAME: the mailbox to import into")
    if args.maildir is not None and args.mailbox:
        raise UsageError("--mailbox goes with --mbox; a Maildir brings its own folders")
    if args.maildir is not None:
        import_maildir = engine_module("maildir", "Maildir import").import_maildir
        source = {"maildir": args.maildir}
        report = import_maildir(ctx.store(), ctx.user, args.maildir,
                                progress=for_terminal(ctx.out.quiet))
    else:
        import_mbox = engine_module("mbox", "mbox import").import_mbox
        source = {"mbox": args.mbox, "mailbox": args.mailbox}
        report = import_mbox(ctx.store(), ctx.user, args.mbox, args.mailbox,
                             progress=for_terminal(ctx.out.quiet))
    return _report(ctx, "file", source, report)


def run_import_file(ctx) -> int:
    from ..backup import import_export
    from .backup import open_or_create
    args = ctx.args
    if args.maildir is not None or args.mbox is not None or args.mailbox is not None:
        raise UsageError("an export FILE brings its own user and mail; --maildir, --mbox and "
                         "--mailbox do not go with it")
    progress = for_terminal(ctx.out.quiet)
    if args.archive is not None:
        if args.at is not None:
            raise UsageError("--at goes with --store: an archive takes every point")
        archive, _ = open_or_create(ctx, Path(args.archive).expanduser())
        try:
            report = import_export(args.file, archive=archive, as_user=args.user,
                                   progress=progress)
        finally:
            archive.close()
        target = {"archive": args.archive}
    else:
        report = import_export(args.file, store=ctx.store(), as_user=args.user, at=args.at,
                               progress=progress)
        target = {"store": str(ctx.store_path())}
    details = report.as_dict() | {"ok": True, "refused": []}

    def text():
        if ctx.out.quiet:
            return
        if report.archive is not None:
            ctx.out.line(f"{report.user} ({args.file} -> archive {args.archive}): "
                         f"{plural(report.points, 'point')} added"
                         + (f", {report.skipped_points} already there"
                            if report.skipped_points else "")
                         + f", {plural(report.bodies, 'new body', 'new bodies')}")
        else:
            r = report.restore
            ctx.out.line(f"{report.user} ({args.file} -> store): "
                         f"{plural(r['messages'], 'message')} restored ({r['mode']}) as at "
                         f"point {r['point']['point']}")
    ctx.out.emit({"user": report.user, "source": {"file": args.file}, "target": target,
                  "report": details}, text)
    return 0


def run_export(ctx) -> int:
    if ctx.args.archive is not None:
        return run_export_archive(ctx)
    if ctx.args.out is not None:
        raise UsageError("--out goes with --archive; a Maildir export takes --maildir")
    if ctx.args.maildir is None:
        raise UsageError("the following arguments are required: --maildir (or --archive "
                         "with --out)")
    export_maildir = engine_module("maildir", "Maildir export").export_maildir
    report = export_maildir(ctx.store(readonly=True), ctx.user, ctx.args.maildir,
                            progress=for_terminal(ctx.out.quiet))
    return _report(ctx, "item", {"maildir": ctx.args.maildir}, report)


def run_export_archive(ctx) -> int:
    from ..backup import export_user
    from .backup import open_archive
    args = ctx.args
    if args.maildir is not None:
        raise UsageError("--archive exports to a file (--out), not a Maildir; to get a "
                         "Maildir use `modsync restore --archive ... --maildir DIR`")
    if not args.out:
        raise UsageError("export --archive needs --out FILE")
    archive = open_archive(ctx, args.archive, readonly=True)
    try:
        report = export_user(archive, ctx.user, args.out, progress=for_terminal(ctx.out.quiet))
    finally:
        archive.close()
    details = report.as_dict() | {"ok": True, "refused": []}
    ctx.out.emit({"user": ctx.user, "source": {"archive": args.archive}, "out": args.out,
                  "report": details},
                 None if ctx.out.quiet else
                 f"{ctx.user} (archive {args.archive}) -> {args.out}: "
                 f"{plural(report.points, 'point')}, "
                 f"{plural(report.bodies, 'body', 'bodies')} ({human_size(report.body_bytes)}), "
                 f"{human_size(report.bytes)} written")
    return 0


def _report(ctx, noun: str, source: dict, report) -> int:
    """Print an ImportReport/ExportReport; exit 3 when it refused anything.

    The reports' ``refused`` entries are dicts naming the file (or mailbox)
    and the reason; their other numbers are shown as they come.
    """
    details = report.as_dict()

    def text():
        counts = ", ".join(f"{k.replace('_', ' ')} {_value(k, v)}" for k, v in details.items()
                           if k not in ("refused", "refused_count", "ok")
                           and isinstance(v, (int, float, list)) and not isinstance(v, bool))
        where = " ".join(f"{k} {v}" for k, v in source.items())
        if not ctx.out.quiet or report.refused:
            ctx.out.line(f"{ctx.user} ({where}): {counts or 'done'}")
        for r in report.refused:
            ctx.out.line(f"  refused: {_one_line(r)}")
    ctx.out.emit({"user": ctx.user, "source": source, "report": details}, text, ok=report.ok)
    if not report.ok:
        error_line(f"{plural(len(report.refused), noun)} refused")
        return EXIT_REJECTED
    return 0


def _one_line(refusal) -> str:
    """{"file": f, "reason": r} -> "f: r"."""
    if not isinstance(refusal, dict):
        return str(refusal)
    what = ", ".join(str(v) for k, v in refusal.items() if k != "reason")
    return f"{what}: {refusal['reason']}" if "reason" in refusal and what else what


def _value(key: str, v):
    if isinstance(v, list):
        return len(v)
    return human_size(v) if key.endswith("bytes") or key == "size" else v
