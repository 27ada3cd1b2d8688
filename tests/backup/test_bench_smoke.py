"""tools/benchmarks/backup.py still runs (small corpus; restic's figures when it is installed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_backup_quick_prints_figures(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench"), "backup", "--quick",
                        "--json", "--workdir", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = {f["name"]: f for f in json.loads(r.stdout)["results"]["backup"]["figures"]}
    for what in ("first backup", "bytes stored after the first backup",
                 "incremental backup after 1% changes", "full verify (every byte read and hashed)",
                 "single-message restore"):
        assert f"modsync: {what}" in figures
        assert figures[f"modsync: {what}"]["value"] > 0
