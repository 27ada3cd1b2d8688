"""Importing mail files into the store: the report, the no-duplicates rule, and batching.

The Maildir and mbox importers (``engine.maildir``, ``engine.mbox``) parse
their formats and hand each message to an ``ImportRun``; this module decides
what to append and appends it.

No duplicates on re-import.  Per target mailbox, the import compares the
*multiset* of content addresses (blake3 of the exact body bytes,
``engine.blobs.address_of``) of the mailbox's live messages with the
messages being imported, and appends only the excess: a body the mailbox
already holds k times is skipped for its first k occurrences in the source.
So re-running an import appends nothing, a source that holds the same
message twice gives two messages, and an import interrupted at any point
(crash, kill, full disk) can be re-run and completes without duplicates.
Messages already in the store are never changed: their flags stay as they
are even if the source's have changed since.  Only live messages count: one
expunged (deleted) from the mailbox since an earlier import comes back if
the same source is imported again.

Flags.  The store takes only flags IMAP can carry
(``engine.model.validate_flags``).  A keyword it refuses (a space or a
non-ASCII letter in it, say) is left off and the message imported without
it; the report names each such keyword once per folder (or mbox file), with
the number of messages that had it.

Batching.  Messages are appended in batches of ``BATCH_MESSAGES`` messages
or ``BATCH_BYTES`` bytes, whichever is reached first: each batch is one
transaction, made durable once.  A batch's bodies are compressed on other
threads (``Store.prepare_append``) while the batch before it commits and the
next one is read (``engine.bulk.BulkAppender``).  A batch is all or
nothing, so an interrupted import never leaves half a message (or half a
batch) behind; what was committed is skipped by the rule above next time.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from . import names
from .blobs import address_of
from .errors import NoSuchUser
from .bulk import BulkAppender
from .model import validate_flags
from .progress import Progress
from .store import Message, Store

# One transaction per batch: big enough that the per-transaction costs (the
# LMDB commit, the fsyncs of pack and database) are spread over many
# messages, small enough that a crash loses little work and memory stays bounded.
BATCH_MESSAGES = 1000
BATCH_BYTES = 32 << 20

# Bodies are held in memory whole while they are read, hashed and compressed
# (about three copies at once).  Bigger messages are refused rather than
# risking the process; mail servers' usual limits are far below (Postfix's
# default is 10 MB, Exchange Online's maximum 150 MB).
MAX_MESSAGE_BYTES = 1 << 30


def display_path(path: str | os.PathLike) -> str:
    """A path as text for reports: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class ImportReport:
    """What an import did.  ``ok`` is False when anything was refused.

    ``refused`` lists ``{"file": ..., "reason": ...}`` for every file,
    folder or part of a file that was not imported, and, once per folder,
    for every flag left off imported messages; the import carried on with
    the rest.
    """

    source: str
    imported: int = 0
    skipped: int = 0                      # already in the store (see the module docstring)
    bytes: int = 0                        # bytes of the imported messages
    mailboxes_created: list[str] = field(default_factory=list)
    subscribed: list[str] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused

    def refuse(self, file: str | os.PathLike, reason: str) -> None:
        self.refused.append({"file": display_path(file), "reason": reason})

    def as_dict(self) -> dict:
        return {
            "source": self.source, "ok": self.ok, "imported": self.imported,
            "skipped": self.skipped, "refused_count": len(self.refused), "bytes": self.bytes,
            "mailboxes_created": list(self.mailboxes_created),
            "subscribed": list(self.subscribed), "refused": [dict(r) for r in self.refused],
        }


def storable_flags(flags) -> tuple[tuple[str, ...], list[str]]:
    """(the flags the store accepts, why each of the others is refused)."""
    try:
        return validate_flags(flags), []
    except ValueError:
        pass
    kept, why = [], []
    for f in flags:
        try:
            validate_flags([f])
            kept.append(f)
        except ValueError as err:
            why.append(str(err))
    return validate_flags(kept), why


class ImportRun:
    """One import into one user's mailboxes: the report, progress, mailbox creation."""

    def __init__(self, store: Store, user: str, source: str | os.PathLike,
                 progress: Progress | None = None):
        self.store = store
        self.user = names.user(user)
        self.report = ImportReport(source=display_path(source))
        self.progress = progress or Progress()
        try:
            self._mailboxes = {m.name for m in store.mailboxes(self.user)}
        except NoSuchUser:
            self._mailboxes = set()   # create_mailbox creates the user
        self._subscriptions: set[str] | None = None   # read when first needed
        self._flag_cache: dict[tuple, tuple[tuple[str, ...], list[str]]] = {}
        self._appender: BulkAppender | None = None   # started with the first batch

    @property
    def appender(self) -> BulkAppender:
        if self._appender is None:
            self._appender = BulkAppender(self.store, self.user, on_commit=self._committed)
        return self._appender

    def _committed(self, mailbox: str, records: list) -> None:
        self.report.imported += len(records)
        self.report.bytes += sum(r.size for r in records)

    def close(self, *, failing: bool = False) -> None:
        """Commit the last batch and end the progress display.

        With ``failing`` (the caller is raising an error of its own) the last
        batch handed over is dropped instead: a re-run imports it.
        """
        try:
            if self._appender is not None:
                if failing:
                    self._appender.abandon()
                else:
                    self._appender.close()
        finally:
            self.progress.finish()

    def into(self, mailbox: str, source: str | os.PathLike) -> MailboxImport:
        """Start importing into mailbox, creating it if it is missing.

        ``source`` (the folder or file the messages come from) is what the
        report names for flags left off.
        """
        mailbox = names.mailbox(mailbox)
        if self._appender is not None:
            self._appender.wait()    # what the mailbox holds decides what is skipped
        if mailbox not in self._mailboxes:
            self.store.create_mailbox(self.user, mailbox)
            self._mailboxes.add(mailbox)
            self.report.mailboxes_created.append(mailbox)
        return MailboxImport(self, mailbox, source)

    def storable_flags(self, flags) -> tuple[tuple[str, ...], list[str]]:
        """``storable_flags``, remembered: a mail store has few distinct flag sets."""
        key = tuple(flags)
        hit = self._flag_cache.get(key)
        if hit is None:
            hit = self._flag_cache[key] = storable_flags(key)
        return hit

    def subscribe(self, mailbox: str) -> None:
        """Subscribe the user to mailbox unless already subscribed."""
        mailbox = names.mailbox(mailbox)
        if self._subscriptions is None:
            try:
                self._subscriptions = set(self.store.subscriptions(self.user))
            except NoSuchUser:
                self._subscriptions = set()
        if mailbox not in self._subscriptions:
            self.store.subscribe(self.user, mailbox)
            self._subscriptions.add(mailbox)
            self.report.subscribed.append(mailbox)


class MailboxImport:
    """Messages going into one mailbox: skip what is there already, append the rest in batches.

    Call ``offer`` for each message in source order and ``finish`` at the end.
    Messages offered since the last batch are not in the store before
    ``finish``; if it is never reached, re-running the import appends them
    (and only them).
    """

    def __init__(self, run: ImportRun, mailbox: str, source: str | os.PathLike):
        self.run = run
        self.mailbox = mailbox
        self.source = source
        # Why a flag was left off -> on how many messages (reported by finish()).
        self._dropped: dict[str, int] = {}
        # The multiset of bodies the mailbox holds now (see the module docstring).
        self._present = Counter(r.address for r in run.store.records(run.user, mailbox))
        self._pending: list[Message] = []
        self._pending_bytes = 0

    def offer(self, body: bytes, flags=(), internaldate: int | None = None) -> None:
        """Import one message unless the mailbox already holds this body (see above).

        Flags the store would refuse are left off (one odd keyword must not
        cost the message, or its batch) and reported by ``finish``.
        """
        # Hash only when there is something to skip: a first import into an
        # empty mailbox leaves that to the store.
        address = address_of(body) if self._present else None
        if address is not None and self._present[address] > 0:
            self._present[address] -= 1
            if not self._present[address]:
                del self._present[address]
            self.run.report.skipped += 1
        else:
            flags, dropped = self.run.storable_flags(flags)
            for why in dropped:
                self._dropped[why] = self._dropped.get(why, 0) + 1
            if self._pending and self._pending_bytes + len(body) > BATCH_BYTES:
                self._flush()
            self._pending.append(Message(body, flags, internaldate, address=address))
            self._pending_bytes += len(body)
            if len(self._pending) >= BATCH_MESSAGES:
                self._flush()
        self.run.progress.advance(1, len(body))

    def finish(self) -> None:
        """Hand over what is pending; report the flags left off, once each.

        The last batch commits with the next one handed over, or at
        ``ImportRun.close``.
        """
        self._flush()
        for why, n in self._dropped.items():
            self.run.report.refuse(self.source, f"{why}; left off {n} message(s), which were "
                                                f"imported without it")
        self._dropped.clear()

    def _flush(self) -> None:
        if not self._pending:
            return
        self.run.appender.append(self.mailbox, self._pending)
        self._pending = []
        self._pending_bytes = 0
