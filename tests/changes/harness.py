"""A seeded, in-process convergence harness for change sets.

Two or three replicas (``Store`` objects, one user) take random operations of
every kind, exchange change sets in random order over random partitions, by
direct apply ("push": rejected, merged at the sender, pushed again) and by
diff files (``engine.difffile``, applied with merge, the counter shipped back;
also from a stale state token, and the same file applied twice), and at the
end heal by pushing pairwise until nothing moves.  Then:

* every replica has the same ``status`` digest, the same state vector, and
  passes ``verify_store``;
* every message an operation created and no operation removed is on every
  replica (itself, or under the new UID a UID conflict gave it);
* no message an operation expunged is live anywhere; a message in a mailbox
  an operation deleted is live only in the version the deleter had not seen
  (the documented "mail the deleter never saw" rule); and, strictly, no
  expunged message lives on under a UID a conflict moved it to elsewhere;
* no modseq ever went down (user counter, per mailbox, per object), and after
  every apply the receiver's modseq is at least the highest origin modseq it
  took in (Lamport clock);
* a new replica that takes replica 0's state in parts (``changeset.split``,
  as a first sync over the network does) applies each cleanly, holds each
  part's exact state, and ends equal.

A run is a list of *steps*, plain tuples that print as Python literals::

    ("append", 0, "INBOX", ["m3"], ["\\\\Seen"])   # replica 0 appends body "m3"
    ("push", 1, 0)                                 # replica 1 pushes to replica 0

``Generator`` chooses steps against the replicas' current state; ``replay``
runs a fixed list (steps that no longer make sense are skipped, so any
sub-list of a failing run is itself a run); ``shrink`` cuts a failing list
down to a minimal one that fails the same way.  Everything is a pure
function of the seed: store ids and mailbox ids come from the seed too.
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import engine.store as engine_store
from engine import Message, Store
from engine.apply import LegalityError, apply
from engine.blobs import address_of
from engine.changeset import (
    ChangeSet,
    build,
    covers,
    decode_token,
    encode_token,
    split,
    state_of,
)
from engine.errors import (
    MailboxExists,
    NoSuchMailbox,
    NoSuchMessage,
    NoSuchObject,
    NoSuchUser,
    UsageError,
)
from engine.model import MAILBOX, RECORD
from engine.verify import verify_store

try:   # the diff file format, when the engine has it
    from engine import difffile as _difffile
except ImportError:   # pragma: no cover - depends on the engine's progress
    _difffile = None

USER = "u"
NAMES = ("INBOX", "Work", "Work/Sub", "Archive", "Trash")
KEYWORDS = ("\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "$Junk", "$label1")
ENTRIES = ("/comment", "/vendor/x")
ACL_IDS = ("bob", "anyone")
SEEN_IDS = ("sharedmailbox0000000001", "sharedmailbox0000000002")
SIEVE_NAMES = ("main", "vacation")
# How many heal rounds (every ordered pair pushes once) may pass before the
# replicas must have stopped changing: two suffice in theory (one to gather,
# one to spread); the rest is slack for merges that produce new changes.
HEAL_ROUNDS = 6
# Operations that legitimately fail because of the replica's state.
SKIPPABLE = (NoSuchMailbox, MailboxExists, NoSuchMessage, NoSuchObject, NoSuchUser, UsageError)

EXCHANGES = ("push", "file", "oneway", "stale", "reapply")
# Operation kinds and how often the generator picks each (moves are copies with move=True).
OP_WEIGHTS = (
    ("append", 10), ("flags", 6), ("expunge", 3), ("copy", 2), ("move", 2), ("msgann", 2),
    ("create", 2), ("rename", 2), ("delete", 2), ("subscribe", 1), ("unsubscribe", 1),
    ("seen", 1), ("sieve_put", 1), ("sieve_activate", 1), ("sieve_delete", 1), ("acl", 1),
    ("annot", 1), ("quota", 1),
)


def body_for(tag: str) -> bytes:
    """The body appended for a tag: unique per tag, so each append is a distinct message."""
    return (f"From: harness@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@h>\r\n\r\n"
            f"body of {tag}\r\n").encode()


class Failure(AssertionError):
    """A property did not hold.  ``category`` names which, for shrinking."""

    def __init__(self, category: str, message: str):
        super().__init__(f"[{category}] {message}")
        self.category = category
        self.message = message


# -- determinism --------------------------------------------------------------------
class _SeededSecrets:
    """Stands in for ``engine.store.secrets`` so store and mailbox ids follow the seed."""

    def __init__(self, seed: int):
        self._rng = random.Random(f"ids-{seed}")

    def token_hex(self, n: int = 32) -> str:
        return self._rng.getrandbits(8 * n).to_bytes(n, "big").hex()

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)


@contextmanager
def seeded_ids(seed: int):
    saved = engine_store.secrets
    engine_store.secrets = _SeededSecrets(seed)
    try:
        yield
    finally:
        engine_store.secrets = saved


# -- what a replica holds, store-independently ----------------------------------------
@dataclass
class Snapshot:
    """Live records as (mailbox id, uid, address) -> (origin, origin modseq), and mailboxes."""

    records: dict = field(default_factory=dict)
    mailboxes: dict = field(default_factory=dict)     # live mailbox id -> name
    vv: dict = field(default_factory=dict)
    renumbered: dict = field(default_factory=dict)    # record -> the UID it was moved from


def snapshot(store: Store) -> Snapshot:
    try:
        cs = build(store, USER, {}, with_bodies=False)
    except NoSuchUser:
        return Snapshot()
    snap = Snapshot(vv=dict(cs.state))
    for it in cs.items:
        if it.removed:
            continue
        if it.kind == RECORD:
            snap.records[(it.ident[0], it.ident[1], bytes(it.fields[0]))] = (it.origin,
                                                                              it.origin_modseq)
            if it.fields[9]:     # renumbered_from: the UID a merge moved it from
                snap.renumbered[(it.ident[0], it.ident[1], bytes(it.fields[0]))] = it.fields[9]
        elif it.kind == MAILBOX:
            snap.mailboxes[it.ident[0]] = it.fields[0]
    return snap


def modseqs(store: Store) -> dict:
    """Every local modseq worth watching: the user's, each mailbox's, each object's."""
    try:
        u = store.user_info(USER)
    except NoSuchUser:
        return {}
    out = {("user",): u.modseq}
    for mb in store.mailboxes(USER, include_removed=True):
        out[("mailbox", mb.id)] = mb.highestmodseq
    for ch in store.changes_since(USER, 0):
        obj = ch.object
        out[("object", ch.kind, obj.key())] = ch.modseq
    return out


# -- the oracle -----------------------------------------------------------------------
@dataclass
class Fate:
    """What happened to one record (mailbox id, uid, address) in the harness's eyes."""

    op_created: bool = False
    parents: set = field(default_factory=set)      # triples it was renumbered from
    expunged_by: list = field(default_factory=list)          # step indexes
    deleted_by: list = field(default_factory=list)           # (step index, deleter's vv, seen stamp)


class World:
    """The replicas, the oracle and the checks, for one run."""

    def __init__(self, root: Path, seed: int, n_replicas: int, *, paranoid: bool = False):
        self.root = root
        self.paranoid = paranoid
        self.seed = seed
        self.replicas: list[Store] = []
        for i in range(n_replicas):
            self.replicas.append(Store.init(root / f"r{i}"))
        self.fates: dict[tuple, Fate] = {}
        self.snaps = [Snapshot() for _ in self.replicas]
        self.modseqs = [{} for _ in self.replicas]
        self.saved_vv = [{} for _ in self.replicas]          # ("snap", r) tokens
        self.last_file: list = [None for _ in self.replicas]  # (cs bytes, bodies) applied at r
        self.stats = {"applied": 0, "merged": 0, "rejected": 0, "nothing": 0, "skipped": 0,
                      "renumbered": 0}
        self.step_no = 0

    def close(self) -> None:
        for s in self.replicas:
            s.close()

    # -- observation --------------------------------------------------------------
    def observe(self, r: int, *, by_op: str | None, deleter_vv=None) -> None:
        """Note what changed in replica r's live records since we last looked."""
        before = self.snaps[r]
        after = snapshot(self.replicas[r])
        for t in after.records.keys() - before.records.keys():
            fate = self.fates.get(t)
            if fate is None:
                fate = self.fates[t] = Fate()
                if by_op is not None:
                    fate.op_created = True
                else:
                    # Unknown anywhere and not made by an operation: a UID conflict
                    # moved a message to a new UID.  Its parent: the same body in
                    # the same mailbox at the UID the record says it came from.
                    came_from = after.renumbered.get(t)
                    fate.parents = {p for p in self.fates if p[0] == t[0] and p[2] == t[2]
                                    and (p[1] == came_from if came_from else p[1] < t[1])}
                    self.stats["renumbered"] += 1
        if by_op is not None:
            for t in before.records.keys() - after.records.keys():
                fate = self.fates.setdefault(t, Fate())
                if by_op == "delete" and t[0] not in after.mailboxes:
                    fate.deleted_by.append((self.step_no, deleter_vv, before.records[t]))
                else:
                    fate.expunged_by.append(self.step_no)
        self.snaps[r] = after
        self._check_modseqs(r)
        self._check_names(r)
        if self.paranoid:
            rep = verify_store(self.replicas[r])
            if not rep.ok:
                raise Failure("verify", f"replica {r} after step {self.step_no}: verify_store: "
                              f"{[p.as_dict() for p in rep.problems][:5]}")

    def _check_names(self, r: int) -> None:
        """Every live mailbox can be opened by its name (the name index agrees)."""
        s = self.replicas[r]
        try:
            boxes = s.mailboxes(USER)
        except NoSuchUser:
            return
        for mb in boxes:
            try:
                found = s.mailbox(USER, mb.name)
            except NoSuchMailbox:
                found = None
            if found is None or found.id != mb.id:
                raise Failure("name-index", f"replica {r} after step {self.step_no}: live "
                              f"mailbox {mb.name!r} ({mb.id[:6]}) is "
                              f"{'not found' if found is None else 'another mailbox'} "
                              f"by its name")

    def _check_modseqs(self, r: int) -> None:
        now = modseqs(self.replicas[r])
        old = self.modseqs[r]
        for k, v in now.items():
            if k in old and v < old[k]:
                raise Failure("modseq-decreased", f"replica {r}: modseq of {k} went from "
                              f"{old[k]} to {v} at step {self.step_no}")
        if old.get(("user",), 0) > now.get(("user",), 0):
            raise Failure("modseq-decreased", f"replica {r}: user modseq went down")
        merged = dict(old)
        merged.update(now)
        self.modseqs[r] = merged

    # -- operations -----------------------------------------------------------------
    def run_op(self, step: tuple) -> bool:
        """Run one operation; False when the replica's state made it meaningless."""
        kind, r, args = step[0], step[1], step[2:]
        s = self.replicas[r]
        deleter_vv = None
        try:
            if kind == "create":
                (name,) = args
                s.create_mailbox(USER, name)
            elif kind == "rename":
                old, new = args
                s.rename_mailbox(USER, old, new)
            elif kind == "delete":
                (name,) = args
                deleter_vv = state_of(s, USER)
                s.delete_mailbox(USER, name)
            elif kind == "append":
                mbox, tags, flags = args
                s.append_many(USER, mbox, [Message(body_for(t), tuple(flags), 1_700_000_000)
                                           for t in tags])
            elif kind == "flags":
                mbox, uids, flags, mode = args
                s.set_flags(USER, mbox, uids, flags, mode=mode)
            elif kind == "expunge":
                mbox, uids = args
                s.expunge(USER, mbox, uids)
            elif kind == "copy":
                mbox, uids, dest, move = args
                s.copy(USER, mbox, uids, dest, move=move)
            elif kind == "msgann":
                mbox, uid, entry, value = args
                s.set_message_annotation(USER, mbox, uid, entry, "", value)
            elif kind == "subscribe":
                (name,) = args
                s.subscribe(USER, name)
            elif kind == "unsubscribe":
                (name,) = args
                s.unsubscribe(USER, name)
            elif kind == "seen":
                mbid, uids = args
                s.set_seen(USER, mbid, uids)
            elif kind == "sieve_put":
                name, script = args
                s.sieve_put(USER, name, script)
            elif kind == "sieve_activate":
                (name,) = args
                s.sieve_activate(USER, name)
            elif kind == "sieve_delete":
                (name,) = args
                s.sieve_delete(USER, name)
            elif kind == "acl":
                mbox, ident, rights = args
                s.set_acl(USER, mbox, ident, rights)
            elif kind == "annot":
                mbox, entry, value = args
                s.set_annotation(USER, mbox, entry, value)
            elif kind == "quota":
                root, limits = args
                s.set_quota(USER, root, limits)
            else:
                raise ValueError(f"unknown operation {kind!r}")
        except SKIPPABLE:
            self.stats["skipped"] += 1
            self.observe(r, by_op=None)
            return False
        except Failure:
            raise
        except Exception as e:
            raise Failure("op-crash", f"step {self.step_no} {step!r} raised "
                          f"{type(e).__name__}: {e}") from e
        self.observe(r, by_op=("delete" if kind == "delete" else kind), deleter_vv=deleter_vv)
        return True

    # -- exchanges ------------------------------------------------------------------
    def _state(self, r: int) -> dict:
        try:
            return state_of(self.replicas[r], USER)
        except NoSuchUser:
            return {}

    def _apply(self, dst: int, cs: ChangeSet, bodies, *, merge: bool, what: str):
        store = self.replicas[dst]
        try:
            res = apply(store, cs, bodies=bodies, merge=merge, allow_mass_delete=True)
        except LegalityError as e:
            raise Failure(f"illegal:{e.code}", f"step {self.step_no} {what}: a change set built by the "
                          f"engine was refused: {e.code}: {e}") from e
        except Failure:
            raise
        except Exception as e:
            raise Failure("apply-crash", f"step {self.step_no} {what}: apply raised "
                          f"{type(e).__name__}: {e}") from e
        self.stats[res.status] += 1
        if res.status != "rejected" and cs.items:
            mine = store.user_info(USER).modseq
            if mine < cs.max_modseq:
                raise Failure("lamport", f"step {self.step_no} {what}: receiver modseq {mine} "
                              f"below the change set's highest origin modseq {cs.max_modseq}")
        return res

    def _bodies_of(self, src: int):
        store = self.replicas[src]
        return lambda a: store.read_body(a)

    def _file(self, src: int, base: dict) -> tuple[ChangeSet, dict]:
        """Build a change set for ``base`` and carry it through a file (or its encoding)."""
        store = self.replicas[src]
        if _difffile is not None:
            path = self.root / f"diff-{self.step_no}-{src}.msd"
            _difffile.write_diff(store, USER, base, path)
            got = _difffile.read_diff(path)
            cs, bodies = got[-2], got[-1]     # ([header,] change set, bodies)
            path.unlink()
            return cs, dict(bodies)
        cs = build(store, USER, base)
        bodies = {a: store.read_body(a) for a in cs.bodies}
        return ChangeSet.decode(cs.encode()), bodies

    def exchange(self, step: tuple) -> None:
        mode = step[0]
        if mode == "snap":
            self.saved_vv[step[1]] = self._state(step[1])
            return
        if mode == "reapply":
            dst = step[1]
            if self.last_file[dst] is None:
                return
            raw, bodies = self.last_file[dst]
            self._apply(dst, ChangeSet.decode(raw), bodies, merge=True, what="reapply")
            self.observe(dst, by_op=None)
            return
        src, dst = step[1], step[2]
        try:
            build(self.replicas[src], USER, {})
        except NoSuchUser:
            return    # nothing to send yet
        if mode == "push":
            self.push(src, dst)
            return
        base = self.saved_vv[dst] if mode == "stale" else self._state(dst)
        # The receiver's state travels as a token, as it would to a remote sender.
        _, base = decode_token(encode_token(USER, base))
        cs, bodies = self._file(src, base)
        res = self._apply(dst, cs, bodies, merge=True, what=f"{mode} {src}->{dst}")
        self.last_file[dst] = (cs.encode(), bodies)
        self.observe(dst, by_op=None)
        if mode == "oneway" or res.counter is None or not res.counter.items:
            return
        back = ChangeSet.decode(res.counter.encode())
        dstore = self.replicas[dst]
        self._apply(src, back, {a: dstore.read_body(a) for a in back.bodies}, merge=True,
                    what=f"{mode} counter {dst}->{src}")
        self.observe(src, by_op=None)

    def push(self, src: int, dst: int) -> str:
        """Push src to dst; on rejection merge the counter at src and push again.

        Returns "nothing" when neither side changed.
        """
        s = self.replicas[src]
        cs = build(s, USER, self._state(dst))
        res = self._apply(dst, cs, self._bodies_of(src), merge=False, what=f"push {src}->{dst}")
        self.observe(dst, by_op=None)
        if res.status != "rejected":
            return "nothing" if res.status == "nothing" or not res.written else "moved"
        if res.code != "changed" or res.counter is None:
            raise Failure("push-rejected", f"step {self.step_no} push {src}->{dst}: rejected "
                          f"with {res.code!r} ({res.reason})")
        counter = ChangeSet.decode(res.counter.encode())
        self._apply(src, counter, self._bodies_of(dst), merge=True,
                    what=f"push merge {dst}->{src}")
        self.observe(src, by_op=None)
        cs = build(s, USER, self._state(dst))
        res = self._apply(dst, cs, self._bodies_of(src), merge=False,
                          what=f"push again {src}->{dst}")
        self.observe(dst, by_op=None)
        if res.status == "rejected":
            raise Failure("push-not-clean", f"step {self.step_no} push {src}->{dst}: rejected "
                          f"again ({res.code}) after merging the receiver's changes")
        return "moved"

    def step(self, step: tuple) -> bool:
        self.step_no += 1
        _register_tags([step])
        if step[0] in EXCHANGES or step[0] == "snap":
            self.exchange(step)
            return True
        return self.run_op(step)

    # -- the end --------------------------------------------------------------------
    def heal(self) -> int:
        """Exchange pairwise until a whole round moves nothing; the rounds it took."""
        n = len(self.replicas)
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
        for rnd in range(1, HEAL_ROUNDS + 1):
            moved = False
            for a, b in pairs:
                self.step_no += 1
                try:
                    build(self.replicas[a], USER, {})
                except NoSuchUser:
                    continue
                moved |= self.push(a, b) != "nothing"
            if not moved:
                return rnd
        digests = [self._digest(i) for i in range(n)]
        raise Failure("no-convergence", f"replicas still changing after {HEAL_ROUNDS} heal "
                      f"rounds (digests {digests})")

    def _digest(self, r: int) -> str:
        try:
            return self.replicas[r].status(USER)["digest"]
        except NoSuchUser:
            return "-"

    def check_converged(self) -> None:
        digests = [self._digest(i) for i in range(len(self.replicas))]
        if len(set(digests)) != 1:
            raise Failure("digest-mismatch", f"status digests differ after healing: {digests}\n"
                          + describe_difference(self.replicas))
        states = [self._state(i) for i in range(len(self.replicas))]
        if any(st != states[0] for st in states):
            raise Failure("state-mismatch", f"state vectors differ after healing: {states}")
        for i, s in enumerate(self.replicas):
            rep = verify_store(s)
            if not rep.ok:
                raise Failure("verify", f"replica {i}: verify_store: "
                              f"{[p.as_dict() for p in rep.problems][:5]}")

    def check_messages(self) -> None:
        """The message oracle (see the module docstring)."""
        children: dict[tuple, set] = {}
        for t, fate in self.fates.items():
            for p in fate.parents:
                children.setdefault(p, set()).add(t)

        def lineage(t) -> set:
            """t and every record a UID conflict moved it to, transitively."""
            out, todo = set(), [t]
            while todo:
                x = todo.pop()
                if x not in out:
                    out.add(x)
                    todo.extend(children.get(x, ()))
            return out

        def removed_by_op(t) -> bool:
            return any(self.fates[x].expunged_by or self.fates[x].deleted_by for x in lineage(t))

        for i, s in enumerate(self.replicas):
            live = snapshot(s).records
            for t, fate in self.fates.items():
                if fate.op_created and not removed_by_op(t) and not (lineage(t) & live.keys()):
                    raise Failure("lost-message", f"replica {i}: message {_fmt(t)} was appended "
                                  f"(or copied) and never removed by an operation, but is gone "
                                  f"after convergence")
                if fate.expunged_by and t in live:
                    raise Failure("unexpunged", f"replica {i}: message {_fmt(t)} was expunged at "
                                  f"step {fate.expunged_by[0]} but is live after convergence")
                if fate.deleted_by and t in live and not fate.expunged_by:
                    origin, om = live[t]
                    for step_no, vv, _seen in fate.deleted_by:
                        if covers(vv, origin, om):
                            raise Failure("deleted-came-back", f"replica {i}: message {_fmt(t)} "
                                          f"was in a mailbox deleted at step {step_no} by a "
                                          f"replica that had seen this version "
                                          f"({origin[:8]}:{om}), yet it is live after "
                                          f"convergence")

    def check_renumbered_expunges(self) -> None:
        """An expunged message must not live on under a UID a conflict gave it elsewhere."""
        live = snapshot(self.replicas[0]).records
        for t, fate in self.fates.items():
            if not fate.parents or t not in live:
                continue
            todo, seen = list(fate.parents), set()
            while todo:
                p = todo.pop()
                if p in seen:
                    continue
                seen.add(p)
                pf = self.fates[p]
                if pf.expunged_by:
                    raise Failure("expunge-renumbered", f"message {_fmt(p)} was expunged at "
                                  f"step {pf.expunged_by[0]}, but lives on as {_fmt(t)} (a UID "
                                  f"conflict renumbered it on another replica)")
                todo.extend(pf.parents)

    def check_all(self, *, strict_renumber: bool = True) -> None:
        self.heal()
        self.check_converged()
        self.check_messages()
        if strict_renumber:
            self.check_renumbered_expunges()
        self.check_parts()

    def check_parts(self) -> None:
        """A new replica that takes the state in parts, as a first sync over the network
        does (engine.changeset.split; small parts, to cut through these histories),
        applies each cleanly, holds exactly each part's state, and ends equal."""
        src = self.replicas[0]
        try:
            cs = build(src, USER, {})
        except NoSuchUser:
            return
        fresh = Store.init(self.root / "parts")
        try:
            parts = split(cs, 2 + self.seed % 4)
            for k, part in enumerate(parts):
                try:
                    res = apply(fresh, part, bodies=src.read_body)
                except LegalityError as e:
                    raise Failure("parts", f"part {k + 1} of {len(parts)} refused: {e.code}: "
                                  f"{e}") from e
                if res.status == "rejected" or state_of(fresh, USER) != part.state:
                    raise Failure("parts", f"part {k + 1} of {len(parts)}: {res.status} "
                                  f"{res.code}, state {state_of(fresh, USER)} != {part.state}")
            if fresh.status(USER)["digest"] != src.status(USER)["digest"]:
                raise Failure("parts", f"{len(parts)} parts did not rebuild replica 0: "
                              + describe_difference([src, fresh]))
            rep = verify_store(fresh)
            if not rep.ok:
                raise Failure("parts", f"after {len(parts)} parts: verify_store: "
                              f"{[p.as_dict() for p in rep.problems][:5]}")
        finally:
            fresh.close()


def _fmt(t: tuple) -> str:
    text = _TAGS.get(t[2])
    return f"{t[0][:6]}/{t[1]} ({text or t[2].hex()[:12]})"


_TAGS: dict[bytes, str] = {}


def describe_difference(stores) -> str:
    """A short human description of how replicas differ (for failure messages)."""
    lines = []
    views = []
    for s in stores:
        try:
            cs = build(s, USER, {}, with_bodies=False)
        except NoSuchUser:
            views.append({})
            continue
        v = {}
        for it in cs.items:
            if it.removed:
                continue
            key = (it.kind.decode(), tuple(it.ident))
            fields = it.fields
            if it.kind == RECORD:
                fields = [_TAGS.get(bytes(fields[0]), bytes(fields[0]).hex()[:8])] + \
                    [list(fields[5]), fields[6]]
            elif it.kind == MAILBOX:
                fields = fields[:3]
            v[key] = fields
        views.append(v)
    keys = set().union(*views)
    for k in sorted(keys, key=repr):
        vals = [v.get(k) for v in views]
        if any(x != vals[0] for x in vals):
            lines.append(f"  {k}: " + " | ".join(repr(x) for x in vals))
    return "\n".join(lines[:30])


# -- generating steps -------------------------------------------------------------------
class Generator:
    """Chooses the next step from the replicas' current state."""

    def __init__(self, seed: int, n_replicas: int, n_ops: int, exclude=()):
        self.exclude = set(exclude)
        self.rng = random.Random(seed)
        self.seed = seed
        self.n = n_replicas
        self.n_ops = n_ops
        self.tag = 0
        self.blocked: set = set()

    def _tag(self) -> str:
        self.tag += 1
        return f"s{self.seed}m{self.tag}"

    def next(self, world: World) -> tuple:
        rng = self.rng
        # Partitions come and go; a blocked pair does not exchange.
        if rng.random() < 0.15:
            a, b = rng.sample(range(self.n), 2)
            self.blocked ^= {frozenset((a, b))}
        if rng.random() < 0.3:
            pairs = [(a, b) for a in range(self.n) for b in range(self.n)
                     if a != b and frozenset((a, b)) not in self.blocked]
            if pairs:
                a, b = rng.choice(pairs)
                mode = rng.choices(EXCHANGES + ("snap",), weights=(5, 4, 2, 1, 1, 1))[0]
                if mode == "snap":
                    return ("snap", b)
                if mode == "reapply":
                    return ("reapply", b)
                return (mode, a, b)
        return self.op(world, rng.randrange(self.n))

    def op(self, world: World, r: int) -> tuple:
        rng = self.rng
        s = world.replicas[r]
        try:
            boxes = [m.name for m in s.mailboxes(USER)]
        except NoSuchUser:
            boxes = []
        if not boxes or (rng.random() < 0.08 and "create" not in self.exclude):
            return ("create", r, rng.choice(NAMES))
        mbox = rng.choice(boxes)
        try:
            uids = [x.uid for x in s.records(USER, mbox)]
        except NoSuchMailbox:     # a broken name index (reported as such by World)
            uids = []

        def some_uids():
            if not uids:
                return [(1, 1)]
            if rng.random() < 0.2:
                return [(1, 0xFFFFFFFF)]
            u = rng.choice(uids)
            return [(u, u)]
        kinds, weights = zip(*[kw for kw in OP_WEIGHTS if kw[0] not in self.exclude])
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "append":
            tags = [self._tag() for _ in range(rng.choice((1, 1, 1, 2, 3)))]
            flags = rng.sample(KEYWORDS, rng.randrange(3))
            return ("append", r, mbox, tags, flags)
        if kind == "flags":
            flags = rng.sample(KEYWORDS, rng.randrange(1, 3))
            return ("flags", r, mbox, some_uids(), flags, rng.choice(("add", "remove", "replace")))
        if kind == "expunge":
            return ("expunge", r, mbox, some_uids())
        if kind in ("copy", "move"):
            others = [b for b in boxes if b != mbox]
            dest = rng.choice(others) if others else rng.choice(NAMES)
            return ("copy", r, mbox, some_uids(), dest, kind == "move")
        if kind == "msgann":
            uid = rng.choice(uids) if uids else 1
            value = None if rng.random() < 0.3 else f"v{rng.randrange(9)}".encode()
            return ("msgann", r, mbox, uid, rng.choice(ENTRIES), value)
        if kind == "create":
            return ("create", r, rng.choice(NAMES))
        if kind == "rename":
            return ("rename", r, mbox, rng.choice(NAMES))
        if kind == "delete":
            return ("delete", r, mbox)
        if kind == "subscribe":
            return ("subscribe", r, rng.choice(NAMES))
        if kind == "unsubscribe":
            return ("unsubscribe", r, rng.choice(NAMES))
        if kind == "seen":
            return ("seen", r, rng.choice(SEEN_IDS), f"1:{rng.randrange(1, 9)}")
        if kind == "sieve_put":
            return ("sieve_put", r, rng.choice(SIEVE_NAMES),
                    f"# {rng.randrange(5)}\r\nkeep;\r\n".encode())
        if kind == "sieve_activate":
            return ("sieve_activate", r, rng.choice(SIEVE_NAMES + (None,)))
        if kind == "sieve_delete":
            return ("sieve_delete", r, rng.choice(SIEVE_NAMES))
        if kind == "acl":
            rights = None if rng.random() < 0.3 else rng.choice(("lr", "lrs", "lrswipkxtea"))
            return ("acl", r, mbox, rng.choice(ACL_IDS), rights)
        if kind == "annot":
            value = None if rng.random() < 0.3 else f"a{rng.randrange(9)}".encode()
            return ("annot", r, mbox, rng.choice(ENTRIES), value)
        limits = None if rng.random() < 0.3 else {"STORAGE": rng.randrange(100, 1000)}
        return ("quota", r, rng.choice(("", "Work")), limits)


# -- running ------------------------------------------------------------------------------
@dataclass
class Outcome:
    seed: int
    steps: list
    failure: Failure | None = None
    stats: dict = field(default_factory=dict)
    heal_rounds: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None


def _register_tags(steps) -> None:
    for st in steps:
        if st[0] == "append":
            for t in st[3]:
                _TAGS[address_of(body_for(t))] = t


def _run(seed: int, n_replicas: int, steps: list | None, n_ops: int, workdir,
         strict_renumber: bool, exclude=(), paranoid: bool = False) -> Outcome:
    root = Path(tempfile.mkdtemp(prefix=f"converge-{seed}-", dir=workdir))
    taken: list = []
    world = None
    try:
        with seeded_ids(seed):
            world = World(root, seed, n_replicas, paranoid=paranoid)
            try:
                if steps is None:
                    gen = Generator(seed, n_replicas, n_ops, exclude)
                    ops = 0
                    while ops < n_ops:
                        st = gen.next(world)
                        taken.append(st)
                        world.step(st)
                        if st[0] not in EXCHANGES and st[0] != "snap":
                            ops += 1
                else:
                    taken = list(steps)
                    for st in taken:
                        world.step(st)
                world.check_all(strict_renumber=strict_renumber)
            except Failure as f:
                return Outcome(seed, taken, f, dict(world.stats))
            return Outcome(seed, taken, None, dict(world.stats))
    finally:
        if world is not None:
            world.close()
        shutil.rmtree(root, ignore_errors=True)


def replicas_for(seed: int) -> int:
    """Two replicas for most seeds, three for every fifth."""
    return 3 if seed % 5 == 0 else 2


def run_seed(seed: int, *, n_replicas: int | None = None, n_ops: int = 18, workdir=None,
             strict_renumber: bool = True, exclude=(), paranoid: bool = False) -> Outcome:
    """Generate and run one seed's steps, then heal and check.

    ``exclude`` names operation kinds (see OP_WEIGHTS) the generator leaves out;
    ``paranoid`` runs verify_store on a replica after every step that touched it.
    """
    return _run(seed, n_replicas or replicas_for(seed), None, n_ops, workdir, strict_renumber,
                exclude, paranoid)


def replay(seed: int, n_replicas: int, steps: list, *, workdir=None,
           strict_renumber: bool = True) -> Outcome:
    """Run a fixed list of steps (ids still follow the seed), then heal and check."""
    return _run(seed, n_replicas, steps, 0, workdir, strict_renumber)


def shrink(outcome: Outcome, n_replicas: int, *, budget: float = 30.0, workdir=None,
           strict_renumber: bool = True) -> list:
    """Delta debugging: the shortest sub-list found within ``budget`` seconds that still
    fails in the same category."""
    want = outcome.failure.category
    deadline = time.monotonic() + budget

    def fails(steps) -> bool:
        o = replay(outcome.seed, n_replicas, steps, workdir=workdir,
                   strict_renumber=strict_renumber)
        return o.failure is not None and o.failure.category == want

    steps = list(outcome.steps)
    n = 2
    while len(steps) >= 2 and time.monotonic() < deadline:
        chunk = max(1, len(steps) // n)
        reduced = False
        for i in range(0, len(steps), chunk):
            if time.monotonic() >= deadline:
                break
            candidate = steps[:i] + steps[i + chunk:]
            if candidate and fails(candidate):
                steps = candidate
                n = max(n - 1, 2)
                reduced = True
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(steps), n * 2)
    # Simplify the remaining steps: fewer messages per append.
    for i, st in enumerate(list(steps)):
        if time.monotonic() >= deadline:
            break
        if st[0] == "append" and len(st[3]) > 1:
            cand = steps[:i] + [st[:3] + (st[3][:1],) + st[4:]] + steps[i + 1:]
            if fails(cand):
                steps = cand
    return steps


def report(outcome: Outcome, n_replicas: int, steps: list, original: int | None = None) -> str:
    """What a failing seed prints: the seed, the failure and the minimal steps."""
    total = original if original is not None else len(outcome.steps)
    lines = [f"seed={outcome.seed} replicas={n_replicas} {outcome.failure}",
             f"minimal steps ({len(steps)} of {total}):", "steps = ["]
    lines += [f"    {st!r}," for st in steps]
    lines.append("]")
    lines.append(f"replay: harness.replay({outcome.seed}, {n_replicas}, steps)")
    return "\n".join(lines)


# -- helpers for the change set tests ------------------------------------------------------
def dump(store: Store) -> dict:
    """Every table of the store's database, for "nothing changed" comparisons."""
    from engine.db import TABLES
    with store.db.read() as txn:
        return {t: list(txn.range(t)) for t in TABLES}


def sync(src: Store, dst: Store, *, user: str = USER, allow_mass_delete: bool = True) -> str:
    """A clean one-way apply of src's changes at dst's state; returns the apply status."""
    try:
        base = state_of(dst, user)
    except NoSuchUser:
        base = {}
    cs = ChangeSet.decode(build(src, user, base).encode())
    res = apply(dst, cs, bodies=src.read_body, allow_mass_delete=allow_mass_delete)
    assert res.status in ("applied", "nothing"), res.as_dict()
    return res.status


def exchange(a: Store, b: Store, *, user: str = USER) -> None:
    """Bring a and b to the same state: push, merge a rejection at the sender, push again."""
    try:
        base = state_of(b, user)
    except NoSuchUser:
        base = {}
    res = apply(b, build(a, user, base), bodies=a.read_body)
    if res.status == "rejected":
        assert res.code == "changed", res.as_dict()
        apply(a, res.counter, bodies=b.read_body, merge=True)
        res = apply(b, build(a, user, state_of(b, user)), bodies=a.read_body)
        assert res.status in ("applied", "nothing"), res.as_dict()
