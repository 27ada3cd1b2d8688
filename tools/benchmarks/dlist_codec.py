"""DLIST codec: text parse/print and binary encode/decode of a 20,000-record APPLY MAILBOX.

The input is one ``APPLY MAILBOX`` line shaped like the one in Cyrus
transcript 11 (tests/data/cyrus-transcripts): the same mailbox keys, then
20,000 records with UID, MODSEQ, LAST_UPDATED, FLAGS (mostly empty, every
100th \\Flagged, some \\Seen, 200 expunged), INTERNALDATE, SIZE, a 40-hex
GUID and the savedate/createdmodseq ANNOTATIONS Cyrus 3.6 adds: about
6.2 MB, as in the transcript.  It is written the way Cyrus prints, and the
benchmark checks that parsing and printing it gives the same bytes back.

Figures, each the best of several runs in CPU time (the machine is shared;
a text figure and its binary counterpart are measured in alternation, so that
both see the same load):

* text parse, MB/s and records/s; target 30 MB/s (the DLIST issue).  Also
  fed in 64 KiB chunks, as reads from a socket come.
* text print, MB/s.
* binary encode and decode, MB/s of the text-equivalent bytes, and how many
  times faster than print and parse they are; target 5x (the issue).
* binary size relative to the text.

Codec figures count the codec's own work: Python's cyclic GC is paused while
it runs.  Parse and decode both build the same tree of about 100,000 tuples,
and the GC's first pass over a new tree costs the same for either (tens of
ms); that pass is reported on its own, and "overall" figures include it.

``quick`` uses 500 records.
"""
from __future__ import annotations

import gc
import hashlib
import random
import time
from pathlib import Path

from benchmarks import Figure
from dlist import Parser, decode_line, encode_line, print_line

NAME = "dlist"

RECORDS, RECORDS_QUICK = 20_000, 500
RUNS, RUNS_QUICK = 7, 2
PARSE_TARGET = 30.0        # MB/s, from the DLIST issue
BINARY_TARGET = 5.0        # binary codec this many times faster than the text codec
CHUNK = 64 * 1024
MB = 1e6


def apply_mailbox(records: int, seed: int = 11) -> bytes:
    """An APPLY MAILBOX line for a mailbox of ``records`` messages, printed as Cyrus prints it."""
    rnd = random.Random(seed)
    start = 1795284413                     # INTERNALDATE of UID 1 in transcript 11
    parts = []
    highest = records + 1                  # each append took a modseq ...
    for uid in range(1, records + 1):
        modseq = uid + 1
        date = start + uid * 46 // 20_000  # 20,000 appends over 46 seconds
        if uid % 100 == 0:
            flags = b"\\Flagged"
        elif uid % 97 == 0 and uid <= 97 * 200:
            flags = b"\\Deleted \\Expunged"
        elif rnd.random() < 0.05:
            flags = b"\\Seen"
        else:
            flags = b""
        if flags:                          # ... and so did each later change
            highest += 1
            modseq = highest
        guid = hashlib.sha1(b"%d-%d" % (seed, uid)).hexdigest().encode()
        parts.append(
            b"%%(UID %d MODSEQ %d LAST_UPDATED %d FLAGS (%s) INTERNALDATE %d SIZE %d GUID %s "
            b'ANNOTATIONS (%%(ENTRY /vendor/cmu/cyrus-imapd/savedate USERID "" MODSEQ 0 VALUE %d) '
            b'%%(ENTRY /vendor/cmu/cyrus-imapd/createdmodseq USERID "" MODSEQ 0 VALUE %d)))'
            % (uid, modseq, date + 63, flags, date, rnd.randint(3500, 4600), guid, date, uid + 1))
    last = start + 46
    head = (b"APPLY MAILBOX %%(UNIQUEID ntwkdosvmeean08w3boyak7u MBOXNAME user.bench "
            b"SYNC_CRC 452525695 SYNC_CRC_ANNOT 233930806 LAST_UID %d HIGHESTMODSEQ %d "
            b"RECENTUID %d RECENTTIME %d LAST_APPENDDATE %d POP3_LAST_LOGIN 0 POP3_SHOW_AFTER 0 "
            b'UIDVALIDITY %d PARTITION default ACL "bench\tlrswipkxtecdan\t" OPTIONS P '
            b"CREATEDMODSEQ 1 FOLDERMODSEQ 1 RECORD ("
            % (records, highest, records, last + 17, last, start + 1))
    return head + b" ".join(parts) + b"))\r\n"


def _measure(fn) -> tuple[float, float]:
    """CPU time of one call of ``fn`` with the cyclic GC paused, and of the GC pass over
    what it built."""
    gc.collect()
    gc.disable()
    t0 = time.process_time()
    result = fn()
    work = time.process_time() - t0
    gc.enable()
    t0 = time.process_time()
    gc.collect(0)
    sweep = time.process_time() - t0
    del result  # freeing one run's tree is not part of the next run
    return work, sweep


def best(runs: int, *fns) -> list[tuple[float, float]]:
    """For each of ``fns``, called in turn ``runs`` times: the shortest (work, GC pass)."""
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, measured in zip(fns, times):
            measured.append(_measure(fn))
    return [(min(w for w, _ in m), min(g for _, g in m)) for m in times]


def parse(data: bytes, chunk: int | None = None):
    parser = Parser()
    if chunk is None:
        parser.feed(data)
    else:
        for i in range(0, len(data), chunk):
            parser.feed(data[i:i + chunk])
    return parser.next_line()


def run(quick: bool, workdir: Path) -> list[Figure]:
    records = RECORDS_QUICK if quick else RECORDS
    runs = RUNS_QUICK if quick else RUNS
    data = apply_mailbox(records)
    size = len(data) / MB

    line = parse(data)
    assert len(line.value.get_list("RECORD")) == records
    assert print_line(line, "client") == data, "printing the parsed line changed it"
    blob = encode_line(line)
    assert decode_line(blob) == line and print_line(decode_line(blob)) == data

    (t_parse, gc_parse), (t_decode, gc_decode) = best(runs, lambda: parse(data),
                                                      lambda: decode_line(blob))
    ((t_chunked, _),) = best(runs, lambda: parse(data, CHUNK))
    (t_print, _), (t_encode, _) = best(runs, lambda: print_line(line, "client"),
                                       lambda: encode_line(line))

    where = f"{records:,} records, {size:.1f} MB line, CPU time"
    return [
        Figure("text parse", size / t_parse, "MB/s", target=PARSE_TARGET, note=where),
        Figure("text parse, records", records / t_parse, "records/s"),
        Figure("text parse, fed in 64 KiB chunks", size / t_chunked, "MB/s"),
        Figure("text parse, overall (with the GC pass)", size / (t_parse + gc_parse), "MB/s"),
        Figure("text print", size / t_print, "MB/s"),
        Figure("binary encode (text-equivalent bytes)", size / t_encode, "MB/s"),
        Figure("binary decode (text-equivalent bytes)", size / t_decode, "MB/s"),
        Figure("binary decode, overall (with the GC pass)", size / (t_decode + gc_decode), "MB/s"),
        Figure("GC pass over a parsed tree", gc_parse * 1000, "ms", better="lower",
               note=f"decoded tree: {gc_decode * 1000:.0f} ms"),
        Figure("binary decode vs text parse", t_parse / t_decode, "x", target=BINARY_TARGET),
        Figure("binary decode vs text parse, overall", (t_parse + gc_parse) / (t_decode + gc_decode),
               "x"),
        Figure("binary encode vs text print", t_print / t_encode, "x", target=BINARY_TARGET),
        Figure("binary size vs text size", len(blob) / len(data), "x", better="lower",
               note=f"{len(blob) / MB:.2f} MB"),
    ]
