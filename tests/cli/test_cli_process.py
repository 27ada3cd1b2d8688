"""The `modsync` console script as a real process: stdin, stdout bytes, exit codes, signals.

Few and concurrent where they can be: each process costs an interpreter start.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .runner import ALICE_BODIES


def command() -> list[str]:
    """The console script next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "modsync"
    if here.exists():
        return [str(here)]
    found = shutil.which("modsync")
    if not found:
        pytest.skip("the modsync console script is not installed (pip install -e .)")
    return [found]


@pytest.fixture
def env(alice):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MODSYNC_")}
    e.update(MODSYNC_STORE=str(alice), MODSYNC_CONFIG=os.devnull)
    return e


def start(env, *argv, **kw) -> subprocess.Popen:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(command() + [str(a) for a in argv], env=env, **kw)


def test_save_from_stdin_and_fetch_byte_exact(env):
    body = (b"From: x@example.org\r\nSubject: raw\r\n\r\n"
            b"CRLF\r\nLF\nCR\r\x00\xff end without newline")
    saved = subprocess.run(command() + ["save", "-u", "alice", "-m", "INBOX"], input=body,
                           capture_output=True, env=env, timeout=60, check=False)
    assert (saved.returncode, saved.stdout, saved.stderr) == (0, b"4\n", b"")
    procs = [start(env, "fetch", "-u", "alice", "-m", "INBOX", "--uid", uid) for uid in (3, 4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [o for o, _ in outs] == [ALICE_BODIES[2], body]


def test_exit_codes(env, alice):
    pack = max((alice / "blobs").glob("*.pack"), key=lambda p: p.stat().st_mtime)
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0x55
    pack.write_bytes(data)
    cases = {
        1: ["mailbox", "list", "-u", "nobody"],
        2: ["flags", "add", "-u", "alice", "-m", "INBOX", "--uid", "x", "$Junk"],
        4: ["verify"],
        0: ["status", "--json"],
    }
    procs = {code: start(env, *argv) for code, argv in cases.items()}
    # The package runs as a module too (`python -m engine.cli`).
    module = subprocess.Popen([sys.executable, "-m", "engine.cli", "--version"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for code, p in procs.items():
        out, err = p.communicate(timeout=60)
        assert p.returncode == code, (cases[code], err)
        if code:
            assert err.decode().rstrip("\n").rpartition("\n")[2].startswith("modsync: error: ")
    out, err = module.communicate(timeout=60)
    assert module.returncode == 0 and out.startswith(b"modsync ")


def test_interrupt_exits_130(env):
    # `save` waits on stdin; -vv says when it starts reading.
    p = start(env, "-vv", "save", "-u", "alice", "-m", "INBOX", stdin=subprocess.PIPE,
              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = b""
        deadline = time.monotonic() + 60
        while b"reading the message from standard input" not in line:
            assert time.monotonic() < deadline, "save never started reading"
            line = p.stderr.readline()
            assert line, "modsync exited before reading"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130
    assert out == b""
    assert err.strip().endswith(b"modsync: interrupted")


def test_closed_stdout_exits_141_silently(env):
    p = start(env, "changes", "-u", "alice", "--since", "0")
    p.stdout.close()           # the reader is gone before modsync writes a byte
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=60) == 141
    assert err == b""
