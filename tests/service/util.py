"""Helpers for the replication service tests (conftest.py has the fixtures)."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli.runner import run

from engine import Store

ADMIN, PASSWORD = "admin", "secret"
START_TIMEOUT = 30.0


def command() -> list[str]:
    """The console script next to this interpreter, else on PATH, else `python -m engine.cli`."""
    here = Path(sys.executable).parent / "modsync"
    if here.exists():
        return [str(here)]
    found = shutil.which("modsync")
    return [found] if found else [sys.executable, "-m", "engine.cli"]


class Served:
    """One `modsync serve` process (run with --json; its first line lists the addresses)."""

    def __init__(self, store: Path, args, env, logdir: Path):
        self.store = store
        self.args = list(args)
        self.env = env
        self.logdir = logdir
        self.proc = None
        self.addresses: list[str] = []
        self.start()

    def start(self) -> None:
        n = len(list(self.logdir.glob("serve-*.log")))
        self.logfile = self.logdir / f"serve-{n}.log"
        listen = [] if any(a in ("--listen", "-c") for a in self.args) else \
            ["--listen", "127.0.0.1:0"]
        cmd = command() + ["serve", "--store", str(self.store), *listen, "-v", "--json",
                           *self.args]
        self._err = open(self.logfile, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err,
                                     env=self.env, start_new_session=True)
        self.addresses = []
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not select.select([self.proc.stdout], [], [], 0.5)[0]:
                if self.proc.poll() is not None:
                    break
                continue
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            data = json.loads(line)
            if data.get("event") == "listening":
                self.addresses = data["addresses"]
                return
        self.kill()
        raise RuntimeError(f"modsync serve did not start: {self.log()}")

    @property
    def address(self) -> str:
        return next(a for a in self.addresses if not a.startswith(("unix:", "csync:")))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, and wait; the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = -9
        self._close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._err.closed:
            self._err.close()

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the server log:\n{self.log()}")


def run_cli(*argv, stdin: bytes = b"", check_schema: bool = True):
    """``modsync`` in this process, with the checks of tests/cli/runner.py (--json
    output valid against its schema, one final error line on a failure)."""
    from engine.cli import config as cli_config
    saved_default = cli_config.DEFAULT_PATH
    cli_config.DEFAULT_PATH = Path("/nonexistent/modsync.toml")
    try:
        return run(*argv, stdin=stdin, check=check_schema)
    finally:
        cli_config.DEFAULT_PATH = saved_default


def auth(pwfile) -> list[str]:
    return ["--account", ADMIN, "--password-file", str(pwfile)]


def digest(path: Path, user: str) -> str | None:
    with Store.open(path) as s:
        if user not in s.users():
            return None
        return s.status(user)["digest"]


def dump(path: Path) -> dict:
    """Every table but the replication bookkeeping, for "nothing changed" checks."""
    from engine.db import TABLES
    with Store.open(path) as s, s.db.read() as txn:
        return {t: list(txn.range(t)) for t in TABLES if t != "intents"}


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()
