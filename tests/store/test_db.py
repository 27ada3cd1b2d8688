"""engine/db.py: tables, atomic write transactions, key ranges, map growth."""
from __future__ import annotations

import os
import shutil

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine.db
from engine.db import Database, prefix_end
from engine.errors import NotAStore, StoreCorrupt

from . import tmpfs

MIB = 1 << 20


@pytest.fixture
def db(scratch):
    d = Database(scratch / "db", create=True)
    yield d
    d.close()


def put_all(db, table, items):
    def fn(txn):
        for k, v in items:
            txn.put(table, k, v)
    db.write(fn)


def test_tables_exist_and_are_separate(db):
    for t in engine.db.TABLES:
        db.write(lambda txn, t=t: txn.put(t, b"k", t.encode()))
    with db.read() as txn:
        for t in engine.db.TABLES:
            assert txn.get(t, b"k") == t.encode()
            assert txn.count(t) == 1


def test_write_returns_result_and_commits(db):
    assert db.write(lambda txn: txn.put("meta", b"a", b"1") or 42) == 42
    with db.read() as txn:
        assert txn.get("meta", b"a") == b"1"


def test_exception_aborts_everything(db):
    put_all(db, "meta", [(b"keep", b"old")])

    def fn(txn):
        txn.put("meta", b"keep", b"new")
        txn.put("objects", b"x", b"y")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        db.write(fn)
    with db.read() as txn:
        assert txn.get("meta", b"keep") == b"old"
        assert txn.get("objects", b"x") is None


def test_failing_before_commit_aborts(db):
    def fail():
        raise OSError("fsync failed")
    with pytest.raises(OSError):
        db.write(lambda txn: txn.put("meta", b"a", b"1"), before_commit=fail)
    with db.read() as txn:
        assert txn.get("meta", b"a") is None


def test_put_if_absent_and_delete(db):
    assert db.write(lambda txn: txn.put_if_absent("meta", b"a", b"1")) is True
    assert db.write(lambda txn: txn.put_if_absent("meta", b"a", b"2")) is False
    with db.read() as txn:
        assert txn.get("meta", b"a") == b"1"
    assert db.write(lambda txn: txn.delete("meta", b"a")) is True
    assert db.write(lambda txn: txn.delete("meta", b"a")) is False


def test_reader_sees_a_snapshot(db):
    put_all(db, "meta", [(b"a", b"1")])
    with db.read() as txn:
        db.write(lambda w: w.put("meta", b"a", b"2"))
        assert txn.get("meta", b"a") == b"1"
    with db.read() as txn:
        assert txn.get("meta", b"a") == b"2"


keys = st.lists(st.binary(min_size=0, max_size=4).filter(bool), unique=True, max_size=30)
bounds = st.binary(max_size=4)


@settings(max_examples=60, deadline=None)
@given(ks=keys, start=bounds, stop=st.one_of(st.none(), bounds), prefix=st.binary(max_size=3))
def test_range_prefix_last_match_brute_force(ks, start, stop, prefix):
    base = tmpfs.mkdtemp()
    d = Database(os.path.join(base, "db"), create=True)
    try:
        put_all(d, "objects", [(k, k[::-1]) for k in ks])
        s = sorted(ks)
        with d.read() as txn:
            want = [k for k in s if k >= start and (stop is None or k < stop)]
            assert list(txn.range("objects", start, stop, values=False)) == want
            assert list(txn.range("objects", start, stop)) == [(k, k[::-1]) for k in want]
            assert list(txn.prefix("objects", prefix, values=False)) == \
                [k for k in s if k.startswith(prefix)]
            if stop is not None:
                found = txn.last("objects", start, stop)
                assert found == ((want[-1], want[-1][::-1]) if want else None)
    finally:
        d.close()
        shutil.rmtree(base, ignore_errors=True)


@given(prefix=st.binary(max_size=5), key=st.binary(max_size=7))
def test_prefix_end_bounds_exactly_the_prefixed_keys(prefix, key):
    end = prefix_end(prefix)
    if key.startswith(prefix):
        assert end is None or key < end
    elif key > prefix:
        assert end is not None and key >= end


def test_missing_database_is_not_a_store(scratch):
    with pytest.raises(NotAStore):
        Database(scratch / "nothing")
    (scratch / "empty").mkdir()
    with pytest.raises(NotAStore):
        Database(scratch / "empty")


def test_garbage_database_file_is_refused(scratch):
    (scratch / "db").mkdir()
    (scratch / "db" / "data.mdb").write_bytes(b"this is not LMDB" * 512)
    with pytest.raises((StoreCorrupt, NotAStore)):
        Database(scratch / "db")


def test_readonly_database_refuses_writes(scratch):
    d = Database(scratch / "db", create=True)
    put_all(d, "meta", [(b"a", b"1")])
    d.close()
    ro = Database(scratch / "db", readonly=True)
    try:
        with ro.read() as txn:
            assert txn.get("meta", b"a") == b"1"
        with pytest.raises(lmdb.Error):
            ro.write(lambda txn: txn.put("meta", b"b", b"2"))
    finally:
        ro.close()


# --- map growth ---------------------------------------------------------------------------

def test_one_transaction_larger_than_the_map_is_retried_after_growing(scratch, monkeypatch):
    monkeypatch.setattr(engine.db, "INITIAL_MAP_SIZE", 1 * MIB)
    d = Database(scratch / "db", create=True)
    attempts = []

    def fn(txn):
        attempts.append(1)
        for i in range(4000):    # ~4 MB of values: cannot fit a 1 MiB map
            txn.put("objects", b"%08d" % i, bytes([i % 251]) * 1000)
        return len(attempts)
    assert d.write(fn) >= 2            # MapFullError at least once, then success
    assert d.env.info()["map_size"] >= 4 * MIB
    with d.read() as txn:
        assert txn.count("objects") == 4000
        assert txn.get("objects", b"%08d" % 3999) == bytes([3999 % 251]) * 1000
    d.close()
    d = Database(scratch / "db")       # reopening adopts a map large enough for the data
    try:
        assert d.env.info()["map_size"] * engine.db.GROW_AT >= d.size_bytes()
        d.write(lambda txn: txn.put("objects", b"after", b"x" * 100_000))
        with d.read() as txn:
            assert txn.count("objects") == 4001
    finally:
        d.close()


def test_many_small_transactions_grow_the_map(scratch, monkeypatch):
    monkeypatch.setattr(engine.db, "INITIAL_MAP_SIZE", 1 * MIB)
    d = Database(scratch / "db", create=True)
    try:
        for j in range(40):
            d.write(lambda txn, j=j: [txn.put("objects", b"%04d%04d" % (j, i), b"v" * 500)
                                      for i in range(200)])
        assert d.env.info()["map_size"] > 1 * MIB
        with d.read() as txn:
            assert txn.count("objects") == 8000
    finally:
        d.close()
