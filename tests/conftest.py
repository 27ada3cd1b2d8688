"""Fixtures shared by the tests at the top of tests/: fresh stores.

Stores go to a directory of their own on a RAM disk when the machine has one
(every batch an import commits is fsynced; on a busy disk that is most of a
test's time), else under pytest's tmp_path.  Only that directory is removed.
Test directories with their own conftest.py (store/, changes/, csync/) define
their own ``store`` and ``make_store``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from engine import Store


def _fast_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@pytest.fixture
def make_store(tmp_path):
    """A factory for stores in one test: make_store() -> Store (closed at the end)."""
    root = Path(tempfile.mkdtemp(prefix="modsync-test-", dir=_fast_root() or tmp_path))
    made = []

    def make(name: str | None = None) -> Store:
        s = Store.init(root / (name or f"store{len(made)}"))
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()          # closing again is harmless: a test may have closed it already
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def store(make_store):
    """A freshly initialised store, closed after the test."""
    return make_store("store")
