"""Accounts that may log in to a modsync server (and to its csync port).

An account is a login name, a password hash and what the account may do:

* ``admin``: replicate any user, in any direction;
* ``append_only``: may add to a store or backup archive but never remove or
  rewrite anything (what restic and borg users ask for against ransomware);
* otherwise a regular user, who may replicate their own mail and other
  users' mailboxes as far as those mailboxes' ACLs allow.

Passwords are hashed with scrypt (stdlib ``hashlib.scrypt``; RFC 7914) with
a random salt; the parameters are stored with each hash so they can be
raised later without invalidating old hashes.  Accounts live in the
store's ``accounts`` table and are never replicated.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import msgpack

from .errors import NoSuchObject, UsageError

# scrypt cost: N=2^15, r=8, p=1 takes ~50 ms and 32 MiB here, the figure
# RFC 7914 and OWASP give for interactive logins.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
MAX_PASSWORD = 1024


@dataclass(frozen=True)
class Account:
    name: str
    admin: bool = False
    append_only: bool = False
    created: int = 0

    def as_dict(self) -> dict:
        return {"name": self.name, "admin": self.admin, "append_only": self.append_only,
                "created": self.created}


def _hash(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 << 20, dklen=32)


def _check_name(name: str) -> None:
    if not name or len(name) > 255 or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in name):
        raise UsageError(f"bad account name {name!r}: no spaces or control characters")


def add_account(store, name: str, password: str, *, admin: bool = False,
                append_only: bool = False) -> Account:
    """Create or replace an account."""
    _check_name(name)
    if not password or len(password) > MAX_PASSWORD:
        raise UsageError(f"the password for {name!r} must be 1 to {MAX_PASSWORD} characters")
    salt = secrets.token_bytes(16)
    digest = _hash(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    account = Account(name, admin, append_only, int(time.time()))
    value = msgpack.packb([1, SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, digest, admin, append_only,
                           account.created], use_bin_type=True)
    store.db.write(lambda txn: txn.put("accounts", name.encode(), value))
    return account


def remove_account(store, name: str) -> None:
    def fn(txn):
        if not txn.delete("accounts", name.encode()):
            raise NoSuchObject(f"no account {name!r}; `modsync account list` shows them",
                               subject=name)
    store.db.write(fn)


def _decode(name: str, raw: bytes) -> tuple[Account, tuple]:
    v = msgpack.unpackb(raw, raw=False)
    return Account(name, bool(v[6]), bool(v[7]), int(v[8])), (v[1], v[2], v[3], v[4], v[5])


def list_accounts(store) -> list[Account]:
    with store.db.read() as txn:
        return [_decode(k.decode(), v)[0] for k, v in txn.range("accounts")]


def check_password(store, name: str, password: str) -> Account | None:
    """The account if name and password match, else None (in about constant time)."""
    with store.db.read() as txn:
        raw = txn.get("accounts", name.encode()) if name else None
    if raw is None:
        # Spend the same time as a real check so timing does not reveal names.
        _hash(password, b"\0" * 16, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        return None
    account, (n, r, p, salt, digest) = _decode(name, raw)
    if hmac.compare_digest(_hash(password, salt, n, r, p), digest):
        return account
    return None
