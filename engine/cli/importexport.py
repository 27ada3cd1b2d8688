"""``modsync import`` and ``modsync export``: Maildir and mbox in and out.

The work is done by ``engine.maildir`` and ``engine.mbox``; they are
imported when the verb runs, so every other verb works in a build without
them, and these verbs say plainly that they are missing.
"""
from __future__ import annotations

import importlib

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

examples:
  modsync import --store /srv/modsync -u alice --maildir /home/alice/Maildir
  modsync import -u alice --mbox archive-2019.mbox --mailbox Archive/2019
"""

EXPORT_DOC = """\
write a user's mail out as a Maildir++ tree

INBOX goes to DIR itself, every other mailbox to DIR/.Name.Sub, flags into
the file names and dovecot-keywords.  Message files are byte-exact copies of
the stored bodies.  Messages that cannot be written are listed and the exit
code is 3.

example:
  modsync export --store /srv/modsync -u alice --maildir /tmp/alice-Maildir
"""


class Unavailable(ModsyncError):
    """A verb whose engine module is not part of this build."""

    code = "unavailable"


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "import", run_import, IMPORT_DOC)
    add_user(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--maildir", metavar="DIR", help="a Maildir++ directory")
    source.add_argument("--mbox", metavar="FILE", help="an mbox file (needs --mailbox)")
    p.add_argument("-m", "--mailbox", metavar="MAILBOX", help="with --mbox: the target mailbox")

    p = add_verb(subparsers, parents, "export", run_export, EXPORT_DOC)
    add_user(p)
    p.add_argument("--maildir", metavar="DIR", required=True,
                   help="where to write the Maildir++ tree")


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


def run_export(ctx) -> int:
    export_maildir = engine_module("maildir", "Maildir export").export_maildir
    report = export_maildir(ctx.store(readonly=True), ctx.user, ctx.args.maildir,
                            progress=for_terminal(ctx.out.quiet))
    return _report(ctx, "item", {"maildir": ctx.args.maildir}, report)


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
