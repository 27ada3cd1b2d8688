"""engine.csync.server: the asyncio side, over a real socket, without Cyrus.

A tiny blocking client speaks csync to ``csync_handler``: the idle timeout,
a long APPLY MESSAGE trickling in (the server pauses between short reads
while such a line streams), and commands answered on the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import threading
import time

import pytest

from dlist import Line, List
from engine.accounts import add_account
from engine.csync import server as csync_server
from engine.csync.replica import ReplicaSession


class _Server:
    """csync_handler on an event loop in a thread, with the given idle timeout."""

    def __init__(self, store, idle_timeout: float):
        self.store = store
        self.idle_timeout = idle_timeout
        self.port = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        async def main():
            handler = csync_server.csync_handler(self.store, idle_timeout=self.idle_timeout)
            srv = await asyncio.start_server(handler, "127.0.0.1", 0)
            self.port = srv.sockets[0].getsockname()[1]
            self._stop = asyncio.get_running_loop().create_future()
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            async with srv:
                await self._stop
        asyncio.run(main())

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)


def _connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = sock.makefile("rb")
    while not f.readline().startswith(b"* OK"):
        pass
    return sock, f


@pytest.fixture
def repl(store):
    add_account(store, "repl", "replpw", admin=True)
    return store


def _login(sock, f):
    sock.sendall(b"AUTHENTICATE PLAIN " + base64.b64encode(b"\0repl\0replpw") + b"\r\n")
    assert f.readline().startswith(b"OK")


def test_an_idle_session_is_told_bye_and_closed(repl):
    with _Server(repl, idle_timeout=0.3) as srv:
        sock, f = _connect(srv.port)
        _login(sock, f)
        t0 = time.monotonic()
        assert f.readline() == b"BYE idle timeout\r\n"
        assert f.readline() == b""
        assert 0.2 < time.monotonic() - t0 < 5
        sock.close()


def test_a_session_that_keeps_talking_is_not_idle(repl):
    with _Server(repl, idle_timeout=0.4) as srv:
        sock, f = _connect(srv.port)
        _login(sock, f)
        for _ in range(6):
            time.sleep(0.15)
            sock.sendall(b"NOOP\r\n")
            assert f.readline() == b"OK Noop completed\r\n"
        sock.sendall(b"EXIT\r\n")
        assert f.readline() == b"OK Finished\r\n"
        sock.close()


def test_a_long_line_trickling_in_is_read_whole(repl, monkeypatch):
    # Small numbers so that a test-sized line crosses them.
    monkeypatch.setattr(csync_server, "COALESCE_AFTER", 4096)
    pauses = []
    real_sleep = asyncio.sleep

    async def sleep(delay, *args):
        pauses.append(delay)
        return await real_sleep(delay, *args)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    bodies = [b"Subject: %d\r\n\r\n" % i + b"x" * 3000 + b"\r\n" for i in range(40)]
    line = b"APPLY MESSAGE (" + b" ".join(
        b"%%{default %s %d}\r\n" % (hashlib.sha1(b).hexdigest().encode(), len(b)) + b
        for b in bodies) + b")\r\n"
    with _Server(repl, idle_timeout=30) as srv:
        sock, f = _connect(srv.port)
        _login(sock, f)
        t0 = time.monotonic()
        for i in range(0, len(line), 1000):
            sock.sendall(line[i:i + 1000])
            time.sleep(0.0005)
        assert f.readline() == b"OK success\r\n"
        assert time.monotonic() - t0 < 10
        sock.sendall(b"EXIT\r\n")
        assert f.readline() == b"OK Finished\r\n"
        sock.close()
    assert csync_server.COALESCE_DELAY in pauses
    with repl.db.read() as txn:
        assert all(txn.get("sha1", hashlib.sha1(b).digest()) for b in bodies)


def test_only_housekeeping_is_answered_on_the_event_loop(repl):
    s = ReplicaSession(repl)
    assert not s.answers_at_once(Line("NOOP"))                  # not logged in yet
    s.handle(Line("AUTHENTICATE", text=b"PLAIN " + base64.b64encode(b"\0repl\0replpw")))
    for line in (Line("NOOP"), Line("COMPRESS", text=b"DEFLATE"), Line("EXIT"),
                 Line("APPLY", "CAPABILITIES", List(["SIEVE-MAILBOX"]))):
        assert s.answers_at_once(line)
    for line in (Line("GET", "USER", "x"), Line("APPLY", "MAILBOX", List([])),
                 Line("AUTHENTICATE", text=b"PLAIN x")):
        assert not s.answers_at_once(line)
    s.close()


def test_a_remembered_login_is_answered_on_the_event_loop(repl):
    login = Line("AUTHENTICATE", text=b"PLAIN " + base64.b64encode(b"\0repl\0replpw"))
    wrong = Line("AUTHENTICATE", text=b"PLAIN " + base64.b64encode(b"\0repl\0nope"))
    first = ReplicaSession(repl)
    assert not first.answers_at_once(wrong)
    first.handle(login)                      # checked with scrypt, then remembered
    second = ReplicaSession(repl)
    assert second.answers_at_once(login) and not second.answers_at_once(wrong)
    assert second.handle(login).status.text == b"Success (no protection)"
    add_account(repl, "repl", "changed", admin=True)    # a new password is noticed at once
    assert not ReplicaSession(repl).answers_at_once(login)
    for s in (first, second):
        s.close()
