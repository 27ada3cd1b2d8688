"""Benchmarks run by tools/bench.  One module per area; see tools/bench."""
from __future__ import annotations

from dataclasses import dataclass, asdict
import time
from contextlib import contextmanager


@dataclass
class Figure:
    """One measured number.  `target` and `better` ("higher"/"lower") say what we aim for."""

    name: str
    value: float
    unit: str
    target: float | None = None
    better: str = "higher"
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.better == "higher" else self.value <= self.target

    def as_dict(self) -> dict:
        d = asdict(self)
        d["met"] = self.met
        return d

    def render(self) -> str:
        v = f"{self.value:,.3f}" if abs(self.value) < 100 else f"{self.value:,.0f}"
        s = f"{self.name:<58} {v:>14} {self.unit}"
        if self.target is not None:
            op = ">=" if self.better == "higher" else "<="
            s += f"   target {op} {self.target:g}: {'met' if self.met else 'MISSED'}"
        if self.note:
            s += f"   ({self.note})"
        return s


@contextmanager
def timer():
    """`with timer() as t: ...` then t() gives elapsed seconds."""
    start = time.perf_counter()
    end = None

    def elapsed():
        return (end if end is not None else time.perf_counter()) - start

    try:
        yield elapsed
    finally:
        end = time.perf_counter()
