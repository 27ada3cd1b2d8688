"""Cyrus replication: Cyrus's sync_client into Cyrus's own sync_server vs into modsync's csync server.

One invocation, one corpus: 20,000 generated messages of about 4 KB
(tools/corpus.py, "small4k") appended to one folder of a real Cyrus 3.6
master.  Then, timed as the wall time of Cyrus's own ``sync_client -u``:

* initial sync into an empty Cyrus sync_server, and into an empty modsync
  store served by ``modsync serve --csync`` (best of RUNS each, every run
  into a fresh replica);
* \\Flagged set on 1 % of the messages (every 100th) on the master, then the
  incremental sync into each replica (best of INCREMENTAL_RUNS, the flags
  toggled back and forth so every run has the same 1 % to send, the two
  replicas taking turns at going first).

The ratios are Cyrus's time over modsync's: the targets are >= 1.5 for the
initial sync and >= 1.0 (no slower) for the incremental one.  Both replicas
live in one fresh directory under /tmp (same filesystem, same fsync policy
as shipped: Cyrus fsyncs each staged file, modsync each batch), which is
removed at the end: this module only ever deletes the directory it made.
Skipped with a note when Cyrus is not installed.
"""
from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import corpus  # tools/corpus.py

from benchmarks import Figure
from peers import cyrus as cyrus_peer

NAME = "cyrus"

MESSAGES, MESSAGES_QUICK = 20_000, 300
RUNS, RUNS_QUICK = 2, 1
# An incremental sync takes well under 0.1 s, so it is run more often: on a
# shared machine one run in three can be twice as slow as the others.
INCREMENTAL_RUNS, INCREMENTAL_RUNS_QUICK = 7, 2
APPEND_BATCH = 500
INITIAL_TARGET = 1.5
INCREMENTAL_TARGET = 1.0
USER = "bench"


def note(text: str) -> None:
    print(f"   [{NAME}] {text}", file=sys.stderr, flush=True)


def _fill(cy: cyrus_peer.Cyrus, mails) -> int:
    """MULTIAPPEND with LITERAL+ in batches: the quickest way into a Cyrus mailbox."""
    total = 0
    sock = socket.create_connection(("127.0.0.1", cy.imap_port), timeout=600)
    f = sock.makefile("rb")

    def until(tag: bytes) -> bytes:
        while True:
            line = f.readline()
            if not line:
                raise RuntimeError("Cyrus closed the IMAP connection")
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"IMAP: {line!r}")
                return line

    f.readline()   # greeting
    sock.sendall(b"a LOGIN %s %s\r\n" % (USER.encode(), cy.users[USER].encode()))
    until(b"a")
    batch: list[bytes] = []
    n = 0

    def flush():
        nonlocal batch, n
        if not batch:
            return
        n += 1
        tag = b"m%d" % n
        sock.sendall(tag + b" APPEND INBOX" + b"".join(batch) + b"\r\n")
        until(tag)
        batch = []

    for mail in mails:
        body = mail.body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        flags = " ".join(f for f in mail.flags if f != "\\Recent")
        batch.append(b" (%s) {%d+}\r\n" % (flags.encode(), len(body)) + body)
        total += len(body)
        if len(batch) >= APPEND_BATCH:
            flush()
    flush()
    sock.sendall(b"z LOGOUT\r\n")
    sock.close()
    return total


def _conf_for(master: cyrus_peer.Cyrus, port: int, tag: str) -> Path:
    """A copy of the master's imapd.conf that points sync_client at another port."""
    text = master.conf.read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("sync_port:")]
    lines.append(f"sync_port: {port}")
    path = master.dir / f"imapd-{tag}.conf"
    path.write_text("\n".join(lines) + "\n")
    master._own(path)
    return path


def _sync(master: cyrus_peer.Cyrus, conf: Path) -> float:
    cmd = master.tool_command("sync_client", "-o", "-u", USER)
    cmd[cmd.index("-C") + 1] = str(conf)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, timeout=3600)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"sync_client failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return dt


class _ModsyncServer:
    def __init__(self, path: Path):
        from engine import Store
        from engine.accounts import add_account
        st = Store.init(path)          # refuses a non-empty directory
        add_account(st, *cyrus_peer.REPL, admin=True)
        st.close()
        root = Path(__file__).resolve().parents[2]
        # `modsync serve` wants a listener of its own protocol besides --csync.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--store", str(path),
             "--listen", "127.0.0.1:0", "--csync", "127.0.0.1:0"], cwd=root,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(root)})
        self.port = None
        while self.port is None:
            line = self.proc.stdout.readline().decode()
            if not line.startswith("listening on"):
                self.stop()
                raise RuntimeError(f"modsync serve did not start: {line!r}")
            if line.split()[-1].startswith("csync:"):
                self.port = int(line.rsplit(":", 1)[1])
        # Whatever it prints later must not fill the pipe and stall it.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _toggle_flags(master: cyrus_peer.Cyrus, n: int, on: bool) -> None:
    uids = ",".join(str(u) for u in range(1, n + 1, 100))
    with master.imap(USER) as c:
        c.select("INBOX")
        cyrus_peer.check(c.uid("STORE", uids, "+FLAGS.SILENT" if on else "-FLAGS.SILENT",
                               r"(\Flagged)"))


def run(quick: bool, workdir: Path) -> list[Figure]:
    why = cyrus_peer.missing()
    if why:
        note(f"skipped: {why}")
        return []
    n = MESSAGES_QUICK if quick else MESSAGES
    runs = RUNS_QUICK if quick else RUNS
    # A fresh directory made here, with a short path (Cyrus's unix sockets
    # must fit in 108 bytes).  It is the only thing this module ever removes.
    base = Path(tempfile.mkdtemp(prefix="modsync-bench-cyrus-", dir="/tmp"))
    master = None
    servers: list[_ModsyncServer] = []
    replicas: list[cyrus_peer.Cyrus] = []
    try:
        master = cyrus_peer.Cyrus(base, "master", sync_port=1, users={
            "admin": "adminpw", "repl": "replpw", USER: "benchpw"})
        master.start()
        master.create_user(USER)
        t0 = time.perf_counter()
        size = _fill(master, corpus.generate(n, seed=20, size_mix="small4k"))
        note(f"filled the Cyrus master with {n} messages, {size / 1e6:.1f} MB, "
             f"in {time.perf_counter() - t0:.1f} s")

        cyrus_times, modsync_times = [], []
        for i in range(runs):
            rep = cyrus_peer.Cyrus(base, f"replica{i}", csync=True)
            replicas.append(rep)
            rep.start()
            cyrus_times.append(_sync(master, _conf_for(master, rep.csync_port, f"r{i}")))
            srv = _ModsyncServer(base / f"store{i}")
            servers.append(srv)
            modsync_times.append(_sync(master, _conf_for(master, srv.port, f"m{i}")))
            note(f"initial run {i + 1}: Cyrus {cyrus_times[-1]:.2f} s, "
                 f"modsync {modsync_times[-1]:.2f} s")
        # incremental: the last replica of each kind
        rconf = _conf_for(master, replicas[-1].csync_port, "r-last")
        mconf = _conf_for(master, servers[-1].port, "m-last")
        inc_c, inc_m = [], []
        for i in range(INCREMENTAL_RUNS_QUICK if quick else INCREMENTAL_RUNS):
            _toggle_flags(master, n, on=(i % 2 == 0))
            # Each replica goes first every other time: the master's own
            # caches are warmer for whichever syncs second.
            if i % 2:
                inc_m.append(_sync(master, mconf))
                inc_c.append(_sync(master, rconf))
            else:
                inc_c.append(_sync(master, rconf))
                inc_m.append(_sync(master, mconf))
        note(f"incremental runs: Cyrus {['%.3f' % x for x in inc_c]}, "
             f"modsync {['%.3f' % x for x in inc_m]}")
        ci, mi = min(cyrus_times), min(modsync_times)
        cinc, minc = min(inc_c), min(inc_m)
        mb = size / 1e6
        return [
            Figure(f"initial sync {n} msgs, Cyrus sync_server", ci, "s", better="lower",
                   note=f"{n / ci:,.0f} msg/s, {mb / ci:.1f} MB/s"),
            Figure(f"initial sync {n} msgs, modsync csync", mi, "s", better="lower",
                   note=f"{n / mi:,.0f} msg/s, {mb / mi:.1f} MB/s"),
            Figure("initial sync: Cyrus time / modsync time", ci / mi, "x",
                   target=INITIAL_TARGET),
            Figure(f"incremental 1% flags ({len(range(1, n + 1, 100))}), Cyrus", cinc, "s",
                   better="lower"),
            Figure("incremental 1% flags, modsync", minc, "s", better="lower"),
            Figure("incremental: Cyrus time / modsync time", cinc / minc, "x",
                   target=INCREMENTAL_TARGET),
            Figure("incremental: ratio of the medians", statistics.median(inc_c)
                   / statistics.median(inc_m), "x",
                   note=f"medians {statistics.median(inc_c):.3f} / "
                        f"{statistics.median(inc_m):.3f} s; the target is on the best runs"),
        ]
    finally:
        for srv in servers:
            srv.stop()
        for rep in replicas:
            rep.stop()
        if master is not None:
            master.stop()
        # base was made by mkdtemp above, in this call: nothing else is removed.
        if base.parent == Path("/tmp") and base.name.startswith("modsync-bench-cyrus-"):
            shutil.rmtree(base, ignore_errors=True)
