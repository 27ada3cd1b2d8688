"""``modsync sieve put|get|list|activate|deactivate|delete``."""
from __future__ import annotations

import base64
import sys

from ..errors import UsageError
from .options import add_user, add_verb
from .output import human_size, human_time, text_or_none

DOC = """\
manage a user's sieve scripts

A user has any number of scripts and at most one active one, as with
ManageSieve.  Scripts are stored byte-exact and must be UTF-8 (RFC 5228);
modsync does not compile them.
"""

PUT_DOC = """\
store a script from FILE or stdin ("-" or no FILE)

Replacing a script keeps it active if it was.  The user is created if new.

example:
  modsync sieve put -u alice vacation vacation.sieve
"""

GET_DOC = """\
write a script, byte-exact, to stdout
"""

LIST_DOC = """\
list a user's scripts: name, active, size, last update
"""

ACTIVATE_DOC = """\
make NAME the active script (any other is deactivated)
"""

DEACTIVATE_DOC = """\
leave the user with no active script
"""

DELETE_DOC = """\
delete a script (an active one as well: the user is then left with none)
"""


def register(subparsers, parents) -> None:
    group = add_verb(subparsers, parents, "sieve", None, DOC)
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True,
                                   title="actions")
    p = add_verb(actions, parents, "put", put, PUT_DOC)
    add_user(p)
    p.add_argument("name", metavar="NAME", help="the script's name")
    p.add_argument("file", metavar="FILE", nargs="?", default="-",
                   help="the script (default: stdin)")
    for action, handler, doc in (("get", get, GET_DOC), ("activate", activate, ACTIVATE_DOC),
                                 ("delete", delete, DELETE_DOC)):
        p = add_verb(actions, parents, action, handler, doc)
        add_user(p)
        p.add_argument("name", metavar="NAME", help="the script's name")
    for action, handler, doc in (("list", list_, LIST_DOC),
                                 ("deactivate", deactivate, DEACTIVATE_DOC)):
        add_user(add_verb(actions, parents, action, handler, doc))


def put(ctx) -> None:
    name, path = ctx.args.name, ctx.args.file
    if path == "-":
        script = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as fh:
            script = fh.read()
    if text_or_none(script) is None:
        raise UsageError(f"sieve script {name!r} is not UTF-8 (RFC 5228 requires it)")
    ctx.store().sieve_put(ctx.user, name, script)
    ctx.out.note({"user": ctx.user, "name": name, "size": len(script)},
                 f"stored sieve script {name} ({human_size(len(script))}) for {ctx.user}")


def get(ctx) -> None:
    store = ctx.store(readonly=True)
    script = store.sieve_script(ctx.user, ctx.args.name)
    if ctx.out.json:
        active = any(s.active for s in store.sieve_scripts(ctx.user) if s.name == ctx.args.name)
        ctx.out.emit({"user": ctx.user, "name": ctx.args.name, "active": active,
                      "size": len(script), "script": text_or_none(script),
                      "script_base64": base64.b64encode(script).decode("ascii")})
    else:
        ctx.out.raw(script)


def list_(ctx) -> None:
    scripts = sorted(ctx.store(readonly=True).sieve_scripts(ctx.user), key=lambda s: s.name)
    rows = [{"name": s.name, "active": s.active, "size": s.size,
             "last_update": s.last_update} for s in scripts]
    ctx.out.emit({"user": ctx.user, "scripts": rows}, lambda: ctx.out.table(
        ["NAME", "ACTIVE", "SIZE", "UPDATED"],
        [[r["name"], "yes" if r["active"] else "no", human_size(r["size"]),
          human_time(r["last_update"])] for r in rows]))


def activate(ctx) -> None:
    ctx.store().sieve_activate(ctx.user, ctx.args.name)
    ctx.out.note({"user": ctx.user, "active": ctx.args.name},
                 f"{ctx.args.name} is now {ctx.user}'s active sieve script")


def deactivate(ctx) -> None:
    store = ctx.store()
    was = [s.name for s in store.sieve_scripts(ctx.user) if s.active]
    store.sieve_activate(ctx.user, None)
    ctx.out.note({"user": ctx.user, "active": None},
                 f"deactivated {was[0]}" if was else f"{ctx.user} had no active sieve script")


def delete(ctx) -> None:
    ctx.store().sieve_delete(ctx.user, ctx.args.name)
    ctx.out.note({"user": ctx.user, "name": ctx.args.name},
                 f"deleted sieve script {ctx.args.name}")


