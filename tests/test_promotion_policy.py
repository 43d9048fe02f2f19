"""2M promotion's limits and policy, against a fake peer: the host limit, what counts as a
region already in place, the back-off when no run is free, the scan's queue, and a fault
that cancels.

The harness is ``tests/test_hugepages.py``'s (real machine memory in /dev/shm, two nodes of
four 2 MiB runs, the agent's own filters, a virtual clock). Each test was written for a
one-line change to ``platform_daemon/services/promotion.py`` that no test caught (a mutation
sweep); the docstrings name the behaviour, not the line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import platform_daemon.services.promotion as promotion
from platform_daemon.allocator import FrameState
from platform_daemon.hugepages import FLAG_LARGE
from shared.constants import PAGES_PER_2M, FaultReason, ServiceType
from tests.test_hugepages import HugeHarness, break_runs, on_run_in_order, region

pytestmark = pytest.mark.timeout(60)
R = PAGES_PER_2M


@pytest.fixture
def h(mem_dir: Path, short_tmp: Path) -> Iterator[HugeHarness]:
    harness = HugeHarness(mem_dir, short_tmp)
    try:
        yield harness
    finally:
        harness.close()


def test_a_collapse_that_would_pass_the_host_limit_keeps_the_regions_frames(
    h: HugeHarness,
) -> None:
    """A run is free, but taking it would pass the host limit (``vmmem-ctl set-host-limit``
    lowered between the release and the copy): the region keeps its frames, no run is taken,
    the queue backs off and validation maps the pages again; nothing is mapped large."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    assert h.low_round(g, run_moves=False) == [(ServiceType.PROMOTION_2M, region(0))]
    alloc = h.machine.allocator
    assert alloc.find_run(0, 64) is not None  # a run is there: only the limit stops it
    h.machine.limit_pages = alloc.used + R - 1
    free_before = alloc.free

    assert h.run_spawned() == 1

    assert alloc.free == free_before  # no run taken
    assert (g.vm.p2m.frame[region(0)] == old).all()
    assert not (g.vm.p2m.flags[region(0)] & FLAG_LARGE).any()
    st = h.promo.stats(g.vm)
    assert (st.promoted, st.aborted, st.no_run) == (0, 1, 1)
    h.rounds(g)
    assert (g.exposure.frame[region(0)] == old).all() and not g.exposure.large.any()
    h.content_intact(g)
    assert h.invariants() == []


def test_a_region_on_a_run_with_two_pages_exchanged_is_copied_not_mapped_as_it_is(
    h: HugeHarness,
) -> None:
    """In place means all 512 frames in guest order: a region on an aligned run with two
    pages' frames exchanged is copied into a new run like any other, and only then mapped
    large (a large mapping of the run as it is would show the guest two pages swapped)."""
    g = h.add_vm()
    on_run_in_order(h, g, 0, swap=(3, 4))
    first = int(g.vm.p2m.frame[0])

    h.promote(g)

    st = h.promo.stats(g.vm)
    assert (st.promoted, st.in_place) == (1, 0)
    frames = g.vm.p2m.frame[region(0)]
    assert int(frames[0]) != first and frames[0] % R == 0 and (np.diff(frames) == 1).all()
    assert g.exposure.large[0]
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_without_a_run_the_queue_waits_then_offers_again(h: HugeHarness) -> None:
    """No free run anywhere: the region is not offered, and the VM's queue is not looked at
    again (by the scheduler's pending count nor by a selection) for NO_RUN_SECONDS; then it
    is offered again, and promoted once a run is free."""
    g = h.add_vm()
    h.back(g, region(0), node=0)
    taken = np.concatenate([break_runs(h, 0), break_runs(h, 1)])
    h.promo.scan(g.vm, 64, h.clock())
    assert h.low_round(g) == []
    assert h.promo.stats(g.vm).no_run == 1
    h.machine.allocator.release(taken)

    h.clock.now += promotion.NO_RUN_SECONDS / 2
    assert h.promo.pending_work(g.vm, h.clock()) == 0
    assert len(h.promo.select_work(g.vm, R, 1, h.clock()).bpns) == 0
    assert h.promo.queued(g.vm) == 1  # still queued, not dropped

    h.clock.now += promotion.NO_RUN_SECONDS / 2
    assert h.promo.pending_work(g.vm, h.clock()) == 1
    h.rounds(g)
    assert g.exposure.large[0] and h.promo.stats(g.vm).no_run == 1
    h.content_intact(g)
    assert h.invariants() == []


def test_without_a_run_only_as_many_in_place_regions_as_asked_are_taken(
    h: HugeHarness,
) -> None:
    """No free run, two regions already in place: a selection of one unit takes one region
    (a batch of 512 pages fits the slot), the other stays queued for the next."""
    g = h.add_vm(guest_pages=3 * R)
    on_run_in_order(h, g, 0)
    on_run_in_order(h, g, 2)
    h.back(g, region(1), node=1)  # a region that would need a copy
    taken = np.concatenate([break_runs(h, 0), break_runs(h, 1)])
    h.promo.scan(g.vm, 64, h.clock())
    assert h.promo.vms[g.vm.vm_id].queue == [0, 1, 2]

    sel = h.promo.select_work(g.vm, R, 1, h.clock())

    assert sel.bpns.tolist() == region(0)
    assert h.promo.vms[g.vm.vm_id].queue == [1, 2]
    sel = h.promo.select_work(g.vm, R, 1, h.clock())
    assert sel.bpns.tolist() == region(2)
    assert h.promo.vms[g.vm.vm_id].queue == [1]
    h.machine.allocator.release(taken)
    assert h.invariants() == []


def test_the_scan_queues_each_region_once_up_to_the_cap(
    h: HugeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand walks on from where the last step stopped; a region already queued is not
    queued again when the window wraps round to it; the queue holds MAX_QUEUE at most."""
    monkeypatch.setattr(promotion, "MAX_QUEUE", 4)
    g = h.add_vm(guest_pages=4 * R)
    for r in range(3):  # region 3 is not backed: never fit
        h.back(g, region(r), node=r % 2)
    q = h.promo.vms[g.vm.vm_id].queue

    assert h.promo.scan(g.vm, 2, h.clock()) == 2
    assert q == [0, 1]
    assert h.promo.scan(g.vm, 3, h.clock()) == 3  # regions 2, 3, 0
    assert q == [0, 1, 2]

    monkeypatch.setattr(promotion, "MAX_QUEUE", 2)
    del q[:]
    assert h.promo.scan(g.vm, 4, h.clock()) == 4  # regions 1, 2, 3, 0: room for two
    assert q == [1, 2]
    assert h.promo.scan(g.vm, 4, h.clock()) == 0  # full: nothing looked at


def test_a_fault_that_cancels_a_collapse_is_not_counted_as_completing_it(
    h: HugeHarness,
) -> None:
    """A fault on a region in flight when no run can be had gets CANCEL (the old frame):
    counted as an aborted region, not as a fault that completed a copy."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    h.low_round(g, run_moves=False)
    taken = np.concatenate([break_runs(h, 0), break_runs(h, 1)])

    reply = h.promo.on_fault(g.vm, 5, write=False)

    assert reply.reason == FaultReason.CANCEL and reply.mpns.tolist() == [old[5]]
    st = h.promo.stats(g.vm)
    assert (st.fault_completions, st.aborted, st.promoted) == (0, 1, 0)
    g.exposure.install(reply.bpns, reply.mpns, np.array([False]))
    h.run_spawned()
    h.machine.allocator.release(taken)
    assert h.frame_state(old[:1]) == [FrameState.USED]
    h.content_intact(g)
    assert h.invariants() == []
