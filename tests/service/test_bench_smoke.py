"""tools/benchmarks/replication.py still runs (small sizes; Dovecot's figure when installed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_replication_quick_prints_figures(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODSYNC_")}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench"), "replication", "--quick",
                        "--json", "--workdir", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, check=False, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = {f["name"]: f for f in json.loads(r.stdout)["results"]["replication"]["figures"]}
    for name in ("full replication: push to serve, 4 KB messages",
                 "full replication: pull from serve, 4 KB messages",
                 "no-op incremental push, big user", "no-op incremental pull, big user",
                 "1% flag changes: push", "pull --follow: commit to replica, median",
                 "pull --follow: commit to replica, 99th percentile",
                 "synchronous replica (received): commits/s, 8 writers",
                 "synchronous replica (durable): commits/s, 8 writers",
                 "synchronous replica (applied): commits/s, 8 writers"):
        assert figures[name]["value"] > 0, name
