"""Backup: modsync archives against restic on the same Maildir corpus, in the same run.

Corpus: 20,000 messages of tools/corpus.py's realistic size mix (about 220 MB,
7 % with attachments, some over 1 MB), written as a Maildir and imported
into a store (the import is timed, but it is not a backup step: modsync backs
up a store, restic the Maildir files).

Figures, each for modsync and restic (from Debian's package; skipped with a
note when ``restic`` is not on PATH), the modsync one with restic's as its
target ("at least as fast as restic on each and no larger", issue 7):

* first backup: `modsync backup --store S --to A` / `restic backup MAILDIR`;
* bytes stored: disk blocks of every file of the archive / repository;
* incremental backup after 1 % of the messages changed (the same changes on
  both sides: 0.5 % re-flagged -- a rename in the Maildir --, 0.25 % new,
  0.25 % expunged -- deleted files);
* full verify: `modsync verify --archive A` / `restic check --read-data`;
* single-message restore: one message out of 20,000 into a new Maildir /
  `restic restore latest --include FILE`;
* the CPU time (user + system, all threads) of each of those commands,
  steadier than the wall clock on a shared machine.

Every command runs as a separate process, as an operator would run it, so
both sides pay their start-up.  Backups and verify are the best of ``RUNS``
(fresh archive/repository for each first backup).  ``--quick`` shrinks the
corpus to 300 messages: a smoke run, figures not meaningful.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import corpus  # tools/corpus.py: tools/bench puts tools/ on sys.path
from benchmarks import Figure

NAME = "backup"
USER = "bench"
SEED = 1
MESSAGES, MESSAGES_QUICK = 20_000, 300
CHANGE_SHARE = 0.01
RUNS, RUNS_QUICK = 2, 1
RESTIC_PASSWORD = "modsync-bench"
MB = 1e6
CPU: dict[str, list[float]] = {}


def note(text: str) -> None:
    print(f"   [{NAME}] {text}", file=sys.stderr, flush=True)


def modsync(*args, check: bool = True) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "engine.cli", "-q", *map(str, args)]
    p = subprocess.run(cmd, env=env, capture_output=True, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.decode()[-500:]}")
    return p


def restic(repo: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, RESTIC_PASSWORD=RESTIC_PASSWORD, RESTIC_REPOSITORY=str(repo),
               RESTIC_CACHE_DIR=str(repo.parent / "restic-cache"))
    p = subprocess.run(["restic", "-q", *map(str, args)], env=env, capture_output=True,
                       check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"restic {' '.join(map(str, args))}: exit {p.returncode}: "
                           f"{p.stderr.decode()[-500:]}")
    return p


def timed(fn, label: str | None = None) -> float:
    """Wall seconds of fn(); the CPU seconds of the processes it ran go to CPU[label]."""
    c0 = os.times()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    c1 = os.times()
    if label is not None:
        CPU.setdefault(label, []).append((c1.children_user - c0.children_user)
                                         + (c1.children_system - c0.children_system))
    return wall


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def run(quick: bool, workdir: Path) -> list[Figure]:
    n = MESSAGES_QUICK if quick else MESSAGES
    runs = RUNS_QUICK if quick else RUNS
    have_restic = shutil.which("restic") is not None
    if not have_restic:
        note("restic is not installed (apt-get install restic): restic figures skipped")
    CPU.clear()
    maildir = workdir / "maildir"
    mails = list(corpus.generate(n, SEED))
    nbytes = sum(len(m.body) for m in mails)
    corpus.write_maildir(maildir, mails, corpus.DEFAULT_FOLDERS[:4], seed=SEED)
    del mails
    size_note = f"{n:,} msgs, {nbytes / MB:.0f} MB, files in page cache"
    figures: list[Figure] = []

    store = workdir / "store"
    modsync("init", "--store", store)
    secs = timed(lambda: modsync("import", "--store", store, "-u", USER, "--maildir", maildir))
    figures.append(Figure("import Maildir into the store (not a backup step)", secs, "s",
                          better="lower", note=size_note))

    # -- first backup ------------------------------------------------------------------
    m_first, r_first = [], []
    for i in range(runs):
        arc = workdir / f"archive-{i}"
        m_first.append(timed(lambda arc=arc: modsync("backup", "--store", store, "--to", arc),
                             "m_first"))
        if have_restic:
            repo = workdir / f"restic-{i}"
            restic(repo, "init")
            r_first.append(timed(lambda repo=repo: restic(repo, "backup", maildir), "r_first"))
    arc = workdir / f"archive-{runs - 1}"
    repo = workdir / f"restic-{runs - 1}"
    figures += pair("first backup", min(m_first), min(r_first) if r_first else None, "s",
                    size_note)
    figures += pair("bytes stored after the first backup", tree_bytes(arc) / MB,
                    tree_bytes(repo) / MB if have_restic else None, "MB",
                    f"corpus {nbytes / MB:.0f} MB; disk blocks of every file")

    # -- 1 % of the messages change ----------------------------------------------------------
    change(store, maildir, n, workdir)
    m_incr = timed(lambda: modsync("backup", "--store", store, "--to", arc), "m_incr")
    r_incr = timed(lambda: restic(repo, "backup", maildir), "r_incr") if have_restic else None
    figures += pair(f"incremental backup after {CHANGE_SHARE:.0%} changes", m_incr, r_incr, "s",
                    "re-flag 0.5 %, add 0.25 %, expunge 0.25 %")
    figures += pair("bytes stored after the incremental", tree_bytes(arc) / MB,
                    tree_bytes(repo) / MB if have_restic else None, "MB")

    # -- full verify -------------------------------------------------------------------------
    m_verify = min(timed(lambda: modsync("verify", "--archive", arc), "m_verify")
                   for _ in range(runs))
    r_verify = min(timed(lambda: restic(repo, "check", "--read-data"), "r_verify")
                   for _ in range(runs)) if have_restic else None
    figures += pair("full verify (every byte read and hashed)", m_verify, r_verify, "s",
                    "modsync verify --archive / restic check --read-data")

    # -- single-message restore -------------------------------------------------------------
    target_file = pick_message(maildir)
    uid = uids_by_file(store, target_file.parent)[target_file.name]
    m_restore = []
    for i in range(runs):
        out = workdir / f"restore-m-{i}"
        m_restore.append(timed(lambda out=out: modsync("restore", "--archive", arc, "-u", USER,
                                               "-m", "INBOX", "--uid", uid, "--maildir", out),
                               "m_restore"))
    files = [p for p in (workdir / "restore-m-0").rglob("*") if p.is_file()
             and p.parent.name in ("cur", "new")]
    assert len(files) == 1 and files[0].read_bytes() == target_file.read_bytes(), files
    r_restore = []
    if have_restic:
        for i in range(runs):
            out = workdir / f"restore-r-{i}"
            r_restore.append(timed(lambda out=out: restic(repo, "restore", "latest", "--target", out,
                                                  "--include", str(target_file)), "r_restore"))
    store_restore = timed(lambda: modsync("restore", "--archive", arc, "-u", USER, "-m",
                                          "INBOX", "--uid", uid, "--store", store,
                                          "--into", "Restored"))
    figures += pair("single-message restore", min(m_restore),
                    min(r_restore) if r_restore else None, "s",
                    f"1 of {n:,} into a new Maildir / restic restore --include")
    figures.append(Figure("modsync: single-message restore into the live store", store_restore,
                          "s", better="lower"))
    for step, what in (("first", "first backup"), ("incr", "incremental backup"),
                       ("verify", "full verify"), ("restore", "single-message restore")):
        mine = min(CPU.get(f"m_{step}", [0.0]))
        theirs = min(CPU[f"r_{step}"]) if f"r_{step}" in CPU else None
        figures += pair(f"{what}, CPU", mine, theirs, "s", "user + system, all threads")
    CPU.clear()
    return figures


def pair(what: str, mine: float, theirs: float | None, unit: str, note_: str = "") -> list[Figure]:
    out = [Figure(f"modsync: {what}", mine, unit, theirs, better="lower", note=note_)]
    if theirs is not None:
        out.append(Figure(f"restic:  {what}", theirs, unit, better="lower"))
    return out


def pick_message(maildir: Path) -> Path:
    files = sorted((maildir / "cur").iterdir())
    return files[len(files) // 2]


def uids_by_file(store: Path, folder: Path) -> dict[str, int]:
    """Maildir file name -> the UID the store gave that message (matched by content)."""
    from engine.blobs import address_of

    from engine import Store
    s = Store.open(store, readonly=True)
    try:
        by_address = {r.address: r.uid for r in s.records(USER, "INBOX")}
    finally:
        s.close()
    return {p.name: by_address[address_of(p.read_bytes())] for p in folder.iterdir()}


def change(store: Path, maildir: Path, n: int, workdir: Path) -> None:
    """The same 1 % change on both sides: the Maildir (for restic) and the store."""
    rng = random.Random(SEED)
    k = max(int(n * CHANGE_SHARE), 4)
    inbox = sorted((maildir / "cur").iterdir())
    picks = rng.sample(range(len(inbox)), k // 2 + k // 4)
    flag, gone = picks[:k // 2], picks[k // 2:]
    uids = uids_by_file(store, maildir / "cur")
    flag_uids = [uids[inbox[i].name] for i in flag]
    gone_uids = [uids[inbox[i].name] for i in gone]
    for i in flag:
        p = inbox[i]
        base, _, letters = p.name.partition(":2,")
        p.rename(p.with_name(f"{base}:2,{''.join(sorted(set(letters) | {'F'}))}"))
    for i in gone:
        inbox[i].unlink()
    new = list(corpus.generate(k // 4, SEED + 1))
    newdir = workdir / "new-mail"
    corpus.write_maildir(newdir, new, ["INBOX"], seed=SEED + 1)
    for p in sorted((newdir / "cur").iterdir()) + sorted((newdir / "new").iterdir()):
        shutil.copy2(p, maildir / "new" / (p.name.split(":2,")[0] + ".added"))
    modsync("flags", "add", "--store", store, "-u", USER, "-m", "INBOX", "--uid",
            ",".join(map(str, flag_uids)), "\\Flagged")
    modsync("expunge", "--store", store, "-u", USER, "-m", "INBOX", "--uid",
            ",".join(map(str, gone_uids)))
    modsync("import", "--store", store, "-u", USER, "--maildir", newdir)
