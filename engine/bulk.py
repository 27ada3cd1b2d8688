"""Bulk appends: many batches of messages into one user's mailboxes, as a pipeline.

One job: keep both cores busy while a large number of messages goes in.
Each batch is checked and hashed on the caller's thread
(``Store.prepare_append``), which also starts compressing its bodies on the
compression threads (one GIL-free call per chunk); the batch is committed
(``Store.append_prepared``: one mutation, one modseq, the pack and LMDB
fsyncs) when the *next* batch is handed over, or at ``close``.  So batch N
compresses while batch N-1 commits and batch N+1 is read.

Commits stay on the caller's thread on purpose: a separate writer thread was
measured no faster, because two threads of Python bookkeeping only take
turns on the GIL (and pay for every hand-over), while compression, the one
GIL-free stage worth overlapping, already runs beside them.

Each batch is one atomic transaction and batches commit in order, so an
interruption leaves a prefix of them in the store and nothing half-written.
At most two batches are in memory at a time.
"""
from __future__ import annotations

from typing import Callable, Iterable

from .store import Message, PreparedAppend, Store


class BulkAppender:
    """Append batches to one user's mailboxes through the pipeline above.

    Use as a context manager, or call ``close()``, which commits the last
    batch.  ``on_commit(mailbox, records)`` is called after each batch commits.
    An error committing a batch (a full disk, say) is raised by the call that
    committed it (``append``, ``wait`` or ``close``); the batches handed over
    after it are then dropped, never committed out of order.
    """

    def __init__(self, store: Store, user: str, *,
                 on_commit: Callable[[str, list], None] | None = None):
        self.store = store
        self.user = user
        self.on_commit = on_commit
        self._waiting: tuple[str, PreparedAppend] | None = None
        self._closed = False
        self._failed = False

    def append(self, mailbox: str, messages: Iterable[Message]) -> None:
        """Hand over one batch: start compressing it, then commit the one before."""
        if self._closed or self._failed:
            raise RuntimeError("BulkAppender is closed" if self._closed else
                               "BulkAppender stopped after an error")
        batch = self.store.prepare_append(messages)
        self.wait()
        self._waiting = (mailbox, batch)

    def wait(self) -> None:
        """Commit the batch handed over last, if it is not committed yet."""
        if self._waiting is None:
            return
        (mailbox, batch), self._waiting = self._waiting, None
        try:
            records = self.store.append_prepared(self.user, mailbox, batch)
        except BaseException:
            self._failed = True
            raise
        if self.on_commit is not None:
            self.on_commit(mailbox, records)

    def close(self) -> None:
        """Commit what is left; appending afterwards is refused."""
        if not self._closed:
            self._closed = True
            if not self._failed:
                self.wait()

    def abandon(self) -> None:
        """Close without committing the batch handed over last (the caller is failing)."""
        self._closed = True
        self._waiting = None

    def __enter__(self) -> "BulkAppender":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


__all__ = ["BulkAppender", "PreparedAppend"]
