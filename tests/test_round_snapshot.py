"""The round snapshot (issue 7, section 8): work that arrives mid-round waits for the next
round, whatever its type.

The pending word is snapshotted when a high-priority round opens and only the types in it
are served; a type whose work appears during the round is served first thing in the next
one. Checked for every ordered pair of high-priority types on the engine alone (a type that
comes after the snapshot's in the round's order is the case a snapshot that ignored the
pending word would serve at once), and with the real services of an in-process daemon: a
swap target that appears while a round serves p2mUpdate.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest

from platform_daemon.rounds import RoundState
from shared.constants import HIGH_PRIORITY_SERVICES, ServiceType
from tests.test_rounds import ScriptedService, answer, engine_with, get, make_vm, run_round
from tests.test_services_swap import FakeAgent, running_platform

PAIRS = list(itertools.permutations(HIGH_PRIORITY_SERVICES, 2))


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("pending", "late"), PAIRS, ids=[f"{a.name}-{b.name}" for a, b in PAIRS])
def test_work_arriving_mid_round_waits_for_the_next_round(
    pending: ServiceType, late: ServiceType
) -> None:
    """Only ``pending`` had work when the round opened; ``late`` gets work after the first
    batch. The round serves ``pending`` alone; the next one starts with ``late``."""
    vm = make_vm()
    first_svc = ScriptedService(pending, [[1], [2], [3]])
    late_svc = ScriptedService(late, [])
    engine, state = engine_with(first_svc, late_svc), RoundState()

    req = get(engine, vm, state)
    assert req.service == pending
    late_svc.batches = [[100], [101]]  # arrives mid-round
    answer(engine, vm, state, req)
    assert run_round(engine, vm, state) == [pending, pending]
    assert late_svc.selected == 0, f"{late.name} work that arrived mid-round was served in it"
    assert vm.region.pending == late.bit  # announced when the round closed...
    assert run_round(engine, vm, state) == [late, late]  # ...and served by the next one


@pytest.mark.timeout(60)
async def test_swap_target_set_mid_round_waits_while_p2m_update_is_served(
    short_tmp: Path, mem_dir: Path
) -> None:
    """The issue's case with the real services: a round opens with p2mUpdate work only (a
    retired zero frame still mapped by 600 pages: two batches); after the first batch the
    host limit drops and swap has work. The round ends with p2mUpdate's second batch; swap
    is served by the next round."""
    async with running_platform(short_tmp, mem_dir, host_mib=16) as server:
        agent = await FakeAgent.connect(server, "a", guest_pages=2048)
        await agent.write_pages(np.arange(1200, 1800))
        for bpn in range(0, 600, 17):  # read-only mappings of the zero frame
            await agent.fault(bpn, write=False, around=16)
        vm = server.vms[agent.vm_id]
        swap = server.services[ServiceType.SWAP]
        await agent.link.ctl("retire", mpn=server.machine.zero_frame[vm.home_node])
        assert not swap.has_work(vm)

        first = await agent.get_request()
        assert first.service == ServiceType.P2M_UPDATE and first.has_work
        agent.decide(first)
        agent.complete(first)
        server.memsched.set_host_limit(server.machine.allocator.used - 300)
        server.memsched.tick(time.monotonic())
        assert swap.has_work(vm), "swap work arrived mid-round"
        rest = await agent.round()  # the same round, to its end
        assert [r.service for r, _, _ in rest] == [ServiceType.P2M_UPDATE]
        following = await agent.round()
        assert following and following[0][0].service == ServiceType.SWAP
        await agent.close()
