"""The blob store: message bodies, stored once each, by content address.

A body's address is the blake3-256 hash of its exact bytes.  Bodies are
zstd-compressed, one independent frame each, and appended to *pack files*
under ``blobs/``; the store's LMDB index maps an address to its place
(pack, offset, compressed length, size).  Packs rather than one file per
body because a file per 4 KB message costs an open, a rename and an fsync
each, which caps imports at a few thousand messages per second; a pack
costs one fsync per batch.

Crash safety: bytes are appended to a pack first; ``sync()`` fsyncs the pack
(and, for a new pack, its directory) and only then does the caller commit
the LMDB transaction that refers to them.  Bytes past the last committed
reference are garbage that ``BlobStore.rewrite`` (garbage collection) drops.
A crash can therefore leave unreferenced bytes, never a reference to bytes
that are not on disk.

Each entry in a pack starts with a header (magic, method, address, lengths),
so packs can be checked and re-indexed on their own, without LMDB.

This module never imports lmdb: the index lives in the store layer.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3
import zstandard

from .errors import StoreCorrupt

PACK_MAGIC = b"MSPACK1\n"
ENTRY = struct.Struct(">4sB32sQQ")   # magic, method, address, stored length, size
ENTRY_MAGIC = b"MSBL"
METHOD_ZSTD = 0
METHOD_RAW = 1                       # incompressible bodies are stored as they are
# Start a new pack past this size so that rewriting one during garbage
# collection stays a bounded amount of work.
PACK_TARGET_SIZE = 256 << 20
DEFAULT_LEVEL = 3
# Below this many bodies, handing work to another thread costs more than it saves.
PARALLEL_MIN = 16


def _pool():
    """Threads that compress batches for every BlobStore of the process (one per core).

    Each runs ``multi_compress_to_buffer`` on a whole chunk: one call that
    releases the GIL for the chunk, so compression runs beside the Python
    bookkeeping of the main thread.  Per-body ``compress`` calls from a worker
    would wait for the GIL after every body, and zstd's own threads gain
    nothing on mail-sized frames (measured: tools/benchmarks/store_ops.py).
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=POOL_THREADS,
                                       thread_name_prefix="modsync-zstd")
        return _POOL


POOL_THREADS = os.cpu_count() or 2
_POOL = None
_POOL_LOCK = threading.Lock()


class Pending:
    """Work handed to the compression threads, read as one result: ``result()`` is
    the results of ``parts`` (futures of lists) joined in order, or ``done`` for
    work too small to hand over.  Raises what a part raised."""

    def __init__(self, parts=(), *, done=None):
        self._parts = parts
        self._done = done

    def result(self):
        if self._done is not None:
            return self._done
        return [x for f in self._parts for x in f.result()]


_THREAD = threading.local()


def unpack_stored(entries: list[tuple[int, bytes, int]]) -> list[bytes | None]:
    """Bodies from their stored form, ``(method, payload, size)`` each (as
    ``read_stored`` and ``Store.read_packed`` give them): None for an entry that
    does not decode to exactly ``size`` bytes, and never more than ``size``
    bytes are made, whatever a frame claims.  Not checked against addresses.

    The zstd frames are decompressed in one call that releases the GIL.
    """
    return list(Unpacked(entries))


def unpack_stored_async(entries: list[tuple[int, bytes, int]]) -> "Future | Pending":
    """``Unpacked(entries)`` on the compression threads: its one GIL-free call runs
    while the caller goes on (a receiver reading the rest of a change set).  A few
    bodies are done at once: handing them over would cost more than it saves."""
    if len(entries) < PARALLEL_MIN:
        return Pending(done=Unpacked(entries))
    return _pool().submit(Unpacked, entries)


class Unpacked:
    """What ``unpack_stored`` gives, made by one GIL-free call for every zstd frame;
    each body is copied out of its buffer only when asked for (``unpacked[i]``), by
    the thread that needs it, so the thread that decompressed needs the GIL
    for no loop of its own."""

    __slots__ = ("_entries", "_got", "_slot")

    def __init__(self, entries: list[tuple[int, bytes, int]]):
        self._entries = entries
        self._slot: dict[int, int] = {}
        self._got = None
        frames = []
        for i, (method, payload, size) in enumerate(entries):
            if method == METHOD_ZSTD and size > 0:
                self._slot[i] = len(frames)
                frames.append(payload)
        if frames:
            sizes = struct.pack(f"={len(frames)}Q", *(entries[i][2] for i in self._slot))
            try:
                self._got = _dctx().multi_decompress_to_buffer(frames, decompressed_sizes=sizes,
                                                               threads=1)
            except zstandard.ZstdError:
                pass     # one of them is bad: each is decompressed alone when asked for

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return (self[i] for i in range(len(self._entries)))

    def __getitem__(self, i: int) -> bytes | None:
        method, payload, size = self._entries[i]
        if method == METHOD_RAW:
            return payload if len(payload) == size else None
        j = self._slot.get(i)
        if j is None:
            return None
        if self._got is not None:
            return self._got[j].tobytes()
        try:
            data = _dctx().decompress(payload, max_output_size=size)
        except zstandard.ZstdError:
            return None
        return data if len(data) == size else None


def _dctx() -> "zstandard.ZstdDecompressor":
    dctx = getattr(_THREAD, "dctx", None)
    if dctx is None:
        dctx = _THREAD.dctx = zstandard.ZstdDecompressor()
    return dctx


def address_of(data: bytes) -> bytes:
    """The content address of a body: blake3-256 of its exact bytes."""
    return blake3.blake3(data).digest()


def sha1_of(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


@dataclass(frozen=True, slots=True)
class Location:
    """Where a body lives: pack name, offset of its entry header, stored length, size."""

    pack: str
    offset: int
    stored: int
    size: int
    method: int = METHOD_ZSTD

    def to_list(self) -> list:
        return [self.pack, self.offset, self.stored, self.size, self.method]

    @classmethod
    def from_list(cls, v) -> "Location":
        return cls(v[0], v[1], v[2], v[3], v[4])


class BlobStore:
    """Pack files in one directory.  Appends are serialised by the caller (the store)."""

    def __init__(self, root: str | os.PathLike, *, level: int = DEFAULT_LEVEL):
        self.root = Path(root)
        self.level = level
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._local = threading.local()
        self._pack_name: str | None = None
        self._fh = None
        self._size = 0
        self._dirty = False
        self._new_pack = False
        self._staged: dict[bytes, Location] = {}
        self._finished: set[str] = set()      # packs rolled over: never reused by us

    # -- writing ------------------------------------------------------------
    def compress_many(self, datas: list[bytes]) -> list[tuple[int, bytes]]:
        """(method, payload) for each body, compressed on all cores for large batches."""
        return self.compress_many_async(datas).result()

    def compress_many_async(self, datas: list[bytes]) -> "Pending":
        """Start compressing datas on the compression threads; ``result()`` gives
        what ``compress_many`` returns.  The caller may go on with other work
        (the next batch's reading, the previous batch's commit) meanwhile."""
        if len(datas) < PARALLEL_MIN:
            return Pending(done=[self._choose(d, self._compressor.compress(d)) for d in datas])
        n = max(1, min(POOL_THREADS, len(datas) // PARALLEL_MIN))
        step = -(-len(datas) // n)
        pool = _pool()
        return Pending([pool.submit(self._compress_chunk, datas[i:i + step])
                        for i in range(0, len(datas), step)])

    def _compress_chunk(self, datas: list[bytes]) -> list[tuple[int, bytes]]:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:   # a compressor serves one thread at a time
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        out = cctx.multi_compress_to_buffer(datas, threads=1)
        return [self._choose(d, out[i].tobytes()) for i, d in enumerate(datas)]

    @staticmethod
    def _choose(data: bytes, packed: bytes) -> tuple[int, bytes]:
        return (METHOD_ZSTD, packed) if len(packed) < len(data) else (METHOD_RAW, data)

    def append(self, address: bytes, data: bytes, *, packed=None) -> Location:
        """Append a body (not yet durable: call sync() before referring to it).

        ``packed`` is (method, payload) from compress_many, if done already.
        """
        loc = self._staged.get(address)
        if loc is not None:
            return loc
        method, payload = packed or self._choose(data, self._compressor.compress(data))
        loc = self._write_entry(address, method, payload, len(data))
        self._staged[address] = loc
        return loc

    def append_stored(self, address: bytes, method: int, payload: bytes, size: int) -> Location:
        """Append an already-compressed entry (used when rewriting packs)."""
        return self._write_entry(address, method, payload, size)

    def _write_entry(self, address: bytes, method: int, payload: bytes, size: int) -> Location:
        if self._fh is None or self._size >= PACK_TARGET_SIZE:
            if self._fh is not None:
                self._finished.add(self._pack_name)
            self._open_new_pack()
        offset = self._size
        self._fh.write(ENTRY.pack(ENTRY_MAGIC, method, address, len(payload), size))
        self._fh.write(payload)
        self._size += ENTRY.size + len(payload)
        self._dirty = True
        return Location(self._pack_name, offset, len(payload), size, method)

    def _open_new_pack(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None
        self.root.mkdir(parents=True, exist_ok=True)
        if self._reuse_pack():
            return
        # Time first so packs list in creation order; random so that two
        # processes never pick the same name.
        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        fh = open(self.root / f"{name}.pack", "xb", buffering=1 << 20)
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write(PACK_MAGIC)
        self._fh, self._pack_name, self._size = fh, name, len(PACK_MAGIC)
        self._new_pack = True
        self._dirty = True

    def _reuse_pack(self) -> bool:
        """Append to a recent pack with room that no other writer holds.

        Without this every short-lived process (one `modsync save`) would
        leave a pack of its own.  A pack is held by its writer with an
        exclusive flock, so two writers never append to one pack, and
        garbage collection never rewrites a pack being written.
        """
        for name in reversed(self.packs()[-4:]):
            if name in self._finished:
                continue
            path = self.root / f"{name}.pack"
            try:
                if path.stat().st_size >= PACK_TARGET_SIZE:
                    continue
                fh = open(path, "ab", buffering=1 << 20)
            except OSError:
                continue
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Garbage collection deletes a pack while holding its lock: once we
                # have the lock, make sure the file is still there under its name.
                if os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino:
                    raise OSError("pack replaced")
                with open(path, "rb") as check:
                    if check.read(len(PACK_MAGIC)) != PACK_MAGIC:
                        raise OSError("not a pack")
            except OSError:
                fh.close()
                continue
            self._fh, self._pack_name, self._size = fh, name, fh.seek(0, os.SEEK_END)
            self._new_pack = False
            return True
        return False

    def sync(self) -> None:
        """Make every appended byte durable (file and, for a new pack, directory)."""
        if self._dirty and self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            if self._new_pack:
                fsync_dir(self.root)
                self._new_pack = False
        self._dirty = False
        self._staged.clear()

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None
        for fh in getattr(self._local, "readers", {}).values():
            fh.close()
        self._local.readers = {}

    # -- reading ------------------------------------------------------------
    def _reader(self, pack: str):
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = {}
        fh = readers.get(pack)
        if fh is None:
            if self._fh is not None and pack == self._pack_name:
                self._fh.flush()
            try:
                fh = open(self.root / f"{pack}.pack", "rb")
            except FileNotFoundError:
                raise StoreCorrupt(f"blob pack {pack} is missing from {self.root}", subject=pack)
            if len(readers) > 64:
                for old in readers.values():
                    old.close()
                readers.clear()
            readers[pack] = fh
        elif pack == self._pack_name and self._fh is not None:
            self._fh.flush()
        return fh

    def read_stored(self, loc: Location) -> tuple[int, bytes, bytes]:
        """The raw entry: (method, address from the header, stored payload)."""
        fh = self._reader(loc.pack)
        raw = os.pread(fh.fileno(), ENTRY.size + loc.stored, loc.offset)
        if len(raw) != ENTRY.size + loc.stored:
            raise StoreCorrupt(f"blob pack {loc.pack} is truncated at offset {loc.offset}",
                               subject=loc.pack)
        return self._entry(loc, raw)

    def read_stored_many(self, locations: list[Location], *, run: int = 1 << 20):
        """``read_stored`` of each location, in the order given; neighbouring entries
        of a pack (a body after another) come from one read of up to ``run`` bytes."""
        i, n = 0, len(locations)
        while i < n:
            first = locations[i]
            j, end = i + 1, first.offset + ENTRY.size + first.stored
            while j < n and locations[j].pack == first.pack and locations[j].offset == end \
                    and end - first.offset < run:
                end += ENTRY.size + locations[j].stored
                j += 1
            if j == i + 1:
                yield self.read_stored(first)
            else:
                fh = self._reader(first.pack)
                raw = os.pread(fh.fileno(), end - first.offset, first.offset)
                if len(raw) != end - first.offset:
                    raise StoreCorrupt(f"blob pack {first.pack} is truncated at offset "
                                       f"{first.offset + len(raw)}", subject=first.pack)
                view = memoryview(raw)
                for loc in locations[i:j]:
                    at = loc.offset - first.offset
                    yield self._entry(loc, view[at:at + ENTRY.size + loc.stored])
            i = j

    def _entry(self, loc: Location, raw) -> tuple[int, bytes, bytes]:
        magic, method, address, stored, size = ENTRY.unpack_from(raw)
        if magic != ENTRY_MAGIC or stored != loc.stored or size != loc.size:
            raise StoreCorrupt(f"blob pack {loc.pack}: bad entry header at offset {loc.offset}",
                               subject=loc.pack)
        return method, address, bytes(raw[ENTRY.size:])

    def read(self, address: bytes, loc: Location) -> bytes:
        """The body, byte-exact; raises StoreCorrupt unless its hash is `address`."""
        method, header_addr, payload = self.read_stored(loc)
        if header_addr != address:
            raise StoreCorrupt(f"blob {address.hex()}: pack {loc.pack} holds another blob at "
                               f"offset {loc.offset}", subject=address.hex())
        if method == METHOD_RAW:
            data = payload
        elif method != METHOD_ZSTD:
            raise StoreCorrupt(f"blob {address.hex()}: unknown storage method {method} in pack "
                               f"{loc.pack} at offset {loc.offset}", subject=address.hex())
        else:
            try:
                data = _dctx().decompress(payload, max_output_size=loc.size)
            except zstandard.ZstdError as e:
                raise StoreCorrupt(f"blob {address.hex()}: cannot decompress ({e})",
                                   subject=address.hex())
        if len(data) != loc.size or address_of(data) != address:
            raise StoreCorrupt(f"blob {address.hex()}: content does not match its address "
                               f"(pack {loc.pack}, offset {loc.offset})", subject=address.hex())
        return data

    # -- maintenance --------------------------------------------------------
    def packs(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.stem for p in self.root.glob("*.pack"))

    def pack_size(self, pack: str) -> int:
        return (self.root / f"{pack}.pack").stat().st_size

    @property
    def current_pack(self) -> str | None:
        return self._pack_name

    def lock_pack(self, pack: str):
        """An open file holding an exclusive lock on pack, or None if a writer holds it."""
        if pack == self._pack_name:
            return None
        try:
            fh = open(self.root / f"{pack}.pack", "rb")
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return None
        return fh

    def remove_pack(self, pack: str) -> None:
        """Delete a pack that nothing refers to any more (the caller made sure)."""
        if pack == self._pack_name:
            raise ValueError("cannot remove the pack being written")
        readers = getattr(self._local, "readers", {})
        fh = readers.pop(pack, None)
        if fh is not None:
            fh.close()
        (self.root / f"{pack}.pack").unlink()
        fsync_dir(self.root)

    def rollover(self) -> None:
        """Finish the current pack so that the next append starts a new one."""
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None
            self._finished.add(self._pack_name)
            self._pack_name = None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
