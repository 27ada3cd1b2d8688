"""engine.csync.view and state: RECORD decoding and the CRC shares kept beside each record.

``parse_record`` reads a RECORD printed the way Cyrus prints it straight off
its node; everything else goes through Cyrus's general rules.  Both must
give the same record, or the same refusal, for every input.
"""
from __future__ import annotations

import base64

import pytest

from dlist import KvList, Line, List, Parser
from engine.accounts import add_account
from engine.csync import state, view
from engine.csync.replica import ReplicaSession

from test_replica_transcripts import _mailbox, _record, _upload, apply, status

GUID = "240e488f2bf7a13f995ecf1055eeee8b302fa1ab"
VIRTUAL = ('ANNOTATIONS (%(ENTRY /vendor/cmu/cyrus-imapd/savedate USERID "" MODSEQ 0 '
           'VALUE 1795284413) %(ENTRY /vendor/cmu/cyrus-imapd/createdmodseq USERID "" '
           'MODSEQ 0 VALUE 103))')


def _rec(uid="102", modseq="20806", flags="(\\Flagged \\Seen)", guid=GUID, tail=VIRTUAL,
         head="UID {uid} MODSEQ {modseq} LAST_UPDATED 1795284664 FLAGS {flags} "
              "INTERNALDATE 1795284413 SIZE 4399 GUID {guid}") -> str:
    text = head.format(uid=uid, modseq=modseq, flags=flags, guid=guid)
    return "%(" + text + (" " + tail if tail else "") + ")"


CASES = {
    "canonical": _rec(),
    "no annotations": _rec(tail=""),
    "no flags": _rec(flags="()"),
    "keyword and expunged": _rec(flags="(\\Seen $Forwarded \\Expunged)"),
    "unknown system flag": _rec(flags="(\\Recent \\Seen)"),
    "flags in odd case": _rec(flags="(\\SEEN \\flagged $Label1 $label1)"),
    "quoted keyword": _rec(flags='(\\Seen "$Junk")'),
    "NIL flag": _rec(flags="(\\Seen NIL)"),
    "thread id": _rec(tail='ANNOTATIONS (%(ENTRY /vendor/cmu/cyrus-imapd/thrid USERID "" '
                           'MODSEQ 0 VALUE 00000000000abcde))'),
    "user annotation": _rec(tail='ANNOTATIONS (%(ENTRY /comment USERID test MODSEQ 7 '
                                 'VALUE "a note") %(ENTRY /vendor/cmu/cyrus-imapd/savedate '
                                 'USERID "" MODSEQ 0 VALUE 1795284413))'),
    "quoted number": _rec(uid='"102"'),
    "upper-case GUID": _rec(guid=GUID.upper()),
    "largest modseq": _rec(modseq="18446744073709551615"),
    "modseq past 64 bits": _rec(modseq="18446744073709551616"),
    "bad GUID": _rec(guid="x" * 40),
    "short GUID": _rec(guid=GUID[:38]),
    "bad savedate": _rec(tail='ANNOTATIONS (%(ENTRY /vendor/cmu/cyrus-imapd/savedate USERID "" '
                              'MODSEQ 0 VALUE 17x))'),
    "bad annotation modseq": _rec(tail='ANNOTATIONS (%(ENTRY /vendor/cmu/cyrus-imapd/savedate '
                                       'USERID "" MODSEQ x VALUE 1))'),
    "keys in another order": "%(MODSEQ 20806 UID 102 LAST_UPDATED 1795284664 FLAGS () "
                             f"INTERNALDATE 1795284413 SIZE 4399 GUID {GUID})",
    "missing GUID": "%(UID 102 MODSEQ 20806 LAST_UPDATED 1795284664 FLAGS () "
                    "INTERNALDATE 1795284413 SIZE 4399)",
    "duplicate key": _rec(tail="UID 7"),
}


def _node(text: str):
    p = Parser()
    p.feed(b"APPLY MAILBOX %(RECORD (" + text.encode() + b"))\r\n")
    return p.next_line().value.get_list("RECORD").node[1]


def _outcome(node):
    try:
        return view.parse_record(node)
    except view.BadRecord:
        return "BadRecord"


@pytest.mark.parametrize("name", CASES)
def test_the_fast_path_reads_records_as_the_general_rules_do(name, monkeypatch):
    node = _node(CASES[name])
    fast = _outcome(node)
    monkeypatch.setattr(view, "_canonical_record", lambda node: None)
    assert fast == _outcome(node)


def test_the_fast_path_takes_what_cyrus_prints(monkeypatch):
    calls = []
    real = view._canonical_record
    monkeypatch.setattr(view, "_canonical_record", lambda n: calls.append(n) or real(n))
    rec = view.parse_record(_node(CASES["canonical"]))
    assert calls and real(calls[0]) == rec
    assert (rec.uid, rec.flags, rec.savedate, rec.createdmodseq) == (
        102, ("\\Flagged", "\\Seen"), 1795284413, 103)


def test_crc_shares_are_kept_beside_the_record(store):
    state.ensure_table(store)
    rec = view.parse_record(_node(CASES["canonical"]))
    old_style = view.parse_record(_node(_rec(uid="103")))

    def fn(txn):
        state.put_record(txn, "u1", rec, rec.crcs())
        state.put_record(txn, "u1", old_style)        # written without them
    store.db.write(fn)
    with store.db.read() as txn:
        stored = state.MailboxRecords(txn, "u1")
        fields = stored.fields(102)
        assert fields[:state.F_CRCS] == rec.fields()
        assert stored.crcs(102, fields) == rec.crcs() != (0, 0)
        fields = stored.fields(103)
        assert len(fields) == state.F_CRCS and stored.crcs(103, fields) == old_style.crcs()
        assert stored.fields(104) is None
        assert state.get_record(txn, "u1", 102) == rec
        assert state.get_record(txn, "u1", 103) == old_style


def test_a_full_update_rewrites_only_what_changed(store):
    """A master that resends every record (no SINCE_*) changes only the records that differ."""
    add_account(store, "repl", "replpw", admin=True)
    s = ReplicaSession(store, "replica.test")
    s.handle(Line("AUTHENTICATE", text=b"PLAIN " + base64.b64encode(b"\0repl\0replpw")))
    guids = [_upload(s, b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(1, 6)]
    first = [_record(i, i + 1, g) for i, g in enumerate(guids, 1)]
    assert status(apply(s, "MAILBOX", _mailbox(first, LAST_UID=5, HIGHESTMODSEQ=6))) == \
        "OK success"
    before = {r.uid: r.stamp.modseq for r in store.records("t", "INBOX")}
    crcs = _crcs(store)
    again = [_record(i, i + 1, g) for i, g in enumerate(guids, 1)]
    again[2] = _record(3, 7, guids[2], flags=["\\Seen"])
    assert status(apply(s, "MAILBOX", _mailbox(again, LAST_UID=5, HIGHESTMODSEQ=7))) == \
        "OK success"
    after = {r.uid: r.stamp.modseq for r in store.records("t", "INBOX")}
    assert [uid for uid in before if after[uid] != before[uid]] == [3]
    assert _crcs(store) != crcs
    with store.db.read() as txn:
        hdr = state.mailbox_by_name(txn, "user.t")
        assert (hdr.crc_basic, hdr.crc_annot) == state.recompute_crcs(
            state.records(txn, hdr.uniqueid))
    s.close()


def _crcs(store):
    with store.db.read() as txn:
        hdr = state.mailbox_by_name(txn, "user.t")
        return hdr.crc_basic, hdr.crc_annot


def test_records_of_a_full_update_in_the_wrong_order_are_still_refused(store):
    add_account(store, "repl", "replpw", admin=True)
    s = ReplicaSession(store, "replica.test")
    s.handle(Line("AUTHENTICATE", text=b"PLAIN " + base64.b64encode(b"\0repl\0replpw")))
    g = [_upload(s, b"Subject: %d\r\n\r\nx\r\n" % i) for i in (1, 2)]
    recs = [_record(1, 2, g[0]), _record(2, 3, g[1])]
    assert status(apply(s, "MAILBOX", _mailbox(recs, LAST_UID=2, HIGHESTMODSEQ=3))) == \
        "OK success"
    assert status(apply(s, "MAILBOX", _mailbox(recs[::-1], LAST_UID=2, HIGHESTMODSEQ=3))) == \
        "NO IMAP_PROTOCOL_ERROR Protocol error"
    s.close()


def test_a_mailbox_value_with_many_records_round_trips(store):
    """The KvList helpers build what Cyrus prints; the fast path must see it as canonical."""
    kl = KvList(RECORD=List([_record(1, 2, GUID, flags=["\\Seen"])]))
    node = kl.get_list("RECORD").node[1]
    assert view._canonical_record(node) == view.parse_record(node)
