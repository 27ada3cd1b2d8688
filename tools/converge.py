#!/usr/bin/env python3
"""Run the change-set convergence harness over many seeds.

    tools/converge.py --seeds 10000                 # seeds 0..9999, the long run
    tools/converge.py --seeds 200 --start 5000 --replicas 3 --ops 40
    tools/converge.py --seed 1234                   # one seed, shrunk and printed
    tools/converge.py --seeds 10000 --time-budget 1800 --jobs 2

Each seed builds two or three replicas in a temporary directory (by default
three for every fifth seed), runs random operations of every kind with
exchanges over random partitions, heals, and checks convergence and the
message oracle (see tests/changes/harness.py).  A failing seed is shrunk to a
minimal step list and printed as Python literals that
``harness.replay(seed, replicas, steps)`` runs again.

The summary at the end gives seeds run, failures by category with their
seeds, and the time taken.  Exit status: 0 when every seed passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "changes"))

import harness


def _workdir() -> str | None:
    # Stores fsync every commit; a RAM disk keeps long runs fast where there is one.
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _one(args) -> tuple[int, int, str | None, str | None, list]:
    seed, replicas, ops, strict, exclude, paranoid = args
    n = replicas or harness.replicas_for(seed)
    o = harness.run_seed(seed, n_replicas=n, n_ops=ops, workdir=_workdir(),
                         strict_renumber=strict, exclude=exclude, paranoid=paranoid)
    if o.ok:
        return seed, n, None, None, o.steps
    return seed, n, o.failure.category, str(o.failure), o.steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=500, help="how many seeds (default 500)")
    p.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seed", type=int, help="run just this seed, verbosely")
    p.add_argument("--replicas", type=int, choices=(2, 3),
                   help="replicas per seed (default: 3 for every fifth seed, else 2)")
    p.add_argument("--ops", type=int, default=18, help="operations per seed (default 18)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--time-budget", type=float, default=0,
                   help="stop starting new seeds after this many seconds (0: no limit)")
    p.add_argument("--shrink", type=int, default=3,
                   help="shrink and print this many failures per category (default 3)")
    p.add_argument("--shrink-budget", type=float, default=30.0,
                   help="seconds to spend shrinking one failure (default 30)")
    p.add_argument("--lenient-renumber", action="store_true",
                   help="do not fail when an expunged message lives on under a UID that a "
                        "conflict gave it elsewhere (category expunge-renumbered)")
    p.add_argument("--paranoid", action="store_true",
                   help="run verify_store on a replica after every step that touched it "
                        "(slower; catches damage that a later merge hides)")
    p.add_argument("--exclude", default="",
                   help="comma-separated operation kinds to leave out, e.g. delete,rename "
                        "(to look past a known bug); kinds: "
                        + ", ".join(k for k, _ in harness.OP_WEIGHTS))
    a = p.parse_args(argv)
    exclude = tuple(x for x in a.exclude.split(",") if x)
    unknown = set(exclude) - {k for k, _ in harness.OP_WEIGHTS}
    if unknown:
        p.error(f"unknown operation kinds: {', '.join(sorted(unknown))}")
    strict = not a.lenient_renumber

    if a.seed is not None:
        seeds = [a.seed]
    else:
        seeds = list(range(a.start, a.start + a.seeds))
    t0 = time.monotonic()
    failures: dict[str, list] = collections.defaultdict(list)
    shown = collections.Counter()
    done = 0
    work = [(s, a.replicas, a.ops, strict, exclude, a.paranoid) for s in seeds]

    def handle(res):
        nonlocal done
        seed, n, cat, msg, steps = res
        done += 1
        if cat is None:
            return
        failures[cat].append(seed)
        if shown[cat] < a.shrink:
            shown[cat] += 1
            outcome = harness.Outcome(seed, steps, harness.Failure(cat, msg.split("] ", 1)[-1]))
            small = harness.shrink(outcome, n, budget=a.shrink_budget, workdir=_workdir(),
                                   strict_renumber=strict)
            again = harness.replay(seed, n, small, workdir=_workdir(), strict_renumber=strict)
            print(harness.report(again if not again.ok else outcome, n, small, len(steps)),
                  flush=True)
            print(flush=True)
        if done % 500 == 0:
            print(f"... {done} seeds, {sum(map(len, failures.values()))} failing, "
                  f"{time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    stopped = False
    if a.jobs > 1:
        with multiprocessing.Pool(a.jobs) as pool:
            for res in pool.imap_unordered(_one, work, chunksize=4):
                handle(res)
                if a.time_budget and time.monotonic() - t0 > a.time_budget:
                    stopped = True
                    pool.terminate()
                    break
    else:
        for w in work:
            handle(_one(w))
            if a.time_budget and time.monotonic() - t0 > a.time_budget:
                stopped = True
                break

    elapsed = time.monotonic() - t0
    n_fail = sum(map(len, failures.values()))
    print(f"seeds run: {done} of {len(seeds)} (from {seeds[0]})"
          f"{' - time budget reached' if stopped else ''}")
    print(f"failures: {n_fail}")
    for cat, ss in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        more = f" ... (+{len(ss) - 20})" if len(ss) > 20 else ""
        print(f"  {cat}: {len(ss)}  seeds {sorted(ss)[:20]}{more}")
    print(f"time: {elapsed:.1f} s ({elapsed / max(done, 1) * 1000:.0f} ms per seed)")
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
