"""The backup archive: immutable chunk files, an LMDB index, a blake3 checksum chain.

This module knows how an archive is laid out and checked; what goes into it
(change sets, points in time, retention) is ``engine.backup``'s business.
The full specification is schemas/archive-v1.md; in short::

    ARCHIVE/FORMAT                 "modsync-archive 1", the archive id, an optional
                                   admin-key hash; written last at creation
    ARCHIVE/index/                 LMDB (engine.db): meta, chunks, points, bodies, users
    ARCHIVE/data/XXXX/<seq>-<rand>.chunk
                                   immutable chunk files, written once, never changed
    ARCHIVE/lock                   flock held by the one writer

Every chunk file is ``magic | u32 header length | msgpack header | payload |
blake3 checksum``.  The header carries the checksum of the chunk written
just before it (in sequence order, whatever became of that chunk), and the
trailer is blake3 of everything before it, so each chunk's checksum is
blake3(previous checksum || this chunk's bytes): a chain.  The index keeps
an entry for every sequence number ever committed (chunks removed by
compaction stay as entries marked removed, and the compaction's own chunk
lists them), and the head checksum.  Changing, truncating or deleting any
byte of any chunk breaks either that chunk's checksum, the link from the
next chunk, or the agreement with the index.

Three kinds of chunk:

* ``P`` (point): one user's change set from the previous point to this
  one, zstd-compressed, with the point's time, source modseq and state;
* ``B`` (bodies): message bodies, stored once per archive, in blocks of
  about ``BLOCK_TARGET`` bytes, each block one zstd frame (a body is read
  by decompressing its block); the header lists every body's place;
* ``C`` (compaction): which chunks a compaction removed, with their checksums.

Crash safety: chunk files are written under a temporary name, fsynced and
renamed before the index transaction that refers to them commits; a chunk
is deleted only after a committed transaction marked it removed.  A crash
can leave files nothing refers to (verify notes them, the next compaction
removes them), never a reference to a file that is not on disk.

Append-only: an ``Archive`` opened with ``append_only=True`` (or an archive
locked with an admin key, opened without that key) can add chunks and
nothing else: every path that removes or replaces anything checks
``require_admin`` first.
"""
from __future__ import annotations

import fcntl
import hmac
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import blake3
import msgpack
import zstandard

from .blobs import address_of, fsync_dir
from .changeset import ChangeSet, gc_paused
from .db import Database, prefix_end
from .errors import (
    EXIT_DAMAGED,
    ModsyncError,
    NoSuchMessage,
    NoSuchUser,
    NotAStore,
    SchemaVersionError,
    StoreCorrupt,
    UsageError,
)

FORMAT_FILE = "FORMAT"
FORMAT_MAGIC = "modsync-archive"
FORMAT_VERSION = 1
INDEX_VERSION = 1
CHUNK_MAGIC = b"MSARCH1\n"
CHUNK_VERSION = 1
CHECKSUM_SIZE = 32
ZERO = bytes(CHECKSUM_SIZE)
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

KIND_POINT, KIND_BODIES, KIND_COMPACT = "P", "B", "C"
KINDS = (KIND_POINT, KIND_BODIES, KIND_COMPACT)
METHOD_ZSTD, METHOD_RAW = 0, 1

TABLES = (
    "meta",     # format, id, head [seq, checksum], next_seq, created
    "chunks",   # u64 seq -> [name, kind, checksum, size, removed_by, user, point]
    "points",   # user \0 u64 point -> [seq, time, modseq, token, full, state, digest, items,
                #                       new bodies, new body bytes, base]
    "bodies",   # blake3 address -> [seq, block offset, block stored, block raw, method,
                #                    offset in block, size]
    "users",    # user -> [last point]
)

# Bodies are compressed in blocks of about this many bytes: big enough that
# mail's repetitive headers compress across messages (~1.5x better than one
# frame per message on the test corpus), small enough that restoring one
# message decompresses little (a 1 MiB zstd frame takes about 1 ms).
BLOCK_TARGET = 1 << 20
# A body chunk is closed past this many stored bytes: compaction rewrites
# whole chunks, so this bounds its unit of work; and a sample verify reads
# whole chunks.
CHUNK_TARGET = 32 << 20
DEFAULT_LEVEL = 3
# Decompressed size limits, against hostile or damaged input.
MAX_POINT_BYTES = 8 << 30
MAX_HEADER_BYTES = 256 << 20


# -- errors ------------------------------------------------------------------------------

class NotAnArchive(ModsyncError):
    """A path that is not a modsync archive (missing, empty, unmounted, foreign)."""

    code = "not-an-archive"


class ArchiveCorrupt(StoreCorrupt):
    """The archive contradicts itself; ``modsync verify --archive`` lists what."""

    exit_code = EXIT_DAMAGED
    code = "archive-corrupt"


class AppendOnly(ModsyncError):
    """An append-only handle was asked to remove or rewrite something."""

    code = "append-only"


class ArchiveBusy(ModsyncError):
    """Another process is writing to the archive."""

    code = "archive-busy"


# -- chunk files ---------------------------------------------------------------------------

@dataclass
class ChunkHeader:
    kind: str
    seq: int
    created: int
    prev: bytes
    meta: dict


def encode_chunk(kind: str, seq: int, prev: bytes, meta: dict, payload: bytes | list,
                 created: int | None = None) -> tuple[list, bytes]:
    """(parts to write, checksum) of a chunk; ``payload`` may be a list of byte strings."""
    header = msgpack.packb([CHUNK_VERSION, kind, seq, int(time.time()) if created is None
                            else created, prev, meta], use_bin_type=True)
    parts = [CHUNK_MAGIC, _U32.pack(len(header)), header]
    parts.extend(payload if isinstance(payload, list) else [payload])
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for p in parts:
        h.update(p)
    checksum = h.digest()
    parts.append(checksum)
    return parts, checksum


def parse_header(data: bytes, where: str) -> tuple[ChunkHeader, int]:
    """The header at the start of ``data`` and the offset where the payload starts."""
    if not data.startswith(CHUNK_MAGIC):
        raise ArchiveCorrupt(f"{where}: not a modsync archive chunk (wrong magic)", subject=where)
    try:
        n = _U32.unpack_from(data, len(CHUNK_MAGIC))[0]
        start = len(CHUNK_MAGIC) + 4
        if n > MAX_HEADER_BYTES or start + n > len(data):
            raise ValueError("header runs past the end of the chunk")
        version, kind, seq, created, prev, meta = msgpack.unpackb(
            data[start:start + n], raw=False, strict_map_key=False)
    except (struct.error, ValueError, TypeError, msgpack.UnpackException) as e:
        raise ArchiveCorrupt(f"{where}: chunk header is damaged ({e})", subject=where)
    if version != CHUNK_VERSION:
        raise ArchiveCorrupt(f"{where}: chunk format version {version} is not supported "
                             f"(this modsync reads {CHUNK_VERSION})", subject=where)
    if kind not in KINDS or not isinstance(meta, dict) or len(prev) != CHECKSUM_SIZE:
        raise ArchiveCorrupt(f"{where}: chunk header is malformed", subject=where)
    return ChunkHeader(kind, int(seq), int(created), bytes(prev), meta), start + n


def read_chunk_header(path: Path, where: str) -> tuple[ChunkHeader, int]:
    """Only the header of a chunk file (not checked against the trailer)."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
        n = _U32.unpack_from(head, len(CHUNK_MAGIC))[0] if len(head) >= 12 else 0
        if n <= MAX_HEADER_BYTES and len(head) < len(CHUNK_MAGIC) + 4 + n:
            head += fh.read(len(CHUNK_MAGIC) + 4 + n - len(head))
    return parse_header(head, where)


def check_chunk(data: bytes, where: str) -> tuple[ChunkHeader, int, bytes]:
    """Verify a whole chunk's own checksum: (header, payload start, checksum)."""
    if len(data) < len(CHUNK_MAGIC) + 4 + CHECKSUM_SIZE:
        raise ArchiveCorrupt(f"{where}: chunk is truncated ({len(data)} bytes)", subject=where)
    checksum = blake3.blake3(memoryview(data)[:-CHECKSUM_SIZE],
                             max_threads=blake3.blake3.AUTO).digest()
    if checksum != data[-CHECKSUM_SIZE:]:
        raise ArchiveCorrupt(f"{where}: checksum mismatch: the chunk is damaged or truncated",
                             subject=where)
    header, start = parse_header(data, where)
    return header, start, checksum


# -- body blocks -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BodyPlace:
    """Where a body lives: chunk, its block (file offset, stored and raw length, method),
    and the body's offset and size inside the decompressed block."""

    seq: int
    block_offset: int
    block_stored: int
    block_raw: int
    method: int
    offset: int
    size: int

    def to_list(self) -> list:
        return [self.seq, self.block_offset, self.block_stored, self.block_raw, self.method,
                self.offset, self.size]

    @classmethod
    def from_list(cls, v) -> BodyPlace:
        return cls(*v)


def compress_block(raw: bytes, level: int) -> tuple[int, bytes]:
    packed = zstandard.ZstdCompressor(level=level).compress(raw)
    return (METHOD_ZSTD, packed) if len(packed) < len(raw) else (METHOD_RAW, raw)


def decompress_block(method: int, stored: bytes, raw_len: int, where: str) -> bytes:
    if method == METHOD_RAW:
        data = stored
    elif method == METHOD_ZSTD:
        try:
            data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_len)
        except zstandard.ZstdError as e:
            raise ArchiveCorrupt(f"{where}: cannot decompress a body block ({e})", subject=where)
    else:
        raise ArchiveCorrupt(f"{where}: unknown block method {method}", subject=where)
    if len(data) != raw_len:
        raise ArchiveCorrupt(f"{where}: a body block decompresses to {len(data)} bytes, "
                             f"not {raw_len}", subject=where)
    return data


class BodyPacker:
    """Collects bodies into blocks, compresses full blocks on a thread pool, and
    turns them into ``B`` chunks.  Used by backup, compaction, export and import."""

    def __init__(self, pool: ThreadPoolExecutor, level: int = DEFAULT_LEVEL):
        self.pool = pool
        self.level = level
        self._block: list[tuple[bytes, bytes]] = []
        self._block_bytes = 0
        self.blocks: list = []            # [(future or (method, stored), raw len, directory)]
        self.pending_raw = 0
        self.addresses: set[bytes] = set()

    def __contains__(self, address: bytes) -> bool:
        return address in self.addresses

    def add(self, address: bytes, data: bytes) -> None:
        if address in self.addresses:
            return
        self.addresses.add(address)
        if self._block_bytes and self._block_bytes + len(data) > BLOCK_TARGET:
            self.seal()
        self._block.append((address, data))
        self._block_bytes += len(data)
        self.pending_raw += len(data)

    def add_stored_block(self, method: int, stored: bytes, raw_len: int,
                         directory: list[tuple[bytes, int, int]]) -> None:
        """A block that is already compressed (compaction copies whole live blocks)."""
        self.seal()
        for a, _, _ in directory:
            self.addresses.add(a)
        self.blocks.append(((method, stored), raw_len, directory))
        self.pending_raw += raw_len

    def seal(self) -> None:
        if not self._block:
            return
        raw = b"".join(d for _, d in self._block)
        directory, off = [], 0
        for a, d in self._block:
            directory.append((a, off, len(d)))
            off += len(d)
        self.blocks.append((self.pool.submit(compress_block, raw, self.level), len(raw),
                            directory))
        self._block, self._block_bytes = [], 0

    def estimated_stored(self) -> int:
        return self.pending_raw // 2

    def __len__(self) -> int:
        return len(self.addresses)

    def take(self) -> tuple[dict, list[bytes], list[tuple[bytes, int, int, int, int, int, int]]]:
        """Empty the packer: (chunk meta, payload parts, [(address, block offset in payload,
        stored, raw, method, offset, size)])."""
        self.seal()
        parts, blocks_meta, places, bodies_meta = [], [], [], []
        off = 0
        for i, (fut, raw_len, directory) in enumerate(self.blocks):
            method, stored = fut.result() if not isinstance(fut, tuple) else fut
            parts.append(stored)
            blocks_meta.append([off, len(stored), raw_len, method])
            for a, boff, size in directory:
                bodies_meta.append([a, i, boff, size])
                places.append((a, off, len(stored), raw_len, method, boff, size))
            off += len(stored)
        self.blocks, self.pending_raw, self.addresses = [], 0, set()
        return {"blocks": blocks_meta, "bodies": bodies_meta}, parts, places


# -- the index's records -------------------------------------------------------------------

@dataclass
class ChunkEntry:
    seq: int
    name: str
    kind: str
    checksum: bytes
    size: int
    removed_by: int = 0         # seq of the compaction chunk that removed it; 0 = live
    user: str = ""
    point: int = 0

    def pack(self) -> bytes:
        return msgpack.packb([self.name, self.kind, self.checksum, self.size, self.removed_by,
                              self.user, self.point], use_bin_type=True)

    @classmethod
    def unpack(cls, seq: int, raw: bytes) -> ChunkEntry:
        v = msgpack.unpackb(raw, raw=False)
        return cls(seq, v[0], v[1], bytes(v[2]), v[3], v[4], v[5], v[6])

    @property
    def live(self) -> bool:
        return not self.removed_by


@dataclass
class PointInfo:
    """One point in time of one user: what `backup list` shows and restore picks from."""

    user: str
    point: int
    seq: int                    # the P chunk holding its change set
    time: int                   # when the backup run took it (archive host's clock)
    modseq: int                 # the source's modseq for the user at that moment
    token: str                  # the source's state token at that moment
    full: bool                  # the change set is from the empty state (a base point)
    state: dict                 # version vector
    digest: bytes               # the source's user digest at that moment
    items: int = 0
    new_bodies: int = 0
    new_bytes: int = 0
    base: dict = field(default_factory=dict)

    def pack(self) -> bytes:
        return msgpack.packb([self.seq, self.time, self.modseq, self.token, self.full,
                              _vv_out(self.state), self.digest, self.items, self.new_bodies,
                              self.new_bytes, _vv_out(self.base)], use_bin_type=True)

    @classmethod
    def unpack(cls, user: str, point: int, raw: bytes) -> PointInfo:
        v = msgpack.unpackb(raw, raw=False)
        return cls(user, point, v[0], v[1], v[2], v[3], bool(v[4]), _vv_in(v[5]), bytes(v[6]),
                   v[7], v[8], v[9], _vv_in(v[10]))

    def meta(self) -> dict:
        """The point's description as written into its chunk header."""
        return {"user": self.user, "point": self.point, "time": self.time,
                "modseq": self.modseq, "token": self.token, "full": self.full,
                "state": _vv_out(self.state), "base": _vv_out(self.base),
                "digest": self.digest, "items": self.items, "new_bodies": self.new_bodies,
                "new_bytes": self.new_bytes}

    @classmethod
    def from_meta(cls, seq: int, m: dict) -> PointInfo:
        return cls(m["user"], int(m["point"]), seq, int(m["time"]), int(m["modseq"]),
                   m["token"], bool(m["full"]), _vv_in(m["state"]), bytes(m["digest"]),
                   int(m["items"]), int(m["new_bodies"]), int(m["new_bytes"]),
                   _vv_in(m["base"]))

    def as_dict(self) -> dict:
        return {"point": self.point, "time": self.time, "modseq": self.modseq,
                "token": self.token, "full": self.full, "items": self.items,
                "new_bodies": self.new_bodies, "new_bytes": self.new_bytes,
                "digest": self.digest.hex(), "chunk": self.seq}


def _vv_out(vv: dict) -> list:
    return [[bytes.fromhex(o), n] for o, n in sorted(vv.items()) if n]


def _vv_in(v) -> dict:
    return {bytes(o).hex(): int(n) for o, n in v}


def point_key(user: str, point: int) -> bytes:
    return user.encode() + b"\0" + _U64.pack(point)


# -- the archive ---------------------------------------------------------------------------

def _read_format(path: Path) -> dict:
    marker = path / FORMAT_FILE
    if not path.is_dir():
        raise NotAnArchive(f"{path}: no such directory; a backup creates the archive "
                           f"(`modsync backup --to {path}`), or check the mount", subject=path)
    if not marker.is_file():
        what = "an empty directory" if not any(path.iterdir()) else "not a modsync archive"
        raise NotAnArchive(f"{path} is {what} (no {FORMAT_FILE} file); is the volume "
                           f"mounted?", subject=path)
    try:
        lines = marker.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise NotAnArchive(f"{marker}: unreadable ({e})", subject=path)
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != FORMAT_MAGIC:
        raise NotAnArchive(f"{marker}: not a modsync archive marker", subject=path)
    if not head[1].isdigit() or int(head[1]) > FORMAT_VERSION:
        raise SchemaVersionError(f"{path}: archive format {head[1]} is newer than this modsync "
                                 f"understands ({FORMAT_VERSION}); upgrade modsync", subject=path)
    fmt = {"version": int(head[1])}
    for line in lines[1:]:
        k, _, v = line.partition(" ")
        fmt[k] = v.strip()
    if "id" not in fmt:
        raise NotAnArchive(f"{marker}: no archive id", subject=path)
    return fmt


def _check_key(path: Path, fmt: dict, admin_key: bytes | None) -> None:
    if admin_key is not None and "admin-key" in fmt and \
            not hmac.compare_digest(key_hash(admin_key), fmt["admin-key"]):
        raise AppendOnly(f"{path}: the admin key does not match this archive's", subject=path)
    if admin_key is not None and "admin-key" not in fmt:
        raise UsageError(f"{path} is not locked with an admin key; --admin-key-file is "
                         f"not needed", subject=path)


def is_archive(path: str | os.PathLike) -> bool:
    return (Path(path) / FORMAT_FILE).is_file()


def key_hash(key: bytes) -> str:
    return "blake3:" + blake3.blake3(b"modsync-archive-admin-key\0" + key).hexdigest()


def read_key_file(path: str | os.PathLike) -> bytes:
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise UsageError(f"{path}: cannot read the admin key ({e.strerror})", subject=str(path))
    if len(key) < 16:
        raise UsageError(f"{path}: an admin key must be at least 16 bytes", subject=str(path))
    return key


def new_key_file(path: str | os.PathLike) -> bytes:
    """Write a fresh random admin key to path (mode 0600, never overwriting)."""
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


class Archive:
    """An open archive.  Reads are lock-free snapshots; one writer at a time (``lock``)."""

    def __init__(self, path: Path, fmt: dict, db: Database, *, append_only: bool,
                 readonly: bool):
        self.path = path
        self.id = fmt["id"]
        self._fmt = fmt
        self.locked = "admin-key" in fmt
        self.append_only = append_only
        self.forced_append_only = False
        # Why a forced handle is append-only, for the refusal (None: the options that force it).
        self.append_only_reason: str | None = None
        self.readonly = readonly
        self.db = db
        self._owns_db = True
        self._lock_fh = None
        self._readers: dict[str, object] = {}
        self._readers_lock = threading.Lock()
        self._block_cache: tuple | None = None

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, *, admin_key: bytes | None = None) -> Archive:
        """Create an archive in a missing or empty directory.

        With ``admin_key``, the archive is locked: only a handle opened with
        that key may remove anything (compaction); every other handle is
        append-only.  Only a hash of the key is stored.
        """
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if (path / FORMAT_FILE).exists():
                raise UsageError(f"{path} is already a modsync archive", subject=path)
            raise UsageError(f"{path} is not empty; an archive needs a new or empty directory",
                             subject=path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "data").mkdir(exist_ok=True)
        archive_id = secrets.token_hex(16)
        db = Database(path / "index", create=True, tables=TABLES)

        def setup(txn):
            txn.put("meta", b"format", _U32.pack(INDEX_VERSION))
            txn.put("meta", b"id", bytes.fromhex(archive_id))
            txn.put("meta", b"created", _U64.pack(int(time.time())))
            txn.put("meta", b"next_seq", _U64.pack(1))
            txn.put("meta", b"head", msgpack.packb([0, ZERO]))
        db.write(setup)
        text = f"{FORMAT_MAGIC} {FORMAT_VERSION}\nid {archive_id}\n"
        if admin_key is not None:
            text += f"admin-key {key_hash(admin_key)}\n"
        tmp = path / (FORMAT_FILE + ".tmp")
        tmp.write_text(text)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.rename(path / FORMAT_FILE)
        fsync_dir(path)
        fmt = _read_format(path)
        return cls(path, fmt, db, append_only=False, readonly=False)

    @classmethod
    def open(cls, path: str | os.PathLike, *, readonly: bool = False, append_only: bool = False,
             admin_key: bytes | None = None) -> Archive:
        """Open an archive; NotAnArchive for a missing, empty or foreign path.

        The handle is append-only when asked, and when the archive is locked
        with an admin key and ``admin_key`` is not that key.
        """
        path = Path(path)
        fmt = _read_format(path)
        _check_key(path, fmt, admin_key)
        try:
            db = Database(path / "index", readonly=readonly, tables=TABLES)
        except NotAStore as e:
            raise NotAnArchive(f"{path}: the archive index is missing or unreadable ({e})",
                               subject=path)
        with db.read() as txn:
            raw_id = txn.get("meta", b"id")
            version = txn.get("meta", b"format")
        if raw_id is None or raw_id.hex() != fmt["id"]:
            raise NotAnArchive(f"{path}: the index and {FORMAT_FILE} disagree about the "
                               f"archive id", subject=path)
        if version is None or _U32.unpack(version)[0] > INDEX_VERSION:
            raise SchemaVersionError(f"{path}: archive index version is newer than this "
                                     f"modsync understands", subject=path)
        locked = "admin-key" in fmt
        ao = append_only or (locked and admin_key is None)
        archive = cls(path, fmt, db, append_only=ao, readonly=readonly)
        archive.forced_append_only = append_only
        return archive

    def view(self, *, append_only: bool = False, reason: str | None = None,
             admin_key: bytes | None = None) -> Archive:
        """Another handle on this open archive, sharing its index, with its own writer
        lock and its own append-only setting (as ``open`` decides it; ``reason`` says
        why ``append_only`` was asked, for the refusals).

        For a server that serves one archive to many accounts at once: LMDB must
        not be opened twice by one process.  Closing the view leaves the index open.
        """
        _check_key(self.path, self._fmt, admin_key)
        v = Archive(self.path, self._fmt, self.db, readonly=self.readonly,
                    append_only=append_only or (self.locked and admin_key is None))
        v.forced_append_only = append_only
        v.append_only_reason = reason
        v._owns_db = False
        return v

    def close(self) -> None:
        with self._readers_lock:
            for fh in self._readers.values():
                fh.close()
            self._readers.clear()
        self.unlock()
        if self._owns_db:
            self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the writer lock ---------------------------------------------------------------
    def lock(self) -> None:
        """Become the archive's one writer (ArchiveBusy if another process is)."""
        if self.readonly:
            raise UsageError(f"{self.path}: opened read-only")
        if self._lock_fh is not None:
            return
        fh = open(self.path / "lock", "a+b")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise ArchiveBusy(f"{self.path}: another modsync process is writing to this "
                              f"archive; try again when it has finished", subject=self.path)
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def require_admin(self, what: str) -> None:
        """Refuse ``what`` (a removal or rewrite) on an append-only handle."""
        if self.append_only:
            why = ("the archive is locked with an admin key; give it with --admin-key-file"
                   if self.locked and not self.forced_append_only else
                   self.append_only_reason or "this handle is append-only (--append-only, "
                   "MODSYNC_APPEND_ONLY or [backup] append_only)")
            raise AppendOnly(f"{self.path}: refusing to {what}: {why}", subject=self.path)

    # -- reading the index ---------------------------------------------------------------
    def head(self) -> tuple[int, bytes]:
        with self.db.read() as txn:
            seq, checksum = msgpack.unpackb(txn.get("meta", b"head"))
        return seq, bytes(checksum)

    def users(self) -> list[str]:
        with self.db.read() as txn:
            return [k.decode() for k in txn.range("users", values=False)]

    def points(self, user: str) -> list[PointInfo]:
        """A user's points in time, oldest first (empty if the archive has none)."""
        prefix = user.encode() + b"\0"
        with self.db.read() as txn:
            return [PointInfo.unpack(user, _U64.unpack(k[len(prefix):])[0], v)
                    for k, v in txn.prefix("points", prefix)]

    def last_point(self, user: str) -> PointInfo | None:
        prefix = user.encode() + b"\0"
        with self.db.read() as txn:
            found = txn.last("points", prefix, prefix_end(prefix))
        if found is None:
            return None
        return PointInfo.unpack(user, _U64.unpack(found[0][len(prefix):])[0], found[1])

    def chunks(self) -> list[ChunkEntry]:
        with self.db.read() as txn:
            return [ChunkEntry.unpack(_U64.unpack(k)[0], v) for k, v in txn.range("chunks")]

    def chunk(self, seq: int) -> ChunkEntry | None:
        with self.db.read() as txn:
            raw = txn.get("chunks", _U64.pack(seq))
        return None if raw is None else ChunkEntry.unpack(seq, raw)

    def has_body(self, address: bytes) -> bool:
        with self.db.read() as txn:
            return txn.get("bodies", address) is not None

    def missing_bodies(self, addresses: Iterable[bytes]) -> list[bytes]:
        with self.db.read() as txn:
            return [a for a in addresses if txn.get("bodies", a) is None]

    def body_place(self, address: bytes) -> BodyPlace | None:
        with self.db.read() as txn:
            raw = txn.get("bodies", address)
        return None if raw is None else BodyPlace.from_list(msgpack.unpackb(raw))

    def body_count(self) -> int:
        with self.db.read() as txn:
            return txn.count("bodies")

    # -- reading chunks ------------------------------------------------------------------
    def chunk_path(self, name: str) -> Path:
        return self.path / "data" / name

    def _reader(self, seq: int):
        entry = self.chunk(seq)
        if entry is None or not entry.live:
            raise ArchiveCorrupt(f"{self.path}: chunk {seq} is not in the index (was the "
                                 f"archive compacted meanwhile? try again)", subject=seq)
        with self._readers_lock:
            fh = self._readers.get(entry.name)
            if fh is None:
                try:
                    fh = open(self.chunk_path(entry.name), "rb")
                except FileNotFoundError:
                    raise ArchiveCorrupt(f"{self.path}: chunk {entry.name} is missing; run "
                                         f"`modsync verify --archive {self.path}`",
                                         subject=entry.name)
                if len(self._readers) > 64:
                    for old in self._readers.values():
                        old.close()
                    self._readers.clear()
                self._readers[entry.name] = fh
        return fh, entry

    def read_chunk(self, seq: int, *, check: bool = True) -> tuple[ChunkHeader, bytes, bytes]:
        """A chunk's (header, payload, checksum), checked against itself and the index."""
        fh, entry = self._reader(seq)
        data = os.pread(fh.fileno(), entry.size + 1, 0)
        where = f"chunk {entry.name}"
        if len(data) != entry.size:
            raise ArchiveCorrupt(f"{where}: {len(data)} bytes on disk, the index says "
                                 f"{entry.size}", subject=entry.name)
        if check:
            header, start, checksum = check_chunk(data, where)
            if checksum != entry.checksum:
                raise ArchiveCorrupt(f"{where}: checksum differs from the index's",
                                     subject=entry.name)
        else:
            header, start = parse_header(data, where)
            checksum = data[-CHECKSUM_SIZE:]
        return header, data[start:-CHECKSUM_SIZE], checksum

    def read_point(self, info: PointInfo, *, keep=None) -> ChangeSet:
        """The change set of a point (checked: chunk checksum, header against the index);
        ``keep``: see ``decode_point_payload``."""
        header, payload, _ = self.read_chunk(info.seq)
        m = header.meta
        if header.kind != KIND_POINT or m.get("user") != info.user or \
                m.get("point") != info.point:
            raise ArchiveCorrupt(f"{self.path}: chunk {info.seq} does not hold point "
                                 f"{info.point} of {info.user!r}", subject=info.seq)
        return decode_point_payload(payload, f"chunk {info.seq}", validate=False, keep=keep)

    def read_body(self, address: bytes) -> bytes:
        """A body by content address, hash-checked."""
        return self.read_bodies([address])[address]

    def read_bodies(self, addresses: Iterable[bytes]) -> dict[bytes, bytes]:
        """Several bodies, each block read and decompressed once; all hash-checked."""
        return dict(self.iter_bodies(addresses))

    def iter_bodies(self, addresses: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """(address, body) for each address, in an order that reads each block once."""
        places = []
        with self.db.read() as txn:
            for a in addresses:
                raw = txn.get("bodies", a)
                if raw is None:
                    raise NoSuchMessage(f"body {a.hex()} is not in archive {self.path}",
                                        subject=a.hex())
                places.append((a, BodyPlace.from_list(msgpack.unpackb(raw))))
        places.sort(key=lambda ap: (ap[1].seq, ap[1].block_offset, ap[1].offset))
        for a, p in places:
            block = self._block(p)
            data = block[p.offset:p.offset + p.size]
            if len(data) != p.size or address_of(data) != a:
                raise ArchiveCorrupt(f"{self.path}: body {a.hex()} in chunk {p.seq} does not "
                                     f"match its address", subject=a.hex())
            yield a, data

    def _block(self, p: BodyPlace) -> bytes:
        key = (p.seq, p.block_offset)
        cached = self._block_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        fh, entry = self._reader(p.seq)
        stored = os.pread(fh.fileno(), p.block_stored, p.block_offset)
        where = f"chunk {entry.name}"
        if len(stored) != p.block_stored:
            raise ArchiveCorrupt(f"{where} is truncated (a body block at offset "
                                 f"{p.block_offset} runs past its end)", subject=entry.name)
        block = decompress_block(p.method, stored, p.block_raw, where)
        self._block_cache = (key, block)
        return block

    def unlink_chunk(self, name: str) -> None:
        """Delete a chunk file the committed index no longer refers to."""
        with self._readers_lock:
            fh = self._readers.pop(name, None)
            if fh is not None:
                fh.close()
        try:
            self.chunk_path(name).unlink()
        except FileNotFoundError:
            pass

    # -- writing -------------------------------------------------------------------------
    def writer(self, *, level: int = DEFAULT_LEVEL) -> Writer:
        if self.readonly:
            raise UsageError(f"{self.path}: opened read-only")
        self.lock()
        return Writer(self, level)


def decode_point_payload(payload: bytes, where: str, *, validate: bool = True,
                         keep=None) -> ChangeSet:
    """A point's change set.

    ``validate=False`` skips the per-field checks ``ChangeSet.decode`` makes
    of bytes from a peer: a point comes out of a chunk whose checksum was
    just verified, written by this code from a change set that passed those
    checks (or was built by a store), and the checks cost about ten times
    the decoding (a second for a 20,000-message user).  ``verify`` decodes
    with them.  Anything unexpected falls back to the checked decoder.

    ``keep(entries) -> indices``, given the items in their encoded form
    (``Item.to_wire``: kind, ident, fields, origin, origin modseq, removed),
    picks the items to decode; the change set then holds only those.  A
    restore of one message needs a handful of a point's 10^4 items, and
    making the others costs more than everything else it does.
    """
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_POINT_BYTES)
    except zstandard.ZstdError as e:
        raise ArchiveCorrupt(f"{where}: cannot decompress the change set ({e})", subject=where)
    if not validate:
        with gc_paused():
            cs = _decode_trusted(raw, keep)
        if cs is not None:
            return cs
    try:
        with gc_paused():
            cs = ChangeSet.decode(raw)
    except ModsyncError as e:
        raise ArchiveCorrupt(f"{where}: the change set is damaged ({e})", subject=where)
    if keep is not None:
        cs.items = [cs.items[i] for i in keep([it.to_wire() for it in cs.items])]
    return cs


def decode_entries(entries) -> list:
    """Items from their encoded form (``Item.to_wire``), unchecked: see
    ``decode_point_payload``."""
    from .changeset import Item
    return [Item(k, tuple(i), f, o.hex(), om, rm) for k, i, f, o, om, rm in entries]


def _decode_trusted(raw: bytes, keep=None) -> ChangeSet | None:
    from .changeset import FORMAT_VERSION as CS_VERSION
    try:
        v = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if not isinstance(v, list) or len(v) != 10 or v[0] != CS_VERSION:
            return None
        (_, user, sender, base, state, items, bodies, crcs, digest, max_modseq) = v
        if keep is not None:
            items = [items[i] for i in keep(items)]
        return ChangeSet(user, sender.hex(), {o.hex(): n for o, n in base},
                         {o.hex(): n for o, n in state}, decode_entries(items),
                         list(bodies), {k: n for k, n in crcs}, digest, max_modseq)
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException):
        return None


def encode_point_payload(cs: ChangeSet, level: int = DEFAULT_LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(cs.encode())


# -- the writer --------------------------------------------------------------------------

# Tests set this to a callable(step name) to simulate a crash at each step.
_fault = None


def fault_point(step: str) -> None:
    """A place where a crash must leave a valid archive (tests inject failures here)."""
    if _fault is not None:
        _fault(step)


class Writer:
    """Adds chunks to an archive.  Nothing it writes is visible until ``commit``.

    Chunk files are written and made durable as they are added; ``commit``
    records them in the index in one transaction, with the new head.  After
    an exception the writer must be abandoned (closed), never committed:
    the chain's sequence numbers are only consecutive if every chunk a
    writer numbered is committed, or none is.
    """

    def __init__(self, archive: Archive, level: int):
        self.archive = archive
        self.level = level
        self.pool = ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 1))
        self.packer = BodyPacker(self.pool, level)
        with archive.db.read() as txn:
            self.next_seq = _U64.unpack(txn.get("meta", b"next_seq"))[0]
            seq, checksum = msgpack.unpackb(txn.get("meta", b"head"))
        self.head = (seq, bytes(checksum))
        self._new_chunks: list[ChunkEntry] = []
        self._new_points: list[PointInfo] = []
        self._new_bodies: dict[bytes, BodyPlace] = {}
        self._removed: list[ChunkEntry] = []
        self._drop_points: list[tuple[str, int]] = []
        self._drop_bodies: list[bytes] = []
        self._dirs: set[Path] = set()
        self._compaction_seq = 0
        self.bytes_written = 0

    # -- adding ----------------------------------------------------------------------
    def has_body(self, address: bytes) -> bool:
        return address in self.packer or address in self._new_bodies or \
            self.archive.has_body(address)

    def add_body(self, address: bytes, data: bytes) -> None:
        """Add a body unless the archive (or this writer) has it; flushes full chunks."""
        if self.has_body(address):
            return
        self.add_new_body(address, data)

    def add_new_body(self, address: bytes, data: bytes) -> None:
        """Add a body the caller knows the archive lacks (no index lookup)."""
        self.packer.add(address, data)
        if self.packer.estimated_stored() >= CHUNK_TARGET:
            self.flush_bodies()

    def move_body(self, address: bytes, data: bytes) -> None:
        """Re-store a body the archive has (compaction moves live bodies to new chunks)."""
        self.archive.require_admin("move bodies")
        self.packer.add(address, data)
        if self.packer.estimated_stored() >= CHUNK_TARGET:
            self.flush_bodies()

    def add_stored_block(self, method, stored, raw_len, directory) -> None:
        """Add an already-compressed block of bodies (compaction, import)."""
        self.packer.add_stored_block(method, stored, raw_len, directory)
        if self.packer.estimated_stored() >= CHUNK_TARGET:
            self.flush_bodies()

    def flush_bodies(self) -> None:
        """Write the bodies collected so far as a B chunk (durable, not yet committed)."""
        if not len(self.packer):
            return
        meta, payload, places = self.packer.take()
        entry, start = self._write_chunk(KIND_BODIES, meta, payload)
        for a, off, stored, raw, method, boff, size in places:
            self._new_bodies[a] = BodyPlace(entry.seq, start + off, stored, raw, method,
                                            boff, size)

    def add_point(self, info: PointInfo, payload: bytes) -> PointInfo:
        """Write a P chunk for a point (``info.seq`` is filled in)."""
        entry, _ = self._write_chunk(KIND_POINT, None, payload, info=info)
        info.seq = entry.seq
        self._new_points.append(info)
        return info

    def next_point_number(self, user: str) -> int:
        nums = [p.point for p in self._new_points if p.user == user]
        if nums:
            return max(nums) + 1
        last = self.archive.last_point(user)
        dropped = [n for u, n in self._drop_points if u == user]
        return max([last.point if last else 0] + dropped) + 1

    def _write_chunk(self, kind: str, meta: dict | None, payload, *,
                     info: PointInfo | None = None) -> tuple[ChunkEntry, int]:
        seq = self.next_seq
        self.next_seq += 1
        if info is not None:
            info.seq = seq
            meta = info.meta()
        parts, checksum = encode_chunk(kind, seq, self.head[1], meta, payload)
        name = f"{seq >> 12:04x}/{seq:012d}-{secrets.token_hex(4)}.chunk"
        path = self.archive.chunk_path(name)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        size = 0
        with open(tmp, "xb") as fh:
            for p in parts:
                fh.write(p)
                size += len(p)
            fh.flush()
            fault_point(f"write-{kind}")
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o444)
        tmp.rename(path)
        self._dirs.add(path.parent)
        entry = ChunkEntry(seq, name, kind, checksum, size, 0,
                           info.user if info else "", info.point if info else 0)
        self._new_chunks.append(entry)
        self.head = (seq, checksum)
        self.bytes_written += size
        header_len = len(parts[2])
        return entry, len(CHUNK_MAGIC) + 4 + header_len

    # -- removing (compaction) ---------------------------------------------------------
    def remove_chunk(self, entry: ChunkEntry) -> None:
        self.archive.require_admin("remove chunks")
        self._removed.append(entry)

    def drop_point(self, user: str, point: int) -> None:
        self.archive.require_admin("drop points")
        self._drop_points.append((user, point))

    def drop_body(self, address: bytes) -> None:
        self.archive.require_admin("drop bodies")
        self._drop_bodies.append(address)

    def write_compaction_record(self, policy: dict) -> None:
        """A C chunk listing the chunks this compaction removes (with their checksums)."""
        self.flush_bodies()
        meta = {"removed": [[e.seq, e.checksum] for e in self._removed], "policy": policy,
                "time": int(time.time())}
        entry, _ = self._write_chunk(KIND_COMPACT, meta, b"")
        self._compaction_seq = entry.seq

    # -- committing ----------------------------------------------------------------------
    def pending(self) -> bool:
        return bool(self._new_chunks or self._removed or len(self.packer))

    def commit(self) -> None:
        """Record everything written since the last commit in one index transaction."""
        self.flush_bodies()
        if not self._new_chunks and not self._removed:
            return
        for d in self._dirs:
            fsync_dir(d)
        fsync_dir(self.archive.path / "data")
        self._dirs.clear()
        fault_point("before-commit")
        removed_by = self._compaction_seq
        if self._removed and not removed_by:
            raise AssertionError("removing chunks needs a compaction record")

        def fn(txn):
            for e in self._new_chunks:
                txn.put("chunks", _U64.pack(e.seq), e.pack())
            for a, place in self._new_bodies.items():
                txn.put("bodies", a, msgpack.packb(place.to_list()))
            for a in self._drop_bodies:
                txn.delete("bodies", a)
            for user, point in self._drop_points:
                txn.delete("points", point_key(user, point))
            for info in self._new_points:
                txn.put("points", point_key(info.user, info.point), info.pack())
            for e in self._removed:
                e.removed_by = removed_by
                txn.put("chunks", _U64.pack(e.seq), e.pack())
            users = {u for u, _ in self._drop_points} | {p.user for p in self._new_points}
            for user in users:
                prefix = user.encode() + b"\0"
                last = txn.last("points", prefix, prefix_end(prefix))
                if last is None:
                    txn.delete("users", user.encode())
                else:
                    txn.put("users", user.encode(),
                            msgpack.packb([_U64.unpack(last[0][len(prefix):])[0]]))
            txn.put("meta", b"next_seq", _U64.pack(self.next_seq))
            txn.put("meta", b"head", msgpack.packb([self.head[0], self.head[1]]))
        self.archive.db.write(fn)
        fault_point("after-commit")
        removed = self._removed
        self._new_chunks, self._new_points, self._new_bodies = [], [], {}
        self._removed, self._drop_points, self._drop_bodies = [], [], []
        self._compaction_seq = 0
        # Only now, with the index no longer referring to them, do old chunks go.
        for e in removed:
            self.archive.unlink_chunk(e.name)
            fault_point("unlink")
        if removed:
            fsync_dir(self.archive.path / "data")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.archive.unlock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- files on disk ----------------------------------------------------------------------

def chunk_files(archive: Archive) -> dict[str, int]:
    """Every file under data/ (name relative to data/ -> size)."""
    out = {}
    root = archive.path / "data"
    if not root.is_dir():
        return out
    for sub in root.iterdir():
        if sub.is_dir():
            for f in sub.iterdir():
                out[f"{sub.name}/{f.name}"] = f.stat().st_size
        else:
            out[sub.name] = sub.stat().st_size
    return out


def user_exists(archive: Archive, user: str) -> None:
    if archive.last_point(user) is None:
        raise NoSuchUser(f"archive {archive.path} holds no backup of user {user!r}; "
                         f"`modsync backup list --archive {archive.path}` shows who it has",
                         subject=user)


# -- verification ------------------------------------------------------------------------

@dataclass
class ArchiveProblem:
    what: str
    subject: str
    message: str

    def as_dict(self) -> dict:
        return {"what": self.what, "subject": self.subject, "message": self.message}


@dataclass
class ArchiveVerifyReport:
    """What ``verify_archive`` checked and found.  ``ok`` iff no problems."""

    archive: str
    id: str = ""
    head: str = ""
    users: int = 0
    points: int = 0
    chunks: int = 0                # live chunks in the index
    body_chunks: int = 0
    body_chunks_read: int = 0      # body chunks read in full this run
    bodies: int = 0                # bodies in the index
    bodies_checked: int = 0        # bodies hashed this run
    bytes_read: int = 0
    sample: float | None = None
    complete: bool = True          # every body chunk this run meant to read was read
    cycle_done: int = 0            # body chunks verified in the current sample cycle
    seconds: float = 0.0
    problems: list[ArchiveProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, what: str, subject, message: str) -> None:
        self.problems.append(ArchiveProblem(what, str(subject), message))

    def as_dict(self) -> dict:
        return {"archive": self.archive, "id": self.id, "head": self.head, "users": self.users,
                "points": self.points, "chunks": self.chunks, "body_chunks": self.body_chunks,
                "body_chunks_read": self.body_chunks_read, "bodies": self.bodies,
                "bodies_checked": self.bodies_checked, "bytes_read": self.bytes_read,
                "sample": self.sample, "complete": self.complete,
                "cycle_done": self.cycle_done, "seconds": round(self.seconds, 3),
                "problems": [p.as_dict() for p in self.problems], "notes": list(self.notes)}


def referenced_bodies(cs: ChangeSet) -> set[bytes]:
    """Addresses of the bodies the live records and sieve scripts of a change set use."""
    from .model import RECORD, SIEVE
    out = set()
    for item in cs.items:
        if not item.removed and item.kind in (RECORD, SIEVE):
            out.add(bytes(item.fields[0]))
    return out


def verify_archive(archive: Archive, *, select_body_chunks=None, progress=None,
                   deadline: float | None = None, on_chunk_verified=None
                   ) -> ArchiveVerifyReport:
    """Check an archive without changing it; see schemas/archive-v1.md, "Verification".

    Always: the index's chunk list, the chain of checksums through every
    live chunk's header, the head, every point chunk in full (checksum,
    change set, agreement with the index), every body chunk's header
    against the body index, and that every body a point refers to is in the
    index.  Body chunks are read in full (checksum, every block decompressed,
    every body hashed) when ``select_body_chunks(entries)`` picks them (all
    by default), until ``deadline`` (time.monotonic()) passes.
    ``on_chunk_verified(seq)`` is called after each body chunk read in full
    and found sound.
    """
    from .progress import Progress
    progress = progress or Progress()
    t0 = time.monotonic()
    rep = ArchiveVerifyReport(str(archive.path), archive.id)
    with archive.db.read() as txn:
        entries = [ChunkEntry.unpack(_U64.unpack(k)[0], v) for k, v in txn.range("chunks")]
        point_rows = {}
        for k, v in txn.range("points"):
            user, num = k[:-9].decode(), _U64.unpack(k[-8:])[0]
            point_rows[(user, num)] = PointInfo.unpack(user, num, v)
        body_rows = {k: BodyPlace.from_list(msgpack.unpackb(v)) for k, v in txn.range("bodies")}
        user_rows = {k.decode(): msgpack.unpackb(v)[0] for k, v in txn.range("users")}
        head_seq, head_sum = msgpack.unpackb(txn.get("meta", b"head"))
        next_seq = _U64.unpack(txn.get("meta", b"next_seq"))[0]
    head_sum = bytes(head_sum)
    rep.head = head_sum.hex()
    rep.bodies = len(body_rows)
    rep.points = len(point_rows)
    rep.users = len(user_rows)
    live = [e for e in entries if e.live]
    rep.chunks = len(live)
    body_entries = [e for e in live if e.kind == KIND_BODIES]
    rep.body_chunks = len(body_entries)
    by_seq = {e.seq: e for e in entries}

    # The index's own consistency: consecutive seqs, head, next seq.
    for i, e in enumerate(entries):
        if e.seq != i + 1:
            rep.problem("chain", e.seq, f"chunk sequence numbers jump from {i} to {e.seq}: "
                        f"an index entry is missing")
            break
    last = entries[-1] if entries else None
    if (last.seq if last else 0) != head_seq or (last.checksum if last else ZERO) != head_sum:
        rep.problem("head", head_seq, "the head record does not name the last chunk and its "
                    "checksum")
    if next_seq <= (last.seq if last else 0):
        rep.problem("index", "next_seq", f"next sequence number {next_seq} is not above the "
                    f"last chunk {last.seq if last else 0}")
    for e in entries:
        if not e.live and (e.removed_by not in by_seq or by_seq[e.removed_by].kind != KIND_COMPACT):
            rep.problem("index", e.seq, f"chunk {e.seq} is marked removed by {e.removed_by}, "
                        f"which is not a compaction record")

    # Files on disk against the index.
    files = chunk_files(archive)
    names = {e.name: e for e in entries}
    for e in live:
        size = files.get(e.name)
        if size is None:
            rep.problem("missing-chunk", e.name, f"chunk {e.seq} ({_kind_name(e.kind)}) is "
                        f"missing from data/")
        elif size != e.size:
            rep.problem("chunk-size", e.name, f"chunk {e.seq} is {size} bytes, the index "
                        f"says {e.size} (truncated or appended to)")
    for name in sorted(files):
        e = names.get(name)
        if e is None:
            rep.notes.append(f"data/{name}: not in the index (left by an interrupted run; "
                             f"the next compaction removes it)")
        elif not e.live:
            rep.notes.append(f"data/{name}: removed by compaction {e.removed_by} but still on "
                             f"disk (the next backup or compaction deletes it)")

    # Which body chunks to read in full this run.
    chosen = {e.seq for e in body_entries} if select_body_chunks is None else \
        set(select_body_chunks(body_entries))
    progress.start("verify archive", total_items=len(live) - len(body_entries) + len(chosen),
                   total_bytes=sum(e.size for e in live if e.kind != KIND_BODIES
                                   or e.seq in chosen))
    prev = ZERO
    referenced: dict[bytes, tuple[str, int]] = {}
    listed: dict[bytes, int] = {}
    seen_points: set[tuple[str, int]] = set()
    compaction_lists: dict[int, bytes] = {}
    for e in entries:
        expect_prev, prev = prev, e.checksum
        if not e.live or e.name not in files or files[e.name] != e.size:
            continue
        where = f"chunk {e.name}"
        full = e.kind != KIND_BODIES or e.seq in chosen
        if full and e.kind == KIND_BODIES and deadline is not None and time.monotonic() > deadline:
            full = False
            rep.complete = False
        try:
            path = archive.chunk_path(e.name)
            if full:
                data = path.read_bytes()
                rep.bytes_read += len(data)
                header, start, checksum = check_chunk(data, where)
                if checksum != e.checksum:
                    raise ArchiveCorrupt(f"{where}: its checksum is not the one the index "
                                         f"recorded (the chunk was replaced)")
                payload = memoryview(data)[start:-CHECKSUM_SIZE]
            else:
                header, start = read_chunk_header(path, where)
                payload = None
        except ArchiveCorrupt as err:
            rep.problem("chunk", e.name, str(err))
            continue
        except OSError as err:
            rep.problem("chunk", e.name, f"{where}: cannot read ({err.strerror})")
            continue
        if header.seq != e.seq or header.kind != e.kind:
            rep.problem("index", e.name, f"{where}: holds {_kind_name(header.kind)} chunk "
                        f"{header.seq}, the index says {_kind_name(e.kind)} chunk {e.seq}")
        if header.prev != expect_prev:
            rep.problem("chain", e.name, f"{where}: does not follow chunk {e.seq - 1} (the "
                        f"previous checksum it carries differs): a chunk before it was "
                        f"changed or replaced")
        if e.kind == KIND_POINT:
            _verify_point(rep, e, header, payload, point_rows, seen_points, referenced)
        elif e.kind == KIND_BODIES:
            _verify_body_chunk(rep, e, header, start, payload, body_rows, listed)
            if payload is not None:
                rep.body_chunks_read += 1
                if on_chunk_verified is not None and not any(
                        p.subject == e.name for p in rep.problems):
                    on_chunk_verified(e.seq)
        else:
            for seq, checksum in header.meta.get("removed", []):
                compaction_lists[int(seq)] = bytes(checksum)
        progress.advance(1, e.size if full else 0)
    progress.finish()

    for e in entries:
        if not e.live and compaction_lists.get(e.seq) != e.checksum \
                and by_seq.get(e.removed_by) is not None and by_seq[e.removed_by].live:
            rep.problem("chain", e.seq, f"chunk {e.seq} is marked removed, but compaction "
                        f"record {e.removed_by} does not list it with that checksum")
    for key, info in point_rows.items():
        if key not in seen_points:
            ce = by_seq.get(info.seq)
            if ce is None or not ce.live or ce.kind != KIND_POINT:
                rep.problem("index", f"{info.user}#{info.point}", f"point {info.point} of "
                            f"{info.user!r} refers to chunk {info.seq}, which is not a live "
                            f"point chunk")
    for a, place in body_rows.items():
        ce = by_seq.get(place.seq)
        if ce is None or not ce.live or ce.kind != KIND_BODIES:
            rep.problem("index", a.hex(), f"body {a.hex()[:16]}… is indexed in chunk "
                        f"{place.seq}, which is not a live body chunk")
        elif ce.name in files and files[ce.name] == ce.size and listed.get(a) != place.seq:
            rep.problem("index", a.hex(), f"body {a.hex()[:16]}… is indexed in chunk "
                        f"{place.seq}, whose header does not list it there")
    for a, (user, point) in sorted(referenced.items(), key=lambda kv: kv[1]):
        if a not in body_rows:
            rep.problem("missing-body", a.hex(), f"point {point} of {user!r} uses body "
                        f"{a.hex()[:16]}…, which the archive does not hold")
    _verify_point_series(rep, point_rows, user_rows)
    rep.seconds = time.monotonic() - t0
    return rep


def _kind_name(kind: str) -> str:
    return {KIND_POINT: "point", KIND_BODIES: "body", KIND_COMPACT: "compaction"}.get(kind, kind)


def _verify_point(rep, e, header, payload, point_rows, seen_points, referenced) -> None:
    m = header.meta
    try:
        info = PointInfo.from_meta(e.seq, m)
    except (KeyError, TypeError, ValueError) as err:
        rep.problem("point", e.name, f"chunk {e.name}: point description is malformed ({err})")
        return
    key = (info.user, info.point)
    seen_points.add(key)
    row = point_rows.get(key)
    if row is None:
        rep.problem("index", e.name, f"chunk {e.name} holds point {info.point} of "
                    f"{info.user!r}, which the index does not list")
    elif row.pack() != info.pack():
        rep.problem("index", e.name, f"point {info.point} of {info.user!r}: the index and "
                    f"chunk {e.name} describe it differently")
    if e.user != info.user or e.point != info.point:
        rep.problem("index", e.name, f"chunk {e.name}: the index names another user or point")
    try:
        cs = decode_point_payload(bytes(payload), f"chunk {e.name}")
    except ArchiveCorrupt as err:
        rep.problem("point", e.name, str(err))
        return
    if cs.user != info.user or cs.state != info.state or cs.base != info.base:
        rep.problem("point", e.name, f"chunk {e.name}: the change set's user or states "
                    f"differ from the point's description")
    for a in referenced_bodies(cs):
        referenced.setdefault(a, key)


def _verify_body_chunk(rep, e, header, start, payload, body_rows, listed) -> None:
    where = f"chunk {e.name}"
    try:
        blocks = [tuple(b) for b in header.meta["blocks"]]
        bodies = [(bytes(a), int(b), int(o), int(s)) for a, b, o, s in header.meta["bodies"]]
    except (KeyError, TypeError, ValueError) as err:
        rep.problem("chunk", e.name, f"{where}: body directory is malformed ({err})")
        return
    for a, b, off, size in bodies:
        listed.setdefault(a, e.seq)
        row = body_rows.get(a)
        if row is None:
            rep.problem("index", a.hex(), f"{where} holds body {a.hex()[:16]}…, which the "
                        f"index does not list")
        if b >= len(blocks):
            rep.problem("chunk", e.name, f"{where}: body {a.hex()[:16]}… names block {b} of "
                        f"{len(blocks)}")
            continue
        boff, stored, raw, method = blocks[b]
        want = BodyPlace(e.seq, start + boff, stored, raw, method, off, size)
        if row is not None and row.seq == e.seq and row != want:
            rep.problem("index", a.hex(), f"body {a.hex()[:16]}…: the index and {where} "
                        f"place it differently")
    if payload is None:
        return
    by_block: dict[int, list] = {}
    for a, b, off, size in bodies:
        by_block.setdefault(b, []).append((a, off, size))
    for i, (boff, stored, raw, method) in enumerate(blocks):
        try:
            block = decompress_block(method, bytes(payload[boff:boff + stored]), raw, where)
        except ArchiveCorrupt as err:
            rep.problem("body-block", e.name, f"{err} (block {i})")
            continue
        for a, off, size in by_block.get(i, []):
            data = block[off:off + size]
            rep.bodies_checked += 1
            if len(data) != size or address_of(data) != a:
                rep.problem("body-hash", a.hex(), f"{where}: body {a.hex()[:16]}… does not "
                            f"hash to its address")


def _verify_point_series(rep, point_rows, user_rows) -> None:
    by_user: dict[str, list[PointInfo]] = {}
    for (user, _), info in sorted(point_rows.items()):
        by_user.setdefault(user, []).append(info)
    for user, infos in by_user.items():
        if user_rows.get(user) != infos[-1].point:
            rep.problem("index", user, f"user {user!r}: the index's last point "
                        f"{user_rows.get(user)} is not {infos[-1].point}")
        if not infos[0].full:
            rep.problem("points", f"{user}#{infos[0].point}", f"user {user!r}: the oldest point "
                        f"({infos[0].point}) is not a full one: earlier history is missing")
        for a, b in pairwise(infos):
            if not b.full and b.base != a.state:
                rep.problem("points", f"{user}#{b.point}", f"user {user!r}: point {b.point} "
                            f"does not continue from point {a.point}: history between them "
                            f"is missing")
    for user in user_rows:
        if user not in by_user:
            rep.problem("index", user, f"user {user!r} is listed but has no points")
