"""Two-way sync between two stores reachable from this process.

The exchange is the speculative one every transport uses: send our changes
against the peer's state; if the peer changed meanwhile it rejects them and
answers with its own, which we merge and send again.  After one exchange
each way both stores hold the same mail (equal digests).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .apply import ApplyResult, apply
from .changeset import build, state_of
from .errors import NoSuchUser
from .store import Store

MAX_ROUNDS = 4


@dataclass
class SyncReport:
    user: str
    steps: list = field(default_factory=list)     # (direction, status, written)
    converged: bool = False
    digest: str = ""

    def as_dict(self) -> dict:
        return {"user": self.user, "converged": self.converged, "digest": self.digest,
                "steps": [{"direction": d, "status": s, "written": w} for d, s, w in self.steps]}


def _state(store: Store, user: str) -> dict:
    try:
        return state_of(store, user)
    except NoSuchUser:
        return {}


def push(src: Store, dst: Store, user: str, *, allow_mass_delete: bool = False) -> ApplyResult:
    """Send src's changes to dst; on rejection merge dst's answer into src and resend."""
    result = None
    for _ in range(MAX_ROUNDS):
        cs = build(src, user, _state(dst, user))
        result = apply(dst, cs, bodies=src.read_body, allow_mass_delete=allow_mass_delete)
        if result.status != "rejected":
            return result
        if result.counter is not None and result.counter.items:
            apply(src, result.counter, bodies=dst.read_body, merge=True,
                  allow_mass_delete=allow_mass_delete)
    return result


def sync_user(a: Store, b: Store, user: str, *, allow_mass_delete: bool = False) -> SyncReport:
    report = SyncReport(user)
    for src, dst, label in ((a, b, "a->b"), (b, a, "b->a")):
        try:
            r = push(src, dst, user, allow_mass_delete=allow_mass_delete)
        except NoSuchUser:
            continue
        report.steps.append((label, r.status, r.written))
    da = a.status(user)["digest"] if user in a.users() else None
    db = b.status(user)["digest"] if user in b.users() else None
    report.converged = da == db
    report.digest = da or ""
    return report


def sync_stores(a: Store, b: Store, users: list[str] | None = None, *,
                allow_mass_delete: bool = False) -> list[SyncReport]:
    """Sync the given users (default: every user of either store) both ways."""
    if users is None:
        users = sorted(set(a.users()) | set(b.users()))
    return [sync_user(a, b, u, allow_mass_delete=allow_mass_delete) for u in users]
