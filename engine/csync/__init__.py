"""Cyrus IMAP 3.6 replication (csync) for modsync, in both directions.

* modsync as a Cyrus **replica**: :func:`csync_handler` is the connection
  callback for ``asyncio.start_server``; a Cyrus ``sync_client`` (one-shot
  ``-u`` or rolling ``-r``) then replicates into the store.  The protocol
  state machine is :class:`engine.csync.replica.ReplicaSession`.
* modsync as a Cyrus **master**: :func:`push_user` replicates a modsync user
  into a real Cyrus ``sync_server``; :func:`restore_to_cyrus` does the same
  from any store (a backup restored into a temporary store, say).

Modules: ``mapping`` (names, ACLs, quota roots, sieve messages),
``state`` (csync's own table: what Cyrus knows that modsync does not),
``view`` (the Cyrus view of modsync mailboxes), ``replica`` (the server
state machine), ``protocol`` (framing and DEFLATE, no I/O), ``server``
(asyncio; ``modsync serve --csync``), ``client`` (blocking socket), ``master``
(push), ``serve`` (``python -m engine.csync.serve``: a csync-only server).
"""
from __future__ import annotations

from .master import PushReport, push_user, restore_to_cyrus
from .replica import ReplicaSession
from .server import ServerThread, csync_handler

__all__ = ["csync_handler", "push_user", "restore_to_cyrus", "PushReport", "ReplicaSession",
           "ServerThread"]
