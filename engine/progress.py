"""Progress reporting for long work: a bar on a terminal, log lines otherwise.

Engine code takes a ``Progress`` (or None) and calls ``start``/``advance``/
``finish``; it never knows how progress is shown.  The CLI picks
``for_terminal()``: a tqdm bar (items, bytes, rate, time left) when stderr
is a terminal, and a log line every ``interval`` seconds when it is not
(cron, systemd), so long runs are visible in the journal.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("modsync.progress")


class Progress:
    """The interface, and the silent implementation."""

    def start(self, label: str, total_items: int | None = None,
              total_bytes: int | None = None) -> None:
        pass

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass


class LogProgress(Progress):
    """A log line at most every ``interval`` seconds, and one at the end."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval

    def start(self, label, total_items=None, total_bytes=None):
        self.label, self.total = label, total_items
        self.items = self.bytes = 0
        self.t0 = self.last = time.monotonic()

    def advance(self, items=1, nbytes=0):
        self.items += items
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line("progress")

    def finish(self):
        self._line("done")

    def _line(self, what):
        dt = max(time.monotonic() - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        left = ""
        if self.total and self.items:
            left = f", {max(self.total - self.items, 0) * dt / self.items:.0f} s left"
        log.info("%s %s: %d%s items, %.1f MB, %.0f items/s%s", self.label, what, self.items, of,
                 self.bytes / 1e6, self.items / dt, left)


class BarProgress(Progress):
    """A tqdm bar on stderr, redrawn at most ``interval`` seconds apart.

    ``advance`` runs once per message of an import: it only adds numbers
    until the next redraw is due, so the bar costs nothing measurable.
    """

    interval = 0.1

    def start(self, label, total_items=None, total_bytes=None):
        from tqdm import tqdm
        self.bar = tqdm(total=total_items, desc=label, unit="msg", file=sys.stderr,
                        dynamic_ncols=True, leave=True, mininterval=0)   # advance throttles
        self.bytes = 0
        self.pending = 0
        self.t0 = self.next = time.monotonic()

    def advance(self, items=1, nbytes=0):
        self.bytes += nbytes
        self.pending += items
        now = time.monotonic()
        if now >= self.next:
            self._draw(now)

    def _draw(self, now):
        self.next = now + self.interval
        dt = max(now - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.bytes / 1e6:.1f} MB, {self.bytes / 1e6 / dt:.1f} MB/s",
                                 refresh=False)
        self.bar.update(self.pending)
        self.pending = 0

    def finish(self):
        self._draw(time.monotonic())
        self.bar.close()


def for_terminal(quiet: bool = False) -> Progress:
    if quiet:
        return Progress()
    return BarProgress() if sys.stderr.isatty() else LogProgress()
