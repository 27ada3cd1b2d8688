"""Garbage collection of bodies nothing refers to any more.

Expunging a message never deletes its body: a replica, a backup or an undo
may still want it.  ``collect`` is the only thing that removes bodies, in
two steps so that a retention period holds:

1. *Mark*: a body that no live record or sieve script refers to gets an
   "unreferenced since" time; one that is referenced again is unmarked.
2. *Sweep*: a body unreferenced for longer than the retention period leaves
   the index.  Packs whose live share falls below ``REWRITE_BELOW`` are
   rewritten, and so are small packs when there are several: live entries
   are copied into the current pack, made durable, the index repointed in
   one transaction, and only then the old pack deleted.  A crash at any
   point leaves either the old or the new location valid.  A pack that a
   writer holds (flock) is left for next time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .blobs import ENTRY, PACK_TARGET_SIZE, Location
from .model import RECORD, SIEVE, _pack, unpackb
from .store import Store

REWRITE_BELOW = 0.5
# Packs smaller than this are merged into the current pack when there are
# several (short-lived writers leave small packs behind).
SMALL_PACK = PACK_TARGET_SIZE // 16


@dataclass
class GcReport:
    marked: int = 0
    removed: int = 0
    removed_bytes: int = 0
    packs_rewritten: int = 0
    packs_deleted: int = 0
    reclaimed_bytes: int = 0
    errors: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _referenced(txn) -> set[bytes]:
    refs: set[bytes] = set()
    for k, v in txn.range("objects"):
        kind = k[4:5]
        if kind == RECORD or kind == SIEVE:
            fields_ = unpackb(v)
            if not fields_[3]:
                refs.add(fields_[4])
    return refs


def collect(store: Store, *, retention: float = 7 * 86400, now: float | None = None) -> GcReport:
    """Mark and sweep unreferenced bodies, then rewrite mostly-dead packs."""
    now = time.time() if now is None else now
    report = GcReport()

    def mark_and_sweep(txn):
        refs = _referenced(txn)
        for address, raw in list(txn.range("blobs")):
            v = unpackb(raw)
            if address in refs:
                if v[7]:
                    v[7] = 0
                    txn.put("blobs", address, _pack(v))
                continue
            if not v[7]:
                v[7] = int(now)
                txn.put("blobs", address, _pack(v))
                report.marked += 1
            elif now - v[7] >= retention:
                txn.delete("blobs", address)
                if txn.get("sha1", v[5]) == address:
                    txn.delete("sha1", v[5])
                report.removed += 1
                report.removed_bytes += v[3]

    with store._lock:
        store.db.write(mark_and_sweep)
        _rewrite_packs(store, report)
    return report


def _rewrite_packs(store: Store, report: GcReport) -> None:
    with store.db.read() as txn:
        live: dict[str, list] = {}
        for address, raw in txn.range("blobs"):
            v = unpackb(raw)
            live.setdefault(v[0], []).append((address, v))
    packs = [p for p in store.blobs.packs() if p != store.blobs.current_pack]
    small = [p for p in packs if store.blobs.pack_size(p) < SMALL_PACK]
    for pack in packs:
        size = store.blobs.pack_size(pack)
        entries = live.get(pack, [])
        live_bytes = sum(ENTRY.size + v[2] for _, v in entries)
        mostly_dead = live_bytes < size * REWRITE_BELOW
        if not mostly_dead and not (len(small) > 1 and pack in small):
            continue
        lock = store.blobs.lock_pack(pack)
        if lock is None:
            continue   # a writer is appending to it: next time
        try:
            _move_out(store, pack, entries, report)
            # Delete while still holding the lock: a writer looking for a pack to
            # reuse cannot take this one between our check and the delete.
            store.blobs.remove_pack(pack)
        except RuntimeError as e:
            report.errors.append(str(e))
            continue
        finally:
            lock.close()
        report.reclaimed_bytes += size - live_bytes
        if entries:
            report.packs_rewritten += 1
        else:
            report.packs_deleted += 1


def _move_out(store: Store, pack: str, entries: list, report: GcReport) -> None:
    """Copy pack's live entries into the current pack and repoint the index to them."""
    moved = []
    for address, v in entries:
        method, _, payload = store.blobs.read_stored(Location.from_list(v))
        moved.append((address, store.blobs.append_stored(address, method, payload, v[3])))

    def repoint(txn):
        for address, new in moved:
            cur = txn.get("blobs", address)
            if cur is None:
                continue
            cv = unpackb(cur)
            if cv[0] == pack:
                txn.put("blobs", address, _pack(new.to_list() + cv[5:]))
        # Anything still pointing into the pack means it is not safe to delete.
        for _address, raw in txn.range("blobs"):
            if unpackb(raw)[0] == pack:
                raise RuntimeError(f"pack {pack} is still referenced; left in place")
    store.db.write(repoint, before_commit=store.blobs.sync)
