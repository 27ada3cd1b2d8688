"""modsync's engine: the store, the mail model, and (later) change sets and sync.

Public API for embedding (see ``engine.store`` for the full list)::

    from engine import Store, Message
    store = Store.open("/srv/modsync")

The names below are loaded on first use (PEP 562), so that importing one
module of the package (``engine.cli`` for ``modsync --help``, say) does not
load the store, LMDB and zstd as well.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ModsyncError": "errors",
    "AclEntry": "model", "Annotation": "model", "Mailbox": "model", "QuotaRoot": "model",
    "Record": "model", "SeenSet": "model", "SieveScript": "model", "Stamp": "model",
    "Subscription": "model",
    "Change": "store", "Message": "store", "Store": "store",
}

__all__ = ["Store", "Message", "Change", "ModsyncError", "Mailbox", "Record", "Subscription",
           "SeenSet", "SieveScript", "Annotation", "AclEntry", "QuotaRoot", "Stamp"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
