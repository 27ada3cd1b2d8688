"""``modsync account add|remove|list``: who may log in to `modsync serve`."""
from __future__ import annotations

import getpass
import sys

from ..errors import UsageError
from .options import add_verb
from .output import human_time

DOC = """\
manage the accounts that may log in to this store's server

An account is a login name and a password (stored as a salted scrypt
hash), and what it may replicate:

  --admin        any user, in either direction
  --append-only  may add but never remove anything (pushes that expunge or
                 delete are refused)
  otherwise      its own user (the account name is the user name), and
                 other users' mailboxes as far as their ACLs allow it
                 (RFC 4314; see docs/replication.md)

Accounts live in the store and are never replicated.  The password is read
from stdin (the first line; a terminal is asked twice), never from the
command line, where other users could see it.

examples:
  printf '%s\\n' "$PASSWORD" | modsync account add --store /srv/modsync replica --admin
  modsync account add alice          # asks for the password
  modsync account list --json
  modsync account remove alice
"""

ADD_DOC = """\
create an account (or replace its password and rights); the password from stdin

example:
  printf '%s\\n' "$PASSWORD" | modsync account add --store /srv/modsync replica --admin
"""

REMOVE_DOC = """\
delete an account; it can no longer log in (open connections stay)

example:
  modsync account remove --store /srv/modsync alice
"""

LIST_DOC = """\
list the accounts and what each may do

example:
  modsync account list --store /srv/modsync --json
"""


def register(subparsers, parents) -> None:
    p = add_verb(subparsers, parents, "account", None, DOC)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = add_verb(sub, parents, "add", run_add, ADD_DOC)
    a.add_argument("name", metavar="NAME",
                   help="the login name (a user's own account has the user's name)")
    a.add_argument("--admin", action="store_true", help="may replicate every user")
    a.add_argument("--append-only", action="store_true",
                   help="may add to the store but never remove anything")
    r = add_verb(sub, parents, "remove", run_remove, REMOVE_DOC)
    r.add_argument("name", metavar="NAME")
    add_verb(sub, parents, "list", run_list, LIST_DOC)


def read_password(prompt: str = "password: ") -> str:
    """The password from stdin: its first line without the line ending (a terminal is
    asked twice)."""
    from ..accounts import MAX_PASSWORD
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("again: ") != first:
            raise UsageError("the two passwords differ")
        return first
    data = stdin.buffer.read(MAX_PASSWORD * 4 + 2) if hasattr(stdin, "buffer") else stdin.read()
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the password on stdin is not UTF-8") from None
    line = data.split("\n", 1)[0].removesuffix("\r")
    if not line:
        raise UsageError("no password on stdin: pipe it in, e.g. printf '%s\\n' \"$PASSWORD\" | "
                         "modsync account add NAME")
    return line


def run_add(ctx) -> None:
    from ..accounts import add_account
    store = ctx.store()
    password = read_password()
    acct = add_account(store, ctx.args.name, password, admin=ctx.args.admin,
                       append_only=ctx.args.append_only)
    kind = "admin" if acct.admin else "append-only" if acct.append_only else "user"
    ctx.out.note({"account": acct.as_dict()}, f"account {acct.name} saved ({kind})")


def run_remove(ctx) -> None:
    from ..accounts import remove_account
    remove_account(ctx.store(), ctx.args.name)
    ctx.out.note({"account": {"name": ctx.args.name}}, f"account {ctx.args.name} removed")


def run_list(ctx) -> None:
    from ..accounts import list_accounts
    accounts = list_accounts(ctx.store(readonly=True))
    ctx.out.emit({"accounts": [a.as_dict() for a in accounts]},
                 lambda: ctx.out.table(["NAME", "MAY REPLICATE", "CREATED"], [
                     [a.name, "every user" if a.admin else
                      "append only" if a.append_only else "own user + ACLs",
                      human_time(a.created)] for a in accounts]))
