"""engine.protocol and engine.wire: the state machine with no I/O, fed bytes by hand."""
from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlist.binary import decode_line, encode_line
from dlist.model import LITERAL, Line
from dlist.printer import print_line
from engine import Message, Store
from engine import protocol as P
from engine.changeset import ChangeSet, build
from engine.wire import BodySpool, Incoming, WireError, from_node, to_node


def pair(client_versions=P.PROTOCOL_VERSIONS, server_versions=P.PROTOCOL_VERSIONS, **kw):
    return (P.Connection("client", versions=client_versions, **kw),
            P.Connection("server", versions=server_versions, **kw))


def feed(conn, data: bytes, *, one_byte: bool = False) -> list:
    if not one_byte:
        return conn.receive_data(data)
    out = []
    for i in range(len(data)):
        out += conn.receive_data(data[i:i + 1])
    return out


def login(c, s):
    hello = feed(s, c.send(P.Hello(c.versions)))[0]
    v = s.choose_version(hello)
    assert feed(c, s.send(P.Welcome(v, s.versions)))[0].version == v
    assert feed(s, c.send(P.Auth("admin", "pw"))) == [P.Auth("admin", "pw")]
    assert isinstance(feed(c, s.send(P.Ok("welcome", "admin", True)))[0], P.Ok)
    assert c.phase == s.phase == P.READY


def ready_server(version: int = P.PROTOCOL_VERSIONS[-1], **kw):
    versions = tuple(v for v in P.PROTOCOL_VERSIONS if v <= version)
    c, s = P.Connection("client", versions=versions), P.Connection("server", **kw)
    login(c, s)
    return c, s


def sender(version: int = P.PROTOCOL_VERSIONS[-1]) -> P.Connection:
    c = P.Connection("client")
    c.phase, c.version = P.READY, version
    return c


def frames_of(store, cs, *, version: int = P.PROTOCOL_VERSIONS[-1], **kw) -> list[bytes]:
    c = sender(version)
    if version >= P.PACKED_VERSION:
        kw.setdefault("read_packed", store.read_packed)
    return [c.send(e) for e in P.changeset_events(cs, store.read_body, **kw)]


def collect(events):
    inc = got = None
    for ev in events:
        if isinstance(ev, P.ChangeSetStart):
            inc = Incoming(ev.changeset, ev.n_items, BodySpool(memory=50))
        elif isinstance(ev, P.Items):
            inc.add_items(ev.items)
        elif isinstance(ev, P.Bodies):
            for a, d in ev.bodies:
                inc.whole_body(a, d)
        elif isinstance(ev, P.PackedBodies):
            inc.packed_bodies(ev.bodies)
        elif isinstance(ev, P.Body):
            inc.body(ev.address, ev.offset, ev.size, ev.data)
        elif isinstance(ev, P.ChangeSetEnd):
            got = inc.finish()
    return got


@pytest.fixture
def mail(tmp_path):
    s = Store.init(tmp_path / "s")
    s.create_mailbox("alice", "INBOX")
    s.create_mailbox("alice", 'Entwürfe "quoted" \\ odd')
    s.append_many("alice", "INBOX", [Message(b"m%d" % i * (i * 50 + 1), ("\\Seen", "$Junk"))
                                     for i in range(12)])
    s.append("alice", "INBOX", b"")
    s.set_annotation("alice", "INBOX", "/comment", b"a\x00b\r\n")
    s.subscribe("alice", "INBOX")
    s.sieve_put("alice", "main", b"keep;\r\n")
    yield s
    s.close()


def test_handshake_negotiates_the_highest_common_version():
    c, s = pair()
    hello = feed(s, c.send(P.Hello()))[0]
    assert hello.versions == (1, 2, 3) and s.choose_version(hello) == 3
    c1, s1 = pair(client_versions=(1,))
    login(c1, s1)                 # an older peer is served at its version
    assert c1.version == s1.version == 1


def test_unknown_versions_are_refused_naming_the_supported_ones():
    c, s = pair(client_versions=(7, 8))
    hello = feed(s, c.send(P.Hello((7, 8))))[0]
    assert s.choose_version(hello) is None
    bye = s.refusal(hello)
    assert "1, 2, 3" in bye.text and "7, 8" in bye.text
    assert feed(c, s.send(bye)) == [bye] and c.closed and s.closed


def test_a_client_refuses_a_version_it_did_not_offer():
    c, s = pair(client_versions=(1,))
    feed(s, c.send(P.Hello((1,))))
    with pytest.raises(P.ProtocolError) as e:
        feed(c, s.send(P.Welcome(2)))
    assert e.value.code == "version"


def test_version_2_messages_are_refused_on_a_version_1_connection():
    c, s = pair(client_versions=(1,))
    login(c, s)
    with pytest.raises(P.ProtocolError, match="needs protocol version 2"):
        c.send(P.Follow())
    c2, s2 = ready_server()
    frame = c2.send(P.Follow())     # a version-2 client's frame, sent to a version-1 server
    with pytest.raises(P.ProtocolError, match="needs protocol version 2") as e:
        s.receive_data(frame)
    assert e.value.offset is not None


def test_messages_out_of_phase():
    c2, s2 = ready_server()
    push = c2.send(P.Push("alice"))
    c, s = pair()
    with pytest.raises(P.ProtocolError, match="out of place"):
        s.receive_data(push)          # a command before HELLO
    c, s = pair()
    feed(s, c.send(P.Hello()))
    feed(c, s.send(P.Welcome(2)))
    with pytest.raises(P.ProtocolError, match="out of place"):
        s.receive_data(push)          # a command before AUTH
    with pytest.raises(P.ProtocolError):
        c.send(P.Push("alice"))       # and we would not send one


def test_byte_at_a_time_gives_the_same_events(mail):
    cs = build(mail, "alice", {})
    c, s = ready_server()
    data = c.send(P.Push("alice")) + b"".join(
        c.send(e) for e in P.changeset_events(cs, mail.read_body, chunk=7))
    _, whole = ready_server()
    a = whole.receive_data(data)
    assert a == feed(s, data, one_byte=True)
    assert isinstance(a[1], P.ChangeSetStart) and isinstance(a[-1], P.ChangeSetEnd)
    assert any(isinstance(e, P.Body) for e in a)


@pytest.mark.parametrize("version", P.PROTOCOL_VERSIONS)
def test_change_set_round_trip(mail, version):
    cs = build(mail, "alice", {})
    for chunk in (100, P.BODY_CHUNK):
        c, s = ready_server(version)
        assert s.version == version
        events = s.receive_data(b"".join(frames_of(mail, cs, chunk=chunk, version=version)))
        assert any(isinstance(e, P.PackedBodies) for e in events) == (version >= 3)
        got, spool = collect(events)
        assert got.encode() == cs.encode()
        assert {a: spool.get(a) for a in cs.bodies} == {a: mail.read_body(a) for a in cs.bodies}
        spool.close()


def test_version_3_items_and_stored_bodies(mail):
    cs = build(mail, "alice", {})
    _, v2 = ready_server(2)
    _, v3 = ready_server(3)
    frames2, frames3 = frames_of(mail, cs, version=2), frames_of(mail, cs, version=3)
    # Each form belongs to its version, in both directions.
    with pytest.raises(P.ProtocolError, match="must be a literal"):
        v3.receive_data(b"".join(frames2[:2]))
    with pytest.raises(P.ProtocolError, match="must be a list"):
        v2.receive_data(b"".join(frames3[:2]))
    with pytest.raises(P.ProtocolError, match="needs protocol version 3"):
        sender(2).send(P.PackedBodies(()))
    # Stored bodies: a zstd frame shorter than the body, or the body itself.
    addr = cs.bodies[0]

    def zbodies(*entries):
        c = sender(3)
        return c.send(P.ChangeSetStart(cs, len(cs.items))) + c.send(P.Items(tuple(cs.items))) \
            + c._frame("ZBODIES", (LITERAL, msgpack.packb(list(entries))))
    for entry, why in [((addr, 5, 1, b"1234"), "is 4 bytes, not 5"),
                       ((addr, 5, 7, b"1234"), "unknown storage method"),
                       ((addr, 5, 0, b"12345"), "compressed to 5 of its 5"),
                       ((addr, P.SMALL_BODY + 1, 0, b"x"), "whole bodies are at most"),
                       ((b"\x01" * 32, 5, 1, b"12345"), "not in the change set"),
                       ((addr, 5, 1), "address size method payload")]:
        _, s = ready_server(3)
        with pytest.raises(P.ProtocolError, match=why):
            s.receive_data(zbodies(entry))
    # A zstd frame that is not the body it claims is the receiver's (apply's) to refuse.
    _, s = ready_server(3)
    ev = s.receive_data(zbodies((addr, 50, 0, b"\x28\xb5\x2f\xfd" + b"\0" * 10)))[-1]
    inc = Incoming(cs, len(cs.items), BodySpool())
    inc.packed_bodies(ev.bodies)
    assert inc.spool.stored(addr)[0] == 0
    with pytest.raises(WireError, match="not a zstd frame of 50 bytes"):
        inc.spool.get(addr)


def test_parts_follow_one_another(mail):
    cs = build(mail, "alice", {})
    c, s = ready_server(3)
    data = b"".join(c.send(e) for e in P.parts_events([cs, cs], mail.read_body,
                                                       read_packed=mail.read_packed))
    ends = [e for e in s.receive_data(data) if isinstance(e, P.ChangeSetEnd)]
    assert [e.more for e in ends] == [True, None]
    # After END MORE comes a change set and nothing else.
    c, s = ready_server(3)
    first = b"".join(c.send(e) for e in P.changeset_events(cs, mail.read_body, more=True))
    with pytest.raises(P.ProtocolError, match="announced another part"):
        s.receive_data(first + c.send(P.ListUsers()))
    # Parts and PULL PARTS are version 3.
    old = sender(2)
    with pytest.raises(P.ProtocolError, match="MORE needs protocol version 3"):
        for e in P.changeset_events(cs, mail.read_body, more=True):
            old.send(e)
    with pytest.raises(P.ProtocolError, match="PARTS needs protocol version 3"):
        sender(2).send(P.Pull("alice", {}, True))
    c3, _ = ready_server(3)
    _, s2 = ready_server(2)
    with pytest.raises(P.ProtocolError, match="PARTS needs protocol version 3"):
        s2.receive_data(c3.send(P.Pull("alice", {}, True)))


def test_frames_print_as_dlist_text(mail):
    cs = build(mail, "alice", {})
    c, s = ready_server()
    data = c.send(P.Push("alice", "applied")) + c.send(P.ChangeSetStart(cs, len(cs.items)))
    frames = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        frames.append(data[4:4 + n])
        data = data[4 + n:]
    text = [print_line(decode_line(f)) for f in frames]
    assert text[0] == b'PUSH - %(USER "alice" ACK "applied" MASSDELETE F)\r\n'
    assert text[1].startswith(b'CHANGESET - %(USER "alice" SENDER "')


def test_garbage_is_a_protocol_error_with_its_offset():
    c, s = pair()
    with pytest.raises(P.ProtocolError, match="frame of 1195725856 bytes") as e:
        s.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert e.value.offset == 0 and e.value.code == "too-large"
    c, s = ready_server()
    s.receive_data(c.send(P.ListUsers()))
    with pytest.raises(P.ProtocolError, match="not a DLIST binary line") as e:
        s.receive_data(b"\x00\x00\x00\x05hello")
    assert e.value.offset > 0
    with pytest.raises(P.ProtocolError, match="frame of 0 bytes"):
        P.Connection("server").receive_data(b"\x00\x00\x00\x00")


def test_frames_before_login_are_small():
    c, s = pair()
    with pytest.raises(P.ProtocolError) as e:
        s.receive_data(struct.pack(">I", P.MAX_FRAME_BEFORE_AUTH + 1))
    assert e.value.code == "too-large"


def test_eof_inside_a_frame_or_a_change_set(mail):
    c, s = ready_server()
    frame = c.send(P.ListUsers())
    s.receive_data(frame[:-2])
    assert s.mid_frame
    with pytest.raises(P.ProtocolError, match="inside a frame"):
        s.receive_data(b"")
    c, s = ready_server()
    frames = frames_of(mail, build(mail, "alice", {}))
    s.receive_data(b"".join(frames[:2]))
    assert s.receiving_changeset and not s.mid_frame
    with pytest.raises(P.ProtocolError, match="middle of a change set") as e:
        s.receive_data(b"")
    assert e.value.code == "disconnected"


def test_change_set_stream_rules(mail):
    cs = build(mail, "alice", {})
    frames = frames_of(mail, cs, chunk=16)
    c, s = ready_server()
    s.receive_data(b"".join(frames))            # fine whole
    # A header announcing more items than come.
    short = ChangeSet(**{**cs.__dict__, "items": cs.items[:1]})
    bad = frames_of(mail, short)
    header = sender().send(P.ChangeSetStart(cs, len(cs.items)))
    c, s = ready_server()
    with pytest.raises(P.ProtocolError, match="announced"):
        s.receive_data(header + b"".join(bad[1:]))
    # A body nobody announced.
    data = sender().send(P.ChangeSetStart(ChangeSet(**{**cs.__dict__, "bodies": []}),
                                          len(cs.items)))
    c, s = ready_server()
    with pytest.raises(P.ProtocolError, match="not in the change set"):
        s.receive_data(data + b"".join(frames[1:]))
    # ITEMS outside a change set.
    c, s = ready_server()
    with pytest.raises(P.ProtocolError, match="outside a change set"):
        s.receive_data(frames[1])


def test_change_set_size_limit(mail):
    frames = frames_of(mail, build(mail, "alice", {}))
    total = sum(map(len, frames))
    c, s = ready_server(max_changeset=total - 1)
    with pytest.raises(P.ProtocolError) as e:
        s.receive_data(b"".join(frames))
    assert e.value.code == "too-large"
    c, s = ready_server(max_changeset=total)
    s.receive_data(b"".join(frames))


def test_damaged_streams_only_ever_raise_protocol_error(mail):
    good = b"".join(frames_of(mail, build(mail, "alice", {}), chunk=64))
    rng = random.Random(5)
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        c, s = ready_server()
        try:
            s.receive_data(bytes(data))
        except P.ProtocolError:
            pass


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.binary(max_size=40)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)


@given(values)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_wire_values_round_trip_through_the_binary_codec(v):
    node = to_node(v)
    assert from_node(node) == v
    line = Line._make("X", b"-", node, None)
    assert from_node(decode_line(encode_line(line)).value.node) == v
