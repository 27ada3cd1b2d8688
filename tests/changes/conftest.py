"""Fixtures for the change set tests.  ``make_store`` comes from tests/conftest.py."""
from __future__ import annotations

import os
import tempfile

import pytest

from tests.conftest import _fast_root


@pytest.fixture
def workdir(tmp_path):
    """Where the convergence harness puts its replicas (cleaned up by the harness)."""
    d = tempfile.mkdtemp(prefix="modsync-changes-", dir=_fast_root() or tmp_path)
    yield d
    try:
        os.rmdir(d)
    except OSError:
        pass
