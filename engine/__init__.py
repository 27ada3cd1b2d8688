"""modsync's engine: the store, the mail model, and (later) change sets and sync.

Public API for embedding (see ``engine.store`` for the full list)::

    from engine import Store, Message
    store = Store.open("/srv/modsync")
"""
from .errors import ModsyncError
from .model import (AclEntry, Annotation, Mailbox, QuotaRoot, Record, SeenSet, SieveScript,
                    Stamp, Subscription)
from .store import Change, Message, Store

__all__ = ["Store", "Message", "Change", "ModsyncError", "Mailbox", "Record", "Subscription",
           "SeenSet", "SieveScript", "Annotation", "AclEntry", "QuotaRoot", "Stamp"]
