"""``modsync gc``: remove bodies nothing has referred to for the retention period."""
from __future__ import annotations

import argparse

from ..errors import EXIT_ERROR
from .config import ConfigError
from .options import add_verb
from .output import error_line, human_size, plural

DOC = """\
remove message bodies that nothing has referred to for DAYS days

Expunging never deletes a body: a replica, a backup or an undo may still
want it.  Each run marks bodies that no message or sieve script refers to,
and removes those marked at least --retention days ago (default 7; config
[gc] retention_days), so a body goes on the first run that many days after
it became unreferenced.  Pack files that became mostly empty are rewritten.
Safe while the store is in use.

example:
  modsync gc --store /srv/modsync --retention 30
"""


def days(text: str) -> float:
    try:
        n = float(text)
    except ValueError:
        n = -1
    if not 0 <= n < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of days, 0 or more")
    return n


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "gc", run, DOC)
    p.add_argument("--retention", type=days, metavar="DAYS",
                   help="keep unreferenced bodies this many days (default 7)")


def run(ctx) -> int:
    retention = ctx.setting(ctx.args.retention, "gc.retention_days", 7)
    if not 0 <= retention < 1e6:
        raise ConfigError(f"gc.retention_days {retention}: give a number of days, 0 or more")
    from ..gc import collect
    report = collect(ctx.store(), retention=retention * 86400)
    data = dict(report.as_dict(), retention_days=retention)

    def text():
        if ctx.out.quiet:
            return
        ctx.out.line(f"marked {plural(report.marked, 'body', 'bodies')} unreferenced; removed "
                     f"{report.removed} ({human_size(report.removed_bytes)}); packs: "
                     f"{report.packs_rewritten} rewritten, {report.packs_deleted} deleted; "
                     f"reclaimed {human_size(report.reclaimed_bytes)}")
    ctx.out.emit(data, text, ok=not report.errors)
    for e in report.errors:
        error_line(e)
    return EXIT_ERROR if report.errors else 0
