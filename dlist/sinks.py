"""Where the parser puts file literal bodies (messages) while they stream in.

A *sink factory* is called with ``(partition, guid, size)`` when a
``%{partition guid size}`` header has been read, before any body byte.  It
returns a sink; the parser then calls ``sink.write(chunk)`` for each piece of
the body as it arrives (the chunks are fresh ``bytes`` the sink may keep),
and finally ``sink.close(verified)`` exactly once, where ``verified`` says
whether the SHA-1 of the body equals the GUID in the header.  ``close``
returns the body's bytes to keep in the parsed value, or None when the sink
keeps them itself (a blob store writing to a temporary file, say, which it
renames into place when ``verified`` and deletes otherwise).

``close(False)`` is also how the parser tells a sink that the stream ended in
the middle of its body, or that the parser failed.  An exception raised by a
sink propagates out of :meth:`~dlist.parser.Parser.feed` and leaves the
parser unusable.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class BodySink(Protocol):
    """Receives one file literal's body."""

    def write(self, data: bytes) -> None: ...

    def close(self, verified: bool) -> bytes | None: ...


#: ``factory(partition, guid, size) -> BodySink``
SinkFactory = Callable[[str, str, int], BodySink]


class MemorySink:
    """The default sink: collects the body in memory and hands it back on close."""

    __slots__ = ("_chunks",)

    def __init__(self, partition: str = "", guid: str = "", size: int = 0):
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._chunks.append(data)

    def close(self, verified: bool) -> bytes:
        body = b"".join(self._chunks)
        self._chunks = []
        return body
