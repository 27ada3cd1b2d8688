"""engine/model.py: flag normalisation, encodings that round-trip, digests of what users see."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import UsageError
from engine.model import (
    KIND_CLASSES,
    SYSTEM_FLAGS,
    AclEntry,
    Annotation,
    Mailbox,
    QuotaRoot,
    Record,
    SeenSet,
    SieveScript,
    Stamp,
    Subscription,
    normalize_flags,
    stamp_of,
    validate_flags,
)

# --- flags ---------------------------------------------------------------------------------

def test_system_flags_canonical_spelling_and_order():
    assert normalize_flags(["\\draft", "\\SEEN", "\\Answered", "\\flagged", "\\DELETED"]) == \
        SYSTEM_FLAGS


def test_keywords_sorted_caseless_first_spelling_kept():
    assert normalize_flags(["Zed", "$Junk", "$JUNK", "alpha", "$junk"]) == ("$Junk", "alpha", "Zed")


def test_recent_unknown_system_flags_and_empty_are_dropped():
    assert normalize_flags(["\\Recent", "\\Whatever", "", "\\Seen"]) == ("\\Seen",)


flag = st.one_of(st.sampled_from(["\\Seen", "\\seen", "\\Recent", "\\X", "", "$Junk", "$junk"]),
                 st.text(alphabet="abcXYZ$\\", max_size=5))


@given(st.lists(flag, max_size=8))
def test_normalize_flags_properties(flags):
    out = normalize_flags(flags)
    assert normalize_flags(out) == out                                   # idempotent
    system_lower = {f.lower(): f for f in SYSTEM_FLAGS}
    storable = {f.lower() for f in flags
                if f and (not f.startswith("\\") or f.lower() in system_lower)}
    assert {f.lower() for f in out} == storable and len(out) == len(storable)
    system = [f for f in out if f.startswith("\\")]
    keywords = out[len(system):]
    assert system == [f for f in SYSTEM_FLAGS if f in system]          # canonical spelling, order
    assert not any(k.startswith("\\") for k in keywords)
    assert [k.lower() for k in keywords] == sorted(k.lower() for k in keywords)
    for k in keywords:                                                   # first spelling kept
        assert k == next(f for f in flags if f.lower() == k.lower())


@pytest.mark.parametrize("flags", [["\\Recent"], ["\\Whatever"], [""], ["with space"],
                                   ["a(b"], ["a]"], ['"q"'], ["x*"], ["%"], ["Ünï"], ["a\x01"],
                                   ["\\Seen", "\\Recent"]])
def test_validate_flags_refuses_what_imap_cannot_carry(flags):
    with pytest.raises(ValueError):
        validate_flags(flags)


def test_validate_flags_accepts_and_normalises():
    assert validate_flags(["$Junk", "\\seen", "$junk", "NonJunk", "a.b-c_d+e"]) == \
        ("\\Seen", "$Junk", "a.b-c_d+e", "NonJunk")


def test_local_mutations_refuse_bad_flags(store):
    store.create_mailbox("u", "INBOX")
    store.append("u", "INBOX", b"x")
    m = store.user_info("u").modseq
    with pytest.raises(UsageError):
        store.append("u", "INBOX", b"y", flags=["\\Recent"])
    with pytest.raises(UsageError):
        store.set_flags("u", "INBOX", None, ["bad flag"])
    assert store.user_info("u").modseq == m


# --- encodings -------------------------------------------------------------------------------

stamps = st.builds(Stamp, st.integers(0, 2**63 - 1), st.integers(0, 2**32 - 1),
                   st.integers(0, 2**63 - 1), st.booleans())
text = st.text(max_size=12).filter(lambda s: "\0" not in s)
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)

OBJECTS = st.one_of(
    st.builds(Mailbox, id=text, name=text, uidvalidity=u32, uidnext=u32, highestmodseq=u64,
              createdmodseq=u64, foldermodseq=u64, specialuse=st.lists(text).map(tuple),
              quotaroot=st.one_of(st.none(), text), messages=u32, size=u64, crc=u64,
              cyrus_crc=u32, cyrus_crc_annot=u32, stamp=stamps, num=u64),
    st.builds(Record, uid=u32, address=st.binary(min_size=32, max_size=32),
              sha1=st.binary(min_size=20, max_size=20), size=u64, internaldate=u32,
              savedate=u32, flags=st.lists(text).map(tuple), createdmodseq=u64,
              last_updated=u32,
              annotations=st.lists(st.tuples(text, text, st.binary(max_size=8))).map(tuple),
              stamp=stamps, mailbox=u64, created=st.lists(u32, min_size=2, max_size=2),
              flag_stamps=st.dictionaries(text, st.lists(u32, min_size=2, max_size=2))),
    st.builds(Subscription, name=text, stamp=stamps),
    st.builds(SeenSet, mailbox_id=text, uids=text, lastread=u32, lastuid=u32, lastchange=u32,
              stamp=stamps),
    st.builds(SieveScript, name=text, address=st.binary(max_size=32), size=u32,
              active=st.booleans(), last_update=u32, stamp=stamps),
    st.builds(Annotation, mailbox=u64, entry=text, userid=text, value=st.binary(max_size=10),
              stamp=stamps),
    st.builds(AclEntry, mailbox=u64, identifier=text, rights=text, stamp=stamps),
    st.builds(QuotaRoot, root=text, limits=st.dictionaries(st.sampled_from(["STORAGE", "MESSAGE"]),
                                                           u32), stamp=stamps),
)


@settings(max_examples=150)
@given(OBJECTS)
def test_every_kind_round_trips(obj):
    cls = KIND_CLASSES[obj.KIND]
    back = cls.unpack(obj.key(), obj.pack())
    assert back == obj
    assert back.key() == obj.key()
    assert stamp_of(obj.pack()) == obj.stamp


def _digest(obj):
    if obj.KIND in (b"R", b"N", b"A"):
        return obj.visible_digest("mailbox-unique-id")
    return obj.visible_digest()


@settings(max_examples=100)
@given(OBJECTS, stamps)
def test_digest_ignores_stamps(obj, stamp):
    other = dataclasses.replace(obj, stamp=stamp)
    assert _digest(other) == _digest(obj)


def test_digest_ignores_local_numbers_and_counters():
    mb = Mailbox("id1", "INBOX", 7, uidnext=3, num=1)
    other = dataclasses.replace(mb, num=99, messages=5, size=10, crc=1, cyrus_crc=2,
                                cyrus_crc_annot=3, highestmodseq=77, createdmodseq=4,
                                foldermodseq=6)
    assert other.visible_digest() == mb.visible_digest()
    rec = Record(1, b"a" * 32, b"s" * 20, 10, 5, flags=("\\Seen", "$Junk"), mailbox=1)
    moved = dataclasses.replace(rec, mailbox=2, savedate=9, last_updated=8, createdmodseq=3,
                                flags=("\\seen", "$JUNK"))
    assert moved.visible_digest("id1") == rec.visible_digest("id1")


@pytest.mark.parametrize("change", [
    {"uid": 2}, {"address": b"b" * 32}, {"internaldate": 6}, {"flags": ("\\Seen",)},
    {"annotations": (("/comment", "", b"x"),)},
])
def test_record_digest_sees_visible_fields(change):
    rec = Record(1, b"a" * 32, b"s" * 20, 10, 5, flags=("\\Seen", "$Junk"))
    assert dataclasses.replace(rec, **change).visible_digest("id") != rec.visible_digest("id")
    assert rec.visible_digest("id") != rec.visible_digest("other-id")


@pytest.mark.parametrize("change", [
    {"id": "id2"}, {"name": "Other"}, {"uidvalidity": 8}, {"uidnext": 4},
    {"specialuse": ("\\Sent",)},
])
def test_mailbox_digest_sees_visible_fields(change):
    mb = Mailbox("id1", "INBOX", 7, uidnext=3)
    assert dataclasses.replace(mb, **change).visible_digest() != mb.visible_digest()


def test_digests_of_different_kinds_never_coincide():
    """The kind is part of the digest: a subscription and a quota root of the same name differ."""
    assert Subscription("x").visible_digest() != QuotaRoot("x").visible_digest()
    assert SieveScript("x").visible_digest() != Subscription("x").visible_digest()
