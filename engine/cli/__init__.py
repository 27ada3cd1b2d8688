"""The ``modsync`` command: a thin layer over ``engine.store`` with one module per verb.

Usage: ``modsync [global options] VERB [options]``; global options may also
follow the verb (``modsync status --json`` = ``modsync --json status``).
``modsync VERB --help`` documents each verb; docs/cli.md is the reference.

Verbs::

    init         create a store in an empty directory
    import       import a Maildir (all folders) or an mbox file for a user
    export       write a user's mail out as a Maildir++ tree
    mailbox      create, rename, delete, list a user's mailboxes
    save         append one message, read byte-exact from stdin; prints its UID
    fetch        write one message's body, byte-exact, to stdout
    flags        add, remove or replace flags on a UID set
    expunge      expunge a UID set (tombstones stay until `expire`)
    copy, move   copy or move a UID set to another mailbox
    subscribe, unsubscribe
                 a user's mailbox subscriptions
    seen         per-user seen sets for mailboxes the user reads but does not own
    sieve        put, get, list, activate, deactivate, delete sieve scripts
    acl          set, delete, list RFC 4314 rights on a mailbox
    metadata     set, unset, list RFC 5464 mailbox annotations
    quota        set, delete, list quota roots
    status       per user: modseq and digest; per mailbox: ids, counters, CRC
    changes      everything that changed for a user since a modseq
    state        a token describing a user's state here (for `diff --since`)
    diff         write an offline diff file for a receiver in a given state
    apply        verify and apply a diff file (merging if both sides changed)
    sync         two-way sync with another local store
    verify       recompute and compare everything kept incrementally (read-only)
    gc           remove bodies unreferenced for longer than the retention period
    expire       drop a user's tombstones below a modseq

Exit codes::

    0    success
    1    error: the operation failed (no such store, user, mailbox, ...)
    2    usage: the command line (or a name, UID set, flag) is malformed
    3    rejected: a change set or diff was refused (the reason and the next
         step are printed), or part of an import's input was refused
    4    damaged: the store contradicts itself (verify found problems; a
         body failed its hash check)
    130  interrupted (Ctrl-C)
    141  stdout closed early (e.g. piped into `head`); nothing is printed

Every failure ends with one line ``modsync: error: <message>`` on stderr;
with ``--json`` an object ``{"command", "ok": false, "error", "message",
"exit_code"}`` is written to stdout as well.

Settings come from, in order of precedence: flags, then environment
(``MODSYNC_STORE``, ``MODSYNC_LOG_LEVEL``, ``MODSYNC_CONFIG``), then the
config file (see ``engine.cli.config``), then built-in defaults.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, ModsyncError
from . import config as config_mod
from .options import (Context, Parser, UsageProblem, add_global_options, global_parent,
                      merge_globals, setup_logging, teardown_logging)
from .output import PROG, Output, error_line

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

log = logging.getLogger("modsync.cli")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    from ..store import SCHEMA_VERSION
    try:
        v = version("modsync")
    except PackageNotFoundError:
        v = "(not installed)"
    return f"{PROG} {v} (store schema {SCHEMA_VERSION})"


class _Version(argparse.Action):
    """``--version``, worked out only when asked for (it loads the store module and the
    package metadata, which no other command needs up front)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show program's version number and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(_version() + "\n", sys.stdout)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from . import (account, acl, backup, changes, exchange, expire, gc, importexport, init,
                   mailbox, messages, metadata, quota, replicate, seen, serve, sieve, status,
                   subscriptions, verify)
    parser = Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replication and backup engine for mail stores.",
        epilog="Run `modsync VERB --help` for a verb's options.  Exit codes: 0 ok, 1 error, "
               "2 usage, 3 rejected or input refused, 4 store damaged, 130 interrupted, 141 stdout closed.  "
               "Reference: docs/cli.md.")
    add_global_options(parser, after_verb=False)
    parser.add_argument("--version", action=_Version)
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True,
                                       title="verbs")
    parents = [global_parent()]
    for module in (init, importexport, mailbox, messages, subscriptions, seen, sieve, acl,
                   metadata, quota, status, changes, exchange, serve, replicate, account,
                   backup, verify, gc, expire):
        module.register(subparsers, parents)
    return parser


def _command_name(parser: argparse.ArgumentParser) -> str:
    """'mailbox create' from the prog of the (sub)parser that refused the command line."""
    return parser.prog[len(PROG) + 1:] if parser.prog.startswith(PROG + " ") else ""


def main(argv: list[str] | None = None) -> int:
    """Run one modsync command; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageProblem as e:
        e.parser.print_usage(sys.stderr)
        error_line(str(e))
        if want_json:
            Output(json_mode=True, command=_command_name(e.parser)).emit(
                {"error": "usage", "message": str(e), "exit_code": EXIT_USAGE}, ok=False)
        return EXIT_USAGE
    except SystemExit as e:   # --help, --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    merge_globals(args)
    for stream in (sys.stdout, sys.stderr):
        # A name the terminal's encoding cannot show is escaped, not a crash.
        if hasattr(stream, "reconfigure") and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")
    command = " ".join(p for p in (args.verb, getattr(args, "action", None)) if p)
    out = Output(json_mode=args.json, quiet=args.quiet, command=command)
    handlers: list = []
    ctx = None
    try:
        config = config_mod.load(args.config)
        handlers = setup_logging(args, config)
        ctx = Context(args, config, out)
        code = args.handler(ctx)
        return EXIT_OK if code is None else code
    except ModsyncError as e:
        log.debug("%s failed", command, exc_info=True)
        return _fail(out, e.as_dict(), str(e), e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`modsync changes ... | head`).  Point stdout at
        # /dev/null so the interpreter's final flush cannot fail again.
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None   # not a real file (a test's capture)
        if fd is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        return EXIT_BROKEN_PIPE
    except OSError as e:
        log.debug("%s failed", command, exc_info=True)
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or e}"
        return _fail(out, {"error": "os", "message": message}, message, EXIT_ERROR)
    except Exception as e:   # a bug: say so in one line; -vv shows the traceback
        log.debug("%s failed", command, exc_info=True)
        message = f"internal error: {type(e).__name__}: {e} (run with -vv for a traceback)"
        return _fail(out, {"error": "internal", "message": message}, message, EXIT_ERROR)
    finally:
        if ctx is not None:
            ctx.close()
        teardown_logging(handlers)


def _fail(out: Output, data: dict, message: str, code: int) -> int:
    error_line(message)
    if out.json:
        out.emit(dict(data, exit_code=code), ok=False)
    return code
