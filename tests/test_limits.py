"""Resource limits fail early and clearly (issue 7, section 3).

- ``set-host-limit``: 0, a limit below what the daemon itself needs (its zero frames, merged
  frames and frames kept for stale mappings, plus one frame for a fault) and a limit above
  the host's memory are refused with one clear error, and nothing changes.
- A full swap device (no free slot, or no space left on the device) shows in ``status`` and
  in the ``vmmem_swap_full`` gauge, and memsched stops counting on swap while it lasts.

A real in-process daemon and the scripted fake agent of ``test_services_swap.py``.
"""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path

import numpy as np
import pytest

from platform_daemon import ctl as ctl_cli
from platform_daemon.server import PlatformServer
from shared.constants import PAGE_SIZE, PageState, ServiceType
from shared.errors import VMMemError
from tests.test_services_swap import (
    FakeAgent,
    metric,
    reclaim,
    running_platform,
    swap_in_flight,
    wait_until,
)
from vmm_agent.rpc import PeerError

pytestmark = pytest.mark.timeout(60)


def _frozen(server: PlatformServer) -> tuple[int, str, bool]:
    ms = server.memsched
    return server.machine.limit_pages, ms.state.name, ms.reclaiming


async def test_host_limit_out_of_range_is_refused_and_changes_nothing(
    short_tmp: Path, mem_dir: Path
) -> None:
    """0, one page below the daemon's floor, one page above the host's memory and 1 TiB are
    each refused with a message naming the bound; the limit and free state stay as they
    were. The floor itself and the whole host are accepted."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=256)
        await agent.write_pages(np.arange(64))
        host = server.machine.host_pages
        floor = server.memsched.minimum_limit()
        assert floor == len(server.machine.zero_frame) + 1  # nothing merged, nothing stale
        await agent.link.ctl("set_host_limit", size=(host // 2) * PAGE_SIZE)
        before = _frozen(server)
        refused = {
            0: "below what the daemon itself needs",
            (floor - 1) * PAGE_SIZE: f"needs: {floor} pages",
            (host + 1) * PAGE_SIZE: f"more than the host's memory ({host} pages",
            "1TiB": "more than the host's memory",
        }
        for size, message in refused.items():
            with pytest.raises(PeerError, match="host limit") as info:
                await agent.link.ctl("set_host_limit", size=size)
            assert message in str(info.value), (size, str(info.value))
            assert _frozen(server) == before, f"{size!r} changed the daemon"
        for pages in (host, floor):
            accepted = await agent.link.ctl("set_host_limit", size=pages * PAGE_SIZE)
            assert accepted["limit_pages"] == pages == server.machine.limit_pages
        status = await agent.link.ctl("status")
        assert status["host"]["min_limit_pages"] == floor
        await agent.close()


async def test_floor_counts_what_no_reclaim_can_give_back(short_tmp: Path, mem_dir: Path) -> None:
    """A retired zero frame still mapped by a VMM is held for p2mUpdate: the floor grows by
    one until the VMM drops it. Merged frames count too, one each."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=64)
        await agent.fault(0, write=False, around=15)  # maps the zero frame read-only
        ms = server.memsched
        floor = ms.minimum_limit()
        vm = server.vms[agent.vm_id]
        await agent.link.ctl("retire", mpn=server.machine.zero_frame[vm.home_node])
        assert ms.minimum_limit() == floor + 1
        with pytest.raises(VMMemError, match="1 stale frames"):
            ms.set_host_limit(floor)
        await agent.round()  # the VMM drops its stale mappings: the old frame is retired
        assert ms.minimum_limit() == floor
        server.shared.frames += 2  # two merged frames (the count page sharing keeps)
        try:
            assert ms.minimum_limit() == floor + 2
            with pytest.raises(VMMemError, match="2 merged frames"):
                ms.set_host_limit(floor + 1)
        finally:
            server.shared.frames -= 2
        await agent.close()


async def test_vmmem_ctl_set_host_limit_0_prints_one_line_and_exits_1(
    short_tmp: Path, mem_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator's command: one line naming the problem on stderr, exit 1, no traceback."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        before = server.machine.limit_pages
        argv = ["--socket", str(server.config.socket), "set-host-limit", "0"]
        code = await asyncio.to_thread(ctl_cli.main, argv)
        err = capsys.readouterr().err
        assert code == 1
        assert err.count("\n") == 1 and err.startswith("vmmem-ctl: host limit 0 pages")
        assert "Traceback" not in err
        assert server.machine.limit_pages == before


def _swap_target_pages(server: PlatformServer) -> int:
    return sum(server.memsched.swap_targets.values())


async def test_full_swap_file_shows_and_memsched_stops_counting_on_it(
    short_tmp: Path, mem_dir: Path
) -> None:
    """Every slot taken while reclaim still wants pages: status and the gauge say full, and
    memsched sets no swap target (no VM is asked to release what could go nowhere); once
    slots are free again, both clear and reclaim counts on swap again."""
    async with running_platform(
        short_tmp, mem_dir, host_mib=16, swap_size=32 * PAGE_SIZE
    ) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=512)
        await agent.write_pages(np.arange(400))
        assert await agent.barrier()
        assert metric(server, "vmmem_swap_full") == 0
        server.memsched.set_host_limit(server.machine.allocator.used - 100)
        await reclaim(server, [agent], max_ticks=4)
        assert server.swap is not None and server.swap.free == 0
        assert server.memsched.reclaiming, "reclaim still wants pages"

        server.memsched.tick(time.monotonic())
        status = await agent.barrier()
        assert status["swap"]["full"] == "no free slot" and status["swap"]["free"] == 0
        assert metric(server, "vmmem_swap_full") == 1
        assert _swap_target_pages(server) == 0
        assert all(vm["swap_target_pages"] == 0 for vm in status["vms"])
        assert agent.region.swap_target_pages == 0
        assert not agent.region.pending & ServiceType.SWAP.bit
        assert "FULL (no free slot)" in ctl_cli.render_status(status)

        # Some pages come back from swap (a little room for them: reclaim goes on), and
        # their slots are free: swap is counted on again.
        server.memsched.set_host_limit(server.machine.allocator.used + 10)
        swapped = np.flatnonzero(server.vms[agent.vm_id].p2m.state == PageState.SWAPPED)
        await agent.verify(swapped[:8])
        server.memsched.tick(time.monotonic())
        status = await agent.barrier()
        assert status["swap"]["full"] is None and metric(server, "vmmem_swap_full") == 0
        assert _swap_target_pages(server) > 0
        await agent.close()


async def test_device_out_of_space_is_full_until_a_write_succeeds(
    short_tmp: Path, mem_dir: Path
) -> None:
    """A write that fails with ENOSPC (slots are free, the device is not): full, no swap
    target during the swap service's pause; after it, one swap-out tries the device again,
    and when that write succeeds swap is no longer full."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "vm1", guest_pages=1024)
        await agent.write_pages(np.arange(700))
        await agent.link.ctl("failpoint", name="swap_write_error", value=errno.ENOSPC)
        server.memsched.set_host_limit(server.machine.allocator.used - 200)
        server.memsched.tick(time.monotonic())
        await agent.round()
        await wait_until(lambda: swap_in_flight(server) == 0, "the failed write")
        server.memsched.tick(time.monotonic())
        status = await agent.barrier()
        assert status["swap"]["full"] == "no space left on the device"
        assert status["swap"]["free"] > 0
        assert metric(server, "vmmem_swap_full") == 1
        assert _swap_target_pages(server) == 0, "memsched counted on a full device"

        def retried() -> bool:
            server.memsched.tick(time.monotonic())
            return _swap_target_pages(server) > 0

        await wait_until(retried, "memsched to try the device again after the pause")
        await agent.round()
        await wait_until(lambda: swap_in_flight(server) == 0, "the retried write")
        assert server.swap is not None and server.swap.used > 0
        server.memsched.tick(time.monotonic())
        assert (await agent.barrier())["swap"]["full"] is None
        assert metric(server, "vmmem_swap_full") == 0
        await agent.close()
