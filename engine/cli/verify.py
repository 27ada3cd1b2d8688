"""``modsync verify``: recompute what is kept incrementally and compare (read-only)."""
from __future__ import annotations

from ..errors import EXIT_DAMAGED, UsageError
from ..progress import for_terminal
from .options import add_verb
from .output import error_line, human_size, plural

DOC = """\
check the whole store without changing it; exit 4 if anything is wrong

Recomputes every mailbox's counters and CRCs, every user's digest and
version vector, the change index and the name and unique-id indexes, and
reads every body back to check it against its hash (--no-blobs skips
that, the slow part).  Problems are listed (what, subject, message) and
nothing is repaired.

Safe to run from cron while the store is in use: it reads one consistent
snapshot.  Outside a terminal there is no progress bar, only a log line
every 10 seconds (none with -q).  Exit 0: all is well; 4: problems found.

With --archive, checks a backup archive instead (read-only): the chain of
checksums through every chunk, every point's change set, that the index
matches the chunks, and every body's hash -- all of them, or with --sample
PERCENT a random share of the body chunks, continuing across runs (the
progress is kept in ARCHIVE/verify-state.json or --state-file) until all
were read; --max-duration stops reading bodies after that many seconds,
to continue next time.  A missing or empty archive path is an error (exit
1), never reported as a sound archive.

examples:
  modsync verify --store /srv/modsync
  modsync -q verify --no-blobs || mail -s "modsync store damaged" root
  modsync verify --archive /backup/mail
  modsync verify --archive /backup/mail --sample 5 --max-duration 600 --json
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "verify", run, DOC)
    p.add_argument("--no-blobs", dest="blobs", action="store_false", default=None,
                   help="do not read bodies back (config: [verify] blobs = false)")
    p.add_argument("--archive", metavar="ARCHIVE", help="verify this backup archive instead")
    p.add_argument("--sample", type=float, metavar="PERCENT",
                   help="with --archive: read this share of the body chunks (resumable)")
    p.add_argument("--max-duration", type=float, metavar="SECONDS",
                   help="with --archive: stop reading bodies after this long (resumable)")
    p.add_argument("--state-file", metavar="FILE",
                   help="with --archive: where to keep sampling progress")


def run(ctx) -> int:
    if ctx.args.archive is not None:
        return run_archive(ctx)
    if ctx.args.sample is not None or ctx.args.max_duration is not None \
            or ctx.args.state_file is not None:
        raise UsageError("--sample, --max-duration and --state-file go with --archive")
    check_blobs = ctx.setting(ctx.args.blobs, "verify.blobs", True)
    from ..verify import verify_store
    report = verify_store(ctx.store(readonly=True), progress=for_terminal(ctx.out.quiet),
                          check_blobs=check_blobs)
    data = report.as_dict()
    data["blobs_checked"] = check_blobs
    summary = (f"{plural(report.users, 'user')}, {plural(report.mailboxes, 'mailbox', 'mailboxes')}"
               f", {plural(report.records, 'message')}"
               + (f", {plural(report.blobs, 'body', 'bodies')} ({human_size(report.blob_bytes)})"
                  if check_blobs else ", bodies not read")
               + f" in {report.seconds:.1f} s")

    def text():
        if report.ok:
            if not ctx.out.quiet:
                ctx.out.line(f"ok: {summary}")
            return
        ctx.out.table(["WHAT", "SUBJECT", "PROBLEM"],
                      [[p.what, p.subject, p.message] for p in report.problems])
    ctx.out.emit(data, text, ok=report.ok)
    if not report.ok:
        error_line(f"store {ctx.store_path()} is damaged: "
                   f"{plural(len(report.problems), 'problem')} ({summary})")
        return EXIT_DAMAGED
    return 0


def run_archive(ctx) -> int:
    from ..backup import verify as verify_backup
    from .backup import open_archive
    args = ctx.args
    if args.blobs is False:
        raise UsageError("--no-blobs is for stores; for an archive use --sample PERCENT")
    if args.max_duration is not None and args.max_duration <= 0:
        raise UsageError("--max-duration must be above 0 seconds")
    archive = open_archive(ctx, args.archive, readonly=True)
    try:
        report = verify_backup(archive, sample=args.sample, max_duration=args.max_duration,
                               state_file=args.state_file, progress=for_terminal(ctx.out.quiet))
    finally:
        archive.close()
    data = report.as_dict()
    read = (f"{report.body_chunks_read} of {report.body_chunks} body chunks read"
            + (f" ({report.cycle_done}/{report.body_chunks} this cycle)"
               if report.sample is not None or args.max_duration is not None else ""))
    summary = (f"{plural(report.users, 'user')}, {plural(report.points, 'point')}, "
               f"{plural(report.chunks, 'chunk')}, {plural(report.bodies, 'body', 'bodies')}; "
               f"{read}, {plural(report.bodies_checked, 'body', 'bodies')} hashed, "
               f"{human_size(report.bytes_read)} in {report.seconds:.1f} s")

    def text():
        if report.ok:
            if not ctx.out.quiet:
                ctx.out.line(f"ok: {summary}")
                if not report.complete:
                    ctx.out.line("stopped at --max-duration; the next run continues")
                for n in report.notes:
                    ctx.out.line(f"note: {n}")
            return
        ctx.out.table(["WHAT", "SUBJECT", "PROBLEM"],
                      [[p.what, p.subject, p.message] for p in report.problems])
    ctx.out.emit(data, text, ok=report.ok)
    if not report.ok:
        error_line(f"archive {args.archive} is damaged: "
                   f"{plural(len(report.problems), 'problem')} ({summary})")
        return EXIT_DAMAGED
    return 0
