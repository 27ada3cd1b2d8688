"""Real Cyrus IMAP 3.6 servers on 127.0.0.1, in throw-away folders, for interop tests.

    cy = Cyrus(base, "master", sync_port=2005)   # writes base/master/{imapd.conf,cyrus.conf,...}
    cy.start()                                   # master process in its own session
    cy.create_user("test")                       # admin CREATE user/test over IMAP
    with cy.imap("test") as c: c.append(...)     # imaplib, logged in
    cy.sync_client("-u", "test")                 # one-shot replication to sync_port
    cy.stop()

What it does, and why (the gotchas are the ones the shared notes list for
Debian's 3.6.1 packages; every one was hit for real):

* every service's ``cmd=`` carries ``-C <imapd.conf>``: Cyrus's master does
  not pass its own ``-C`` on, and children would quietly use /etc/imapd.conf;
* the configdirectory skeleton (db, lock, log, proc, socket, sync, ...) is
  created up front, and users live in a per-instance sasldb
  (``auxprop``/``sasldb``), so no system accounts are involved;
* the master runs with ``-D`` in a session of its own (``start_new_session``),
  because on SIGTERM it signals its whole process group;
* started as root, master drops to ``cyrus``; the command-line tools
  (sync_client, cyr_expire) are run as ``cyrus`` through setpriv;
* ``sync_client -r`` forks unless CYRUS_ISDAEMON is set; with it the PID we
  hold is the real client, stopped through its shutdown file;
* unix sockets must fit in 108 bytes, so ``base`` must be short
  (``short_tempdir()`` makes one under /tmp).

Nothing listens on anything but 127.0.0.1; every process started here is
stopped by its PID in ``stop()``.  ``destroy()`` removes only the instance's
own directory (``base/name``), never ``base`` itself.
"""
from __future__ import annotations

import base64
import contextlib
import imaplib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CYRUS_BIN = Path(os.environ.get("CYRUS_BIN", "/usr/lib/cyrus/bin"))
PACKAGES = "cyrus-imapd cyrus-common cyrus-replication sasl2-bin libsasl2-modules libsasl2-modules-db"
ADMIN = ("admin", "adminpw")
REPL = ("repl", "replpw")
DEFAULT_USERS = {"admin": "adminpw", "repl": "replpw", "test": "testpw", "other": "otherpw",
                 "third": "thirdpw"}
CONF_SUBDIRS = ("db", "db.backup1", "db.backup2", "lock", "log", "msg", "proc", "ptclient",
                "quota", "socket", "sync", "user")
#: What an instance directory holds once written (destroy() checks for it).
MARKER = "imapd.conf"

imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))


def missing() -> str | None:
    """Why a Cyrus test peer cannot run here, or None when it can."""
    for tool in ("master", "imapd", "sync_client", "sync_server", "timsieved", "ctl_cyrusdb"):
        if not (CYRUS_BIN / tool).exists():
            return (f"Cyrus IMAP is not installed ({CYRUS_BIN / tool} missing; Debian packages "
                    f"{PACKAGES}, installed by tools/setup.sh as root)")
    if shutil.which("saslpasswd2") is None:
        return "saslpasswd2 is missing (Debian package sasl2-bin)"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "running as root, and setpriv (util-linux) is missing to run Cyrus tools as cyrus"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tempdir(prefix: str = "cy") -> Path:
    """A new directory with a short path (Cyrus's unix sockets must fit in 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _run_user() -> tuple[str, str]:
    if os.geteuid() == 0:
        return "cyrus", "mail"
    import grp
    import pwd
    pw = pwd.getpwuid(os.geteuid())
    return pw.pw_name, grp.getgrgid(pw.pw_gid).gr_name


class CyrusError(RuntimeError):
    """A Cyrus tool failed; the message holds its command line and output."""


class Cyrus:
    """One Cyrus instance (imapd, timsieved, lmtpd, optionally sync_server) under ``base/name``."""

    def __init__(self, base: str | os.PathLike, name: str = "cyrus", *,
                 sync_port: int | None = None, csync: bool = False,
                 users: dict[str, str] | None = None, altnamespace: bool = False,
                 sync_try_imap: bool = False, fsync: bool = True):
        self.base = Path(base).resolve()
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad instance name {name!r}")
        self.name = name
        self.dir = self.base / name
        self.imap_port = free_port()
        self.sieve_port = free_port()
        self.csync_port = free_port() if csync else None
        self.sync_port = sync_port
        self.users = dict(users or DEFAULT_USERS)
        self.servername = f"cyrus-{name}.test"
        self.run_user, self.run_group = _run_user()
        self.altnamespace = altnamespace
        self.sync_try_imap = sync_try_imap
        self.fsync = fsync
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._rolling: subprocess.Popen | None = None
        self._write_config()

    # -- configuration ------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.dir / "imapd.conf"

    def _write_config(self) -> None:
        d = self.dir
        if d.exists():
            if not (d / MARKER).exists():
                raise CyrusError(f"{d} exists and is not a Cyrus instance written here; "
                                 f"refusing to overwrite it")
            shutil.rmtree(d)
        for sub in ("spool", "sieve", "run"):
            (d / sub).mkdir(parents=True)
        for sub in CONF_SUBDIRS:
            (d / "conf" / sub).mkdir(parents=True)
        lines = [
            f"# written by tools/peers/cyrus.py ({self.name})",
            f"configdirectory: {d}/conf",
            "defaultpartition: default",
            f"partition-default: {d}/spool",
            f"sievedir: {d}/sieve",
            "sieveusehomedir: false",
            f"lmtpsocket: {d}/conf/socket/lmtp",
            f"idlesocket: {d}/conf/socket/idle",
            f"notifysocket: {d}/conf/socket/notify",
            f"servername: {self.servername}",
            f"cyrus_user: {self.run_user}",
            "admins: admin repl",
            "allowplaintext: yes",
            "sasl_pwcheck_method: auxprop",
            "sasl_auxprop_plugin: sasldb",
            f"sasl_sasldb_path: {d}/sasldb2",
            "sasl_mech_list: PLAIN LOGIN",
            f"altnamespace: {'yes' if self.altnamespace else 'no'}",
            "unixhierarchysep: yes",
            "virtdomains: off",
            "hashimapspool: false",
            "umask: 077",
            f"syslog_prefix: peers-{self.name}",
            "expunge_mode: delayed",
            "delete_mode: delayed",
            "conversations: 0",
            "allowusermoves: yes",      # an admin may rename a user (user moves replicate)
        ]
        if not self.fsync:
            lines.append("skiplist_unsafe: 1")
        if self.sync_port is not None:
            lines += [
                "sync_host: 127.0.0.1",
                f"sync_port: {self.sync_port}",
                f"sync_try_imap: {'yes' if self.sync_try_imap else 'no'}",
                f"sync_authname: {REPL[0]}",
                f"sync_password: {REPL[1]}",
                "sync_log: 1",
                "sync_repeat_interval: 1",
                f"sync_shutdown_file: {d}/conf/sync/shutdown",
            ]
        self.conf.write_text("\n".join(lines) + "\n")
        services = [
            f'  imap cmd="imapd -C {self.conf}" listen="127.0.0.1:{self.imap_port}" '
            f'prefork=0 maxchild=50',
            f'  sieve cmd="timsieved -C {self.conf}" listen="127.0.0.1:{self.sieve_port}" '
            f'prefork=0 maxchild=10',
            f'  lmtpunix cmd="lmtpd -C {self.conf}" listen="{d}/conf/socket/lmtp" '
            f'prefork=0 maxchild=10',
        ]
        if self.csync_port is not None:
            services.append(f'  syncserver cmd="sync_server -C {self.conf}" '
                            f'listen="127.0.0.1:{self.csync_port}" prefork=0 maxchild=10')
        (d / "cyrus.conf").write_text(
            "START {\n"
            f'  recover cmd="ctl_cyrusdb -C {self.conf} -r"\n'
            "}\nSERVICES {\n" + "\n".join(services) + "\n}\nEVENTS {\n"
            f'  checkpoint cmd="ctl_cyrusdb -C {self.conf} -c" period=30\n'
            "}\n")
        sasldb = d / "sasldb2"
        for user, password in self.users.items():
            subprocess.run(["saslpasswd2", "-p", "-c", "-f", str(sasldb), "-u", self.servername,
                            user], input=password.encode(), capture_output=True, check=True)
        self._own(d)
        os.chmod(d, 0o750)
        os.chmod(sasldb, 0o640)
        # the run user must be able to reach the instance
        if os.geteuid() == 0:
            os.chmod(self.base, 0o755)

    def _own(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        import grp
        import pwd
        uid, gid = pwd.getpwnam(self.run_user).pw_uid, grp.getgrnam(self.run_group).gr_gid
        for p in [path, *path.rglob("*")]:
            os.lchown(p, uid, gid)

    # -- processes ----------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        log = open(self.dir / "run" / "master.out", "ab")
        self._proc = subprocess.Popen(
            [str(CYRUS_BIN / "master"), "-C", str(self.conf), "-M", str(self.dir / "cyrus.conf"),
             "-p", str(self.dir / "run" / "master.pid"), "-D"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.pid = self._proc.pid
        ports = [self.imap_port, self.sieve_port] + ([self.csync_port] if self.csync_port else [])
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                if self._proc.poll() is not None:
                    raise CyrusError(f"Cyrus master ({self.name}) exited with "
                                     f"{self._proc.returncode}; see {self.dir}/run/master.out")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise CyrusError(f"Cyrus ({self.name}) port {port} not up in {timeout}s")
                    time.sleep(0.05)

    def stop(self) -> None:
        self.rolling_stop()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)   # master stops its children itself
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def destroy(self) -> None:
        """Stop, then remove this instance's directory (``base/name``) and nothing else."""
        self.stop()
        if (self.dir / MARKER).exists() and self.dir.parent == self.base \
                and self.dir.name == self.name:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- command-line tools ---------------------------------------------------------------------
    def tool_command(self, tool: str, *args: str) -> list[str]:
        cmd = [str(CYRUS_BIN / tool), "-C", str(self.conf), *args]
        if os.geteuid() == 0:
            cmd = ["setpriv", f"--reuid={self.run_user}", f"--regid={self.run_group}",
                   "--init-groups", "--"] + cmd
        return cmd

    def tool(self, tool: str, *args: str, timeout: float = 300, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(self.tool_command(tool, *args), capture_output=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        if check and p.returncode != 0:
            raise CyrusError(f"{tool} {' '.join(args)}: exit {p.returncode}\n"
                             f"stdout: {p.stdout.decode(errors='replace')}\n"
                             f"stderr: {p.stderr.decode(errors='replace')}")
        return p

    def sync_client(self, *args: str, timeout: float = 300, check: bool = True):
        """``sync_client -o ARGS`` (connect once) towards this instance's sync_port."""
        return self.tool("sync_client", "-o", *args, timeout=timeout, check=check)

    def sync_log_path(self) -> Path:
        return self.dir / "conf" / "sync" / "log"

    def clear_sync_log(self) -> None:
        """Forget logged changes (after a -u run, which ignores the log)."""
        for name in ("log", "log-run"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / "conf" / "sync" / name).unlink()

    def rolling_start(self, *args: str) -> None:
        """``sync_client -r`` in the foreground of a process we hold (CYRUS_ISDAEMON=1)."""
        self.rolling_stop()
        shutdown = self.dir / "conf" / "sync" / "shutdown"
        with contextlib.suppress(FileNotFoundError):
            shutdown.unlink()
        out = open(self.dir / "run" / "rolling.out", "ab")
        self._rolling = subprocess.Popen(
            self.tool_command("sync_client", "-r", *args), stdin=subprocess.DEVNULL,
            stdout=out, stderr=out, env={**os.environ, "CYRUS_ISDAEMON": "1"},
            start_new_session=True)
        out.close()

    def rolling_stop(self, timeout: float = 15) -> int | None:
        proc, self._rolling = self._rolling, None
        if proc is None:
            return None
        if proc.poll() is None:
            shutdown = self.dir / "conf" / "sync" / "shutdown"
            shutdown.write_text("")
            self._own(shutdown)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
        return proc.returncode

    def rolling_output(self) -> str:
        p = self.dir / "run" / "rolling.out"
        return p.read_text(errors="replace") if p.exists() else ""

    # -- IMAP -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def imap(self, user: str = "admin", password: str | None = None):
        c = imaplib.IMAP4("127.0.0.1", self.imap_port)
        try:
            c.login(user, password or self.users[user])
            yield c
        finally:
            with contextlib.suppress(Exception):
                c.logout()

    def add_login(self, user: str, password: str | None = None) -> None:
        """A SASL login for ``user`` on this instance (no mailbox is created)."""
        if user in self.users:
            return
        self.users[user] = password or user + "pw"
        subprocess.run(["saslpasswd2", "-p", "-c", "-f", str(self.dir / "sasldb2"), "-u",
                        self.servername, user], input=self.users[user].encode(),
                       capture_output=True, check=True)

    def create_user(self, user: str, *, password: str | None = None) -> None:
        self.add_login(user, password)
        with self.imap("admin") as c:
            check(c.create(self.mailbox_name(user, "INBOX", as_admin=True)))

    def delete_user(self, user: str) -> None:
        with self.imap("admin") as c:
            box = self.mailbox_name(user, "INBOX", as_admin=True)
            check(c.setacl(box, "admin", "lrswipkxtecda"))
            check(c.delete(box))

    def mailbox_name(self, user: str, name: str, *, as_admin: bool = False) -> str:
        """The IMAP name of modsync mailbox ``name`` of ``user`` (unixhierarchysep, mUTF-7)."""
        from_mod = _mutf7(name)
        if as_admin:
            return f"user/{user}" + ("" if name == "INBOX" else "/" + from_mod)
        if name == "INBOX" or self.altnamespace:
            return from_mod
        return "INBOX/" + from_mod

    # -- what an IMAP client sees -----------------------------------------------------------------
    def view(self, user: str) -> dict:
        """Folders, messages (bytes, flags), subscriptions of a user, as IMAP shows them.

        Keys are modsync mailbox names; each folder maps UID order to
        (flags, body).  Used to compare a Cyrus server with a modsync store.
        """
        out: dict = {"mailboxes": {}, "subscribed": []}
        with self.imap(user) as c:
            typ, data = c.list()
            check((typ, data))
            names = [_parse_list(x) for x in data if x]
            for name in names:
                mod = self._modsync_name(name)
                if mod is None:
                    continue
                typ, _ = c.select(_quote(name), readonly=True)
                if typ != "OK":
                    continue
                msgs = []
                typ, data = c.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
                if typ == "OK":
                    msgs = _parse_fetch(data)
                out["mailboxes"][mod] = msgs
                c.close()
            typ, data = c.lsub()
            if typ == "OK":
                subs = [self._modsync_name(_parse_list(x)) for x in data if x]
                out["subscribed"] = sorted(s for s in subs if s)
        return out

    def _modsync_name(self, imap_name: str) -> str | None:
        if imap_name.upper() == "INBOX":
            return "INBOX"
        if imap_name.startswith("INBOX/") and not self.altnamespace:
            imap_name = imap_name[6:]
        if imap_name.startswith(("Other Users/", "Shared Folders/", "user/")):
            return None
        return _unmutf7(imap_name)

    def status(self, user: str, name: str) -> dict:
        with self.imap(user) as c:
            typ, data = c.status(_quote(self.mailbox_name(user, name)),
                                 "(MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ UNSEEN)")
            check((typ, data))
            text = data[0].decode()
            return {k: int(v) for k, v in re.findall(r"([A-Z]+) (\d+)", text.split("(", 1)[1])}

    def getmetadata(self, user: str, name: str, entry: str) -> bytes | None:
        """A METADATA value of a user's mailbox as that user sees it (None when unset)."""
        with self.imap(user) as c:
            typ, data = c._simple_command("GETMETADATA", _quote(self.mailbox_name(user, name)),
                                          entry)
            check((typ, data))
            typ, data = c._untagged_response(typ, data, "METADATA")
            for item in data or []:
                if isinstance(item, tuple):
                    return item[1]          # a literal value
                if not item:
                    continue
                m = re.search(rb'\("[^"]*" (NIL|"((?:[^"\\]|\\.)*)")\)\s*$', item)
                if m:
                    if m.group(1) == b"NIL":
                        return None
                    return re.sub(rb"\\(.)", rb"\1", m.group(2))
            return None

    # -- ManageSieve ------------------------------------------------------------------------------
    def sieve(self, user: str) -> "ManageSieve":
        return ManageSieve(self.sieve_port, user, self.users[user])


def check(result) -> None:
    typ, data = result
    if typ != "OK":
        raise CyrusError(f"IMAP command failed: {typ} {data}")


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse_list(item) -> str:
    if isinstance(item, tuple):
        item = item[0] + item[1]
    text = item.decode()
    m = re.match(r'\((?P<flags>[^)]*)\) (?:"(?P<sep>[^"]*)"|NIL) (?P<name>.*)$', text)
    name = m.group("name")
    if name.startswith('"'):
        name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return name


def _parse_fetch(data) -> list:
    msgs = []
    for item in data:
        if not isinstance(item, tuple):
            continue
        head = item[0].decode()
        uid = int(re.search(r"UID (\d+)", head).group(1))
        flags = re.search(r"FLAGS \(([^)]*)\)", head)
        flag_list = sorted(f for f in (flags.group(1).split() if flags else []) if f != "\\Recent")
        msgs.append((uid, flag_list, item[1]))
    msgs.sort()
    return [(f, b) for _, f, b in msgs]


def _mutf7(text: str) -> str:
    from engine.csync.mapping import mutf7_encode
    return mutf7_encode(text)


def _unmutf7(text: str) -> str:
    from engine.csync.mapping import mutf7_decode
    return mutf7_decode(text)


class ManageSieve:
    """A small RFC 5804 client: enough to put, list, activate and delete scripts."""

    def __init__(self, port: int, user: str, password: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self._response()   # capabilities
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        self._command(f'AUTHENTICATE "PLAIN" "{token}"')

    def _readline(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise CyrusError("ManageSieve server closed the connection")
        return line

    def _response(self) -> list[bytes]:
        lines = []
        while True:
            line = self._readline()
            m = re.search(rb"\{(\d+)\+?\}\r\n$", line)
            if m:
                line = line + self.file.read(int(m.group(1))) + self._readline()
            lines.append(line)
            if re.match(rb"(OK|NO|BYE)\b", line):
                return lines

    def _command(self, text: str, literal: bytes | None = None) -> list[bytes]:
        data = text.encode()
        if literal is not None:
            data += b" {%d+}\r\n" % len(literal) + literal
        self.sock.sendall(data + b"\r\n")
        lines = self._response()
        if not lines[-1].startswith(b"OK"):
            raise CyrusError(f"ManageSieve {text.split()[0]}: {lines[-1].decode(errors='replace')}")
        return lines

    def put(self, name: str, script: bytes) -> None:
        self._command(f'PUTSCRIPT "{name}"', script)

    def activate(self, name: str | None) -> None:
        self._command(f'SETACTIVE "{name or ""}"')

    def delete(self, name: str) -> None:
        self._command(f'DELETESCRIPT "{name}"')

    def list(self) -> dict[str, bool]:
        """{script name: active?}"""
        out = {}
        for line in self._command("LISTSCRIPTS")[:-1]:
            m = re.match(rb'"(?P<name>[^"]*)"(?P<active> ACTIVE)?', line.strip())
            if m:
                out[m.group("name").decode()] = bool(m.group("active"))
        return out

    def get(self, name: str) -> bytes:
        lines = self._command(f'GETSCRIPT "{name}"')
        first = lines[0]
        m = re.match(rb"\{(\d+)\}\r\n", first)
        if not m:
            raise CyrusError(f"GETSCRIPT {name}: unexpected {first[:40]!r}")
        start = m.end()
        return first[start:start + int(m.group(1))]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sock.sendall(b"LOGOUT\r\n")
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
