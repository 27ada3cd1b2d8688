"""Replaying real Cyrus 3.6.1 csync transcripts into modsync's replica state machine.

A transcript (tests/data/cyrus-transcripts) holds what a real sync_client
sent (``C:``) and what a real Cyrus sync_server answered (``S:``).  Each
client line is fed to a :class:`ReplicaSession` over a modsync store; the
answers are grouped per command and compared with Cyrus's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlist import Line, Parser, print_line

from engine.csync.replica import ReplicaSession

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "data" / "cyrus-transcripts"

#: The scenarios 01-10 and 13 ran one after another against one replica.
CHAIN = ["01-initial-user-sync", "01b-initial-user-sync-other", "02-incremental-flags-expunge",
         "02b-user-sync-noop", "03-rolling-subscription", "04-rolling-seen",
         "05-rolling-sieve", "06-rolling-append-copy",
         "07-rolling-mailbox-create-rename-delete", "07b-rolling-cyr-expire-purge",
         "08-rolling-metadata-quota-acl", "09-divergent-replica-user-sync",
         "10-rolling-continuous", "13a-rolling-new-user", "13b-rolling-delete-user"]


def path_of(name: str) -> Path:
    return TRANSCRIPTS / f"{name}.txt"


def _lines(path: Path, direction: str) -> bytes:
    prefix = direction.encode() + b": "
    return b"".join(line[3:] + b"\r\n" for line in path.read_bytes().split(b"\n")
                    if line.startswith(prefix))


def parse(data: bytes, *, banner: bool = False, sink=None) -> list[Line]:
    p = Parser(banner=banner, sink=sink)
    p.feed(data)
    p.feed_eof()
    out = []
    while (line := p.next_line()) is not None:
        out.append(line)
    return out


@dataclass
class Exchange:
    """One command, what Cyrus answered, and what modsync answered."""

    command: Line
    cyrus: list
    modsync: list


def server_replies(path: Path) -> list[list[Line]]:
    """Cyrus's answers grouped per command (the banner first)."""
    lines = parse(_lines(path, "S"), banner=True)
    groups: list[list[Line]] = []
    cur: list[Line] = []
    in_banner = True
    for line in lines:
        cur.append(line)
        if in_banner:
            if line.verb == "*" and not line.is_dlist and (line.text or b"").startswith(b"OK"):
                groups.append(cur)
                cur = []
                in_banner = False
            continue
        if line.verb != "*":
            groups.append(cur)
            cur = []
    return groups


def replay(store, name: str, session: ReplicaSession | None = None) -> list[Exchange]:
    """Feed every client line of a transcript to a (new) session; pair up the answers."""
    path = path_of(name)
    session = session or ReplicaSession(store, "cyrus-replica.test")
    # File bodies stream into the session's sink, as on a connection.
    parser = Parser(sink=session.sink)
    parser.feed(_lines(path, "C"))
    parser.feed_eof()
    replies = server_replies(path)[1:]
    out = []
    i = 0
    while (cmd := parser.next_line()) is not None:
        reply = session.handle(cmd)
        # re-parse our answer the way a client would see it
        ours = parse(b"".join(print_line(x, "server") for x in reply.all()))
        out.append(Exchange(cmd, replies[i] if i < len(replies) else [], ours))
        i += 1
        if reply.close:
            break
    return out


def describe(ex: Exchange) -> str:
    def show(lines):
        return "\n".join("    " + print_line(x, "server").decode("utf-8", "replace")[:300].rstrip()
                         for x in lines)
    cmd = print_line(ex.command, "client").decode("utf-8", "replace")[:200].rstrip()
    return f"  C: {cmd}\n  cyrus:\n{show(ex.cyrus)}\n  modsync:\n{show(ex.modsync)}"
