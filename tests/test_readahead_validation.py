"""Swap read-ahead validation on its own, against a fake peer.

No server and no socket: the swap and validation services see a ``ServiceContext`` built
from real parts (machine memory in a /dev/shm file, its allocator, the fault resolver, a
real swap file, metrics on a private registry) and a virtual clock. The VMM's side is the
agent's own filters (swap's, validation's) on an ``ExposureTable``; low-priority batches go
through the real ``RoundEngine``. Every outcome is checked on real bytes, on the swap file's
slots and with the daemon's invariant check.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from platform_daemon.allocator import FrameState
from platform_daemon.context import ServiceContext
from platform_daemon.faults import FaultResolver
from platform_daemon.invariants import HostState, check
from platform_daemon.machine import MachineMemory
from platform_daemon.memsched import MemSched
from platform_daemon.metrics import PlatformMetrics
from platform_daemon.p2m import NO_OP, NO_SLOT, P2M
from platform_daemon.rounds import RoundEngine, RoundState
from platform_daemon.services.readahead import HIT_MEMORY, WINDOW, ReadAheadValidation
from platform_daemon.services.swap import SwapService
from platform_daemon.services.validation import ValidationService
from platform_daemon.shared_frames import SharedFrames
from platform_daemon.swapfile import SwapFile
from platform_daemon.vm import VM
from platform_daemon.waits import FrameWaits
from shared.config import PlatformConfig
from shared.constants import (
    NO_FRAME,
    PAGE_SIZE,
    FaultReason,
    FreeState,
    PageState,
    PageStatus,
    Priority,
    ServiceType,
)
from shared.errors import VMMemError
from shared.layout import ControlRegion, region_size
from shared.messages import (
    FAULT_FLAG_WRITABLE,
    GET_FLAG_NEW_ROUND,
    CompleteRequest,
    FaultReply,
    GetRequest,
    Register,
    Request,
)
from shared.shm import MappedFile
from tests.test_numa_migration import FakeClock, Link, NoTargets, content
from vmm_agent.exposure import ExposureTable
from vmm_agent.services.swap import SwapFilter
from vmm_agent.services.validation import ValidationFilter

if TYPE_CHECKING:
    from platform_daemon.server import PlatformServer

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20
GUEST_PAGES = 128
SWAPPED = list(range(10, 40))  # swapped out; a fault on 10 reads 11..18 ahead
AROUND = 8
_OK = np.uint8(0)


class Harness:
    """One VM, both sides: the daemon's swap and validation services, the agent's filters."""

    def __init__(self, mem_dir: Path, tmp: Path) -> None:
        # Every read-ahead reads AROUND pages: the window's growth on a walk is
        # test_swap_readahead_window.py's.
        self.config = PlatformConfig(
            socket=tmp / "p.sock",
            mem_dir=mem_dir,
            host_memory=16 * MiB,
            metrics_port=-1,
            swap_readahead_max=AROUND,
        )
        self.machine = MachineMemory(mem_dir / "machine", self.config.host_pages, 1, prefault=False)
        self.swapfile = SwapFile(tmp / "swap", 4 * MiB)
        self.metrics = PlatformMetrics(CollectorRegistry())
        self.clock = FakeClock()
        self.spawned: list[Coroutine[Any, Any, Any]] = []
        self.resolver = FaultResolver(self.machine, SharedFrames(self.machine), max_around=16)
        self.ctx = ServiceContext(
            machine=self.machine,
            mapper=self.resolver,
            shared=self.resolver.shared,
            metrics=self.metrics,
            config=self.config,
            clock=self.clock,
            spawn=self._spawn,
            waits=FrameWaits(self.machine, 1.0, lambda: None, self.metrics.low_waits),
            swap=self.swapfile,
            targets=NoTargets(),
        )
        self.swap = SwapService(self.ctx)
        self.validation = ValidationService(self.ctx)
        self.swap.hold_read_ahead = self.validation.readahead.hold  # as build_services does
        self.swap.read_ahead_cap = self.validation.readahead.window_cap
        self.engine = RoundEngine({ServiceType.VALIDATION: self.validation}, clock=self.clock)
        self.vm = self._vm()
        self.exposure = ExposureTable(GUEST_PAGES)
        self.filter = ValidationFilter(self.exposure)
        self.state = RoundState()
        self.data: dict[int, bytes] = {}

    def _vm(self) -> VM:
        region = ControlRegion.initialize(
            bytearray(region_size(4, 64)),
            vm_id=1,
            generation=1,
            slot_count=4,
            capacity=64,
            guest_pages=GUEST_PAGES,
        )
        return VM(
            1,
            1,
            info=Register(name="vm1", guest_pages=GUEST_PAGES, vcpus=1),
            home_node=0,
            p2m=P2M(GUEST_PAGES),
            region=region,
            region_file=cast(MappedFile, SimpleNamespace(path=Path("/nonexistent"))),
            connection=Link(),
        )

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        self.spawned.append(coro)
        return cast("asyncio.Future[Any]", None)

    def close(self) -> None:
        for coro in self.spawned:
            coro.close()
        self.machine.close()
        self.swapfile.close()

    # ---- the guest's pages ------------------------------------------------------------------

    def back(self, bpns: list[int]) -> None:
        """Private frames with distinct bytes, mapped writable by the agent (EXPOSED)."""
        idx = np.array(bpns, dtype=np.int64)
        frames = self.machine.allocator.allocate(len(idx), 0)
        for bpn, mpn in zip(bpns, frames.tolist(), strict=True):
            page = content(bpn)
            self.machine.frames[mpn] = page
            self.data[bpn] = page.tobytes()
        self.resolver.map_private(self.vm, idx, frames)
        self.exposure.install(idx, frames, np.ones(len(idx), dtype=bool))

    def swap_out(self, bpns: list[int]) -> None:
        """A swap batch the agent's swap filter accepts whole, its write landed."""
        idx = np.array(bpns, dtype=np.int64)
        status = np.zeros(len(idx), dtype=np.uint8)
        accepted = SwapFilter(self.exposure).process(idx, self.vm.p2m.frame[idx].copy(), status)
        assert accepted.tolist() == bpns
        self.swap.mark_in_flight(self.vm, accepted)  # as the round engine hands pages over
        self.swap.complete(self.vm, accepted, np.zeros(len(accepted), dtype=np.uint8))
        while self.spawned:
            asyncio.run(self.spawned.pop(0))
        assert (self.vm.p2m.state[idx] == PageState.SWAPPED).all()

    def fault(self, bpn: int, around: int = 0) -> FaultReply:
        """A guest touch of an unmapped page: the daemon's answer, installed as the agent does."""
        if self.vm.p2m.state[bpn] == PageState.IN_FLIGHT:
            assert self.vm.p2m.op[bpn] == ServiceType.VALIDATION
            reply = self.validation.on_fault(self.vm, bpn, False)
        else:
            got = asyncio.run(self.swap.swap_in(self.vm, bpn, around))
            assert got is not None
            reply = got
        writable = (reply.flags & FAULT_FLAG_WRITABLE) != 0
        self.exposure.install(reply.bpns.astype(np.int64), reply.mpns, writable)
        return reply

    def touch(self, bpn: int) -> None:
        """The guest reads a page it maps (a vCPU sets the accessed bit) and checks it."""
        frame = int(self.exposure.frame[bpn])
        assert frame >= 0, bpn
        self.exposure.accessed[bpn] = True
        assert bytes(self.machine.frames[frame]) == self.data[bpn], bpn

    # ---- low-priority rounds ----------------------------------------------------------------

    def get_request(self) -> Request:
        return self.engine.get_request(
            self.vm, self.state, GetRequest(Priority.LOW, 1_000_000, GET_FLAG_NEW_ROUND)
        )

    def process(self, req: Request) -> None:
        bpns, status, mpns = self.vm.region.slot(req.slot).batch(req.count)
        self.filter.process(bpns, mpns, status)

    def complete(self, req: Request) -> None:
        self.engine.complete(self.vm, self.state, CompleteRequest(req.slot, req.count, req.seq))

    def low_round(self) -> list[int]:
        """One low round: the BPNs of its one VALIDATION batch ([] when none was due)."""
        req = self.get_request()
        if not req.has_work:
            return []
        assert req.service == ServiceType.VALIDATION and req.last
        bpns = self.vm.region.slot(req.slot).batch(req.count)[0].astype(np.int64).tolist()
        self.process(req)
        self.complete(req)
        return cast(list[int], bpns)

    # ---- checks -----------------------------------------------------------------------------

    def violations(self) -> list[str]:
        m = self.machine
        state = HostState(
            allocator=m.allocator,
            owner_vm=m.owner_vm,
            owner_bpn=m.owner_bpn,
            zero_frames=list(m.zero_frame),
            refs=self.resolver.shared.refs,
            merged_frames=self.resolver.shared.frames,
            vms={1: self.vm.p2m} if self.vm.alive else {},
            swap=self.swapfile,
            swap_writing=self.swap.writing,
        )
        return [v.name for v in check(state)]

    def outcomes(self) -> dict[str, float]:
        got = {}
        for sample in next(iter(self.metrics.readahead_pages.collect())).samples:
            if sample.name.endswith("_total"):
                got[sample.labels["outcome"]] = sample.value
        return got

    def read_ahead(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Swap out SWAPPED, fault on its first page walking: the pages read ahead, and the
        slots they had (and keep while held)."""
        self.back(list(range(64)))
        self.swap_out(SWAPPED)
        ahead = np.arange(SWAPPED[0] + 1, SWAPPED[0] + 1 + AROUND, dtype=np.int64)
        slots = self.vm.p2m.swap_slot[ahead].copy()
        reply = self.fault(SWAPPED[0], around=AROUND)
        assert reply.reason == FaultReason.SWAP_IN
        assert reply.bpns.tolist() == [SWAPPED[0], *ahead.tolist()]
        return ahead, slots


@pytest.fixture
def h(mem_dir: Path, short_tmp: Path) -> Iterator[Harness]:
    harness = Harness(mem_dir, short_tmp)
    yield harness
    harness.close()


def test_read_ahead_pages_are_held_mapped_with_their_slots(h: Harness) -> None:
    """A swap-in that reads ahead maps the neighbours but keeps their slots: they are held
    (IN_FLIGHT, op VALIDATION) until validated; the faulting page's slot is freed."""
    ahead, slots = h.read_ahead()
    p2m = h.vm.p2m
    assert p2m.swap_slot[SWAPPED[0]] == NO_SLOT
    assert (p2m.state[ahead] == PageState.IN_FLIGHT).all()
    assert (p2m.op[ahead] == ServiceType.VALIDATION).all()
    assert (p2m.swap_slot[ahead] == slots).all()
    assert h.swapfile.in_use[slots].all()
    assert (h.exposure.frame[ahead] == p2m.frame[ahead]).all()
    assert h.violations() == []
    assert h.outcomes() == {"held": AROUND}
    for bpn in ahead.tolist():
        h.touch(bpn)  # the content is the page's
    h.swap.mark_in_flight(h.vm, np.array([50]))  # a swap-out in flight is not a hold
    assert h.validation.readahead.status(h.vm)["held_now"] == AROUND


def test_after_the_window_touched_pages_stay_and_untouched_ones_go_back_to_their_slots(
    h: Harness,
) -> None:
    """Nothing is offered before the window. Then one VALIDATION batch: pages the guest
    touched stay mapped (a fault avoided each, slot freed); untouched ones are released by
    the VMM, their frames freed and the pages SWAPPED in their own slots, which still read
    back the pages' content (checksum included) when the guest faults on them later."""
    ahead, slots = h.read_ahead()
    touched, untouched = ahead[:3], ahead[3:]
    for bpn in touched.tolist():
        h.touch(bpn)
    h.clock.now += WINDOW / 2
    assert h.low_round() == []
    frames = h.vm.p2m.frame[untouched].copy()
    swapped_out = h.vm.stats.swapped_out
    h.clock.now += WINDOW / 2
    assert h.low_round() == ahead.tolist()
    assert h.vm.stats.swapped_out == swapped_out + len(untouched)  # frames given back
    p2m = h.vm.p2m
    assert (p2m.state[touched] == PageState.EXPOSED).all()
    assert (p2m.swap_slot[touched] == NO_SLOT).all()
    assert not h.swapfile.in_use[slots[:3]].any()
    assert (h.exposure.frame[touched] == p2m.frame[touched]).all()
    assert (p2m.state[untouched] == PageState.SWAPPED).all()
    assert (p2m.swap_slot[untouched] == slots[3:]).all()
    assert h.swapfile.in_use[slots[3:]].all()
    assert (h.exposure.frame[untouched] == NO_FRAME).all()
    assert all(s == FrameState.FREE for s in h.machine.allocator.frame_state[frames])
    assert h.violations() == []
    assert h.outcomes() == {"held": 8, "fault_avoided": 3, "frame_recovered": 5}
    st = h.validation.readahead.status(h.vm)
    assert st["validated"] == 8 and st["faults_avoided_per_validation"] == 0.375
    assert st["held_now"] == 0
    assert h.low_round() == []  # each page is validated once
    for bpn in untouched.tolist():
        reply = h.fault(bpn)  # read from its slot, checksum checked
        assert reply.reason == FaultReason.SWAP_IN
        h.touch(bpn)
    assert not h.swapfile.in_use[slots].any()
    assert h.violations() == []


def test_a_pinned_read_ahead_page_is_kept_not_dropped(h: Harness) -> None:
    """A page pinned in translation is never released: BUSY, kept as an ordinary exposed
    page (its slot freed, since the guest may write it), not counted as a fault avoided."""
    ahead, slots = h.read_ahead()
    h.exposure.pinned[ahead[0]] = 1
    h.clock.now += WINDOW
    assert h.low_round() == ahead.tolist()
    assert h.vm.p2m.state[ahead[0]] == PageState.EXPOSED
    assert h.vm.p2m.swap_slot[ahead[0]] == NO_SLOT and not h.swapfile.in_use[slots[0]]
    assert h.exposure.frame[ahead[0]] == h.vm.p2m.frame[ahead[0]]
    assert h.outcomes() == {"held": 8, "kept": 1, "frame_recovered": 7}
    st = h.validation.readahead.status(h.vm)
    assert (st["held"], st["kept"], st["frames_recovered"], st["validated"]) == (8, 1, 7, 8)
    assert h.violations() == []


def test_a_fault_during_validation_gets_the_same_frame_and_keeps_the_page(h: Harness) -> None:
    """The VMM released an untouched page in a validation batch, and the guest touches it
    before the daemon saw the completion: the fault maps the same frame at once (the slot is
    freed, the guest may write) and the completion leaves the page alone."""
    ahead, slots = h.read_ahead()
    h.clock.now += WINDOW
    req = h.get_request()
    assert req.service == ServiceType.VALIDATION
    h.process(req)
    victim = int(ahead[2])
    assert h.exposure.frame[victim] == NO_FRAME  # released by the VMM
    frame = int(h.vm.p2m.frame[victim])
    reply = h.fault(victim)
    assert reply.reason == FaultReason.REMAP and reply.mpns.tolist() == [frame]
    h.touch(victim)
    h.complete(req)
    assert h.vm.p2m.state[victim] == PageState.EXPOSED
    assert h.vm.p2m.frame[victim] == frame
    assert h.vm.p2m.swap_slot[victim] == NO_SLOT and not h.swapfile.in_use[slots[2]]
    others = np.delete(ahead, 2)
    assert (h.vm.p2m.state[others] == PageState.SWAPPED).all()
    assert h.outcomes() == {"held": 8, "faulted": 1, "frame_recovered": 7}
    assert h.validation.readahead.status(h.vm)["faulted"] == 1
    assert h.violations() == []


def test_a_stale_verdict_never_drops_a_page_read_ahead_again(h: Harness) -> None:
    """A page the VMM released in a batch, faulted back, swapped out and read ahead again
    before that batch completed is a new hold (new epoch): the old UNTOUCHED verdict must
    not drop it, since the VMM maps it again."""
    ahead, _ = h.read_ahead()
    h.clock.now += WINDOW
    req = h.get_request()
    h.process(req)  # every read-ahead page untouched: all released
    first = int(ahead[0])
    h.fault(first)  # held: the same frame back (REMAP)
    h.swap_out([SWAPPED[0], first])
    h.fault(SWAPPED[0], around=1)  # reads ``first`` ahead again
    assert h.vm.p2m.state[first] == PageState.IN_FLIGHT
    h.complete(req)
    assert h.vm.p2m.state[first] == PageState.IN_FLIGHT  # still held, still mapped
    assert h.exposure.frame[first] == h.vm.p2m.frame[first] >= 0
    h.touch(first)
    assert h.violations() == []


def vm_gone(h: Harness) -> None:
    """What PlatformServer.on_vm_gone does: the services forget the VM, its frames and slots
    are freed, its p2m is detached (read-only)."""
    h.validation.on_vm_gone(h.vm)
    h.swap.on_vm_gone(h.vm)
    p2m = h.vm.p2m
    h.machine.release_or_retire(p2m.frame[p2m.frame != NO_FRAME])
    h.swapfile.release(p2m.swap_slot[p2m.swap_slot >= 0])
    h.vm.alive = False
    p2m.detach()


def test_a_vm_gone_mid_validation_frees_each_frame_and_slot_once(h: Harness) -> None:
    """The VM leaves with a validation batch out: the daemon's teardown frees the held
    pages' frames and slots; a completion that still arrives changes nothing and raises
    nothing, and the service forgets the VM."""
    h.read_ahead()
    h.clock.now += WINDOW
    req = h.get_request()
    h.process(req)
    bpns, status, _ = h.vm.region.slot(req.slot).batch(req.count)
    vm_gone(h)
    h.validation.complete(h.vm, bpns.astype(np.int64), status.copy())
    assert h.swapfile.used == 0
    assert h.machine.allocator.used == len(h.machine.zero_frame)
    assert h.validation.pending_work(h.vm, h.clock.now + 10 * WINDOW) == 0
    assert h.violations() == []


def test_pressure_after_a_vm_left_mid_validation_touches_nothing_of_it(h: Harness) -> None:
    """The VM leaves with read-ahead pages out in a batch; memsched's next tick under
    pressure ends every VM's holds: the gone VM's are nobody's any more (its frames and
    slots went with its p2m, now read-only), so it releases none and raises nothing."""
    h.read_ahead()
    h.clock.now += WINDOW
    req = h.get_request()
    h.process(req)
    vm_gone(h)
    assert h.validation.readahead.set_pressure(True) == 0
    assert h.validation.readahead.status(h.vm)["held"] == 0  # nothing remembered
    assert h.swapfile.used == 0
    assert h.violations() == []


def test_read_ahead_and_remap_pages_share_a_batch(h: Harness) -> None:
    """A batch may carry remapped pages and read-ahead pages: each gets its own handling
    (the remapped page is installed on its new frame, the read-ahead ones validated)."""
    ahead, _ = h.read_ahead()
    h.back([100])
    # NUMA migration's first half, in short: released by the VMM, copied, RESIDENT.
    h.exposure.invalidate(np.array([100]))
    h.exposure.released_by[100] = ServiceType.NUMA_MIGRATION
    new = h.machine.allocator.allocate(1, 0)
    h.machine.frames[new[0]] = h.machine.frames[h.vm.p2m.frame[100]]
    h.machine.release_or_retire(h.vm.p2m.frame[[100]])
    h.resolver.map_private(h.vm, np.array([100]), new)
    h.vm.p2m.state[100] = PageState.RESIDENT
    h.validation.enqueue(h.vm, np.array([100]))
    h.clock.now += WINDOW
    assert h.low_round() == [100, *ahead.tolist()]
    assert h.vm.p2m.state[100] == PageState.EXPOSED and h.exposure.frame[100] == new[0]
    h.touch(100)
    assert (h.vm.p2m.state[ahead] == PageState.SWAPPED).all()
    assert h.outcomes()["frame_recovered"] == AROUND
    assert h.violations() == []


def _remapped(h: Harness, bpns: list[int]) -> None:
    """NUMA migration's first half, in short: released by the VMM, copied to new frames,
    RESIDENT there and queued for remap validation."""
    idx = np.array(bpns, dtype=np.int64)
    h.back(bpns)
    h.exposure.invalidate(idx)
    h.exposure.released_by[idx] = ServiceType.NUMA_MIGRATION
    new = h.machine.allocator.allocate(len(idx), 0)
    h.machine.frames[new] = h.machine.frames[h.vm.p2m.frame[idx]]
    h.machine.release_or_retire(h.vm.p2m.frame[idx])
    h.resolver.map_private(h.vm, idx, new)
    h.vm.p2m.state[idx] = PageState.RESIDENT
    h.validation.enqueue(h.vm, idx)


def _validate(h: Harness, bpns: npt.NDArray[np.int64], mpns: npt.NDArray[np.int64]) -> None:
    status = np.zeros(len(bpns), dtype=np.uint8)
    h.filter.process(bpns.astype(np.uint64), mpns, status)
    h.validation.complete(h.vm, bpns, status)


def test_remapped_and_read_ahead_pages_share_the_slot_s_capacity_and_the_units(
    h: Harness,
) -> None:
    """Read-ahead pages fill what the remapped pages left of a batch: of the slot's capacity
    and of the units the scheduler gave it, never more; the rest wait for the next batch,
    and every page ends validated with its bytes."""
    ahead, _ = h.read_ahead()
    remapped = list(range(100, 106))
    _remapped(h, remapped)
    h.clock.now += WINDOW
    sel = h.validation.select_work(h.vm, 10, 1000, h.clock.now)
    assert sel.bpns.tolist() == [*remapped, *ahead[:4].tolist()] and sel.work == 10
    _validate(h, sel.bpns, sel.mpns)
    sel = h.validation.select_work(h.vm, 64, 2, h.clock.now)
    assert sel.bpns.tolist() == ahead[4:6].tolist() and sel.work == 2
    _validate(h, sel.bpns, sel.mpns)
    assert h.low_round() == ahead[6:].tolist()
    assert (h.vm.p2m.state[remapped] == PageState.EXPOSED).all()
    assert (h.vm.p2m.state[ahead] == PageState.SWAPPED).all()
    for bpn in remapped:
        h.touch(bpn)
    for bpn in ahead.tolist():
        h.fault(bpn)
        h.touch(bpn)
    assert h.violations() == []


def test_a_remap_verdict_in_a_mixed_batch_reaches_the_platform(h: Harness) -> None:
    """A batch of read-ahead pages and a remapped page the guest already faulted in: the
    VMM's CANCELLED for that page is written back with the read-ahead verdicts, so the
    platform does not count it as a page the batch validated."""
    h.read_ahead()
    _remapped(h, [100])
    h.exposure.install(np.array([100]), h.vm.p2m.frame[[100]], np.array([True]))  # a fault
    h.clock.now += WINDOW
    sel = h.validation.select_work(h.vm, 64, 1000, h.clock.now)
    status = np.zeros(len(sel.bpns), dtype=np.uint8)
    h.filter.process(sel.bpns.astype(np.uint64), sel.mpns, status)
    assert sel.bpns.tolist()[0] == 100 and status[0] == PageStatus.CANCELLED
    h.validation.complete(h.vm, sel.bpns, status)
    assert h.validation.validated.get(h.vm.vm_id, 0) == 0
    assert h.vm.p2m.state[100] == PageState.EXPOSED
    h.touch(100)
    assert h.violations() == []


def test_read_ahead_verdicts_are_not_counted_as_refused_remaps(h: Harness) -> None:
    """A VALIDATION batch of read-ahead pages only: their verdicts are read-ahead outcomes,
    and remap validation's own counter (mapped / refused) does not see them."""
    ahead, _ = h.read_ahead()
    h.touch(int(ahead[0]))
    h.clock.now += WINDOW
    assert h.low_round() == ahead.tolist()
    samples = next(iter(h.metrics.validated.collect())).samples
    assert [s.value for s in samples if s.name.endswith("_total")] == []
    assert h.outcomes() == {"held": AROUND, "fault_avoided": 1, "frame_recovered": AROUND - 1}


# ---- memory pressure: holds end at once -----------------------------------------------------


def test_under_pressure_every_hold_ends_and_the_pages_become_swappable(h: Harness) -> None:
    """The host needs frames: held pages become ordinary exposed pages at once (still
    mapped on the same frames, slots freed, as a REFERENCED verdict does), with no
    VALIDATION batch; the swap path can then take them and read them back intact."""
    ahead, slots = h.read_ahead()
    h.touch(int(ahead[0]))  # the guest may have used one: its content must survive too
    frames = h.vm.p2m.frame[ahead].copy()
    assert h.validation.readahead.set_pressure(True) == AROUND
    p2m = h.vm.p2m
    assert (p2m.state[ahead] == PageState.EXPOSED).all()
    assert (p2m.op[ahead] == NO_OP).all()
    assert (p2m.frame[ahead] == frames).all() and (h.exposure.frame[ahead] == frames).all()
    assert (p2m.swap_slot[ahead] == NO_SLOT).all() and not h.swapfile.in_use[slots].any()
    assert h.outcomes() == {"held": AROUND, "released_under_pressure": AROUND}
    st = h.validation.readahead.status(h.vm)
    assert st["held_now"] == 0 and st["released_under_pressure"] == AROUND
    assert st["validated"] == 0
    h.clock.now += WINDOW
    assert h.low_round() == []  # nothing left to validate
    h.exposure.accessed[ahead] = False  # swap's second chance spent
    h.swap_out(ahead.tolist())
    assert all(s == FrameState.FREE for s in h.machine.allocator.frame_state[frames])
    assert h.violations() == []
    for bpn in ahead.tolist():
        assert h.fault(bpn).reason == FaultReason.SWAP_IN
        h.touch(bpn)
    assert h.violations() == []


def test_without_pressure_holds_are_left_alone(h: Harness) -> None:
    """memsched saying "no pressure" each tick changes nothing: pages stay held with their
    slots, and are validated after the window as before."""
    ahead, slots = h.read_ahead()
    assert h.validation.readahead.set_pressure(False) == 0
    assert (h.vm.p2m.state[ahead] == PageState.IN_FLIGHT).all()
    assert (h.vm.p2m.swap_slot[ahead] == slots).all()
    h.clock.now += WINDOW
    assert h.low_round() == ahead.tolist()
    assert h.outcomes() == {"held": AROUND, "frame_recovered": AROUND}


def test_read_ahead_under_pressure_is_not_held(h: Harness) -> None:
    """While the host needs frames a swap-in's read-ahead pages are ordinary pages from the
    start: mapped, slots freed, nothing queued for validation."""
    h.validation.readahead.set_pressure(True)
    ahead, slots = h.read_ahead()
    assert (h.vm.p2m.state[ahead] == PageState.EXPOSED).all()
    assert not h.swapfile.in_use[slots].any()
    assert h.outcomes() == {"released_under_pressure": AROUND}
    assert h.validation.pending_work(h.vm, h.clock.now + 10 * WINDOW) == 0
    assert h.violations() == []


def test_a_verdict_out_when_pressure_ends_the_holds_changes_nothing(h: Harness) -> None:
    """A VALIDATION batch is out (the VMM released the untouched pages) when pressure ends
    the holds: its late UNTOUCHED verdicts find no hold and drop nothing (the slots are
    gone), and they are not taken for remap validation's either."""
    ahead, _ = h.read_ahead()
    h.clock.now += WINDOW
    req = h.get_request()
    h.process(req)
    assert h.validation.readahead.set_pressure(True) == AROUND
    h.complete(req)
    p2m = h.vm.p2m
    assert (p2m.state[ahead] == PageState.EXPOSED).all() and (p2m.frame[ahead] >= 0).all()
    assert h.outcomes() == {"held": AROUND, "released_under_pressure": AROUND}
    assert h.violations() == []


class _Server(SimpleNamespace):
    def kick(self, vm: VM) -> None:
        pass


@pytest.mark.parametrize("pressure", ["none", "hard", "fault_waiting"])
def test_memsched_ends_the_holds_when_the_host_needs_frames(h: Harness, pressure: str) -> None:
    """memsched's tick is what ends the holds: at HARD or below, or while a fault waits for
    a free frame (``FrameWaits.waiting``); above HARD with nobody waiting, nothing."""
    ahead, _ = h.read_ahead()
    used = h.machine.allocator.used
    server = _Server(
        config=h.config,
        machine=h.machine,
        vms={1: h.vm},
        services={ServiceType.VALIDATION: h.validation, ServiceType.SWAP: h.swap},
        swap=h.swapfile,
        shared=h.resolver.shared,
        waits=h.ctx.waits,
    )
    sched = MemSched(cast("PlatformServer", server))
    h.machine.limit_pages = h.machine.host_pages  # HIGH
    if pressure == "hard":  # the smallest limit where the host is HARD, not LOW
        h.machine.limit_pages = used + 1
        while sched.compute_state() != FreeState.HARD:
            h.machine.limit_pages += 1
    if pressure == "fault_waiting":
        h.ctx.waits.waiting = 1
    sched.tick(h.clock.now)
    held = (h.vm.p2m.state[ahead] == PageState.IN_FLIGHT).all()
    assert sched.state == (FreeState.HARD if pressure == "hard" else FreeState.HIGH)
    if pressure == "none":
        assert held
    else:
        assert not (h.vm.p2m.state[ahead] == PageState.IN_FLIGHT).any()
        assert h.outcomes()["released_under_pressure"] == AROUND
    assert h.violations() == []


def test_a_fault_waiting_for_a_frame_is_counted_while_it_waits(h: Harness) -> None:
    """``FrameWaits.waiting`` (what memsched reads) is 1 while a fault waits for a frame,
    already when reclaim is nudged, and 0 again once the wait ended (here: timed out)."""
    seen: list[int] = []
    waits = FrameWaits(h.machine, 0.05, lambda: seen.append(waits.waiting), h.metrics.low_waits)
    h.machine.limit_pages = h.machine.allocator.used  # no frame free
    with pytest.raises(VMMemError):
        asyncio.run(waits.wait_for(1))
    assert seen == [1] and waits.waiting == 0


def test_before_any_verdict_a_second_read_ahead_gets_the_whole_window(h: Harness) -> None:
    """A VM whose read-ahead pages are held but not validated yet has no verdict to go by:
    its next swap-in reads the whole window ahead, not one page (no verdict is a hit ratio
    of 1, not 0)."""
    h.read_ahead()
    reply = h.fault(SWAPPED[10], around=AROUND)
    assert reply.bpns.tolist() == list(range(SWAPPED[10], SWAPPED[10] + 1 + AROUND))
    for bpn in reply.bpns.tolist():
        h.touch(bpn)
    assert h.violations() == []


def test_due_pages_are_counted_per_hold_time_and_taken_in_order(h: Harness) -> None:
    """Two read-aheads half a window apart: the count of due pages follows each one's due
    time, a partial batch takes the oldest first and the count drops by what it took (the
    queue keeps holds as chunks: a count is a bisection, not a walk over every page)."""
    ahead, _ = h.read_ahead()  # 11..18, due at WINDOW
    h.clock.now += WINDOW / 2
    reply = h.fault(SWAPPED[10], around=AROUND)  # 21..28, due at 1.5 WINDOW
    later = reply.bpns[1:].astype(np.int64)  # as many as swap reads ahead
    assert len(later) > 0
    ra = h.validation.readahead
    assert ra.pending(h.vm, h.clock.now) == 0
    h.clock.now += WINDOW / 2
    assert ra.pending(h.vm, h.clock.now) == AROUND
    bpns, _, looked = ra.select(h.vm, 5, h.clock.now)
    assert bpns.tolist() == ahead[:5].tolist() and looked == 5
    assert ra.pending(h.vm, h.clock.now) == AROUND - 5
    h.clock.now += WINDOW / 2
    assert ra.pending(h.vm, h.clock.now) == AROUND - 5 + len(later)
    bpns, _, looked = ra.select(h.vm, 100, h.clock.now)
    assert bpns.tolist() == [*ahead[5:].tolist(), *later.tolist()]
    assert ra.pending(h.vm, h.clock.now) == 0


def test_a_batch_takes_no_page_before_its_window_even_behind_due_ones(h: Harness) -> None:
    """Two read-aheads half a window apart; when the first is due a batch with room for all
    takes the first only: the second's pages are still held (mapped, slots kept) until
    their own window ends, and the guest's touches meanwhile count as faults avoided."""
    ahead, _ = h.read_ahead()
    h.clock.now += WINDOW / 2
    later = h.fault(SWAPPED[10], around=AROUND).bpns[1:].astype(np.int64)
    h.clock.now += WINDOW / 2
    sel = h.validation.select_work(h.vm, 64, 1000, h.clock.now)
    assert sel.bpns.tolist() == ahead.tolist()
    _validate(h, sel.bpns, sel.mpns)
    assert (h.vm.p2m.state[later] == PageState.IN_FLIGHT).all()
    for bpn in later.tolist():
        h.touch(bpn)
    h.clock.now += WINDOW / 2
    assert h.low_round() == later.tolist()
    assert h.outcomes()["fault_avoided"] == len(later)
    assert h.violations() == []


def test_a_full_read_ahead_queue_ends_the_oldest_holds_and_counts_them(h: Harness) -> None:
    """Past ``max_queued`` held pages the oldest are no longer held: ordinary exposed pages,
    still mapped with the same frame, slot freed (never dropped without the VMM's word), and
    counted as ``dropped``; the newest stay held and are validated as before."""
    h.validation.readahead.max_queued = 5
    ahead, slots = h.read_ahead()
    old, kept = ahead[:3], ahead[3:]
    p2m = h.vm.p2m
    assert (p2m.state[old] == PageState.EXPOSED).all()
    assert (p2m.op[old] == NO_OP).all()
    assert (p2m.swap_slot[old] == NO_SLOT).all() and not h.swapfile.in_use[slots[:3]].any()
    assert (h.exposure.frame[old] == p2m.frame[old]).all()
    assert (p2m.state[kept] == PageState.IN_FLIGHT).all()
    assert h.outcomes() == {"held": 8, "dropped": 3}
    assert h.validation.readahead.status(h.vm)["dropped"] == 3
    assert h.violations() == []
    h.clock.now += WINDOW
    assert h.low_round() == kept.tolist()
    assert h.violations() == []


def test_a_full_queue_ends_only_holds_that_are_still_holds(h: Harness) -> None:
    """The queue's oldest entry is stale: its page faulted (no longer held) and was swapped
    out again. When a new read-ahead overflows the queue, that entry is skipped: the page
    stays SWAPPED in its slot (ending a hold it no longer has would map a page with no
    frame and free the slot that holds its bytes), and only real holds count as dropped."""
    h.validation.readahead.max_queued = AROUND
    ahead, _ = h.read_ahead()
    stale = int(ahead[0])
    assert h.fault(stale).reason == FaultReason.REMAP  # no longer held
    h.touch(stale)
    h.exposure.accessed[stale] = False
    h.swap_out([stale])
    slot = int(h.vm.p2m.swap_slot[stale])
    h.fault(SWAPPED[20], around=1)  # 30, 31: the queue overflows by one entry
    p2m = h.vm.p2m
    assert p2m.state[stale] == PageState.SWAPPED and p2m.swap_slot[stale] == slot
    assert h.swapfile.in_use[slot]
    assert h.validation.readahead.status(h.vm)["dropped"] == 0
    assert h.violations() == []
    assert h.fault(stale).reason == FaultReason.SWAP_IN
    h.touch(stale)
    assert h.violations() == []


def test_a_page_that_faulted_while_held_is_not_validated(h: Harness) -> None:
    """A held page the guest faulted on is an ordinary page again: the batch after the
    window carries only the pages still held."""
    ahead, _ = h.read_ahead()
    h.exposure.invalidate(ahead[:1])  # the VMM let it go (a batch that crossed)
    assert h.fault(int(ahead[0])).reason == FaultReason.REMAP
    h.clock.now += WINDOW
    assert h.low_round() == ahead[1:].tolist()
    assert h.vm.p2m.state[ahead[0]] == PageState.EXPOSED
    h.touch(int(ahead[0]))
    assert h.violations() == []


def test_read_ahead_left_untouched_shrinks_the_window_and_wanted_read_ahead_grows_it(
    h: Harness,
) -> None:
    """Validation's verdicts size the next read-ahead: a guest that let all of it go gets one
    page ahead per fault (not AROUND), and as it touches what is read ahead the window grows
    back (a power of two of the cap's share the guest wanted)."""
    ahead, _ = h.read_ahead()  # 11..18 read ahead; the guest touches none of them
    h.clock.now += WINDOW
    assert h.low_round() == ahead.tolist()
    st = h.validation.readahead.status(h.vm)
    assert st["frames_recovered"] == AROUND and st["hit_ratio"] == 0.0
    assert st["window_cap"] == 1
    reply = h.fault(20, around=AROUND)
    assert reply.bpns.tolist() == [20, 21]  # one page ahead, not AROUND
    h.touch(21)
    h.clock.now += WINDOW
    assert h.low_round() == [21]  # wanted: 1 of 9 verdicts
    reply = h.fault(23, around=AROUND)
    assert reply.bpns.tolist() == [23, 24]
    h.touch(24)
    h.clock.now += WINDOW
    assert h.low_round() == [24]  # 2 of 10: 8 * 0.2 = 1.6, up to 2
    assert h.validation.readahead.status(h.vm)["window_cap"] == 2
    reply = h.fault(30, around=AROUND)
    assert reply.bpns.tolist() == [30, 31, 32]
    before = h.validation.readahead.status(h.vm)["hit_ratio"]
    h.exposure.invalidate(np.array([31]))  # the VMM let it go in a batch that crossed
    assert h.fault(31).reason == FaultReason.REMAP  # a fault on a held page: it was wanted
    assert h.validation.readahead.status(h.vm)["hit_ratio"] > before
    for bpn in (30, 31, 32):
        h.touch(bpn)
    assert h.violations() == []


@pytest.mark.timeout(10)
def test_the_window_cap_follows_the_recent_hit_ratio() -> None:
    """The cap times the wanted share, rounded up to a power of two, never below one page;
    old verdicts fade (halved past HIT_MEMORY), so a guest that walks again gets it back."""
    ra = ReadAheadValidation(cast(Any, SimpleNamespace(config=None)))
    vm = cast(VM, SimpleNamespace(vm_id=1))
    assert ra.window_cap(vm, 64) == 64  # no verdict yet
    stats = ra._queue(vm).stats
    stats.verdicts(wanted=0, unwanted=100)
    assert ra.window_cap(vm, 64) == 1
    stats.verdicts(wanted=10, unwanted=0)  # 64 * 10/110 = 5.8: 8
    assert ra.window_cap(vm, 64) == 8
    for _ in range(6):
        stats.verdicts(wanted=64, unwanted=0)
    assert stats.recent_wanted + stats.recent_unwanted <= HIT_MEMORY
    assert ra.window_cap(vm, 64) == 64  # the misses faded
    assert ra.window_cap(vm, 1) == 1 and ra.window_cap(vm, 0) == 0


@pytest.mark.timeout(10)
def test_one_large_batch_of_verdicts_weighs_no_more_than_the_hit_memory() -> None:
    """A batch may carry more verdicts than HIT_MEMORY (a whole slot of pages let go): the
    counts are halved until they fit, so a guest that walks again gets its window back as
    fast as after any other misses."""
    ra = ReadAheadValidation(cast(Any, SimpleNamespace(config=None)))
    vm = cast(VM, SimpleNamespace(vm_id=1))
    stats = ra._queue(vm).stats
    assert ra.window_cap(vm, 6) == 6  # rounded up to a power of two, but never past the cap
    stats.verdicts(wanted=0, unwanted=4 * HIT_MEMORY)
    assert stats.recent_wanted + stats.recent_unwanted <= HIT_MEMORY
    stats.verdicts(wanted=HIT_MEMORY, unwanted=0)
    assert stats.hit_ratio() == 0.5
    assert ra.window_cap(vm, 64) == 32


def test_page_cache_swap_in_maps_read_ahead_with_its_content(h: Harness) -> None:
    """A swap-in served from the page cache (``try_swap_in_now``) maps the faulting page and
    its read-ahead, each on its own frame with its own bytes (the frames come off the
    allocator's stack in no particular order)."""
    h.back(list(range(64)))
    h.swap_out(SWAPPED)
    reply = h.swap.try_swap_in_now(h.vm, SWAPPED[0], AROUND)
    assert reply is not None and reply.reason == FaultReason.SWAP_IN
    assert reply.bpns.tolist() == list(range(SWAPPED[0], SWAPPED[0] + 1 + AROUND))
    assert len(np.unique(reply.mpns)) == len(reply.mpns)
    h.exposure.install(reply.bpns.astype(np.int64), reply.mpns, reply.flags != 0)
    for bpn in reply.bpns.tolist():
        h.touch(bpn)
    assert h.violations() == []


def test_page_cache_swap_in_over_a_corrupt_neighbour(h: Harness) -> None:
    """A read-ahead neighbour whose slot changed on disk fails the page-cache read whole:
    nothing is mapped, no frame leaks; the thread path then maps the faulting page alone,
    and the corrupt page's own fault reports the checksum."""
    h.back(list(range(64)))
    h.swap_out(SWAPPED)
    victim = SWAPPED[0] + 4
    slot = int(h.vm.p2m.swap_slot[victim])
    with open(h.swapfile.path, "r+b") as fh:
        fh.seek(slot * PAGE_SIZE + 123)
        fh.write(b"\x5a" * 4)
    free = h.machine.allocator.free
    assert h.swap.try_swap_in_now(h.vm, SWAPPED[0], AROUND) is None
    assert h.machine.allocator.free == free
    assert (h.vm.p2m.state[SWAPPED] == PageState.SWAPPED).all()
    assert h.fault(SWAPPED[0], around=AROUND).bpns.tolist() == [SWAPPED[0]]
    h.touch(SWAPPED[0])
    with pytest.raises(VMMemError, match="checksum"):
        h.fault(victim)
    assert h.vm.p2m.state[victim] == PageState.SWAPPED
    assert h.violations() == []


def test_page_cache_swap_in_skips_pages_a_thread_read_is_bringing_in(h: Harness) -> None:
    """A swap-in on the thread path is reading 14.. when a fault on 10 is served from the
    page cache: its read-ahead stops short of the pages already being read (each page is
    read and mapped by one swap-in only), and both replies map their pages intact."""
    h.back(list(range(64)))
    h.swap_out(SWAPPED)

    async def crossing() -> tuple[FaultReply | None, FaultReply | None]:
        reading = asyncio.ensure_future(h.swap.swap_in(h.vm, 14, AROUND))
        await asyncio.sleep(0)  # it has claimed its pages and waits for its read
        assert (h.vm.vm_id, 18) in h.swap.swapping_in
        now = h.swap.try_swap_in_now(h.vm, 10, AROUND)
        return now, await reading

    now, later = asyncio.run(crossing())
    assert now is not None and later is not None
    assert now.bpns.tolist() == [10, 11, 12, 13]
    assert later.bpns.tolist() == list(range(14, 14 + 1 + AROUND))
    for reply in (now, later):
        h.exposure.install(reply.bpns.astype(np.int64), reply.mpns, reply.flags != 0)
        for bpn in reply.bpns.tolist():
            h.touch(bpn)
    assert h.violations() == []
