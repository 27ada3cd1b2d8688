"""Fixtures for the change set tests: fresh stores, and a fast place for many of them."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from engine import Store


def _fast_root() -> str | None:
    # Every commit fsyncs; the convergence runs make thousands of stores, so
    # they go to a RAM disk where the machine has one.
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@pytest.fixture
def make_store(tmp_path):
    """A factory for stores in one test: make_store() -> Store (closed at the end)."""
    root = Path(tempfile.mkdtemp(prefix="modsync-changes-", dir=_fast_root() or tmp_path))
    made = []

    def make(name: str | None = None) -> Store:
        s = Store.init(root / (name or f"store{len(made)}"))
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path):
    """Where the convergence harness puts its replicas (cleaned up by the harness)."""
    root = _fast_root()
    d = tempfile.mkdtemp(prefix="modsync-changes-", dir=root or tmp_path)
    yield d
    try:
        os.rmdir(d)
    except OSError:
        pass
