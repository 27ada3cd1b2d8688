#!/usr/bin/env python3
"""Coverage-guided fuzzing of the DLIST codec with atheris (libFuzzer).

    python tests/fuzz/fuzz_dlist.py --seconds 300          # fuzz for five minutes
    python tests/fuzz/fuzz_dlist.py --seconds 60 CORPUS/   # keep a corpus between runs
    python tests/fuzz/fuzz_dlist.py crash-1234             # replay one input

The first input byte picks what to do with the rest: parse it as text in
chunks (with or without the banner, with default or tiny limits) or decode
it as a binary line or value.  The oracle is the suite's (tests/dlist/
dlist_testlib.py): nothing but DlistProtocolError may escape, and whatever
the parser accepts must print and read back the same.  Seeds are the Cyrus
transcripts in tests/data.  Without atheris installed, the same oracle runs
on random mutations of the seeds for the given time.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "dlist"))

from dlist_testlib import COMPLETE, check_binary, check_text, parse_all, wire

from dlist import Limits, encode_line

_TINY = Limits(max_line=256, max_literal=16, max_depth=4, max_file=64)


def one_input(data: bytes) -> None:
    """The fuzz target: one input, every mode chosen by its first byte."""
    if not data:
        return
    mode, data = data[0], data[1:]
    if mode & 0x80:
        check_binary(data)
        return
    chunk = (mode & 0x0F) + 1
    check_text(data, (chunk, 3 * chunk + 1), banner=bool(mode & 0x10),
               limits=_TINY if mode & 0x20 else None)


def seeds() -> list[bytes]:
    """Real traffic: each transcript direction, each line, and binary forms of lines."""
    found = []
    for path in COMPLETE:
        for direction in ("C", "S"):
            stream = wire(path, direction)
            found.append(bytes([0x0F | (0x10 if direction == "S" else 0)]) + stream)
            for line in parse_all(stream, banner=direction == "S")[:20]:
                found.append(b"\x80" + encode_line(line))
    return found


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        if not buf:
            buf += bytes([rnd.randrange(256)])
        pos = rnd.randrange(len(buf))
        op = rnd.randrange(5)
        if op == 0:
            buf[pos] = rnd.randrange(256)
        elif op == 1:
            buf[pos:pos] = rnd.choice([b"(", b")", b"%(", b"{3}\r\n", b"{2+}\r\n", b'"', b"\\",
                                       b" ", b"\r\n", b"NIL", b"%{p ", b"\x00"])
        elif op == 2:
            del buf[pos:pos + rnd.randint(1, 16)]
        elif op == 3:
            buf[pos:pos] = buf[pos:pos + rnd.randint(1, 64)]
        else:
            del buf[pos + 1:]
    return bytes(buf)


def _fallback(seconds: float, corpus: list[bytes]) -> int:
    rnd = random.Random(int.from_bytes(os.urandom(8), "big"))
    runs = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = _mutate(rnd.choice(corpus), rnd)
        try:
            one_input(data)
        except Exception:
            path = Path(f"crash-{int(time.time())}-{runs}")
            path.write_bytes(data)
            print(f"crash after {runs} runs, input saved to {path}", file=sys.stderr)
            raise
        runs += 1
    print(f"{runs} runs in {seconds:.0f} s without a crash (random mutation, no atheris)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    ap.add_argument("paths", nargs="*", help="corpus directories, or inputs to replay")
    args, extra = ap.parse_known_args(argv)

    files = [Path(p) for p in args.paths if Path(p).is_file()]
    if files:
        for path in files:
            one_input(path.read_bytes())
            print(f"{path}: ok")
        return 0
    try:
        import atheris
    except ImportError:
        return _fallback(args.seconds, seeds())

    dirs = [p for p in args.paths if Path(p).is_dir()]
    if not dirs:
        dirs = [tempfile.mkdtemp(prefix="dlist-fuzz-seeds-")]
    # libFuzzer reads its seeds from the first corpus directory.
    for i, seed in enumerate(seeds()):
        target = Path(dirs[0]) / f"seed-{i:04d}"
        if not target.exists():
            target.write_bytes(seed)
    libfuzzer_args = [sys.argv[0], f"-max_total_time={int(args.seconds)}", "-max_len=65536",
                      "-rss_limit_mb=4096", *extra, *dirs]
    # dlist is imported already (for the seeds), so instrument what is loaded:
    # the coverage feedback that guides libFuzzer.
    atheris.instrument_all()
    atheris.Setup(libfuzzer_args, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
