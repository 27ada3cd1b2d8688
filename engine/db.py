"""The LMDB layer: the only module in modsync that imports lmdb.

It knows tables and transactions, nothing about mail.  Its promises:

* ``Database.write(fn)`` runs ``fn(txn)`` in one write transaction and commits
  it atomically (fsync'd unless ``durable=False``).  If the memory map fills
  up, the transaction is aborted, the map grown, and ``fn`` run again from the
  start, so ``fn`` must not have side effects outside the transaction that it
  cannot repeat (the blob store's staging is idempotent for this reason).
* Reader slots left behind by a killed process are cleared when a database is
  opened, so a crash never blocks later writers or wastes pages.
* Keys are bytes and sort bytewise; callers build big-endian keys so that
  ranges follow numeric order.
"""
from __future__ import annotations

import gc
import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import lmdb

from .errors import NotAStore, StoreCorrupt

T = TypeVar("T")

TABLES = (
    "meta",      # store-wide settings: schema version, store id, counters
    "users",     # user name -> user record
    "objects",   # user|kind|key -> object (mailboxes, records, subscriptions, ...)
    "changes",   # user|modseq|kind|key -> b"" : the modseq-ordered change index
    "byorigin",  # user|origin|origin modseq|kind|key -> b"" : the same, per origin
    "index",     # secondary indexes (mailbox name -> id, unique id -> number)
    "blobs",     # blake3 address -> where the compressed body lives
    "sha1",      # SHA-1 of a body -> blake3 address (Cyrus names bodies by SHA-1)
    "intents",   # user|peer -> pending replication intents (used by push)
    "accounts",  # login name -> account (password hash, rights); not replicated
    "csync",     # Cyrus interop's own view of mailboxes it replicates (engine/csync/state.py)
)

# 1 GiB of address space to start: LMDB's file grows only as pages are used,
# so a large map costs nothing on disk, and doubling from here reaches any
# realistic store in a handful of steps.
INITIAL_MAP_SIZE = 1 << 30
# Grow before a write transaction when more than this share of the map is used,
# so that MapFullError (which costs a retried transaction) stays rare.
GROW_AT = 0.75
MAX_TABLES = 16


class Txn:
    """A transaction handle.  Thin on purpose: tables by name, bytes in and out."""

    __slots__ = ("_txn", "_dbs", "write")

    def __init__(self, txn, dbs, write: bool):
        self._txn = txn
        self._dbs = dbs
        self.write = write

    def get(self, table: str, key: bytes) -> bytes | None:
        return self._txn.get(key, db=self._dbs[table])

    def put(self, table: str, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, db=self._dbs[table])

    def put_if_absent(self, table: str, key: bytes, value: bytes) -> bool:
        """Store value unless the key exists; True when stored."""
        return self._txn.put(key, value, db=self._dbs[table], overwrite=False)

    def delete(self, table: str, key: bytes) -> bool:
        return self._txn.delete(key, db=self._dbs[table])

    def range(self, table: str, start: bytes = b"", stop: bytes | None = None,
              *, values: bool = True) -> Iterator:
        """Yield (key, value) (or keys when values=False) with start <= key < stop."""
        with self._txn.cursor(db=self._dbs[table]) as cur:
            if not cur.set_range(start):
                return
            if values:
                for k, v in cur.iternext(keys=True, values=True):
                    if stop is not None and k >= stop:
                        return
                    yield k, v
            else:
                for k in cur.iternext(keys=True, values=False):
                    if stop is not None and k >= stop:
                        return
                    yield k

    def prefix(self, table: str, prefix: bytes, *, values: bool = True) -> Iterator:
        """Yield entries whose key starts with prefix, in key order."""
        return self.range(table, prefix, prefix_end(prefix), values=values)

    def last(self, table: str, start: bytes, stop: bytes):
        """The greatest (key, value) with start <= key < stop, or None."""
        with self._txn.cursor(db=self._dbs[table]) as cur:
            if cur.set_range(stop):
                found = cur.prev()
            else:
                found = cur.last()
            if not found:
                return None
            k = cur.key()
            if k < start or k >= stop:
                return None
            return k, cur.value()

    def count(self, table: str) -> int:
        return self._txn.stat(self._dbs[table])["entries"]

    def snapshot_id(self) -> int:
        """The id of the committed transaction this one reads (replication watchers, issue 5)."""
        return self._txn.id()


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with prefix (None: no bound)."""
    p = bytearray(prefix)
    while p:
        if p[-1] != 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return None


class Database:
    """One LMDB environment holding named tables (a store's by default)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False,
                 readonly: bool = False, durable: bool = True, tables=TABLES):
        self.path = os.fspath(path)
        if not create and not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise NotAStore(f"{self.path}: no LMDB database here", subject=self.path)
        try:
            self.env = lmdb.open(
                self.path, map_size=INITIAL_MAP_SIZE, max_dbs=MAX_TABLES, subdir=True,
                readonly=readonly, create=create, sync=durable, metasync=durable,
                max_readers=254, readahead=False, meminit=False,
            )
        except lmdb.InvalidError as e:
            raise StoreCorrupt(f"{self.path}: not a valid LMDB database ({e})", subject=self.path)
        except lmdb.Error as e:
            raise NotAStore(f"{self.path}: cannot open database ({e})", subject=self.path)
        self.readonly = readonly
        # A killed process leaves its reader slot behind; reclaim it now.
        self.env.reader_check()
        self._grow_to_fit()
        self._dbs = {}
        self._tables_lock = threading.Lock()
        for name in tables:
            try:
                self._dbs[name] = self.env.open_db(name.encode(), create=not readonly)
            except lmdb.NotFoundError:
                raise NotAStore(f"{self.path}: table {name!r} missing; not a modsync store",
                                subject=self.path)

    def ensure_table(self, name: str) -> None:
        """Open (creating it if needed and writable) one more table in this environment.

        For a layer that keeps its own table beside the store's (csync's state)
        so that its writes commit atomically with the store's own.
        """
        if name in self._dbs:
            return
        with self._tables_lock:
            if name not in self._dbs:
                self._dbs[name] = self.env.open_db(name.encode(), create=not self.readonly)

    # -- transactions -------------------------------------------------------
    @contextmanager
    def read(self) -> Iterator[Txn]:
        """A consistent snapshot for reading."""
        try:
            txn = self.env.begin(write=False, buffers=False)
        except lmdb.MapResizedError:
            # Another process grew the map: adopt its size and begin again.
            self.env.set_mapsize(0)
            txn = self.env.begin(write=False, buffers=False)
        with txn:
            yield Txn(txn, self._dbs, write=False)

    def write(self, fn: Callable[[Txn], T], *, before_commit: Callable[[], None] | None = None) -> T:
        """Run fn in one write transaction and commit it; see the module docstring.

        ``before_commit`` runs after ``fn`` and just before the commit: the
        store uses it to make blob bytes durable before any record points at them.
        """
        for _attempt in range(32):
            try:
                self._maybe_grow()
                txn = self.env.begin(write=True)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)     # another process grew the map
                continue
            try:
                result = fn(Txn(txn, self._dbs, write=True))
                if before_commit is not None:
                    before_commit()
                txn.commit()
                return result
            except lmdb.MapFullError:
                txn.abort()
                self._grow(self.env.info()["map_size"] * 2)
            except BaseException:
                txn.abort()
                raise
        raise StoreCorrupt(f"{self.path}: the map kept filling up while growing", subject=self.path)

    # -- map size -----------------------------------------------------------
    def _used_bytes(self) -> int:
        info, stat = self.env.info(), self.env.stat()
        return (info["last_pgno"] + 1) * stat["psize"]

    def _grow_to_fit(self) -> None:
        # Another process may have grown the map; adopting a smaller size would fail.
        size = max(INITIAL_MAP_SIZE, self.env.info()["map_size"])
        while self._used_bytes() > size * GROW_AT:
            size *= 2
        if size != self.env.info()["map_size"] and not self.readonly:
            self.env.set_mapsize(size)

    def _maybe_grow(self) -> None:
        info = self.env.info()
        if self._used_bytes() > info["map_size"] * GROW_AT:
            self._grow(info["map_size"] * 2)

    def _grow(self, size: int) -> None:
        self.env.set_mapsize(size)

    # -- misc ---------------------------------------------------------------
    def sync(self) -> None:
        self.env.sync(True)

    def last_txnid(self) -> int:
        """The latest committed write transaction, by any process: a few microseconds, so
        replication can watch for commits (issue 5).  A committing writer moves it a moment
        before new readers see its data: compare with Txn.snapshot_id()."""
        return self.env.info()["last_txnid"]

    def close(self) -> None:
        # py-lmdb waits, in close(), for every transaction of this environment
        # to end; one kept alive only by a reference cycle (an exception's
        # traceback in another thread, say) would wait for a garbage collection
        # that cannot run meanwhile.  Collect first.
        gc.collect()
        self.env.close()

    def size_bytes(self) -> int:
        return self._used_bytes()
