"""A VM that goes away, cleanly or not, gives back everything it held; other VMs never notice.

A real in-process PlatformServer and scripted fake agents (see test_services_swap.py): one
disconnects in the middle of a batch with swap-outs in flight, others break the protocol.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from platform_daemon.allocator import FrameState
from platform_daemon.server import PlatformServer
from shared.codec import HEADER, MAGIC, VERSION
from shared.constants import PageState, ServiceType
from shared.errors import ErrorCode
from shared.messages import CompleteRequest, Fault
from tests.test_services_swap import (
    REPLY_TIMEOUT,
    FakeAgent,
    metric,
    reclaim,
    running_platform,
    swap_in_flight,
    wait_until,
)
from vmm_agent.rpc import ConnectionClosed, PeerError, RpcClient


def private_frames(server: PlatformServer, agent: FakeAgent) -> int:
    vm = server.vms[agent.vm_id]
    return int(np.count_nonzero((vm.p2m.frame >= 0) & (vm.p2m.flags == 0)))


@pytest.mark.timeout(60)
async def test_disconnect_mid_batch_with_swap_outs_in_flight(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A VM that closes its socket after receiving a Request and before CompleteRequest,
    with swap-outs still being written and pages already in swap: all its frames are free
    again, its swap slots too once the late writes land (the writes are discarded), its
    control region file is gone, and a second VM connected meanwhile keeps faulting and
    reading its own intact bytes throughout."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        alloc = server.machine.allocator
        baseline_free = alloc.free  # only the shared zero frames are in use
        assert alloc.used == len(server.machine.zero_frame)
        swap = server.swap
        assert swap is not None
        other = await FakeAgent.connect(server, "other", guest_pages=512)
        await other.write_pages(np.arange(200))
        leaver = await FakeAgent.connect(server, "leaver", guest_pages=1024)
        await leaver.write_pages(np.arange(600))
        for bpn in (700, 800):  # read-only mappings of the shared zero frame
            await leaver.fault(bpn, write=False, around=8)
        leaver_vm = server.vms[leaver.vm_id]
        region_path = Path(leaver.reg.control_region_path)
        assert region_path.exists()

        # Some pages go all the way to swap (the other VM takes no part in reclaim).
        server.memsched.set_host_limit(alloc.used - 40)
        await reclaim(server, [leaver], max_ticks=3)
        fully_swapped = int(np.count_nonzero(leaver_vm.p2m.state == PageState.SWAPPED))
        assert fully_swapped > 0 and swap.used == fully_swapped

        # Then writes are slowed down; one batch goes in flight, a second is held open.
        await server.ctl.handle("failpoint", {"name": "swap_write_delay", "value": 1.0})
        server.memsched.set_host_limit(alloc.used - 40)
        server.memsched.tick(time.monotonic())
        first = await leaver.get_request()
        second = await leaver.get_request()
        assert first.service == second.service == ServiceType.SWAP
        assert first.has_work and second.has_work
        leaver.decide(first)
        leaver.complete(first)
        await leaver.barrier()
        in_flight = swap_in_flight(server)
        assert in_flight == first.count
        held = leaver.batch(second)[0].astype(np.int64)
        assert (leaver_vm.p2m.state[held] == PageState.SELECTED).all()
        assert swap.used == fully_swapped + in_flight

        # Gone, mid-batch: no CompleteRequest for the second slot.
        await leaver.close()
        await wait_until(lambda: leaver.vm_id not in server.vms, "the VM to be released")
        assert not leaver_vm.alive
        assert not region_path.exists()
        assert (server.machine.owner_vm != leaver.vm_id).all()
        assert alloc.free == baseline_free - private_frames(server, other)
        # The other VM works on while the dead VM's writes are still in the air.
        assert (await other.verify(np.arange(200))) == {}
        await other.write_pages(np.arange(200, 300))
        await wait_until(lambda: swap.used == 0, "the late writes to land")
        await wait_until(lambda: not server.tasks, "the daemon's tasks to finish")
        assert not swap.in_use.any()
        assert alloc.free == baseline_free - private_frames(server, other)
        used = alloc.frame_state == FrameState.USED
        assert int(np.count_nonzero(used)) == alloc.used
        assert alloc.used == len(server.machine.zero_frame) + private_frames(server, other)
        assert metric(server, "vmmem_platform_vm_disconnects_total") == 1

        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        await other.verify(np.arange(300))
        assert other.errors == []
        assert not other.link.closed.done()
        await other.close()
        await wait_until(lambda: not server.vms, "the other VM to be released")
        assert alloc.free == baseline_free


def garbage_header(mtype: int = 99) -> bytes:
    return HEADER.pack(MAGIC, VERSION, mtype, 0, 4, 7) + b"\0\0\0\0"


VIOLATIONS = {
    "bpn_out_of_range": ErrorCode.BPN_OUT_OF_RANGE,
    "garbage_bytes": ErrorCode.BAD_MAGIC,
    "unknown_type": ErrorCode.UNKNOWN_TYPE,
    "slot_not_issued": ErrorCode.SLOT_NOT_ISSUED,
    "tampered_batch": ErrorCode.BAD_BODY,
    "fault_before_register": ErrorCode.NOT_REGISTERED,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("violation", list(VIOLATIONS))
async def test_protocol_violation_disconnects_only_that_peer(
    short_tmp: Path, mem_dir: Path, violation: str
) -> None:
    """A peer that breaks the protocol gets an Error with the matching code and is
    disconnected; everything its VM held is released (frames, control region file), and a
    VM connected alongside keeps its connection and its bytes."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        alloc = server.machine.allocator
        good = await FakeAgent.connect(server, "good", guest_pages=256)
        await good.write_pages(np.arange(128))
        free_before = alloc.free
        expected = VIOLATIONS[violation]

        if violation == "fault_before_register":
            unsolicited: list[object] = []
            link = await RpcClient.connect(str(server.config.socket), on_message=unsolicited.append)
            with pytest.raises(PeerError) as info:
                await link.request(Fault(0, True, 0), REPLY_TIMEOUT)
            assert info.value.code == expected
            await asyncio.wait_for(link.closed, REPLY_TIMEOUT)
            link.close()
        else:
            bad = await FakeAgent.connect(server, "bad", guest_pages=256)
            await bad.write_pages(np.arange(64))
            region_path = Path(bad.reg.control_region_path)
            retired = None
            code: int | None = None
            if violation == "bpn_out_of_range":
                with pytest.raises(PeerError) as info:
                    await bad.link.request(Fault(256, False, 0), REPLY_TIMEOUT)
                code = info.value.code
            elif violation in ("garbage_bytes", "unknown_type"):
                assert bad.link.transport is not None
                data = b"GARBAGE!" * 4 if violation == "garbage_bytes" else garbage_header()
                bad.link.transport.write(data)
            elif violation == "slot_not_issued":
                bad.link.send(CompleteRequest(1, 3, 42))
            elif violation == "tampered_batch":
                retired = int(bad.frame[5])
                await bad.link.ctl("retire", mpn=retired)
                req = await bad.get_request()
                assert req.service == ServiceType.PAGE_RETIRE and req.count == 1
                bad.decide(req)
                bad.region.slot(req.slot).bpn[0] = 6  # not the page it was offered
                bad.complete(req)
            await asyncio.wait_for(asyncio.shield(bad.link.closed), REPLY_TIMEOUT)
            if code is None:
                errors = bad.errors
                assert len(errors) == 1, bad.unsolicited
                code = errors[0].code
            assert code == expected
            with pytest.raises(ConnectionClosed):
                bad.link.send(Fault(0, False, 0))
            bad.unmap()
            await wait_until(lambda: bad.vm_id not in server.vms, "the bad VM to be released")
            assert not region_path.exists()
            assert (server.machine.owner_vm != bad.vm_id).all()
            if retired is not None:  # its failing frame is retired, not freed
                assert alloc.frame_state[retired] == FrameState.RETIRED
                assert alloc.free == free_before - 1
            else:
                assert alloc.free == free_before
        assert (
            metric(server, "vmmem_platform_protocol_errors_total", code=expected.name.lower()) == 1
        )

        # The good VM never noticed.
        assert not good.link.closed.done()
        assert good.errors == []
        await good.verify(np.arange(128))
        await good.write_pages(np.arange(128, 256))
        await good.verify(np.arange(256))
        assert list(server.vms) == [good.vm_id]
        await good.close()
