"""The sans-I/O codec and the message types: round trips, framing, limits and violations."""

from __future__ import annotations

import itertools
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codec import DEFAULT_MAX_FRAME, HEADER, HEADER_SIZE, MAGIC, VERSION, Codec, Envelope
from shared.constants import MAX_FAULT_AROUND, FaultReason, Priority, ServiceType
from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.messages import (
    FAULT_FLAG_WRITABLE,
    GET_FLAG_NEW_ROUND,
    NO_SLOT,
    REQUEST_FLAG_LAST,
    CompleteRequest,
    CtlReply,
    CtlRequest,
    Error,
    Fault,
    FaultReply,
    GetRequest,
    Kick,
    Message,
    MessageType,
    Register,
    Registered,
    Request,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: For properties whose examples are costly to generate (nested JSON, whole streams).
MODEST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, (1 << 64) - 1)
I64 = st.integers(-(1 << 63), (1 << 63) - 1)


def header(
    mtype: int,
    length: int,
    request_id: int = 0,
    magic: int = MAGIC,
    version: int = VERSION,
    flags: int = 0,
) -> bytes:
    """A raw frame header, valid unless told otherwise."""
    return HEADER.pack(magic, version, mtype, flags, length, request_id)


def fault_reply(n: int, reason: int = 0, start: int = 100) -> FaultReply:
    """A FaultReply of ``n`` pages with recognisable values."""
    bpns = np.arange(start, start + n, dtype=np.uint64)
    mpns = np.arange(n, dtype=np.int64) * 3 - 1
    flags = (np.arange(n) % 2).astype(np.uint8)
    return FaultReply(reason, bpns, mpns, flags)


def same(a: Message, b: Message) -> bool:
    """Equality that also compares the arrays of a FaultReply."""
    if isinstance(a, FaultReply) and isinstance(b, FaultReply):
        return (
            a.reason == b.reason
            and np.array_equal(a.bpns, b.bpns)
            and np.array_equal(a.mpns, b.mpns)
            and np.array_equal(a.flags, b.flags)
        )
    return type(a) is type(b) and a == b


def roundtrip(msg: Message, request_id: int = 0) -> Envelope:
    """Send ``msg`` through one codec and decode it with another."""
    rx = Codec()
    rx.receive_data(Codec().send(msg, request_id))
    env = rx.next_event()
    assert env is not None
    assert rx.next_event() is None
    assert rx.buffered == 0
    return env


def expect_error(data: bytes, code: ErrorCode, codec: Codec | None = None) -> RemoteProtocolError:
    """Feed ``data`` and check the codec raises RemoteProtocolError with ``code``."""
    codec = codec or Codec()
    codec.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        codec.next_event()
    assert info.value.code == code
    return info.value


EXAMPLES: list[Message] = [
    GetRequest(Priority.HIGH),
    GetRequest(Priority.LOW, budget_us=0xFFFF_FFFF),
    Request(service=2, slot=3, count=512, seq=(1 << 64) - 1),
    Request(service=0, slot=NO_SLOT, count=0, seq=0),
    CompleteRequest(slot=1, count=17, seq=42, elapsed_us=1234),
    Fault(bpn=(1 << 64) - 1, write=True, around=MAX_FAULT_AROUND),
    Fault(bpn=0, write=False),
    fault_reply(1, reason=1),
    fault_reply(MAX_FAULT_AROUND + 1, reason=6),
    Kick(pending=0xFFFF_FFFF),
    Register(
        name="vm-0.a_b",
        guest_pages=1 << 32,
        vcpus=256,
        latency_sensitivity=(1 << 64) - 1,
        home_node=-1,
        shares=1,
        control_socket="/tmp/x.sock",
        metrics_port=65535,
        pid=7,
    ),
    Registered(
        vm_id=1,
        machine_memory_path="/dev/shm/m",
        host_pages=65536,
        control_region_path="/dev/shm/r",
        slot_count=4,
        slot_capacity=512,
        home_node=1,
        numa_nodes=2,
        generation=3,
    ),
    Error(code=int(ErrorCode.SLOT_NOT_ISSUED), message="slot 3 seq 9 was not issued \u2014 bye"),
    CtlRequest(op="status"),
    CtlRequest(op="run_phase", args={"phase": {"name": "warm", "vcpus": [1, 2], "x": None}}),
    CtlReply(ok=True, result={"vms": [{"name": "vm0", "pages": {"zero": 3}}]}),
    CtlReply(ok=False, error="unknown op 'x'"),
]


# ---- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip_every_message_type(msg: Message) -> None:
    """Each message decodes to an equal message of the same class, request id intact."""
    env = roundtrip(msg, request_id=0xDEAD_BEEF)
    assert env.request_id == 0xDEAD_BEEF
    assert same(env.message, msg)


def test_examples_cover_every_message_type() -> None:
    """The round-trip examples include every MessageType, so none goes untested."""
    assert {m.TYPE for m in EXAMPLES} == set(MessageType)


def test_fault_reply_arrays_decode_with_wire_dtypes() -> None:
    """A decoded FaultReply carries u64 BPNs, i64 MPNs (NO_FRAME survives) and u8 flags."""
    msg = FaultReply(
        0,
        np.array([5, 6], np.uint64),
        np.array([-1, 9], np.int64),
        np.array([FAULT_FLAG_WRITABLE, 0], np.uint8),
    )
    got = roundtrip(msg).message
    assert isinstance(got, FaultReply)
    assert got.bpns.dtype == np.dtype("<u8")
    assert got.mpns.dtype == np.dtype("<i8")
    assert got.flags.dtype == np.dtype("u1")
    assert got.mpns.tolist() == [-1, 9]


def _fault_reply_from(reason: int, rows: list[tuple[int, int, int]]) -> FaultReply:
    bpns, mpns, flags = zip(*rows, strict=True)
    return FaultReply(
        reason, np.array(bpns, np.uint64), np.array(mpns, np.int64), np.array(flags, np.uint8)
    )


FAULT_REPLIES = st.builds(
    _fault_reply_from,
    st.sampled_from(FaultReason).map(int),
    st.lists(st.tuples(U64, I64, U8), min_size=1, max_size=MAX_FAULT_AROUND + 1),
)


_JSON_SCALARS = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=20)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_ARGS = st.dictionaries(st.text(max_size=8), _JSON, max_size=4)
_JSON_KEYS = [
    "name",
    "guest_pages",
    "vcpus",
    "latency_sensitivity",
    "home_node",
    "shares",
    "control_socket",
    "metrics_port",
    "pid",
    "vm_id",
    "machine_memory_path",
    "host_pages",
    "control_region_path",
    "slot_count",
    "slot_capacity",
    "numa_nodes",
    "generation",
    "code",
    "message",
    "op",
    "args",
    "ok",
    "result",
    "error",
    "other",
]

MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(GetRequest, st.sampled_from(Priority), U32, st.sampled_from([0, GET_FLAG_NEW_ROUND])),
    st.builds(
        Request,
        st.sampled_from(ServiceType).map(int),
        U16.filter(lambda s: s != NO_SLOT),
        U32,
        U64,
        st.sampled_from([0, REQUEST_FLAG_LAST]),
    ),
    st.builds(Request, U8, st.just(NO_SLOT), U32, U64),
    st.builds(CompleteRequest, U16, U32, U64, U32),
    st.builds(Fault, U64, st.booleans(), st.integers(0, MAX_FAULT_AROUND)),
    FAULT_REPLIES,
    st.builds(Kick, U32),
    st.builds(
        Register,
        name=st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True),
        guest_pages=st.integers(1, 1 << 32),
        vcpus=st.integers(1, 256),
        latency_sensitivity=U64,
        home_node=st.integers(-1, 64),
        shares=st.integers(1, 1 << 40),
        control_socket=st.text(max_size=40),
        metrics_port=U16,
        pid=st.integers(0, 1 << 31),
    ),
    st.builds(Error, code=st.sampled_from(ErrorCode).map(int), message=st.text(max_size=80)),
    st.builds(CtlRequest, op=st.text(min_size=1, max_size=64), args=_ARGS),
    st.builds(CtlReply, ok=st.booleans(), result=_ARGS, error=st.text(max_size=40)),
)


@MODEST
@given(msgs=st.lists(MESSAGES, min_size=1, max_size=5), ids=st.lists(U64, min_size=5, max_size=5))
def test_roundtrip_property(msgs: list[Message], ids: list[int]) -> None:
    """Any sequence of valid messages sent back to back decodes to the same messages."""
    tx, rx = Codec(), Codec()
    rx.receive_data(b"".join(tx.send(m, rid) for m, rid in zip(msgs, ids, strict=False)))
    got = rx.events()
    assert [e.request_id for e in got] == ids[: len(msgs)]
    assert all(same(e.message, m) for e, m in zip(got, msgs, strict=True))
    assert rx.buffered == 0


def test_one_byte_at_a_time() -> None:
    """Fed one byte at a time, the codec yields each frame exactly when its last byte arrives."""
    tx, rx = Codec(), Codec()
    frames = [tx.send(m, i + 1) for i, m in enumerate(EXAMPLES)]
    got: list[Envelope] = []
    for frame in frames:
        for i, byte in enumerate(frame):
            rx.receive_data(bytes([byte]))
            env = rx.next_event()
            if i < len(frame) - 1:
                assert env is None
            else:
                assert env is not None
                got.append(env)
    assert [e.request_id for e in got] == list(range(1, len(EXAMPLES) + 1))
    assert all(same(e.message, m) for e, m in zip(got, EXAMPLES, strict=True))


@MODEST
@given(cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_arbitrary_chunking(cuts: list[int]) -> None:
    """However the byte stream is cut into chunks, the same messages come out in order."""
    tx, rx = Codec(), Codec()
    stream = b"".join(tx.send(m, i) for i, m in enumerate(EXAMPLES))
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    got: list[Envelope] = []
    for a, b in itertools.pairwise(points):
        rx.receive_data(stream[a:b])
        got.extend(rx.events())
    assert [e.request_id for e in got] == list(range(len(EXAMPLES)))


def test_events_returns_all_complete_frames_and_keeps_the_rest() -> None:
    """events() decodes every complete frame and leaves a partial one buffered."""
    tx, rx = Codec(), Codec()
    partial = tx.send(Kick(3), 9)
    rx.receive_data(tx.send(Kick(1)) + tx.send(Kick(2)) + partial[:5])
    assert [e.message for e in rx.events()] == [Kick(1), Kick(2)]
    assert rx.buffered == 5
    rx.receive_data(partial[5:])
    assert rx.events() == [Envelope(9, Kick(3))]


# ---- the header, byte by byte -------------------------------------------------------------


def test_header_layout_byte_by_byte() -> None:
    """The header is magic u16, version u8, type u8, flags u16, length u32, request id u64 (LE)."""
    frame = Codec().send(Kick(0x0A0B0C0D), request_id=0x1122334455667788)
    assert HEADER_SIZE == 18
    assert frame[0:2] == b"VM"
    assert frame[2] == VERSION == 1
    assert frame[3] == 15 == int(MessageType.KICK)
    assert frame[4:6] == b"\x00\x00"
    assert frame[6:10] == (4).to_bytes(4, "little")
    assert frame[10:18] == bytes.fromhex("8877665544332211")
    assert frame[18:] == bytes.fromhex("0d0c0b0a")


@pytest.mark.parametrize(
    ("msg", "body"),
    [
        (GetRequest(Priority.LOW, 0x01020304), bytes.fromhex("01000000 04030201")),
        (GetRequest(Priority.LOW, 5, GET_FLAG_NEW_ROUND), bytes.fromhex("01010000 05000000")),
        (Request(2, 0x0304, 0x05060708, 9), bytes.fromhex("0200 0403 08070605 0900000000000000")),
        (
            Request(6, 1, 2, 3, REQUEST_FLAG_LAST),
            bytes.fromhex("0601 0100 02000000 0300000000000000"),
        ),
        (
            CompleteRequest(0x0102, 3, 4, 5),
            bytes.fromhex("0201 0000 03000000 0400000000000000 05000000"),
        ),
        (Fault(0x0102030405060708, True, 16), bytes.fromhex("0807060504030201 01 00 1000")),
        (Kick(7), bytes.fromhex("07000000")),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, bytes) else "",
)
def test_binary_body_layouts(msg: Message, body: bytes) -> None:
    """Hot-path bodies have the fixed little-endian layouts documented in docs/protocol.md."""
    assert Codec().send(msg)[HEADER_SIZE:] == body


def test_fault_reply_body_layout() -> None:
    """FaultReply body: reason u8, pad, count u16, then bpn u64[n], mpn i64[n], flags u8[n]."""
    msg = FaultReply(
        5, np.array([1, 2], np.uint64), np.array([-1, 3], np.int64), np.array([1, 0], np.uint8)
    )
    body = Codec().send(msg)[HEADER_SIZE:]
    assert body == (
        bytes([5, 0])
        + (2).to_bytes(2, "little")
        + struct.pack("<2Q", 1, 2)
        + struct.pack("<2q", -1, 3)
        + bytes([1, 0])
    )


def test_json_bodies_are_utf8_json_objects() -> None:
    """Control message bodies are the JSON object of the model's fields."""
    body = Codec().send(Error(code=5, message="x"))[HEADER_SIZE:]
    assert json.loads(body) == {"code": 5, "message": "x"}


def test_flags_ignored_on_receive() -> None:
    """Non-zero header flags are accepted and ignored by the receiver."""
    codec = Codec()
    codec.receive_data(header(MessageType.KICK, 4, 3, flags=0xFFFF) + Kick(1).encode_body())
    assert codec.next_event() == Envelope(3, Kick(1))


# ---- header violations --------------------------------------------------------------------


def test_bad_magic() -> None:
    """A header with the wrong magic raises BAD_MAGIC."""
    expect_error(header(MessageType.KICK, 4, magic=0x1234) + bytes(4), ErrorCode.BAD_MAGIC)


def test_bad_version() -> None:
    """A header with another version raises BAD_VERSION."""
    expect_error(header(MessageType.KICK, 4, version=2) + bytes(4), ErrorCode.BAD_VERSION)


@pytest.mark.parametrize("mtype", [0, 4, 9, 16, 19, 22, 255])
def test_unknown_type(mtype: int) -> None:
    """A type byte that names no message raises UNKNOWN_TYPE."""
    expect_error(header(mtype, 4) + bytes(4), ErrorCode.UNKNOWN_TYPE)


def test_oversized_length_is_rejected_from_the_header_alone() -> None:
    """A length above max_frame raises FRAME_TOO_LARGE before any body byte arrives."""
    expect_error(header(MessageType.CTL_REQUEST, 101), ErrorCode.FRAME_TOO_LARGE, Codec(100))
    expect_error(header(MessageType.CTL_REQUEST, DEFAULT_MAX_FRAME + 1), ErrorCode.FRAME_TOO_LARGE)


def test_length_equal_to_max_frame_is_accepted() -> None:
    """A body of exactly max_frame bytes is within the limit."""
    msg = CtlRequest(op="x", args={"pad": ""})
    size = len(msg.encode_body())
    rx = Codec(max_frame=size)
    rx.receive_data(Codec().send(msg))
    assert rx.next_event() is not None


def test_zero_length() -> None:
    """A frame with an empty body raises BAD_LENGTH (no message has an empty body)."""
    expect_error(header(MessageType.KICK, 0), ErrorCode.BAD_LENGTH)


def test_partial_header_needs_more_bytes() -> None:
    """Fewer than 18 bytes is not an error, even if they are garbage: it needs more bytes."""
    codec = Codec()
    codec.receive_data(b"\xff" * (HEADER_SIZE - 1))
    assert codec.next_event() is None
    assert codec.buffered == HEADER_SIZE - 1


def test_truncated_body_needs_more_bytes() -> None:
    """A valid header with part of its body returns None, then the message when it completes."""
    frame = Codec().send(CompleteRequest(1, 2, 3, 4), 77)
    codec = Codec()
    codec.receive_data(frame[:-1])
    assert codec.next_event() is None
    assert codec.next_event() is None
    assert codec.buffered == len(frame) - 1
    codec.receive_data(frame[-1:])
    assert codec.next_event() == Envelope(77, CompleteRequest(1, 2, 3, 4))


def test_codec_stays_broken_after_an_error() -> None:
    """After a RemoteProtocolError every next_event raises the same error, valid bytes or not."""
    codec = Codec()
    first = expect_error(header(MessageType.KICK, 0), ErrorCode.BAD_LENGTH, codec)
    codec.receive_data(Codec().send(Kick(1)))
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as info:
            codec.next_event()
        assert info.value is first


def test_valid_frames_before_an_error_are_delivered() -> None:
    """Frames complete before a bad one are decoded; the error comes when the bad one is reached."""
    codec = Codec()
    codec.receive_data(Codec().send(Kick(1)) + header(MessageType.KICK, 0))
    assert codec.next_event() == Envelope(0, Kick(1))
    with pytest.raises(RemoteProtocolError):
        codec.next_event()


# ---- body violations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mtype", "size"),
    [
        (MessageType.GET_REQUEST, 7),
        (MessageType.GET_REQUEST, 9),
        (MessageType.REQUEST, 15),
        (MessageType.COMPLETE_REQUEST, 21),
        (MessageType.FAULT, 11),
        (MessageType.KICK, 5),
        (MessageType.FAULT_REPLY, 3),
    ],
)
def test_fixed_body_of_wrong_size(mtype: MessageType, size: int) -> None:
    """A hot-path body whose size differs from its fixed layout raises BAD_LENGTH."""
    expect_error(header(mtype, size) + bytes(size), ErrorCode.BAD_LENGTH)


def test_get_request_bad_priority() -> None:
    """A GetRequest priority that is neither HIGH nor LOW raises BAD_BODY."""
    body = struct.pack("<B3xI", 2, 0)
    expect_error(header(MessageType.GET_REQUEST, len(body)) + body, ErrorCode.BAD_BODY)


@pytest.mark.parametrize("flags", [2, 0x80, 0xFF])
def test_get_request_unknown_flags(flags: int) -> None:
    """A GetRequest flag bit other than NEW_ROUND raises BAD_BODY (room for later versions)."""
    body = struct.pack("<BB2xI", 1, flags, 0)
    expect_error(header(MessageType.GET_REQUEST, len(body)) + body, ErrorCode.BAD_BODY)


@pytest.mark.parametrize("flags", [2, 0x80])
def test_request_unknown_flags(flags: int) -> None:
    """A Request flag bit other than LAST raises BAD_BODY."""
    body = struct.pack("<BBHIQ", 0, flags, 0xFFFF, 0, 0)
    expect_error(header(MessageType.REQUEST, len(body)) + body, ErrorCode.BAD_BODY)


def test_flags_decode() -> None:
    """NEW_ROUND and LAST survive a round trip through the codec and read as properties."""
    tx, rx = Codec(), Codec()
    rx.receive_data(tx.send(GetRequest(Priority.LOW, 7, GET_FLAG_NEW_ROUND), 1))
    rx.receive_data(tx.send(Request(3, 0, 1, 2, REQUEST_FLAG_LAST), 2))
    get, req = (e.message for e in rx.events())
    assert isinstance(get, GetRequest) and get.new_round and get.budget_us == 7
    assert isinstance(req, Request) and req.last and req.has_work


@pytest.mark.parametrize(("write", "around"), [(2, 0), (255, 0), (0, MAX_FAULT_AROUND + 1)])
def test_fault_bad_fields(write: int, around: int) -> None:
    """A Fault with write not 0/1, or around above MAX_FAULT_AROUND, raises BAD_BODY."""
    body = struct.pack("<QBxH", 1, write, around)
    expect_error(header(MessageType.FAULT, len(body)) + body, ErrorCode.BAD_BODY)


@pytest.mark.parametrize(("count", "entries"), [(0, 0), (2, 1), (1, 2), (66, 66)])
def test_fault_reply_count_mismatch(count: int, entries: int) -> None:
    """A FaultReply whose count is 0, above 65, or disagrees with the body raises BAD_LENGTH."""
    body = struct.pack("<BxH", 0, count) + bytes(17 * entries)
    expect_error(header(MessageType.FAULT_REPLY, len(body)) + body, ErrorCode.BAD_LENGTH)


@pytest.mark.parametrize(
    ("mtype", "body"),
    [
        (MessageType.REGISTER, b"not json"),
        (MessageType.REGISTER, b'{"name": "a b", "guest_pages": 1, "vcpus": 1}'),
        (MessageType.REGISTER, b'{"name": "a", "guest_pages": 0, "vcpus": 1}'),
        (MessageType.REGISTER, b'{"name": "a", "guest_pages": 1, "vcpus": 1, "extra": 1}'),
        (MessageType.REGISTERED, b"{}"),
        (MessageType.ERROR, b"[1, 2]"),
        (MessageType.CTL_REQUEST, b'{"op": ""}'),
        (MessageType.CTL_REQUEST, b"\xff\xfe\x00"),
        (MessageType.CTL_REQUEST, b'{"op": "x", "args": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
        (MessageType.CTL_REPLY, b'{"ok": "maybe"}'),
    ],
)
def test_json_body_invalid(mtype: MessageType, body: bytes) -> None:
    """A control body that is not JSON or fails its model raises BAD_BODY."""
    expect_error(header(mtype, len(body)) + body, ErrorCode.BAD_BODY)


# ---- the invariant: any bytes parse or raise RemoteProtocolError -------------------------


def _drain(codec: Codec) -> None:
    """Decode until more bytes are needed or the codec raises RemoteProtocolError."""
    try:
        while codec.next_event() is not None:
            pass
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):  # and it stays broken
            codec.next_event()


@FAST
@given(data=st.binary(max_size=300), chunk=st.integers(1, 64))
def test_arbitrary_bytes_parse_or_raise_remote_protocol_error(data: bytes, chunk: int) -> None:
    """Arbitrary bytes, fed in any chunk size, decode or raise RemoteProtocolError, nothing else."""
    codec = Codec(max_frame=256)
    for i in range(0, len(data), chunk):
        codec.receive_data(data[i : i + chunk])
        _drain(codec)


@FAST
@given(
    mtype=st.sampled_from(MessageType),
    body=st.binary(max_size=200),
    flags=U16,
    request_id=U64,
)
def test_arbitrary_body_behind_valid_header(
    mtype: MessageType, body: bytes, flags: int, request_id: int
) -> None:
    """Arbitrary bodies behind a valid header of any type decode or raise RemoteProtocolError."""
    codec = Codec()
    codec.receive_data(header(mtype, len(body), request_id, flags=flags) + body)
    _drain(codec)


@MODEST
@given(mtype=st.sampled_from(MessageType), n=st.integers(0, 80), data=st.data())
def test_sized_bodies_behind_valid_header(mtype: MessageType, n: int, data: st.DataObject) -> None:
    """Bodies of the right size (and FaultReply bodies of a consistent count) hit field decoding."""
    sizes = {
        MessageType.GET_REQUEST: 8,
        MessageType.REQUEST: 16,
        MessageType.COMPLETE_REQUEST: 20,
        MessageType.FAULT: 12,
        MessageType.KICK: 4,
    }
    if mtype == MessageType.FAULT_REPLY:
        body = bytes([data.draw(U8), 0]) + n.to_bytes(2, "little")
        body += data.draw(st.binary(min_size=17 * n, max_size=17 * n))
    elif mtype in sizes:
        body = data.draw(st.binary(min_size=sizes[mtype], max_size=sizes[mtype]))
    else:
        value: Any = data.draw(st.dictionaries(st.sampled_from(_JSON_KEYS), _JSON, max_size=10))
        body = json.dumps(value).encode()
    codec = Codec()
    codec.receive_data(header(mtype, len(body)) + body)
    _drain(codec)


@MODEST
@given(msg=MESSAGES, flips=st.lists(st.tuples(st.integers(0, 10_000), U8), min_size=1, max_size=4))
def test_corrupted_valid_frames(msg: Message, flips: list[tuple[int, int]]) -> None:
    """A valid frame with some bytes overwritten decodes or raises RemoteProtocolError."""
    frame = bytearray(Codec().send(msg))
    for pos, value in flips:
        frame[pos % len(frame)] = value
    codec = Codec(max_frame=1 << 16)
    codec.receive_data(bytes(frame))
    _drain(codec)


# ---- sending ------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", [-1, 1 << 64, -(1 << 70)])
def test_send_bad_request_id(request_id: int) -> None:
    """Sending with a request id outside 0..2**64-1 raises LocalProtocolError."""
    with pytest.raises(LocalProtocolError):
        Codec().send(Kick(1), request_id)


def test_send_request_id_bounds_accepted() -> None:
    """Request ids 0 and 2**64-1 are valid on send and survive the trip."""
    assert roundtrip(Kick(1), 0).request_id == 0
    assert roundtrip(Kick(1), (1 << 64) - 1).request_id == (1 << 64) - 1


def test_send_body_too_large() -> None:
    """Sending a body larger than the codec's max_frame raises LocalProtocolError."""
    with pytest.raises(LocalProtocolError):
        Codec(max_frame=16).send(CtlRequest(op="x", args={"pad": "y" * 32}))


@pytest.mark.parametrize(
    "msg",
    [
        GetRequest(Priority.LOW, budget_us=1 << 32),
        GetRequest(Priority.LOW, budget_us=-1),
        GetRequest(Priority.LOW, flags=256),
        Request(service=0, slot=0, count=0, seq=0, flags=256),
        Request(service=256, slot=0, count=0, seq=0),
        CompleteRequest(slot=1 << 16, count=0, seq=0),
        Fault(bpn=1 << 64, write=False),
        Kick(pending=-1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_send_field_out_of_range(msg: Message) -> None:
    """A field that does not fit its wire width raises LocalProtocolError, not struct.error."""
    with pytest.raises(LocalProtocolError):
        Codec().send(msg)


def test_errors_are_remote_not_local() -> None:
    """Decoding errors are RemoteProtocolError and never LocalProtocolError."""
    err = expect_error(header(MessageType.KICK, 0), ErrorCode.BAD_LENGTH)
    assert not isinstance(err, LocalProtocolError)


# ---- message classes ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, MAX_FAULT_AROUND + 2])
def test_fault_reply_size_limits(n: int) -> None:
    """A FaultReply must map 1..MAX_FAULT_AROUND+1 pages."""
    with pytest.raises(ValueError):
        FaultReply(0, np.zeros(n, np.uint64), np.zeros(n, np.int64), np.zeros(n, np.uint8))


def test_fault_reply_arrays_must_match() -> None:
    """A FaultReply with arrays of different lengths is refused."""
    with pytest.raises(ValueError):
        FaultReply(0, np.zeros(2, np.uint64), np.zeros(1, np.int64), np.zeros(2, np.uint8))


def test_request_has_work() -> None:
    """A Request with slot NO_SLOT means the round is over."""
    assert not Request(0, NO_SLOT, 0, 0).has_work
    assert Request(0, 0, 1, 1).has_work


def test_unknown_service_or_fault_reason_is_a_remote_protocol_error() -> None:
    """A Request naming no service, or a FaultReply with no known reason, is the peer's error."""
    for msg in (Request(200, 0, 1, 1), fault_reply(1, reason=200)):
        data = Codec().send(msg, 1)
        codec = Codec()
        codec.receive_data(data)
        with pytest.raises(RemoteProtocolError) as info:
            codec.next_event()
        assert info.value.code == ErrorCode.BAD_BODY
