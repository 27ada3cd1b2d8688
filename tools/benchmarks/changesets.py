"""Change sets: build and apply cost, full diffs, and growth with the number of changes.

Figures (issue 4):
* 1% flag changes on a 100k-message user: build + apply time and bytes;
* a first full diff of 20,000 messages, written and applied (messages/s);
* diff size and time for 10, 100 and 1000 changes on users of 10k and 100k
  messages: they must grow with the changes, not the mailbox.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks import Figure

NAME = "changesets"


def _corpus(n: int):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import corpus
    return [m for m in corpus.generate(n, 7, size_mix="small4k")]


def _fill(store, user: str, mails) -> None:
    from engine import Message
    store.create_mailbox(user, "INBOX")
    batch = []
    for m in mails:
        batch.append(Message(m.body, tuple(m.flags), m.internaldate))
        if len(batch) == 2000:
            store.append_many(user, "INBOX", batch)
            batch = []
    if batch:
        store.append_many(user, "INBOX", batch)


def _flag_changes(store, user: str, n: int, total: int, tag: str) -> None:
    step = max(total // n, 1)
    uids = [(u, u) for u in range(1, total + 1, step)][:n]
    store.set_flags(user, "INBOX", uids, [tag], mode="add")


def run(quick: bool, workdir: Path) -> list[Figure]:
    from engine import Store
    from engine.apply import apply
    from engine.changeset import build, state_of
    from engine.difffile import read_diff, write_diff

    big = 5_000 if quick else 100_000
    full = 1_000 if quick else 20_000
    figures: list[Figure] = []
    mails = _corpus(big)

    # A master with `big` messages and a replica that has everything.
    master = Store.init(workdir / "master")
    replica = Store.init(workdir / "replica")
    _fill(master, "u", mails)
    cs = build(master, "u", {})
    apply(replica, cs, bodies=master.read_body)

    # 1% flag changes: build, encode, apply.
    n = big // 100
    _flag_changes(master, "u", n, big, "$Bench")
    t0 = time.perf_counter()
    cs = build(master, "u", state_of(replica, "u"))
    data = cs.encode()
    t1 = time.perf_counter()
    r = apply(replica, type(cs).decode(data), bodies=master.read_body)
    t2 = time.perf_counter()
    assert r.status == "applied", r.as_dict()
    figures += [
        Figure(f"1% flag changes on {big:,} msgs: build+encode", (t1 - t0) * 1000, "ms",
               better="lower", note=f"{len(cs.items)} objects"),
        Figure(f"1% flag changes on {big:,} msgs: apply", (t2 - t1) * 1000, "ms", better="lower"),
        Figure(f"1% flag changes on {big:,} msgs: change set size", len(data), "bytes",
               better="lower"),
    ]

    # A first full diff of `full` messages, through a diff file.
    src = Store.init(workdir / "full-src")
    dst = Store.init(workdir / "full-dst")
    _fill(src, "u", mails[:full])
    t0 = time.perf_counter()
    _, size = write_diff(src, "u", {}, workdir / "full.diff")
    t1 = time.perf_counter()
    _, fcs, bodies = read_diff(workdir / "full.diff")
    r = apply(dst, fcs, bodies=bodies)
    t2 = time.perf_counter()
    assert r.status == "applied"
    figures += [
        Figure(f"first full diff of {full:,} msgs: write", full / (t1 - t0), "msg/s"),
        Figure(f"first full diff of {full:,} msgs: read+apply", full / (t2 - t1), "msg/s"),
        Figure(f"first full diff of {full:,} msgs: file size", size / 1e6, "MB",
               better="lower"),
    ]

    # Growth: diff size and time for k changes on two mailbox sizes.
    small_n = big // 10
    small = Store.init(workdir / "small")
    _fill(small, "u", mails[:small_n])
    for store, total in ((small, small_n), (master, big)):
        for k in (10, 100, 1000):
            base = state_of(store, "u")
            _flag_changes(store, "u", k, total, f"$G{k}")
            t0 = time.perf_counter()
            for _ in range(5):
                cs = build(store, "u", base)
                data = cs.encode()
            dt = (time.perf_counter() - t0) / 5
            figures.append(Figure(f"{k} changes on {total:,} msgs: build+encode", dt * 1000, "ms",
                                  better="lower", note=f"{len(data):,} bytes"))
    for s in (master, replica, src, dst, small):
        s.close()
    return figures
