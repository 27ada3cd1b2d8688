"""Helpers shared by the csync tests: what modsync holds, in the shape Cyrus's IMAP view has.

(Not a conftest.py so that test modules can import it by name.)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from peers import cyrus as cyrus_peer  # noqa: E402


def modsync_view(store, user: str) -> dict:
    """Folders (name -> [(sorted flags, body)] in UID order) and subscriptions of a modsync user."""
    out = {"mailboxes": {}, "subscribed": []}
    for mb in store.mailboxes(user):
        msgs = []
        for r in store.records(user, mb.name):
            msgs.append((sorted(r.flags), store.read_body(r.address)))
        out["mailboxes"][mb.name] = msgs
    out["subscribed"] = sorted(s for s in store.subscriptions(user) if not s.startswith("\u2063"))
    return out


def _canon(view: dict) -> dict:
    boxes = {}
    for name, msgs in view["mailboxes"].items():
        boxes[name] = [(sorted(f.lower() if f.startswith("\\") else f for f in flags), body)
                       for flags, body in msgs]
    return {"mailboxes": boxes, "subscribed": sorted(view["subscribed"])}


def diff_views(cyrus: dict, modsync: dict) -> list[str]:
    """What differs between two views, as readable lines (empty when equal).

    Two Cyrus habits are not differences: Cyrus creates the missing parents
    of a new folder (empty folders only it has), and LSUB leaves out
    subscriptions to folders that do not exist (modsync keeps them).
    """
    a, b = _canon(cyrus), _canon(modsync)
    out = []
    for name in sorted(set(a["mailboxes"]) | set(b["mailboxes"])):
        if name not in b["mailboxes"]:
            implied = not a["mailboxes"][name] and any(
                n.startswith(name + "/") for n in b["mailboxes"])
            if not implied:
                out.append(f"mailbox {name!r} only in Cyrus")
            continue
        if name not in a["mailboxes"]:
            out.append(f"mailbox {name!r} only in modsync")
            continue
        ma, mb = a["mailboxes"][name], b["mailboxes"][name]
        if len(ma) != len(mb):
            out.append(f"{name!r}: {len(ma)} messages in Cyrus, {len(mb)} in modsync")
        for i, (x, y) in enumerate(zip(ma, mb)):
            if x[0] != y[0]:
                out.append(f"{name!r} #{i + 1}: flags {x[0]} in Cyrus, {y[0]} in modsync")
            if x[1] != y[1]:
                out.append(f"{name!r} #{i + 1}: bodies differ ({len(x[1])} / {len(y[1])} bytes)")
    exist = set(a["mailboxes"])
    a["subscribed"] = [s for s in a["subscribed"] if s in exist]
    b["subscribed"] = [s for s in b["subscribed"] if s in exist]
    if a["subscribed"] != b["subscribed"]:
        out.append(f"subscriptions: Cyrus {a['subscribed']}, modsync {b['subscribed']}")
    return out


def assert_same(cy, store, user: str, cyrus_user_view: dict | None = None, *,
                renewed: tuple = ()) -> None:
    """The Cyrus server's IMAP view of ``user`` equals modsync's, and their STATUS agrees.

    ``renewed``: mailboxes that modsync recreated (restored from DELETED.*),
    whose uidvalidity must be above Cyrus's rather than equal to it.
    """
    cv = cyrus_user_view or cy.view(user)
    mv = modsync_view(store, user)
    problems = diff_views(cv, mv)
    status = store.status(user)
    for m in status["mailboxes"]:
        st = cy.status(user, m["name"])
        if m["name"] in renewed:
            if not m["uidvalidity"] > st["UIDVALIDITY"]:
                problems.append(f"{m['name']!r}: uidvalidity {m['uidvalidity']} not above "
                                f"Cyrus's {st['UIDVALIDITY']}")
        elif st["UIDVALIDITY"] != m["uidvalidity"]:
            problems.append(f"{m['name']!r}: uidvalidity {st['UIDVALIDITY']} / {m['uidvalidity']}")
        if st["UIDNEXT"] != m["uidnext"]:
            problems.append(f"{m['name']!r}: uidnext {st['UIDNEXT']} / {m['uidnext']}")
        if st["MESSAGES"] != m["messages"]:
            problems.append(f"{m['name']!r}: messages {st['MESSAGES']} / {m['messages']}")
    assert not problems, "Cyrus and modsync differ:\n  " + "\n  ".join(problems)


def message(i: int, subject: str | None = None, extra: bytes = b"", body: bytes | None = None) -> bytes:
    import email.utils
    subject = subject or f"test message {i}"
    body = body if body is not None else f"body {i}\r\n".encode()
    return (f"From: Alice <alice@example.org>\r\nTo: test@example.org\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate(1700000000 + i * 60)}\r\n"
            f"Message-ID: <m{i}@example.org>\r\n").encode() + extra + b"\r\n" + body
