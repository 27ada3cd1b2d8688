"""``modsync serve``: run the replication server of a store.

The server (asyncio, the protocol, the replication engine) is imported only
when this verb is used: its options quote the server's limits, so they are
added by ``options`` when the verb's parser is first used.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import UsageError
from . import config as config_mod
from .options import add_verb

log = logging.getLogger("modsync.cli")

DOC = """\
serve this store to replicas and masters over the network

Listens on TCP (--listen HOST:PORT, repeatable; port 0 picks a free one),
Unix sockets (--unix PATH) and, with --tls-cert/--tls-key, speaks TLS on
all of them.  Clients log in with an account (`modsync account add`) and
push change sets, pull them (`modsync pull`, `--follow` to be told of
each commit as it happens), or ask for a user's state.  Many connections
are served at once.  The listening addresses are printed when ready.

A peer that sends garbage, stalls (--stall-timeout), idles
(--idle-timeout) or sends a change set over --max-changeset is cut off
and the reason logged; nothing of an incomplete change set is applied.
Failed logins are logged and rate-limited per address and per account.

SIGTERM or Ctrl-C: stop accepting, finish commands in progress (at most
--grace seconds), then exit 0.

Synchronous replicas (--sync-replica, repeatable): a push this server
accepts is answered only once the replicas acknowledge it at --sync-level
(received, durable or applied) with --sync-quorum ("any N" of them, or
"first N" by the order given); after --sync-timeout the commit either
keeps waiting (--sync-on-timeout block) or returns, logged and recorded as
acknowledged only locally (async).  See docs/replication.md.

--csync HOST:PORT also serves Cyrus's sync_client (engine.csync).

--archives DIR also holds backup archives, DIR/NAME each, for `modsync
backup --to modsync://HOST:PORT/NAME` (docs/backup.md): admin accounts may
do anything with them; accounts made `--append-only` may only add points,
and the server opens the archive append-only for them.

Everything here can go in the config file's [serve] table (listen, unix,
csync, archives, tls_cert, tls_key, max_changeset, idle_timeout, stall_timeout,
hello_timeout, grace, auth_failures, auth_window, auth_delay,
allow_mass_delete, protocol_versions) and [serve.sync] (replicas, level,
quorum, timeout, on_timeout, account, password_file, tls_ca).

examples:
  modsync serve --store /srv/modsync --listen 0.0.0.0:4190 --tls-cert c.pem --tls-key k.pem
  modsync serve --store /srv/modsync --unix /run/modsync.sock
  modsync -c /etc/modsync/modsync.toml serve
"""

# Config keys (engine.cli.config refuses keys it does not know; each stands
# for a flag).  Registered here so that the verb and its settings live
# together.
SERVE_KEYS = {
    "serve.listen": ((list, str), "serve --listen"),
    "serve.unix": ((list, str), "serve --unix"),
    "serve.csync": ((list, str), "serve --csync"),
    "serve.archives": ((str,), "serve --archives"),
    "serve.tls_cert": ((str,), "serve --tls-cert"),
    "serve.tls_key": ((str,), "serve --tls-key"),
    "serve.max_changeset": ((int, str), "serve --max-changeset"),
    "serve.idle_timeout": ((int, float), "serve --idle-timeout"),
    "serve.stall_timeout": ((int, float), "serve --stall-timeout"),
    "serve.hello_timeout": ((int, float), "serve --hello-timeout"),
    "serve.grace": ((int, float), "serve --grace"),
    "serve.auth_failures": ((int,), "serve --auth-failures"),
    "serve.auth_window": ((int, float), "serve --auth-window"),
    "serve.auth_delay": ((int, float), "serve --auth-delay"),
    "serve.allow_mass_delete": ((bool,), "serve --allow-mass-delete"),
    "serve.protocol_versions": ((list, str), "serve --protocol-versions"),
    "serve.sync.replicas": ((list,), "serve --sync-replica"),
    "serve.sync.level": ((str,), "serve --sync-level"),
    "serve.sync.quorum": ((str,), "serve --sync-quorum"),
    "serve.sync.timeout": ((int, float), "serve --sync-timeout"),
    "serve.sync.on_timeout": ((str,), "serve --sync-on-timeout"),
    "serve.sync.account": ((str,), "serve --sync-account"),
    "serve.sync.password_file": ((str,), "serve --sync-password-file"),
    "serve.sync.tls_ca": ((str,), "serve --sync-tls-ca"),
}


def size(text) -> int:
    """'64M' -> 67108864 (K, M, G, T in binary units; plain digits are bytes)."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        n = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 4G)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    return n


def seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give a positive number of seconds")
    return v


def register(subparsers, parents) -> None:
    for key, spec in SERVE_KEYS.items():
        config_mod.KEYS.setdefault(key, spec)
    add_verb(subparsers, parents, "serve", run, DOC, configure=_options)


def _options(p) -> None:
    from .. import protocol as P
    from ..server import (
        AUTH_DELAY,
        AUTH_FAILURES,
        AUTH_WINDOW,
        HELLO_TIMEOUT,
        IDLE_TIMEOUT,
        SHUTDOWN_GRACE,
        STALL_TIMEOUT,
    )
    g = p.add_argument_group("listening")
    g.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="TCP address to listen on (repeatable)")
    g.add_argument("--unix", action="append", metavar="PATH", help="Unix socket to listen on")
    g.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    g.add_argument("--csync", action="append", metavar="HOST:PORT",
                   help="also accept Cyrus sync_client connections here")
    g.add_argument("--archives", metavar="DIR",
                   help="also serve the backup archives in DIR (DIR/NAME each; created on "
                        "the first backup to modsync://HOST:PORT/NAME)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-changeset", type=size, metavar="SIZE",
                   help=f"largest change set accepted (default "
                        f"{P.DEFAULT_MAX_CHANGESET // 1024 ** 3}G)")
    g.add_argument("--idle-timeout", type=seconds, metavar="S",
                   help=f"close connections idle this long (default {IDLE_TIMEOUT:g})")
    g.add_argument("--stall-timeout", type=seconds, metavar="S",
                   help=f"cut off a peer silent this long inside a change set "
                        f"(default {STALL_TIMEOUT:g})")
    g.add_argument("--hello-timeout", type=seconds, metavar="S",
                   help=f"time to log in (default {HELLO_TIMEOUT:g})")
    g.add_argument("--grace", type=seconds, metavar="S",
                   help=f"on SIGTERM, wait this long for work in progress "
                        f"(default {SHUTDOWN_GRACE:g})")
    g.add_argument("--auth-failures", type=int, metavar="N",
                   help=f"failed logins per address or account before refusing "
                        f"(default {AUTH_FAILURES})")
    g.add_argument("--auth-window", type=seconds, metavar="S",
                   help=f"... within this many seconds (default {AUTH_WINDOW:g})")
    g.add_argument("--auth-delay", type=float, metavar="S",
                   help=f"pause before answering a failed login (default {AUTH_DELAY:g})")
    g.add_argument("--allow-mass-delete", action="store_true", default=None,
                   help="accept change sets that remove more than half of a user's mail")
    g.add_argument("--protocol-versions", metavar="LIST",
                   help="protocol versions to speak, e.g. 1 (default: every version this "
                        "modsync knows)")
    g = p.add_argument_group("synchronous replicas")
    g.add_argument("--sync-replica", action="append", metavar="ADDRESS",
                   help="a replica that must acknowledge each accepted push (repeatable; "
                        "the order is the priority)")
    g.add_argument("--sync-level", choices=P.ACK_LEVELS,
                   help="received (in its memory), durable (fsynced) or applied "
                        "(default applied)")
    g.add_argument("--sync-quorum", metavar="'any N'|'first N'",
                   help="how many replicas must acknowledge (default 'any 1')")
    g.add_argument("--sync-timeout", type=seconds, metavar="S",
                   help="how long to wait for the quorum (default 5)")
    g.add_argument("--sync-on-timeout", choices=("block", "async"),
                   help="keep waiting, or return and record the range as acknowledged only "
                        "locally (default block)")
    g.add_argument("--sync-account", metavar="NAME",
                   help="account on the replicas (default replication)")
    g.add_argument("--sync-password-file", metavar="FILE",
                   help="file holding that account's password")
    g.add_argument("--sync-tls-ca", metavar="FILE",
                   help="connect to the replicas with TLS, verifying against this CA")


def _list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _path(ctx, value):
    """A path from the config file is relative to the file's directory."""
    if value is None or ctx.config.path is None:
        return value
    return str(Path(ctx.config.path).parent / Path(value).expanduser())


def settings_from(ctx):
    """The ``engine.server.ServerSettings`` the flags and the [serve] table give."""
    from .. import protocol as P
    from ..server import ServerSettings
    a, c = ctx.args, ctx.config
    s = ServerSettings()
    s.listen = a.listen or _list(c.get("serve.listen"))
    s.unix = a.unix or [_path(ctx, u) for u in _list(c.get("serve.unix"))]
    s.csync = a.csync or _list(c.get("serve.csync"))
    s.archives = a.archives or _path(ctx, c.get("serve.archives"))
    if s.archives is not None and not Path(s.archives).is_dir():
        raise UsageError(f"--archives {s.archives}: no such directory; create it (archives "
                         f"are made inside it on their first backup)")
    s.tls_cert = a.tls_cert or _path(ctx, c.get("serve.tls_cert"))
    s.tls_key = a.tls_key or _path(ctx, c.get("serve.tls_key"))
    if bool(s.tls_cert) != bool(s.tls_key):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    mc = a.max_changeset or c.get("serve.max_changeset")
    if mc is not None:
        try:
            s.max_changeset = mc if isinstance(mc, int) else size(mc)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"serve.max_changeset: {e}") from None
    for attr in ("idle_timeout", "stall_timeout", "hello_timeout", "grace", "auth_failures",
                 "auth_window", "auth_delay", "allow_mass_delete"):
        setattr(s, attr, ctx.setting(getattr(a, attr), f"serve.{attr}", getattr(s, attr)))
    versions = a.protocol_versions or c.get("serve.protocol_versions")
    if versions:
        try:
            vs = tuple(int(v) for v in (versions.split(",") if isinstance(versions, str)
                                        else versions))
        except (TypeError, ValueError):
            raise UsageError(f"protocol versions {versions!r}: give numbers, e.g. 1,2") from None
        unknown = set(vs) - set(P.PROTOCOL_VERSIONS)
        if unknown or not vs:
            raise UsageError(f"this modsync speaks protocol versions "
                             f"{', '.join(map(str, P.PROTOCOL_VERSIONS))}, not "
                             f"{', '.join(map(str, sorted(unknown))) or 'none'}")
        s.versions = vs
    s.sync = _sync_settings(ctx)
    return s


def _sync_settings(ctx):
    a, c = ctx.args, ctx.config
    replicas = a.sync_replica or c.get("serve.sync.replicas")
    if not replicas:
        return None
    from ..syncrep import SyncSettings, parse_replicas
    password_file = a.sync_password_file or _path(ctx, c.get("serve.sync.password_file"))
    if not password_file:
        raise UsageError("synchronous replicas need --sync-password-file (the password of "
                         "--sync-account on the replicas)")
    try:
        password = Path(password_file).read_text().split("\n", 1)[0].rstrip("\r")
    except OSError as e:
        raise UsageError(f"{password_file}: {e.strerror}") from None
    return SyncSettings(
        replicas=parse_replicas(replicas),
        level=ctx.setting(a.sync_level, "serve.sync.level", "applied"),
        quorum=ctx.setting(a.sync_quorum, "serve.sync.quorum", "any 1"),
        timeout=float(ctx.setting(a.sync_timeout, "serve.sync.timeout", 5.0)),
        on_timeout=ctx.setting(a.sync_on_timeout, "serve.sync.on_timeout", "block"),
        account=ctx.setting(a.sync_account, "serve.sync.account", "replication"),
        password=password,
        tls_ca=a.sync_tls_ca or _path(ctx, c.get("serve.sync.tls_ca")),
    )


def run(ctx) -> None:
    import asyncio

    from ..server import serve
    settings = settings_from(ctx)
    store = ctx.store()

    def ready(addresses):
        data = {"event": "listening", "store": str(store.path), "id": store.id,
                "addresses": addresses, "versions": list(settings.versions)}
        if ctx.out.json:
            ctx.out.write_json({"command": "serve", "ok": True} | data)
        else:
            for a in addresses:
                ctx.out.line(f"listening on {a}")
            sys.stdout.flush()
        log.info("serving %s on %s", store.path, ", ".join(addresses))

    server = asyncio.run(serve(store, settings, ready=ready))
    ctx.out.emit({"event": "stopped", "store": str(store.path), "id": store.id,
                  "addresses": server.addresses, "versions": list(settings.versions),
                  "stats": dict(server.stats)},
                 None if ctx.out.quiet else "stopped")
