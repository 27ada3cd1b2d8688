"""Replication: push/pull between two `modsync serve` processes over loopback.

Figures (the replication issue's list):

* first full replication of 20,000 messages of about 4 KB (tools/corpus.py,
  "small4k"), pushed from one store to a `modsync serve` of an empty one,
  and pulled from a `modsync serve` into an empty one: messages/s, MB/s and
  the CPU time per message of each side (target 10,000 messages/s);
* a no-op incremental sync of a user with 100 mailboxes and 100,000
  messages: a push (the cached state of the replica says there is nothing
  to send: no round trip) and a pull (one round trip: PULL, an empty change
  set back), median of many (target under 20 ms);
* 1 % flag changes on that user (1,000 messages, in 100 mutations), pushed;
* pull --follow: from a commit on the master to the change applied on the
  replica, median and 99th percentile;
* synchronous replicas: commits per second from 8 concurrent writers, each
  commit waiting for the replica's acknowledgement, at each level
  (received, durable, applied);
* where Dovecot is installed: `doveadm backup` of the same 20,000 messages
  between two Maildirs on this machine (dsync, no network), for scale.

``quick`` shrinks every size for the test suite's smoke run.
"""
from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import corpus  # tools/corpus.py: tools/bench puts tools/ on sys.path

from benchmarks import Figure, timer
from engine import Message, Store
from engine.accounts import add_account
from engine.changeset import state_of, vv_le
from engine.client import Client
from engine.model import Record
from engine.replication import Puller, Pusher
from engine.syncrep import ReplicaSpec, SyncReplicas, SyncSettings

NAME = "replication"
USER = "bench"
SEED = 4096
ADMIN, PASSWORD = "bench", "bench-password"
MB = 1e6

FULL_MESSAGES, FULL_MESSAGES_QUICK = 20_000, 300
FULL_TARGET = 10_000                     # messages/s
BIG_MAILBOXES, BIG_PER_MAILBOX = 100, 1_000
BIG_MAILBOXES_QUICK, BIG_PER_MAILBOX_QUICK = 5, 40
NOOP_TARGET_MS = 20.0
NOOP_REPEAT, NOOP_REPEAT_QUICK = 50, 5
FLAG_SHARE = 0.01
FOLLOW_COMMITS, FOLLOW_COMMITS_QUICK = 200, 10
SYNC_WRITERS = 8
SYNC_COMMITS_EACH, SYNC_COMMITS_EACH_QUICK = 40, 3


def note(text: str) -> None:
    print(f"   [{NAME}] {text}", file=sys.stderr, flush=True)


def modsync() -> list[str]:
    here = Path(sys.executable).parent / "modsync"
    return [str(here)] if here.exists() else [sys.executable, "-m", "engine.cli"]


class Serve:
    """A `modsync serve` process on 127.0.0.1 (a port the kernel picks)."""

    def __init__(self, store: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODSYNC_")}
        env["MODSYNC_CONFIG"] = os.devnull
        self.proc = subprocess.Popen(
            modsync() + ["serve", "--store", str(store), "--listen", "127.0.0.1:0", "--json",
                         "-v"],
            stdout=subprocess.PIPE, stderr=open(str(store) + ".log", "wb"), env=env,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
                if not line:
                    break
                data = json.loads(line)
                if data.get("event") == "listening":
                    self.address = data["addresses"][0]
                    return
            elif self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("modsync serve did not start")

    def connect(self) -> Client:
        return Client(self.address, account=ADMIN, password=PASSWORD, timeout=600)

    def cpu(self) -> float:
        """CPU seconds the server process has used (every thread), from /proc."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc.stdout.close()


def new_store(path: Path) -> Store:
    s = Store.init(path)
    add_account(s, ADMIN, PASSWORD, admin=True)
    return s


def run(quick: bool, workdir: Path) -> list[Figure]:
    figures: list[Figure] = []
    servers: list[Serve] = []
    try:
        figures += bench_full(quick, workdir, servers)
        figures += bench_big_user(quick, workdir, servers)
        figures += bench_follow(quick, workdir, servers)
        figures += bench_sync(quick, workdir, servers)
        figures += bench_dovecot(quick, workdir)
    finally:
        for s in servers:
            s.stop()
    return figures


# -- first full replication ----------------------------------------------------------------
def bench_full(quick: bool, workdir: Path, servers: list) -> list[Figure]:
    n = FULL_MESSAGES_QUICK if quick else FULL_MESSAGES
    mails = [Message(m.body, m.flags, m.internaldate)
             for m in corpus.generate(n, SEED, size_mix="small4k")]
    nbytes = sum(len(m.body) for m in mails)
    src = new_store(workdir / "full-a")
    src.create_mailbox(USER, "INBOX")
    for i in range(0, n, 1000):
        src.append_many(USER, "INBOX", mails[i:i + 1000])
    master = Serve(workdir / "full-a")
    servers.append(master)
    dst_path = workdir / "full-b"
    new_store(dst_path).close()
    replica = Serve(dst_path)
    servers.append(replica)
    size = f"{n:,} msgs, mean {nbytes / n / 1000:.1f} KB"
    # Push: this process reads store A and streams to B's server.
    pusher = Pusher(src, replica.connect, address=replica.address)
    pusher.connection()
    load = os.getloadavg()[0]
    cpu0, far0 = time.process_time(), replica.cpu()
    with timer() as t:
        out = pusher.push_user(USER)
    push_secs, push_cpu, push_far = t(), time.process_time() - cpu0, replica.cpu() - far0
    pusher.disconnect()
    assert out.status == "sent", out
    # Pull: this process pulls from A's server into an empty store.
    dst2 = new_store(workdir / "full-c")
    puller = Puller(dst2, master.connect, address=master.address)
    puller.connection()
    cpu0, far0 = time.process_time(), master.cpu()
    with timer() as t:
        out = puller.pull_user(USER)
    pull_secs, pull_cpu, pull_far = t(), time.process_time() - cpu0, master.cpu() - far0
    puller.disconnect()
    assert out.status == "sent", out
    ok = src.status(USER)["digest"] == dst2.status(USER)["digest"]
    src.close()
    dst2.close()
    if not ok:
        note("the replicas' digests differ after the full replication")
    size += f"; load average {load:.1f} before"
    us = 1e6 / n
    return [
        Figure("full replication: push to serve, 4 KB messages", n / push_secs, "msg/s",
               FULL_TARGET, note=size),
        Figure("full replication: push, MB/s", nbytes / MB / push_secs, "MB/s"),
        Figure("full replication: push, sender CPU per message", push_cpu * us, "µs",
               better="lower", note="build, split in parts, read bodies, encode"),
        Figure("full replication: push, receiver CPU per message", push_far * us, "µs",
               better="lower", note="the modsync serve process, every thread: decode, "
                                    "decompress, check, apply"),
        Figure("full replication: pull from serve, 4 KB messages", n / pull_secs, "msg/s",
               FULL_TARGET, note=size),
        Figure("full replication: pull, MB/s", nbytes / MB / pull_secs, "MB/s"),
        Figure("full replication: pull, sender CPU per message", pull_far * us, "µs",
               better="lower", note="the modsync serve process"),
        Figure("full replication: pull, receiver CPU per message", pull_cpu * us, "µs",
               better="lower"),
    ]


# -- a big user: no-op and 1% flag changes ------------------------------------------------------
def bench_big_user(quick: bool, workdir: Path, servers: list) -> list[Figure]:
    boxes = BIG_MAILBOXES_QUICK if quick else BIG_MAILBOXES
    per = BIG_PER_MAILBOX_QUICK if quick else BIG_PER_MAILBOX
    total = boxes * per
    src = new_store(workdir / "big-a")
    base = [m.body for m in corpus.generate(min(total, 2000), SEED + 1, size_mix="small4k")]
    with timer() as t_build:
        for b in range(boxes):
            name = f"Folder{b:03d}"
            src.create_mailbox(USER, name)
            src.append_many(USER, name, [
                Message(b"X-Seq: %d\r\n" % (b * per + i) + base[(b * per + i) % len(base)])
                for i in range(per)])
    note(f"built a user with {boxes} mailboxes and {total:,} messages in {t_build():.1f} s")
    dst = workdir / "big-b"
    new_store(dst).close()
    replica = Serve(dst)
    servers.append(replica)
    master = Serve(workdir / "big-a")
    servers.append(master)
    pusher = Pusher(src, replica.connect, address=replica.address)
    with timer() as t_first:
        assert pusher.push_user(USER).status == "sent"
    note(f"first push of the big user: {t_first():.1f} s ({total / t_first():,.0f} msg/s)")
    repeat = NOOP_REPEAT_QUICK if quick else NOOP_REPEAT
    noop_push = []
    for _ in range(repeat):
        with timer() as t:
            out = pusher.push_user(USER)
        assert out.status == "nothing", out
        noop_push.append(t() * 1000)
    # A replica pulling from the master: one round trip each.
    rep = new_store(workdir / "big-c")
    puller = Puller(rep, master.connect, address=master.address)
    assert puller.pull_user(USER).status == "sent"
    noop_pull = []
    for _ in range(repeat):
        with timer() as t:
            out = puller.pull_user(USER)
        assert out.status == "nothing", out
        noop_pull.append(t() * 1000)
    # 1 % flag changes, in 100 mutations (as many IMAP STOREs), then one push.
    rng = random.Random(SEED)
    changes = max(1, int(total * FLAG_SHARE))
    per_mutation = max(1, changes // 100)
    picks = rng.sample(range(total), changes)
    for i in range(0, changes, per_mutation):
        def fn(m, chunk=picks[i:i + per_mutation]):
            for k in chunk:
                mb = m.mailbox_by_name(f"Folder{k // per:03d}")
                r = m.record(mb, k % per + 1)
                old = r.copy()
                r.flags = tuple(sorted(set(r.flags) | {"$bench"}))
                m.put_record(mb, r, old)
        src.mutate(USER, fn)
    with timer() as t:
        out = pusher.push_user(USER)
    flags_push = t()
    assert out.status == "sent", out
    with timer() as t:
        out = puller.pull_user(USER)
    flags_pull = t()
    assert out.status == "sent", out
    same = src.status(USER)["digest"] == rep.status(USER)["digest"]
    pusher.disconnect()
    puller.disconnect()
    src.close()
    rep.close()
    if not same:
        note("the big user's digests differ after the flag changes")
    size = f"{boxes} mailboxes, {total:,} messages"
    return [
        Figure("no-op incremental push, big user", statistics.median(noop_push), "ms",
               NOOP_TARGET_MS, better="lower",
               note=f"{size}; median of {repeat}; cached replica state, no round trip"),
        Figure("no-op incremental pull, big user", statistics.median(noop_pull), "ms",
               NOOP_TARGET_MS, better="lower", note=f"{size}; median of {repeat}; one round trip"),
        Figure("1% flag changes: push", flags_push * 1000, "ms", better="lower",
               note=f"{changes:,} messages changed in {changes // per_mutation} mutations"),
        Figure("1% flag changes: pull", flags_pull * 1000, "ms", better="lower"),
        Figure("1% flag changes: push, changes/s", changes / flags_push, "msg/s"),
    ]


# -- pull --follow latency ------------------------------------------------------------------------
def bench_follow(quick: bool, workdir: Path, servers: list) -> list[Figure]:
    master_path, replica_path = workdir / "follow-m", workdir / "follow-r"
    m = new_store(master_path)
    m.create_mailbox(USER, "INBOX")
    new_store(replica_path).close()
    master = Serve(master_path)
    servers.append(master)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODSYNC_")}
    env.update(MODSYNC_CONFIG=os.devnull, MODSYNC_PASSWORD=PASSWORD)
    follower = subprocess.Popen(
        modsync() + ["pull", "--store", str(replica_path), "--from", master.address,
                     "--account", ADMIN, "--follow", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    r = Store.open(replica_path)
    lat = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and USER not in r.users():
            time.sleep(0.01)
        n = FOLLOW_COMMITS_QUICK if quick else FOLLOW_COMMITS
        for i in range(n):
            t0 = time.perf_counter()
            m.append(USER, "INBOX", b"Subject: follow %d\r\n\r\nbody\r\n" % i)
            want = state_of(m, USER)
            while not vv_le(want, state_of(r, USER)):
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("the follower fell 30 s behind")
                time.sleep(0.0005)
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.01)     # light load: one commit at a time
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.wait(30)
        r.close()
        m.close()
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return [
        Figure("pull --follow: commit to replica, median", statistics.median(lat), "ms", 100.0,
               better="lower", note=f"{len(lat)} commits, one at a time"),
        Figure("pull --follow: commit to replica, 99th percentile", p99, "ms", 100.0,
               better="lower"),
    ]


# -- synchronous replicas ---------------------------------------------------------------------------
def bench_sync(quick: bool, workdir: Path, servers: list) -> list[Figure]:
    figures = []
    each = SYNC_COMMITS_EACH_QUICK if quick else SYNC_COMMITS_EACH
    for level in ("received", "durable", "applied"):
        master_path, replica_path = workdir / f"sync-m-{level}", workdir / f"sync-r-{level}"
        m = new_store(master_path)
        m.create_mailbox(USER, "INBOX")
        new_store(replica_path).close()
        replica = Serve(replica_path)
        servers.append(replica)
        sync = SyncReplicas(m, SyncSettings([ReplicaSpec(replica.address, "r")], level=level,
                                            timeout=120, account=ADMIN, password=PASSWORD))
        sync.start()
        errors = []

        def writer(w):
            try:
                for i in range(each):
                    body = b"Subject: writer %d commit %d\r\n\r\nbody\r\n" % (w, i)

                    def fn(mut, body=body):
                        mb = mut.mailbox_by_name("INBOX")
                        address, sha1 = m.put_body(mut.txn, body)
                        mut.put_record(mb, Record(mb.uidnext, address, sha1, len(body), mut.now,
                                                  savedate=mut.now, createdmodseq=mut.modseq),
                                       None)
                    sync.commit(USER, fn)
            except Exception as e:
                errors.append(e)
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(SYNC_WRITERS)]
        with timer() as t:
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        secs = t()
        batches = sync.metrics["batches"]
        sync.stop()
        m.close()
        replica.stop()
        servers.remove(replica)
        if errors:
            note(f"sync {level}: {errors[0]!r}")
        commits = SYNC_WRITERS * each
        figures.append(Figure(f"synchronous replica ({level}): commits/s, {SYNC_WRITERS} writers",
                              commits / secs, "commits/s",
                              note=f"{commits} commits in {batches} change sets"))
    return figures


# -- Dovecot, where installed ------------------------------------------------------------------------
def bench_dovecot(quick: bool, workdir: Path) -> list[Figure]:
    try:
        from peers.dovecot import Doveadm, missing
    except ImportError:
        note("tools/peers/dovecot.py not found: no Dovecot figure")
        return []
    why = missing()
    if why:
        note(f"no Dovecot figure: {why}")
        return []
    n = FULL_MESSAGES_QUICK if quick else FULL_MESSAGES
    base = Path(tempfile.mkdtemp(prefix="bench-dovecot-"))
    try:
        mails = list(corpus.generate(n, SEED, size_mix="small4k"))
        nbytes = sum(len(m.body) for m in mails)
        corpus.write_maildir(base / "Maildir", mails, corpus.DEFAULT_FOLDERS[:1], seed=SEED)
        dc = Doveadm(base)          # writes its config and hands base to the mail uid
        with timer() as t:
            dc.run("backup", f"maildir:{base}/Copy")
        secs = t()
    except Exception as e:
        note(f"Dovecot dsync not measured: {type(e).__name__}: {e}")
        return []
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return [
        Figure("Dovecot 2.3 doveadm backup (dsync), same corpus", n / secs, "msg/s",
               note=f"{n:,} msgs, Maildir to Maildir on this machine, no network; "
                    f"{nbytes / MB / secs:.1f} MB/s"),
    ]
