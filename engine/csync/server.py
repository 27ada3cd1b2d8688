"""The csync server over asyncio: moves bytes between a socket and a ReplicaSession.

``csync_handler(store)`` is the callback for ``asyncio.start_server`` (``modsync
serve --csync`` uses it).  Each connection gets a
:class:`~engine.csync.replica.ReplicaSession` and a
:class:`~engine.csync.protocol.Connection`; commands run one at a time in a
worker thread (the store's writes block on fsync), so one slow connection
does not stall the event loop or other connections.  Only what touches
neither the store nor its disk is answered on the event loop
(``ReplicaSession.answers_at_once``: COMPRESS, NOOP, EXIT, APPLY
CAPABILITIES, a remembered login), which saves a sync_client's short runs a
thread hand-over per command.

Reading costs little per byte: one timer per connection watches for idleness
(no per-read timeout), and while a long line streams in, short reads are
spaced out (COALESCE_*) so that each wake-up of the loop brings more of it.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from dlist import DlistProtocolError, Line

from .protocol import Connection
from .replica import ReplicaSession

log = logging.getLogger("modsync.csync")

READ_CHUNK = 256 * 1024
#: Once a line has brought COALESCE_AFTER bytes and is still going (an APPLY
#: MESSAGE of 1024 bodies, say), a read shorter than COALESCE_BELOW is
#: followed by a pause of COALESCE_DELAY seconds before the next one.
#: sync_client writes in pieces of a few KB, so reading each piece as it
#: comes means ~15,000 wake-ups of the event loop for a 20,000-message
#: initial sync, which cost more CPU than parsing what they bring.  The pause
#: delays such a line by at most COALESCE_DELAY (it cannot be answered before
#: its end arrives, and the kernel's socket buffer keeps the sender going);
#: short lines, like every command of an incremental sync, are never delayed.
COALESCE_AFTER = 256 * 1024
COALESCE_BELOW = 64 * 1024
COALESCE_DELAY = 0.002
#: A session idle this long is dropped (Cyrus's sync_client restarts its
#: session every 600 s by default and sends NOOP when idle; 30 minutes is
#: Cyrus's own sync_timeout default).
IDLE_TIMEOUT = 30 * 60


class Stats:
    """What the sessions of one server did (for tests and logs)."""

    def __init__(self):
        self.sessions = 0
        self.commands = 0
        self.files = 0          # message bodies received with APPLY MESSAGE
        self.file_bytes = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def csync_handler(store, *, servername: str = "modsync", compress: bool = True,
                  idle_timeout: float = IDLE_TIMEOUT, stats: Stats | None = None):
    """An ``asyncio.start_server`` callback speaking csync as a Cyrus 3.6 replica of ``store``."""
    stats = stats if stats is not None else Stats()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        session = ReplicaSession(store, servername, compress=compress)
        session.stats = stats
        stats.sessions += 1
        conn = Connection("server", sink=session.sink)
        loop = asyncio.get_running_loop()
        idle = _IdleWatch(loop, idle_timeout, reader, writer)
        streamed = 0    # bytes read since the last complete line
        try:
            writer.write(conn.send(session.banner()))
            await writer.drain()
            while True:
                line = conn.next_line()
                if line is None:
                    idle.waiting()
                    data = await reader.read(READ_CHUNK)
                    idle.busy()
                    if idle.expired:
                        writer.write(conn.send(Line("BYE", text="idle timeout")))
                        await writer.drain()
                        return
                    if not data:
                        conn.receive_eof()
                        return
                    try:
                        conn.receive_data(data)
                    except DlistProtocolError as e:
                        log.warning("csync %s: protocol error: %s", peer, e)
                        writer.write(conn.send(Line(
                            "BAD", text="IMAP_PROTOCOL_ERROR Failed to parse line")))
                        await writer.drain()
                        return
                    streamed += len(data)
                    if (streamed > COALESCE_AFTER and len(data) < COALESCE_BELOW
                            and conn.inside_line):
                        # Nothing to do before the rest of this line: let it pile up.
                        await asyncio.sleep(COALESCE_DELAY)
                    continue
                streamed = 0
                stats.commands += 1
                if session.answers_at_once(line):
                    reply = session.handle(line)
                else:
                    reply = await loop.run_in_executor(None, session.handle, line)
                writer.write(conn.send(reply.all()))
                await writer.drain()
                if reply.start_compress:
                    conn.start_compression()
                if reply.close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, DlistProtocolError) as e:
            log.info("csync %s: connection ended: %s", peer, e)
        except Exception:
            log.exception("csync %s: internal error", peer)
            try:
                writer.write(conn.send(Line("BYE", text="internal error")))
            except Exception:
                pass
        finally:
            idle.stop()
            try:
                await loop.run_in_executor(None, session.close)
            except Exception:
                log.exception("csync %s: storing the last bodies failed", peer)
            try:
                writer.close()
                await writer.wait_closed()
            except Exception:
                pass

    return handle


class _IdleWatch:
    """Ends a connection that waited for the client's next bytes longer than ``timeout``.

    One timer per connection, re-armed only when it fires: a per-read
    ``asyncio.wait_for`` costs a task and a timer handle for every read, about
    as much CPU as the read itself when a sync_client streams 90 MB in small
    pieces.  When the wait is over, the read sees end of file and the handler
    finds ``expired`` set.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.loop = loop
        self.timeout = timeout
        self.reader = reader
        self.writer = writer
        self.expired = False
        self._since: float | None = None     # when the current wait began
        self._timer = loop.call_later(timeout, self._check)

    def waiting(self) -> None:
        self._since = self.loop.time()

    def busy(self) -> None:
        self._since = None

    def _check(self) -> None:
        since = self._since
        now = self.loop.time()
        if since is not None and now - since >= self.timeout:
            self.expired = True
            self._timer = None
            # Wake the read: it returns b"" and the handler says BYE.
            self.writer.transport.pause_reading()
            self.reader.feed_eof()
            return
        wait = self.timeout if since is None else self.timeout - (now - since)
        self._timer = self.loop.call_later(wait, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def serve(store, host: str, port: int, *, servername: str = "modsync",
                ready=None, stats: Stats | None = None) -> None:
    """Serve csync on host:port until cancelled (``ready`` is called with the bound port)."""
    server = await asyncio.start_server(
        csync_handler(store, servername=servername, stats=stats), host, port, limit=READ_CHUNK)
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


class ServerThread:
    """A csync server on its own event loop in a background thread (tests, embedding).

        with ServerThread(store) as srv:     # binds 127.0.0.1, a free port
            ... srv.port ...
    """

    def __init__(self, store, host: str = "127.0.0.1", port: int = 0, *,
                 servername: str = "modsync"):
        self.store = store
        self.host = host
        self.port = port
        self.servername = servername
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task = None
        self._error: BaseException | None = None
        self.stats = Stats()
        self._thread = threading.Thread(target=self._run, name="csync-server", daemon=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        def ready(port):
            self.port = port
            self._ready.set()
        self._task = loop.create_task(serve(self.store, self.host, self.port,
                                            servername=self.servername, ready=ready,
                                            stats=self.stats))
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as e:   # bind failure: report it to start()
            self._error = e
            self._ready.set()
        finally:
            loop.close()

    def start(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
