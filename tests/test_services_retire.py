"""Page retire and p2mUpdate of a real in-process PlatformServer, against a scripted fake agent.

A retired frame must never be handed out again, and whatever page it held must keep its
bytes: moved to a healthy frame on the same node, or swapped out and back in. Retiring the
shared zero frame goes through p2mUpdate: VMMs drop their stale read-only mappings of it
and only then is it retired.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from platform_daemon.allocator import FrameState
from platform_daemon.server import PlatformServer
from shared.constants import NO_FRAME, FaultReason, PageState, ServiceType
from shared.messages import Kick
from tests.test_services_swap import (
    FakeAgent,
    metric,
    running_platform,
    swap_in_flight,
    wait_until,
)


def assert_never_allocated(server: PlatformServer, *mpns: int) -> None:
    """Take every free frame of every node: none of ``mpns`` may be among them."""
    alloc = server.machine.allocator
    free = alloc.free
    got = alloc.allocate(free, 0)
    try:
        assert len(got) == free
        assert not np.isin(list(mpns), got).any(), "a retired frame was handed out"
        assert (alloc.frame_state[list(mpns)] == FrameState.RETIRED).all()
    finally:
        alloc.release(got)
    assert alloc.free == free


def kicked_for(agent: FakeAgent, service: ServiceType) -> bool:
    return any(isinstance(m, Kick) and m.pending & service.bit for m in agent.unsolicited)


@pytest.mark.timeout(60)
async def test_retire_frame_in_use_moves_page_to_healthy_frame(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Retiring the frame of an exposed page kicks the VM; the PAGE_RETIRE batch offers the
    page with its failing MPN; once the VMM releases it, the page is copied to a healthy
    frame on the same NUMA node (bytes intact, next touch remaps it) and the old frame is
    RETIRED for good: not after more allocations, not after the VM is gone."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        await agent.write_pages(np.arange(64))
        alloc = server.machine.allocator
        bpn = 10
        old = int(agent.frame[bpn])
        node = int(alloc.node_of(np.array([old]))[0])
        retired_before = alloc.retired

        result = await agent.link.ctl("retire", mpn=old)
        assert result["was"] == "used" and result["bpn"] == bpn
        assert result["page_state"] == "exposed"
        await wait_until(lambda: kicked_for(agent, ServiceType.PAGE_RETIRE), "a retire kick")
        assert agent.region.pending & ServiceType.PAGE_RETIRE.bit

        batches = await agent.round()
        assert len(batches) == 1
        req, offered, accepted = batches[0]
        assert req.service == ServiceType.PAGE_RETIRE
        assert offered.tolist() == [bpn] and accepted.tolist() == [bpn]
        assert agent.region.slot(req.slot).mpn[0] == old
        await agent.barrier()

        vm = server.vms[agent.vm_id]
        new = int(vm.p2m.frame[bpn])
        assert new not in (old, NO_FRAME)
        assert int(alloc.node_of(np.array([new]))[0]) == node, "moved off its NUMA node"
        assert vm.p2m.state[bpn] == PageState.RESIDENT
        assert alloc.frame_state[old] == FrameState.RETIRED
        assert not server.machine.failing[old]
        assert alloc.retired == retired_before + 1
        assert vm.stats.retired_moves == 1
        assert metric(server, "vmmem_retired_frames_total", was="used") == 1
        reasons = await agent.verify(np.arange(64))
        assert reasons == {"REMAP": 1}
        assert agent.frame[bpn] == new
        assert (await agent.link.ctl("retire", mpn=old))["was"] == "retired"

        # Many allocations later the frame is still out of use.
        await agent.write_pages(np.arange(64, 1024))
        assert old not in agent.frame.tolist()
        assert_never_allocated(server, old)
        await agent.verify(np.arange(1024))
        await agent.close()
        await wait_until(lambda: not server.vms, "the VM to be released")
        assert alloc.frame_state[old] == FrameState.RETIRED
        zero_frames = len(server.machine.zero_frame)
        assert alloc.free == alloc.host_pages - alloc.retired - zero_frames
        assert_never_allocated(server, old)


@pytest.mark.timeout(60)
async def test_retire_free_frame_only_leaves_the_free_pool(short_tmp: Path, mem_dir: Path) -> None:
    """A free frame that is retired simply leaves the free pool (free count down by one, no
    VM disturbed) and is never handed out again, even when every frame is allocated."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=512)
        await agent.write_pages(np.arange(128))
        alloc = server.machine.allocator
        free = np.flatnonzero(alloc.frame_state == FrameState.FREE)
        victims = [int(free[0]), int(free[len(free) // 2]), int(free[-1])]
        free_before, used_before = alloc.free, alloc.used
        for i, mpn in enumerate(victims):
            result = await agent.link.ctl("retire", mpn=mpn)
            assert result == {"mpn": mpn, "was": "free"}
            assert alloc.free == free_before - i - 1
        assert alloc.used == used_before
        assert metric(server, "vmmem_retired_frames_total", was="free") == len(victims)
        assert agent.kicks == []
        assert server.vms[agent.vm_id].stats.retired_moves == 0

        await agent.write_pages(np.arange(128, 512))
        assert not np.isin(victims, agent.frame).any()
        assert_never_allocated(server, *victims)
        await agent.verify(np.arange(512))
        await agent.close()


@pytest.mark.timeout(60)
async def test_retire_frame_whose_swap_out_is_in_flight(short_tmp: Path, mem_dir: Path) -> None:
    """Retiring the frame of a page whose swap-out is in flight needs no move: when the
    delayed write lands, the frame is retired instead of freed, and the page swaps back in
    intact on another frame. If a fault cancels the swap-out instead, the page is back on
    its failing frame and a PAGE_RETIRE batch moves it; the late write is discarded and the
    frame still ends retired, not freed."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        written = np.arange(512)
        await agent.write_pages(written)
        alloc = server.machine.allocator
        await server.ctl.handle("failpoint", {"name": "swap_write_delay", "value": 1.0})
        server.memsched.set_host_limit(alloc.used - 60)
        server.memsched.tick(time.monotonic())
        req = await agent.get_request()
        assert req.service == ServiceType.SWAP and req.count >= 2
        offered = agent.batch(req)[0].astype(np.int64)
        frames_of = dict(zip(offered.tolist(), agent.frame[offered].tolist(), strict=True))
        accepted = agent.decide(req)
        agent.complete(req)
        assert not (await agent.get_request()).has_work  # the round ends: target met
        vm = server.vms[agent.vm_id]
        landing, cancelled = int(accepted[0]), int(accepted[1])
        f_landing, f_cancelled = frames_of[landing], frames_of[cancelled]
        assert vm.p2m.state[landing] == vm.p2m.state[cancelled] == PageState.IN_FLIGHT

        for mpn, bpn in ((f_landing, landing), (f_cancelled, cancelled)):
            result = await agent.link.ctl("retire", mpn=mpn)
            assert result["was"] == "used" and result["bpn"] == bpn
            assert result["page_state"] == "in_flight"
            assert alloc.frame_state[mpn] == FrameState.USED  # still holds the page

        # A fault cancels one swap-out: the page comes back on its (failing) frame...
        reply = await agent.fault(cancelled, write=False)
        assert reply.reason == FaultReason.CANCEL and int(reply.mpns[0]) == f_cancelled
        await agent.verify([cancelled])
        # ...and the retire queue moves it (reclaim is over: no swap batch in this round).
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        batches = await agent.round()
        assert [(int(r.service), o.tolist()) for r, o, _ in batches] == [
            (ServiceType.PAGE_RETIRE, [cancelled])
        ]
        await agent.barrier()
        assert vm.p2m.frame[cancelled] not in (f_cancelled, NO_FRAME)
        assert alloc.frame_state[f_cancelled] == FrameState.RETIRED
        await agent.verify([cancelled])

        await wait_until(lambda: swap_in_flight(server) == 0, "the delayed write to land")
        assert vm.p2m.state[landing] == PageState.SWAPPED
        assert alloc.frame_state[f_landing] == FrameState.RETIRED, "freed instead of retired"
        assert alloc.frame_state[f_cancelled] == FrameState.RETIRED
        assert not server.machine.failing[[f_landing, f_cancelled]].any()
        assert vm.p2m.state[cancelled] in (PageState.RESIDENT, PageState.EXPOSED)
        assert server.swap is not None
        assert server.swap.used == np.count_nonzero(vm.p2m.state == PageState.SWAPPED)

        reply = await agent.fault(landing)
        assert reply.reason == FaultReason.SWAP_IN
        assert int(reply.mpns[0]) not in (f_landing, f_cancelled)
        await agent.verify(written)
        assert_never_allocated(server, f_landing, f_cancelled)
        await agent.close()


@pytest.mark.timeout(60)
async def test_retire_shared_zero_frame_goes_through_p2m_update(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Retiring the shared zero frame points every sharer at a fresh zero frame and queues
    p2mUpdate: the VM is kicked, gets a P2M_UPDATE batch naming the old zero frame as MPN,
    and only when it drops those mappings is the old frame retired; the staleness histogram
    saw every page. Reads then map the new zero frame; writes copy it."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=512)
        await agent.write_pages(np.arange(100, 140))  # private pages: not involved
        for first in (0, 16):
            reply = await agent.fault(first, write=False, around=15)
            assert reply.reason == FaultReason.FIRST_TOUCH and len(reply.bpns) == 16
        readers = np.arange(32)
        vm = server.vms[agent.vm_id]
        old = server.machine.zero_frame[vm.home_node]
        assert (agent.frame[readers] == old).all() and not agent.writable[readers].any()
        assert not agent.frames[old].any()
        alloc = server.machine.allocator
        p2m_update = server.services[ServiceType.P2M_UPDATE]

        result = await agent.link.ctl("retire", mpn=old)
        new = server.machine.zero_frame[vm.home_node]
        assert result == {
            "mpn": old,
            "was": "zero_frame",
            "node": vm.home_node,
            "new_mpn": new,
            "stale_pages": 32,
        }
        assert new != old
        assert (vm.p2m.frame[readers] == new).all()
        # The VMM still maps the old frame: it must stay allocated until it lets go.
        assert alloc.frame_state[old] == FrameState.USED
        assert p2m_update.stale_frames() == 1  # type: ignore[attr-defined]
        await wait_until(lambda: kicked_for(agent, ServiceType.P2M_UPDATE), "a p2mUpdate kick")

        req = await agent.get_request()
        assert req.service == ServiceType.P2M_UPDATE and req.count == 32
        bpns, _, mpns = agent.batch(req)
        assert sorted(bpns.tolist()) == readers.tolist()
        assert (mpns == old).all()
        accepted = agent.decide(req)
        assert sorted(accepted.tolist()) == readers.tolist()
        agent.complete(req)
        assert not (await agent.get_request()).has_work
        assert alloc.frame_state[old] == FrameState.RETIRED
        assert not server.machine.failing[old]
        assert p2m_update.stale_frames() == 0  # type: ignore[attr-defined]
        assert vm.stats.p2m_updates == 32
        assert metric(server, "vmmem_p2m_stale_mapping_seconds_count") == 32
        assert (vm.p2m.state[readers] == PageState.RESIDENT).all()

        reply = await agent.fault(0, write=False)
        assert reply.reason == FaultReason.REMAP and int(reply.mpns[0]) == new
        assert not agent.writable[0] and not agent.frames[new].any()
        reply = await agent.fault(1, write=True)
        assert reply.reason == FaultReason.COW and int(reply.mpns[0]) not in (old, new)
        await agent.write_pages([1, 2, 3], version=1)
        await agent.verify(np.concatenate(([1, 2, 3], np.arange(100, 140))))
        assert_never_allocated(server, old)
        await agent.close()


@pytest.mark.timeout(60)
async def test_retire_frame_whose_swap_write_then_fails(short_tmp: Path, mem_dir: Path) -> None:
    """A page whose frame is retired while its swap-out is in flight, and whose write then
    fails, is left resident on its failing frame: the retire service must still move it to
    a healthy frame (no VMM mapping to drop) and retire the old one, bytes intact."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        written = np.arange(512)
        await agent.write_pages(written)
        alloc = server.machine.allocator
        await server.ctl.handle("failpoint", {"name": "swap_write_delay", "value": 0.5})
        await server.ctl.handle("failpoint", {"name": "swap_write_error", "value": 5})
        server.memsched.set_host_limit(alloc.used - 60)
        server.memsched.tick(time.monotonic())
        batches = await agent.round()
        assert len(batches) == 1 and batches[0][0].service == ServiceType.SWAP
        bpn = int(batches[0][2][0])
        vm = server.vms[agent.vm_id]
        mpn = int(vm.p2m.frame[bpn])
        result = await agent.link.ctl("retire", mpn=mpn)
        assert result["page_state"] == "in_flight"

        await wait_until(lambda: swap_in_flight(server) == 0, "the failing write")
        assert metric(server, "vmmem_swap_errors_total", reason="io_error") > 0
        await server.ctl.handle("failpoint", {"name": "swap_write_delay", "value": 0})
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        await agent.round()
        await agent.barrier()
        assert vm.p2m.frame[bpn] not in (mpn, NO_FRAME), "page left on its failing frame"
        assert alloc.frame_state[mpn] == FrameState.RETIRED
        await agent.verify(written)
        assert_never_allocated(server, mpn)
        await agent.close()


@pytest.mark.timeout(60)
async def test_zero_frame_retired_even_if_a_page_faults_during_its_p2m_update(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A page of a P2M_UPDATE batch that faults before the batch completes (a write: COW
    onto a private frame) no longer maps the old zero frame either; it must not keep the
    old frame alive: once the batch completes, the old zero frame is retired."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=256)
        await agent.fault(0, write=False, around=7)
        vm = server.vms[agent.vm_id]
        old = server.machine.zero_frame[vm.home_node]
        assert (agent.frame[:8] == old).all()
        await agent.link.ctl("retire", mpn=old)
        req = await agent.get_request()
        assert req.service == ServiceType.P2M_UPDATE and req.count == 8
        # The guest writes page 3 before the VMM processes the batch.
        reply = await agent.fault(3, write=True)
        assert reply.reason == FaultReason.COW
        await agent.write_pages([3])
        agent.decide(req)  # page 3 is now private: the filter refuses it (NOT_SHARED)
        agent.complete(req)
        assert not (await agent.get_request()).has_work
        p2m_update = server.services[ServiceType.P2M_UPDATE]
        assert p2m_update.stale_frames() == 0  # type: ignore[attr-defined]
        assert server.machine.allocator.frame_state[old] == FrameState.RETIRED
        assert metric(server, "vmmem_p2m_stale_mapping_seconds_count") == 8
        await agent.verify([3])
        await agent.close()
