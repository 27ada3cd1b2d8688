"""tools/corpus.py: deterministic mail, its Maildir and mbox writers, and tests/data/sample-maildir."""
from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import mailbox as pymailbox
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from engine.maildir import decode_mutf7, encode_mutf7, import_maildir
from engine.mbox import import_mbox
from engine.model import validate_flags

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))
import corpus

SAMPLE = ROOT / "tests" / "data" / "sample-maildir"
NAME = re.compile(r"^(\d+)\.M\d+P\d+\.mail\.example\.org,S=(\d+)(?:,W=(\d+))?(?::2,([A-Z]*)([a-z]*))?$")


def run_tool(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, check=check,
                          timeout=300, **kw)


def sample_mails() -> list:
    s = corpus.SAMPLE
    return list(corpus.generate(s["messages"], s["seed"], size_mix=s["size_mix"],
                                max_size=s["max_size"]))


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path (directories, empty or not, are left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- the generator -------------------------------------------------------------------------

def test_same_seed_same_bytes_whatever_the_hash_seed():
    a = list(corpus.generate(150, seed=7))
    assert a == list(corpus.generate(150, seed=7))
    assert [m.body for m in corpus.generate(150, seed=8)] != [m.body for m in a]
    digest = hashlib.sha256(b"".join(m.body for m in a)).hexdigest()
    code = ("import hashlib, corpus; print(hashlib.sha256(b''.join("
            "m.body for m in corpus.generate(150, seed=7))).hexdigest())")
    for hash_seed in ("1", "12345"):
        out = run_tool("-c", code, cwd=TOOLS, env=dict(os.environ, PYTHONHASHSEED=hash_seed))
        assert out.stdout.decode().strip() == digest


def test_mail_addresses_are_ascii():
    # Names are folded the way people spell their addresses (Jürgen -> juergen); the
    # mbox writer puts the Return-Path address in the From_ line, which readers want ASCII.
    for m in corpus.generate(400, seed=5):
        head = m.body.replace(b"\r\n", b"\n").split(b"\n\n")[0].decode("utf-8", "replace")
        for addr in re.findall(r"[\w.+-]+@[\w.-]+", head):
            assert addr.isascii(), addr
        assert corpus.mbox_entry(m).split(b"\n", 1)[0].isascii()


def test_generate_arguments():
    assert list(corpus.generate(0, seed=1)) == []
    with pytest.raises(ValueError, match="size_mix"):
        list(corpus.generate(1, seed=1, size_mix="huge"))
    capped = list(corpus.generate(300, seed=2, max_size=20_000))
    assert max(len(m.body) for m in capped) < 30_000


def test_realistic_size_mix():
    mails = list(corpus.generate(3000, seed=11))
    sizes = [len(m.body) for m in mails]
    assert 3_500 <= statistics.median(sizes) <= 5_500          # "a median message of about 4 KB"
    assert 7_000 <= statistics.mean(sizes) <= 15_000           # "a mean near 10 KB"
    attached = sum(b"Content-Disposition: attachment" in m.body for m in mails) / len(mails)
    assert 0.05 <= attached <= 0.09                             # 7 %
    assert max(sizes) > 500_000
    crlf = sum(b"\r\n" in m.body for m in mails) / len(mails)
    assert 0.87 <= crlf <= 0.93                                 # 90 % CRLF, the rest LF only
    assert all(m.body.count(b"\r\n") == m.body.count(b"\n") or b"\r\n" not in m.body
               for m in mails)


def test_small4k_size_mix():
    sizes = [len(m.body) for m in corpus.generate(2000, seed=11, size_mix="small4k")]
    assert 2_500 <= min(sizes) and max(sizes) <= 6_500
    assert 3_900 <= statistics.mean(sizes) <= 4_500


def test_dates_flags_and_the_unread_tail():
    mails = list(corpus.generate(1000, seed=3))
    dates = [m.internaldate for m in mails]
    assert dates == sorted(set(dates))
    assert corpus.EPOCH_START <= dates[0] and dates[-1] < corpus.EPOCH_START + corpus.EPOCH_SPAN
    for m in mails:
        assert set(validate_flags(m.flags)) == set(m.flags)   # all flags IMAP can carry
    seen = sum("\\Seen" in m.flags for m in mails[:950]) / 950
    assert 0.8 <= seen <= 0.9
    tail = mails[-20:]                          # the newest 2 %: mostly no flag at all
    assert sum(not m.flags for m in tail) >= 10
    used = Counter(f for m in mails for f in m.flags)
    assert {"\\Answered", "\\Flagged", "\\Deleted", "$Junk", "$label1"} <= set(used)


def test_messages_are_well_formed_mime():
    kinds = Counter()
    for m in corpus.generate(600, seed=4):
        msg = email.message_from_bytes(m.body, policy=email.policy.default)
        assert msg["Message-ID"] and msg["Date"] and msg["From"] and msg["Subject"] is not None
        for part in msg.walk():
            assert not part.defects, (part.defects, m.body[:300])
            kinds[part.get_content_type()] += 1
            if part.is_multipart():
                continue
            cte = part.get("Content-Transfer-Encoding", "7bit").lower()
            raw = part.get_payload(decode=False)
            if cte == "base64":
                base64.b64decode("".join(raw.split()), validate=True)
            elif cte == "quoted-printable":
                assert all(len(line) <= 76 for line in raw.splitlines())
            data = part.get_payload(decode=True)
            if part.get_content_maintype() == "text":
                data.decode(part.get_content_charset() or "us-ascii")
    assert {"text/plain", "text/html", "multipart/alternative", "multipart/mixed"} <= set(kinds)
    assert any(k.startswith(("application/", "image/")) for k in kinds)


def test_small_encoders():
    assert corpus.rfc5322_date(1_700_000_000) == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert corpus.rfc5322_date(1_700_000_000, 60) == "Tue, 14 Nov 2023 23:13:20 +0100"
    assert corpus.rfc5322_date(1_700_000_000, -300) == "Tue, 14 Nov 2023 17:13:20 -0500"
    assert corpus.maildir_dirname("INBOX") == ""
    assert corpus.maildir_dirname("Projekte/Übersicht") == ".Projekte.&ANw-bersicht"
    letters = {"$Junk": "a", "Work": "b"}.__getitem__
    assert corpus.maildir_info(("\\Seen", "Work", "\\Draft", "$Junk", "\\Flagged"),
                               letters) == "DFSab"


def test_write_maildir_reports_what_it_wrote_and_leaves_fresh_mail_in_new(tmp_path):
    mails = list(corpus.generate(200, seed=13, max_size=6000))
    stats = corpus.write_maildir(tmp_path / "md", mails, ("INBOX", "Sent"), seed=13)
    assert stats["messages"] == 200 and sum(stats["folders"].values()) == 200
    assert stats["bytes"] == sum(len(m.body) for m in mails)
    fresh = list((tmp_path / "md" / "new").iterdir())
    assert 1 <= len(fresh) <= 3 and not list((tmp_path / "md" / ".Sent" / "new").iterdir())
    by_body = {m.body: m for m in mails}
    assert all(not by_body[f.read_bytes()].flags for f in fresh)
    newest = sorted(m.internaldate for m in mails)[-20:]
    assert all(by_body[f.read_bytes()].internaldate in newest for f in fresh)


def test_folder_names_use_the_engines_modified_utf7():
    for name in corpus.DEFAULT_FOLDERS:
        for part in name.split("/"):
            assert corpus.mutf7(part) == encode_mutf7(part)
            assert decode_mutf7(corpus.mutf7(part)) == part


# -- the Maildir writer ----------------------------------------------------------------------

def test_maildir_cli_writes_a_dovecot_layout(store, tmp_path):
    out = tmp_path / "Maildir"
    run_tool(str(TOOLS / "corpus.py"), "maildir", str(out), "--messages", "400", "--folders", "5",
             "--seed", "3")
    dirs = {"INBOX": out, "Sent": out / ".Sent", "Lists/modsync": out / ".Lists.modsync",
            "Entwürfe": out / ".Entw&APw-rfe", "Archive/2023": out / ".Archive.2023"}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == sorted(
        d.name for n, d in dirs.items() if n != "INBOX")
    total = 0
    for name, folder in dirs.items():
        assert (folder / "maildirfolder").exists() == (name != "INBOX")
        assert {p.name for p in folder.iterdir() if p.is_dir() and p.name[0] != "."} == {
            "cur", "new", "tmp"}
        keywords = {}
        if (folder / "dovecot-keywords").exists():
            keywords = dict(line.split(" ", 1)[::-1] for line in
                            (folder / "dovecot-keywords").read_text().splitlines())
        assert len(keywords) <= 26
        bases = []
        for sub in ("new", "cur"):
            for f in sorted((folder / sub).iterdir()):
                m = NAME.match(f.name)
                assert m, f.name
                body = f.read_bytes()
                assert int(m.group(2)) == len(body)
                if b"\r\n" not in body:             # W= (size with CRLF) for LF-only files
                    assert int(m.group(3)) == len(body) + body.count(b"\n")
                else:
                    assert m.group(3) is None
                assert int(f.stat().st_mtime) == int(m.group(1))
                assert (sub == "new") == (m.group(4) is None)
                if m.group(4):
                    assert m.group(4) == "".join(sorted(m.group(4)))
                    assert all(c in "abcdefghijklmnopqrstuvwxyz"[:len(keywords)]
                               for c in m.group(5))
                bases.append(f.name.split(":2,")[0])
        uidlist = (folder / "dovecot-uidlist").read_text().splitlines()
        assert re.match(r"^3 V\d+ N(\d+) G[0-9a-f]{32}$", uidlist[0])
        assert sorted(line.split(" :")[1] for line in uidlist[1:]) == sorted(bases)
        assert [int(line.split()[0]) for line in uidlist[1:]] == list(range(1, len(bases) + 1))
        total += len(bases)
    assert total == 400
    assert (out / "subscriptions").read_text() == (
        "V\t2\n\nINBOX\nSent\nLists\tmodsync\nEntw&APw-rfe\nArchive\t2023\n")

    report = import_maildir(store, "u", out)
    assert report.ok and report.imported == 400
    want = Counter((m.body, frozenset(m.flags), m.internaldate)
                   for m in corpus.generate(400, seed=3))
    got = Counter((store.read_body(r.address), frozenset(r.flags), r.internaldate)
                  for mb in store.mailboxes("u") for r in store.records("u", mb.name))
    assert got == want
    assert sorted(store.subscriptions("u")) == sorted(dirs)


def test_maildir_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    p = run_tool(str(TOOLS / "corpus.py"), "maildir", str(tmp_path / "full"), check=False)
    assert p.returncode == 2 and b"not empty" in p.stderr
    assert (tmp_path / "full" / "keep").read_text() == "mine"
    assert sorted(os.listdir(tmp_path / "full")) == ["keep"]


# -- the mbox writer ----------------------------------------------------------------------

def test_mbox_cli_writes_mboxrd(store, tmp_path):
    out = tmp_path / "mail.mbox"
    p = run_tool(str(TOOLS / "corpus.py"), "mbox", str(out), "--messages", "300", "--seed", "3")
    assert b"300 messages" in p.stdout
    data = out.read_bytes()
    assert b"\r\n" not in data and data.startswith(b"From ")
    mails = list(corpus.generate(300, seed=3))
    assert data.count(b"\n\nFrom ") == 299
    # Python's reader agrees on the messages; ">From " lines are quoted once more.
    box = pymailbox.mbox(out, create=False)
    assert len(box) == 300
    assert all(re.search(rb"(?m)^From ", msg.as_bytes(unixfrom=False)) is None for msg in box)
    box.close()
    report = import_mbox(store, "u", out, "INBOX")
    assert report.ok and report.imported == 300
    got = [store.read_body(r.address) for r in store.records("u", "INBOX")]
    assert got == [m.body.replace(b"\r\n", b"\n") for m in mails]
    assert [r.internaldate for r in store.records("u", "INBOX")] == [m.internaldate for m in mails]


def test_mbox_entry_escapes_from_lines():
    mail = corpus.Mail(b"Return-Path: <a@b>\r\nSubject: x\r\n\r\nFrom me\r\n>From you\r\nend",
                       (), 0)
    assert corpus.mbox_entry(mail) == (b"From a@b Thu Jan  1 00:00:00 1970\n"
                                       b"Return-Path: <a@b>\nSubject: x\n\n>From me\n"
                                       b">>From you\nend\n\n")


# -- restore and the sample -----------------------------------------------------------------

def test_restore_puts_back_what_git_drops(tmp_path):
    made = tmp_path / "made"
    corpus.write_maildir(made, corpus.generate(30, seed=9, max_size=8000), seed=9)
    repo = tmp_path / "repo"
    shutil.copytree(made, repo / "sample")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org",
           "-c", "init.defaultBranch=main", "-c", "core.hooksPath=/dev/null"]
    env = dict(os.environ, HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1")
    subprocess.run(git + ["init", "-q", str(repo)], check=True, env=env)
    subprocess.run(git + ["-C", str(repo), "add", "sample"], check=True, env=env)
    subprocess.run(git + ["-C", str(repo), "commit", "-q", "-m", "sample"], check=True, env=env)
    subprocess.run(git + ["clone", "-q", str(repo), str(tmp_path / "clone")], check=True, env=env)
    checkout = tmp_path / "clone" / "sample"

    dirs = sorted(str(p.relative_to(made)) for p in made.rglob("*") if p.is_dir())
    assert not (checkout / "tmp").exists()          # what git drops...
    p = run_tool(str(TOOLS / "corpus.py"), "restore", str(checkout))
    assert b"30 message files" in p.stdout
    assert sorted(str(p.relative_to(checkout)) for p in checkout.rglob("*") if p.is_dir()) == dirs
    messages = [p for p in made.rglob("*") if p.is_file() and p.parent.name in ("cur", "new")]
    assert len(messages) == 30
    for f in messages:                              # ...is back
        back = checkout / f.relative_to(made)
        assert back.read_bytes() == f.read_bytes()
        assert int(back.stat().st_mtime) == int(f.stat().st_mtime) == int(f.name.split(".")[0])


def test_the_committed_sample_is_what_the_generator_makes(tmp_path):
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} is not in this checkout")
    run_tool(str(TOOLS / "corpus.py"), "maildir", str(tmp_path / "sample"), "--sample")
    made, committed = files_of(tmp_path / "sample"), files_of(SAMPLE)
    assert sorted(made) == sorted(committed), (
        "tests/data/sample-maildir differs from `tools/corpus.py maildir DIR --sample`; "
        "regenerate it (a new Python's random module may have changed the bytes)")
    assert all(made[k] == committed[k] for k in made)


def test_the_sample_shows_every_feature():
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} is not in this checkout")
    folders = [SAMPLE] + sorted(p for p in SAMPLE.iterdir() if p.name.startswith("."))
    assert [f.name for f in folders[1:]] == [".Entw&APw-rfe", ".Lists.modsync", ".Sent"]
    seen = Counter()
    for folder in folders:
        files = [f for sub in ("cur", "new") if (folder / sub).is_dir()
                 for f in (folder / sub).iterdir()]
        assert len(files) >= 5
        seen["new/"] += sum(f.parent.name == "new" for f in files)
        kw = 0
        for f in files:
            m = NAME.match(f.name)
            assert m, f.name
            system, letters = m.group(4) or "", m.group(5) or ""
            kw += bool(letters)
            for flag in "DFRT":
                seen[flag] += flag in system
            seen["unseen"] += "S" not in system
            body = f.read_bytes()
            seen["lf-only"] += b"\r\n" not in body
            seen["latin-1"] += b"charset=iso-8859-1" in body
            seen["attachment"] += b"Content-Disposition: attachment" in body
            seen["quoted-printable"] += b"quoted-printable" in body
            seen["html"] += b"text/html" in body
            seen["From line"] += bool(re.search(rb"\n>*From ", body))
            seen["line > 998"] += any(len(line) > 998 for line in body.split(b"\n"))
            seen["encoded word"] += b"=?" in body
        seen["folders with keywords"] += kw > 0
    for feature in ("new/", "D", "F", "R", "T", "unseen", "latin-1", "quoted-printable", "html",
                    "From line", "line > 998", "encoded word"):
        assert seen[feature] >= 1, feature
    assert seen["lf-only"] >= 2 and seen["attachment"] >= 2
    assert seen["folders with keywords"] >= 3
    assert sum(len(b) for b in files_of(SAMPLE).values()) < 500_000


# -- the benchmark ------------------------------------------------------------------------

def test_bench_store_quick_prints_figures():
    p = run_tool(str(TOOLS / "bench"), "store", "--quick", check=False, cwd=ROOT)
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr.decode()
    assert "== store:" in out
    for figure in ("import: Maildir, 4 KB messages", "import: append_many", "changes_since",
                   "verify: messages/s"):
        line = next((x for x in out.splitlines() if x.strip().startswith(figure)), None)
        assert line is not None, f"{figure!r} missing from:\n{out}"
        assert re.search(r"\d[\d,.]* (msg/s|ms|MB/s|µs|x)\b", line), line
    assert "import_maildir failed" not in p.stderr.decode()
