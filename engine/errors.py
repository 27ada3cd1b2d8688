"""Typed errors.  Each carries the object it is about and maps to a CLI exit code.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``;
the messages therefore name the object and, where there is one, the fix.
"""
from __future__ import annotations

# Documented exit codes (README.md, "Exit codes").
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_DAMAGED = 4


class ModsyncError(Exception):
    """Base of every error modsync raises on purpose."""

    exit_code = EXIT_ERROR
    code = "error"

    def __init__(self, message: str, *, subject: object = None):
        super().__init__(message)
        self.subject = subject

    def as_dict(self) -> dict:
        d = {"error": self.code, "message": str(self)}
        if self.subject is not None:
            d["subject"] = str(self.subject)
        return d


class UsageError(ModsyncError):
    """The caller asked for something malformed (bad UID set, bad name, ...)."""

    exit_code = EXIT_USAGE
    code = "usage"


class NotAStore(ModsyncError):
    """A path that is not an initialised store (missing, unmounted, or foreign)."""

    code = "not-a-store"


class StoreCorrupt(ModsyncError):
    """On-disk data contradicts itself: a blob whose hash does not match, a broken index."""

    exit_code = EXIT_DAMAGED
    code = "corrupt"


class SchemaVersionError(ModsyncError):
    """The store was written by a newer (or unknown) schema version."""

    code = "schema-version"


class NoSuchUser(ModsyncError):
    code = "no-such-user"


class NoSuchMailbox(ModsyncError):
    code = "no-such-mailbox"


class MailboxExists(ModsyncError):
    code = "mailbox-exists"


class NoSuchMessage(ModsyncError):
    code = "no-such-message"


class NoSuchObject(ModsyncError):
    """A sieve script, ACL entry, annotation ... that does not exist."""

    code = "no-such-object"


class InvalidName(UsageError):
    code = "invalid-name"


class FullSyncNeeded(ModsyncError):
    """Changes since a modseq below the tombstone horizon cannot be computed exactly."""

    code = "full-sync-needed"

    def __init__(self, user: str, since: int, horizon: int):
        super().__init__(
            f"cannot calculate changes for user {user!r} since modseq {since}: tombstones "
            f"below modseq {horizon} have expired; a full sync (since 0) is needed",
            subject=user,
        )
        self.since = since
        self.horizon = horizon


class ImportError_(ModsyncError):
    """A mail file that cannot be imported (unreadable, malformed), named in the message."""

    code = "import"


class ProtocolError(ModsyncError):
    """Bytes from a peer or a file that do not follow the protocol/format."""

    code = "protocol"
