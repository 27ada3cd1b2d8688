"""Fixtures for the CLI tests.

* every test runs with its settings isolated: MODSYNC_STORE, MODSYNC_CONFIG
  and MODSYNC_LOG_LEVEL unset, and the default config file pointed at a
  path that does not exist;
* ``scratch``: an empty directory for the test (on tmpfs where there is
  one: every commit fsyncs), removed afterwards;
* ``store``: an empty store, also set as MODSYNC_STORE;
* ``alice``: a store (also MODSYNC_STORE) where user alice has INBOX with
  the three messages of ``runner.ALICE_BODIES`` at UIDs 1..3, saved with
  ``modsync save``, and an empty Archive;
* ``new_store(name)``: a store made by ``modsync init`` in scratch.

``store`` and ``alice`` are copies of templates built once per session, so
copies of one template share its store id: tests that exchange change sets
between two stores must make them with ``new_store``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from engine.cli import config as cli_config

from .runner import ALICE_BODIES, ok

NO_CONFIG = Path("/nonexistent/modsync-cli-tests/modsync.toml")


def _fast_dir(prefix: str) -> Path:
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


@pytest.fixture(scope="session", autouse=True)
def one_parser():
    """main() builds its parser once per session, not once per command.

    Building it imports nothing new but costs tens of milliseconds, most of
    an in-process run; a parser is reusable (every parse starts from a fresh
    namespace).  The subprocess tests and test_cli_schemas build their own.
    """
    import engine.cli
    parser = engine.cli.build_parser()
    patch = pytest.MonkeyPatch()
    patch.setattr(engine.cli, "build_parser", lambda: parser)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch):
    """No setting from the machine running the tests leaks in."""
    for var in (cli_config.ENV_STORE, cli_config.ENV_CONFIG, cli_config.ENV_LOG_LEVEL):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli_config, "DEFAULT_PATH", NO_CONFIG)


@pytest.fixture(scope="session")
def templates():
    """The template stores, built once: ``empty`` and ``alice``."""
    root = _fast_dir("modsync-cli-templates-")
    try:
        # Built before any test's isolation applies: name every setting.
        base = ("--config", os.devnull, "-q")
        ok("init", "--store", root / "empty", *base)
        store = ("--store", root / "alice", *base)
        ok("init", *store)
        ok("mailbox", "create", "-u", "alice", "INBOX", *store)
        ok("mailbox", "create", "-u", "alice", "Archive", *store)
        for uid, body in enumerate(ALICE_BODIES, 1):
            assert ok("save", "-u", "alice", "-m", "INBOX", *store, stdin=body).out == f"{uid}\n"
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def scratch():
    """An empty directory for this test, removed afterwards."""
    path = _fast_dir("modsync-cli-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _copy(templates: Path, name: str, scratch: Path, monkeypatch) -> Path:
    path = scratch / name
    shutil.copytree(templates / name, path)
    monkeypatch.setenv(cli_config.ENV_STORE, str(path))
    return path


@pytest.fixture
def store(templates, scratch, monkeypatch) -> Path:
    return _copy(templates, "empty", scratch, monkeypatch)


@pytest.fixture
def alice(templates, scratch, monkeypatch) -> Path:
    return _copy(templates, "alice", scratch, monkeypatch)


@pytest.fixture
def new_store(scratch):
    """new_store("a") -> the path of a fresh store (its own id) made by `modsync init`."""
    def make(name: str) -> Path:
        path = scratch / name
        ok("init", "--store", path, "-q")
        return path
    return make
