"""Fuzzing inside the normal suite (bounded to a few seconds): random and mutated input
never makes the codec fail with anything but DlistProtocolError.

The long-running fuzzer is tests/fuzz/fuzz_dlist.py (atheris).
"""
from __future__ import annotations

import time
from unittest import mock

from dlist_testlib import COMPLETE, check_binary, check_text, drain, feed_chunks, parse_all, wire
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlist.parser
from dlist import DlistProtocolError, Limits, Parser, encode_line

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Each fuzz test stops trying inputs after this long, so that the three stay
# within about 20 s of the suite even on a busy machine.
BUDGET = 6.0
_started: dict[str, float] = {}


def _spent(test: str) -> bool:
    """True once ``test`` has fuzzed for BUDGET seconds (counted from its first input)."""
    now = time.monotonic()
    return now - _started.setdefault(test, now) > BUDGET

# Real traffic to mutate: every line of a few transcripts, both directions.
_STREAMS = [wire(p, d) for p in COMPLETE[:6] for d in ("C", "S")]
_LINES = [l for s in _STREAMS for l in s.split(b"\r\n") if l] or [b"EXIT"]
_BLOBS = [encode_line(line) for s in _STREAMS[:4] for line in parse_all(s, banner=s.startswith(b"*"))]

_ALPHABET = b' \t\r\n()%{}"\\+*0123456789abcNILAPPLYGET'
_interesting = st.lists(st.sampled_from(list(_ALPHABET)), max_size=200).map(bytes)
_limits = st.sampled_from([None, Limits(max_line=64, max_literal=8, max_depth=3, max_file=16)])


@FUZZ
@given(st.one_of(st.binary(max_size=300), _interesting), st.lists(st.integers(1, 40), min_size=1,
                                                                   max_size=5),
       st.booleans(), _limits)
def test_random_bytes(data, sizes, banner, limits):
    if not _spent("random"):
        check_text(data, sizes, banner, limits)


@st.composite
def _mutated(draw):
    base = bytearray(draw(st.sampled_from(_STREAMS)) if draw(st.booleans())
                     else b"\r\n".join(draw(st.lists(st.sampled_from(_LINES), min_size=1,
                                                     max_size=4))) + b"\r\n")
    for _ in range(draw(st.integers(1, 4))):
        if not base:
            break
        pos = draw(st.integers(0, len(base) - 1))
        kind = draw(st.integers(0, 4))
        if kind == 0:
            base[pos] = draw(st.sampled_from(list(_ALPHABET) + list(range(256))))
        elif kind == 1:
            base[pos:pos] = bytes(draw(st.lists(st.sampled_from(list(_ALPHABET)), max_size=5)))
        elif kind == 2:
            del base[pos:pos + draw(st.integers(1, 20))]
        elif kind == 3:
            base[pos:pos] = base[pos:pos + draw(st.integers(1, 30))]
        else:
            del base[pos:]
    return bytes(base)


@FUZZ
@given(_mutated(), st.lists(st.integers(1, 200), min_size=1, max_size=4), st.booleans(), _limits)
def test_mutated_transcripts(data, sizes, banner, limits):
    if not _spent("mutated"):
        check_text(data, sizes, banner, limits)


@st.composite
def _mutated_blob(draw):
    blob = bytearray(draw(st.sampled_from(_BLOBS)))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(blob) - 1))
        if draw(st.booleans()):
            blob[pos] = draw(st.integers(0, 255))
        else:
            del blob[pos:pos + draw(st.integers(1, 8))]
        if not blob:
            break
    return bytes(blob)


@FUZZ
@given(st.one_of(st.binary(max_size=200), _mutated_blob()))
def test_random_and_mutated_binary(data):
    if not _spent("binary"):
        check_binary(data)


def _outcome(data: bytes, sizes, banner: bool, ahead: int):
    """(lines read, whether the stream broke) with the parser scanning ahead at ``ahead`` bytes."""
    lines: list = []
    parser = Parser(banner=banner)
    with mock.patch.object(dlist.parser, "SCAN_AHEAD", ahead):
        try:
            feed_chunks(parser, data, sizes, lines)
        except DlistProtocolError:
            return lines + drain(parser), True    # the lines completed before the error
    return lines, False


@FUZZ
@given(st.one_of(_mutated(), _interesting), st.lists(st.integers(1, 60), min_size=1, max_size=4),
       st.booleans(), st.sampled_from([1, 2, 5, 17]))
def test_scanning_ahead_reads_what_the_whole_line_reads(data, sizes, banner, ahead):
    """Tokenizing a line before its LF arrives (dlist.parser.SCAN_AHEAD) changes nothing read."""
    if not _spent("ahead"):
        assert _outcome(data, sizes, banner, ahead) == _outcome(data, [len(data) or 1], banner,
                                                                1 << 40)
