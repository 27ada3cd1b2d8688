"""Options every command shares, and turning what the caller named into engine objects.

Global options (``--json``, ``-q``, ``-v``, ``--config``, ``--store``,
``--log-file``) are accepted before and after the verb: the top-level parser
holds them with real defaults, and every verb's parser holds a copy whose
values land under ``after_<name>`` and are merged in ``merge_globals``.

``Context`` is what a verb's handler gets: the parsed arguments, the
configuration, the output, and the store, opened on first use and closed
by ``main``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import names, uidset
from ..errors import UsageError
from . import config as config_mod
from .output import PROG, Output

if TYPE_CHECKING:
    from ..store import Store


class UsageProblem(Exception):
    """argparse refused the command line; main prints it and exits 2."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so main owns every exit.

    A verb whose options need heavy modules to describe (``serve`` quotes the
    server's limits) adds them in a ``configure(parser)`` function, run when
    the verb's parser is first used, so that other commands and
    ``modsync --help`` do not load those modules.
    """

    configure: Callable | None = None

    def ensure_configured(self) -> None:
        configure, self.configure = self.configure, None
        if configure is not None:
            configure(self)

    def parse_known_args(self, args=None, namespace=None):
        self.ensure_configured()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self.ensure_configured()
        return super().format_help()

    def format_usage(self):
        self.ensure_configured()
        return super().format_usage()

    def error(self, message):
        raise UsageProblem(self, message)


# name, flags, keyword arguments (without dest/default).
GLOBAL_OPTIONS = (
    ("json", ("--json",), dict(action="store_true",
                               help="machine output: one JSON object on stdout")),
    ("quiet", ("-q", "--quiet"), dict(action="store_true",
                                      help="no progress and no confirmations; errors only")),
    ("verbose", ("-v", "--verbose"), dict(action="count",
                                          help="log more to stderr (-v info, -vv debug)")),
    ("config", ("-c", "--config"), dict(metavar="FILE",
                                        help="config file (default: $MODSYNC_CONFIG, else "
                                             "/etc/modsync/modsync.toml if it exists)")),
    ("store", ("--store",), dict(metavar="PATH",
                                 help="the store directory (default: $MODSYNC_STORE, else "
                                      "`store` in the config file)")),
    ("log_file", ("--log-file",), dict(metavar="FILE",
                                       help="append log lines to FILE instead of stderr")),
)
GLOBAL_DEFAULTS = {"json": False, "quiet": False, "verbose": 0, "config": None, "store": None,
                   "log_file": None}


def add_global_options(parser: argparse.ArgumentParser, *, after_verb: bool) -> None:
    group = parser.add_argument_group("global options")
    for name, flags, kwargs in GLOBAL_OPTIONS:
        if after_verb:
            group.add_argument(*flags, dest="after_" + name, default=argparse.SUPPRESS, **kwargs)
        else:
            group.add_argument(*flags, dest=name, default=GLOBAL_DEFAULTS[name], **kwargs)


def merge_globals(args: argparse.Namespace) -> None:
    """Fold options given after the verb into those given before it (after wins; -v adds up)."""
    for name, _flags, _kwargs in GLOBAL_OPTIONS:
        after = "after_" + name
        if hasattr(args, after):
            value = getattr(args, after)
            delattr(args, after)
            if name == "verbose":
                value += getattr(args, name) or 0
            setattr(args, name, value)


def global_parent() -> argparse.ArgumentParser:
    parent = Parser(add_help=False)
    add_global_options(parent, after_verb=True)
    return parent


class VerbHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; the usage line without the global options (help lists them)."""

    def add_usage(self, usage, actions, groups, prefix=None):
        actions = [a for a in actions if not a.dest.startswith("after_")]
        super().add_usage(usage, actions, groups, prefix)


def add_verb(subparsers, parents, name: str, handler: Callable | None, doc: str, *,
             configure: Callable | None = None, **kwargs) -> argparse.ArgumentParser:
    """A verb's parser; ``doc``'s first line is its one-line help, the rest its description.

    ``configure(parser)``, if given, adds the verb's options when the parser
    is first used (see ``Parser``)."""
    summary, _, body = textwrap.dedent(doc).strip().partition("\n")
    parser = subparsers.add_parser(
        name, parents=parents, help=summary, description=(summary + "\n" + body).strip(),
        formatter_class=VerbHelpFormatter, **kwargs)
    if handler is not None:
        parser.set_defaults(handler=handler)
    if configure is not None:
        parser.configure = configure
    return parser


def add_user(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("-u", "--user", required=required, metavar="USER",
                        help="the user whose data to work on" + ("" if required else
                                                                  " (default: all users)"))


def add_mailbox(parser: argparse.ArgumentParser, *, help: str = "the mailbox") -> None:
    parser.add_argument("-m", "--mailbox", required=True, metavar="MAILBOX", help=help)


def nonnegative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    if n > MAX_NUMBER:
        raise argparse.ArgumentTypeError(f"{text} is too large (at most 2^63-1)")
    return n


# Modseqs, dates and limits are 63-bit in the store (msgpack signed 64-bit).
MAX_NUMBER = (1 << 63) - 1


# -- logging ----------------------------------------------------------------------

class _Formatter(logging.Formatter):
    """'modsync: warning: ...' (and a traceback, when one is logged at -vv)."""

    def format(self, record):
        text = f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


LOGGERS = ("modsync", "engine")


def setup_logging(args, config: config_mod.Config) -> list[logging.Handler]:
    """Level: -v/-vv > $MODSYNC_LOG_LEVEL > config log_level > warning; -q: errors only.

    Progress lines (``modsync.progress``, info) are shown unless --quiet, so
    long runs outside a terminal (cron, systemd) stay visible.
    """
    if args.verbose:
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    elif args.quiet:
        level = logging.ERROR
    else:
        name = os.environ.get(config_mod.ENV_LOG_LEVEL) or config.get("log_level") or "warning"
        if name.lower() not in config_mod.LOG_LEVELS:
            raise config_mod.ConfigError(f"{config_mod.ENV_LOG_LEVEL}={name!r}: use one of "
                                         f"{', '.join(config_mod.LOG_LEVELS)}")
        level = getattr(logging, name.upper())
    log_file = args.log_file or config.get("log_file")
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("modsync.progress").setLevel(
        logging.ERROR if args.quiet else min(level, logging.INFO))
    return [handler]


def teardown_logging(handlers: list[logging.Handler]) -> None:
    for handler in handlers:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()


# -- the context a handler gets ------------------------------------------------------

class Context:
    """The arguments, configuration and output of one command, and its store."""

    def __init__(self, args: argparse.Namespace, config: config_mod.Config, out: Output):
        self.args = args
        self.config = config
        self.out = out
        self._store: Store | None = None

    def setting(self, flag_value, key: str, default):
        """A flag's value if given, else the config file's, else the default."""
        if flag_value is not None:
            return flag_value
        return self.config.get(key, default)

    def store_path(self) -> Path:
        """--store, else $MODSYNC_STORE, else the config file's ``store``."""
        path = (self.args.store or os.environ.get(config_mod.ENV_STORE)
                or self.config.get("store"))
        if not path:
            raise UsageError("no store given: use --store PATH, set MODSYNC_STORE, or set "
                             "`store` in the config file")
        return Path(path).expanduser()

    def store(self, *, readonly: bool = False) -> Store:
        if self._store is None:
            from ..store import Store
            self._store = Store.open(self.store_path(), readonly=readonly)
        return self._store

    @property
    def user(self) -> str:
        return names.user(self.args.user)

    def uid_ranges(self, mailbox: str, text: str) -> list[tuple[int, int]]:
        """A UID set; ``*`` stands for the highest UID the mailbox has given out."""
        star = None
        if "*" in text:
            star = self.store().mailbox(self.user, mailbox).uidnext - 1
        return uidset.parse(text, star=star)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
