"""Dovecot's doveadm on a throw-away Maildir, with no Dovecot daemon running.

    dc = Doveadm(base)                    # writes base/dovecot.conf; the Maildir is base/Maildir
    dc.run("mailbox", "create", "Sent")
    dc.run("save", "-m", "Sent", input=b"Subject: hi\\n\\nbody\\n")
    dc.fetch("Sent", "uid flags")         # [{"uid": "1", "flags": "\\\\Recent"}]
    dc.text("Sent", 1)                    # the message's exact bytes

How it runs (Dovecot 2.3, Debian package dovecot-core): doveadm is started
without ``-u``, with USER and HOME in its environment, so it looks up no
user in an auth process (none is running) and takes uid/gid from
``mail_uid``/``mail_gid``.  Dovecot refuses mail access as root ("Mail
access not allowed for root"), so as root doveadm runs as ``DOVECOT_UID``
(4242, which needs no passwd entry) through setpriv, and everything under
``base`` is handed to that uid by ``own()``.  ``base`` must be reachable by
that uid: pytest's tmp_path is not (/tmp/pytest-of-root is mode 0700), a
``tempfile.mkdtemp()`` directory is once ``own()`` has run.

Nothing here listens on a socket and nothing outlives a ``run()``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

DOVECOT_UID = 4242
DOVECOT_GID = 4242
PACKAGE = "dovecot-core"


def missing() -> str | None:
    """Why doveadm cannot be used here, or None when it can."""
    if shutil.which("doveadm") is None:
        return f"doveadm is not installed (Debian package {PACKAGE}; tools/setup.sh installs it)"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "running as root, and setpriv (util-linux) is missing to run doveadm as a mail uid"
    return None


class DoveadmError(RuntimeError):
    """doveadm exited with an error; the message holds its command line and stderr."""


class Doveadm:
    """doveadm with its own configuration, on one Maildir under ``base``."""

    def __init__(self, base: str | os.PathLike, maildir: str | os.PathLike | None = None):
        self.base = Path(base).resolve()
        self.maildir = Path(maildir).resolve() if maildir else self.base / "Maildir"
        self.as_root = os.geteuid() == 0
        uid, gid = (DOVECOT_UID, DOVECOT_GID) if self.as_root else (os.getuid(), os.getgid())
        for d in ("run", "state", "home"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.config = self.base / "dovecot.conf"
        self.config.write_text(f"""\
# Written by tools/peers/dovecot.py for daemon-less doveadm; no service runs.
base_dir = {self.base}/run
state_dir = {self.base}/state
log_path = {self.base}/dovecot.log
protocols =
ssl = no
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{self.maildir}
# A throw-away Maildir: speed matters more than surviving a power cut.
mail_fsync = never
namespace inbox {{
  inbox = yes
}}
""")
        self.own()

    def own(self, path: str | os.PathLike | None = None) -> None:
        """Give path (default: all of base) to the uid doveadm runs as (a no-op unless root)."""
        if not self.as_root:
            return
        top = Path(path) if path else self.base
        for p in [top, *top.rglob("*")]:
            os.lchown(p, DOVECOT_UID, DOVECOT_GID)

    def run(self, *args: str, input: bytes | None = None, fmt: str | None = None) -> bytes:
        """doveadm [-f fmt] args...; its stdout.  DoveadmError if it fails."""
        cmd = ["doveadm", "-c", str(self.config)] + (["-f", fmt] if fmt else []) + list(args)
        if self.as_root:
            cmd = ["setpriv", f"--reuid={DOVECOT_UID}", f"--regid={DOVECOT_GID}",
                   "--clear-groups", "--"] + cmd
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "USER": "peer",
               "HOME": str(self.base / "home"), "TZ": "UTC"}   # TZ: dates print in UTC
        p = subprocess.run(cmd, input=input, capture_output=True, env=env, timeout=120,
                           check=False)
        if p.returncode != 0:
            raise DoveadmError(f"{' '.join(args)}: exit {p.returncode}: "
                               f"{p.stderr.decode(errors='replace').strip()}")
        return p.stdout

    # -- reading what Dovecot sees ---------------------------------------------
    def mailboxes(self, *, subscribed: bool = False) -> list[str]:
        out = self.run("mailbox", "list", *(["-s"] if subscribed else []))
        return [line for line in out.decode().split("\n") if line]

    def fetch(self, mailbox: str, fields: str, search: str = "all") -> list[dict]:
        """One dict per message (values as doveadm prints them) for fields without newlines."""
        out = self.run("fetch", fields, "mailbox", mailbox, *search.split(), fmt="tab").decode()
        lines = out.split("\n")
        head = lines[0].split("\t")
        return [dict(zip(head, line.split("\t"))) for line in lines[1:] if line]

    def text(self, mailbox: str, uid: int) -> bytes:
        """The exact bytes of one message, as Dovecot serves them."""
        out = self.run("fetch", "text", "mailbox", mailbox, "uid", str(uid), fmt="pager")
        if not out.startswith(b"text:\n"):
            raise DoveadmError(f"fetch text {mailbox} uid {uid}: unexpected output {out[:60]!r}")
        return out[len(b"text:\n"):]

    def search(self, mailbox: str, query: str) -> list[int]:
        """UIDs of the messages matching a doveadm search query."""
        out = self.run("search", "mailbox", mailbox, *query.split()).decode()
        return sorted(int(line.split()[1]) for line in out.split("\n") if line)
