"""``modsync verify``: recompute what is kept incrementally and compare (read-only)."""
from __future__ import annotations

from ..errors import EXIT_DAMAGED
from ..progress import for_terminal
from ..verify import verify_store
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

examples:
  modsync verify --store /srv/modsync
  modsync -q verify --no-blobs || mail -s "modsync store damaged" root
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "verify", run, DOC)
    p.add_argument("--no-blobs", dest="blobs", action="store_false", default=None,
                   help="do not read bodies back (config: [verify] blobs = false)")


def run(ctx) -> int:
    check_blobs = ctx.setting(ctx.args.blobs, "verify.blobs", True)
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
