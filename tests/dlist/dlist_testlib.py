"""Helpers shared by the dlist tests: reading the Cyrus transcripts and parsing bytes.

(Not a conftest.py: tests/conftest.py has that name, and these are imported
as a plain module, "from dlist_testlib import ...".)
"""
from __future__ import annotations

import re
from pathlib import Path

from dlist import Line, Parser, print_line

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "data" / "cyrus-transcripts"

#: Transcripts whose bodies and lines are complete.
COMPLETE = sorted(p for p in TRANSCRIPTS.glob("*.txt") if not p.name.startswith(("11-", "12-")))
#: The 20,000-message skeletons, with bodies elided and long lines cut.
SKELETONS = sorted(p for p in TRANSCRIPTS.glob("*.txt") if p.name.startswith(("11-", "12-")))


def transcript_lines(path: Path, direction: str) -> list[bytes]:
    """The text of every ``C:`` or ``S:`` line (``direction``), without the prefix."""
    prefix = direction.encode() + b": "
    return [line[3:] for line in path.read_bytes().split(b"\n") if line.startswith(prefix)]


def wire(path: Path, direction: str) -> bytes:
    """The bytes one direction sent: each transcript line followed by the CRLF it lost."""
    return b"".join(line + b"\r\n" for line in transcript_lines(path, direction))


def plain_byte_counts(path: Path) -> tuple[int, int]:
    """The proxy's count of inflated bytes, client->server and server->client."""
    m = re.search(rb"plain bytes C->S (\d+) S->C (\d+)", path.read_bytes())
    assert m, f"{path.name} has no byte counts"
    return int(m.group(1)), int(m.group(2))


def parse_all(data: bytes, **kwargs) -> list[Line]:
    """Every line in ``data``, fed in one piece; the stream must end at a line end."""
    parser = Parser(**kwargs)
    parser.feed(data)
    parser.feed_eof()
    return drain(parser)


def drain(parser: Parser) -> list[Line]:
    lines = []
    while (line := parser.next_line()) is not None:
        lines.append(line)
    return lines


def feed_chunks(parser: Parser, data: bytes, sizes, lines: list) -> None:
    """Feed ``data`` in chunks of ``sizes`` (cycled; a size may be a function of data),
    then the end of the stream, appending the lines read to ``lines`` as they come."""
    pos = i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        size = max(1, size(data) if callable(size) else size)
        parser.feed(data[pos:pos + size])
        lines += drain(parser)
        pos += size
        i += 1
    parser.feed_eof()
    lines += drain(parser)


def parse_chunked(data: bytes, sizes, **kwargs) -> list[Line]:
    """Every line in ``data``, fed in chunks of the given sizes (cycled)."""
    lines: list[Line] = []
    feed_chunks(Parser(**kwargs), data, sizes, lines)
    return lines


# -- the fuzzing oracle, shared by test_dlist_fuzz.py and tests/fuzz/fuzz_dlist.py ---------

def check_text(data: bytes, sizes=(len,), banner: bool = False, limits=None) -> None:
    """Feed ``data`` (in chunks of ``sizes``); only DlistProtocolError may escape.

    Whatever lines the parser accepts must print in both roles and read back
    the same (limits aside: printing may add a "+" to literal headers).
    """
    from dlist import DEFAULT_LIMITS, DlistProtocolError

    parser = Parser(banner=banner, limits=limits or DEFAULT_LIMITS)
    lines: list[Line] = []
    try:
        feed_chunks(parser, data, sizes, lines)
    except DlistProtocolError as e:
        assert e.offset is None or 0 <= e.offset <= len(data), e
    lines += drain(parser)
    for role in ("client", "server"):
        printed = b"".join(print_line(line, role) for line in lines)
        again = Parser(banner=banner)
        again.feed(printed)
        again.feed_eof()
        assert drain(again) == lines


def check_binary(data: bytes) -> None:
    """Decode ``data`` as a binary line and as a value, then use whatever comes out:
    only DlistProtocolError may escape."""
    from dlist import DlistProtocolError, decode_line, decode_value

    for decode in (decode_line, decode_value):
        try:
            result = decode(data)
        except DlistProtocolError:
            continue
        if isinstance(result, Line):
            try:
                print_line(result, bodies=lambda f: b"\0" * f.size)
            except DlistProtocolError:
                pass
            if result.value is not None:
                exercise(result.value)
        else:
            exercise(result)


def exercise(value) -> None:
    """Call every accessor on a value and everything inside it."""
    from dlist import DlistProtocolError, KvList, List, print_value

    todo = [value]
    while todo:
        v = todo.pop()
        for convert in ("as_atom", "as_map", "as_num", "as_num32", "as_date", "as_hex", "as_guid"):
            try:
                getattr(v, convert)()
            except DlistProtocolError:
                pass
        try:
            print_value(v, bodies=lambda f: b"\0" * f.size)
        except DlistProtocolError:
            pass
        repr(v)
        try:
            if isinstance(v, List):
                todo += list(v)
                v.atoms()
            elif isinstance(v, KvList):
                for key in v:
                    for getter in ("get_atom", "get_num", "get_hex", "get_guid", "get_list",
                                   "get_kvlist", "get_file"):
                        try:
                            getattr(v, getter)(key)
                        except DlistProtocolError:
                            pass
                todo += v.values()
        except DlistProtocolError:
            pass
