"""What an outside implementer relies on: strict types, the order of checks, request ids on
errors, and error messages that say what is wrong (docs/protocol.md sections 2, 5.2, 7, 8.3).

A real in-process PlatformServer (``running_platform``) and a raw peer that writes frames
byte for byte, as a client written from the document alone would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from platform_daemon.server import PlatformServer
from shared.codec import DEFAULT_MAX_FRAME, HEADER, MAGIC, VERSION, Codec, Envelope
from shared.constants import FaultReason, PageState, Priority, ServiceType
from shared.errors import ErrorCode, RemoteProtocolError
from shared.messages import (
    CompleteRequest,
    CtlReply,
    Error,
    GetRequest,
    MessageType,
    Register,
    Registered,
)
from tests.test_services_swap import (
    REPLY_TIMEOUT,
    FakeAgent,
    reclaim,
    running_platform,
    wait_until,
)
from vmm_agent.rpc import PeerError, RpcClient

REGISTER = {"name": "raw", "guest_pages": 16, "vcpus": 1}
REGISTERED: dict[str, Any] = {
    "vm_id": 1,
    "machine_memory_path": "/dev/shm/m",
    "host_pages": 4096,
    "control_region_path": "/dev/shm/r",
    "slot_count": 4,
    "slot_capacity": 512,
    "home_node": 0,
    "numa_nodes": 2,
    "generation": 1,
}


class RawPeer:
    """A client that sends frames exactly as given and decodes whatever comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.codec = Codec()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: Path) -> AsyncIterator[RawPeer]:
        peer = cls(*await asyncio.open_unix_connection(str(path)))
        try:
            yield peer
        finally:
            peer.writer.close()
            with contextlib.suppress(OSError):
                await peer.writer.wait_closed()

    def send_raw(self, mtype: int, body: bytes, request_id: int, magic: int = MAGIC) -> None:
        self.writer.write(HEADER.pack(magic, VERSION, mtype, 0, len(body), request_id) + body)

    def send_json(self, mtype: MessageType, obj: dict[str, Any], request_id: int) -> None:
        self.send_raw(mtype, json.dumps(obj).encode(), request_id)

    async def next_frame(self) -> Envelope:
        while (env := self.codec.next_event()) is None:
            data = await asyncio.wait_for(self.reader.read(65536), REPLY_TIMEOUT)
            assert data, "closed before a reply"
            self.codec.receive_data(data)
        return env

    async def closed(self) -> None:
        """Wait for the daemon to close the connection (nothing more is sent)."""
        rest = await asyncio.wait_for(self.reader.read(), REPLY_TIMEOUT)
        assert rest == b"", rest

    async def register(self, request_id: int = 1) -> Registered:
        self.send_json(MessageType.REGISTER, REGISTER, request_id)
        env = await self.next_frame()
        assert isinstance(env.message, Registered) and env.request_id == request_id, env
        return env.message


async def refused(peer: RawPeer) -> Envelope:
    """The one Error the daemon sends before it closes the connection."""
    env = await peer.next_frame()
    assert isinstance(env.message, Error), env
    await peer.closed()
    return env


# ---- strict types on the wire --------------------------------------------------------------


STRING_OR_BOOL_FOR_INT = [
    ("guest_pages", "16"),
    ("guest_pages", True),
    ("guest_pages", 16.0),
    ("vcpus", "1"),
    ("vcpus", True),
    ("latency_sensitivity", "0"),
    ("home_node", False),
    ("shares", "1000"),
    ("metrics_port", True),
    ("pid", "12"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("field", "value"), STRING_OR_BOOL_FOR_INT)
async def test_register_with_a_string_or_boolean_for_an_integer_is_bad_body(
    short_tmp: Path, mem_dir: Path, field: str, value: Any
) -> None:
    """A Register whose integer field holds a string, a boolean or a float is refused with
    BAD_BODY naming the field, carrying the frame's request id; no VM is registered."""
    async with (
        running_platform(short_tmp, mem_dir) as server,
        RawPeer.connect(server.config.socket) as peer,
    ):
        peer.send_json(MessageType.REGISTER, {**REGISTER, field: value}, request_id=41)
        env = await refused(peer)
        assert isinstance(env.message, Error)
        assert env.message.code == ErrorCode.BAD_BODY, env.message
        assert field in env.message.message
        assert env.request_id == 41
        assert server.vms == {}


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (Register, {**REGISTER, "guest_pages": "16"}),
        (Registered, {**REGISTERED, "vm_id": "1"}),
        (Registered, {**REGISTERED, "max_outstanding_faults": True}),
        (Error, {"code": "7", "message": "x"}),
        (CtlReply, {"ok": "true"}),
        (CtlReply, {"ok": 1}),
    ],
)
def test_json_bodies_take_no_strings_or_booleans_for_numbers(
    cls: Any, body: dict[str, Any]
) -> None:
    """Every JSON message decodes strictly: "16" is not 16, true is not 1, 1 is not true."""
    with pytest.raises(RemoteProtocolError) as info:
        cls.decode_body(json.dumps(body).encode())
    assert info.value.code == ErrorCode.BAD_BODY


CTL_BAD_ARGS: list[tuple[str, dict[str, Any], str]] = [
    ("retire", {"mpn": True}, "mpn"),
    ("retire", {"mpn": "5"}, "mpn"),
    ("retire", {"mpn": 5.0}, "mpn"),
    ("retire", {"random_used": 1}, "random_used"),
    ("retire", {"random_used": True, "seed": "3"}, "seed"),
    ("set_host_limit", {"size": True}, "size"),
    ("set_host_limit", {"size": 4096.0}, "size"),
    ("set_lowprio", {"sample_pages": "100"}, "sample_pages"),
    ("set_lowprio", {"sample_pages": True}, "sample_pages"),
    ("set_lowprio", {"sample_period": True}, "sample_period"),
    ("set_lowprio", {"share_scan_period": "5"}, "share_scan_period"),
    ("set_lowprio", {"numa_migrate_rate": "100"}, "numa_migrate_rate"),
    ("set_lowprio", {"numa_host_migrate_rate": True}, "numa_host_migrate_rate"),
    ("failpoint", {"name": "swap_write_error", "value": True}, "value"),
    ("status", {"verbose": True}, "verbose"),
    ("list_vms", {"all": 1}, "all"),
]


def _settings(server: PlatformServer) -> tuple[Any, ...]:
    """Everything the ops above could change."""
    alloc, swap = server.machine.allocator, server.swap
    ops = server.ctl
    assert swap is not None
    return (
        alloc.retired,
        int(np.count_nonzero(server.machine.failing)),
        server.machine.limit_pages,
        ops._sampling.period,
        ops._sampling.sample_pages,
        ops._sharing.scan_period,
        ops._numa.vm_rate,
        ops._numa.host_rate,
        swap.fail_next_write,
        swap.write_delay,
    )


@pytest.mark.timeout(30)
async def test_ctl_arguments_take_no_strings_or_booleans_for_numbers(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Each integer (and number) argument of a daemon ctl op refuses a string, a boolean or a
    float where an integer is due: ok false, an error naming the argument, nothing changed.
    (Today ``retire {"mpn": true}`` retired frame 1.) Proper types still work, and an int
    where a number of seconds is due is fine. An op that takes no argument refuses one."""
    async with running_platform(short_tmp, mem_dir) as server:
        link = await RpcClient.connect(str(server.config.socket))
        before = _settings(server)
        for op, args, name in CTL_BAD_ARGS:
            with pytest.raises(PeerError) as info:
                await link.ctl(op, timeout=REPLY_TIMEOUT, **args)
            assert name in str(info.value), (op, args, str(info.value))
            assert _settings(server) == before, (op, args)
        assert (await link.ctl("retire", mpn=5))["was"] == "free"
        assert (await link.ctl("set_lowprio", sample_period=7, sample_pages=50)) == {
            "sample_period": 7.0,
            "sample_pages": 50,
            "share_scan_period": before[5],
            "numa_migrate_rate": before[6],
            "numa_host_migrate_rate": before[7],
        }
        link.close()


# ---- the order of checks, and the request id of an error -----------------------------------


def _frame_too_large(peer: RawPeer) -> None:
    peer.writer.write(
        HEADER.pack(MAGIC, VERSION, MessageType.FAULT, 0, DEFAULT_MAX_FRAME + 1, 21) + b"\0"
    )


ORDER_CASES: dict[str, tuple[bool, Any, ErrorCode, int]] = {
    # name: (register first, what to send, expected code, expected request id)
    "registered_before_register": (
        False,
        lambda p: p.send_json(MessageType.REGISTERED, {}, 9),
        ErrorCode.PROTOCOL,
        9,
    ),
    "kick_with_bad_body_before_register": (
        False,
        lambda p: p.send_raw(MessageType.KICK, b"\1", 10),
        ErrorCode.PROTOCOL,
        10,
    ),
    "short_fault_before_register": (
        False,
        lambda p: p.send_raw(MessageType.FAULT, b"\0\0\0", 11),
        ErrorCode.NOT_REGISTERED,
        11,
    ),
    "short_fault_when_registered": (
        True,
        lambda p: p.send_raw(MessageType.FAULT, b"\0\0\0", 12),
        ErrorCode.BAD_LENGTH,
        12,
    ),
    "bad_register_when_registered": (
        True,
        lambda p: p.send_json(MessageType.REGISTER, {"name": 5}, 13),
        ErrorCode.ALREADY_REGISTERED,
        13,
    ),
    "request_when_registered": (
        True,
        lambda p: p.send_raw(MessageType.REQUEST, bytes(16), 14),
        ErrorCode.PROTOCOL,
        14,
    ),
    "bad_json_before_register": (
        False,
        lambda p: p.send_raw(MessageType.REGISTER, b"{nope", 15),
        ErrorCode.BAD_BODY,
        15,
    ),
    "unknown_type": (False, lambda p: p.send_raw(99, b"\0", 16), ErrorCode.UNKNOWN_TYPE, 16),
    "frame_too_large": (True, _frame_too_large, ErrorCode.FRAME_TOO_LARGE, 21),
    "bad_magic": (False, lambda p: p.send_raw(13, b"\0", 17, magic=0x1234), ErrorCode.BAD_MAGIC, 0),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(ORDER_CASES))
async def test_checks_run_in_the_documented_order_and_errors_carry_the_request_id(
    short_tmp: Path, mem_dir: Path, case: str
) -> None:
    """The daemon checks a frame's header, then its type (one the daemon never accepts:
    PROTOCOL; one that needs a registration: NOT_REGISTERED; a second Register:
    ALREADY_REGISTERED), and only then its body. Every error after a header that parsed
    carries that header's request id (0 only when the magic is wrong)."""
    register_first, send, code, request_id = ORDER_CASES[case]
    async with (
        running_platform(short_tmp, mem_dir) as server,
        RawPeer.connect(server.config.socket) as peer,
    ):
        if register_first:
            await peer.register()
        send(peer)
        env = await refused(peer)
        assert isinstance(env.message, Error)
        assert (ErrorCode(env.message.code), env.request_id) == (code, request_id), env.message
        await wait_until(lambda: not server.vms, "the VM to be released")


@pytest.mark.timeout(30)
async def test_a_protocol_error_from_an_unregistered_peer_names_the_peer(
    short_tmp: Path, mem_dir: Path
) -> None:
    """The daemon's protocol_error log line for a peer that never registered names it by the
    pid and uid the kernel reports for the socket (SO_PEERCRED)."""
    async with running_platform(short_tmp, mem_dir) as server:
        with structlog.testing.capture_logs() as logs:
            link = await RpcClient.connect(str(server.config.socket))
            with pytest.raises(PeerError):
                await link.request(GetRequest(Priority.HIGH), REPLY_TIMEOUT)
            link.close()
        errors = [e for e in logs if e["event"] == "protocol_error"]
        assert len(errors) == 1, logs
        assert errors[0]["peer_pid"] == os.getpid()
        assert errors[0]["peer_uid"] == os.getuid()
        assert errors[0]["code"] == "NOT_REGISTERED"


# ---- error messages that say what is wrong ---------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wrong", ["count", "seq", "slot"])
async def test_a_mismatched_complete_request_says_what_does_not_match(
    short_tmp: Path, mem_dir: Path, wrong: str
) -> None:
    """A CompleteRequest that does not match the batch the daemon issued is refused with
    SLOT_NOT_ISSUED and a message naming the field that is wrong: a wrong count is not called
    "a seq that was not issued"."""
    async with running_platform(short_tmp, mem_dir) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=64)
        await agent.write_pages(np.arange(8))
        await agent.link.ctl("retire", mpn=int(agent.frame[5]))
        req = await agent.get_request()
        assert req.service == ServiceType.PAGE_RETIRE and req.count == 1
        agent.decide(req)
        slot, count, seq = req.slot, req.count, req.seq
        if wrong == "count":
            count = 2
        elif wrong == "seq":
            seq = req.seq + 7
        else:
            slot = 3
        agent.link.send(CompleteRequest(slot, count, seq))
        await asyncio.wait_for(asyncio.shield(agent.link.closed), REPLY_TIMEOUT)
        [error] = agent.errors
        assert error.code == ErrorCode.SLOT_NOT_ISSUED
        text = error.message
        if wrong == "count":
            assert "count 2" in text and "has count 1" in text and "not issued" not in text, text
        elif wrong == "seq":
            assert f"seq {seq}" in text and f"has seq {req.seq}" in text, text
        else:
            assert "no batch is issued in slot 3" in text, text
        agent.unmap()


# ---- how many pages a fault reply maps (section 10.3) --------------------------------------


@pytest.mark.timeout(60)
async def test_only_first_touch_and_swap_in_replies_map_neighbours(
    short_tmp: Path, mem_dir: Path
) -> None:
    """With around=16: a first touch maps the page and its 16 untouched neighbours, and a
    swap-in the page and its 16 swapped neighbours (17 pages, as docs/protocol.md 10.3 now
    says); a COW or MAPPED reply maps the faulting page alone, untouched neighbours or not.
    (This pins the corrected document: the daemon was right, the text was not.)"""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        first = await agent.fault(900, write=False, around=16)
        assert (FaultReason(first.reason), len(first.bpns)) == (FaultReason.FIRST_TOUCH, 17)
        cow = await agent.fault(900, write=True, around=16)
        assert (FaultReason(cow.reason), len(cow.bpns)) == (FaultReason.COW, 1)
        mapped = await agent.fault(900, write=True, around=16)
        assert (FaultReason(mapped.reason), len(mapped.bpns)) == (FaultReason.MAPPED, 1)

        await agent.write_pages(np.arange(600))
        server.memsched.set_host_limit(server.machine.allocator.used - 300)
        await reclaim(server, [agent])
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        state = server.vms[agent.vm_id].p2m.state
        swapped = state == PageState.SWAPPED
        runs = [b for b in range(600 - 16) if swapped[b : b + 17].all()]
        assert runs, "no run of 17 swapped pages"
        reply = await agent.fault(runs[0], write=False, around=16)
        assert (FaultReason(reply.reason), len(reply.bpns)) == (FaultReason.SWAP_IN, 17)
        assert reply.bpns.tolist() == list(range(runs[0], runs[0] + 17))
        await agent.verify(np.arange(runs[0], runs[0] + 17))
        await agent.close()
