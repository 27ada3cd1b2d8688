"""Replicas that exchange change sets in any order end up identical, losing no mail.

Three layers:

* the seeded harness (tests/changes/harness.py) over 500 seeds, in chunks so
  a failure names its seeds; ``tools/converge.py --seeds 10000`` is the long run;
* the minimal step lists the harness found, replayed (one per bug);
* the same bugs written out against the public API, so each reads on its own.

A test marked ``xfail(strict=True, reason="BUG: ...")`` documents a bug in the
engine: it passes once the bug is fixed, and then its marker must go.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest

from engine import Message
from engine.apply import apply
from engine.changeset import build, state_of
from engine.verify import verify_store

from . import harness
from .harness import USER

SEEDS = 500
CHUNK = 50
# Seconds to spend shrinking the first failing seed of a chunk (tools/converge.py
# spends longer and shrinks more of them).
SHRINK_BUDGET = 3.0




# -- the seeded runs ---------------------------------------------------------------------
@pytest.mark.parametrize("first", range(0, SEEDS, CHUNK), ids=lambda s: f"seeds{s}-{s + CHUNK - 1}")
def test_seeds_converge(first, workdir):
    failing = []
    for seed in range(first, first + CHUNK):
        outcome = harness.run_seed(seed, workdir=workdir)
        if not outcome.ok:
            failing.append(outcome)
    if failing:
        o = failing[0]
        n = harness.replicas_for(o.seed)
        small = harness.shrink(o, n, budget=SHRINK_BUDGET, workdir=workdir)
        seeds = ", ".join(f"{f.seed} ({f.failure.category})" for f in failing)
        raise harness.Failure(o.failure.category, f"{len(failing)} of {CHUNK} seeds fail: {seeds}"
                              f"\n\n{harness.report(o, n, small, len(o.steps))}")


def test_harness_passes_a_run_with_no_conflicts(workdir):
    """Sanity: one master, one replica that only receives, every operation kind."""
    steps = [
        ("create", 0, "INBOX"), ("create", 0, "Work"), ("create", 0, "Work/Sub"),
        ("append", 0, "INBOX", ["a1", "a2", "a3"], ["\\Seen"]),
        ("file", 0, 1),
        ("flags", 0, "INBOX", [(1, 2)], ["$Junk"], "add"),
        ("copy", 0, "INBOX", [(1, 1)], "Work", False),
        ("copy", 0, "INBOX", [(2, 2)], "Work/Sub", True),
        ("expunge", 0, "INBOX", [(3, 3)]),
        ("msgann", 0, "Work", 1, "/comment", b"v"),
        ("push", 0, 1),
        ("rename", 0, "Work/Sub", "Archive"), ("delete", 0, "Work"),
        ("subscribe", 0, "Archive"), ("seen", 0, harness.SEEN_IDS[0], "1:3"),
        ("sieve_put", 0, "main", b"keep;"), ("sieve_activate", 0, "main"),
        ("acl", 0, "Archive", "bob", "lr"), ("annot", 0, "Archive", "/comment", b"c"),
        ("quota", 0, "", {"STORAGE": 100}),
        ("stale", 0, 1), ("reapply", 1), ("oneway", 0, 1),
    ]
    outcome = harness.replay(1, 2, steps, workdir=workdir)
    assert outcome.ok, outcome.failure


# -- the oracle is falsifiable ---------------------------------------------------------------
@contextmanager
def world(tmp_path, steps, n=2, seed=3):
    """A harness World after ``steps``, for poking at the oracle."""
    with harness.seeded_ids(seed):
        w = harness.World(tmp_path / "w", seed, n)
        try:
            for st in steps:
                w.step(st)
            yield w
        finally:
            w.close()


def test_oracle_notices_a_lost_message(tmp_path):
    steps = [("create", 0, "INBOX"), ("append", 0, "INBOX", ["x1", "x2"], []), ("push", 0, 1)]
    with world(tmp_path, steps) as w:
        w.replicas[1].expunge(USER, "INBOX", [(2, 2)])     # behind the oracle's back
        with pytest.raises(harness.Failure) as ei:
            w.check_all()
        assert ei.value.category == "lost-message" and "x2" in str(ei.value)


def test_oracle_notices_an_unexpunged_message(tmp_path):
    steps = [("create", 0, "INBOX"), ("append", 0, "INBOX", ["x1"], []), ("push", 0, 1)]
    with world(tmp_path, steps) as w:
        t = next(iter(w.snaps[0].records))
        w.fates[t].expunged_by.append(99)                   # claim an expunge that never was
        with pytest.raises(harness.Failure) as ei:
            w.check_all()
        assert ei.value.category == "unexpunged"


def test_oracle_notices_a_deleted_message_that_came_back(tmp_path):
    steps = [("create", 0, "INBOX"), ("append", 0, "INBOX", ["x1"], []), ("push", 0, 1)]
    with world(tmp_path, steps) as w:
        t = next(iter(w.snaps[0].records))
        # Claim replica 0 deleted the mailbox having seen this very version.
        w.fates[t].deleted_by.append((99, state_of(w.replicas[0], USER), None))
        with pytest.raises(harness.Failure) as ei:
            w.check_all()
        assert ei.value.category == "deleted-came-back"


def test_oracle_notices_divergence(tmp_path):
    with world(tmp_path, [("create", 0, "INBOX"), ("push", 0, 1)]) as w:
        w.replicas[0].subscribe(USER, "INBOX")              # a partition that never heals
        with pytest.raises(harness.Failure) as ei:
            w.check_converged()
        assert ei.value.category == "digest-mismatch"


def test_oracle_notices_a_decreasing_modseq(tmp_path):
    with world(tmp_path, [("create", 0, "INBOX")]) as w:
        w.modseqs[0][("user",)] += 100
        with pytest.raises(harness.Failure) as ei:
            w.step(("subscribe", 0, "INBOX"))
        assert ei.value.category == "modseq-decreased"


def test_shrink_finds_a_minimal_list(workdir, monkeypatch):
    # Put back an old bug on purpose (B1: the tombstone of a mailbox the receiver
    # never had took the name of a live namesake); padded with noise, shrinking
    # must come back to the three steps that matter.
    import engine.apply
    from engine.store import IX_NAME
    original = engine.apply._new_mailbox

    def buggy(ctx, mbid, name, *rest):
        mb = original(ctx, mbid, name, *rest)
        if rest[-1].removed:
            ctx.m.txn.delete("index", IX_NAME + ctx.m.user.prefix + name.encode())
        return mb
    monkeypatch.setattr(engine.apply, "_new_mailbox", buggy)
    core = [("create", 0, "Work/Sub"), ("delete", 0, "Work/Sub"), ("create", 1, "Work/Sub")]
    noise = [("subscribe", 1, "INBOX"), ("quota", 0, "", {"STORAGE": 5}),
             ("sieve_put", 1, "main", b"keep;")]
    steps = [noise[0], core[0], noise[1], core[1], noise[2], core[2]]
    o = harness.replay(2, 2, steps, workdir=workdir)
    assert not o.ok, "the planted bug should make this run fail"
    small = harness.shrink(o, 2, budget=20, workdir=workdir)
    assert small == core
    text = harness.report(o, 2, small)
    assert text.startswith("seed=2 ") and "('create', 1, 'Work/Sub')," in text


# -- minimal failing step lists found by the harness --------------------------------------------
# (bug, seed, replicas, category it fails with, steps).  Replay one with
# harness.replay(seed, replicas, steps).
MINIMAL = [
    ("B1 tombstone of an unknown mailbox unindexes a live namesake", 2, 2, "name-index", [
        ("create", 0, "Work/Sub"),
        ("delete", 0, "Work/Sub"),
        ("create", 1, "Work/Sub"),
    ]),
    ("B2 a merge does not take in the sender's state", 10, 3, "push-not-clean", [
        ("create", 2, "INBOX"),
        ("create", 1, "Work"),
        ("create", 0, "INBOX"),
    ]),
    ("B3 a merge that writes nothing leaves the clock behind", 605, 3, "lamport", [
        ("create", 1, "Trash"),
        ("file", 1, 2),
        ("rename", 2, "Trash", "Work"),
        ("append", 1, "Trash", ["s605m1"], []),
        ("file", 1, 2),
        ("append", 2, "Work", ["s605m3"], ["\\Seen", "\\Answered"]),
        ("delete", 1, "Work"),
        ("append", 2, "Work", ["s605m4"], []),
    ]),
    ("B4 merge writes tie with the change set's newest stamp", 146, 2, "illegal:modseq-lowered", [
        ("create", 0, "Work"),
        ("quota", 1, "Work", {"STORAGE": 339}),
        ("push", 1, 0),
        ("append", 0, "Work", ["s146m7"], []),
        ("annot", 1, "Work", "/comment", b"a3"),
        ("append", 1, "Work", ["s146m9", "s146m10", "s146m11"], []),
    ]),
    ("B5 new mail in a mailbox deleted elsewhere is dropped by the deleter", 129, 2,
     "lost-message", [
         ("create", 1, "INBOX"),
         ("push", 1, 0),
         ("append", 0, "INBOX", ["s129m1"], []),
         ("create", 0, "Archive"),
         ("delete", 1, "INBOX"),
         ("oneway", 0, 1),
     ]),
    ("B6 an expunged UID takes another message at that UID with it", 21, 2, "lost-message", [
        ("create", 1, "Archive"),
        ("push", 1, 0),
        ("append", 1, "Archive", ["s21m1"], []),
        ("append", 0, "Archive", ["s21m2"], ["$Junk", "$label1"]),
        ("append", 1, "Archive", ["s21m3"], ["\\Answered"]),
        ("expunge", 0, "Archive", [(1, 1)]),
    ]),
    ("B7 a winning delete keeps the older stamp of what it beat", 190, 3,
     "illegal:modseq-lowered", [
         ("create", 2, "INBOX"),
         ("create", 1, "Archive"),
         ("push", 1, 0),
         ("delete", 1, "Archive"),
         ("create", 2, "Archive"),
         ("file", 0, 2),
     ]),
    ("B8 rename on one side, append on the other: uidnext-lowered", 66, 2,
     "illegal:uidnext-lowered", [
         ("create", 1, "Work/Sub"),
         ("push", 1, 0),
         ("append", 0, "Work/Sub", ["s66m2"], ["\\Answered"]),
         ("rename", 1, "Work/Sub", "Trash"),
     ]),
    ("B9 a revived mailbox keeps its annotations on one side only", 79, 2, "digest-mismatch", [
        ("create", 1, "Work"),
        ("push", 1, 0),
        ("append", 1, "Work", ["s79m1"], ["\\Seen"]),
        ("annot", 0, "Work", "/comment", b"a8"),
        ("oneway", 0, 1),
        ("delete", 0, "Work"),
        ("file", 0, 1),
        ("append", 0, "Work", ["s79m4"], ["\\Deleted", "$label1"]),
    ]),
    ("B10 a mailbox revived by its deleter cannot shed the old mail", 101, 2,
     "illegal:crc-mismatch", [
         ("create", 1, "Archive"),
         ("append", 1, "Archive", ["s101m1"], ["\\Flagged"]),
         ("oneway", 1, 0),
         ("rename", 1, "Archive", "Work"),
         ("append", 1, "Work", ["s101m8"], ["\\Answered"]),
         ("delete", 0, "Archive"),
     ]),
    ("B11 an expunge followed by a mailbox delete is undone", 2459, 2, "unexpunged", [
        ("create", 0, "Work/Sub"),
        ("append", 0, "Work/Sub", ["s2459m1"], ["\\Flagged", "\\Answered"]),
        ("append", 0, "Work/Sub", ["s2459m2", "s2459m3", "s2459m4"], []),
        ("append", 0, "Work/Sub", ["s2459m5", "s2459m6", "s2459m7"], []),
        ("file", 0, 1),
        ("expunge", 1, "Work/Sub", [(1, 4294967295)]),
        ("delete", 1, "Work/Sub"),
        ("seen", 1, "sharedmailbox0000000002", "1:3"),
        ("msgann", 0, "Work/Sub", 7, "/comment", b"v3"),
    ]),
    ("B12 an expunge racing a UID conflict lives on under the new UID", 753, 2,
     "expunge-renumbered", [
         ("create", 0, "Archive"),
         ("create", 1, "Work"),
         ("file", 0, 1),
         ("append", 1, "Work", ["s753m1"], ["\\Deleted", "\\Answered"]),
         ("append", 0, "Work", ["s753m2"], []),
         ("oneway", 0, 1),
         ("expunge", 0, "Work", [(1, 4294967295)]),
         ("create", 0, "Trash"),
     ]),
]


@pytest.mark.parametrize("bug, seed, n, category, steps", [
    pytest.param(*m, id=m[0].split()[0]) for m in MINIMAL])
def test_minimal_reproductions(bug, seed, n, category, steps, workdir):
    outcome = harness.replay(seed, n, steps, workdir=workdir)
    assert outcome.ok, harness.report(outcome, n, steps)


# -- the same bugs against the public API -------------------------------------------------------
def state(s):
    return state_of(s, USER) if USER in s.users() else {}


def push(a, b, *, allow_mass_delete=True):
    """a pushes to b; a rejection is merged at a and pushed again.  Returns the last result."""
    r = apply(b, build(a, USER, state(b)), bodies=a.read_body, allow_mass_delete=allow_mass_delete)
    if r.status == "rejected":
        assert r.code == "changed", r.as_dict()
        apply(a, r.counter, bodies=b.read_body, merge=True, allow_mass_delete=allow_mass_delete)
        r = apply(b, build(a, USER, state(b)), bodies=a.read_body,
                  allow_mass_delete=allow_mass_delete)
    return r


def file_exchange(a, b):
    """A diff file from a applied at b with merge; b's counter applied back at a."""
    r = apply(b, build(a, USER, state(b)), bodies=a.read_body, merge=True, allow_mass_delete=True)
    if r.counter is not None and r.counter.items:
        apply(a, r.counter, bodies=b.read_body, merge=True, allow_mass_delete=True)


def heal(*stores, rounds=4):
    for _ in range(rounds):
        for a in stores:
            for b in stores:
                if a is not b and USER in a.users():
                    push(a, b)


def mail(s):
    """{mailbox name: [(uid, body)]} of the live mail."""
    return {m.name: [(r.uid, s.read_body(r.address)) for r in s.records(USER, m.name)]
            for m in s.mailboxes(USER)}


def bodies(s):
    return sorted(b for box in mail(s).values() for _, b in box)


def same(*stores):
    digests = {s.status(USER)["digest"] for s in stores}
    return len(digests) == 1


def test_tombstone_of_an_unknown_mailbox_leaves_a_live_namesake_alone(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "Work")
    a.delete_mailbox(USER, "Work")
    b.create_mailbox(USER, "Work")
    apply(b, build(a, USER, {}), merge=True)
    assert [m.name for m in b.mailboxes(USER)] == ["Work"]
    b.append(USER, "Work", b"still reachable by name", internaldate=1)   # NoSuchMailbox today
    assert verify_store(b).ok


def test_push_after_merge_is_clean(make_store):
    a, b = make_store(), make_store()
    # Two fresh replicas, two INBOXes; b's (the higher unique id) is renamed at a.
    a.create_mailbox(USER, "INBOX", unique_id="a" * 24)
    b.create_mailbox(USER, "INBOX", unique_id="z" * 24)
    r = apply(b, build(a, USER, state(b)), bodies=a.read_body)
    assert r.status == "rejected"
    apply(a, r.counter, bodies=b.read_body, merge=True)
    r = apply(b, build(a, USER, state(b)), bodies=a.read_body)
    assert r.status == "applied", r.as_dict()
    assert same(a, b)


def test_push_after_merge_is_clean_when_our_value_wins(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "INBOX")
    push(a, b)
    b.set_annotation(USER, "INBOX", "/comment", b"older")
    for i in range(3):
        a.subscribe(USER, f"F{i}")                     # a's clock runs ahead
    a.set_annotation(USER, "INBOX", "/comment", b"newer")
    r = push(a, b)
    assert r.status == "applied", r.as_dict()
    assert same(a, b)


def test_merge_advances_the_clock_even_when_nothing_is_written(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "Work")
    push(a, b)
    for i in range(5):
        b.subscribe(USER, f"F{i}")
    push(b, a)
    for rights in ("lr", "lrs", "lrsw", "lrswi"):
        b.set_acl(USER, "Work", "bob", rights)       # b's clock runs on
    a.delete_mailbox(USER, "Work")
    cs = build(b, USER, state(a))
    assert apply(a, cs, bodies=b.read_body, merge=True).ok
    assert a.user_info(USER).modseq >= cs.max_modseq


def test_merge_results_are_newer_than_what_they_merge(make_store):
    a, b = sorted((make_store(), make_store()), key=lambda s: s.id)   # a's id sorts first
    a.create_mailbox(USER, "INBOX")
    push(a, b)
    b.subscribe(USER, "X")                                            # b's clock runs ahead
    a.append(USER, "INBOX", b"a1", internaldate=1)                    # UID 1 on a
    b.append_many(USER, "INBOX", [Message(b"b%d" % i, (), 1) for i in (1, 2, 3)])  # UIDs 1-3
    push(a, b)
    assert same(a, b)
    assert bodies(a) == [b"a1", b"b1", b"b2", b"b3"]


def test_new_mail_survives_a_delete_merged_at_the_deleter(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "INBOX")
    a.create_mailbox(USER, "Work")
    push(a, b)
    b.append(USER, "Work", b"new on b", internaldate=1)
    b.subscribe(USER, "INBOX")
    a.delete_mailbox(USER, "Work")
    push(a, b)
    heal(a, b)
    assert same(a, b)
    assert bodies(b) == [b"new on b"]


def test_expunging_my_message_does_not_expunge_yours(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "INBOX")
    push(a, b)
    b.append(USER, "INBOX", b"b's mail", internaldate=1)    # UID 1 on b
    a.append(USER, "INBOX", b"a's mail", internaldate=1)    # UID 1 on a
    a.expunge(USER, "INBOX", [(1, 1)])
    b.subscribe(USER, "INBOX")
    push(a, b)
    heal(a, b)
    assert same(a, b)
    assert bodies(a) == bodies(b) == [b"b's mail"]


def test_winning_expunge_can_be_pushed(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "INBOX")
    a.append(USER, "INBOX", b"m", internaldate=1)
    push(a, b)
    a.expunge(USER, "INBOX", [(1, 1)])
    b.subscribe(USER, "X")
    b.subscribe(USER, "Y")                               # b's clock runs ahead of a's
    b.set_flags(USER, "INBOX", [(1, 1)], ["\\Seen"])
    b.subscribe(USER, "Z")
    push(a, b)
    assert same(a, b) and bodies(b) == []


def test_rename_merges_with_a_concurrent_append(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "Work")
    push(a, b)
    b.append(USER, "Work", b"new on b", internaldate=1)
    a.rename_mailbox(USER, "Work", "Job")
    apply(b, build(a, USER, state(b)), bodies=a.read_body, merge=True)
    heal(a, b)
    assert same(a, b)
    assert mail(a) == {"Job": [(1, b"new on b")]}


def test_revived_mailbox_metadata_converges(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "Work")
    a.set_annotation(USER, "Work", "/comment", b"c")
    a.set_acl(USER, "Work", "bob", "lr")
    push(a, b)
    b.append(USER, "Work", b"new on b", internaldate=1)
    a.delete_mailbox(USER, "Work")
    file_exchange(a, b)
    heal(a, b)
    assert bodies(a) == bodies(b) == [b"new on b"]
    assert same(a, b)


def test_mailbox_revived_by_its_deleter_converges(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "Work")
    a.append(USER, "Work", b"old", internaldate=1)
    push(a, b)
    a.rename_mailbox(USER, "Work", "Job")
    a.append(USER, "Job", b"new on a", internaldate=1)
    b.delete_mailbox(USER, "Work")
    push(b, a)
    heal(a, b)
    assert same(a, b)
    assert bodies(a) == [b"new on a"]


def test_expunge_then_delete_stays_expunged(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "INBOX")
    a.create_mailbox(USER, "Work")
    a.append_many(USER, "Work", [Message(b"w%d" % i, (), 1) for i in (1, 2)])
    push(a, b)
    b.expunge(USER, "Work", [(1, 2)])                   # b expunges both ...
    b.delete_mailbox(USER, "Work")                      # ... then deletes the mailbox
    a.set_message_annotation(USER, "Work", 2, "/comment", "", b"note")
    heal(a, b)
    assert same(a, b)
    assert b"w2" not in bodies(a)


def test_revival_keeps_the_deleters_uidnext(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "INBOX")
    a.create_mailbox(USER, "Work")
    push(a, b)
    a.append(USER, "Work", b"new on a", internaldate=1)                              # UID 1
    b.append_many(USER, "Work", [Message(b"b%d" % i, (), 1) for i in (1, 2, 3)])     # UIDs 1-3
    b.delete_mailbox(USER, "Work")
    b.subscribe(USER, "INBOX")
    push(a, b)
    heal(a, b)
    assert same(a, b)
    assert b.mailbox(USER, "Work").uidnext >= 4


def test_expunge_racing_a_uid_conflict_stays_expunged(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "Work")
    push(a, b)
    b.append(USER, "Work", b"b's mail", internaldate=1)     # UID 1 on b
    a.append(USER, "Work", b"a's mail", internaldate=1)     # UID 1 on a
    apply(b, build(a, USER, state(b)), bodies=a.read_body, merge=True)   # b renumbers both
    a.expunge(USER, "Work", [(1, 1)])                       # a expunges its own, at UID 1
    heal(a, b)
    assert same(a, b)
    assert bodies(a) == [b"b's mail"]


def test_mass_delete_guard_counts_only_what_goes(make_store):
    a, b = make_store(), make_store()
    a.create_mailbox(USER, "Work")
    push(a, b)
    b.append(USER, "Work", b"new on b", internaldate=1)
    a.delete_mailbox(USER, "Work")
    assert apply(b, build(a, USER, state(b)), bodies=a.read_body, merge=True).ok
    assert bodies(b) == [b"new on b"]
