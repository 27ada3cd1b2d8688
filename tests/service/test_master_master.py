"""Master/master over the network: the change-set convergence harness, with every exchange
going through real `modsync serve` processes.

The operations and the oracle are tests/changes/harness.py's: each replica
(a store with its own `modsync serve`) takes random operations of every
kind; exchanges are network pushes (speculative: built against the cached
state of the replica, rejected, merged, sent again) and network pulls (the
replica asks for changes since its own state and merges them), in random
order over random partitions; at the end the replicas heal by pushing
pairwise, and must have equal digests and state vectors, pass verify, and
have lost no message (see the harness's docstring).

A few seeds run in CI; more with::

    MODSYNC_NET_SEEDS=200 python -m pytest tests/service/test_master_master.py
    MODSYNC_NET_SEEDS=50 MODSYNC_NET_SEED_START=1000 MODSYNC_NET_OPS=40 python -m pytest ...
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from changes import harness  # tests/changes (pytest puts tests/ on sys.path)
from changes.harness import EXCHANGES, Failure, Generator, World, seeded_ids

from engine.accounts import add_account
from engine.client import Client
from engine.errors import NoSuchUser
from engine.replication import Puller, Pusher

from .util import ADMIN, PASSWORD, Served

SEEDS = int(os.environ.get("MODSYNC_NET_SEEDS", "3"))
START = int(os.environ.get("MODSYNC_NET_SEED_START", "1"))
OPS = int(os.environ.get("MODSYNC_NET_OPS", "18"))


class NetWorld(World):
    """harness.World whose exchanges go over the network between real servers."""

    def __init__(self, root: Path, seed: int, n: int, env: dict, logdir: Path):
        super().__init__(root, seed, n)
        self.servers: list[Served] = []
        for s in self.replicas:
            add_account(s, ADMIN, PASSWORD, admin=True)
        for s in self.replicas:
            self.servers.append(Served(s.path, [], env, logdir))
        self.pushers: dict = {}
        self.pullers: dict = {}
        self.stats.update({"net_push": 0, "net_pull": 0, "net_merged": 0})

    def _connect(self, dst: int):
        address = self.servers[dst].address
        return lambda: Client(address, account=ADMIN, password=PASSWORD, timeout=30)

    def close(self) -> None:
        for p in list(self.pushers.values()) + list(self.pullers.values()):
            p.disconnect()
        for srv in self.servers:
            srv.stop(10)
        super().close()

    def push(self, src: int, dst: int) -> str:
        """A network push of src's user to dst's server (speculative, with merge)."""
        p = self.pushers.get((src, dst))
        if p is None:
            p = self.pushers[(src, dst)] = Pusher(self.replicas[src], self._connect(dst),
                                                  address=self.servers[dst].address,
                                                  allow_mass_delete=True)
        before = (self._state(src), self._state(dst))
        out = p.push_user(harness.USER)
        self.stats["net_push"] += 1
        self.stats["net_merged"] += out.rounds > 1
        if out.status not in ("sent", "nothing"):
            raise Failure(f"net-push-{out.status}", f"step {self.step_no} push {src}->{dst}: "
                          f"{out.detail}")
        self.observe(dst, by_op=None)
        self.observe(src, by_op=None)
        return "nothing" if (self._state(src), self._state(dst)) == before else "moved"

    def pull(self, src: int, dst: int) -> None:
        """dst pulls from src's server (merging whatever dst changed meanwhile)."""
        p = self.pullers.get((src, dst))
        if p is None:
            p = self.pullers[(src, dst)] = Puller(self.replicas[dst], self._connect(src),
                                                  address=self.servers[src].address,
                                                  allow_mass_delete=True)
        out = p.pull_user(harness.USER)
        self.stats["net_pull"] += 1
        if out.status not in ("sent", "nothing"):
            raise Failure(f"net-pull-{out.status}", f"step {self.step_no} pull {src}->{dst}: "
                          f"{out.detail}")
        self.observe(dst, by_op=None)

    def exchange(self, step: tuple) -> None:
        mode = step[0]
        if mode in ("snap", "reapply"):
            return super().exchange(step)
        src, dst = step[1], step[2]
        try:
            self.replicas[src].user_info(harness.USER)
        except NoSuchUser:
            return
        if mode == "push":
            self.push(src, dst)
        else:               # file, oneway, stale: the receiver pulls over the network
            self.pull(src, dst)


def run_net_seed(seed: int, env: dict, logdir: Path, workdir: str) -> harness.Outcome:
    n = harness.replicas_for(seed)
    root = Path(tempfile.mkdtemp(prefix=f"net-{seed}-", dir=workdir))
    taken: list = []
    world = None
    try:
        with seeded_ids(seed):
            world = NetWorld(root, seed, n, env, logdir)
            try:
                gen = Generator(seed, n, OPS)
                ops = 0
                while ops < OPS:
                    st = gen.next(world)
                    taken.append(st)
                    world.step(st)
                    if st[0] not in EXCHANGES and st[0] != "snap":
                        ops += 1
                world.check_all()
            except Failure as f:
                return harness.Outcome(seed, taken, f, dict(world.stats))
            return harness.Outcome(seed, taken, None, dict(world.stats))
    finally:
        if world is not None:
            world.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.network_harness
@pytest.mark.parametrize("seed", range(START, START + SEEDS))
def test_master_master_converges_over_the_network(seed, env, tmp_path, root):
    outcome = run_net_seed(seed, env, tmp_path, str(root))
    if outcome.failure is not None:
        lines = [f"seed={seed} {outcome.failure}", "steps = ["]
        lines += [f"    {st!r}," for st in outcome.steps]
        lines.append("]")
        pytest.fail("\n".join(lines), pytrace=False)
    assert outcome.stats["net_push"] > 0
