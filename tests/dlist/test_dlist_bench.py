"""The dlist benchmark: its input looks like transcript 11's APPLY MAILBOX, and it runs."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dlist_testlib import SKELETONS, parse_all, transcript_lines

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tools" / "bench"
sys.path.insert(0, str(ROOT / "tools"))

from benchmarks.dlist_codec import apply_mailbox


def test_the_generated_line_is_shaped_like_transcript_11():
    data = apply_mailbox(20_000)
    # Transcript 11's line is 6,187,761 bytes for the same 20,000 records.
    assert 6_000_000 < len(data) < 6_400_000
    (line,) = parse_all(data)
    records = line.value.get_list("RECORD")
    assert len(records) == 20_000

    (real,) = [l for l in transcript_lines(next(p for p in SKELETONS if p.name.startswith("11-")), "C")
               if l.startswith(b"APPLY MAILBOX")]
    head = real[:real.index(b" RECORD (")]
    assert line.value.keys()[:-1] == parse_all(head + b")\r\n")[0].value.keys()
    first = re.search(rb"%\(UID 1 .*?\)\)\)", real).group(0)
    (sample,) = parse_all(b"APPLY X " + first + b"\r\n")
    assert records[0].keys() == sample.value.keys()
    assert [a.get_atom("ENTRY") for a in records[0].get_list("ANNOTATIONS")] == \
        [a.get_atom("ENTRY") for a in sample.value.get_list("ANNOTATIONS")]


@pytest.mark.skipif(not BENCH.exists(), reason="tools/bench is not in the tree")
def test_bench_dlist_quick_prints_figures():
    r = subprocess.run([sys.executable, str(BENCH), "dlist", "--quick", "--json"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    figures = {f["name"]: f for f in json.loads(r.stdout)["results"]["dlist"]["figures"]}
    assert figures["text parse"]["target"] == 30
    assert figures["binary decode vs text parse"]["target"] == 5
    assert all(f["value"] > 0 for f in figures.values())
