"""Property tests of the one write path: random sequences of every mutation.

``StoreMachine`` drives a real store through random operations (hypothesis
stateful testing) and after every step checks the store's promises against
independent recomputations (tests/store/oracle.py):

* the user's modseq only goes up, also across close/reopen, and every object
  a step changed carries that step's modseq;
* every removed object leaves a tombstone that keeps what it must, until
  expire_tombstones drops those below the horizon (and notes them in the
  user's ``expired`` vector);
* mailbox counters, the modsync CRC and both Cyrus CRCs equal a recomputation
  from the records, and ``verify_store`` finds nothing;
* ``changes_since(N)`` (and ``changes(N)``) equals the diff of the snapshots
  at N and now, for several N; below the horizon it raises FullSyncNeeded;
* another user's changes never show in this user's data or modseq;
* UIDs are never reused; a new mailbox's uidvalidity is above that of every
  mailbox that ever had its name;
* rebuilding the visible state in a fresh store by another route gives the
  same user digest, and one visible change gives another.

A failure prints the shortest sequence of ``state.<rule>(...)`` calls that
shows it; ``pytest --hypothesis-seed=N`` replays a run.  For a long bug hunt:
MODSYNC_STORE_EXAMPLES=1000 MODSYNC_STORE_STEPS=60 pytest tests/store -k Machine
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)

from engine import Message, Store
from engine.errors import (
    MailboxExists,
    NoSuchMailbox,
    NoSuchMessage,
    NoSuchObject,
    NoSuchUser,
    UsageError,
)
from engine.model import normalize_flags
from engine.verify import verify_store

from . import oracle, tmpfs

USER = "alice"
OTHER = "bob"

# Pools small enough that operations keep running into each other.
MAILBOXES = ["INBOX", "inbox", "A", "A/B", "A/B/C", "a.b^c d", "Ünï/Cödé", "Trash"]
# Bodies by short names, so that a failing example prints readably.
BODIES = {"empty": b"", "mail": b"From: a@b\r\nSubject: x\r\n\r\nhi\r\n",
          "nul": b"\x00\x01 binary \x00\xff", "bytes2k": bytes(range(256)) * 8,
          "y3000": b"y" * 3000}
FLAGS = ["\\Seen", "\\Flagged", "\\Deleted", "\\Answered", "\\Draft",
         "$Junk", "$junk", "$Forwarded", "Foo"]
BAD_FLAGS = ["\\Recent", "\\Unknown", "with space", "", "Ünï"]   # refused by local mutations
MSG_ENTRIES = ["/comment", "/altsubject", "/vendor/x/y"]
MB_ENTRIES = ["/comment", "/private/comment", "/specialuse"]
USERIDS = ["", "alice", "bob"]
VALUES = [b"", b"v1", b"\x00bin\xff", b"\\Sent", b"\\Trash \\Junk"]
IDENTIFIERS = ["alice", "bob", "anyone", "group:staff"]
RIGHTS = ["lrs", "lrswipkxtecdan", "rl", "", "a"]
SIEVE_NAMES = ["main", "vacation", "Ünï script"]
SCRIPTS = [b"keep;", b'require "fileinto"; fileinto "A";', b""]
QUOTA_ROOTS = ["", "INBOX", "A"]
LIMITS = [{"STORAGE": 1024}, {"MESSAGE": 10}, {"STORAGE": 0, "MESSAGE": 5}, {}]
SEEN_IDS = ["box-of-bob", "box-of-carol"]
SEEN_UIDS = ["1", "1:5", "1,3", "2:9", "3,1:2", "5,4,3,2,1"]

EXPECTED = (NoSuchMailbox, MailboxExists, NoSuchMessage, NoSuchObject, NoSuchUser, UsageError)

body_names = st.sampled_from(sorted(BODIES))
names = st.sampled_from(MAILBOXES)   # any name, existing or not
# Ranges as callers give them: unsorted, overlapping.
uid_ranges = st.one_of(
    st.none(),
    st.lists(st.tuples(st.integers(1, 14), st.integers(0, 3)).map(lambda t: (t[0], t[0] + t[1])),
             min_size=1, max_size=3))
flag_lists = st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(FLAGS),
                                st.sampled_from(FLAGS), st.sampled_from(BAD_FLAGS)), max_size=4)
# Names of mailboxes the machine created or renamed into (they may be gone since),
# drawn half of the time, so that most operations find their mailbox.
created = Bundle("mailboxes")
known = st.one_of(created, names)


def canonical(name: str) -> str:
    return "INBOX" if name == "inbox" else name


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tmpfs.mkdtemp(prefix="modsync-sm-"))
        self.store = Store.init(self.dir / "store")
        self.rebuilds = 0
        self.snapshots: dict[int, dict] = {}   # modseq -> snapshot after the step that made it
        self.prev: dict = {}
        self.modseq = 0
        self.horizon = 0
        self.max_uid: dict[int, int] = {}      # mailbox number -> highest UID ever seen
        self.uidnext: dict[int, int] = {}
        self.uidvalidity_of_name: dict[str, int] = {}
        self.known_mailboxes: set[int] = set()
        self.expired = 0                       # highest modseq of an expired tombstone
        self.checked_horizon = 0               # the horizon at the last check

    @initialize(target=created)
    def start(self):
        self.store.create_mailbox(USER, "INBOX")
        self.store.append_many(USER, "INBOX", [Message(BODIES[b], (f,), 1_690_000_000)
                                               for b, f in zip(["mail", "nul", "empty"], FLAGS)])
        return "INBOX"

    def teardown(self):
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------
    def do(self, fn, *args, **kw):
        """Run one operation; refusals of the documented kinds are fine (and must change nothing).

        Returns the operation's result, True for None, and None when refused.
        """
        try:
            result = fn(*args, **kw)
        except EXPECTED:
            return None
        return True if result is None else result

    def live_names(self) -> list[str]:
        return [m.name for m in self.store.mailboxes(USER)]

    def mailbox_or_none(self, name):
        try:
            return self.store.mailbox(USER, name)
        except NoSuchMailbox:
            return None

    def records_or_none(self, name):
        try:
            return self.store.records(USER, name)
        except NoSuchMailbox:
            return []

    # -- mailboxes ------------------------------------------------------------------
    @rule(target=created, name=names,
          specialuse=st.sampled_from([(), ("\\Sent",), ("\\Trash", "\\Junk")]))
    def create_mailbox(self, name, specialuse):
        if self.do(self.store.create_mailbox, USER, name, specialuse=specialuse) is None:
            return multiple()
        return name

    @rule(target=created, old=known, new=names)
    def rename_mailbox(self, old, new):
        old, new = canonical(old), canonical(new)
        current = set(self.live_names())
        moving = [n for n in current if n == old or n.startswith(old + "/")]
        targets = {new + n[len(old):] for n in moving}
        if old != "INBOX" and (targets - {new}) & current:
            # Known bug: a child's new name that is in use clobbers the name index
            # (test_store.py::test_rename_refuses_child_name_collision and
            # ::test_rename_child_onto_sibling_being_moved).  Kept out of the
            # property so that it keeps testing everything else.
            return multiple()
        if self.do(self.store.rename_mailbox, USER, old, new) is None:
            return multiple()
        return new

    @rule(name=known)
    def delete_mailbox(self, name):
        self.do(self.store.delete_mailbox, USER, name)

    # -- messages -------------------------------------------------------------------
    @rule(name=known, body=body_names, flags=flag_lists,
          internaldate=st.one_of(st.none(), st.integers(0, 2**31)))
    def append(self, name, body, flags, internaldate):
        body = BODIES[body]
        before = self.mailbox_or_none(name)
        rec = self.do(self.store.append, USER, name, body, flags=flags, internaldate=internaldate)
        if rec is not None:
            assert rec.uid == before.uidnext
            assert rec.flags == normalize_flags(flags)
            assert self.store.read_body(rec.address) == body

    @rule(name=known, batch=st.lists(st.tuples(body_names, flag_lists,
                                               st.lists(st.tuples(st.sampled_from(MSG_ENTRIES),
                                                                  st.sampled_from(USERIDS),
                                                                  st.sampled_from(VALUES)),
                                                        max_size=2, unique_by=lambda a: a[:2])),
                                     max_size=4))
    def append_many(self, name, batch):
        before = self.mailbox_or_none(name)
        recs = self.do(self.store.append_many, USER, name,
                       [Message(BODIES[b], tuple(f), 1_690_000_000, tuple(a))
                        for b, f, a in batch])
        if recs is not None and recs is not True:
            assert [r.uid for r in recs] == list(range(before.uidnext, before.uidnext + len(batch)))

    @rule(src=known, uids=uid_ranges, dst=known, move=st.booleans())
    def copy(self, src, uids, dst, move):
        src_before = self.records_or_none(src)
        dst_mb = self.mailbox_or_none(dst)
        mapping = self.do(self.store.copy, USER, src, uids, dst, move=move)
        if mapping is None:
            return
        picked = [r for r in src_before
                  if uids is None or any(lo <= r.uid <= hi for lo, hi in uids)]
        assert list(mapping) == [r.uid for r in picked]
        assert list(mapping.values()) == list(range(dst_mb.uidnext, dst_mb.uidnext + len(picked)))
        after = {r.uid: r for r in self.store.records(USER, dst)}
        for r in picked:
            new = after[mapping[r.uid]]
            assert (new.address, new.flags, new.annotations, new.internaldate) == \
                   (r.address, r.flags, r.annotations, r.internaldate)
        if move:
            left = {r.uid for r in self.store.records(USER, src)}
            assert not left & set(mapping)

    @rule(name=known, uids=uid_ranges, flags=flag_lists,
          mode=st.sampled_from(["add", "remove", "replace"]))
    def set_flags(self, name, uids, flags, mode):
        before = self.records_or_none(name)
        n = self.do(self.store.set_flags, USER, name, uids, flags, mode=mode)
        if n is None:
            return
        after = {r.uid: r for r in self.store.records(USER, name)}
        change = normalize_flags(flags)
        low = {f.lower() for f in change}
        changed = 0
        for r in before:
            if uids is not None and not any(lo <= r.uid <= hi for lo, hi in uids):
                assert after[r.uid].flags == r.flags
                continue
            if mode == "add":
                want = normalize_flags(r.flags + change)
            elif mode == "remove":
                want = tuple(f for f in r.flags if f.lower() not in low)
            else:
                want = change
            assert {f.lower() for f in after[r.uid].flags} == {f.lower() for f in want}
            changed += after[r.uid].flags != r.flags
        assert n == changed

    @rule(name=known, uids=uid_ranges)
    def expunge(self, name, uids):
        before = self.records_or_none(name)
        n = self.do(self.store.expunge, USER, name, uids)
        if n is None:
            return
        picked = {r.uid for r in before
                  if uids is None or any(lo <= r.uid <= hi for lo, hi in uids)}
        assert n == len(picked)
        assert not picked & {r.uid for r in self.store.records(USER, name)}

    @rule(name=known, uid=st.integers(1, 14), entry=st.sampled_from(MSG_ENTRIES),
          userid=st.sampled_from(USERIDS), value=st.one_of(st.none(), st.sampled_from(VALUES)))
    def set_message_annotation(self, name, uid, entry, userid, value):
        self.do(self.store.set_message_annotation, USER, name, uid, entry, userid, value)

    # -- per-user objects -------------------------------------------------------------
    @rule(name=known)
    def subscribe(self, name):
        self.do(self.store.subscribe, USER, name)

    @rule(name=known)
    def unsubscribe(self, name):
        self.do(self.store.unsubscribe, USER, name)

    @rule(mailbox_id=st.sampled_from(SEEN_IDS), uids=st.sampled_from(SEEN_UIDS))
    def set_seen(self, mailbox_id, uids):
        self.do(self.store.set_seen, USER, mailbox_id, uids)

    @rule(mailbox_id=st.sampled_from(SEEN_IDS))
    def delete_seen(self, mailbox_id):
        self.do(self.store.delete_seen, USER, mailbox_id)

    @rule(name=st.sampled_from(SIEVE_NAMES), script=st.sampled_from(SCRIPTS))
    def sieve_put(self, name, script):
        self.do(self.store.sieve_put, USER, name, script)
        assert self.store.sieve_script(USER, name) == script

    @rule(name=st.one_of(st.none(), st.sampled_from(SIEVE_NAMES)))
    def sieve_activate(self, name):
        self.do(self.store.sieve_activate, USER, name)

    @rule(name=st.sampled_from(SIEVE_NAMES))
    def sieve_delete(self, name):
        self.do(self.store.sieve_delete, USER, name)

    @rule(name=known, identifier=st.sampled_from(IDENTIFIERS),
          rights=st.one_of(st.none(), st.sampled_from(RIGHTS)))
    def set_acl(self, name, identifier, rights):
        self.do(self.store.set_acl, USER, name, identifier, rights)

    @rule(name=known, entry=st.sampled_from(MB_ENTRIES), userid=st.sampled_from(USERIDS),
          value=st.one_of(st.none(), st.sampled_from(VALUES)))
    def set_annotation(self, name, entry, userid, value):
        self.do(self.store.set_annotation, USER, name, entry, value, userid=userid)

    @rule(root=st.sampled_from(QUOTA_ROOTS), limits=st.one_of(st.none(), st.sampled_from(LIMITS)))
    def set_quota(self, root, limits):
        self.do(self.store.set_quota, USER, root, limits)

    @rule(op=st.sampled_from(["append", "subscribe", "expunge", "delete"]))
    def other_user(self, op):
        """Another user's changes: alice's data and modseq must not notice (checked after)."""
        if op == "append":
            if not self.do(self.store.append, OTHER, "INBOX", BODIES["mail"]):
                self.store.create_mailbox(OTHER, "INBOX")
        elif op == "subscribe":
            self.do(self.store.subscribe, OTHER, "INBOX")
        elif op == "expunge":
            self.do(self.store.expunge, OTHER, "INBOX", None)
        else:
            self.do(self.store.delete_mailbox, OTHER, "INBOX")

    # -- maintenance ------------------------------------------------------------------
    @rule(data=st.data())
    def expire_tombstones(self, data):
        below = data.draw(st.integers(1, self.modseq + 1), label="below")
        self.store.expire_tombstones(USER, below)
        self.horizon = max(self.horizon, below)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = Store.open(self.dir / "store")
        assert self.store.user_info(USER).modseq == self.modseq

    @rule(probe=st.sampled_from(["subscribe", "flag", "seen", "acl", "quota"]))
    def digest_is_history_independent(self, probe):
        """The same visible state built by another route has the same digest; one change differs."""
        self.rebuilds += 1
        other = Store.init(self.dir / f"rebuild{self.rebuilds}")
        try:
            oracle.rebuild(self.store, USER, other)
            assert oracle.visible_state(other, USER) == oracle.visible_state(self.store, USER)
            assert other.user_info(USER).digest == self.store.user_info(USER).digest
            assert verify_store(other).ok
            before = other.user_info(USER).digest
            if probe == "subscribe":
                other.subscribe(USER, "zz-probe")
            elif probe == "seen":
                other.set_seen(USER, "zz-probe", "1:99")
            elif probe == "quota":
                other.set_quota(USER, "zz-probe", {"STORAGE": 1})
            elif probe == "acl" and other.mailboxes(USER):
                other.set_acl(USER, other.mailboxes(USER)[0].name, "zz-probe", "l")
            else:   # "flag", or "acl" without a mailbox to put it on
                mb = next((m for m in other.mailboxes(USER) if m.messages), None)
                if mb is None:
                    other.create_mailbox(USER, "zz-probe")
                else:
                    other.set_flags(USER, mb.name, None, ["$zz-probe"], mode="add")
            assert other.user_info(USER).digest != before
        finally:
            other.close()
            shutil.rmtree(self.dir / f"rebuild{self.rebuilds}", ignore_errors=True)

    # -- the invariants ------------------------------------------------------------------
    @invariant()
    def check_step(self):
        store = self.store
        u = store.user_info(USER)
        now = oracle.snapshot(store, USER)
        prev = self.prev
        changed = {i for i, o in now.items()
                   if i not in prev or oracle.state(prev[i]) != oracle.state(o)}
        vanished = prev.keys() - now.keys()

        # Modseqs: one step, at most one new modseq, carried by everything it changed.
        assert u.modseq >= self.modseq, f"user modseq went down: {self.modseq} -> {u.modseq}"
        if u.modseq == self.modseq:
            assert not changed and not vanished, \
                f"objects changed without a new modseq: {sorted(changed | vanished)}"
        for i in changed:
            assert now[i].stamp.modseq == u.modseq, \
                f"{i} changed in this step but carries modseq {now[i].stamp.modseq}, not {u.modseq}"
        for i, o in now.items():
            assert 0 < o.stamp.modseq <= u.modseq
        assert u.horizon == self.horizon

        # Tombstones.
        for i, old in prev.items():
            new = now.get(i)
            if not old.stamp.removed:
                if new is None:
                    mnum = oracle.scoped_mailbox(i)
                    mb = now.get(("mailbox", oracle.U64.pack(mnum))) if mnum is not None else None
                    assert mb is not None and mb.stamp.removed and ("mailbox", mb.key()) in changed, \
                        f"{i} vanished without a tombstone"
                elif new.stamp.removed:
                    if i[0] == "record":
                        assert (new.uid, new.address) == (old.uid, old.address)
                    if i[0] == "mailbox":
                        assert (new.id, new.name, new.uidvalidity, new.uidnext) == \
                               (old.id, old.name, old.uidvalidity, old.uidnext)
            else:
                if new is None:
                    # Tombstones go only by expiry (which raises the horizon past them) or,
                    # records, ACL entries and annotations, with their mailbox's deletion.
                    expired = u.horizon > self.checked_horizon and old.stamp.modseq < u.horizon
                    mnum = oracle.scoped_mailbox(i)
                    mkey = ("mailbox", oracle.U64.pack(mnum)) if mnum is not None else None
                    with_mailbox = mkey in changed and now[mkey].stamp.removed
                    assert expired or with_mailbox, \
                        f"tombstone {i} (modseq {old.stamp.modseq}) vanished above the " \
                        f"horizon {u.horizon}"
                    if expired:                    # the expired vector must say so
                        self.expired = max(self.expired, old.stamp.origin_modseq)
                elif not new.stamp.removed:
                    assert i[0] not in ("record", "mailbox"), f"{i} came back from the dead"
        assert u.expired.get(0, 0) == self.expired, \
            f"expired vector {u.expired} but tombstones up to {self.expired} expired"
        for i, o in now.items():
            assert not (o.stamp.removed and o.stamp.modseq < u.horizon), \
                f"tombstone {i} at modseq {o.stamp.modseq} survived expiry below {u.horizon}"

        # UIDs and uidvalidity.
        for i, o in now.items():
            if i[0] == "record":
                mnum = oracle.scoped_mailbox(i)
                if i not in prev:
                    assert o.uid > self.max_uid.get(mnum, 0), \
                        f"UID {o.uid} reused in mailbox #{mnum} (had {self.max_uid.get(mnum)})"
        for i, o in now.items():
            if i[0] == "record":
                mnum = oracle.scoped_mailbox(i)
                self.max_uid[mnum] = max(self.max_uid.get(mnum, 0), o.uid)
        for i, mb in now.items():
            if i[0] != "mailbox":
                continue
            assert mb.uidnext > self.max_uid.get(mb.num, 0)
            assert mb.uidnext >= self.uidnext.get(mb.num, 1), "uidnext went down"
            self.uidnext[mb.num] = mb.uidnext
            if mb.num not in self.known_mailboxes:
                assert mb.uidvalidity > self.uidvalidity_of_name.get(mb.name, 0), \
                    f"new mailbox {mb.name!r} got uidvalidity {mb.uidvalidity}, not above " \
                    f"{self.uidvalidity_of_name.get(mb.name)}"
                self.known_mailboxes.add(mb.num)
        for i, mb in now.items():
            if i[0] == "mailbox":
                self.uidvalidity_of_name[mb.name] = max(
                    self.uidvalidity_of_name.get(mb.name, 0), mb.uidvalidity)

        # Incremental values against from-scratch ones.
        report = verify_store(store)
        assert report.ok, [p.as_dict() for p in report.problems]
        oracle.check_mailbox_totals(store, USER)

        # changes_since against snapshot diffs, for several N.
        self.snapshots[u.modseq] = now
        done = sorted(m for m in self.snapshots if m != u.modseq)
        picks = set(done[-2:]) | set(done[:: max(1, len(done) // 4)])
        for n in sorted(picks):
            if 0 < n < u.horizon:
                oracle.assert_full_sync_needed(store, USER, n)
            else:
                oracle.check_changes_since(store, USER, n, self.snapshots[n], now)
                listed = store.changes(USER, n)
                assert (listed.modseq, listed.horizon) == (u.modseq, u.horizon)
                assert [oracle.identity(c) for c in listed.changes] == \
                    [oracle.identity(c) for c in store.changes_since(USER, n)]
        assert store.changes_since(USER, u.modseq) == []

        self.prev = now
        self.modseq = u.modseq
        self.checked_horizon = u.horizon


StoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("MODSYNC_STORE_EXAMPLES", "100")),
    stateful_step_count=int(os.environ.get("MODSYNC_STORE_STEPS", "40")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStoreMachine = StoreMachine.TestCase


# --- the digest: equal exactly when what a user sees is equal ---------------------------

def _twin_mailbox(store: Store) -> None:
    store.create_mailbox(USER, "INBOX", unique_id="inbox-id-000000000000000",
                         uidvalidity=1_700_000_000)


@settings(max_examples=25, deadline=None)
@given(flags=st.lists(st.sampled_from(FLAGS), max_size=4),
       detour=st.lists(st.sampled_from(FLAGS), min_size=1, max_size=4))
def test_digest_ignores_flag_history(flags, detour):
    """Flags added and removed again leave no trace in the digest."""
    base = Path(tmpfs.mkdtemp())
    a, b = Store.init(base / "a"), Store.init(base / "b")
    try:
        for s in (a, b):
            _twin_mailbox(s)
            s.append(USER, "INBOX", b"body", flags=flags, internaldate=1)
        extra = [f for f in normalize_flags(detour)
                 if f.lower() not in {g.lower() for g in normalize_flags(flags)}]
        a.set_flags(USER, "INBOX", None, extra, mode="add")
        a.set_flags(USER, "INBOX", None, extra, mode="remove")
        assert a.user_info(USER).modseq != b.user_info(USER).modseq or not extra
        assert a.user_info(USER).digest == b.user_info(USER).digest
    finally:
        a.close()
        b.close()
        shutil.rmtree(base, ignore_errors=True)


def test_digest_ignores_operation_order(make_store):
    a, b = make_store(), make_store()
    for s in (a, b):
        _twin_mailbox(s)
    a.subscribe(USER, "INBOX")
    a.set_quota(USER, "", {"STORAGE": 10})
    a.append(USER, "INBOX", b"one", internaldate=5)
    a.set_acl(USER, "INBOX", "bob", "lr")
    a.set_annotation(USER, "INBOX", "/comment", b"x")
    a.set_annotation(USER, "INBOX", "/comment", b"hello")
    a.sieve_put(USER, "s", b"keep;")
    a.sieve_activate(USER, "s")

    b.sieve_put(USER, "s", b"keep;")
    b.sieve_activate(USER, "s")
    b.set_annotation(USER, "INBOX", "/comment", b"hello")
    b.append(USER, "INBOX", b"one", internaldate=5)
    b.set_acl(USER, "INBOX", "bob", "rwl")
    b.set_acl(USER, "INBOX", "bob", "rl")
    b.set_quota(USER, "", {"STORAGE": 10})
    b.subscribe(USER, "Trash")
    b.unsubscribe(USER, "Trash")
    b.subscribe(USER, "INBOX")
    assert a.user_info(USER).modseq != b.user_info(USER).modseq
    assert a.user_info(USER).digest == b.user_info(USER).digest


VISIBLE_CHANGES = {
    "flag": lambda s: s.set_flags(USER, "INBOX", None, ["\\Seen"], mode="add"),
    "keyword": lambda s: s.set_flags(USER, "INBOX", None, ["$Junk"], mode="add"),
    "message annotation": lambda s: s.set_message_annotation(USER, "INBOX", 1, "/comment", "", b"x"),
    "expunge": lambda s: s.expunge(USER, "INBOX", [(1, 1)]),
    "append": lambda s: s.append(USER, "INBOX", b"other", internaldate=7),
    "mailbox": lambda s: s.create_mailbox(USER, "New", unique_id="new-id-0000000000000000",
                                          uidvalidity=1),
    "rename": lambda s: s.rename_mailbox(USER, "Sub", "Sub2"),
    "subscription": lambda s: s.subscribe(USER, "Sub"),
    "seen": lambda s: s.set_seen(USER, "box-of-bob", "1:2"),
    "sieve": lambda s: s.sieve_put(USER, "t", b"discard;"),
    "sieve active": lambda s: s.sieve_activate(USER, "s"),
    "acl": lambda s: s.set_acl(USER, "INBOX", "bob", "lrs"),
    "mailbox annotation": lambda s: s.set_annotation(USER, "INBOX", "/comment", b"y"),
    "specialuse": lambda s: s.set_annotation(USER, "Sub", "/specialuse", b"\\Sent", userid=USER),
    "quota": lambda s: s.set_quota(USER, "", {"STORAGE": 11}),
}


@pytest.mark.parametrize("change", sorted(VISIBLE_CHANGES))
def test_digest_sees_every_visible_change(make_store, change):
    a, b = make_store(), make_store()
    for s in (a, b):
        _twin_mailbox(s)
        s.create_mailbox(USER, "Sub", unique_id="sub-id-00000000000000000", uidvalidity=9)
        s.append(USER, "INBOX", b"one", internaldate=5)
        s.sieve_put(USER, "s", b"keep;")
        s.set_acl(USER, "INBOX", "bob", "lr")
        s.set_annotation(USER, "INBOX", "/comment", b"x")
        s.set_quota(USER, "", {"STORAGE": 10})
    assert a.user_info(USER).digest == b.user_info(USER).digest
    VISIBLE_CHANGES[change](b)
    assert a.user_info(USER).digest != b.user_info(USER).digest
    assert verify_store(b).ok
