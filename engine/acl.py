"""RFC 4314 access rights for user-level replication.

An admin account replicates any user; an account replicates its own user
(the account name is the user name) without restriction.  Any other user's
mail it may replicate only as far as that user's mailbox ACLs allow the
account (entries for its name and for ``anyone``, minus negative ``-name``
entries):

=========================================  ===================================
what the change set does                   rights needed on the mailbox
=========================================  ===================================
pull the mailbox (and its messages)        ``l`` and ``r``
set or clear ``\\Seen``                     ``s``
set or clear ``\\Deleted``                  ``t``
set or clear any other flag, or a message  ``w``
or mailbox annotation
append a message                           ``i`` (and the flag rights above for
                                           the flags it arrives with)
expunge a message                          ``t`` and ``e``
create a mailbox                           ``k`` on its parent
delete a mailbox                           ``x``
rename a mailbox                           ``x`` on it and ``k`` on the new parent
change the mailbox's ACL                   ``a``
=========================================  ===================================

Anything else (another user's subscriptions, seen sets, sieve scripts,
quotas, special-use, top-level mailboxes) is refused.  The checks run
against the receiver's current state before anything is applied, so a
refused change set changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import names
from .changeset import ChangeSet
from .errors import EXIT_REJECTED, ModsyncError, NoSuchUser
from .model import (
    ACL,
    ANNOTATION,
    KIND_NAMES,
    MAILBOX,
    RECORD,
    U32,
    U64,
    AclEntry,
    Mailbox,
    Record,
)
from .mutation import object_key
from .store import IX_NAME, IX_UNIQUEID

ANYONE = "anyone"
READ = "lr"


class AclDenied(ModsyncError):
    """An account lacks a right a change set (or pull) needs.  Nothing was applied."""

    code = "acl"
    exit_code = EXIT_REJECTED

    def __init__(self, message: str, *, right: str = "", subject=None):
        super().__init__(message, subject=subject)
        self.right = right


def rights_for(entries: dict[str, str], account: str) -> set[str]:
    """The rights ``account`` has from a mailbox's ACL entries {identifier: rights}."""
    have = set(entries.get(account, "")) | set(entries.get(ANYONE, ""))
    have -= set(entries.get("-" + account, "")) | set(entries.get("-" + ANYONE, ""))
    return have


@dataclass
class _View:
    """Read access to one owner's mailboxes inside one read transaction."""

    store: object
    txn: object
    user: object      # the owner's UserRecord

    def mailbox_by_id(self, mbid: str) -> Mailbox | None:
        raw = self.txn.get("index", IX_UNIQUEID + mbid.encode())
        if raw is None or raw[:4] != self.user.prefix:
            return None
        key = raw[4:12]
        mv = self.txn.get("objects", object_key(self.user, MAILBOX, key))
        return None if mv is None else Mailbox.unpack(key, mv)

    def mailbox_by_name(self, name: str) -> Mailbox | None:
        raw = self.txn.get("index", IX_NAME + self.user.prefix + name.encode())
        if raw is None:
            return None
        mv = self.txn.get("objects", object_key(self.user, MAILBOX, raw))
        return None if mv is None else Mailbox.unpack(raw, mv)

    def record(self, mb: Mailbox, uid: int) -> Record | None:
        key = U64.pack(mb.num) + U32.pack(uid)
        raw = self.txn.get("objects", object_key(self.user, RECORD, key))
        return None if raw is None else Record.unpack(key, raw)

    def acl(self, mb: Mailbox) -> dict[str, str]:
        out = {}
        p = self.user.prefix + ACL + U64.pack(mb.num)
        for k, v in self.txn.prefix("objects", p):
            e = AclEntry.unpack(k[len(self.user.prefix) + 1:], v)
            if not e.stamp.removed:
                out[e.identifier] = e.rights
        return out

    def parent(self, name: str) -> Mailbox | None:
        """The nearest existing live ancestor of a mailbox name."""
        parts = name.split(names.SEPARATOR)
        while len(parts) > 1:
            parts.pop()
            mb = self.mailbox_by_name(names.SEPARATOR.join(parts))
            if mb is not None and not mb.stamp.removed:
                return mb
        return None


def _flag_rights(before, after) -> set[str]:
    """Rights needed to go from flags ``before`` to ``after`` (RFC 4314 section 4)."""
    need = set()
    for f in {f.lower() for f in before} ^ {f.lower() for f in after}:
        need.add("s" if f == "\\seen" else "t" if f == "\\deleted" else "w")
    return need


class _Checker:
    def __init__(self, view: _View, account: str, owner: str):
        self.view = view
        self.account = account
        self.owner = owner
        self.rights: dict[str, set] = {}          # mailbox id -> rights
        self.new_mailboxes: dict[str, set] = {}   # created by this change set -> parent's rights
        self.deleted: set[str] = set()            # mailboxes this change set deletes

    def rights_on(self, mbid: str, mb: Mailbox | None) -> set:
        if mbid in self.new_mailboxes:
            return self.new_mailboxes[mbid]
        if mbid not in self.rights:
            self.rights[mbid] = rights_for(self.view.acl(mb), self.account) if mb else set()
        return self.rights[mbid]

    def require(self, need: set, have: set, what: str, mbname: str) -> None:
        missing = "".join(sorted(need - have))
        if missing:
            raise AclDenied(f"account {self.account!r} may not {what} in {self.owner}'s mailbox "
                            f"{mbname!r}: its ACL does not grant {missing!r} (RFC 4314); "
                            f"nothing was applied", right=missing, subject=mbname)


def check_push(store, account: str, cs: ChangeSet) -> None:
    """Raise AclDenied unless ``account`` may make every change in ``cs`` to ``cs.user``'s mail."""
    owner = cs.user
    with store.db.read() as txn:
        u = store._user(txn, owner)
        if u is None:
            raise AclDenied(f"account {account!r} may not create user {owner!r}: only an admin "
                            f"or the user's own account may", subject=owner)
        view = _View(store, txn, u)
        ck = _Checker(view, account, owner)
        for item in cs.items:
            if item.kind == MAILBOX:
                _check_mailbox(ck, item)
        for item in cs.items:
            if item.kind == MAILBOX:
                continue
            if item.kind in (RECORD, ACL, ANNOTATION) and item.removed \
                    and item.ident[0] in ck.deleted:
                continue
            if item.kind == RECORD:
                _check_record(ck, item)
            elif item.kind in (ACL, ANNOTATION):
                mbid = item.ident[0]
                mb = view.mailbox_by_id(mbid)
                need = {"a"} if item.kind == ACL else {"w"}
                what = "change the ACL" if item.kind == ACL else "change annotations"
                ck.require(need, ck.rights_on(mbid, mb), what, mb.name if mb else mbid)
            else:
                raise AclDenied(f"account {account!r} may not change another user's "
                                f"{KIND_NAMES[item.kind]} (user {owner!r}); only the user's own "
                                f"account or an admin may", subject=owner)


def _check_mailbox(ck: _Checker, item) -> None:
    view = ck.view
    mbid = item.ident[0]
    name = item.fields[0]
    local = view.mailbox_by_id(mbid)
    if local is None or (local.stamp.removed and not item.removed):
        # A new (or re-created) mailbox: 'k' on its parent, whose rights it inherits.
        parent = view.parent(name)
        if parent is None:
            raise AclDenied(f"account {ck.account!r} may not create {ck.owner}'s mailbox "
                            f"{name!r}: it has no parent mailbox whose ACL could grant 'k'",
                            right="k", subject=name)
        have = ck.rights_on(parent.id, parent)
        ck.require({"k"}, have, "create a mailbox", parent.name)
        ck.new_mailboxes[mbid] = have
        return
    have = ck.rights_on(mbid, local)
    if item.removed and not local.stamp.removed:
        ck.require({"x"}, have, "delete the mailbox", local.name)
        ck.deleted.add(mbid)    # its messages, ACL and annotations go with it
        return
    if item.removed:
        return
    if name != local.name:
        ck.require({"x"}, have, "rename the mailbox", local.name)
        parent = view.parent(name)
        if parent is None:
            raise AclDenied(f"account {ck.account!r} may not rename {ck.owner}'s mailbox "
                            f"{local.name!r} to {name!r}: no parent mailbox grants 'k'",
                            right="k", subject=name)
        ck.require({"k"}, ck.rights_on(parent.id, parent), "create a mailbox", parent.name)
    if tuple(item.fields[3]) != tuple(local.specialuse):
        raise AclDenied(f"account {ck.account!r} may not change the special-use of "
                        f"{ck.owner}'s mailbox {local.name!r}", subject=local.name)


def _check_record(ck: _Checker, item) -> None:
    view = ck.view
    mbid, uid = item.ident
    mb = view.mailbox_by_id(mbid)
    have = ck.rights_on(mbid, mb)
    mbname = mb.name if mb else mbid
    local = view.record(mb, uid) if mb is not None and mbid not in ck.new_mailboxes else None
    flags, annotations = item.fields[5], item.fields[6]
    if local is None:
        need = {"i"} | _flag_rights((), flags)
        if annotations:
            need.add("w")
        if item.removed:
            need |= {"t", "e"}
        ck.require(need, have, "append messages", mbname)
        return
    if local.stamp.removed:
        return    # nothing comes back from an expunge; apply refuses an attempt
    if item.removed:
        ck.require({"t", "e"}, have, "expunge messages", mbname)
        return
    need = _flag_rights(local.flags, flags)
    if sorted(map(tuple, local.annotations)) != sorted(
            (e, u, bytes(v)) for e, u, v in annotations):
        need.add("w")
    ck.require(need, have, "change flags", mbname)


def filter_pull(store, account: str, cs: ChangeSet) -> ChangeSet:
    """``cs`` cut down to the mailboxes ``account`` may read (``l`` and ``r``).

    Raises AclDenied when it may read none of ``cs.user``'s mailboxes.
    """
    owner = cs.user
    with store.db.read() as txn:
        u = store._user(txn, owner)
        if u is None:
            raise NoSuchUser(f"no user {owner!r} here", subject=owner)
        view = _View(store, txn, u)
        readable: set[str] = set()
        seen: set[str] = set()
        scoped = [it for it in cs.items if it.kind in (MAILBOX, RECORD, ACL, ANNOTATION)]
        for it in scoped:
            mbid = it.ident[0]
            if mbid in seen:
                continue
            seen.add(mbid)
            mb = view.mailbox_by_id(mbid)
            if mb is not None and set(READ) <= rights_for(view.acl(mb), account):
                readable.add(mbid)
        if not readable and not _any_readable(view, account):
            raise AclDenied(f"account {account!r} may read none of user {owner!r}'s "
                            f"mailboxes: reading needs both 'l' and 'r' (RFC 4314)",
                            right="lr", subject=owner)
    items = [it for it in scoped if it.ident[0] in readable]
    bodies = {bytes(it.fields[0]) for it in items if it.kind == RECORD and not it.removed}
    return ChangeSet(cs.user, cs.sender, cs.base, cs.state, items,
                     [b for b in cs.bodies if b in bodies],
                     {k: v for k, v in cs.crcs.items() if k in readable}, b"", cs.max_modseq)


def became_readable(store, account: str, cs: ChangeSet) -> frozenset[str]:
    """Mailboxes of ``cs.user`` that ``account`` may read now and whose ACL entries
    that concern it (for its name or ``anyone``, or their ``-`` forms) changed after
    ``cs.base``: they may have become readable since, so a puller at that base may
    lack them whole (``changeset.build(..., whole=...)`` sends them so).  Nothing
    from an empty base, which lacks everything anyway.  When a mailbox stops being
    readable, its changes simply stop coming; should it become readable again, it
    is sent whole again, which brings the puller's copy up to date."""
    if not any(cs.base.values()):
        return frozenset()
    concern = {account, ANYONE, "-" + account, "-" + ANYONE}
    touched = {it.ident[0] for it in cs.items if it.kind == ACL and it.ident[1] in concern}
    if not touched:
        return frozenset()
    with store.db.read() as txn:
        u = store._user(txn, cs.user)
        if u is None:
            return frozenset()
        view = _View(store, txn, u)
        out = set()
        for mbid in touched:
            mb = view.mailbox_by_id(mbid)
            if mb is not None and not mb.stamp.removed \
                    and set(READ) <= rights_for(view.acl(mb), account):
                out.add(mbid)
    return frozenset(out)


def _any_readable(view: _View, account: str) -> bool:
    u = view.user
    for k, v in view.txn.prefix("objects", u.prefix + MAILBOX):
        mb = Mailbox.unpack(k[len(u.prefix) + 1:], v)
        if not mb.stamp.removed and set(READ) <= rights_for(view.acl(mb), account):
            return True
    return False


def may_read_user(store, account, owner: str) -> bool:
    """Whether ``account`` may see ``owner`` at all (its own user, admin, or some ACL entry)."""
    if account.admin or account.name == owner:
        return True
    with store.db.read() as txn:
        u = store._user(txn, owner)
        if u is None:
            raise NoSuchUser(f"no user {owner!r} here", subject=owner)
        view = _View(store, txn, u)
        for k, v in txn.prefix("objects", u.prefix + MAILBOX):
            mb = Mailbox.unpack(k[len(u.prefix) + 1:], v)
            if not mb.stamp.removed and rights_for(view.acl(mb), account.name):
                return True
    return False
