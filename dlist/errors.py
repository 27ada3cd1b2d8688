"""The one error the DLIST codec raises for bytes that do not follow the protocol."""
from __future__ import annotations


class DlistProtocolError(Exception):
    """Malformed DLIST input: text from a peer, a binary blob, or a value used as the wrong type.

    ``offset`` is the absolute position in the stream (counting every byte ever
    fed to the parser, literal and file bodies included) of the first byte that
    did not make sense, or ``None`` when the problem is not tied to a position
    (a binary blob, or a value that an accessor cannot convert).  ``expected``
    says what the codec was looking for there.

    After a parser raises this error it stays broken: the stream has lost its
    framing and the connection has to be closed.
    """

    def __init__(self, message: str, *, offset: int | None = None, expected: str | None = None):
        self.message = message
        self.offset = offset
        self.expected = expected
        text = message
        if offset is not None:
            text += f" at byte {offset}"
        if expected is not None:
            text += f" (expected {expected})"
        super().__init__(text)
