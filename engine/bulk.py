"""Bulk appends: many batches of messages into one user's mailboxes, as a pipeline.

One job: keep both cores busy while a large number of messages goes in.
Each batch passes three stages, and consecutive batches overlap:

1. the caller's thread checks and hashes it (``Store.prepare_append``) and
   goes back to reading the next batch;
2. the compression threads compress its bodies (one GIL-free call per chunk);
3. one writer thread commits it (``Store.append_prepared``: one mutation,
   one modseq, the pack and LMDB fsyncs), in the order batches were given.

Each batch is still one atomic transaction; batches commit in order, so an
interruption leaves a prefix of them in the store and nothing half-written.
At most ``depth`` batches wait for the writer, which bounds memory.

An error in the writer (a full disk, say) stops it: the batches after the
failed one are not committed, and the error is raised, as it was, by the next
call to ``append`` or by ``close``.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

from .store import Message, PreparedAppend, Store

_STOP = object()


class BulkAppender:
    """Append batches to one user's mailboxes through the pipeline above.

    Use as a context manager, or call ``close()``: it waits for every batch
    to commit and raises the writer's error, if any.  ``on_commit(mailbox,
    records)`` is called on the writer thread after each batch commits.
    """

    def __init__(self, store: Store, user: str, *, depth: int = 2,
                 on_commit: Callable[[str, list], None] | None = None):
        self.store = store
        self.user = user
        self.on_commit = on_commit
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="modsync-bulk-writer",
                                        daemon=True)
        self._writer.start()

    def append(self, mailbox: str, messages: Iterable[Message]) -> None:
        """Hand over one batch; it commits later, after the batches before it."""
        if self._closed:
            raise RuntimeError("BulkAppender is closed")
        self._raise_error()
        batch = self.store.prepare_append(messages)
        while True:   # wait for room, but notice if the writer died meanwhile
            try:
                self._queue.put((mailbox, batch), timeout=0.5)
                return
            except queue.Full:
                self._raise_error()

    def wait(self) -> None:
        """Wait until every batch handed over so far has committed (or failed: raised)."""
        self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Wait for every batch handed over to commit; raise the writer's error if any."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._writer.join()
        self._raise_error()

    def __enter__(self) -> "BulkAppender":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:   # already failing: finish what was handed over, keep the first error
            try:
                self.close()
            except Exception:
                pass

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is not None:
                    continue        # drain without committing: batches must stay in order
                mailbox, batch = item
                records = self.store.append_prepared(self.user, mailbox, batch)
                if self.on_commit is not None:
                    self.on_commit(mailbox, records)
            except BaseException as e:      # re-raised in the caller's thread
                self._error = e
            finally:
                self._queue.task_done()


__all__ = ["BulkAppender", "PreparedAppend"]
