"""The platform's half of ballooning, against a scripted agent: agent-filled BALLOON batches
free whatever backs the pages (private frames, shared references, swap slots, operations in
flight), bad batches are protocol errors, and memsched's targets drive it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from platform_daemon.invariants import HostState, check
from shared.constants import FaultReason, FreeState, PageState, ServiceType
from shared.layout import SlotState
from shared.messages import CompleteRequest, Request

from .test_services_swap import (
    FakeAgent,
    metric,
    reclaim,
    running_platform,
    swap_in_flight,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def want(server: object, agent: FakeAgent, pages: int) -> None:
    """memsched wants the agent's balloon to hold ``pages`` (as a balance would plan)."""
    server.memsched.balloon_targets[agent.vm_id] = pages  # type: ignore[attr-defined]
    agent.region.balloon_target_pages = pages


async def give(agent: FakeAgent, bpns: list[int]) -> Request:
    """Answer the next request, a BALLOON one, with ``bpns``, as a balloon driver does."""
    req = await agent.get_request()
    assert req.service == ServiceType.BALLOON and req.has_work, req
    slot = agent.region.slot(req.slot)
    assert slot.read_header()[1] == SlotState.ISSUED
    k = len(bpns)
    slot.bpn[:k] = bpns
    slot.status[:k] = 0
    agent.frame[bpns] = -1  # the guest no longer has these pages
    agent.written[bpns] = False
    size = agent.region.balloon_pages + k
    agent.region.write_guest_report(size, 0, 0.0)
    agent.link.send(CompleteRequest(req.slot, k, req.seq))
    await agent.barrier()
    return req


def invariants_hold(server: object) -> None:
    assert check(HostState.of(server)) == []  # type: ignore[arg-type]


async def test_balloon_frees_what_backs_each_kind_of_page(short_tmp: Path, mem_dir: Path) -> None:
    """Private pages free their frames, a read-only zero-frame page and an untouched page
    free nothing (but count), a swapped page frees its slot without being read. Pages are
    then untouched: a later touch is a first touch."""
    swap = short_tmp / "swap"
    async with running_platform(short_tmp, mem_dir, host_mib=16, swap_file=swap) as server:
        agent = await FakeAgent.connect(server, "b", guest_pages=512, balloon_driver=True)
        await agent.write_pages(np.arange(0, 200))
        await agent.fault(300, write=False)  # a read of an untouched page: the zero frame
        # Swap some pages out (the agent has no balloon target yet: swap only).
        server.memsched.set_host_limit(server.machine.allocator.used - 40)
        await reclaim(server, [agent], max_ticks=10)
        vm = server.vms[agent.vm_id]
        swapped = np.flatnonzero(vm.p2m.state == PageState.SWAPPED)
        assert len(swapped) > 0
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        private = [int(b) for b in np.arange(0, 200) if vm.p2m.state[b] == PageState.EXPOSED][:50]
        chosen = [*private, 300, 400, int(swapped[0])]
        used, slots = server.machine.allocator.used, server.swap.used  # type: ignore[union-attr]
        want(server, agent, len(chosen))
        server.kick(vm)
        req = await give(agent, chosen)
        assert req.count == len(chosen)
        assert (vm.p2m.state[chosen] == PageState.ZERO).all()
        assert (vm.p2m.frame[chosen] < 0).all() and (vm.p2m.flags[chosen] == 0).all()
        assert server.machine.allocator.used == used - 50  # the private frames only
        assert server.swap.used == slots - 1  # type: ignore[union-attr]
        assert vm.stats.ballooned == len(chosen) and vm.stats.swap_dropped == 1
        assert vm.stats.swapped_now == len(swapped) - 1
        assert metric(server, "vmmem_balloon_reclaimed_pages_total") == len(chosen)
        invariants_hold(server)
        # The target is met: no more BALLOON work; a touch of a ballooned page is first touch.
        assert not server.services[ServiceType.BALLOON].has_work(vm)
        reply = await agent.fault(chosen[0], write=True)
        assert reply.reason == FaultReason.FIRST_TOUCH
        assert not agent.frames[agent.frame[chosen[0]]].any()  # a zeroed frame, nothing stale
        await agent.close()


async def test_agent_may_give_fewer_pages_and_is_asked_again(
    short_tmp: Path, mem_dir: Path
) -> None:
    """The driver's rate limit: it may fill fewer pages than the slot has room for (even
    none); the daemon takes those and keeps asking until the target is met."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "b", guest_pages=512, balloon_driver=True)
        await agent.write_pages(np.arange(100))
        vm = server.vms[agent.vm_id]
        want(server, agent, 30)
        server.kick(vm)
        first = await give(agent, [])  # rate-limited: nothing this time
        assert first.count == 30
        assert server.services[ServiceType.BALLOON].has_work(vm)
        again = await give(agent, list(range(10)))
        assert again.count == 30  # still 30 wanted
        third = await give(agent, list(range(10, 30)))
        assert third.count == 20
        assert not server.services[ServiceType.BALLOON].has_work(vm)
        assert vm.stats.ballooned == 30
        await agent.close()


async def test_page_in_flight_is_cancelled_then_freed(short_tmp: Path, mem_dir: Path) -> None:
    """A page whose swap-out is still writing (slow writes) is given to the balloon: the
    swap-out is cancelled (its slot goes back when the write lands), the frame is freed,
    and nothing leaks."""
    swap = short_tmp / "swap"
    async with running_platform(short_tmp, mem_dir, host_mib=16, swap_file=swap) as server:
        agent = await FakeAgent.connect(server, "b", guest_pages=512, balloon_driver=True)
        await agent.write_pages(np.arange(300))
        server.swap.write_delay = 0.5  # type: ignore[union-attr]
        server.memsched.set_host_limit(server.machine.allocator.used - 40)
        server.memsched.tick(time.monotonic())
        await agent.round()
        vm = server.vms[agent.vm_id]
        in_flight = np.flatnonzero(vm.p2m.state == PageState.IN_FLIGHT)
        assert len(in_flight) > 0
        victim = int(in_flight[0])
        server.memsched.set_host_limit(server.machine.host_pages)
        server.memsched.tick(time.monotonic())
        want(server, agent, 1)
        server.kick(vm)
        await give(agent, [victim])
        assert vm.p2m.state[victim] == PageState.ZERO and vm.p2m.frame[victim] < 0
        await wait_until(lambda: swap_in_flight(server) == 0, "the write to land")
        assert vm.p2m.state[victim] == PageState.ZERO  # the landing write did not resurrect it
        invariants_hold(server)
        assert server.swap.used == vm.stats.swapped_now  # type: ignore[union-attr]
        await agent.close()


@pytest.mark.parametrize(
    "bad",
    ["too_many", "out_of_range", "twice", "not_ok"],
)
async def test_bad_balloon_batch_is_a_protocol_error(
    short_tmp: Path, mem_dir: Path, bad: str
) -> None:
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "b", guest_pages=64, balloon_driver=True)
        await agent.write_pages(np.arange(10))
        vm = server.vms[agent.vm_id]
        want(server, agent, 4)
        server.kick(vm)
        req = await agent.get_request()
        slot = agent.region.slot(req.slot)
        pages, count = [0, 1, 2], 3
        if bad == "too_many":
            count = req.count + 1
        elif bad == "out_of_range":
            pages = [0, 1, 64]
        elif bad == "twice":
            pages = [0, 1, 1]
        slot.bpn[:3] = pages
        slot.status[:3] = 0
        if bad == "not_ok":
            slot.status[2] = 1
        agent.link.send(CompleteRequest(req.slot, count, req.seq))
        await wait_until(lambda: not vm.alive, f"the daemon to drop the VM ({bad})")
        assert agent.errors, "the peer is told why"
        assert (server.machine.allocator.used) == 2  # everything of the VM released
        await agent.close()


async def test_memsched_sets_balloon_targets_in_soft_and_swap_in_hard(
    short_tmp: Path, mem_dir: Path
) -> None:
    """With a working-set estimate of the VM unknown (all of it active), its balloon has no
    room; a VM whose sampling says it is mostly idle gets a balloon target in SOFT and no swap
    target; in HARD the rest goes to swap."""
    swap = short_tmp / "swap"
    async with running_platform(short_tmp, mem_dir, host_mib=16, swap_file=swap) as server:
        agent = await FakeAgent.connect(server, "b", guest_pages=2048, balloon_driver=True)
        await agent.write_pages(np.arange(2000))
        sampling = server.services[ServiceType.SAMPLING]
        sampling.estimate_fraction = lambda vm: 0.1  # type: ignore[attr-defined]
        used = server.machine.allocator.used
        ms = server.memsched
        ms.set_host_limit(round(used / (1 - 0.03)))  # 3 % free: SOFT
        ms.tick(time.monotonic())
        assert ms.state == FreeState.SOFT
        assert ms.balloon_targets[agent.vm_id] > 0
        assert ms.swap_targets[agent.vm_id] == 0
        assert agent.region.balloon_target_pages == ms.balloon_targets[agent.vm_id]
        assert agent.region.pending & ServiceType.BALLOON.bit
        status = (await agent.barrier())["vms"][0]["memsched"]
        assert status["balloon_target"] == ms.balloon_targets[agent.vm_id]
        assert status["wss_pages"] == round(0.1 * 2048) and status["rho"] > 0
        ms.set_host_limit(used - 1600)  # LOW, and more than the balloon may take
        ms.tick(time.monotonic())
        assert ms.balloon_targets[agent.vm_id] == int(0.65 * 2048)
        assert ms.swap_targets[agent.vm_id] > 0
        assert ms.blocking
        await agent.close()
