#!/usr/bin/env python3
"""Deterministic, realistic mail for benchmarks, tests and demos.

As a library::

    from corpus import generate
    for body, flags, internaldate in generate(20_000, seed=1):
        ...

``generate(n, seed)`` yields ``Mail(body, flags, internaldate)`` tuples, the
same bytes for the same arguments on every machine (one ``random.Random(seed)``,
fixed word pools, no clock, no locale, no hash order).  The random module
promises only ``random()`` itself to stay the same across Python versions, so
a new Python may change the bytes: tests compare against tests/data only what
this module itself regenerates.

As a command::

    tools/corpus.py maildir OUT --messages 20000 --folders 6 --seed 1
    tools/corpus.py maildir OUT --sample          # the tree in tests/data/sample-maildir
    tools/corpus.py mbox OUT.mbox --messages 1000 --seed 1
    tools/corpus.py restore tests/data/sample-maildir   # after a git checkout

What the mail looks like (``size_mix="realistic"``):

* sizes: a message is headers plus a text body of log-normal size (median
  2.5 KB, so a median message of about 4 KB); 7 % carry an attachment of
  log-normal size (median 12 KB, sigma 1.7) capped at 4 MiB before base64.
  That gives a mean near 10 KB, about ten messages over 1 MB per 20,000
  and a biggest message of several MB; 20,000 messages come to 160-210 MB.
* structure: text/plain (7bit, 8bit UTF-8, 8bit ISO-8859-1, quoted-printable,
  base64), multipart/alternative with a quoted-printable HTML part,
  multipart/mixed with base64 attachments (incompressible "PDF/JPEG/ZIP"
  bytes, and compressible CSV text), replies quoting earlier text;
* headers: Received chains of 2-5 hops, DKIM-Signature and References
  folded over many lines, RFC 2047 encoded words, now and then raw UTF-8
  in a header and an unfolded To: line longer than 998 octets (RFC 5322's
  limit, which real mail breaks);
* line endings: CRLF for 90 % of the messages, LF only for the rest;
* bodies contain lines starting with "From " and ">From " (mbox escaping);
* flags: \\Seen on most, \\Answered, \\Flagged, \\Deleted and \\Draft on a few,
  keywords $Junk, $NotJunk, $Forwarded, $MDNSent, $label1..$label5; the
  newest 2 % (at least 5) are mostly new mail with no flag at all.

``size_mix="small4k"`` gives messages of 3-6 KB (mean ~4.2 KB) with the same
structure but no big attachments: the import target's "4 KB message".

The Maildir writer lays the mail out as Dovecot does (Maildir++):

* ``OUT/{cur,new,tmp}`` is INBOX; ``OUT/.Lists.modsync/`` is "Lists/modsync";
  non-ASCII names are modified UTF-7 (``.Entw&APw-rfe`` is "Entwürfe");
  each subfolder has an empty ``maildirfolder`` file;
* files in ``cur/`` are named ``<time>.M<usec>P<pid>.<host>,S=<size>:2,<flags>``
  (``,W=<size with CRLF>`` follows S= for LF-only files, as Dovecot writes it);
  flags are the Maildir letters D F R S T, then a..z for keywords, as listed
  in the folder's ``dovecot-keywords`` file ("0 $Junk" makes "a" mean $Junk);
* of the newest INBOX messages (the last 2 %, at least 3), those without any
  flag sit in ``new/`` with no info suffix, as a delivery agent leaves them;
* ``dovecot-uidlist`` (version 3) gives each message its UID, in arrival order;
* ``subscriptions`` (Dovecot's version 2: name parts in modified UTF-7,
  separated by tabs) subscribes every folder;
* each file's mtime (and atime) is its internal date, which is also the
  ``<time>`` of its name.  Git keeps neither mtimes nor empty directories:
  ``tools/corpus.py restore DIR`` (``restore_checkout()``) puts both back on
  a checked-out tree such as tests/data/sample-maildir.

The mbox writer writes mboxrd: a ``From <sender> <asctime>`` line before each
message, LF line endings, and ``>`` added to every line matching ``^>*From ``.
An mbox carries no flags here.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import functools
import math
import os
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

SIZE_MIXES = ("realistic", "small4k")

# Internal dates are spread evenly over five years from here, so that a
# corpus looks like a mailbox that grew over time.
EPOCH_START = 1_577_836_800          # 2020-01-01T00:00:00Z
EPOCH_SPAN = 5 * 365 * 86400

# Realistic mix (see the module docstring for what these numbers give).
TEXT_MEDIAN = 2500
TEXT_SIGMA = 0.55
ATTACH_SHARE = 0.07
ATTACH_MEDIAN = 12_000
ATTACH_SIGMA = 1.7
# Before base64 (x1.37, so 5.7 MB in the message): a tail of several MB, as
# real stores have, while 20,000 messages stay under 250 MB.
ATTACH_CAP = 4 << 20

CRLF_SHARE = 0.9
# The newest 2 % of a corpus (at least 5 messages) arrived after the owner
# last looked: most of them carry no flag at all.
UNREAD_TAIL_SHARE = 0.8

SYSTEM_FLAG_RATES = (            # (flag, share of messages)
    ("\\Seen", 0.85), ("\\Answered", 0.10), ("\\Flagged", 0.05),
    ("\\Deleted", 0.02), ("\\Draft", 0.005),
)
KEYWORD_RATES = (
    ("$Junk", 0.02), ("$NotJunk", 0.03), ("$Forwarded", 0.02), ("$MDNSent", 0.01),
    ("$label1", 0.03), ("$label2", 0.02), ("$label3", 0.02), ("$label4", 0.01),
    ("$label5", 0.01),
)

# Maildir info letters (https://cr.yp.to/proto/maildir.html), in the ASCII
# order they must appear in a file name.
MAILDIR_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S",
                   "\\Deleted": "T"}
HOST = "mail.example.org"
_ZONES = (0, 60, 120, -300, -420, 330, 540)     # UTC offsets in minutes, for Date and Received
DEFAULT_FOLDERS = ("INBOX", "Sent", "Lists/modsync", "Entwürfe", "Archive/2023", "Trash",
                   "Junk", "Lists/dovecot", "Projekte/Übersicht", "Receipts")
FOLDER_WEIGHTS = (50, 12, 14, 2, 10, 4, 3, 8, 4, 3)

# tests/data/sample-maildir.  The seed is one whose 40 messages show every
# feature listed in the module docstring (tests/test_corpus.py checks that).
SAMPLE = dict(messages=40, folders=("INBOX", "Lists/modsync", "Entwürfe", "Sent"),
              weights=(16, 10, 6, 8), seed=239, size_mix="realistic", max_size=24_000)


class Mail(NamedTuple):
    """One generated message: exact bytes, IMAP flags, internal date (epoch seconds)."""

    body: bytes
    flags: tuple[str, ...]
    internaldate: int


# ---------------------------------------------------------------------------
# Word pools: built once, from a fixed seed, so that every corpus shares them
# and generate() only picks from lists (random.choices runs in C).
# ---------------------------------------------------------------------------

_EN = """the a to of and in is that it for on with as this be are was we have not but at
from by or you they if can will which there all would one their so what about more when
up out some time just been also only new like into than them could other then these two
may first any my now its such our over even most after should where those much through
very well before however since while both each because between during without again
under never same another must still here might three found less large small long later
server mailbox message folder backup replica replication sync index store restore disk
network latency throughput patch release version branch commit test build log error
warning config option user account quota limit cache lock journal snapshot checksum
request response client protocol header body attachment thread reply forward draft
meeting agenda schedule deadline budget report invoice contract review proposal
monday tuesday wednesday thursday friday morning afternoon tomorrow yesterday week
please thanks regards question answer problem solution issue ticket update status""".split()
_DE = """der die das und ist nicht mit für auf dem den ein eine sich von zu im auch es
wir sie ich noch über nach bei aus wie wenn dann schon nur aber oder werden wurde
können müssen würde hätte größer später natürlich Grüße Büro Prüfung Änderung
Übersicht Lösung Schlüssel Größe Straße Fußnote Maß weiß heißt Löschung Frühjahr
Rückmeldung Bestätigung Überweisung Zuständigkeit Geschäftsführung Ausfall Sicherung
Postfach Nachricht Ordner Anhang Termin Besprechung Woche morgen heute gestern bitte
danke Frage Antwort Problem Server Wiederherstellung Datenbank Prüfsumme übermorgen
ähnlich gemäß zunächst außerdem während für über Kündigung Gebühr""".split()
_FR = """le la les de des du et est pas une un pour dans sur avec que qui ce il elle nous
vous ils sont été être avoir fait très aussi mais ou donc car déjà où là à ça ç été
réunion sauvegarde serveur boîte réponse problème répertoire mise à jour sécurité
désolé merci cordialement prochaine semaine demain hier réseau lecture écriture
données fenêtre tâche théâtre naïve noël élève café crème garçon façon reçu
première dernière hôte clé accès échec réussite événement""".split()
_FIRST = ("Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Niaj Olivia Peggy "
          "Rupert Sybil Trent Victor Walter Jürgen Zoë François Søren Ana José Łukasz Chloé "
          "Björn Renée Anaïs Günter Mia Noah Emma Liam Sofia Lukas Hannah Jonas").split()
_LAST = ("Smith Jones Taylor Brown Williams Wilson Johnson Davies Müller Schmidt Schneider "
         "Fischer Weber Meyer Wagner Becker Schäfer Dubois Lefèvre Martin Bernard Moreau "
         "Lambert García López Nørgaard Åberg Kowalski Nowak Rossi Bianchi Okafor Tanaka").split()
_DOMAINS = ("example.org example.com example.net mail.example.de lists.example.org "
            "corp.example.com uni-example.de example.fr shop.example.com bank.example.net").split()
_MTAS = ("Postfix", "Exim 4.96", "Microsoft SMTP Server (version=TLS1_2)", "Dovecot LMTP",
         "OpenSMTPD", "Google Transport Security")
_LISTS = ("modsync-dev", "dovecot", "cyrus-devel", "ops-announce")
_MAILERS = ("Mozilla Thunderbird 115.4.1", "Apple Mail (2.3731.700.6)", "Mutt/2.2.12 (2023-09-09)",
            "Microsoft Outlook 16.0", "Roundcube Webmail/1.6.5", "aerc 0.16.0", "K-9 Mail 6.712")
_SUBJECT_WORDS = _EN[:170]


class _Pools:
    """Text lines per language, ready to be picked: wrapped at 72 columns."""

    def __init__(self):
        r = random.Random(0x6D6F6473)   # fixed: pools are the same for every seed
        self.lines = {"en": self._lines(r, _EN, 4000), "de": self._lines(r, _DE + _EN[:60], 1500),
                      "fr": self._lines(r, _FR + _EN[:40], 1500)}
        # Each pool gets blank lines (paragraph breaks), and the English pool
        # lines that an mbox writer must escape.
        for pool in self.lines.values():
            pool.extend([""] * (len(pool) // 7))
        en = self.lines["en"]
        en.extend("From " + line[:60] for line in r.sample(en[:4000], 12))
        en.extend(">From " + line[:60] for line in r.sample(en[:4000], 4))
        self.avg_len = {k: sum(len(x.encode()) + 1 for x in v) / len(v)
                        for k, v in self.lines.items()}
        self.csv_lines = [f"{r.randrange(10**6)},{r.choice(_LAST)},{r.choice(_EN)},"
                          f"{r.randrange(100000) / 100:.2f},2023-{r.randrange(1, 13):02d}-"
                          f"{r.randrange(1, 29):02d}" for _ in range(2000)]
        self.subjects = [self._subject(r) for _ in range(600)]
        self.people = [self._person(r) for _ in range(400)]

    @staticmethod
    def _lines(r: random.Random, words: list[str], n: int) -> list[str]:
        out, line = [], []
        width = 0
        new_sentence = True
        stream = iter(())
        while len(out) < n:
            w = next(stream, None)
            if w is None:                       # draw words in bulk: choices() runs in C
                stream = iter(r.choices(words, k=4096))
                continue
            if new_sentence:
                w = w[:1].upper() + w[1:]
                new_sentence = False
            roll = r.random()
            if roll < 0.09:                     # a sentence ends: half ".", a quarter each "?" "!"
                w += ".?!."[int(roll * 44.4)]
                new_sentence = True
            elif roll < 0.14:
                w += ","
            if width + len(w) + 1 > 72 and line:
                out.append(" ".join(line))
                line, width = [], 0
            line.append(w)
            width += len(w) + 1
        return out

    @staticmethod
    def _subject(r: random.Random) -> str:
        lang = r.random()
        words = _DE if lang < 0.15 else _FR if lang < 0.22 else _SUBJECT_WORDS
        s = " ".join(r.choice(words) for _ in range(r.randrange(2, 9)))
        return s[:1].upper() + s[1:]

    @staticmethod
    def _person(r: random.Random) -> tuple[str, str]:
        first, last = r.choice(_FIRST), r.choice(_LAST)
        local = (first + "." + last).lower().translate(_ASCII_FOLD)
        return f"{first} {last}", f"{local}@{r.choice(_DOMAINS)}"


# How people with these names spell their mail addresses.
_ASCII_FOLD = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss", "é": "e", "è": "e",
                             "ë": "e", "ï": "i", "ç": "c", "ø": "o", "å": "a", "ł": "l",
                             "ñ": "n", "á": "a", "ó": "o", "í": "i"})


@functools.cache
def _pools() -> _Pools:
    return _Pools()


# ---------------------------------------------------------------------------
# Small encoders
# ---------------------------------------------------------------------------

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(t: int, offset_minutes: int = 0) -> str:
    """``Tue, 14 Nov 2023 10:12:11 +0100`` for epoch t seen from a UTC offset."""
    tm = time.gmtime(t + offset_minutes * 60)
    sign = "+" if offset_minutes >= 0 else "-"
    h, m = divmod(abs(offset_minutes), 60)
    return (f"{_DAYS[tm.tm_wday]}, {tm.tm_mday} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {sign}{h:02d}{m:02d}")


def mutf7(name: str) -> str:
    """IMAP's modified UTF-7 (RFC 3501 §5.1.3): "Entwürfe" -> "Entw&APw-rfe"."""
    out: list[str] = []
    pending: list[str] = []

    def flush():
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _encoded_word(text: str, rng: random.Random) -> str:
    """RFC 2047 for non-ASCII header text (B or Q, UTF-8 or Latin-1), else the text.

    Long text becomes several encoded words on folded lines, as mailers write it.
    """
    if text.isascii():
        return text
    return _encode_words(text, rng.random() < 0.5)


@functools.lru_cache(maxsize=4096)     # names and subjects come from small pools
def _encode_words(text: str, b_encoding: bool) -> str:
    charset = "UTF-8"
    if not b_encoding:
        try:
            text.encode("iso-8859-1")
            charset = "ISO-8859-1"
        except UnicodeEncodeError:
            pass
    words, chunk = [], ""
    for ch in text + "\0":
        if ch == "\0" or len((chunk + ch).encode(charset)) > 40:
            raw = chunk.encode(charset)
            if b_encoding:
                words.append(f"=?{charset}?B?{base64.b64encode(raw).decode()}?=")
            else:
                q = "".join(chr(b) if chr(b).isalnum() and b < 0x80 else "_" if b == 0x20
                            else f"={b:02X}" for b in raw)
                words.append(f"=?{charset}?Q?{q}?=")
            chunk = ""
        if ch != "\0":
            chunk += ch
    return "\n ".join(words)


def _fold(name: str, items: list[str], sep: str) -> str:
    """A header folded before items so that lines stay under 78 columns."""
    lines, cur = [], name + ":"
    for i, item in enumerate(items):
        piece = " " + item + (sep if i < len(items) - 1 else "")
        if len(cur) + len(piece) > 76 and cur != name + ":":
            lines.append(cur)
            cur = "\t" + piece.lstrip()
        else:
            cur += piece
    lines.append(cur)
    return "\n".join(lines)


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data)     # 76-column lines, LF; CRLF is applied later


# ---------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------

class _Writer:
    """Builds one message after another from one random.Random."""

    def __init__(self, seed: int, size_mix: str, max_size: int | None):
        if size_mix not in SIZE_MIXES:
            raise ValueError(f"size_mix {size_mix!r}: use one of {', '.join(SIZE_MIXES)}")
        self.r = random.Random(seed)
        self.p = _pools()
        self.small = size_mix == "small4k"
        self.max_size = max_size
        self.recent_ids: list[str] = []
        self.seq = 0

    # random.choice and randrange cost ~1 µs each in pure Python; these are
    # a third of that and keep a 20,000-message corpus within seconds.
    def pick(self, seq):
        return seq[int(self.r.random() * len(seq))]

    def between(self, lo: int, hi: int) -> int:
        """lo <= n < hi"""
        return lo + int(self.r.random() * (hi - lo))

    # -- sizes --------------------------------------------------------------
    def sizes(self, header_bytes: int) -> tuple[int, int]:
        """(text bytes, attachment bytes before base64) for a message with these headers."""
        r = self.r
        if self.small:
            # Fill a 3.3-4.9 KB message; now and then a tiny attachment (a
            # vCard, a signature) takes part of it.
            total = self.between(3300, 4900)
            att = self.between(300, 900) if r.random() < 0.05 else 0
            return max(total - header_bytes - 250 - att * 4 // 3, 200), att
        text = int(r.lognormvariate(math.log(TEXT_MEDIAN), TEXT_SIGMA))
        att = 0
        if r.random() < ATTACH_SHARE:
            att = min(int(r.lognormvariate(math.log(ATTACH_MEDIAN), ATTACH_SIGMA)), ATTACH_CAP)
        if self.max_size is not None:     # small fixtures: trim, keep the structure
            room = self.max_size - header_bytes - 400
            text = min(text, room)
            att = max(0, min(att, (room - text) * 3 // 4))
        return max(text, 120), att

    # -- pieces -------------------------------------------------------------
    def text(self, lang: str, nbytes: int) -> str:
        p = self.p
        k = max(1, round(nbytes / p.avg_len[lang]))
        return "\n".join(self.r.choices(p.lines[lang], k=k))

    def person(self) -> tuple[str, str]:
        return self.pick(self.p.people)

    def address(self, person: tuple[str, str]) -> str:
        name, addr = person
        if self.r.random() < 0.1:
            return addr
        if self.r.random() < 0.9:
            name = _encoded_word(name, self.r)
        # else a non-ASCII name stays raw UTF-8: RFC 6532, and broken mailers
        return f"{name} <{addr}>"

    def message_id(self, domain: str) -> str:
        self.seq += 1
        return f"<{self.r.getrandbits(64):016x}.{self.seq}@{domain}>"

    def received(self, t: int, rcpt: str, sender_domain: str) -> list[str]:
        """A Received chain, newest hop first; each hop's "from" is the next one's "by"."""
        hops = self.between(2, 6)
        hosts = ([HOST] + [f"relay{self.between(1, 9)}.{self.pick(_DOMAINS)}" for _ in range(hops - 1)]
                 + [f"smtp.{sender_domain}"])
        out = []
        for i in range(hops):
            src = hosts[i + 1]
            ip = (f"203.0.113.{self.between(1, 255)}" if i == hops - 1
                  else f"198.51.100.{self.between(1, 255)}")
            out.append(
                f"Received: from {src} ({src} [{ip}])\n"
                f"\tby {hosts[i]} ({self.pick(_MTAS)}) with ESMTPS id {self.r.getrandbits(40):010X}\n"
                f"\tfor <{rcpt}>; {rfc5322_date(t - i * self.between(0, 4), self.pick(_ZONES))}")
        return out

    def dkim(self, domain: str, t: int) -> str:
        r = self.r
        sig = base64.b64encode(r.randbytes(256)).decode()
        bh = base64.b64encode(r.randbytes(32)).decode()
        head = (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain};\n"
                f"\ts=2023; t={t - self.between(1, 90)}; bh={bh};\n"
                f"\th=From:To:Subject:Date:Message-ID:MIME-Version:Content-Type;\n\tb=")
        return head + "\n\t ".join(sig[i:i + 70] for i in range(0, len(sig), 70))

    # -- bodies -------------------------------------------------------------
    def text_part(self, lang: str, nbytes: int, reply_to: tuple[str, str] | None,
                  t: int) -> tuple[list[str], bytes]:
        """(content headers, encoded body) of a text/plain part."""
        r = self.r
        body = self.text(lang, nbytes * 0.6 if reply_to else nbytes)
        if reply_to is not None:
            quoted = self.text(lang, nbytes * 0.4).split("\n")
            body += (f"\n\nOn {rfc5322_date(t - self.between(3600, 400000))}, {reply_to[0]} "
                     f"wrote:\n" + "\n".join("> " + q if q else ">" for q in quoted))
        if r.random() < 0.6:
            name = self.person()[0]
            body += f"\n\n-- \n{name}\n{self.pick(_DOMAINS)}\n"
        else:
            body += "\n"
        roll = r.random()
        if lang != "en" and roll < 0.2:
            cs, raw = "iso-8859-1", body.encode("iso-8859-1", "replace")
        elif lang != "en" or roll < 0.3:
            cs, raw = "utf-8", body.encode()
        else:
            cs, raw = "us-ascii", body.encode("ascii", "replace")
        cte = r.random()
        ctype = f"Content-Type: text/plain; charset={cs}" + ("; format=flowed" if cte > 0.9 else "")
        if cte < 0.25:
            return [ctype, "Content-Transfer-Encoding: quoted-printable"], binascii.b2a_qp(raw)
        if cte < 0.28:
            return [ctype, "Content-Transfer-Encoding: base64"], _b64(raw)
        return [ctype, "Content-Transfer-Encoding: " + ("7bit" if cs == "us-ascii" else "8bit")], raw

    def html_part(self, lang: str, nbytes: int) -> tuple[list[str], bytes]:
        paras = [p.replace("\n", " ") for p in self.text(lang, nbytes * 0.8).split("\n\n") if p]
        html = ('<html><head><meta http-equiv="Content-Type" content="text/html; charset=utf-8">'
                '</head>\n<body><div style="font-family: Arial, Helvetica, sans-serif; '
                'font-size: 14px;">' + "".join(f"<p>{p}</p>" for p in paras) + "</div></body></html>\n")
        return (["Content-Type: text/html; charset=utf-8",
                 "Content-Transfer-Encoding: quoted-printable"], binascii.b2a_qp(html.encode()))

    def attachment(self, nbytes: int) -> tuple[list[str], bytes]:
        r = self.r
        kind = r.random()
        if kind < 0.25:
            k = max(1, nbytes // 40)
            data = ("id,name,item,amount,date\n" + "\n".join(r.choices(self.p.csv_lines, k=k))
                    + "\n").encode()
            ctype, name = "text/csv; charset=utf-8", "export.csv"
        else:
            # Real attachments are mostly compressed formats: random bytes behind
            # the right magic number stand in for them (incompressible, as they are).
            magic, ctype, name = self.pick((
                (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "application/pdf", "Rechnung-2023.pdf"),
                (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg", "IMG_2041.jpg"),
                (b"PK\x03\x04\x14\x00\x06\x00",
                 "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                 "Präsentation Q3.docx"),
                (b"PK\x03\x04\x14\x00\x00\x00", "application/zip", "logs.zip"),
                (b"\x89PNG\r\n\x1a\n", "image/png", "screenshot.png"),
            ))
            data = magic + r.randbytes(max(nbytes - len(magic), 0))
        if name.isascii():
            disp = f'Content-Disposition: attachment;\n\tfilename="{name}"'
        else:   # RFC 2231 parameter encoding, as Thunderbird writes it
            pct = "".join(c if c.isalnum() and c.isascii() or c in ".-_" else
                          "".join(f"%{b:02X}" for b in c.encode()) for c in name)
            disp = f"Content-Disposition: attachment;\n\tfilename*=UTF-8''{pct}"
        return ([f'Content-Type: {ctype};\n\tname="{name}"' if name.isascii() else
                 f"Content-Type: {ctype}", "Content-Transfer-Encoding: base64", disp], _b64(data))

    def boundary(self) -> str:
        return f"----=_Part_{self.r.getrandbits(48):012x}"

    @staticmethod
    def multipart(subtype: str, boundary: str,
                  parts: list[tuple[list[str], bytes]]) -> tuple[list[str], bytes]:
        chunks = [b"This is a multi-part message in MIME format.\n"]
        for headers, body in parts:
            chunks.append(f"\n--{boundary}\n".encode() + "\n".join(headers).encode() + b"\n\n")
            chunks.append(body if body.endswith(b"\n") else body + b"\n")
        chunks.append(f"\n--{boundary}--\n".encode())
        return [f'Content-Type: multipart/{subtype};\n\tboundary="{boundary}"'], b"".join(chunks)

    # -- flags --------------------------------------------------------------
    def flags(self) -> tuple[str, ...]:
        r = self.r
        out = [f for f, rate in SYSTEM_FLAG_RATES if r.random() < rate]
        out += [k for k, rate in KEYWORD_RATES if r.random() < rate]
        return tuple(out)

    # -- one message --------------------------------------------------------
    def message(self, t: int) -> Mail:
        r = self.r
        roll = r.random()
        lang = "en" if roll < 0.7 else "de" if roll < 0.9 else "fr"
        sender, rcpt = self.person(), self.person()
        domain = sender[1].split("@")[1]
        is_list = r.random() < 0.2
        reply_to = self.person() if r.random() < 0.3 else None
        subject = self.pick(self.p.subjects)
        if is_list:
            subject = f"[{self.pick(_LISTS)}] {subject}"
        if reply_to is not None:
            subject = "Re: " + subject
        date_offset = self.pick(_ZONES)

        h = [f"Return-Path: <{sender[1]}>", f"Delivered-To: {rcpt[1]}"]
        h += self.received(t, rcpt[1], domain)
        if r.random() < 0.5:
            h.append(self.dkim(domain, t))
            h.append(f"Authentication-Results: {HOST};\n\tdkim=pass header.d={domain};\n"
                     f"\tspf=pass smtp.mailfrom={sender[1]}")
        h.append("From: " + self.address(sender))
        if r.random() < 0.01:
            # Unfolded and over 998 octets: broken, but found in real stores.
            h.append("To: " + ", ".join(self.address(self.person()) for _ in range(40)))
        else:
            h.append("To: " + self.address(rcpt))
            if r.random() < 0.2:
                h.append(_fold("Cc", [self.address(self.person()) for _ in range(self.between(1, 6))], ","))
        h.append("Subject: " + _encoded_word(subject, r))
        h.append("Date: " + rfc5322_date(t - self.between(1, 90), date_offset))
        mid = self.message_id(domain)
        h.append("Message-ID: " + mid)
        if reply_to is not None and self.recent_ids:
            refs = self.recent_ids[-self.between(1, min(len(self.recent_ids), 25) + 1):]
            h.append("In-Reply-To: " + refs[-1])
            h.append(_fold("References", refs, ""))
        self.recent_ids.append(mid)
        del self.recent_ids[:-50]
        if is_list:
            name = self.pick(_LISTS)
            h += [f"List-Id: {name} <{name}.lists.example.org>",
                  f"List-Unsubscribe: <mailto:{name}-request@lists.example.org?subject=unsubscribe>",
                  f"List-Post: <mailto:{name}@lists.example.org>", "Precedence: list"]
        h.append(("User-Agent: " if r.random() < 0.5 else "X-Mailer: ") + self.pick(_MAILERS))
        h.append("MIME-Version: 1.0")

        head = "\n".join(h).encode()
        text_size, att_size = self.sizes(len(head))
        roll = r.random()
        if att_size:
            parts = [self.text_part(lang, text_size, reply_to, t), self.attachment(att_size)]
            if att_size > 40_000 and r.random() < 0.2:
                parts.append(self.attachment(att_size // 4))
            ctype, body = self.multipart("mixed", self.boundary(), parts)
        elif roll < 0.3:
            ctype, body = self.multipart("alternative", self.boundary(), [
                self.text_part(lang, text_size * 0.45, reply_to, t),
                self.html_part(lang, text_size * 0.55)])
        else:
            ctype, body = self.text_part(lang, text_size, reply_to, t)
        raw = head + b"\n" + "\n".join(ctype).encode() + b"\n\n" + body
        if r.random() < CRLF_SHARE:
            raw = raw.replace(b"\n", b"\r\n")
        return Mail(raw, self.flags(), t)


def generate(n: int, seed: int = 0, *, size_mix: str = "realistic",
             max_size: int | None = None) -> Iterator[Mail]:
    """Yield n messages ``Mail(body, flags, internaldate)``, oldest first.

    Same (n, seed, size_mix, max_size) -> same bytes.  ``max_size`` caps the
    realistic mix (roughly: headers are not counted exactly), for small fixtures.
    """
    w = _Writer(seed, size_mix, max_size)
    if n <= 0:
        return
    step = EPOCH_SPAN / n
    unread_from = n - max(5, n // 50)
    for i in range(n):
        # Evenly spread with jitter, so dates only go up: arrival order.
        t = EPOCH_START + int(i * step + w.r.random() * step * 0.9)
        mail = w.message(t)
        if i >= unread_from and w.r.random() < UNREAD_TAIL_SHARE:
            mail = mail._replace(flags=())
        yield mail


# ---------------------------------------------------------------------------
# Maildir
# ---------------------------------------------------------------------------

def maildir_dirname(folder: str) -> str:
    """The Maildir++ directory of an IMAP folder name ("" for INBOX)."""
    if folder == "INBOX":
        return ""
    return "." + ".".join(mutf7(part) for part in folder.split("/"))


def maildir_info(flags: Iterable[str], keyword_letter) -> str:
    """The ``2,`` info letters: system flags in ASCII order, then keyword letters."""
    system = sorted(MAILDIR_LETTERS[f] for f in flags if f in MAILDIR_LETTERS)
    kws = sorted(keyword_letter(f) for f in flags if not f.startswith("\\"))
    return "".join(system) + "".join(kws)


class _Folder:
    """One folder being written: its directory, keyword letters and UIDs so far."""

    def __init__(self, name: str, path: Path, uidvalidity: int, guid: str):
        self.name, self.path = name, path
        self.uidvalidity, self.guid = uidvalidity, guid
        self.keywords: list[str] = []
        self.uids: list[str] = []          # base names in arrival order

    def letter(self, keyword: str) -> str:
        if keyword not in self.keywords:
            if len(self.keywords) == 26:   # Dovecot's limit too: a..z
                raise ValueError(f"{self.name}: more than 26 keywords")
            self.keywords.append(keyword)
        return chr(ord("a") + self.keywords.index(keyword))


def write_maildir(out: str | os.PathLike, mails: Iterable[Mail], folders=DEFAULT_FOLDERS[:4],
                  *, seed: int = 0, weights=None) -> dict:
    """Write mails into a Maildir++ tree at out (created; must not hold mail yet).

    Messages go to folders by weight (INBOX gets the most), in arrival order.
    Returns {"messages": n, "bytes": total, "folders": {name: count}}.
    """
    root = Path(out)
    folders = list(folders)
    if "INBOX" not in folders:
        folders.insert(0, "INBOX")
    if weights is None:
        table = dict(zip(DEFAULT_FOLDERS, FOLDER_WEIGHTS))
        weights = [table.get(f, 5) for f in folders]
    r = random.Random(seed ^ 0x4D41494C)
    state = {}
    for i, name in enumerate(folders):
        path = root / maildir_dirname(name)
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        if name != "INBOX":
            (path / "maildirfolder").touch()
        state[name] = _Folder(name, path, EPOCH_START + i, f"{r.getrandbits(128):032x}")

    mails = list(mails)
    placed = [(m, r.choices(folders, weights)[0]) for m in mails]
    # The newest INBOX messages that carry no flag were delivered but never
    # seen by a client: they stay in new/ (no info suffix), as Dovecot's LDA
    # leaves them.  (Knowing which are the newest is why mails become a list.)
    inbox_idx = [i for i, (_, f) in enumerate(placed) if f == "INBOX"]
    fresh = {i for i in inbox_idx[-max(3, len(inbox_idx) // 50):] if not placed[i][0].flags}

    names_used = set()
    total = 0
    for i, (m, fname) in enumerate(placed):
        f = state[fname]
        size = len(m.body)
        base = f"{m.internaldate}.M{r.randrange(1_000_000)}P{r.randrange(1000, 65000)}.{HOST},S={size}"
        while base in names_used:   # same second, same pid: a real MDA would retry too
            base = base.replace(".M", ".M1", 1)
        names_used.add(base)
        if b"\r\n" not in m.body:
            vsize = size + m.body.count(b"\n")   # the size with CRLF line endings
            base += f",W={vsize}"
        if i in fresh:
            path = f.path / "new" / base
        else:
            path = f.path / "cur" / f"{base}:2,{maildir_info(m.flags, f.letter)}"
        path.write_bytes(m.body)
        os.utime(path, (m.internaldate, m.internaldate))
        f.uids.append(base)
        total += size

    for f in state.values():
        if f.keywords:
            (f.path / "dovecot-keywords").write_text(
                "".join(f"{i} {k}\n" for i, k in enumerate(f.keywords)))
        (f.path / "dovecot-uidlist").write_text(
            f"3 V{f.uidvalidity} N{len(f.uids) + 1} G{f.guid}\n"
            + "".join(f"{uid} :{base}\n" for uid, base in enumerate(f.uids, 1)))
    (root / "subscriptions").write_text(
        "V\t2\n\n" + "".join("\t".join(mutf7(p) for p in name.split("/")) + "\n" for name in folders))
    return {"messages": len(mails), "bytes": total,
            "folders": {name: len(f.uids) for name, f in state.items()}}


_MAILDIR_TIME = re.compile(r"^(\d+)\.")


def restore_checkout(root: str | os.PathLike) -> int:
    """Put back what git drops from a generated Maildir: empty cur/new/tmp, and mtimes.

    Every folder gets its three directories again, and each message file the
    mtime (= internal date) that its name starts with.  Returns the number of
    message files touched.
    """
    root = Path(root)
    n = 0
    for folder in [root] + [p for p in root.iterdir() if p.name.startswith(".") and p.is_dir()]:
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(exist_ok=True)
        for sub in ("cur", "new"):
            for path in (folder / sub).iterdir():
                m = _MAILDIR_TIME.match(path.name)
                if m and path.is_file():
                    t = int(m.group(1))
                    os.utime(path, (t, t))
                    n += 1
    return n


# ---------------------------------------------------------------------------
# mbox (mboxrd)
# ---------------------------------------------------------------------------

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_RETURN_PATH = re.compile(rb"^Return-Path: <([^>\r\n]*)>", re.MULTILINE)


def mbox_entry(mail: Mail) -> bytes:
    """One message as an mboxrd entry: From_ line, escaped LF body, blank line."""
    body = mail.body.replace(b"\r\n", b"\n")
    m = _RETURN_PATH.search(body)
    sender = m.group(1).decode() if m and m.group(1) else "MAILER-DAEMON"
    tm = time.gmtime(mail.internaldate)
    # asctime(3) form, day padded with a space ("Nov  4"); names not from the locale
    when = (f"{_DAYS[tm.tm_wday]} {_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {tm.tm_year}")
    body = _FROM_LINE.sub(rb">\1", body)
    if not body.endswith(b"\n"):
        body += b"\n"
    return f"From {sender} {when}\n".encode() + body + b"\n"


def write_mbox(out: str | os.PathLike, mails: Iterable[Mail]) -> dict:
    """Write mails to one mboxrd file.  Returns {"messages": n, "bytes": file size}."""
    n = 0
    with open(out, "wb") as fh:
        for mail in mails:
            fh.write(mbox_entry(mail))
            n += 1
        size = fh.tell()
    return {"messages": n, "bytes": size}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/corpus.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    md = sub.add_parser("maildir", help="write a Maildir++ tree (Dovecot layout)")
    md.add_argument("out", type=Path)
    md.add_argument("--messages", type=int, default=1000)
    md.add_argument("--folders", type=int, default=4,
                    help=f"how many of {', '.join(DEFAULT_FOLDERS)} (INBOX always)")
    md.add_argument("--sample", action="store_true",
                    help="the small fixture in tests/data/sample-maildir (fixed messages, "
                         "folders and seed; other options ignored)")
    rs = sub.add_parser("restore", help="put back the empty directories and mtimes that git "
                                        "drops from a generated Maildir")
    rs.add_argument("out", type=Path)
    mb = sub.add_parser("mbox", help="write one mboxrd file")
    mb.add_argument("out", type=Path)
    mb.add_argument("--messages", type=int, default=1000)
    for p in (md, mb):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size-mix", choices=SIZE_MIXES, default="realistic")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    if args.command == "restore":
        n = restore_checkout(args.out)
        print(f"{args.out}: {n} message files have their internal dates as mtimes again")
    elif args.command == "maildir":
        if args.out.exists() and any(args.out.iterdir()):
            print(f"{args.out} is not empty; give a new directory", file=sys.stderr)
            return 2
        if args.sample:
            s = SAMPLE
            mails = generate(s["messages"], s["seed"], size_mix=s["size_mix"],
                             max_size=s["max_size"])
            stats = write_maildir(args.out, mails, s["folders"], seed=s["seed"],
                                  weights=s["weights"])
        else:
            if not 1 <= args.folders <= len(DEFAULT_FOLDERS):
                print(f"--folders must be 1..{len(DEFAULT_FOLDERS)}", file=sys.stderr)
                return 2
            mails = generate(args.messages, args.seed, size_mix=args.size_mix)
            stats = write_maildir(args.out, mails, DEFAULT_FOLDERS[:args.folders], seed=args.seed)
        per = ", ".join(f"{k} {v}" for k, v in stats["folders"].items())
        print(f"{args.out}: {stats['messages']} messages, {stats['bytes'] / 1e6:.1f} MB "
              f"({per}) in {time.perf_counter() - t0:.1f} s")
    else:
        stats = write_mbox(args.out, generate(args.messages, args.seed, size_mix=args.size_mix))
        print(f"{args.out}: {stats['messages']} messages, {stats['bytes'] / 1e6:.1f} MB "
              f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
