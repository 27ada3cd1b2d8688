"""Fixtures for the csync tests: a modsync csync server, and real Cyrus 3.6 peers.

Real peers are started once per test module (one Cyrus master feeding the
modsync server, or one Cyrus replica that modsync pushes into) and skipped,
with the reason, when Cyrus is not installed.  Every peer lives in a fresh
``mkdtemp`` directory under /tmp, and only that directory is ever removed.
"""
from __future__ import annotations

import shutil

import pytest

from engine import Store
from engine.accounts import add_account
from engine.csync.server import ServerThread

from cyruslib import cyrus_peer


def pytest_collection_modifyitems(items):
    for item in items:
        if "cyrus_master" in item.fixturenames or "cyrus_replica" in item.fixturenames:
            item.add_marker(pytest.mark.interop)


@pytest.fixture
def store(tmp_path):
    """A fresh store (the csync tests do not rely on tests/conftest.py)."""
    s = Store.init(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture(scope="module")
def peer_base():
    base = cyrus_peer.short_tempdir("mcy")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def replica_store(peer_base):
    """The modsync store a Cyrus master replicates into (one per module)."""
    store = Store.init(peer_base / "store")
    add_account(store, *cyrus_peer.REPL, admin=True)
    yield store
    store.close()


@pytest.fixture(scope="module")
def csync_server(replica_store):
    with ServerThread(replica_store) as srv:
        yield srv


@pytest.fixture(scope="module")
def cyrus_master(peer_base, csync_server):
    """A real Cyrus 3.6 master whose sync_client talks to the modsync csync server."""
    why = cyrus_peer.missing()
    if why:
        pytest.skip(why)
    cy = cyrus_peer.Cyrus(peer_base, "master", sync_port=csync_server.port)
    cy.start()
    yield cy
    cy.destroy()


@pytest.fixture(scope="module")
def cyrus_replica(peer_base):
    """A real Cyrus 3.6 instance running sync_server, for modsync to push into."""
    why = cyrus_peer.missing()
    if why:
        pytest.skip(why)
    cy = cyrus_peer.Cyrus(peer_base, "replica", csync=True)
    cy.start()
    yield cy
    cy.destroy()
