"""Fixtures for the backup tests: a source store with a history, and the CLI in-process.

``history(store, archive)`` plays a scripted sequence of changes on a store
(every kind of object: mailboxes created, renamed and deleted, messages
appended, flagged, copied, moved and expunged, subscriptions, sieve, ACL,
annotations, seen sets, quota) and backs up after each step, returning what
the source looked like at each point: its modseq and digest, the time the
point was given, and the user's records.
"""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

import engine.cli
from engine import Message, Store
from engine.archive import Archive
from engine.backup import LocalSource, backup
from engine.cli import config as cli_config
from engine.cli import main

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "cli"
T0 = 1_700_000_000          # point times given to backup(now=...): one day apart
DAY = 86400


def body(i: int, size: int = 200) -> bytes:
    text = (b"From: sender%d@example.org\r\nTo: alice@example.org\r\nSubject: message %d\r\n"
            b"Message-ID: <%d@example.org>\r\n\r\n" % (i % 7, i, i))
    return text + (b"line %d of a body that compresses well\r\n" % i) * max(size // 40, 1)


@dataclass
class Snapshot:
    point: int
    modseq: int
    digest: str
    time: int
    mailboxes: dict           # name -> [(uid, address, flags)]


def snapshot(store: Store, user: str, point: int, t: int) -> Snapshot:
    mbs = {}
    for mb in store.mailboxes(user):
        mbs[mb.name] = [(r.uid, r.address, tuple(sorted(r.flags))) for r in
                        store.records(user, mb.name)]
    return Snapshot(point, store.user_info(user).modseq, store.status(user)["digest"], t, mbs)


STEPS = []


def step(fn):
    STEPS.append(fn)
    return fn


def _msg(i: int) -> Message:
    return Message(body(i, 200 + (i * 37) % 900), ("\\Seen",) if i % 3 else (), T0 - i * 1000)


@step
def first(s: Store, u: str):
    s.create_mailbox(u, "INBOX")
    s.create_mailbox(u, "Work")
    s.create_mailbox(u, "Old")
    s.append_many(u, "INBOX", [_msg(i) for i in range(1, 21)])
    s.append_many(u, "Work", [_msg(i) for i in range(100, 110)])
    s.append_many(u, "Old", [_msg(i) for i in range(200, 205)])
    s.subscribe(u, "INBOX")
    s.subscribe(u, "Work")
    s.sieve_put(u, "main", b"require \"fileinto\";\r\nkeep;\r\n")
    s.sieve_activate(u, "main")


@step
def flags_and_expunge(s: Store, u: str):
    s.set_flags(u, "INBOX", [(1, 5)], ["\\Seen", "$Label1"])
    s.expunge(u, "INBOX", [(6, 8)])
    s.append(u, "INBOX", body(21), flags=["\\Flagged"])
    s.set_acl(u, "Work", "bob", "lrs")
    s.set_annotation(u, "Work", "/comment", b"projects")


@step
def rename_and_copy(s: Store, u: str):
    s.rename_mailbox(u, "Work", "Archive/Work")
    s.copy(u, "INBOX", [(1, 3)], "Archive/Work")
    s.copy(u, "INBOX", [(9, 10)], "Old", move=True)
    s.set_seen(u, "sharedmailboxid000000001", "1:10", lastuid=10)
    s.set_quota(u, "", {"STORAGE": 100000})


@step
def delete_mailbox(s: Store, u: str):
    s.delete_mailbox(u, "Old")
    s.unsubscribe(u, "Work")
    s.sieve_put(u, "vacation", b"vacation \"away\";\r\n")


@step
def recreate_and_mass_expunge(s: Store, u: str):
    s.create_mailbox(u, "Old")
    s.append(u, "Old", body(300))
    s.expunge(u, "INBOX", [(1, 21)])
    s.set_message_annotation(u, "Archive/Work", 1, "/comment", "", b"kept")


def history(store: Store, archive: Archive, user: str = "alice") -> list[Snapshot]:
    """Play every step, backing up after each; the snapshots of the source at each point."""
    snaps = []
    for i, fn in enumerate(STEPS):
        fn(store, user)
        t = T0 + i * DAY
        report = backup(archive, LocalSource(store), [user], now=t)
        assert report.points == 1, report.as_dict()
        snaps.append(snapshot(store, user, report.users[0]["point"], t))
    return snaps


@pytest.fixture
def source(tmp_path) -> Store:
    s = Store.init(tmp_path / "source")
    yield s
    s.close()


@pytest.fixture
def archive(tmp_path) -> Archive:
    a = Archive.create(tmp_path / "archive")
    yield a
    a.close()


@pytest.fixture
def new_store(tmp_path):
    made = []

    def make(name: str = "target") -> Store:
        s = Store.init(tmp_path / f"{name}-{len(made)}")
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


# -- the CLI, in-process, with --json output checked against its schema -----------------

@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict:
        return json.loads(self.out)


class _Stream(io.TextIOWrapper):
    def __init__(self, raw):
        super().__init__(raw, encoding="utf-8", write_through=True)

    def isatty(self) -> bool:
        return False


def run_cli(*argv) -> Result:
    out, err = io.BytesIO(), io.BytesIO()
    streams = _Stream(io.BytesIO()), _Stream(out), _Stream(err)
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = streams
    try:
        code = main([str(a) for a in argv])
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    for s in streams:
        s.flush()
    r = Result(code, out.getvalue().decode(), err.getvalue().decode())
    if "--json" in [str(a) for a in argv] and r.out.strip():
        data = r.json
        name = "error" if data.get("ok") is False and "exit_code" in data else \
            data["command"].split()[0]
        path = SCHEMAS / f"{name}.schema.json"
        # The other verbs' schemas are their owners' (and tests/cli checks they exist).
        if path.exists() or name in OWN_SCHEMAS:
            jsonschema.Draft202012Validator(json.loads(path.read_text())).validate(data)
    return r


OWN_SCHEMAS = ("backup", "restore", "compact", "verify", "import", "export")


@pytest.fixture(scope="session")
def sample_maildir(tmp_path_factory) -> Path:
    """The 40-message Maildir of tests/data/sample-maildir, regenerated by tools/corpus.py
    (so these tests do not depend on the checked-out copy)."""
    import subprocess
    out = tmp_path_factory.mktemp("corpus") / "sample-maildir"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(root / "tools" / "corpus.py"), "maildir", str(out),
                    "--sample"], check=True, capture_output=True)
    return out


_PARSER = []


@pytest.fixture
def cli(monkeypatch, tmp_path):
    for var in ("MODSYNC_STORE", "MODSYNC_CONFIG", "MODSYNC_LOG_LEVEL", "MODSYNC_APPEND_ONLY",
                "MODSYNC_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli_config, "DEFAULT_PATH", tmp_path / "no-such-default.toml")
    if not _PARSER:
        _PARSER.append(engine.cli.build_parser())
    monkeypatch.setattr(engine.cli, "build_parser", lambda: _PARSER[0])
    return run_cli
