"""memsched, first part: free states, swap targets by shares, bounded waits in the low state."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from shared.constants import FreeState
from shared.errors import ErrorCode
from vmm_agent.rpc import PeerError

from .test_services_swap import FakeAgent, metric, reclaim, running_platform

pytestmark = pytest.mark.timeout(60)


async def test_free_states_follow_the_thresholds(short_tmp: Path, mem_dir: Path) -> None:
    """HIGH above soft %, SOFT above hard %, HARD above low %, LOW below, under the limit."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=2048)
        await agent.write_pages(np.arange(2000))
        ms, used = server.memsched, server.machine.allocator.used
        expected = [(0.05, FreeState.HIGH), (0.03, FreeState.SOFT), (0.015, FreeState.HARD),
                    (0.005, FreeState.LOW)]  # fmt: skip
        for free_fraction, state in expected:
            # Thresholds are percentages of the limit: free = fraction x limit.
            ms.set_host_limit(round(used / (1 - free_fraction)))
            assert ms.compute_state() == state, (free_fraction, ms.counts())
        ms.set_host_limit(used)  # nothing left at all
        assert ms.compute_state() == FreeState.LOW and server.machine.available() == 0


async def test_swap_targets_follow_shares_per_page(short_tmp: Path, mem_dir: Path) -> None:
    """Min-funding revocation (ESX'02): two VMs holding the same pages, one with 3x the
    shares. Memory comes from the lower shares per page first: a small reclaim from it
    alone; a large one from both, leaving them at about equal shares per page (the one with
    3x the shares keeps about 3x the pages). No working-set estimate yet: no idle tax."""
    async with running_platform(short_tmp, mem_dir, host_mib=32) as server:
        a = await FakeAgent.connect(server, "a", guest_pages=1024)
        b = await FakeAgent.connect(server, "b", guest_pages=1024, shares=3000)
        await a.write_pages(np.arange(1024))
        await b.write_pages(np.arange(1024))
        used = server.machine.allocator.used
        server.memsched.set_host_limit(used - 400)
        server.memsched.tick(time.monotonic())
        targets = server.memsched.swap_targets
        assert targets[a.vm_id] >= 400  # the excess over the limit and the free target
        assert targets[b.vm_id] == 0
        server.memsched.set_host_limit(used - 1400)
        server.memsched.tick(time.monotonic())
        ta, tb = targets[a.vm_id], targets[b.vm_id]
        assert ta + tb >= 1400 and tb > 0
        kept_a, kept_b = 1024 - ta, 1024 - tb
        assert 2.5 < kept_b / kept_a < 3.5, (kept_a, kept_b)


async def test_low_state_fault_waits_for_reclaim_then_is_served(
    short_tmp: Path, mem_dir: Path
) -> None:
    """In LOW, a first touch waits (counted) until reclaim frees frames, then gets one."""
    async with running_platform(short_tmp, mem_dir, host_mib=16, low_wait_seconds=5.0) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=2048)
        await agent.write_pages(np.arange(1000))
        server.memsched.set_host_limit(server.machine.allocator.used)
        server.memsched.tick(time.monotonic())
        assert server.memsched.state == FreeState.LOW
        waiting = asyncio.ensure_future(agent.fault(1500, write=True))
        await asyncio.sleep(0.2)
        assert not waiting.done(), "the fault did not wait in the low state"
        await reclaim(server, [agent], max_ticks=20)
        reply = await asyncio.wait_for(waiting, 5)
        assert reply.mpns[0] >= 0
        assert metric(server, "vmmem_low_memory_waits_total", outcome="served") == 1
        server.memsched.set_host_limit(server.machine.host_pages)  # room to swap back in
        await agent.verify(np.arange(1000))


async def test_low_state_fault_fails_clearly_after_the_bound(
    short_tmp: Path, mem_dir: Path
) -> None:
    """With no reclaim possible, a waiting first touch gets OUT_OF_MEMORY after the bound."""
    async with running_platform(short_tmp, mem_dir, host_mib=16, low_wait_seconds=0.3) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=2048)
        await agent.write_pages(np.arange(1000))
        server.memsched.set_host_limit(server.machine.allocator.used)
        t0 = time.monotonic()
        with pytest.raises(PeerError) as info:
            await agent.fault(1500, write=True)  # the agent never answers a round: no reclaim
        assert info.value.code == ErrorCode.OUT_OF_MEMORY
        assert 0.25 < time.monotonic() - t0 < 3
        assert metric(server, "vmmem_low_memory_waits_total", outcome="failed") == 1
        await agent.verify(np.arange(1000))  # nothing else changed
        assert (await agent.barrier())["vms"][0]["name"] == "vm1"


async def test_free_states_work_at_any_host_limit(short_tmp: Path, mem_dir: Path) -> None:
    """Thresholds are at least one frame and in order at every limit, so no free frame is
    always LOW (a tiny limit used to round them to 0: HIGH with nothing free, nothing
    reclaimed); the smallest limit the daemon accepts has its one spare frame free."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=2048)
        ms = server.memsched
        floor = ms.minimum_limit()
        limits = [floor, floor + 1, floor + 10, floor + 50]  # nothing mapped yet: tiny limits
        await agent.write_pages(np.arange(500))
        used = server.machine.allocator.used
        limits += [used, used + 1, used + 5, used + 30, used + 100, server.machine.host_pages]
        for limit in limits:
            if limit < ms.minimum_limit():
                continue
            ms.set_host_limit(limit)
            high, soft, hard, low = ms.thresholds()
            assert high >= soft >= hard >= low >= 1, (limit, ms.thresholds())
            free = server.machine.available()
            state = ms.compute_state()
            if free == 0:
                assert state == FreeState.LOW
            if free >= soft:
                assert state == FreeState.HIGH
        ms.set_host_limit(used + 1)  # one frame free of ~500: LOW, and reclaim starts
        ms.tick(time.monotonic())
        assert ms.state == FreeState.LOW and ms.reclaiming
        await agent.close()


async def test_low_blocks_allocations_until_free_is_back_above_hard(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Entering LOW blocks first touches; leaving LOW for HARD does not unblock them (no
    storm of allocations right at the edge); free memory back above the hard threshold
    does."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=2048)
        await agent.write_pages(np.arange(1500))
        ms, used = server.memsched, server.machine.allocator.used
        ms.set_host_limit(used)
        ms.tick(time.monotonic())
        assert ms.state == FreeState.LOW and ms.blocking
        edge = next(
            x
            for x in range(1, 200)
            if (ms.set_host_limit(used + x), ms.compute_state())[1] == FreeState.HARD
        )
        ms.tick(time.monotonic())
        assert ms.state == FreeState.HARD and server.machine.available() == edge
        assert ms.blocking, "HARD, but not yet above the hard threshold"
        ms.set_host_limit(used + ms.thresholds()[2] + 5)
        ms.tick(time.monotonic())
        assert server.machine.available() >= ms.thresholds()[2]
        assert not ms.blocking
        await agent.close()


async def test_a_stalled_balloon_shows_in_status_and_gauge(short_tmp: Path, mem_dir: Path) -> None:
    """The plan's "balloon stalled" (swap takes the share of a balloon that did not inflate,
    ``balance.py``) is in the VM's memsched status and its gauge, 0 otherwise."""
    from dataclasses import replace

    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        await agent.write_pages(np.arange(512))
        ms = server.memsched
        ms.set_host_limit(server.machine.allocator.used - 100)
        ms.tick(time.monotonic())
        vm = server.vms[agent.vm_id]
        assert ms.status(vm)["balloon_stalled"] is False
        assert metric(server, "vmmem_vm_balloon_stalled", vm="vm1") == 0
        ms.plans[vm.vm_id] = replace(ms.plans[vm.vm_id], balloon_stalled=True)
        assert ms.status(vm)["balloon_stalled"] is True
        assert metric(server, "vmmem_vm_balloon_stalled", vm="vm1") == 1
        await agent.close()


async def test_a_balloon_refusal_replans_at_the_next_tick(short_tmp: Path, mem_dir: Path) -> None:
    """A balloon that owes pages and reports a refusal (its driver had none to give) makes
    the next tick plan again, not the next balance period; a tick without a new refusal, or
    a refusal from a balloon that owes nothing, does not."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        await agent.write_pages(np.arange(256))
        ms, vm = server.memsched, server.vms[agent.vm_id]
        ms.set_host_limit(server.machine.allocator.used - 100)
        t = time.monotonic()
        ms.tick(t)
        plans = ms.plans
        ms.tick(t + 0.1)
        assert ms.plans is plans  # within the balance period: no new plan
        ms.balloon_targets[vm.vm_id] = 64  # the balloon owes 64 pages
        agent.region.write_guest_report(0, 0, 0.0, balloon_refused=64)
        ms.tick(t + 0.2)
        assert ms.plans is not plans  # planned again at once
        plans = ms.plans
        ms.tick(t + 0.3)
        assert ms.plans is plans  # the same count: nothing new
        ms.balloon_targets[vm.vm_id] = 0  # owes nothing: a refusal needs no new plan
        agent.region.write_guest_report(0, 0, 0.0, balloon_refused=128)
        ms.tick(t + 0.4)
        assert ms.plans is plans
        await agent.close()


async def test_brief_status_has_the_counters_a_poller_follows(
    short_tmp: Path, mem_dir: Path
) -> None:
    """``status`` with ``brief``: the same host counters, page states, stats, memsched and
    sampling figures as the full status, none of the scans (sharing, NUMA, 2 MB, nodes);
    an unknown argument is refused."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        await agent.write_pages(np.arange(300))
        full = await agent.link.ctl("status", timeout=10)
        brief = await agent.link.ctl("status", timeout=10, brief=True)
        assert brief["brief"] is True and "brief" not in full
        for key in ("free", "used", "limit_pages", "available", "free_state"):
            assert brief["host"][key] == full["host"][key], key
        (fv,), (bv,) = full["vms"], brief["vms"]
        for key in ("vm_id", "name", "guest_pages", "pages", "stats", "memsched", "sampling"):
            assert bv[key] == fv[key], key
        assert bv["pages"]["exposed"] == 300
        assert not {"sharing", "numa", "hugepages", "lowprio"} & bv.keys()
        assert brief["swap"]["used"] == full["swap"]["used"]
        with pytest.raises(PeerError):
            await agent.link.ctl("status", timeout=10, breif=True)
        await agent.close()
