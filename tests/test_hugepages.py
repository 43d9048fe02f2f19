"""2M promotion, 2M defrag and splitting, against a fake peer.

The harness is NUMA migration's (``tests/test_numa_migration.py``): real machine memory in a
/dev/shm file split into two nodes (4 runs of 512 frames each), its allocator, the fault
resolver, a virtual clock and a ``spawn`` that keeps coroutines so each test decides when an
asynchronous copy runs. The VMM is played by the agent's own filters on an
``ExposureTable`` through the real ``RoundEngine`` (slots of 512 pages, so a region fits).
Every outcome is checked on real bytes, with the daemon's invariant check (defrag's claimed
frames counted as held) and with both sides' view of large regions.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from platform_daemon.allocator import FrameState
from platform_daemon.hugepages import FLAG_LARGE, coverage
from platform_daemon.invariants import HostState, check
from platform_daemon.p2m import FLAG_SHARED, NO_OP
from platform_daemon.rounds import RoundEngine
from platform_daemon.services import defrag as defrag_mod
from platform_daemon.services import page_move as page_move_mod
from platform_daemon.services import promotion as promotion_mod
from platform_daemon.services.balloon import BalloonService
from platform_daemon.services.defrag import DefragService
from platform_daemon.services.page_retire import PageRetireService
from platform_daemon.services.page_sharing import PageSharingService
from platform_daemon.services.promotion import PromotionService
from platform_daemon.services.swap import SwapService
from platform_daemon.swapfile import SwapFile
from shared.constants import (
    PAGES_PER_2M,
    FaultReason,
    PageState,
    PageStatus,
    Priority,
    ServiceType,
)
from shared.layout import ControlRegion, region_size
from shared.messages import GET_FLAG_NEW_ROUND, CompleteRequest, GetRequest
from tests import test_numa_migration as numa_tests
from tests.held_copies import HeldCopies
from tests.test_numa_migration import Guest, Harness, content
from vmm_agent.services import FILTERS
from vmm_agent.services.numa_migration import NumaMigrationFilter
from vmm_agent.services.validation import ValidationFilter

pytestmark = pytest.mark.timeout(60)
R = PAGES_PER_2M


class HugeHarness(Harness):
    """NUMA's harness plus 2M promotion and defrag (enabled), slots of 512 pages."""

    def __init__(self, mem_dir: Path, tmp: Path) -> None:
        super().__init__(mem_dir, tmp, vm_rate=1e6, host_rate=1e6)
        self.promo = PromotionService(self.ctx)
        self.defrag = DefragService(self.ctx)
        self.promo.enabled = self.defrag.enabled = True
        self.promo.on_moved = self.defrag.on_moved = self.validation.enqueue
        self.promo.want_run = self.defrag.want_run
        self.swapfile: SwapFile | None = None
        self.services: dict[ServiceType, Any] = {
            ServiceType.NUMA_MIGRATION: self.svc,
            ServiceType.VALIDATION: self.validation,
            ServiceType.PROMOTION_2M: self.promo,
            ServiceType.DEFRAG_2M: self.defrag,
        }
        self.engine = RoundEngine(self.services, clock=self.clock)

    def add_vm(self, guest_pages: int = 2 * R, home_node: int = 0, regions: int = 1) -> Guest:
        """A guest; its slots hold ``regions`` whole regions."""
        old = numa_tests.SLOT_CAPACITY
        numa_tests.SLOT_CAPACITY = regions * R
        try:
            g = super().add_vm(guest_pages, home_node)
        finally:
            numa_tests.SLOT_CAPACITY = old
        g.filters = {s: cls(g.exposure) for s, cls in FILTERS.items() if s in _AGENT}
        g.filters[ServiceType.NUMA_MIGRATION] = NumaMigrationFilter(g.exposure)
        g.filters[ServiceType.VALIDATION] = ValidationFilter(g.exposure)
        self.promo.pending_work(g.vm, self.clock())
        self.defrag.pending_work(g.vm, self.clock())
        return g

    def add_service(self, svc: Any) -> None:
        self.services[svc.service] = svc
        self.engine = RoundEngine(self.services, clock=self.clock)

    def invariants(self) -> list[str]:
        m = self.machine
        state = HostState(
            allocator=m.allocator,
            owner_vm=m.owner_vm,
            owner_bpn=m.owner_bpn,
            zero_frames=list(m.zero_frame),
            refs=self.shared.refs,
            merged_frames=self.shared.frames,
            vms={g.vm.vm_id: g.vm.p2m for g in self.guests.values() if g.vm.alive},
            held_frames=[*self.defrag.held_frames(), *self.promo.held_frames()],
            swap=self.swapfile,
        )
        return [v.name for v in check(state)]

    def promote(self, g: Guest) -> list[tuple[ServiceType, list[int]]]:
        self.promo.scan(g.vm, 64, self.clock())
        return self.rounds(g)

    def high_round(self, g: Guest) -> list[tuple[ServiceType, list[int]]]:
        """One high-priority round through the engine, the agent's filters deciding."""
        batches: list[tuple[ServiceType, list[int]]] = []
        flags = GET_FLAG_NEW_ROUND
        while True:
            req = self.engine.get_request(g.vm, g.state, GetRequest(Priority.HIGH, 0, flags))
            flags = 0
            if not req.has_work:
                return batches
            service = ServiceType(req.service)
            bpns, status, mpns = g.vm.region.slot(req.slot).batch(req.count)
            batches.append((service, bpns.astype(np.int64).tolist()))
            g.filters[service].process(bpns, mpns, status)
            self.engine.complete(g.vm, g.state, CompleteRequest(req.slot, req.count, req.seq))
            self.run_spawned()

    def vm_gone(self, g: Guest) -> None:
        """What PlatformServer.on_vm_gone does: the services forget the VM, its frames are
        freed, its p2m names none."""
        vm = g.vm
        vm.alive = False
        for svc in self.services.values():
            svc.on_vm_gone(vm)
        self.machine.release_or_retire(vm.p2m.private_frames())
        vm.p2m.frame[:] = -1
        del self.guests[vm.vm_id]

    def both_sides_agree(self, g: Guest) -> None:
        """A region the agent maps large is large in the p2m, on one aligned run in order."""
        p2m = g.vm.p2m
        for region in np.flatnonzero(g.exposure.large).tolist():
            pages = np.arange(region * R, (region + 1) * R)
            assert (p2m.flags[pages] & FLAG_LARGE).all(), region
            assert p2m.frame[pages[0]] % R == 0
            assert (np.diff(p2m.frame[pages]) == 1).all()
            assert (g.exposure.frame[pages] == p2m.frame[pages]).all()


_AGENT = {
    ServiceType.SWAP,
    ServiceType.PAGE_RETIRE,
    ServiceType.PAGE_SHARING,
    ServiceType.DEFRAG_2M,
    ServiceType.PROMOTION_2M,
}


@pytest.fixture
def h(mem_dir: Path, short_tmp: Path) -> Iterator[HugeHarness]:
    harness = HugeHarness(mem_dir, short_tmp)
    try:
        yield harness
    finally:
        harness.close()


def break_runs(h: HugeHarness, node: int) -> npt.NDArray[np.int64]:
    """Take one frame (owned by nobody) in every free run of ``node``: no whole run is left
    there. Returns the frames taken (release them before the invariant check)."""
    alloc, taken = h.machine.allocator, []
    while (run := alloc.allocate_run(node)) is not None:
        alloc.release(run[1:])
        taken.append(run[0])
    return np.array(taken, dtype=np.int64)


def region(r: int) -> list[int]:
    return list(range(r * R, (r + 1) * R))


def promoted(h: HugeHarness, g: Guest, r: int = 0) -> npt.NDArray[np.int64]:
    """Back region ``r`` on scattered frames, promote it; returns its old frames."""
    old = h.back(g, region(r), node=g.vm.home_node)
    assert old[0] % R != 0  # frame 0 is the node's zero frame: not on a run to begin with
    h.promote(g)
    assert g.exposure.large[r] and coverage(g.vm.p2m)[0] >= 1
    return old


def on_run_in_order(
    h: HugeHarness, g: Guest, r: int, swap: tuple[int, int] | None = None
) -> npt.NDArray[np.int64]:
    """Back region ``r`` on one whole free run of the home node, page i on frame i of the
    run (already in place), but for the pair ``swap`` of pages, whose frames are
    exchanged; returns the run."""
    run = h.machine.allocator.allocate_run(g.vm.home_node)
    assert run is not None
    if swap is not None:
        i, j = swap
        run[i], run[j] = run[j], run[i]
    idx = np.array(region(r), dtype=np.int64)
    for bpn, mpn in zip(idx.tolist(), run.tolist(), strict=True):
        g.data[bpn] = content(g.vm.vm_id * 1000 + bpn)
        h.machine.frames[mpn] = g.data[bpn]
    h.resolver.map_private(g.vm, idx, run)
    g.exposure.install(idx, run, np.ones(R, dtype=bool))
    return run


def both_regions_promoted(h: HugeHarness, g: Guest) -> None:
    """Both regions of ``g`` were promoted (none given up, no run missing), validation maps
    them large, both sides agree, every byte is where it was."""
    stats = h.promo.stats(g.vm)
    assert (stats.promoted, stats.aborted, stats.no_run) == (2, 0, 0)
    h.rounds(g)
    assert g.exposure.large.tolist() == [True, True]
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


# ---- promotion ---------------------------------------------------------------------------------


def test_a_fully_backed_private_region_is_copied_into_one_run_and_mapped_large(
    h: HugeHarness,
) -> None:
    """The PROMOTION_2M batch holds the region's 512 pages with the frames the VMM maps; the
    platform copies them into one aligned run of the home node (FLAG_LARGE on every page),
    frees the old frames; the VALIDATION batch installs the run and the agent maps the region
    large. Both sides agree, every byte is where it was, coverage is 1/2 of the guest."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    h.back(g, region(1)[:100], node=0)  # region 1 not fully backed: not promoted

    batches = h.promote(g)

    assert [(s, len(b)) for s, b in batches] == [
        (ServiceType.PROMOTION_2M, R),
        (ServiceType.VALIDATION, R),
    ]
    p2m = g.vm.p2m
    run = p2m.frame[region(0)]
    assert run[0] % R == 0 and (np.diff(run) == 1).all()
    assert (h.machine.allocator.node_of(run) == 0).all()
    assert (p2m.flags[region(0)] == FLAG_LARGE).all()
    assert (p2m.state[region(0)] == PageState.EXPOSED).all() and (p2m.op[region(0)] == NO_OP).all()
    assert g.exposure.large.tolist() == [True, False]
    assert g.exposure.coverage() == 0.5 and coverage(p2m) == (1, 2)
    assert h.frame_state(old) == [FrameState.FREE] * R
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []
    assert h.promo.stats(g.vm).promoted == 1
    assert h.metrics.registry.get_sample_value("vmmem_hugepage_promoted_pages_total") == R
    assert h.promote(g) == []  # nothing left to do


def test_a_region_already_on_an_aligned_run_in_order_is_mapped_large_without_a_copy(
    h: HugeHarness,
) -> None:
    """Linux's collapse_pte_mapped_thp: a region whose 512 frames already are one aligned run
    in guest order needs no copy and no new run. It is released and installed as any other,
    keeps its very frames (no frame freed, none taken), and the agent maps it large; also when
    no free run is left anywhere (which stops every copying promotion)."""
    g = h.add_vm()
    run = h.machine.allocator.allocate_run(0)
    assert run is not None
    # Back region 0 on exactly that run, in order (as `back` does, on chosen frames).
    idx = np.array(region(0), dtype=np.int64)
    for bpn, mpn in zip(idx.tolist(), run.tolist(), strict=True):
        g.data[bpn] = content(g.vm.vm_id * 1000 + bpn)
        h.machine.frames[mpn] = g.data[bpn]
    h.resolver.map_private(g.vm, idx, run)
    g.exposure.install(idx, run, np.ones(R, dtype=bool))
    taken = break_runs(h, 0)
    other = break_runs(h, 1)
    free_before = h.machine.available()

    batches = h.promote(g)

    assert [(s, len(b)) for s, b in batches] == [
        (ServiceType.PROMOTION_2M, R),
        (ServiceType.VALIDATION, R),
    ]
    p2m = g.vm.p2m
    assert p2m.frame[idx].tolist() == run.tolist()  # the same frames: nothing copied
    assert h.machine.available() == free_before  # no frame freed, none taken
    assert (p2m.flags[idx] == FLAG_LARGE).all()
    assert g.exposure.large.tolist() == [True, False]
    st = h.promo.stats(g.vm)
    assert (st.promoted, st.in_place, st.no_run) == (1, 1, 0)
    h.both_sides_agree(g)
    h.content_intact(g)
    h.machine.allocator.release(np.concatenate([taken, other]))
    assert h.invariants() == []
    assert h.promote(g) == []


def test_regions_not_all_backed_and_private_are_never_candidates(h: HugeHarness) -> None:
    """A region with an untouched page, a page on a shared (zero) frame, a page in flight for
    another service, a page on a failing frame, or a region already large is not queued."""
    g = h.add_vm(guest_pages=6 * R)
    for r in range(6):
        h.back(g, region(r)[1:], node=r % 2)
    p2m = g.vm.p2m
    # region 0: page 0 untouched
    h.resolver.first_touch(g.vm, R, write=False, around=0)  # region 1: zero frame, read-only
    g.exposure.install(np.array([R]), p2m.frame[[R]], np.array([False]))
    for r in (2, 3, 4, 5):
        h.back(g, [r * R], node=r % 2)
    p2m.state[2 * R + 7], p2m.op[2 * R + 7] = PageState.IN_FLIGHT, ServiceType.SWAP
    h.machine.failing[p2m.frame[3 * R + 9]] = True
    p2m.flags[4 * R : 5 * R] |= FLAG_LARGE  # (as if promoted)
    h.promo.scan(g.vm, 64, h.clock())
    assert h.promo.vms[g.vm.vm_id].queue == [5]


def test_a_pinned_page_keeps_its_whole_region(h: HugeHarness) -> None:
    """The VMM refuses the whole region when one page is pinned (BUSY for all 512): nothing
    leaves the guest, nothing moves, the region is counted refused."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    g.exposure.pinned[300] = 1
    h.promo.scan(g.vm, 64, h.clock())
    batches = h.low_round(g)
    assert [(s, len(b)) for s, b in batches] == [(ServiceType.PROMOTION_2M, R)]
    slot_status = g.vm.region.slot(0).batch(R)[1]
    assert (slot_status == PageStatus.BUSY).all()
    assert (g.vm.p2m.frame[region(0)] == old).all()
    assert (g.vm.p2m.state[region(0)] == PageState.EXPOSED).all()
    assert (g.exposure.frame[region(0)] == old).all() and not g.exposure.large.any()
    assert h.promo.stats(g.vm).refused == 1 and h.invariants() == []


@pytest.mark.parametrize("write", [False, True])
def test_a_fault_during_promotion_completes_the_whole_region_first(
    h: HugeHarness, write: bool
) -> None:
    """A fault on a page whose region is in flight copies the region at once and maps the
    page's new frame (COMPLETE); the pending copy then does nothing; validation installs the
    rest and the region is mapped large, with the guest's write in it."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    assert h.low_round(g, run_moves=False) == [(ServiceType.PROMOTION_2M, region(0))]
    assert (g.vm.p2m.state[region(0)] == PageState.IN_FLIGHT).all()

    reply = h.promo.on_fault(g.vm, 77, write)

    assert reply.reason == FaultReason.COMPLETE and reply.bpns.tolist() == [77]
    run = g.vm.p2m.frame[region(0)]
    assert run[0] % R == 0 and reply.mpns.tolist() == [run[77]]
    assert h.frame_state(old) == [FrameState.FREE] * R  # the old frames are free already
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    h.write(g, 77, numa_tests.content(4242))
    assert h.run_spawned() == 1
    assert (g.vm.p2m.frame[region(0)] == run).all()  # not copied twice
    assert g.vm.p2m.state[77] == PageState.EXPOSED  # nor collapsed again in place
    assert h.promo.stats(g.vm).promoted == 1
    h.rounds(g)
    assert g.exposure.large[0] and h.promo.stats(g.vm).fault_completions == 1
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


def _collapse_held_at_its_copy(
    h: HugeHarness, g: Guest, released: list[int] | None = None
) -> tuple[HeldCopies, Any, Any]:
    """Region 0 (or the pages ``released``) released by a PROMOTION_2M batch, its collapse
    run on a loop of its own up to the copy, which the copier holds: (the copier, the loop,
    the collapse's task)."""
    copies = HeldCopies()
    h.machine.copier = copies
    h.promo.scan(g.vm, 64, h.clock())
    batch = region(0) if released is None else released
    assert h.low_round(g, run_moves=False) == [(ServiceType.PROMOTION_2M, batch)]
    loop = asyncio.new_event_loop()
    task = loop.create_task(h.spawned.pop(0))
    for _ in range(10):
        if copies.held:
            break
        loop.run_until_complete(asyncio.sleep(0))
    assert len(copies.held) == 1 and not task.done()
    return copies, loop, task


@pytest.mark.parametrize("write", [False, True])
def test_a_fault_while_the_copier_copies_a_region_completes_it_and_the_copy_is_dropped(
    h: HugeHarness, write: bool
) -> None:
    """The copier thread is copying region 0 into a run when the guest faults on a page of
    it: the fault collapses the region itself, at once, into another run (COMPLETE). When
    the copier's copy lands, the region is no longer in flight: its run is freed, the p2m
    keeps the fault's run, nothing is freed twice, and the region is mapped large with the
    guest's write in it."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    copies, loop, task = _collapse_held_at_its_copy(h, g)
    try:
        held = np.array(h.promo.held_frames(), dtype=np.int64)
        assert len(held) == R and held[0] % R == 0
        assert h.frame_state(held) == [FrameState.USED] * R
        assert h.invariants() == []  # the run being copied into is counted as held

        reply = h.promo.on_fault(g.vm, 77, write)

        assert reply.reason == FaultReason.COMPLETE
        run = g.vm.p2m.frame[region(0)].copy()
        assert run[0] % R == 0 and not np.isin(run, held).any()
        g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
        h.write(g, 77, numa_tests.content(4242))
        assert copies.run_held() == 1
        loop.run_until_complete(task)
    finally:
        loop.close()
    assert (g.vm.p2m.frame[region(0)] == run).all()
    assert h.frame_state(held) == [FrameState.FREE] * R  # the copier's run, thrown away
    assert h.frame_state(old) == [FrameState.FREE] * R
    assert h.promo.held_frames() == []
    stats = h.promo.stats(g.vm)
    assert (stats.promoted, stats.fault_completions, stats.copies_discarded) == (1, 1, 1)
    h.rounds(g)
    assert g.exposure.large[0]
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_a_fault_cancelling_a_region_the_copier_copies_keeps_its_frames(h: HugeHarness) -> None:
    """The copier is copying region 0 when a fault on it finds no free run for its own
    collapse: the region keeps its frames (CANCEL), the guest writes through the old frame.
    When the copier's copy lands it must not repoint the region (its pages are not in flight
    any more, though the p2m still names the frames it copied): the run is freed, and the
    write is where the guest reads."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    copies, loop, task = _collapse_held_at_its_copy(h, g)
    taken = []
    try:
        for node in (0, 1):
            while (run := h.machine.allocator.allocate_run(node)) is not None:
                taken.append(run)
        held = np.array(h.promo.held_frames(), dtype=np.int64)

        reply = h.promo.on_fault(g.vm, 3, write=True)

        assert reply.reason == FaultReason.CANCEL and reply.mpns.tolist() == [old[3]]
        g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
        h.write(g, 3, numa_tests.content(77))
        assert copies.run_held() == 1
        loop.run_until_complete(task)
    finally:
        loop.close()
        for run in taken:
            h.machine.allocator.release(run)
    assert (g.vm.p2m.frame[region(0)] == old).all()
    assert h.frame_state(held) == [FrameState.FREE] * R
    assert h.promo.stats(g.vm).copies_discarded == 1
    h.clock.now += 1
    h.rounds(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_a_run_frame_found_failing_during_the_copy_keeps_the_region_off_the_run(
    h: HugeHarness,
) -> None:
    """Page retire marks a frame of the run being copied into failing (no page owns it yet:
    "in transit", retired when freed). When the copy lands the region is not put on that
    run: the run is freed with its failing frame retired, the region keeps its frames and
    validation maps them again small."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    copies, loop, task = _collapse_held_at_its_copy(h, g)
    try:
        held = np.array(h.promo.held_frames(), dtype=np.int64)
        bad = int(held[100])
        h.machine.failing[bad] = True  # what FrameRetirement.retire does for it
        assert copies.run_held() == 1
        loop.run_until_complete(task)
    finally:
        loop.close()
    assert (g.vm.p2m.frame[region(0)] == old).all()
    assert h.frame_state([bad]) == [FrameState.RETIRED]
    rest = held[held != bad]
    assert h.frame_state(rest) == [FrameState.FREE] * (R - 1)
    assert h.promo.stats(g.vm).aborted == 1 and h.promo.stats(g.vm).promoted == 0
    assert h.promo.stats(g.vm).copies_discarded == 0  # not discarded: given up
    h.rounds(g)
    assert (g.exposure.frame[region(0)] == old).all() and not g.exposure.large.any()
    h.content_intact(g)
    assert h.invariants() == []


def test_a_copy_outlived_by_a_new_release_of_its_region_is_dropped(h: HugeHarness) -> None:
    """The copier holds region 0's copy; a fault gives the region up (no run), the guest
    writes to it, validation maps it again, and a new PROMOTION_2M batch releases it anew
    (new epochs). When the old copy lands, its bytes are stale (taken before the write):
    it must be dropped, though the pages are in flight for promotion again. The new
    release's collapse then promotes the region with the write in it."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    copies, loop, task = _collapse_held_at_its_copy(h, g)
    try:
        held = np.array(h.promo.held_frames(), dtype=np.int64)
        taken = []
        for node in (0, 1):
            while (run := h.machine.allocator.allocate_run(node)) is not None:
                taken.append(run)
        reply = h.promo.on_fault(g.vm, 3, write=True)
        assert reply.reason == FaultReason.CANCEL
        g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
        h.write(g, 3, numa_tests.content(1234))
        h.clock.now += 1
        h.rounds(g)  # validation maps the region again
        for run in taken:
            h.machine.allocator.release(run)
        h.promo.scan(g.vm, 64, h.clock())
        assert h.low_round(g, run_moves=False) == [(ServiceType.PROMOTION_2M, region(0))]
        second = h.spawned.pop(0)
        assert copies.run_held() == 1
        loop.run_until_complete(task)
        assert (g.vm.p2m.frame[region(0)] == old).all()  # the stale copy was not used
        assert h.frame_state(held) == [FrameState.FREE] * R
        copies.inline = True
        loop.run_until_complete(second)
    finally:
        loop.close()
    assert h.promo.stats(g.vm).copies_discarded == 1 and h.promo.stats(g.vm).promoted == 1
    h.rounds(g)
    assert g.exposure.large[0]
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_a_vm_gone_while_the_copier_copies_its_region_frees_the_run(h: HugeHarness) -> None:
    """The VM leaves while the copier thread copies its region: once the copy lands, its
    run is freed with the VM's frames, and nothing is left used."""
    g = h.add_vm()
    h.back(g, region(0), node=0)
    free_before = h.machine.allocator.free
    copies, loop, task = _collapse_held_at_its_copy(h, g)
    try:
        assert h.machine.allocator.free == free_before - R  # the run
        h.vm_gone(g)
        assert copies.run_held() == 1
        loop.run_until_complete(task)
    finally:
        loop.close()
    assert h.machine.allocator.free == free_before + R  # the region's frames and the run
    assert h.promo.held_frames() == []
    assert h.invariants() == []


def test_regions_of_one_batch_collapse_together_while_runs_last(h: HugeHarness) -> None:
    """A batch of two regions (slots of 2 x 512 pages) is collapsed in one step: with one
    free run left, region 0 is copied and mapped large; region 1 keeps its frames (no run:
    defrag is asked), and validation maps it again small. Every byte is where it was."""
    g = h.add_vm(regions=2)
    olds = [h.back(g, region(r), node=0) for r in range(2)]
    spare = break_runs(h, 1)  # node 1: no whole run
    kept = []
    while (run := h.machine.allocator.allocate_run(0)) is not None:
        kept.append(run)
    h.machine.allocator.release(kept.pop())  # one run left, on node 0

    batches = h.promote(g)

    assert [(s, len(b)) for s, b in batches][:1] == [(ServiceType.PROMOTION_2M, 2 * R)]
    assert g.exposure.large.tolist() == [True, False]
    assert (g.vm.p2m.frame[region(1)] == olds[1]).all()
    assert (g.exposure.frame[region(1)] == olds[1]).all()
    assert h.frame_state(olds[0]) == [FrameState.FREE] * R
    stats = h.promo.stats(g.vm)
    assert (stats.promoted, stats.aborted, stats.no_run) == (1, 1, 1)
    assert h.defrag.nodes[0].wanted
    h.both_sides_agree(g)
    h.content_intact(g)
    for run in kept:
        h.machine.allocator.release(run)
    h.machine.allocator.release(spare)
    assert h.invariants() == []


def test_a_region_a_fault_collapsed_before_its_step_is_left_out_of_it(h: HugeHarness) -> None:
    """A batch of two regions; before their step runs, a fault on region 1 collapses it
    (COMPLETE, the page mapped). The step then collapses region 0 only: region 1 is not
    collapsed again (it is on its run in order now), its faulted page stays EXPOSED."""
    g = h.add_vm(regions=2)
    for r in range(2):
        h.back(g, region(r), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    assert h.low_round(g, run_moves=False) == [(ServiceType.PROMOTION_2M, region(0) + region(1))]
    reply = h.promo.on_fault(g.vm, R + 5, write=False)
    assert reply.reason == FaultReason.COMPLETE
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    run1 = g.vm.p2m.frame[region(1)].copy()

    assert h.run_spawned() == 1

    assert g.vm.p2m.state[R + 5] == PageState.EXPOSED
    assert (g.vm.p2m.frame[region(1)] == run1).all()
    stats = h.promo.stats(g.vm)
    assert (stats.promoted, stats.in_place, stats.fault_completions) == (2, 0, 1)
    h.rounds(g)
    assert g.exposure.large.tolist() == [True, True]
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


def _two_regions_one_run(h: HugeHarness) -> tuple[Guest, list[Any], Any]:
    """A guest of two backed regions in one slot, one free run (on node 0): region 0's copy
    is handed to a held copier, region 1 waits for the step's next turn. Returns the
    guest, the runs taken out of the way, node 1's spare frames."""
    g = h.add_vm(regions=2)
    for r in range(2):
        h.back(g, region(r), node=0)
    spare = break_runs(h, 1)  # node 1: no whole run
    kept = []
    while (run := h.machine.allocator.allocate_run(0)) is not None:
        kept.append(run)
    h.machine.allocator.release(kept.pop())  # one run left, on node 0
    return g, kept, spare


def test_a_region_given_up_by_a_fault_during_an_earlier_copy_of_its_step_is_left_alone(
    h: HugeHarness,
) -> None:
    """Two regions, one run: while the copier copies region 0, a fault on region 1 finds
    no run and gives it up (CANCEL: the page is exposed, mapped writable). When the copy
    lands, the step's next turn must not give region 1 up again: its faulted page stays
    EXPOSED (RESIDENT would tell defrag it may move a page the VMM maps), and it is
    counted once. (Found by review: the later turn took the step's first check as still
    good.)"""
    g, kept, spare = _two_regions_one_run(h)
    copies, loop, task = _collapse_held_at_its_copy(h, g, [*region(0), *region(1)])
    try:
        reply = h.promo.on_fault(g.vm, R + 5, write=True)
        assert reply.reason == FaultReason.CANCEL
        g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
        h.write(g, R + 5, numa_tests.content(99))
        stats = h.promo.stats(g.vm)
        before = (stats.aborted, stats.no_run)
        assert copies.run_held() == 1
        loop.run_until_complete(task)
    finally:
        loop.close()
    assert g.vm.p2m.state[R + 5] == PageState.EXPOSED
    assert (stats.aborted, stats.no_run) == before
    assert stats.promoted == 1 and stats.copies_discarded == 0
    for run in kept:
        h.machine.allocator.release(run)
    h.machine.allocator.release(spare)
    h.clock.now += 1
    h.rounds(g)
    h.content_intact(g)
    assert h.invariants() == []


@pytest.mark.parametrize("run_for_the_second", [False, True])
def test_a_vm_gone_during_the_first_copy_of_a_step_ends_the_step(
    h: HugeHarness, run_for_the_second: bool
) -> None:
    """Two regions, one run: the VM leaves while the copier copies region 0. When the copy
    lands, the step ends: no copy of region 1 from its freed frames (a run was made free
    for it meanwhile), no state re-created for the gone VM (none was), nothing left used.
    (Found by review: the step went on with the next region.)"""
    g, kept, spare = _two_regions_one_run(h)
    copies, loop, task = _collapse_held_at_its_copy(h, g, [*region(0), *region(1)])
    try:
        if run_for_the_second:  # node 1's runs whole again
            h.machine.allocator.release(spare)
            spare = spare[:0]
        vm = g.vm
        h.vm_gone(g)
        assert copies.run_held() == 1
        loop.run_until_complete(task)
    finally:
        loop.close()
    assert vm.vm_id not in h.promo.vms and h.promo.held_frames() == []
    assert copies.held == []  # no second copy was handed over
    for run in kept:
        h.machine.allocator.release(run)
    h.machine.allocator.release(spare)
    assert h.invariants() == []
    assert h.machine.allocator.used == len(h.machine.zero_frame)


def test_near_the_host_limit_a_step_takes_one_run_at_a_time(h: HugeHarness) -> None:
    """Two regions in a step, plenty of free runs, but the host limit leaves room for two
    runs and less than the high free threshold beside the second: the step copies one
    region, frees its old frames, then takes the next run. Both are promoted; at no time
    did it hold two runs (the faults' frames came first)."""
    g = h.add_vm(regions=2)
    for r in range(2):
        h.back(g, region(r), node=0)
    m = h.machine
    m.limit_pages = m.allocator.used + 2 * R  # room for two runs, nothing beside the second
    assert m.available() == 2 * R and h.config.free_high_pct > 0
    copies, loop, task = _collapse_held_at_its_copy(h, g, [*region(0), *region(1)])
    try:
        assert len(h.promo.held_frames()) == R  # one run
        assert copies.run_held() == 1
        for _ in range(10):
            if copies.held:
                break
            loop.run_until_complete(asyncio.sleep(0))
        assert len(h.promo.held_frames()) == R  # the second run, once the first was done
        copies.inline = True
        copies.run_held()
        loop.run_until_complete(task)
    finally:
        loop.close()
    both_regions_promoted(h, g)


def _run_collapse_with_a_failing_copy(h: HugeHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the spawned collapse with the copier's copy raising; the error reaches the task."""

    def broken(*args: Any) -> None:
        raise ValueError("copy to a frame outside machine memory")

    monkeypatch.setattr(page_move_mod, "run_copy", broken)
    with pytest.raises(ValueError, match="outside machine memory"):
        h.run_spawned()
    monkeypatch.undo()


def test_a_copy_that_fails_gives_the_regions_back_on_their_frames(
    h: HugeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copier's copy raises: the run is freed, the region keeps its frames (RESIDENT,
    validation maps them again), and the error reaches the task (logged by the daemon)."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    free_before = h.machine.allocator.free
    h.promo.scan(g.vm, 64, h.clock())
    h.low_round(g, run_moves=False)
    _run_collapse_with_a_failing_copy(h, monkeypatch)
    assert h.machine.allocator.free == free_before and h.promo.held_frames() == []
    assert (g.vm.p2m.frame[region(0)] == old).all()
    assert (g.vm.p2m.state[region(0)] == PageState.RESIDENT).all()
    h.rounds(g)
    assert (g.exposure.frame[region(0)] == old).all() and not g.exposure.large.any()
    h.content_intact(g)
    assert h.invariants() == []


def test_without_a_free_run_nothing_is_released_and_defrag_is_asked(h: HugeHarness) -> None:
    """No whole free run on any node: the region is not offered (no fault for nothing), the
    queue waits, and 2M defrag is asked for a run on the home node."""
    g = h.add_vm()
    h.back(g, region(0), node=0)
    for node in (0, 1):
        break_runs(h, node)
    h.promo.scan(g.vm, 64, h.clock())
    assert h.low_round(g) == []
    assert h.promo.stats(g.vm).no_run == 1 and h.defrag.nodes[0].wanted


def test_a_region_whose_run_vanished_after_release_keeps_its_frames(h: HugeHarness) -> None:
    """The run was there at selection and gone at copy time: the region keeps its frames
    (a fault meanwhile gets CANCEL), and validation maps the pages again."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    h.low_round(g, run_moves=False)
    taken = []
    for node in (0, 1):
        while (run := h.machine.allocator.allocate_run(node)) is not None:
            taken.append(run)
    reply = h.promo.on_fault(g.vm, 3, write=True)
    assert reply.reason == FaultReason.CANCEL and reply.mpns.tolist() == [old[3]]
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    assert h.run_spawned() == 1
    assert (g.vm.p2m.frame[region(0)] == old).all()
    for run in taken:
        h.machine.allocator.release(run)
    h.clock.now += 1
    h.rounds(g)
    assert (g.exposure.frame[region(0)] == old).all() and not g.exposure.large.any()
    assert h.promo.stats(g.vm).aborted == 1
    h.content_intact(g)
    assert h.invariants() == []


def test_a_vm_gone_mid_promotion_leaves_nothing_behind(h: HugeHarness) -> None:
    """The VM leaves between the release and the copy: the copy does nothing, no run is
    taken, and the VM's frames are all freed; a promoted VM's large pages are freed too."""
    g = h.add_vm()
    other = h.add_vm()
    promoted(h, other)
    h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    h.low_round(g, run_moves=False)
    free_before = h.machine.allocator.free
    for guest in (g, other):
        h.vm_gone(guest)
    assert h.run_spawned() == 1
    assert h.machine.allocator.free == free_before + 2 * R
    assert h.invariants() == []


def test_promotion_is_offered_only_when_enabled_and_a_slot_holds_a_region(
    h: HugeHarness,
) -> None:
    """--hugepages off: no work; slots of fewer than 512 pages: no work either."""
    g = h.add_vm()
    h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    h.promo.enabled = False
    assert h.promo.pending_work(g.vm, h.clock()) == 0
    h.promo.enabled = True
    assert h.promo.pending_work(g.vm, h.clock()) == 1
    g.vm.region = ControlRegion.initialize(
        bytearray(region_size(4, 64)),
        vm_id=1,
        generation=1,
        slot_count=4,
        capacity=64,
        guest_pages=2 * R,
    )
    assert h.promo.pending_work(g.vm, h.clock()) == 0


# ---- splitting ---------------------------------------------------------------------------------


def split_count(h: HugeHarness, service: str) -> float:
    value = h.metrics.registry.get_sample_value("vmmem_hugepage_splits_total", {"service": service})
    return value or 0.0


def assert_split(h: HugeHarness, g: Guest, service: str) -> None:
    """Region 0 is small pages again on both sides, counted once; content intact."""
    assert not (g.vm.p2m.flags[region(0)] & FLAG_LARGE).any()
    assert not g.exposure.large[0] and g.exposure.splits == 1
    assert g.vm.stats.hugepage_splits == 1 and split_count(h, service) == 1
    h.both_sides_agree(g)
    assert h.invariants() == []


def test_page_retire_splits_the_region_first(h: HugeHarness) -> None:
    """Retiring the frame of one page of a large region: the page-retire batch releases that
    page, both sides split the region, the page moves; the other 511 stay on the run."""
    g = h.add_vm()
    promoted(h, g)
    retire = PageRetireService(h.ctx)
    h.add_service(retire)
    mpn = int(g.vm.p2m.frame[5])
    h.machine.failing[mpn] = True
    retire.enqueue(g.vm, 5)
    assert h.high_round(g) == [(ServiceType.PAGE_RETIRE, [5])]
    assert_split(h, g, "page_retire")
    assert g.vm.p2m.frame[5] != mpn and (g.exposure.frame[region(0)[6:]] >= 0).all()
    g.vm.p2m.state[5] = PageState.RESIDENT  # (the retire left it unmapped)
    h.content_intact(g)


def test_page_retire_of_an_unmapped_page_splits_too(h: HugeHarness) -> None:
    """A page of a large region no VMM maps (validation not done yet) is moved off a failing
    frame without a batch: the p2m's region is split all the same."""
    g = h.add_vm()
    h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    h.low_round(g)  # promoted, not validated: RESIDENT
    assert (g.vm.p2m.flags[region(0)] & FLAG_LARGE).all()
    retire = PageRetireService(h.ctx)
    h.machine.failing[g.vm.p2m.frame[9]] = True
    retire.move(g.vm, np.array([9]))
    assert not (g.vm.p2m.flags[region(0)] & FLAG_LARGE).any()
    assert g.vm.stats.hugepage_splits == 1 and split_count(h, "page_retire") == 1


def test_swap_splits_the_region_first(h: HugeHarness, short_tmp: Path) -> None:
    """A swap batch taking pages of a large region: both sides split it, the pages swap out
    and back in with their content."""

    class Deficit:
        def swap_deficit(self, vm: Any, in_flight: int) -> int:
            return max(0, 3 - in_flight - int(vm.stats.swapped_now))

        def balloon_deficit(self, vm: Any) -> int:
            return 0

    g = h.add_vm()
    promoted(h, g)
    swapfile = h.swapfile = SwapFile(short_tmp / "swap", 64 * 4096)
    try:
        ctx = dataclasses.replace(h.ctx, swap=swapfile, targets=Deficit())
        swap = SwapService(ctx)
        h.add_service(swap)
        import asyncio

        batches = h.engine.get_request(
            g.vm, g.state, GetRequest(Priority.HIGH, 0, GET_FLAG_NEW_ROUND)
        )
        assert ServiceType(batches.service) == ServiceType.SWAP
        bpns, status, mpns = g.vm.region.slot(batches.slot).batch(batches.count)
        g.exposure.accessed[:] = False
        g.filters[ServiceType.SWAP].process(bpns, mpns, status)
        h.engine.complete(g.vm, g.state, CompleteRequest(batches.slot, batches.count, batches.seq))
        asyncio.run(_drain(h))
        assert_split(h, g, "swap")
        assert g.vm.stats.swapped_out == 3
    finally:
        h.swapfile = None
        swapfile.close()


async def _drain(h: HugeHarness) -> None:
    import asyncio

    while h.spawned:
        await h.spawned.pop(0)
        await asyncio.sleep(0)


def test_numa_migration_splits_the_region_first(h: HugeHarness) -> None:
    """A large region off the VM's home node (its home changed): NUMA migration's batch
    takes its pages, both sides split it, the pages move home."""
    g = h.add_vm(home_node=1)
    promoted(h, g)
    g.vm.home_node = 0
    h.svc.vms.pop(g.vm.vm_id)
    h.svc.pending_work(g.vm, h.clock())
    h.scan(g)
    h.rounds(g)
    assert_split(h, g, "numa_migration")
    assert (h.machine.allocator.node_of(g.vm.p2m.frame[region(0)]) == 0).all()
    h.content_intact(g)


def test_the_balloon_splits_the_region_first(h: HugeHarness) -> None:
    """The guest's balloon gives one page of a large region: the agent's release splits its
    mapping, the daemon's completion splits the p2m; the other 511 pages keep their frames."""
    g = h.add_vm()
    promoted(h, g)
    balloon = BalloonService(h.ctx)
    g.exposure.invalidate(np.array([100]))  # what the balloon driver does on the agent
    balloon.complete(g.vm, np.array([100]), np.zeros(1, dtype=np.uint8))
    del g.data[100]
    assert_split(h, g, "balloon")
    assert g.vm.p2m.state[100] == PageState.ZERO
    h.content_intact(g)


def test_the_balloon_splits_a_region_its_cancel_just_promoted(h: HugeHarness) -> None:
    """The balloon takes a page of a region in flight to promotion: its cancel completes the
    copy (the region becomes large), so the split comes after it and leaves no page of the
    region marked large around the ballooned hole."""
    g = h.add_vm()
    h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    assert h.low_round(g, run_moves=False) == [(ServiceType.PROMOTION_2M, region(0))]

    # As the daemon's _cancel_in_flight: the owning service's fault rule ends the operation.
    def cancel(vm: Any, bpns: npt.NDArray[np.int64]) -> None:
        for b in bpns.tolist():
            h.promo.on_fault(vm, b, True)

    ctx = dataclasses.replace(h.ctx, cancel=cancel)
    BalloonService(ctx).complete(g.vm, np.array([100]), np.zeros(1, dtype=np.uint8))
    del g.data[100]
    assert h.promo.stats(g.vm).fault_completions == 1  # the cancel did complete the copy
    assert not (g.vm.p2m.flags[region(0)] & FLAG_LARGE).any()
    assert g.vm.p2m.state[100] == PageState.ZERO
    h.run_spawned()
    assert h.invariants() == []
    h.content_intact(g)


def test_page_sharing_and_defrag_leave_large_regions_alone(h: HugeHarness) -> None:
    """Page sharing does not scan large regions (ESX does not share large pages), and 2M
    defrag never picks a page of one: neither splits them."""
    g = h.add_vm()
    promoted(h, g)
    sharing = PageSharingService(h.ctx)
    sharing.scan(g.vm, 2 * R)
    assert sharing.pending_work(g.vm, h.clock()) == 0
    frames = g.vm.p2m.frame[region(0)]
    assert not h.defrag._movable(g.vm, np.array(region(0)), frames).any()
    assert g.exposure.large[0] and g.vm.stats.hugepage_splits == 0


# ---- defrag ------------------------------------------------------------------------------------


def fragment(h: HugeHarness, g: Guest, keep: int) -> list[int]:
    """Back pages on frames 1..1023 of node 0, then free those on run 1 but ``keep``: run 1
    is nearly free. Returns the pages left on run 1."""
    h.back(g, list(range(1023)), node=0)  # frames 1..1023 (frame 0: the zero frame)
    p2m = g.vm.p2m
    on_run1 = np.flatnonzero((p2m.frame >= R) & (p2m.frame < 2 * R))
    drop, stay = on_run1[keep:], on_run1[:keep]
    h.machine.release_or_retire(p2m.frame[drop])
    p2m.frame[drop], p2m.state[drop] = -1, PageState.ZERO
    g.exposure.frame[drop] = -1
    for b in drop.tolist():
        del g.data[b]
    h.defrag.proactiveness = 100  # compact whenever any free frame is outside a whole run
    pages: list[int] = stay.tolist()
    return pages


def test_defrag_empties_a_nearly_free_run(h: HugeHarness) -> None:
    """Node 0: run 0 full (with the zero frame), run 1 holding 10 pages, runs 2-3 free. The
    look isolates run 1 (its free frames claimed: nothing lands there), a DEFRAG_2M batch
    moves its 10 pages to frames of node 0 outside it, validation maps them again, and the
    next step releases run 1 whole: 3 free runs. Invariants hold at every step."""
    g = h.add_vm(guest_pages=4 * R)
    stay = fragment(h, g, keep=10)
    assert h.machine.allocator.free_runs(0) == 2
    h.defrag.step(h.clock())
    iso = h.defrag.nodes[0].isolated
    assert iso is not None and iso.run == 1 and iso.claimed.sum() == R - 10
    assert h.invariants() == []
    probe = h.machine.allocator.allocate(1, 0)
    assert not np.isin(probe, range(R, 2 * R)).any()
    h.machine.allocator.release(probe)

    batches = h.rounds(g)

    assert next(s for s, _ in batches) == ServiceType.DEFRAG_2M
    assert sorted(b for s, bs in batches if s == ServiceType.DEFRAG_2M for b in bs) == stay
    frames = g.vm.p2m.frame[stay]
    assert ((frames < R) | (frames >= 2 * R)).all()
    assert (h.machine.allocator.node_of(frames) == 0).all()
    assert (g.exposure.frame[stay] == frames).all()  # validated
    assert h.invariants() == []
    # The frames the pages left stay claimed: nothing allocated before the next step lands
    # in the run.
    probe = h.machine.allocator.allocate(h.machine.allocator.free_on(0), 0)
    assert not np.isin(probe, range(R, 2 * R)).any()
    h.machine.allocator.release(probe)
    h.defrag.step(h.clock() + 0.01)
    assert h.defrag.nodes[0].isolated is None and h.defrag.stats.runs_freed == 1
    assert h.machine.allocator.run_free[1] == R
    h.content_intact(g)
    assert h.invariants() == []


def test_defrag_skips_runs_it_cannot_empty(h: HugeHarness) -> None:
    """Run 0 holds the zero frame: never chosen. A run holding a merged (shared) frame or a
    failing frame is skipped."""
    g = h.add_vm(guest_pages=4 * R)
    stay = fragment(h, g, keep=3)
    h.machine.failing[g.vm.p2m.frame[stay[0]]] = True
    h.defrag.step(h.clock())
    assert h.defrag.nodes[0].isolated is None
    assert 1 in h.defrag.nodes[0].skip  # skipped for a while
    h.machine.failing[:] = False
    h.defrag.nodes[0].skip.clear()
    p2m = g.vm.p2m
    p2m.flags[stay[1]] |= FLAG_SHARED  # (as if merged)
    h.clock.now += 1
    h.defrag.step(h.clock())
    assert h.defrag.nodes[0].isolated is None


def test_a_pinned_page_ends_the_isolation(h: HugeHarness) -> None:
    """The VMM refuses a page (pinned): the run cannot be emptied, so its claimed frames go
    back to the pool at once and the run is skipped; the refused page stays."""
    g = h.add_vm(guest_pages=4 * R)
    stay = fragment(h, g, keep=4)
    g.exposure.pinned[stay[2]] = 1
    free = h.machine.allocator.free
    h.defrag.step(h.clock())
    assert h.machine.allocator.free == free - (R - 4)
    h.rounds(g)
    assert h.defrag.nodes[0].isolated is None and h.defrag.stats.runs_aborted == 1
    assert h.defrag.stats.refused == 1
    assert g.vm.p2m.state[stay[2]] == PageState.EXPOSED
    assert h.invariants() == []
    h.content_intact(g)


@pytest.mark.parametrize("room", [True, False])
def test_a_fault_during_a_defrag_move(h: HugeHarness, room: bool) -> None:
    """A fault on a page whose move is in flight moves it now and maps the new frame
    (COMPLETE); with no free frame on the node it keeps its old one (CANCEL)."""
    g = h.add_vm(guest_pages=4 * R)
    stay = fragment(h, g, keep=5)
    h.defrag.step(h.clock())
    assert h.low_round(g, run_moves=False)[0][0] == ServiceType.DEFRAG_2M
    old = int(g.vm.p2m.frame[stay[0]])
    if not room:
        filler = h.add_vm(guest_pages=4 * R)
        h.back(filler, list(range(h.machine.allocator.free_on(0))), node=0)
    reply = h.defrag.on_fault(g.vm, stay[0], True)
    assert reply.reason == (FaultReason.COMPLETE if room else FaultReason.CANCEL)
    assert (int(reply.mpns[0]) != old) == room
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    h.run_spawned()
    h.content_intact(g)
    assert h.invariants() == []


def test_a_vm_gone_mid_defrag_lets_the_run_free(h: HugeHarness) -> None:
    """The VM owning the run's pages leaves mid-move: its frames go back to the pool, the
    next step claims them and the run is released whole."""
    g = h.add_vm(guest_pages=4 * R)
    fragment(h, g, keep=6)
    h.defrag.step(h.clock())
    h.low_round(g, run_moves=False)
    vm = g.vm
    vm.alive = False
    for svc in h.services.values():
        svc.on_vm_gone(vm)
    h.machine.release_or_retire(vm.p2m.frame[vm.p2m.frame >= 0])
    vm.p2m.frame[:] = -1
    del h.guests[vm.vm_id]
    h.run_spawned()
    h.defrag.step(h.clock() + 0.01)
    assert h.defrag.stats.runs_freed == 1 and h.machine.allocator.free_runs(0) == 3
    assert h.invariants() == []


def test_an_isolation_that_takes_too_long_is_given_up(h: HugeHarness) -> None:
    """The VM never runs its low rounds: after ISOLATION_SECONDS the run's claimed frames go
    back and the run is skipped for a while."""
    g = h.add_vm(guest_pages=4 * R)
    fragment(h, g, keep=6)
    h.defrag.step(h.clock())
    free = h.machine.allocator.free
    h.clock.now += 6
    h.defrag.step(h.clock())
    assert h.defrag.nodes[0].isolated is None and h.defrag.stats.runs_aborted == 1
    assert h.machine.allocator.free == free + R - 6
    h.clock.now += 1
    h.defrag.step(h.clock())
    assert h.defrag.nodes[0].isolated is None  # skipped
    assert h.invariants() == []


def test_defrag_looks_at_a_window_of_runs_per_step(
    h: HugeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One look scans SCAN_RUNS runs from the node's hand and moves the hand on: the cost of
    a look does not grow with the host."""
    from platform_daemon.services import defrag as defrag_mod

    monkeypatch.setattr(defrag_mod, "SCAN_RUNS", 1)
    g = h.add_vm(guest_pages=4 * R)
    fragment(h, g, keep=10)
    h.defrag.step(h.clock())  # looks at run 0 only (full): nothing
    assert h.defrag.nodes[0].isolated is None and h.defrag.nodes[0].hand == 1
    h.clock.now += 1
    h.defrag.step(h.clock())  # run 1
    assert h.defrag.nodes[0].isolated is not None


def test_promotion_and_defrag_together_reach_coverage(h: HugeHarness) -> None:
    """Node 0 has no free run (each holds a few pages); promotion asks, defrag empties one,
    promotion then collapses the region: the guest ends up mapped large."""
    g = h.add_vm(guest_pages=4 * R)
    h.back(g, region(0), node=0)
    h.defrag.proactiveness = 0  # only when asked
    alloc = h.machine.allocator
    spread = h.add_vm(guest_pages=4 * R)
    h.back(spread, list(range(alloc.free_on(0))), node=0)
    p2m = spread.vm.p2m
    drop = np.flatnonzero((p2m.frame >= 0) & (p2m.frame % 64 != 0))
    h.machine.release_or_retire(p2m.frame[drop])
    p2m.frame[drop], p2m.state[drop] = -1, PageState.ZERO
    spread.exposure.frame[drop] = -1
    for b in drop.tolist():
        del spread.data[b]
    assert alloc.free_runs(0) == 0
    node1 = break_runs(h, 1)  # and none on the other node either
    for _ in range(20):
        h.clock.now += 0.6
        h.defrag.step(h.clock())
        h.promo.scan(g.vm, 64, h.clock())
        h.rounds(g)
        h.rounds(spread)
        if g.exposure.large[0]:
            break
    assert g.exposure.large[0] and h.defrag.stats.runs_freed >= 1
    assert (alloc.node_of(g.vm.p2m.frame[region(0)]) == 0).all()
    alloc.release(node1)
    h.both_sides_agree(g)
    for guest in (g, spread):
        h.content_intact(guest)
    assert h.invariants() == []


def test_a_region_with_a_page_faulted_while_selected_is_put_back(h: HugeHarness) -> None:
    """A page of the batch faults while it is SELECTED (the VMM keeps it): the rest of its
    region, released, cannot be copied; they keep their frames and validation maps them
    again. Nothing is lost and nothing is large."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    req = h.engine.get_request(g.vm, g.state, GetRequest(Priority.LOW, 10**6, GET_FLAG_NEW_ROUND))
    assert ServiceType(req.service) == ServiceType.PROMOTION_2M and req.count == R
    reply = h.resolver.try_resolve(g.vm, 40, True, 0)  # the fault crosses the batch
    assert reply.reason == FaultReason.MAPPED
    bpns, status, mpns = g.vm.region.slot(req.slot).batch(req.count)
    g.filters[ServiceType.PROMOTION_2M].process(bpns, mpns, status)
    del bpns, status, mpns
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))  # the reply lands after
    h.engine.complete(g.vm, g.state, CompleteRequest(req.slot, req.count, req.seq))
    assert h.run_spawned() == 0  # no copy started
    assert (g.vm.p2m.frame[region(0)] == old).all()
    h.rounds(g)
    assert (g.exposure.frame[region(0)] == old).all() and not g.exposure.large.any()
    assert h.promo.stats(g.vm).aborted == 1 and coverage(g.vm.p2m)[0] == 0
    h.content_intact(g)
    assert h.invariants() == []


def test_a_run_on_another_node_when_the_home_node_has_none(h: HugeHarness) -> None:
    """No whole run on the home node: promotion takes one on another node (khugepaged falls
    back too) rather than wait."""
    g = h.add_vm()
    h.back(g, region(0), node=0)
    taken = break_runs(h, 0)
    h.promote(g)
    assert g.exposure.large[0]
    assert (h.machine.allocator.node_of(g.vm.p2m.frame[region(0)]) == 1).all()
    h.machine.allocator.release(taken)
    h.content_intact(g)
    assert h.invariants() == []


def test_the_agent_maps_large_only_an_aligned_run_in_order() -> None:
    """arm_large: all 512 pages installed writable on frames run+0..run+511 of an aligned
    run; two pages swapped, a run not aligned, or a read-only page: not large."""
    from vmm_agent.exposure import ExposureTable

    t = ExposureTable(4 * R)
    ones = np.ones(R, dtype=bool)
    t.install(np.arange(R), np.arange(R, 2 * R), ones)  # region 0 on run 1, in order
    swapped = np.arange(2 * R, 3 * R)
    swapped[[3, 4]] = swapped[[4, 3]]
    t.install(np.arange(R, 2 * R), swapped, ones)  # region 1: two pages swapped
    t.install(np.arange(2 * R, 3 * R), np.arange(3 * R + 1, 4 * R + 1), ones)  # unaligned
    t.install(np.arange(3 * R, 4 * R), np.arange(5 * R, 6 * R), ones)
    t.writable[3 * R + 9] = False  # region 3: one read-only page
    assert t.arm_large(np.arange(4)) == 1
    assert t.large.tolist() == [True, False, False, False]
    assert t.coverage() == 0.25
    t.invalidate(np.array([7]))
    assert not t.large.any() and t.splits == 1


def test_a_region_with_a_page_hidden_by_sampling_is_still_mapped_large() -> None:
    """Hiding a page for working-set sampling is a monitor-only trap, not a release: the
    monitor still maps it (writable) on the run, so its region is mapped large all the same."""
    from vmm_agent.exposure import ExposureTable

    t = ExposureTable(2 * R)
    t.install(np.arange(R), np.arange(R, 2 * R), np.ones(R, dtype=bool))
    t.hide(np.array([5, 300]))
    assert t.frame[5] < 0 and t.hidden[5] == (R + 5, True)
    assert t.arm_large(np.array([0])) == 1
    assert t.large.tolist() == [True, False] and t.splits == 0


def test_arming_a_region_already_large_counts_nothing_more() -> None:
    """arm_large returns how many regions it armed: a region already large is not armed
    again, so asking twice counts it once."""
    from vmm_agent.exposure import ExposureTable

    t = ExposureTable(2 * R)
    t.install(np.arange(2 * R), np.arange(2 * R, 4 * R), np.ones(2 * R, dtype=bool))
    assert t.arm_large(np.array([0])) == 1
    assert t.arm_large(np.array([0, 1, 1])) == 1
    assert t.arm_large(np.array([0, 1])) == 0
    assert t.large.tolist() == [True, True] and t.coverage() == 1.0


def test_a_partial_region_at_the_guest_s_end_is_never_mapped_large() -> None:
    """A guest of 1.5 regions: its tail (256 pages) is no 2 MB region. Asked to arm it, even
    on an aligned run in order, the table arms only the whole region, and does not fail."""
    from vmm_agent.exposure import ExposureTable

    n = R + R // 2
    t = ExposureTable(n)
    t.install(np.arange(n), np.arange(R, R + n), np.ones(n, dtype=bool))
    assert len(t.large) == 1
    assert t.arm_large(np.array([1])) == 0
    assert t.arm_large(np.array([0, 1])) == 1
    assert t.large.tolist() == [True] and t.coverage() == R / n


def test_promotion_refuses_whole_regions_and_only_the_regions_with_a_refused_page() -> None:
    """One PROMOTION_2M batch of four regions: a pinned page (BUSY), a stale frame and a page
    not exposed each keep their whole region (every other page BUSY, nothing released of
    it), and the clean region in the same batch is released whole."""
    from vmm_agent.exposure import ExposureTable
    from vmm_agent.services.promotion import PromotionFilter

    t = ExposureTable(4 * R)
    bpns = np.arange(4 * R, dtype=np.int64)
    t.install(bpns, bpns + R, np.ones(4 * R, dtype=bool))
    t.pinned[5] = 1  # region 0
    mpns = bpns + R
    mpns[R + 9] += 1  # region 1: the platform's frame is not the one mapped
    t.invalidate(np.array([3 * R + 7]))  # region 3: not exposed
    status = np.zeros(4 * R, dtype=np.uint8)
    accepted = PromotionFilter(t).process(bpns.astype(np.uint64), mpns, status)
    expect = np.full(4 * R, PageStatus.BUSY, dtype=np.uint8)
    expect[2 * R : 3 * R] = PageStatus.OK
    expect[R + 9] = PageStatus.STALE_FRAME
    expect[3 * R + 7] = PageStatus.NOT_EXPOSED
    assert status.tolist() == expect.tolist()
    assert accepted.tolist() == list(range(2 * R, 3 * R))
    assert (t.frame[: 2 * R] == bpns[: 2 * R] + R).all()
    assert (t.frame[2 * R : 3 * R] < 0).all()
    assert (t.released_by[2 * R : 3 * R] == ServiceType.PROMOTION_2M).all()


# ---- defrag: what cannot be emptied, what is sent ----------------------------------------------


def test_a_run_holding_a_retired_frame_is_never_isolated(h: HugeHarness) -> None:
    """A retired frame never comes back to the pool, so a run holding one can never be
    released whole: the look skips it (and marks it skipped) instead of claiming its 509
    free frames for nothing."""
    g = h.add_vm(guest_pages=4 * R)
    fragment(h, g, keep=2)
    alloc = h.machine.allocator
    bad = R + int(np.flatnonzero(alloc.frame_state[R : 2 * R] == FrameState.FREE)[0])
    assert alloc.retire(bad)  # a free frame of run 1 retired (page retire of a free frame)
    free = alloc.free

    h.defrag.step(h.clock())

    assert h.defrag.nodes[0].isolated is None and 1 in h.defrag.nodes[0].skip
    assert alloc.free == free  # nothing claimed
    assert h.frame_state([bad]) == [FrameState.RETIRED]
    h.content_intact(g)
    assert h.invariants() == []


def test_an_isolated_run_whose_frame_is_retired_is_given_up_at_once(h: HugeHarness) -> None:
    """A frame of the isolated run turns failing under its page and is retired when the page
    moves out, not claimed (else the run could be released whole, the bad frame back in the
    pool as free): the run can never be whole, so the next step gives it up at once (its
    claimed frames back to the pool, the run skipped) rather than hold 500 frames until the
    isolation times out."""
    g = h.add_vm(guest_pages=4 * R)
    stay = fragment(h, g, keep=10)
    h.defrag.step(h.clock())
    assert h.defrag.nodes[0].isolated is not None
    bad = int(g.vm.p2m.frame[stay[0]])
    h.machine.failing[bad] = True
    h.rounds(g)
    assert h.frame_state([bad]) == [FrameState.RETIRED]
    free = h.machine.allocator.free

    h.defrag.step(h.clock() + 0.01)  # well within ISOLATION_SECONDS

    st = h.defrag.nodes[0]
    assert st.isolated is None and 1 in st.skip
    assert h.defrag.stats.runs_aborted == 1 and h.defrag.stats.runs_freed == 0
    assert h.machine.allocator.free == free + R - 1  # all of run 1 but the retired frame
    assert h.frame_state([bad]) == [FrameState.RETIRED]
    h.content_intact(g)
    assert h.invariants() == []


def test_pages_of_a_run_given_up_are_not_sent_any_more(h: HugeHarness) -> None:
    """The run's pages were queued when it was isolated; it is given up (timeout) before the
    VM ran a round. Moving them now would cost a fault-prone release for nothing (no run is
    being emptied), so the round sends no DEFRAG_2M batch and the pages keep their frames."""
    g = h.add_vm(guest_pages=4 * R)
    stay = fragment(h, g, keep=6)
    h.defrag.step(h.clock())
    assert h.defrag.nodes[0].isolated is not None
    assert h.defrag.pending_work(g.vm, h.clock()) == 6
    h.clock.now += defrag_mod.ISOLATION_SECONDS + 1
    h.defrag.step(h.clock())
    assert h.defrag.nodes[0].isolated is None and h.defrag.stats.runs_aborted == 1
    before = g.vm.p2m.frame[stay].copy()

    batches = h.rounds(g)

    assert [s for s, _ in batches if s == ServiceType.DEFRAG_2M] == []
    assert (g.vm.p2m.frame[stay] == before).all() and h.defrag.stats.moved == 0
    assert (g.vm.p2m.state[stay] == PageState.EXPOSED).all()
    h.content_intact(g)
    assert h.invariants() == []


def test_defrag_moves_never_exceed_the_host_limit(h: HugeHarness) -> None:
    """Each move takes a new frame while the frame it leaves stays claimed for the run: the
    host's used frames grow by one per page. With the host limit 4 frames above what is
    used, 4 pages move, the other 6 keep their frames (mapped again by validation) and the
    limit holds; raised again, the next step re-queues the 6 and the run is freed."""
    g = h.add_vm(guest_pages=4 * R)
    stay = fragment(h, g, keep=10)
    h.defrag.step(h.clock())
    assert h.defrag.nodes[0].isolated is not None
    m = h.machine
    m.limit_pages = m.allocator.used + 4
    assert m.allocator.free_on(0) > 10  # the node has room: only the host limit stops them

    h.rounds(g)

    assert m.allocator.used <= m.limit_pages and m.available() == 0
    assert h.defrag.stats.moved == 4
    on_run1 = (g.vm.p2m.frame[stay] >= R) & (g.vm.p2m.frame[stay] < 2 * R)
    assert on_run1.sum() == 6
    assert (g.exposure.frame[stay] == g.vm.p2m.frame[stay]).all()  # all mapped again
    h.content_intact(g)
    assert h.invariants() == []

    m.limit_pages = m.host_pages
    h.defrag.step(h.clock() + 0.01)  # re-queues the 6 left on the run
    h.rounds(g)
    h.defrag.step(h.clock() + 0.02)
    assert h.defrag.stats.runs_freed == 1 and m.allocator.run_free[1] == R
    h.content_intact(g)
    assert h.invariants() == []


def test_only_a_fault_that_completes_the_move_counts_as_a_fault_completion(
    h: HugeHarness,
) -> None:
    """A fault on a page in flight with no free frame keeps the page where it was (CANCEL):
    that is not a completed move and is not counted; one that moves it (COMPLETE) is."""
    g = h.add_vm(guest_pages=4 * R)
    stay = fragment(h, g, keep=5)
    h.defrag.step(h.clock())
    assert h.low_round(g, run_moves=False)[0][0] == ServiceType.DEFRAG_2M
    filler = h.add_vm(guest_pages=4 * R)
    h.back(filler, list(range(h.machine.allocator.free_on(0))), node=0)

    reply = h.defrag.on_fault(g.vm, stay[0], True)

    assert reply.reason == FaultReason.CANCEL and h.defrag.stats.fault_completions == 0
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    h.machine.release_or_retire(filler.vm.p2m.frame[[0]])  # one frame free again
    filler.vm.p2m.frame[0], filler.vm.p2m.state[0] = -1, PageState.ZERO
    filler.exposure.frame[0] = -1
    del filler.data[0]
    reply = h.defrag.on_fault(g.vm, stay[1], True)
    assert reply.reason == FaultReason.COMPLETE and h.defrag.stats.fault_completions == 1
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    h.run_spawned()
    for guest in (g, filler):
        h.content_intact(guest)
    assert h.invariants() == []


# ---- defrag: the default policy ----------------------------------------------------------------


def hold_node0(h: HugeHarness, whole: list[int], scattered: int) -> npt.NDArray[np.int64]:
    """Leave node 0 (fresh: only the zero frame used) with runs ``whole`` free and
    ``scattered`` more free frames in the other runs, none of those whole (their first frame
    is held). The held frames are owned by nobody: release them before the invariant check."""
    alloc = h.machine.allocator
    held = alloc.allocate(alloc.free_on(0), 0)
    others = np.sort(held[~np.isin(held // R, whole)])
    others = others[others % R != 0]  # a run's first frame stays held: never whole
    give = np.concatenate([held[np.isin(held // R, whole)], others[:scattered]])
    assert len(others) >= scattered
    alloc.release(give)
    assert alloc.free_runs(0) == len(whole) and alloc.free_on(0) == R * len(whole) + scattered
    return held[~np.isin(held, give)]


def test_the_fragmentation_score_is_the_percent_of_free_frames_outside_whole_runs(
    h: HugeHarness,
) -> None:
    """Linux's fragmentation_score_node: 100 * (free - 512 * whole free runs) / free.
    A fresh node 0 has 2047 free frames (frame 0 is the zero frame), 3 of its 4 runs whole:
    511 of 2047 free frames are outside them, 24.96 %, reported as a whole percent (25).
    One whole run and 128 scattered frames: exactly 20 %. No whole run: 100. None free: 0."""
    alloc = h.machine.allocator
    assert (alloc.free_on(0), alloc.free_runs(0)) == (2047, 3)
    assert h.defrag.fragmentation_score(0) == round(100 * 511 / 2047) == 25
    held = hold_node0(h, whole=[3], scattered=128)
    assert h.defrag.fragmentation_score(0) == 20  # 128 / 640
    alloc.release(held)
    taken = break_runs(h, 0)
    assert h.defrag.fragmentation_score(0) == 100
    alloc.release(taken)
    everything = alloc.allocate(alloc.free_on(0), 0)
    assert h.defrag.fragmentation_score(0) == 0
    alloc.release(everything)
    assert h.invariants() == []


class Looks:
    """Node 0 set to a given free-frame layout (``hold_node0``), then one look of defrag at
    the next check time: returns the node's score and whether it is compacting."""

    def __init__(self, h: HugeHarness, whole: list[int]) -> None:
        self.h, self.whole = h, whole
        self.held = np.empty(0, dtype=np.int64)

    def __call__(self, scattered: int) -> tuple[int, bool]:
        h = self.h
        h.machine.allocator.release(self.held)
        self.held = hold_node0(h, self.whole, scattered)
        h.clock.now += defrag_mod.CHECK_SECONDS
        h.defrag.step(h.clock())
        return h.defrag.fragmentation_score(0), h.defrag.nodes[0].compacting

    def done(self) -> None:
        self.h.machine.allocator.release(self.held)
        self.held = np.empty(0, dtype=np.int64)


def test_proactive_compaction_starts_above_the_high_mark_and_stops_at_the_low_one(
    h: HugeHarness,
) -> None:
    """kcompactd's hysteresis: with proactiveness p a node starts compacting when its score is
    above 100 - p + 10, keeps compacting while it is above 100 - p, and stops at 100 - p or
    below; between the two marks it keeps doing what it did. (p = 40 here: the band 60..70
    is reachable on this small node, where one whole run caps the score at 75.)"""
    h.defrag.proactiveness = 40
    look = Looks(h, whole=[3])  # run 3 free, plus n frames scattered in runs 0-2

    assert look(1195) == (70, False)  # at the high mark: not above it, does not start
    assert look(1024) == (67, False)  # in the band, not compacting: stays off
    assert look(1254) == (71, True)  # above the high mark: starts
    assert look(1024) == (67, True)  # in the band: keeps compacting
    assert look(1195) == (70, True)
    assert look(768) == (60, False)  # at the low mark: stops
    assert look(1024) == (67, False)  # in the band again: stays off
    assert h.defrag.nodes[0].isolated is None  # (nothing to empty: no VM page anywhere)
    look.done()
    assert h.invariants() == []


def test_the_low_mark_is_never_below_5_percent(h: HugeHarness) -> None:
    """Linux's ``max(100 - proactiveness, 5)``: even at proactiveness 100 a node whose free
    frames are 95 % in whole runs is compacted enough (marks 5 and 15), so defrag does not
    churn for the last few scattered frames."""
    h.defrag.proactiveness = 100
    look = Looks(h, whole=[1, 2, 3])  # 1536 frames in whole runs, n more in run 0

    assert look(271) == (15, False)  # at the high mark: does not start
    assert look(292) == (16, True)  # above it: starts
    assert look(100) == (6, True)  # above the low mark: keeps compacting
    assert look(81) == (5, False)  # at the low mark (5, not 0): stops
    look.done()
    assert h.invariants() == []


def test_with_default_proactiveness_a_node_without_a_whole_run_is_compacted_unasked(
    h: HugeHarness,
) -> None:
    """Proactiveness 20 (marks 80 and 90). Node 0 with whole free runs scores 33: no
    compaction. With every run broken it scores 100: defrag empties the nearly free run 1
    without promotion asking; once a run is whole again (score 66) it stops."""
    g = h.add_vm(guest_pages=4 * R)
    fragment(h, g, keep=10)
    h.defrag.proactiveness = defrag_mod.PROACTIVENESS
    st = h.defrag.nodes[0]
    h.defrag.step(h.clock())
    assert h.defrag.fragmentation_score(0) == 33 and not st.compacting
    assert st.isolated is None and not st.wanted
    taken = break_runs(h, 0)  # runs 2 and 3: one frame each, owned by nobody (skipped)
    h.clock.now += defrag_mod.CHECK_SECONDS

    h.defrag.step(h.clock())

    assert h.defrag.fragmentation_score(0) == 100
    assert st.compacting and st.isolated is not None and st.isolated.run == 1
    h.rounds(g)
    h.defrag.step(h.clock() + 0.01)
    assert h.defrag.stats.runs_freed == 1
    h.clock.now += defrag_mod.CHECK_SECONDS
    h.defrag.step(h.clock())
    assert h.defrag.fragmentation_score(0) == 66 and not st.compacting  # 1010 of 1522
    h.machine.allocator.release(taken)
    h.content_intact(g)
    assert h.invariants() == []


def test_a_request_for_a_run_is_dropped_when_a_run_is_free(h: HugeHarness) -> None:
    """Promotion asked (want_run) but a whole run is free on the node by the next look: the
    request is dropped there (promotion takes that run) and no run is emptied for it."""
    g = h.add_vm(guest_pages=4 * R)
    fragment(h, g, keep=10)  # runs 2 and 3 free
    h.defrag.proactiveness = defrag_mod.PROACTIVENESS  # score 33: no proactive compaction
    h.defrag.want_run(0)

    h.defrag.step(h.clock())

    st = h.defrag.nodes[0]
    assert not st.wanted and st.isolated is None
    assert h.invariants() == []


def test_a_request_for_a_run_is_answered_once_by_the_run_it_freed(h: HugeHarness) -> None:
    """Promotion asked for a run; defrag empties run 1 and releases it whole: the request is
    answered. If the run is taken at once (as promotion's copy takes it) and no whole run is
    left, defrag does not go on emptying runs nobody asked for; a new request does."""
    g = h.add_vm(guest_pages=4 * R)
    h.back(g, list(range(2047)), node=0)  # frames 1..2047: all of node 0
    p2m = g.vm.p2m
    runs = p2m.frame // R
    keep = {1: 10, 2: 20, 3: 300}  # run 3 keeps too many pages to be a candidate
    drop = np.concatenate([np.flatnonzero(runs == r)[k:] for r, k in keep.items()])
    h.machine.release_or_retire(p2m.frame[drop])
    p2m.frame[drop], p2m.state[drop] = -1, PageState.ZERO
    g.exposure.frame[drop] = -1
    for b in drop.tolist():
        del g.data[b]
    alloc = h.machine.allocator
    assert alloc.free_runs(0) == 0
    h.defrag.proactiveness = 0  # only when asked
    st = h.defrag.nodes[0]
    h.defrag.want_run(0)
    h.defrag.step(h.clock())
    assert st.isolated is not None and st.isolated.run == 1
    h.rounds(g)
    h.defrag.step(h.clock() + 0.01)
    assert h.defrag.stats.runs_freed == 1 and not st.wanted
    run = alloc.allocate_run(0)  # the requester takes it
    assert run is not None and run[0] == R and alloc.free_runs(0) == 0

    h.clock.now += defrag_mod.CHECK_SECONDS
    h.defrag.step(h.clock())

    assert st.isolated is None  # run 2 is not emptied unasked
    h.defrag.want_run(0)
    h.clock.now += defrag_mod.CHECK_SECONDS
    h.defrag.step(h.clock())
    assert st.isolated is not None and st.isolated.run == 2
    alloc.release(run)
    h.content_intact(g)
    assert h.invariants() == []


@pytest.mark.parametrize(("keep", "isolated"), [(defrag_mod.MAX_USED, True), (65, False)])
def test_a_run_with_at_most_max_used_pages_is_emptied(
    h: HugeHarness, keep: int, isolated: bool
) -> None:
    """The design's "nearly free 2 MB regions": a run holding MAX_USED (64) pages is emptied,
    one holding 65 is left alone (too many pages to move for one run)."""
    g = h.add_vm(guest_pages=4 * R)
    stay = fragment(h, g, keep=keep)
    assert len(stay) == keep

    h.defrag.step(h.clock())

    assert (h.defrag.nodes[0].isolated is not None) == isolated
    if isolated:
        h.rounds(g)
        h.defrag.step(h.clock() + 0.01)
        assert h.defrag.stats.runs_freed == 1 and h.machine.allocator.run_free[1] == R
    h.content_intact(g)
    assert h.invariants() == []


@pytest.mark.parametrize("spare", [0, -1])
def test_defrag_keeps_the_node_reserve_free(h: HugeHarness, spare: int) -> None:
    """Claiming a run and moving its pages out must leave the node its reserve for faults
    (free_high_pct = 6 % of 2048 frames: 123). Node 0 with 635 free frames (502 of them in
    run 1, whose 10 pages move): after the moves exactly 123 are free outside the run, so
    the run is emptied. One frame fewer (634): nothing is isolated and the request dropped."""
    g = h.add_vm(guest_pages=4 * R)
    fragment(h, g, keep=10)
    alloc = h.machine.allocator
    reserve = 123
    assert h.defrag._reserve(0) == reserve
    held = np.arange(2 * R, 4 * R)  # runs 2 and 3, held by nobody but a few frames
    alloc.claim_free(2), alloc.claim_free(3)
    target = R + reserve + spare  # 635 or 634
    cut = len(held) - (target - alloc.free_on(0))
    alloc.release(held[cut:])
    held = held[:cut]
    assert alloc.free_on(0) == target and alloc.run_free[1] == R - 10
    h.defrag.want_run(0)

    h.defrag.step(h.clock())

    st = h.defrag.nodes[0]
    if spare < 0:
        assert st.isolated is None and not st.wanted and not st.compacting
    else:
        assert st.isolated is not None and st.isolated.run == 1
        h.rounds(g)
        assert alloc.free_on(0) == reserve  # the moves used the rest, and no more
        h.defrag.step(h.clock() + 0.01)
        assert h.defrag.stats.runs_freed == 1
    alloc.release(held)
    h.content_intact(g)
    assert h.invariants() == []


def test_each_node_is_looked_at_once_per_check_interval(h: HugeHarness) -> None:
    """A look costs a scan of runs, so a node is looked at every CHECK_SECONDS, however often
    the worker steps. Defrag switched on just after a look: the run is isolated at the next
    check time, not at the steps in between."""
    g = h.add_vm(guest_pages=4 * R)
    fragment(h, g, keep=10)
    h.defrag.enabled = False
    t = h.clock()
    h.defrag.step(t)  # a look: nothing (switched off)
    h.defrag.enabled = True
    st = h.defrag.nodes[0]

    h.defrag.step(t + defrag_mod.CHECK_SECONDS / 2)
    assert st.isolated is None  # too soon

    h.defrag.step(t + defrag_mod.CHECK_SECONDS)
    assert st.isolated is not None and st.isolated.run == 1
    assert h.invariants() == []


# ---- splitting and coverage --------------------------------------------------------------------


def test_one_release_touching_two_large_regions_counts_two_splits(h: HugeHarness) -> None:
    """The split counters count regions split, not releases or pages: one balloon batch
    taking a page of each of two large regions splits both (2), and each keeps its other
    511 pages on their frames."""
    g = h.add_vm()
    h.back(g, region(0) + region(1), node=0)  # frames 1..1024: neither on a run
    h.promote(g)
    assert g.exposure.large.all() and coverage(g.vm.p2m) == (2, 2)
    frames = g.vm.p2m.frame[: 2 * R].copy()
    taken = np.array([100, R + 7])
    g.exposure.invalidate(taken)  # the balloon driver, on the agent
    BalloonService(h.ctx).complete(g.vm, taken, np.zeros(2, dtype=np.uint8))
    for b in taken.tolist():
        del g.data[b]

    assert g.vm.stats.hugepage_splits == 2 and split_count(h, "balloon") == 2
    assert g.exposure.splits == 2 and coverage(g.vm.p2m) == (0, 2)
    assert not (g.vm.p2m.flags[: 2 * R] & FLAG_LARGE).any()
    rest = np.setdiff1d(np.arange(2 * R), taken)
    assert (g.vm.p2m.frame[rest] == frames[rest]).all()
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_coverage_counts_only_whole_regions_of_a_guest_not_a_multiple_of_2m(
    h: HugeHarness,
) -> None:
    """A guest of 2 MiB * 2 + 100 pages has 2 whole regions; the 100-page tail can never be
    mapped large, so it is not a region coverage counts (1 of 2 large, not 1 of 3)."""
    g = h.add_vm(guest_pages=2 * R + 100)
    h.back(g, list(range(2 * R, 2 * R + 100)), node=0)  # the tail, backed
    promoted(h, g, 0)
    assert coverage(g.vm.p2m) == (1, 2)
    assert len(g.exposure.large) == 2
    h.content_intact(g)
    assert h.invariants() == []


# ---- gaps a mutation sweep of the copier's collapse found --------------------------------------


def test_a_batch_s_steps_yield_between_them_and_leave_no_region_behind(
    h: HugeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three regions already in place, released in one batch, two regions a step: the
    collapse yields before each step (faults first), a step promotes every region of its
    own, and a fault between two steps on a region of the next collapses it itself, which
    that step then leaves alone. No region of the batch is left in flight."""
    monkeypatch.setattr(promotion_mod, "STEP_REGIONS", 2)
    g = h.add_vm(guest_pages=3 * R, regions=3)
    for r in range(3):
        on_run_in_order(h, g, r)
    h.promo.scan(g.vm, 64, h.clock())
    batch = [*region(0), *region(1), *region(2)]
    assert h.low_round(g, run_moves=False) == [(ServiceType.PROMOTION_2M, batch)]
    collapse = h.spawned.pop(0)  # in place: its only awaits are the yields between steps
    stats = h.promo.stats(g.vm)
    try:
        collapse.send(None)  # up to the yield before the first step: nothing done yet
        assert stats.promoted == 0
        collapse.send(None)  # the first step: regions 0 and 1
        assert (stats.promoted, stats.in_place) == (2, 2)
        assert (g.vm.p2m.state[region(2)] == PageState.IN_FLIGHT).all()

        reply = h.promo.on_fault(g.vm, 2 * R + 5, write=True)

        assert reply.reason == FaultReason.COMPLETE
        g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
        with pytest.raises(StopIteration):
            collapse.send(None)  # the second step: region 2 is the fault's already
    finally:
        collapse.close()
    assert (stats.promoted, stats.in_place, stats.fault_completions) == (3, 3, 1)
    assert g.vm.p2m.state[2 * R + 5] == PageState.EXPOSED
    assert not (g.vm.p2m.state == PageState.IN_FLIGHT).any()
    h.rounds(g)
    assert g.exposure.large.tolist() == [True, True, True]
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_a_step_with_a_region_in_place_and_one_to_copy_checks_each_against_its_own_epochs(
    h: HugeHarness,
) -> None:
    """Region 0 already in place, region 1 scattered, released in one batch; region 0's
    pages were faulted during earlier moves (their epochs are ahead of region 1's). The
    step promotes region 0 in place and copies region 1, whose copy is checked against
    region 1's epochs as the release left them: both end large, none stays in flight."""
    g = h.add_vm(regions=2)
    on_run_in_order(h, g, 0)
    h.back(g, region(1), node=0)
    g.vm.p2m.epoch[region(0)] += 3  # as faults during earlier moves left them

    h.promote(g)

    stats = h.promo.stats(g.vm)
    assert (stats.promoted, stats.in_place, stats.aborted, stats.copies_discarded) == (2, 1, 0, 0)
    assert not (g.vm.p2m.state == PageState.IN_FLIGHT).any()
    assert g.exposure.large.tolist() == [True, True]
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_one_run_at_a_time_each_region_is_checked_against_its_own_epochs(h: HugeHarness) -> None:
    """Two regions in a step near the host limit (one run at a time), region 1's epochs
    ahead of region 0's (faults during earlier moves): the step's second turn checks region
    1 against its own epochs, so it is copied too; none stays in flight."""
    g = h.add_vm(regions=2)
    for r in range(2):
        h.back(g, region(r), node=0)
    g.vm.p2m.epoch[region(1)] += 3  # as faults during earlier moves left them
    m = h.machine
    m.limit_pages = m.allocator.used + 2 * R  # room for two runs, nothing beside the second

    h.promote(g)

    stats = h.promo.stats(g.vm)
    assert (stats.promoted, stats.aborted, stats.copies_discarded) == (2, 0, 0)
    assert not (g.vm.p2m.state == PageState.IN_FLIGHT).any()
    assert g.exposure.large.tolist() == [True, True]
    h.content_intact(g)
    assert h.invariants() == []


def test_with_room_a_step_copies_its_regions_into_their_runs_in_one_copy(h: HugeHarness) -> None:
    """Two regions in a step, room for both runs and the high free threshold beside them:
    both runs are taken at once and filled by one copy on the copier, then both regions
    are repointed together (two promoted)."""
    g = h.add_vm(regions=2)
    for r in range(2):
        h.back(g, region(r), node=0)
    copies, loop, task = _collapse_held_at_its_copy(h, g, [*region(0), *region(1)])
    try:
        held = h.promo.held_frames()
        assert len(held) == 2 * R and len(set(held)) == 2 * R  # both runs, one copy
        assert copies.run_held() == 1
        loop.run_until_complete(task)
    finally:
        loop.close()
    assert copies.ran == 1 and copies.held == []
    both_regions_promoted(h, g)


@pytest.mark.parametrize("beside", [0, -1])
def test_a_second_run_is_taken_only_with_the_high_free_threshold_beside_it(
    h: HugeHarness, beside: int
) -> None:
    """The host limit leaves room for two runs and exactly the high free threshold
    (``free_high_pct`` of the limit) beside them: the step takes both runs for one copy.
    One frame less: one run at a time."""
    g = h.add_vm(regions=2)
    for r in range(2):
        h.back(g, region(r), node=0)
    m, pct = h.machine, h.config.free_high_pct
    used = m.allocator.used
    limit = used + 2 * R
    while limit - used - 2 * R != int(np.ceil(pct / 100 * limit)) + beside:
        limit += 1
    m.limit_pages = limit
    assert m.available() - 2 * R == int(np.ceil(pct / 100 * limit)) + beside > 0
    copies, loop, task = _collapse_held_at_its_copy(h, g, [*region(0), *region(1)])
    try:
        assert len(h.promo.held_frames()) == (2 * R if beside == 0 else R)
        copies.inline = True
        copies.run_held()
        loop.run_until_complete(task)
    finally:
        loop.close()
    both_regions_promoted(h, g)


def test_the_runs_of_every_copy_in_flight_are_held(h: HugeHarness) -> None:
    """Two VMs' collapses both hand their copies to the copier: while both are in flight,
    both runs are used frames no p2m names, and ``held_frames`` names every one of them
    (the invariant check counts them held)."""
    copies = HeldCopies()
    h.machine.copier = copies
    guests = [h.add_vm() for _ in range(2)]
    for g in guests:
        h.back(g, region(0), node=0)
        h.promo.scan(g.vm, 64, h.clock())
        assert h.low_round(g, run_moves=False) == [(ServiceType.PROMOTION_2M, region(0))]
    loop = asyncio.new_event_loop()
    try:
        tasks = [loop.create_task(h.spawned.pop(0)) for _ in guests]
        for _ in range(10):
            if len(copies.held) == 2:
                break
            loop.run_until_complete(asyncio.sleep(0))
        assert len(copies.held) == 2
        held = h.promo.held_frames()
        assert len(held) == 2 * R and len(set(held)) == 2 * R
        assert h.invariants() == []
        assert copies.run_held() == 2
        loop.run_until_complete(asyncio.gather(*tasks))
    finally:
        loop.close()
    assert h.promo.held_frames() == []
    for g in guests:
        h.rounds(g)
        assert g.exposure.large[0]
        h.content_intact(g)
    assert h.invariants() == []


def test_a_fault_on_a_region_in_place_completes_it_without_a_run(h: HugeHarness) -> None:
    """A region already in place is in flight when no whole run is free anywhere: a fault
    on it promotes it where it is (COMPLETE, its own frame), no copy and no run needed,
    and the pending step leaves it alone."""
    g = h.add_vm()
    run = on_run_in_order(h, g, 0)
    h.promo.scan(g.vm, 64, h.clock())
    assert h.low_round(g, run_moves=False) == [(ServiceType.PROMOTION_2M, region(0))]
    taken = np.concatenate([break_runs(h, 0), break_runs(h, 1)])

    reply = h.promo.on_fault(g.vm, 9, write=True)

    assert reply.reason == FaultReason.COMPLETE and reply.mpns.tolist() == [run[9]]
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    h.write(g, 9, numa_tests.content(909))
    assert h.run_spawned() == 1
    assert g.vm.p2m.frame[region(0)].tolist() == run.tolist()
    stats = h.promo.stats(g.vm)
    assert (stats.promoted, stats.in_place, stats.fault_completions, stats.no_run) == (1, 1, 1, 0)
    h.machine.allocator.release(taken)
    h.rounds(g)
    assert g.exposure.large.tolist() == [True, False]
    h.both_sides_agree(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_a_fault_that_finds_no_run_counts_it_and_asks_defrag_for_one(h: HugeHarness) -> None:
    """A fault on a region in flight, no whole run free anywhere: the region keeps its
    frames (CANCEL), the miss is counted (``no_run``) and 2M defrag is asked for a run on
    the home node, as when a step finds none."""
    g = h.add_vm()
    old = h.back(g, region(0), node=0)
    h.promo.scan(g.vm, 64, h.clock())
    h.low_round(g, run_moves=False)
    taken = np.concatenate([break_runs(h, 0), break_runs(h, 1)])
    assert not h.defrag.nodes[0].wanted

    reply = h.promo.on_fault(g.vm, 3, write=True)

    assert reply.reason == FaultReason.CANCEL and reply.mpns.tolist() == [old[3]]
    assert h.promo.stats(g.vm).no_run == 1 and h.defrag.nodes[0].wanted
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    assert h.run_spawned() == 1
    assert h.promo.stats(g.vm).no_run == 1  # the step found the region no longer its own
    h.machine.allocator.release(taken)
    h.clock.now += 1
    h.rounds(g)
    h.content_intact(g)
    assert h.invariants() == []


def test_a_page_queued_twice_for_remap_validation_is_sent_once(h: HugeHarness) -> None:
    """A page moved twice before its remap validation (NUMA migration, then 2M defrag: each
    queues it) is in the VALIDATION batch once, the batch in page order."""
    g = h.add_vm()
    old = h.back(g, [3, 5], node=0)
    g.exposure.invalidate(np.array([3, 5]))  # released for the moves
    g.exposure.released_by[[3, 5]] = ServiceType.NUMA_MIGRATION
    g.vm.p2m.state[[3, 5]] = PageState.RESIDENT  # moved (on the same frames here)
    h.validation.enqueue(g.vm, np.array([5, 3]))
    h.validation.enqueue(g.vm, np.array([3]))

    assert h.rounds(g) == [(ServiceType.VALIDATION, [3, 5])]

    assert g.exposure.frame[[3, 5]].tolist() == old.tolist()
    assert (g.vm.p2m.state[[3, 5]] == PageState.EXPOSED).all()
    h.content_intact(g)
    assert h.invariants() == []


def test_validation_maps_large_only_a_region_the_daemon_marked_large_on_every_page_sent() -> None:
    """One VALIDATION batch with pages of two regions, each region on an aligned run in
    order: region 1's pages all LARGE, region 0's one LARGE and one not (the daemon split it
    without a batch; its frames still lie in order). Only region 1 is mapped large."""
    from vmm_agent.exposure import ExposureTable

    t = ExposureTable(2 * R)
    frames = np.arange(2 * R, 4 * R, dtype=np.int64)  # runs 2 and 3, in order
    t.install(np.arange(2 * R), frames, np.ones(2 * R, dtype=bool))
    bpns = np.array([5, 6, R + 5, R + 6], dtype=np.int64)
    t.invalidate(bpns)
    t.released_by[bpns] = ServiceType.PROMOTION_2M
    status = np.full(len(bpns), PageStatus.LARGE, dtype=np.uint8)
    status[1] = PageStatus.OK  # page 6: region 0 is small pages now

    ValidationFilter(t).process(bpns.astype(np.uint64), frames[bpns], status)

    assert status.tolist() == [PageStatus.OK] * 4
    assert t.large.tolist() == [False, True]


@pytest.mark.parametrize("later", ["turn", "step"])
def test_a_copy_that_fails_gives_back_the_regions_its_batch_had_not_copied_yet(
    h: HugeHarness, monkeypatch: pytest.MonkeyPatch, later: str
) -> None:
    """Two regions in one batch; the copier's first copy (region 0's) raises. Region 0
    keeps its frames and goes back to validation; region 1, which waited for the step's
    next turn (near the host limit) or for the next step (one region a step), must go back
    as well: not left in flight, where no scan, round or validation reaches it."""
    g = h.add_vm(regions=2)
    olds = [h.back(g, region(r), node=0) for r in range(2)]
    if later == "turn":
        h.machine.limit_pages = h.machine.allocator.used + 2 * R  # one run at a time
    else:
        monkeypatch.setattr(promotion_mod, "STEP_REGIONS", 1)
    h.promo.scan(g.vm, 64, h.clock())
    h.low_round(g, run_moves=False)
    _run_collapse_with_a_failing_copy(h, monkeypatch)
    assert h.promo.held_frames() == []
    assert (g.vm.p2m.state[region(0)] == PageState.RESIDENT).all()
    assert (g.vm.p2m.state[region(1)] == PageState.RESIDENT).all()
    h.rounds(g)
    for r in range(2):
        assert (g.exposure.frame[region(r)] == olds[r]).all()
    h.content_intact(g)
    assert h.invariants() == []
