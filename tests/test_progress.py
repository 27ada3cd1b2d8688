"""engine.progress: the terminal bar counts every item although it redraws rarely."""
from __future__ import annotations

import io

from engine.progress import BarProgress


def test_bar_reaches_the_total_and_shows_bytes(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = BarProgress()
    bar.start("import x", total_items=5000)
    for _ in range(5000):
        bar.advance(1, 1000)
    assert bar.bar.n + bar.pending == 5000     # nothing lost between redraws
    bar.finish()
    assert bar.bar.n == 5000
    out = err.getvalue()
    assert "5000/5000" in out and "5.0 MB" in out
