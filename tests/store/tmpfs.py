"""Scratch directories for tests that create many stores or make thousands of commits.

Each commit fsyncs (LMDB and the blob pack); on a busy disk that costs
milliseconds, so the property tests would spend most of their time waiting.
They work in /dev/shm when it exists (tmpfs: fsync is free, the code path is
unchanged).  Durability itself is tested by test_faults with real processes.
"""
from __future__ import annotations

import os
import tempfile

_SHM = "/dev/shm"


def mkdtemp(prefix: str = "modsync-test-") -> str:
    base = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)
