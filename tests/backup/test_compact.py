"""Retention and compaction: what is kept restores exactly, and a crash at any moment
leaves a sound archive."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine.errors import UsageError

import engine.archive as archive_mod
from engine import Message
from engine.archive import KIND_BODIES, KIND_COMPACT, Archive, PointInfo, verify_archive
from engine.backup import LocalSource, RetentionPolicy, backup, compact, restore

from .conftest import DAY, T0, body, history

ROOT = Path(__file__).resolve().parents[2]


def _p(point, t):
    return PointInfo("u", point, 0, t, 0, "", point == 1, {}, b"")


def test_policy_rules():
    pts = [_p(i + 1, T0 + i * DAY // 2) for i in range(20)]       # two points a day, 10 days
    now = pts[-1].time
    assert RetentionPolicy(keep_last=3).keep(pts, now) == {18, 19, 20}
    assert RetentionPolicy(keep_days=2).keep(pts, now) == {16, 17, 18, 19, 20}
    daily = RetentionPolicy(keep_daily=3).keep(pts, now)
    assert len(daily) == 3 and 20 in daily
    assert RetentionPolicy(keep_weekly=1).keep(pts, now) == {20}
    assert len(RetentionPolicy(keep_weekly=2).keep(pts, now)) == 2
    assert RetentionPolicy(keep_monthly=1).keep(pts, now) == {20}
    both = RetentionPolicy(keep_last=1, keep_daily=2).keep(pts, now)
    assert both == RetentionPolicy(keep_daily=2).keep(pts, now)
    assert RetentionPolicy(keep_days=0).keep(pts, now + 10 * DAY) == {20}   # latest always
    assert not RetentionPolicy().given()


@pytest.fixture
def filled(source, archive):
    return archive, history(source, archive)


def _digests(archive, points, new_store):
    out = {}
    for p in points:
        t = new_store()
        restore(archive, "alice", at=f"point:{p}", store=t)
        out[p] = t.status("alice")["digest"]
    return out


def test_compaction_keeps_kept_points_exact(filled, new_store):
    archive, snaps = filled
    now = snaps[-1].time
    size_before = sum(e.size for e in archive.chunks() if e.live)
    report = compact(archive, RetentionPolicy(keep_days=1.5), now=now)   # keeps points 4, 5
    assert report.points_dropped == 3 and report.points_rewritten == 1
    assert [p.point for p in archive.points("alice")] == [4, 5]
    first = archive.points("alice")[0]
    assert first.full and first.base == {}
    assert _digests(archive, [4, 5], new_store) == {4: snaps[3].digest, 5: snaps[4].digest}
    assert report.bodies_dropped > 0
    assert report.bytes_after < size_before
    rep = verify_archive(archive)
    assert rep.ok, rep.problems
    # The compaction record lists what it removed; their entries stay, marked removed.
    c = [e for e in archive.chunks() if e.kind == KIND_COMPACT]
    assert len(c) == 1 and [e for e in archive.chunks() if e.removed_by == c[0].seq]
    with pytest.raises(UsageError):
        restore(archive, "alice", at="point:2", store=new_store())
    # Nothing left to do: a second run changes nothing.
    head = archive.head()
    report = compact(archive, RetentionPolicy(keep_days=1.5), now=now)
    assert report.points_dropped == 0 and archive.head() == head


def test_dropping_points_between_kept_ones_merges_them(filled, source, new_store):
    archive, snaps = filled

    class Odd(RetentionPolicy):
        def keep(self, points, now):
            return {1, 3, 5}
    report = compact(archive, Odd(keep_last=1), now=0)
    assert report.points_dropped == 2 and report.points_rewritten == 2
    assert [p.point for p in archive.points("alice")] == [1, 3, 5]
    assert _digests(archive, [1, 3, 5], new_store) == {
        1: snaps[0].digest, 3: snaps[2].digest, 5: snaps[4].digest}
    assert verify_archive(archive).ok
    # Backups continue from the rewritten last point.
    assert backup(archive, LocalSource(source)).points == 0
    source.append("alice", "Old", body(500))
    assert backup(archive, LocalSource(source)).points == 1
    assert verify_archive(archive).ok


def test_dry_run_changes_nothing(filled):
    archive, _ = filled
    head, chunks = archive.head(), archive.chunks()
    report = compact(archive, RetentionPolicy(keep_last=1), dry_run=True)
    assert report.dry_run and report.points_dropped == 4 and report.bodies_dropped > 0
    assert archive.head() == head and archive.chunks() == chunks


def test_compaction_of_one_user_leaves_the_others(source, archive, new_store):
    history(source, archive, "alice")
    history(source, archive, "bob")
    compact(archive, RetentionPolicy(keep_last=1), users=["alice"])
    assert len(archive.points("alice")) == 1 and len(archive.points("bob")) == 5
    assert verify_archive(archive).ok
    restore(archive, "bob", at="point:1", store=new_store())
    assert backup(archive, LocalSource(source)).points == 0


def test_a_partly_dead_body_chunk_is_rewritten_keeping_live_blocks(source, archive, new_store,
                                                                   monkeypatch):
    monkeypatch.setattr(archive_mod, "BLOCK_TARGET", 2000)
    source.create_mailbox("alice", "INBOX")
    source.append_many("alice", "INBOX", [Message(body(i, 600)) for i in range(40)])
    backup(archive, LocalSource(source))
    source.expunge("alice", "INBOX", [(1, 10)])
    backup(archive, LocalSource(source))
    old = [e.seq for e in archive.chunks() if e.kind == KIND_BODIES and e.live]
    report = compact(archive, RetentionPolicy(keep_last=1))
    assert report.bodies_dropped == 10 and archive.body_count() == 30
    assert not [e for e in archive.chunks() if e.seq in old and e.live]
    t = new_store()
    restore(archive, "alice", store=t)
    assert t.status("alice")["digest"] == source.status("alice")["digest"]
    assert verify_archive(archive).ok
    source.append("alice", "INBOX", body(99))
    assert backup(archive, LocalSource(source)).points == 1
    assert verify_archive(archive).ok


# -- crash safety ---------------------------------------------------------------------------

class Crash(Exception):
    pass


def _prepared(tmp_path, source, archive):
    snaps = history(source, archive)
    archive.close()
    return tmp_path / "archive", snaps


def test_a_failure_at_every_step_of_a_compaction_leaves_a_sound_archive(
        tmp_path, source, archive, new_store, monkeypatch):
    template, snaps = _prepared(tmp_path, source, archive)
    steps = []
    monkeypatch.setattr(archive_mod, "_fault", steps.append)
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    with Archive.open(probe) as a:
        compact(a, RetentionPolicy(keep_last=2))
    monkeypatch.setattr(archive_mod, "_fault", None)
    assert {"write-P", "write-B", "write-C", "before-commit", "after-commit", "unlink"} <= \
        set(steps), steps
    expected = {4: snaps[3].digest, 5: snaps[4].digest}
    for k in range(len(steps)):
        copy = tmp_path / f"crash-{k}"
        shutil.copytree(template, copy)
        calls = []

        def fault(step, k=k, calls=calls):
            calls.append(step)
            if len(calls) == k + 1:
                raise Crash(step)
        monkeypatch.setattr(archive_mod, "_fault", fault)
        with Archive.open(copy) as a, pytest.raises(Crash):
            compact(a, RetentionPolicy(keep_last=2))
        monkeypatch.setattr(archive_mod, "_fault", None)
        with Archive.open(copy) as a:
            rep = verify_archive(a)
            assert rep.ok, (k, steps[k], rep.problems)
            committed = [p.point for p in a.points("alice")] == [4, 5]
            assert committed == (k > steps.index("before-commit")), (k, steps[k])
            assert _digests(a, [4, 5], new_store) == expected
            # Finishing the job afterwards also ends sound, with no stray files.
            compact(a, RetentionPolicy(keep_last=2))
            rep = verify_archive(a)
            assert rep.ok and not rep.notes, (k, rep.problems, rep.notes)
            assert [p.point for p in a.points("alice")] == [4, 5]
        shutil.rmtree(copy)


SLOW_COMPACT = """
import sys, time
import engine.archive as am
from engine.archive import Archive
from engine.backup import RetentionPolicy, compact
am._fault = lambda step: time.sleep(0.01)
orig = am.Writer._write_chunk
def slow(self, *a, **k):
    time.sleep(0.01)
    return orig(self, *a, **k)
am.Writer._write_chunk = slow
with Archive.open(sys.argv[1]) as a:
    compact(a, RetentionPolicy(keep_last=2))
print("done")
"""


def test_compaction_killed_at_random_moments_leaves_a_sound_archive(tmp_path, source, archive,
                                                                    new_store):
    template, snaps = _prepared(tmp_path, source, archive)
    expected = {4: snaps[3].digest, 5: snaps[4].digest}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(5)
    # How long an unhurried run takes, to spread the kills over it.
    copy = tmp_path / "timing"
    shutil.copytree(template, copy)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", SLOW_COMPACT, str(copy)], env=env, check=True,
                   capture_output=True)
    full = time.monotonic() - t0
    outcomes = set()
    for i in range(8):
        copy = tmp_path / f"kill-{i}"
        shutil.copytree(template, copy)
        proc = subprocess.Popen([sys.executable, "-c", SLOW_COMPACT, str(copy)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.3, 1.0) * full)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        with Archive.open(copy) as a:
            rep = verify_archive(a)
            assert rep.ok, (i, rep.problems)
            outcomes.add(tuple(p.point for p in a.points("alice")))
            assert _digests(a, [4, 5], new_store) == expected
            compact(a, RetentionPolicy(keep_last=2))
            rep = verify_archive(a)
            assert rep.ok and not rep.notes
        shutil.rmtree(copy)
    assert outcomes <= {(1, 2, 3, 4, 5), (4, 5)}
