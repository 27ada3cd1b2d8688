"""Running ``modsync`` in this process, and checking what it prints.

``run(*argv, stdin=b"")`` calls ``engine.cli.main`` with stdin, stdout and
stderr swapped for in-memory files and returns a ``Result``.  Whatever the
command line, it checks the contract every command keeps:

* with ``--json``: stdout is exactly one JSON object on one line, valid
  against ``schemas/cli/<verb>.schema.json`` (``error.schema.json`` for a
  failure object), ``ok`` is true exactly when the exit code is 0, and an
  error object's ``exit_code`` is the exit code;
* a failure with exit code 1, 2 or 4 ends with one ``modsync: error: ...``
  line on stderr.  (Exit 3 is checked verb by verb: see test_cli_exchange.)
"""
from __future__ import annotations

import functools
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas" / "cli"
DOCS = ROOT / "docs" / "cli.md"

# The verbs this suite (and schemas/cli, docs/cli.md) covers.  Each has a schema.
VERBS = (
    "init", "import", "export", "mailbox", "save", "fetch", "flags", "expunge", "copy", "move",
    "subscribe", "unsubscribe", "seen", "sieve", "acl", "metadata", "quota", "status",
    "changes", "verify", "gc", "expire", "state", "diff", "apply", "sync",
)
# Verbs other work owns (their schemas, tests and docs live with that work).
OTHER_VERBS = ("serve", "push", "pull", "drain", "account", "backup", "restore", "compact")

ERROR_LINE = "modsync: error: "

# The messages the `alice` store holds in INBOX, UIDs 1..3: line endings,
# NUL and bytes that are not UTF-8 must all come back as they went in.
ALICE_BODIES = (
    b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: one\r\n\r\nHello Alice.\r\n",
    b"From: carol@example.org\nSubject: two\n\nbare LF, no final newline",
    b"From: dave@example.org\r\nSubject: =?utf-8?q?thr=C3=A9e?=\r\n\r\n\x00\xff\xfe binary\r\n",
)


@dataclass
class Result:
    code: int
    stdout: bytes
    err: str

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8")

    @property
    def json(self) -> dict:
        return json.loads(self.out)

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    @property
    def error(self) -> str | None:
        """The message of the final ``modsync: error:`` line, if stderr ends with one."""
        last = self.err.rstrip("\n").rpartition("\n")[2]
        return last[len(ERROR_LINE):] if last.startswith(ERROR_LINE) else None


class _Stream(io.TextIOWrapper):
    """A text stream over bytes, as a pipe would give (not a terminal)."""

    def __init__(self, raw: io.BytesIO, encoding: str = "utf-8"):
        super().__init__(raw, encoding=encoding, write_through=True)

    def isatty(self) -> bool:
        return False


@functools.cache
def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(name))


def validate(data: dict) -> None:
    """Check one --json object against its verb's schema (or the error schema)."""
    assert isinstance(data, dict), data
    if data.get("ok") is False and "exit_code" in data:
        name = "error"
    else:
        name = data["command"].split()[0]
    errors = sorted(_validator(name).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        detail = "\n".join(f"  at /{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        raise AssertionError(f"{name}.schema.json rejects the output:\n{detail}\n{data!r}")


def _wants_json(argv: list[str]) -> bool:
    opts = argv[:argv.index("--")] if "--" in argv else argv
    return "--json" in opts and not {"-h", "--help", "--version"} & set(opts)


def run(*argv, stdin: bytes = b"", encoding: str = "utf-8", check: bool = True) -> Result:
    """``modsync *argv`` in this process; see the module docstring for what is checked
    (nothing with ``check=False``).

    ``encoding`` is that of stdout and stderr (a terminal that cannot show
    every name).
    """
    from engine.cli import main
    argv = [str(a) for a in argv]
    out, err = io.BytesIO(), io.BytesIO()
    streams = (_Stream(io.BytesIO(stdin)), _Stream(out, encoding), _Stream(err, encoding))
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = streams
    try:
        code = main(argv)
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    r = Result(code, out.getvalue(), err.getvalue().decode(encoding, "replace"))
    if check:
        _check(argv, r, same_messages=encoding == "utf-8")
    return r


def _check(argv: list[str], r: Result, *, same_messages: bool) -> None:
    where = f"`modsync {' '.join(argv)}` (exit {r.code})\nstdout: {r.stdout!r}\nstderr: {r.err}"
    if r.code in (1, 2, 4):
        assert r.error, f"no final '{ERROR_LINE}' line on stderr: {where}"
    if not _wants_json(argv):
        return
    text = r.stdout.decode("utf-8", "replace")
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line of JSON: {where}"
    data = json.loads(text)
    validate(data)
    assert data["ok"] is (r.code == 0), f"'ok' disagrees with the exit code: {where}"
    if "exit_code" in data:
        assert data["exit_code"] == r.code, where
        assert not same_messages or data["message"] == r.error, \
            f"JSON and stderr give different messages: {where}"


def ok(*argv, stdin: bytes = b"") -> Result:
    """run(), asserting exit 0."""
    r = run(*argv, stdin=stdin)
    assert r.code == 0, f"`modsync {' '.join(map(str, argv))}` exited {r.code}:\n{r.err}"
    return r
