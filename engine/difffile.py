"""Offline diff files: a change set and its bodies in one self-checking file.

Layout (all integers big-endian)::

    b"MSDIFF1\\n"                       magic and format version
    u32 length, msgpack header          [version, origin store id, user, base, state, created]
    zstd frame                          msgpack [change set bytes, [[address, body], ...]]
    32 bytes                            blake3 of everything before it

The header is readable without decompressing (``modsync apply`` can say
what a file is before it does anything).  The file is written to a
temporary name, fsynced and renamed, so a half-written diff never has the
final name.  Anything that does not check out raises ``ProtocolError``
saying what is wrong with which file.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import blake3
import msgpack
import zstandard

from .changeset import ChangeSet, build
from .errors import ProtocolError

MAGIC = b"MSDIFF1\n"
FORMAT_VERSION = 1
CHECKSUM_SIZE = 32
# A diff holds at most this much once decompressed: bounds memory on hostile input.
MAX_UNPACKED = 16 << 30
_U32 = struct.Struct(">I")


@dataclass
class DiffHeader:
    origin: str
    user: str
    base: dict
    state: dict
    created: int


def write_diff(store, user: str, base: dict, path: str | os.PathLike, *,
               level: int = 3) -> tuple[ChangeSet, int]:
    """Write the diff taking a receiver at ``base`` to this store's state; (change set, bytes)."""
    cs = build(store, user, base)
    bodies = [[a, store.read_body(a)] for a in cs.bodies]
    header = msgpack.packb([FORMAT_VERSION, bytes.fromhex(store.id), user,
                            [[bytes.fromhex(o), n] for o, n in cs.base.items()],
                            [[bytes.fromhex(o), n] for o, n in cs.state.items()],
                            int(time.time())], use_bin_type=True)
    payload = zstandard.ZstdCompressor(level=level).compress(
        msgpack.packb([cs.encode(), bodies], use_bin_type=True))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    hasher = blake3.blake3()
    with open(tmp, "wb") as fh:
        for chunk in (MAGIC, _U32.pack(len(header)), header, payload):
            fh.write(chunk)
            hasher.update(chunk)
        fh.write(hasher.digest())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return cs, path.stat().st_size


def read_header(path: str | os.PathLike) -> DiffHeader:
    data = _read_checked(path)
    return _header(data, path)[0]


def read_diff(path: str | os.PathLike) -> tuple[DiffHeader, ChangeSet, dict[bytes, bytes]]:
    """Verify and decode a diff file: (header, change set, {address: body})."""
    data = _read_checked(path)
    header, end = _header(data, path)
    try:
        raw = zstandard.ZstdDecompressor().decompress(data[end:-CHECKSUM_SIZE],
                                                      max_output_size=MAX_UNPACKED)
        cs_bytes, bodies = msgpack.unpackb(raw, raw=False)
    except (zstandard.ZstdError, ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"{path}: the diff's payload is damaged ({e})", subject=str(path))
    cs = ChangeSet.decode(cs_bytes)
    if cs.user != header.user or cs.sender != header.origin:
        raise ProtocolError(f"{path}: header and change set disagree about user or origin",
                            subject=str(path))
    return header, cs, {bytes(a): bytes(b) for a, b in bodies}


def _read_checked(path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ProtocolError(f"{path}: cannot read the diff file ({e.strerror})", subject=str(path))
    if not data.startswith(MAGIC):
        raise ProtocolError(f"{path} is not a modsync diff file (wrong magic)", subject=str(path))
    if len(data) < len(MAGIC) + 4 + CHECKSUM_SIZE:
        raise ProtocolError(f"{path} is truncated", subject=str(path))
    if blake3.blake3(data[:-CHECKSUM_SIZE]).digest() != data[-CHECKSUM_SIZE:]:
        raise ProtocolError(f"{path}: checksum mismatch: the file is truncated or damaged; "
                            f"ask the sender for a new diff", subject=str(path))
    return data


def _header(data: bytes, path) -> tuple[DiffHeader, int]:
    try:
        n = _U32.unpack_from(data, len(MAGIC))[0]
        start = len(MAGIC) + 4
        v = msgpack.unpackb(data[start:start + n], raw=False)
        version, origin, user, base, state, created = v
    except (struct.error, ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"{path}: the diff's header is damaged ({e})", subject=str(path))
    if version != FORMAT_VERSION:
        raise ProtocolError(f"{path}: diff format version {version} is not supported (this "
                            f"modsync reads {FORMAT_VERSION})", subject=str(path))
    return DiffHeader(bytes(origin).hex(), user, {bytes(o).hex(): k for o, k in base},
                      {bytes(o).hex(): k for o, k in state}, created), start + n
