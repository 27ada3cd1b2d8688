"""Fixtures for the replication service tests: real `modsync serve` processes on 127.0.0.1.

* ``new_store(name, admin=True, accounts=())``: a fresh store (its path) with
  an admin account ``admin`` / ``secret``;
* ``serve(path, *args)``: ``modsync serve --store PATH --listen 127.0.0.1:0``,
  waiting until it listens (util.Served: ``.address``, ``.stop()`` = SIGTERM,
  ``.kill()`` = SIGKILL, ``.start()`` again, ``.log()``); every process is
  killed at the end of the test whatever happens;
* ``cli(*argv)``: ``modsync`` in this process (the client side);
* ``spawn(*argv)``: a ``modsync`` subprocess (rolling push, follow).

Only 127.0.0.1, and only ports the kernel picks (port 0).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

import engine.accounts
from engine import Store
from engine.accounts import add_account

from .util import ADMIN, PASSWORD, Served, command, run_cli


def pytest_configure(config):
    config.addinivalue_line("markers", "network_harness: the randomized master/master harness "
                                       "over real servers (MODSYNC_NET_SEEDS=N for more seeds)")


def _fast_root(tmp_path: Path) -> Path:
    # Every commit fsyncs; a RAM disk keeps the many small stores quick.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="modsync-service-", dir=shm))
    return tmp_path


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    """Accounts made by the tests hash fast (a check uses the cost stored with the hash)."""
    monkeypatch.setattr(engine.accounts, "SCRYPT_N", 1 << 10)


@pytest.fixture
def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith("MODSYNC_")}
    e["MODSYNC_CONFIG"] = os.devnull
    e["PYTHONUNBUFFERED"] = "1"
    return e


@pytest.fixture
def root(tmp_path):
    r = _fast_root(tmp_path)
    yield r
    if r != tmp_path and r.name.startswith("modsync-service-"):
        shutil.rmtree(r, ignore_errors=True)


@pytest.fixture
def new_store(root):
    def make(name: str, *, admin: bool = True, accounts=()) -> Path:
        path = root / name
        with Store.init(path) as s:
            if admin:
                add_account(s, ADMIN, PASSWORD, admin=True)
            for acct, pw, kw in accounts:
                add_account(s, acct, pw, **kw)
        return path
    return make


@pytest.fixture
def serve(env, tmp_path):
    procs: list[Served] = []
    logdir = tmp_path / "logs"
    logdir.mkdir(exist_ok=True)

    def start(store: Path, *args, extra_env=None) -> Served:
        s = Served(store, [str(a) for a in args], dict(env, **(extra_env or {})), logdir)
        procs.append(s)
        return s
    yield start
    for p in procs:
        p.kill()


@pytest.fixture
def spawn(env, tmp_path):
    """A modsync subprocess that the test stops (SIGTERM) or that is killed at teardown."""
    procs = []

    def start(*argv, extra_env=None) -> subprocess.Popen:
        n = len(procs)
        with open(tmp_path / f"spawn-{n}.out", "wb") as out, \
                open(tmp_path / f"spawn-{n}.err", "wb") as err:
            p = subprocess.Popen(command() + [str(a) for a in argv], stdout=out, stderr=err,
                                 env=dict(env, **(extra_env or {})), start_new_session=True)
        p.outfile, p.errfile = out.name, err.name
        procs.append(p)
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)


@pytest.fixture
def cli(monkeypatch):
    for var in ("MODSYNC_STORE", "MODSYNC_CONFIG", "MODSYNC_LOG_LEVEL", "MODSYNC_ACCOUNT",
                "MODSYNC_PASSWORD", "MODSYNC_PASSWORD_FILE"):
        monkeypatch.delenv(var, raising=False)
    return run_cli


@pytest.fixture
def pwfile(tmp_path) -> Path:
    p = tmp_path / "admin.pw"
    p.write_text(PASSWORD + "\n")
    return p
