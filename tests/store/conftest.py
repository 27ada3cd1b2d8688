"""Fixtures for the store tests: fresh stores in a scratch directory.

The scratch directory is on tmpfs when there is one (see tmpfs.py): these
tests commit thousands of transactions and would otherwise spend most of
their time in fsync on a busy disk.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from engine import Store
from engine.errors import ModsyncError

from . import tmpfs


@pytest.fixture
def scratch():
    """An empty directory, removed after the test."""
    path = Path(tmpfs.mkdtemp())
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store_path(scratch):
    return scratch / "store"


@pytest.fixture
def store(store_path):
    """A freshly initialised store, closed after the test."""
    s = Store.init(store_path)
    yield s
    s.close()


@pytest.fixture
def make_store(scratch):
    """A factory for more stores in the same test: make_store() -> Store (closed at the end)."""
    made = []

    def make(name: str | None = None) -> Store:
        s = Store.init(scratch / (name or f"store{len(made)}"))
        made.append(s)
        return s
    yield make
    for s in made:
        with contextlib.suppress(ModsyncError, OSError):   # a test may have closed it
            s.close()
