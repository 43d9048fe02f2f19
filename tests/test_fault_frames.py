"""The fault path's fast frames (issue 10): a one-page fault and its reply skip the general
codec, so they must mean exactly what the codec would make of the same bytes.

- ``parse_fault`` / ``parse_fault_reply`` accept a frame only when the codec decodes it to the
  same message (every other byte string goes to the codec, which reports it as before);
- ``Codec.send`` packs a Fault and a one-page FaultReply in one struct call, byte for byte the
  documented layout, and still refuses values that do not fit;
- the real daemon and a real RpcClient, over real sockets, take the fast path for valid frames
  and still answer malformed ones of the same size with the codec's Error.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codec import (
    FAULT_FRAME,
    FAULT_REPLY_FRAME,
    HEADER,
    MAGIC,
    VERSION,
    Codec,
    parse_fault,
    parse_fault_reply,
)
from shared.constants import MAX_FAULT_AROUND, FaultReason
from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.messages import FAULT_FLAG_WRITABLE, Fault, FaultReply, MessageType
from tests.test_services_swap import REPLY_TIMEOUT, FakeAgent, running_platform, wait_until
from vmm_agent.link import corked
from vmm_agent.rpc import RpcClient

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U8 = st.integers(0, 0xFF)
U64 = st.integers(0, (1 << 64) - 1)
I64 = st.integers(-(1 << 63), (1 << 63) - 1)
FLIPS = st.lists(st.tuples(st.integers(0, 63), U8), max_size=3)


def decoded(data: bytes) -> object:
    """What the general codec makes of ``data``: a (request id, message), or "error"/"more"."""
    codec = Codec()
    codec.receive_data(data)
    try:
        env = codec.next_event()
    except RemoteProtocolError:
        return "error"
    if env is None or codec.buffered:
        return "more"
    return env.request_id, env.message


def flipped(frame: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(frame)
    for pos, value in flips:
        out[pos % len(out)] = value
    return bytes(out)


# ---- the parsers agree with the codec ---------------------------------------------------------


@FAST
@given(
    rid=U64,
    bpn=U64,
    write=st.integers(0, 3),
    around=st.integers(0, 0xFFFF),
    flips=FLIPS,
)
def test_parse_fault_agrees_with_the_codec(
    rid: int, bpn: int, write: int, around: int, flips: list[tuple[int, int]]
) -> None:
    """Any 30-byte frame, valid or corrupted: the fast parser returns exactly the codec's
    Fault, and None whenever the codec refuses it (or it is another message)."""
    frame = FAULT_FRAME.pack(MAGIC, VERSION, MessageType.FAULT, 0, 12, rid, bpn, write, around)
    data = flipped(frame, flips)
    fast = parse_fault(data)
    slow = decoded(data)
    if isinstance(slow, tuple) and isinstance(slow[1], Fault):
        msg = slow[1]
        assert fast == (slow[0], msg.bpn, msg.write, msg.around)
    else:
        assert fast is None


@FAST
@given(data=st.binary(min_size=0, max_size=40))
def test_parse_fault_refuses_other_sizes_and_bytes(data: bytes) -> None:
    """Random bytes: the fast parser never accepts what the codec would not."""
    fast = parse_fault(data)
    if fast is not None:
        slow = decoded(data)
        assert isinstance(slow, tuple) and isinstance(slow[1], Fault)


@FAST
@given(
    rid=U64,
    reason=st.integers(0, 0xFF),
    count=st.integers(0, 3),
    bpn=U64,
    mpn=I64,
    flag=U8,
    flips=FLIPS,
)
def test_parse_fault_reply_agrees_with_the_codec(
    rid: int, reason: int, count: int, bpn: int, mpn: int, flag: int, flips: list[tuple[int, int]]
) -> None:
    """Any 39-byte frame: the fast parser returns the codec's one-page FaultReply (same
    request id, reason, page, frame and flags), and None whenever the codec refuses it."""
    frame = FAULT_REPLY_FRAME.pack(
        MAGIC, VERSION, MessageType.FAULT_REPLY, 0, 21, rid, reason, count, bpn, mpn, flag
    )
    data = flipped(frame, flips)
    fast = parse_fault_reply(data)
    slow = decoded(data)
    if isinstance(slow, tuple) and isinstance(slow[1], FaultReply):
        want = slow[1]
        assert fast is not None
        got_rid, got = fast
        assert got_rid == slow[0]
        assert (got.reason, got.count, got.bpn, got.mpn, got.flag) == (
            want.reason,
            1,
            int(want.bpns[0]),
            int(want.mpns[0]),
            int(want.flags[0]),
        )
    else:
        assert fast is None


def test_valid_frames_take_the_fast_path() -> None:
    """Every valid one-page frame is parsed by the fast path (else it would buy nothing)."""
    codec = Codec()
    for write in (False, True):
        frame = codec.send(Fault(7, write, MAX_FAULT_AROUND), 9)
        assert parse_fault(frame) == (9, 7, write, MAX_FAULT_AROUND)
    for reason in FaultReason:
        frame = codec.send(FaultReply.single(int(reason), 5, -1, FAULT_FLAG_WRITABLE), 3)
        got = parse_fault_reply(frame)
        assert got is not None and got[0] == 3
        assert (got[1].reason, got[1].bpn, got[1].mpn, got[1].flag) == (int(reason), 5, -1, 1)
    two = FaultReply(0, np.array([1, 2], np.uint64), np.zeros(2, np.int64), np.ones(2, np.uint8))
    assert parse_fault_reply(codec.send(two, 1)) is None  # several pages: the codec's job


# ---- sending -----------------------------------------------------------------------------


@FAST
@given(rid=U64, bpn=U64, write=st.booleans(), around=st.integers(0, MAX_FAULT_AROUND))
def test_fault_frame_is_the_documented_layout(rid: int, bpn: int, write: bool, around: int) -> None:
    """Header (docs/protocol.md) then ``bpn u64, write u8, pad, around u16``."""
    body = struct.pack("<QBxH", bpn, int(write), around)
    want = HEADER.pack(MAGIC, VERSION, MessageType.FAULT, 0, len(body), rid) + body
    assert Codec().send(Fault(bpn, write, around), rid) == want


@FAST
@given(rid=U64, reason=st.sampled_from(FaultReason).map(int), bpn=U64, mpn=I64, flag=U8)
def test_one_page_reply_is_the_documented_layout(
    rid: int, reason: int, bpn: int, mpn: int, flag: int
) -> None:
    """Reason, pad, count 1, then the bpn, mpn and flags arrays of one element each: the
    same bytes whether the reply was built from ints or from arrays."""
    body = (
        struct.pack("<BxH", reason, 1)
        + np.array([bpn], "<u8").tobytes()
        + np.array([mpn], "<i8").tobytes()
        + np.array([flag], "u1").tobytes()
    )
    want = HEADER.pack(MAGIC, VERSION, MessageType.FAULT_REPLY, 0, len(body), rid) + body
    arrays = FaultReply(
        reason, np.array([bpn], np.uint64), np.array([mpn], np.int64), np.array([flag], np.uint8)
    )
    assert Codec().send(FaultReply.single(reason, bpn, mpn, flag), rid) == want
    assert Codec().send(arrays, rid) == want


@pytest.mark.parametrize(
    ("msg", "rid"),
    [
        (Fault(1 << 64, False), 1),
        (Fault(1, True, 1 << 16), 1),
        (Fault(1, True), -1),
        (Fault(1, True), 1 << 64),
        (FaultReply.single(0, -1, 0, 0), 1),
        (FaultReply.single(0, 0, 1 << 63, 0), 1),
        (FaultReply.single(0, 0, 0, 256), 1),
        (FaultReply.single(256, 0, 0, 0), 1),
        (FaultReply.single(0, 0, 0, 0), 1 << 64),
    ],
)
def test_fast_send_refuses_values_that_do_not_fit(msg: Fault | FaultReply, rid: int) -> None:
    """A value outside its wire width is our bug: LocalProtocolError, as on the general path."""
    with pytest.raises(LocalProtocolError):
        Codec().send(msg, rid)


def test_single_reply_arrays_have_the_wire_dtypes() -> None:
    """A one-page reply made from ints shows the same arrays as one decoded from arrays."""
    reply = FaultReply.single(int(FaultReason.COW), 5, -1, FAULT_FLAG_WRITABLE)
    assert reply.bpns.dtype == np.uint64 and reply.bpns.tolist() == [5]
    assert reply.mpns.dtype == np.int64 and reply.mpns.tolist() == [-1]
    assert reply.flags.dtype == np.uint8 and reply.flags.tolist() == [FAULT_FLAG_WRITABLE]
    assert reply.count == 1 and len(reply.bpns) == 1


# ---- over real sockets -------------------------------------------------------------------


def fault_frame(rid: int, bpn: int, write: int, around: int, flags: int = 0) -> bytes:
    return FAULT_FRAME.pack(MAGIC, VERSION, MessageType.FAULT, flags, 12, rid, bpn, write, around)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("write", "around", "code"),
    [(2, 0, ErrorCode.BAD_BODY), (1, MAX_FAULT_AROUND + 1, ErrorCode.BAD_BODY)],
)
async def test_daemon_refuses_a_malformed_fault_of_the_fast_size(
    short_tmp: Path, mem_dir: Path, write: int, around: int, code: ErrorCode
) -> None:
    """A 30-byte Fault frame with a bad field is not taken by the fast path: the codec
    answers it with an Error carrying the frame's request id, the VM is disconnected and
    released, and a second VM keeps faulting."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        good = await FakeAgent.connect(server, "good", guest_pages=64)
        bad = await FakeAgent.connect(server, "bad", guest_pages=64)
        await bad.write_pages(np.arange(8))
        fut = asyncio.get_running_loop().create_future()
        bad.link._waiting[77] = fut  # the Error comes back as the answer to request id 77
        assert bad.link.transport is not None
        bad.link.transport.write(fault_frame(77, 3, write, around))
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(fut, REPLY_TIMEOUT)
        assert getattr(info.value, "code", None) == code
        await asyncio.wait_for(asyncio.shield(bad.link.closed), REPLY_TIMEOUT)
        bad.unmap()
        await wait_until(lambda: bad.vm_id not in server.vms, "the bad VM to be released")
        assert (server.machine.owner_vm != bad.vm_id).all()
        await good.write_pages(np.arange(16))
        assert (await good.verify(np.arange(16))) == {}
        await good.close()


@pytest.mark.timeout(60)
async def test_daemon_serves_faults_with_header_flags_and_in_one_read(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Header flags are ignored on receive (fast path too), and several faults arriving in
    one read (the codec's path) are each answered."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "a", guest_pages=64)
        link = agent.link
        loop = asyncio.get_running_loop()
        futs = {rid: loop.create_future() for rid in (101, 102, 103)}
        link._waiting.update(futs)
        assert link.transport is not None
        link.transport.write(fault_frame(101, 1, 1, 0, flags=0xFFFF))
        reply = await asyncio.wait_for(futs[101], REPLY_TIMEOUT)
        assert isinstance(reply, FaultReply) and reply.bpn == 1 and reply.flag == 1
        link.transport.write(fault_frame(102, 2, 0, 0) + fault_frame(103, 3, 1, 0))
        got = await asyncio.wait_for(asyncio.gather(futs[102], futs[103]), REPLY_TIMEOUT)
        assert [(r.bpn, r.flag) for r in got] == [(2, 0), (3, 1)]
        vm = server.vms[agent.vm_id]
        assert vm.p2m.frame[1] == reply.mpn and vm.p2m.frame[3] == got[1].mpn
        assert vm.p2m.frame[2] == server.machine.zero_frame[vm.home_node]
        await agent.close()


class _CountingTransport:
    """The daemon's real transport for one peer, counting the writes made through it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.timeout(60)
async def test_replies_to_faults_of_one_read_go_out_in_one_write(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Several faults in one read are answered in one write (one syscall, one wakeup of the
    agent), in order, each reply intact; a fault alone is still answered at once."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "a", guest_pages=64)
        conn = server.vms[agent.vm_id].connection
        counting = _CountingTransport(conn.transport)
        conn.transport = counting  # type: ignore[assignment]
        link = agent.link
        loop = asyncio.get_running_loop()
        futs = {rid: loop.create_future() for rid in (201, 202, 203, 204)}
        link._waiting.update(futs)
        assert link.transport is not None
        link.transport.write(fault_frame(201, 1, 1, 0))
        await asyncio.wait_for(futs[201], REPLY_TIMEOUT)
        assert len(counting.writes) == 1
        link.transport.write(
            fault_frame(202, 2, 1, 0) + fault_frame(203, 3, 1, 0) + fault_frame(204, 4, 0, 0)
        )
        got = await asyncio.wait_for(asyncio.gather(futs[202], futs[203], futs[204]), REPLY_TIMEOUT)
        assert [(r.bpn, r.flag) for r in got] == [(2, 1), (3, 1), (4, 0)]
        assert len(counting.writes) == 2
        codec = Codec()
        codec.receive_data(counting.writes[1])
        frames = []
        while (env := codec.next_event()) is not None:
            frames.append((env.request_id, env.message.bpn))  # type: ignore[attr-defined]
        assert frames == [(202, 2), (203, 3), (204, 4)]
        await agent.close()


@pytest.mark.timeout(60)
async def test_requests_sent_corked_go_out_in_one_write(short_tmp: Path, mem_dir: Path) -> None:
    """The agent's requests sent inside ``corked`` (a verify chunk's faults) leave in one
    write when it ends, and each is answered; outside, each request is written at once."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "a", guest_pages=64)
        link = agent.link
        counting = _CountingTransport(link.transport)
        link.transport = counting  # type: ignore[assignment]
        with corked(link):
            futs = [link.request_nowait(Fault(bpn, True, 0)) for bpn in (5, 6, 7)]
            assert counting.writes == []
        assert len(counting.writes) == 1
        replies = await asyncio.wait_for(asyncio.gather(*futs), REPLY_TIMEOUT)
        assert [(r.bpn, r.flag) for r in replies] == [(5, 1), (6, 1), (7, 1)]
        await asyncio.wait_for(link.request_nowait(Fault(8, True, 0)), REPLY_TIMEOUT)
        assert len(counting.writes) == 2
        await agent.close()


@pytest.mark.timeout(30)
async def test_client_refuses_a_malformed_reply_of_the_fast_size() -> None:
    """A 39-byte FaultReply with an unknown reason fails the client's waiting requests with
    the codec's RemoteProtocolError and closes the connection; a valid one resolves its
    request with the page's mapping."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    loop = asyncio.get_running_loop()
    try:
        _, client = await loop.create_unix_connection(RpcClient, sock=ours)
        good = client.request_nowait(Fault(5, True))
        rid = 1
        theirs.sendall(FAULT_REPLY_FRAME.pack(MAGIC, VERSION, 14, 0, 21, rid, 0, 1, 5, 42, 1))
        reply = await asyncio.wait_for(good, REPLY_TIMEOUT)
        assert (reply.bpn, reply.mpn, reply.flag, reply.count) == (5, 42, 1, 1)
        pending = client.request_nowait(Fault(6, True))
        bad_reason = max(int(r) for r in FaultReason) + 1
        theirs.sendall(
            FAULT_REPLY_FRAME.pack(MAGIC, VERSION, 14, 0, 21, 2, bad_reason, 1, 6, 43, 1)
        )
        with pytest.raises(RemoteProtocolError) as info:
            await asyncio.wait_for(pending, REPLY_TIMEOUT)
        assert info.value.code == ErrorCode.BAD_BODY
        await asyncio.wait_for(client.closed, REPLY_TIMEOUT)
    finally:
        theirs.close()
