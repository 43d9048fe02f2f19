"""NUMA migration and remap validation on their own, against a fake peer.

No server and no socket: the services see a ``ServiceContext`` built from real parts
(machine memory in a /dev/shm file split into two nodes, its allocator, the fault resolver,
metrics on a private registry), a virtual clock, and a ``spawn`` that keeps the coroutines
so each test decides when an asynchronous move runs. The VMM's side of a batch is played by
the agent's own filters (``vmm_agent/services``) on an ``ExposureTable``, through the real
``RoundEngine``: GetRequest{LOW}, the filter writes statuses (and for VALIDATION installs
frames), CompleteRequest. Every outcome is checked on real bytes and with the daemon's
invariant check.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

import platform_daemon.services.numa_migration as numa
import platform_daemon.services.validation as validation_module
from platform_daemon.allocator import FrameState
from platform_daemon.context import ServiceContext
from platform_daemon.faults import FaultResolver
from platform_daemon.invariants import HostState, check
from platform_daemon.machine import MachineMemory
from platform_daemon.metrics import PlatformMetrics
from platform_daemon.p2m import FLAG_SHARED, NO_OP, P2M
from platform_daemon.rounds import RoundEngine, RoundState
from platform_daemon.services.balloon import BalloonService
from platform_daemon.services.base import Selection
from platform_daemon.services.numa_migration import (
    BURST_SECONDS,
    NumaMigrationService,
    locality,
)
from platform_daemon.services.page_sharing import PageSharingService
from platform_daemon.services.validation import ValidationService
from platform_daemon.shared_frames import SharedFrames
from platform_daemon.vm import VM
from platform_daemon.waits import FrameWaits
from shared.config import PlatformConfig
from shared.constants import PAGE_SIZE, FaultReason, PageState, PageStatus, Priority, ServiceType
from shared.layout import ControlRegion, region_size
from shared.messages import (
    FAULT_FLAG_WRITABLE,
    GET_FLAG_NEW_ROUND,
    CompleteRequest,
    FaultReply,
    GetRequest,
    Message,
    Register,
)
from shared.shm import MappedFile
from vmm_agent.exposure import ExposureTable
from vmm_agent.services.base import AgentService
from vmm_agent.services.numa_migration import NumaMigrationFilter
from vmm_agent.services.validation import ValidationFilter

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20
HOST_MIB = 16  # 4096 frames: node 0 is MPN 0-2047, node 1 MPN 2048-4095
NODES = 2
GUEST_PAGES = 256
SLOT_COUNT = 4
SLOT_CAPACITY = 64
_NUMA = int(ServiceType.NUMA_MIGRATION)

Page = npt.NDArray[np.uint8]


def content(seed: int) -> Page:
    """4 KiB of deterministic, seed-specific bytes."""
    return np.random.default_rng([0x4E55, seed]).integers(1, 256, PAGE_SIZE, dtype=np.uint8)


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Link:
    sent: list[Message] = field(default_factory=list)

    def send(self, message: Message, request_id: int = 0) -> None:
        self.sent.append(message)


class NoTargets:
    def swap_deficit(self, vm: VM, in_flight: int) -> int:
        return 0

    def balloon_deficit(self, vm: VM) -> int:
        return 0


@dataclass
class Guest:
    """One VM as both sides see it: the daemon's VM and the agent's exposure table."""

    vm: VM
    exposure: ExposureTable
    filters: dict[ServiceType, AgentService]
    state: RoundState
    #: What the guest last wrote into each page it backed (the truth for content checks).
    data: dict[int, Page] = field(default_factory=dict)


class Harness:
    """Real machine memory, allocator and fault resolver; the two services and an engine."""

    def __init__(self, mem_dir: Path, tmp: Path, vm_rate: float, host_rate: float) -> None:
        self.config = PlatformConfig(
            socket=tmp / "p.sock",
            mem_dir=mem_dir,
            host_memory=HOST_MIB * MiB,
            numa_nodes=NODES,
            metrics_port=-1,
            prefault=False,
            numa_migrate_rate=vm_rate,
            numa_host_migrate_rate=host_rate,
        )
        self.machine = MachineMemory(
            mem_dir / "machine", self.config.host_pages, NODES, prefault=False
        )
        self.shared = SharedFrames(self.machine)
        self.resolver = FaultResolver(self.machine, self.shared, max_around=16)
        self.metrics = PlatformMetrics(CollectorRegistry())
        self.clock = FakeClock()
        self.spawned: list[Coroutine[Any, Any, Any]] = []
        self.ctx = ServiceContext(
            machine=self.machine,
            mapper=self.resolver,
            shared=self.shared,
            metrics=self.metrics,
            config=self.config,
            clock=self.clock,
            spawn=self._spawn,
            waits=FrameWaits(self.machine, 1.0, lambda: None, self.metrics.low_waits),
            swap=None,
            targets=NoTargets(),
        )
        self.svc = NumaMigrationService(self.ctx)
        self.validation = ValidationService(self.ctx)
        self.svc.on_moved = self.validation.enqueue
        self.engine = RoundEngine(
            {ServiceType.NUMA_MIGRATION: self.svc, ServiceType.VALIDATION: self.validation},
            clock=self.clock,
        )
        self.guests: dict[int, Guest] = {}
        self._next_id = 1

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        self.spawned.append(coro)
        return cast("asyncio.Future[Any]", None)

    def close(self) -> None:
        for coro in self.spawned:
            coro.close()
        self.machine.close()

    # ---- VMs and their pages ----------------------------------------------------------------

    def add_vm(self, guest_pages: int = GUEST_PAGES, home_node: int = 0) -> Guest:
        vm_id = self._next_id
        self._next_id += 1
        region = ControlRegion.initialize(
            bytearray(region_size(SLOT_COUNT, SLOT_CAPACITY)),
            vm_id=vm_id,
            generation=vm_id,
            slot_count=SLOT_COUNT,
            capacity=SLOT_CAPACITY,
            guest_pages=guest_pages,
        )
        vm = VM(
            vm_id,
            vm_id,
            info=Register(name=f"vm{vm_id}", guest_pages=guest_pages, vcpus=1, home_node=home_node),
            home_node=home_node,
            p2m=P2M(guest_pages),
            region=region,
            region_file=cast(MappedFile, SimpleNamespace(path=Path("/nonexistent"))),
            connection=Link(),
        )
        exposure = ExposureTable(guest_pages)
        filters: dict[ServiceType, AgentService] = {
            ServiceType.NUMA_MIGRATION: NumaMigrationFilter(exposure),
            ServiceType.VALIDATION: ValidationFilter(exposure),
        }
        guest = Guest(vm, exposure, filters, RoundState())
        self.guests[vm_id] = guest
        self.svc.pending_work(vm, self.clock())  # the service starts on this VM
        return guest

    def back(self, g: Guest, bpns: list[int], node: int, seed: int = 0) -> npt.NDArray[np.int64]:
        """Back ``bpns`` with private frames of ``node`` holding distinct bytes; the agent maps
        them writable (EXPOSED)."""
        idx = np.array(bpns, dtype=np.int64)
        frames = self.machine.allocator.allocate(len(idx), node)
        assert (self.machine.allocator.node_of(frames) == node).all()
        for bpn, mpn in zip(bpns, frames.tolist(), strict=True):
            g.data[bpn] = content(seed * 100_000 + g.vm.vm_id * 1000 + bpn)
            self.machine.frames[mpn] = g.data[bpn]
        self.resolver.map_private(g.vm, idx, frames)
        g.exposure.install(idx, frames, np.ones(len(idx), dtype=bool))
        return frames

    def write(self, g: Guest, bpn: int, data: Page) -> None:
        """The guest writes through its own mapping (it must map the page writable)."""
        mpn = int(g.exposure.frame[bpn])
        assert mpn >= 0 and g.exposure.writable[bpn]
        self.machine.frames[mpn] = data
        g.data[bpn] = data

    def node(self, g: Guest, bpn: int) -> int:
        return int(self.machine.allocator.node_of(g.vm.p2m.frame[[bpn]])[0])

    # ---- the scan and rounds, with the agent's filters as the peer -------------------------

    def scan(self, g: Guest) -> None:
        self.svc.scan(g.vm, g.vm.guest_pages, self.clock())

    def run_spawned(self) -> int:
        ran = 0
        while self.spawned:
            asyncio.run(self.spawned.pop(0))
            ran += 1
        return ran

    def low_round(self, g: Guest, run_moves: bool = True) -> list[tuple[ServiceType, list[int]]]:
        """One low round through the real engine, the agent's filters deciding each page;
        the spawned moves run after each batch (unless ``run_moves`` is False). Returns the
        batches: (service, BPNs)."""
        batches: list[tuple[ServiceType, list[int]]] = []
        flags = GET_FLAG_NEW_ROUND
        while True:
            req = self.engine.get_request(g.vm, g.state, GetRequest(Priority.LOW, 1_000_000, flags))
            flags = 0
            if not req.has_work:
                return batches
            service = ServiceType(req.service)
            bpns, status, mpns = g.vm.region.slot(req.slot).batch(req.count)
            batches.append((service, bpns.astype(np.int64).tolist()))
            g.filters[service].process(bpns, mpns, status)
            self.engine.complete(g.vm, g.state, CompleteRequest(req.slot, req.count, req.seq))
            if run_moves:
                self.run_spawned()
            if req.last:
                return batches

    def rounds(self, g: Guest, most: int = 20) -> list[tuple[ServiceType, list[int]]]:
        """Low rounds until one hands out nothing (work a round's end left waits for the
        next round, as moved pages wait for their validation)."""
        batches: list[tuple[ServiceType, list[int]]] = []
        for _ in range(most):
            got = self.low_round(g)
            if not got:
                return batches
            batches += got
        raise AssertionError(f"still handing out batches after {most} rounds")

    # ---- checks ---------------------------------------------------------------------------

    def frame_state(self, mpns: Any) -> list[FrameState]:
        return [FrameState(s) for s in self.machine.allocator.frame_state[np.asarray(mpns)]]

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
        )
        return [v.name for v in check(state)]

    def content_intact(self, g: Guest) -> None:
        """Every page the guest wrote reads back, through the p2m and through its mapping."""
        p2m = g.vm.p2m
        for bpn, data in g.data.items():
            assert bytes(self.machine.frames[int(p2m.frame[bpn])]) == data.tobytes(), bpn
            mapped = int(g.exposure.frame[bpn])
            if mapped >= 0:
                assert mapped == p2m.frame[bpn], bpn
                assert bytes(self.machine.frames[mapped]) == data.tobytes(), bpn


@pytest.fixture
def h(mem_dir: Path, short_tmp: Path) -> Iterator[Harness]:
    harness = Harness(mem_dir, short_tmp, vm_rate=1e6, host_rate=1e6)
    try:
        yield harness
    finally:
        harness.close()


def writable(reply: FaultReply) -> list[bool]:
    return [(int(f) & FAULT_FLAG_WRITABLE) != 0 for f in reply.flags]


# ---- batches ---------------------------------------------------------------------------------


def test_remote_pages_move_home_and_the_vmm_installs_the_new_frames(h: Harness) -> None:
    """The NUMA_MIGRATION batch holds the pages off the home node with the frames the VMM maps
    now; the VMM releases them, the platform copies them into home-node frames and frees the
    old ones; then a VALIDATION batch hands the new frames back and the VMM maps them: no
    fault, every byte where it was, local counts as expected."""
    g = h.add_vm()
    remote = list(range(0, 40))
    old = h.back(g, remote, node=1)
    h.back(g, list(range(100, 120)), node=0)
    assert locality(g.vm, h.machine.allocator) == (20, 40)
    h.scan(g)

    batches = h.rounds(g)

    numa = [b for s, b in batches if s == ServiceType.NUMA_MIGRATION]
    valid = [b for s, b in batches if s == ServiceType.VALIDATION]
    assert sorted(b for batch in numa for b in batch) == remote
    assert sorted(b for batch in valid for b in batch) == remote
    p2m = g.vm.p2m
    assert all(h.node(g, b) == 0 for b in remote)
    assert (p2m.state[remote] == PageState.EXPOSED).all()
    assert (p2m.op[remote] == NO_OP).all()
    assert (g.exposure.frame[remote] == p2m.frame[remote]).all()
    assert g.exposure.writable[remote].all()
    assert h.frame_state(old) == [FrameState.FREE] * len(old)
    assert locality(g.vm, h.machine.allocator) == (60, 0)
    h.content_intact(g)
    assert h.svc.stats(g.vm).migrated == 40
    assert h.validation.validated[g.vm.vm_id] == 40
    assert h.metrics.registry.get_sample_value("vmmem_numa_migrated_pages_total") == 40
    assert h.invariants() == []
    assert h.low_round(g) == []  # nothing left: no batch at all


def test_batch_mpns_are_the_mapped_frames_and_stale_mappings_are_refused(h: Harness) -> None:
    """The slot names the frame the VMM maps (its STALE_FRAME check passes), and a page the
    VMM maps elsewhere or not at all is refused and stays where it is."""
    g = h.add_vm()
    frames = h.back(g, [1, 2, 3], node=1)
    g.exposure.frame[2] = frames[2]  # the agent maps page 2 at page 3's frame: stale
    g.exposure.frame[3] = -1  # and has dropped page 3
    h.scan(g)
    sel = h.svc.select_work(g.vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    assert sel.bpns.tolist() == [1, 2, 3] and sel.mpns.tolist() == frames.tolist()
    status = np.zeros(3, dtype=np.uint8)
    g.filters[ServiceType.NUMA_MIGRATION].process(sel.bpns.astype(np.uint64), sel.mpns, status)
    assert status.tolist() == [PageStatus.OK, PageStatus.STALE_FRAME, PageStatus.NOT_EXPOSED]


def test_the_filter_takes_only_private_pages_off_the_home_node(h: Harness) -> None:
    """Candidates are private pages, mapped or resident, on a healthy frame of another node.
    Never: pages on the home node, read-only zero pages, swapped or untouched pages, pages in
    flight for another service, pages on a failing frame. Pages pinned in translation are
    refused by the VMM (BUSY) and stay."""
    g = h.add_vm()
    h.back(g, [0, 1, 2, 3, 4, 5, 6], node=1)
    h.back(g, [10, 11], node=0)
    h.resolver.first_touch(g.vm, 20, write=False, around=0)  # zero frame, read-only
    p2m = g.vm.p2m
    p2m.frame[21], p2m.flags[21] = h.machine.zero_frame[1], FLAG_SHARED  # node 1's, shared
    p2m.state[21] = PageState.EXPOSED
    p2m.state[3], p2m.op[3] = PageState.IN_FLIGHT, ServiceType.SWAP  # another service's
    g.exposure.frame[3] = -1
    h.machine.failing[p2m.frame[4]] = True  # page-retire's
    p2m.state[5] = PageState.RESIDENT  # no VMM maps it: moved without a batch
    g.exposure.frame[5] = -1
    g.exposure.pinned[6] = 1  # the VMM keeps it
    h.scan(g)
    assert sorted(h.svc.vms[g.vm.vm_id].queue) == [0, 1, 2, 5, 6]

    batches = h.rounds(g)

    numa = sorted(b for s, batch in batches if s == ServiceType.NUMA_MIGRATION for b in batch)
    assert numa == [0, 1, 2, 6]  # 5 moved at once, 6 offered and refused
    assert [h.node(g, b) for b in (0, 1, 2, 5)] == [0, 0, 0, 0]
    assert p2m.state[5] == PageState.RESIDENT and g.exposure.frame[5] == -1  # not validated
    assert [h.node(g, b) for b in (3, 4, 6)] == [1, 1, 1]
    assert p2m.state[6] == PageState.EXPOSED and h.svc.stats(g.vm).refused == 1
    assert h.node(g, 10) == 0 and p2m.frame[20] == h.machine.zero_frame[0]
    assert p2m.frame[21] == h.machine.zero_frame[1]
    p2m.state[3], p2m.op[3] = PageState.RESIDENT, NO_OP  # (so the check sees a whole state)
    h.machine.failing[p2m.frame[4]] = False
    assert h.invariants() == []
    h.content_intact(g)


def test_no_move_pushes_the_home_node_below_its_reserve(h: Harness) -> None:
    """While the home node is full nothing is offered; once it has room, pages move only
    while it keeps its reserve (free_high_pct of its frames), counting moves in flight."""
    g = h.add_vm(guest_pages=2048)
    filler = h.add_vm(guest_pages=2048)
    home_free = h.machine.allocator.free_on(0)
    h.back(filler, list(range(home_free)), node=0)  # the home node is full
    h.back(g, list(range(600)), node=1)
    h.scan(g)
    assert h.svc.pending_work(g.vm, h.clock()) == 0
    assert h.low_round(g) == []

    reserve = h.svc.reserve(0)
    assert reserve == int(np.ceil(0.06 * 2048))
    freed = list(range(reserve + 100))
    h.machine.release_or_retire(filler.vm.p2m.frame[freed])
    filler.vm.p2m.frame[freed] = -1
    filler.vm.p2m.state[freed] = PageState.ZERO
    filler.exposure.frame[freed] = -1
    for b in freed:
        del filler.data[b]
    assert h.svc.pending_work(g.vm, h.clock()) == 100

    h.rounds(g)

    assert h.svc.stats(g.vm).migrated == 100
    assert h.machine.allocator.free_on(0) == reserve
    assert locality(g.vm, h.machine.allocator) == (100, 500)
    assert h.svc.pending_work(g.vm, h.clock()) == 0 and h.svc.promised == [0, 0]
    assert h.invariants() == []
    h.content_intact(g)


def test_the_scan_backs_off_while_nothing_is_found_and_looks_again_after_a_full_node(
    h: Harness,
) -> None:
    """A pass that finds nothing puts the next one 1 s later, then 2, 4, ... up to 16 s (a
    large all-local VM costs little); once the home node was full (pages may have landed
    elsewhere) and has room again, the VM is scanned at once and the backoff starts over."""
    g = h.add_vm()
    h.back(g, [0, 1], node=0)
    st = h.svc.vms[g.vm.vm_id]
    waits = []
    for _ in range(7):
        assert h.svc._wants_scan(st, h.clock())
        h.scan(g)
        waits.append(st.next_scan - h.clock())
        assert not h.svc._wants_scan(st, h.clock())
        h.clock.now = st.next_scan
    assert waits == [1, 2, 4, 8, 16, 16, 16]
    h.scan(g)
    filler = h.add_vm(guest_pages=2048)
    h.back(filler, list(range(h.machine.allocator.free_on(0))), node=0)
    assert not h.svc._wants_scan(st, h.clock())  # full: nothing to move into
    h.machine.release_or_retire(filler.vm.p2m.frame[:500])
    filler.vm.p2m.frame[:500], filler.vm.p2m.state[:500] = -1, PageState.ZERO
    assert h.svc._wants_scan(st, h.clock())  # at once, not 16 s later
    h.scan(g)
    assert st.next_scan - h.clock() == 1


def test_an_idle_scanner_sleeps_until_the_next_pass_and_polls_only_for_room(
    h: Harness,
) -> None:
    """Nothing to look at: the scanner sleeps until the first VM's next pass (at most
    SCAN_IDLE_MAX_SECONDS), not SCAN_IDLE_SECONDS each time (an idle daemon woke 20 times a
    second for it); a VM waiting for room at home is polled for it."""
    g = h.add_vm()
    h.back(g, [0, 1], node=0)
    st = h.svc.vms[g.vm.vm_id]
    assert h.svc._idle_sleep(h.clock()) == numa.SCAN_IDLE_SECONDS  # its first pass is due
    h.scan(g)  # all local: the next pass in 1 s
    assert h.svc._idle_sleep(h.clock()) == pytest.approx(1.0)
    h.clock.now = st.next_scan
    h.scan(g)  # then 2 s later, but the scanner looks at least once a second
    assert h.svc._idle_sleep(h.clock()) == numa.SCAN_IDLE_MAX_SECONDS
    h.clock.now += 1.5
    assert h.svc._idle_sleep(h.clock()) == pytest.approx(0.5)
    filler = h.add_vm(guest_pages=2048)
    h.back(filler, list(range(h.machine.allocator.free_on(0))), node=0)
    assert not h.svc._wants_scan(st, h.clock())  # full home node: wait for room
    assert h.svc._idle_sleep(h.clock()) == numa.SCAN_IDLE_SECONDS


@pytest.mark.timeout(30)
def test_a_new_vm_wakes_the_sleeping_scanner(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scanner sleeps long when idle; a VM registered meanwhile is looked at at once."""
    monkeypatch.setattr(numa, "SCAN_IDLE_MAX_SECONDS", 60.0)
    first = h.add_vm()
    h.back(first, [0], node=0)
    h.scan(first)
    h.svc.vms[first.vm.vm_id].next_scan = h.clock() + 1000  # nothing due for a long while

    async def run() -> None:
        task = asyncio.create_task(h.svc.scanner())
        try:
            for _ in range(3):
                await asyncio.sleep(0)  # the scanner finds nothing and goes to sleep
            second = h.add_vm()
            h.back(second, [0, 1], node=0)
            st = h.svc.vms[second.vm.vm_id]
            while st.next_scan == 0.0:  # its pass ends (all local): next_scan set
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(run(), 10))


# ---- faults during a move -------------------------------------------------------------------


def _released(h: Harness, g: Guest, bpns: list[int]) -> npt.NDArray[np.int64]:
    """Back ``bpns`` on node 1, and run the round up to the VMM releasing them: their move is
    spawned, not run. Returns their old frames."""
    old = h.back(g, bpns, node=1)
    h.scan(g)
    batches = h.low_round(g, run_moves=False)
    assert batches == [(ServiceType.NUMA_MIGRATION, bpns)]
    assert (g.vm.p2m.state[bpns] == PageState.IN_FLIGHT).all()
    assert (g.vm.p2m.op[bpns] == _NUMA).all() and len(h.spawned) == 1
    return old


@pytest.mark.parametrize("write", [False, True])
def test_a_fault_during_the_move_completes_that_page_first(h: Harness, write: bool) -> None:
    """A fault (read or write) on a page whose move is in flight waits for its copy: the page
    is moved at once and its reply maps the new home frame, writable (COMPLETE). The guest's
    write then lands in the new frame; the move that runs later skips the page (no second
    copy over the write, no double free) and moves the rest."""
    g = h.add_vm()
    pages = [5, 6, 7, 8]
    old = _released(h, g, pages)
    p2m = g.vm.p2m

    reply = h.svc.on_fault(g.vm, 6, write)

    assert reply.reason == FaultReason.COMPLETE and reply.bpns.tolist() == [6]
    new6 = int(p2m.frame[6])
    assert reply.mpns.tolist() == [new6] and writable(reply) == [True]
    assert h.node(g, 6) == 0 and p2m.state[6] == PageState.EXPOSED and p2m.op[6] == NO_OP
    assert h.frame_state([old[1]]) == [FrameState.FREE]
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    h.write(g, 6, content(999))
    assert h.invariants() == []

    assert h.run_spawned() == 1
    assert int(p2m.frame[6]) == new6  # not moved twice
    assert [h.node(g, b) for b in pages] == [0] * 4
    assert h.frame_state(old) == [FrameState.FREE] * 4
    st = h.svc.stats(g.vm)
    assert st.migrated == 4 and st.fault_completions == 1
    assert h.rounds(g) == [(ServiceType.VALIDATION, [5, 7, 8])]
    assert (g.exposure.frame[pages] == p2m.frame[pages]).all()
    h.content_intact(g)
    assert h.invariants() == [] and h.svc.promised == [0, 0]


def test_a_fault_during_the_move_without_room_keeps_the_old_frame(h: Harness) -> None:
    """When the home node filled up meanwhile, the fault cannot complete the move: the page
    keeps its old frame (CANCEL) with its content, and the pending move leaves it alone."""
    g = h.add_vm()
    old = _released(h, g, [3, 4])
    filler = h.add_vm(guest_pages=2048)
    h.back(filler, list(range(h.machine.allocator.free_on(0))), node=0)

    reply = h.svc.on_fault(g.vm, 3, write=True)

    assert reply.reason == FaultReason.CANCEL and reply.mpns.tolist() == [old[0]]
    assert writable(reply) == [True] and g.vm.p2m.state[3] == PageState.EXPOSED
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    assert h.run_spawned() == 1
    assert g.vm.p2m.frame[4] == old[1] and g.vm.p2m.state[4] == PageState.RESIDENT
    assert h.svc.stats(g.vm).aborted == 2 and h.svc.stats(g.vm).migrated == 0
    h.content_intact(g)
    assert h.invariants() == [] and h.svc.promised == [0, 0]


@pytest.mark.parametrize("squeeze", ["reserve", "host_limit"])
def test_moves_in_flight_stop_where_room_ran_out_meanwhile(h: Harness, squeeze: str) -> None:
    """Room was there when the pages were selected, but before the copy ran other
    allocations took most of the home node (``reserve``), or the host limit was lowered
    because other VMs grew (``host_limit``): the copy moves only the 4 pages there is room
    for; the rest keep their old frames (RESIDENT, content intact) and are given up for now,
    to be offered to the VMM again."""
    g = h.add_vm()
    old = _released(h, g, list(range(10)))
    reserve = h.svc.reserve(0)
    if squeeze == "reserve":
        filler = h.add_vm(guest_pages=2048)
        h.back(filler, list(range(h.machine.allocator.free_on(0) - reserve - 4)), node=0)
    else:
        h.machine.limit_pages = h.machine.allocator.used + 4

    assert h.run_spawned() == 1

    if squeeze == "reserve":
        assert h.machine.allocator.free_on(0) == reserve
    assert [h.node(g, b) for b in range(10)] == [0] * 4 + [1] * 6
    assert (g.vm.p2m.frame[4:10] == old[4:]).all()
    assert (g.vm.p2m.state[:10] == PageState.RESIDENT).all()
    st = h.svc.stats(g.vm)
    assert (st.migrated, st.aborted) == (4, 6) and h.svc.promised == [0, 0]
    h.content_intact(g)
    assert h.invariants() == []


def test_a_vm_gone_mid_move_leaves_nothing_behind(h: Harness) -> None:
    """The VM leaves after its pages were released and before the copy ran: the pending move
    does nothing (the VM's frames were released with it), no frame leaks and the promises of
    home frames are dropped."""
    g = h.add_vm()
    other = h.add_vm()
    h.back(other, [0, 1], node=0)
    _released(h, g, list(range(10)))
    h.scan(g)
    free_before = h.machine.allocator.free

    vm = g.vm  # what Registry.unregister and PlatformServer.on_vm_gone do
    vm.alive = False
    h.svc.on_vm_gone(vm)
    h.validation.on_vm_gone(vm)
    h.machine.release_or_retire(vm.p2m.frame[vm.p2m.frame >= 0])
    vm.p2m.frame[:] = -1  # (pages keep their states: only the frames are gone)
    del h.guests[vm.vm_id]

    assert h.run_spawned() == 1
    assert h.machine.allocator.free == free_before + 10
    assert h.svc.promised == [0, 0] and vm.vm_id not in h.svc.vms
    assert h.invariants() == []
    h.content_intact(other)


# ---- remap validation -------------------------------------------------------------------------


def test_validation_never_maps_a_page_something_else_took_meanwhile(h: Harness) -> None:
    """Between the move and its validation: a page the guest faulted in is already mapped
    (CANCELLED, stays EXPOSED), a page the balloon took is not the migration's any more
    (STALE_FRAME, left to the balloon), the rest are installed."""
    g = h.add_vm()
    h.back(g, [1, 2, 3], node=1)
    h.scan(g)
    h.low_round(g, run_moves=False)
    h.run_spawned()  # moved: RESIDENT, queued for validation
    p2m = g.vm.p2m
    assert (p2m.state[[1, 2, 3]] == PageState.RESIDENT).all()
    reply = h.resolver.try_resolve(g.vm, 1, False, 0)  # the guest touched page 1 (REMAP)
    g.exposure.install(reply.bpns, reply.mpns, np.array([True]))
    sel = h.validation.select_work(g.vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    assert sel.bpns.tolist() == [2, 3]  # page 1 is EXPOSED: dropped
    g.exposure.released_by[3] = ServiceType.BALLOON  # the guest ballooned page 3
    g.exposure.install(np.array([2]), p2m.frame[[2]], np.array([True]))  # a crossed fault
    status = np.zeros(2, dtype=np.uint8)
    g.filters[ServiceType.VALIDATION].process(sel.bpns.astype(np.uint64), sel.mpns, status)
    assert status.tolist() == [PageStatus.CANCELLED, PageStatus.STALE_FRAME]
    assert g.exposure.frame[3] == -1
    h.validation.complete(g.vm, sel.bpns, status)
    assert p2m.state[2] == PageState.EXPOSED and p2m.state[3] == PageState.RESIDENT
    assert h.validation.validated.get(g.vm.vm_id, 0) == 0
    h.content_intact(g)
    assert h.invariants() == []


def _moved(h: Harness, g: Guest, bpns: list[int]) -> None:
    """Move ``bpns`` home (first half of the remap: released, copied, RESIDENT on the new
    frame) and stop there: they wait in remap validation's queue, in this order."""
    _released(h, g, bpns)
    assert h.run_spawned() == 1
    assert (g.vm.p2m.state[bpns] == PageState.RESIDENT).all()


def _validate(h: Harness, g: Guest, sel: Selection) -> npt.NDArray[np.uint8]:
    """The VMM's filter on a selection, and the completion: the verdicts."""
    status = np.zeros(len(sel.bpns), dtype=np.uint8)
    g.filters[ServiceType.VALIDATION].process(sel.bpns.astype(np.uint64), sel.mpns, status)
    h.validation.complete(g.vm, sel.bpns, status)
    return status


def test_one_selection_takes_no_more_remapped_pages_than_its_units(h: Harness) -> None:
    """The scheduler prices a batch in units: a selection of remapped pages stops there, and
    the rest wait for the next one (each page validated once, on its new frame)."""
    g = h.add_vm()
    pages = list(range(6))
    _moved(h, g, pages)
    first = h.validation.select_work(g.vm, SLOT_CAPACITY, 2, h.clock())
    assert first.bpns.tolist() == [0, 1] and first.work == 2
    assert h.validation.pending_work(g.vm, h.clock()) == 4
    _validate(h, g, first)
    rest = h.validation.select_work(g.vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    assert rest.bpns.tolist() == [2, 3, 4, 5]
    _validate(h, g, rest)
    assert (g.vm.p2m.state[pages] == PageState.EXPOSED).all()
    assert h.validation.validated[g.vm.vm_id] == 6
    h.content_intact(g)
    assert h.invariants() == []


def test_a_full_validation_queue_drops_the_oldest_pages_which_then_fault(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_QUEUE waiting pages the oldest leave the queue (the newest are the likeliest
    still untouched): they stay RESIDENT on their new frame, and the guest's touch maps
    that frame with a fault (REMAP), every byte intact."""
    monkeypatch.setattr(validation_module, "MAX_QUEUE", 4)
    g = h.add_vm()
    pages = list(range(6))
    _moved(h, g, pages)
    assert h.validation.pending_work(g.vm, h.clock()) == 4
    sel = h.validation.select_work(g.vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    assert sel.bpns.tolist() == [2, 3, 4, 5]
    _validate(h, g, sel)
    p2m = g.vm.p2m
    assert (p2m.state[[0, 1]] == PageState.RESIDENT).all()
    assert (g.exposure.frame[[0, 1]] == -1).all()
    for bpn in (0, 1):
        reply = h.resolver.try_resolve(g.vm, bpn, False, 0)
        assert reply is not None and reply.reason == FaultReason.REMAP
        assert reply.mpns.tolist() == [p2m.frame[bpn]]
        g.exposure.install(reply.bpns, reply.mpns, np.array(writable(reply)))
    assert h.validation.validated[g.vm.vm_id] == 4
    h.content_intact(g)
    assert h.invariants() == []


def test_a_page_queued_twice_is_validated_once(h: Harness) -> None:
    """A page can be queued again before its validation (moved a second time without a
    batch: defrag takes RESIDENT pages): the batch carries it once, and the payoff counter
    counts it once."""
    g = h.add_vm()
    _moved(h, g, [7, 8])
    h.validation.enqueue(g.vm, np.array([7]))  # its second move's on_moved
    sel = h.validation.select_work(g.vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    assert sorted(sel.bpns.tolist()) == [7, 8]
    status = _validate(h, g, sel)
    assert status.tolist() == [PageStatus.OK, PageStatus.OK]
    assert h.validation.validated[g.vm.vm_id] == 2
    h.content_intact(g)
    assert h.invariants() == []


def test_a_remapped_page_merged_meanwhile_is_not_handed_out_writable(h: Harness) -> None:
    """A page waiting for validation is RESIDENT, so page sharing may merge it without a
    batch (here: all zeros, onto the node's zero frame). Validation then hands it out no
    more: the VMM maps private pages writable, and a guest write through that mapping would
    change the frame every sharer reads. A touch faults and maps it read-only instead."""
    g = h.add_vm()
    h.back(g, [3, 4], node=1)
    h.write(g, 3, np.zeros(PAGE_SIZE, dtype=np.uint8))
    h.scan(g)
    h.low_round(g, run_moves=False)
    h.run_spawned()
    p2m = g.vm.p2m
    PageSharingService(h.ctx).merge(g.vm, np.array([3]))
    zero = int(h.machine.zero_frame[0])
    assert p2m.frame[3] == zero and p2m.flags[3] & FLAG_SHARED
    sel = h.validation.select_work(g.vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    assert sel.bpns.tolist() == [4]
    _validate(h, g, sel)
    assert g.exposure.frame[3] == -1 and p2m.state[3] == PageState.RESIDENT
    reply = h.resolver.try_resolve(g.vm, 3, False, 0)
    assert reply is not None and reply.mpns.tolist() == [zero] and writable(reply) == [False]
    g.exposure.install(reply.bpns, reply.mpns, np.array(writable(reply)))
    assert not h.machine.frames[zero].any()
    h.content_intact(g)
    assert h.invariants() == []


def test_stale_queue_entries_count_as_the_selection_s_work(h: Harness) -> None:
    """Entries popped for pages the guest faulted in meanwhile hand nothing out but were
    work (the engine drops a type from the round only when a selection did no work at
    all), and they use up the units: the next pages wait for the next selection."""
    g = h.add_vm()
    _moved(h, g, [0, 1, 2])
    for bpn in (0, 1):  # the guest touches them first: REMAP, EXPOSED
        reply = h.resolver.try_resolve(g.vm, bpn, False, 0)
        g.exposure.install(reply.bpns, reply.mpns, np.array(writable(reply)))
    sel = h.validation.select_work(g.vm, SLOT_CAPACITY, 2, h.clock())
    assert sel.bpns.tolist() == [] and sel.work == 2
    sel = h.validation.select_work(g.vm, SLOT_CAPACITY, 2, h.clock())
    assert sel.bpns.tolist() == [2] and sel.work == 1
    _validate(h, g, sel)
    h.content_intact(g)
    assert h.invariants() == []


def test_a_page_ballooned_while_its_validation_is_out_stays_ballooned(h: Harness) -> None:
    """The guest balloons a page whose VALIDATION batch is out, and the balloon's completion
    lands first (the page is ZERO, its frame freed): the VMM's late STALE_FRAME verdict must
    leave it ZERO, not make it RESIDENT on a frame it no longer has."""
    g = h.add_vm()
    _moved(h, g, [5, 6])
    sel = h.validation.select_work(g.vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    assert sel.bpns.tolist() == [5, 6]
    g.exposure.released_by[6] = ServiceType.BALLOON  # the guest gives page 6 to its balloon
    BalloonService(h.ctx).complete(g.vm, np.array([6]), np.zeros(1, dtype=np.uint8))
    del g.data[6]
    status = _validate(h, g, sel)
    assert status.tolist() == [PageStatus.OK, PageStatus.STALE_FRAME]
    p2m = g.vm.p2m
    assert p2m.state[6] == PageState.ZERO and p2m.frame[6] == -1
    assert p2m.state[5] == PageState.EXPOSED
    assert h.validation.validated[g.vm.vm_id] == 1
    for outcome in ("mapped", "refused"):
        got = h.metrics.registry.get_sample_value(
            "vmmem_validated_pages_total", {"outcome": outcome}
        )
        assert got == 1, outcome
    h.content_intact(g)
    assert h.invariants() == []


def test_a_page_ballooned_after_the_vmm_mapped_it_is_not_counted_validated(h: Harness) -> None:
    """The VMM maps both pages (OK), then the guest balloons one and the balloon's completion
    lands before validation's: that page is ZERO and stays so, and only the page still
    validated counts toward the payoff."""
    g = h.add_vm()
    _moved(h, g, [5, 6])
    sel = h.validation.select_work(g.vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    status = np.zeros(2, dtype=np.uint8)
    g.filters[ServiceType.VALIDATION].process(sel.bpns.astype(np.uint64), sel.mpns, status)
    assert status.tolist() == [PageStatus.OK, PageStatus.OK]
    g.exposure.invalidate(np.array([6]))  # the guest gives page 6 to its balloon
    g.exposure.released_by[6] = ServiceType.BALLOON
    BalloonService(h.ctx).complete(g.vm, np.array([6]), np.zeros(1, dtype=np.uint8))
    del g.data[6]
    h.validation.complete(g.vm, sel.bpns, status)
    assert g.vm.p2m.state[6] == PageState.ZERO and g.vm.p2m.state[5] == PageState.EXPOSED
    assert h.validation.validated[g.vm.vm_id] == 1
    h.content_intact(g)
    assert h.invariants() == []


def test_a_vm_gone_leaves_no_validation_work_behind(h: Harness) -> None:
    """The VM leaves with moved pages waiting, and a move that lands after it left (a
    remap's second half for a detached p2m) queues nothing: the service holds no work, nor
    a queue, for a VM that no round will ever serve."""
    g = h.add_vm()
    _moved(h, g, [0, 1])
    g.vm.alive = False
    h.validation.on_vm_gone(g.vm)
    h.validation.enqueue(g.vm, np.arange(2, 5))
    assert h.validation.pending_work(g.vm, h.clock()) == 0
    assert g.vm.vm_id not in h.validation.queues


# ---- the bandwidth bound ----------------------------------------------------------------------


def test_rates_bound_pages_per_second_per_vm_and_for_the_host(
    mem_dir: Path, short_tmp: Path
) -> None:
    """On a virtual clock, rounds every 100 ms: each VM moves at most its rate (plus one
    burst), and all VMs together at most the host's; with the host's rate below two VMs'
    worth, the host bucket is what binds, and it is shared fairly enough that both VMs move.
    A rate set to 0 at run time stops migration."""
    vm_rate, host_rate = 200.0, 300.0
    h = Harness(mem_dir, short_tmp, vm_rate=vm_rate, host_rate=host_rate)
    try:
        a, b = h.add_vm(guest_pages=1024), h.add_vm(guest_pages=1024)
        h.back(a, list(range(1000)), node=1)
        h.back(b, list(range(1000)), node=1, seed=1)
        for g in (a, b):
            h.scan(g)
        t0 = h.clock.now
        for step in range(1, 31):  # 3 s of rounds
            h.clock.now = t0 + 0.1 * step
            for g in (a, b):
                h.rounds(g)
            seconds = h.clock.now - t0
            moved = [h.svc.stats(g.vm).migrated for g in (a, b)]
            for m in moved:
                assert m <= vm_rate * (seconds + BURST_SECONDS) + 1
            assert sum(moved) <= host_rate * (seconds + BURST_SECONDS) + 1
        assert sum(moved) >= host_rate * 3 * 0.9  # the bound, not something else, limits it
        assert min(moved) >= 0.3 * sum(moved)

        h.svc.configure(vm_rate=0)
        h.clock.now += 1.0
        before = [h.svc.stats(g.vm).migrated for g in (a, b)]
        for g in (a, b):
            h.scan(g)
            assert h.svc.pending_work(g.vm, h.clock()) == 0
            h.rounds(g)
        assert [h.svc.stats(g.vm).migrated for g in (a, b)] == before
        for g in (a, b):
            h.content_intact(g)
        assert h.invariants() == []
    finally:
        h.close()


@pytest.mark.timeout(30)
def test_a_host_of_one_node_runs_no_scanner(h: Harness, mem_dir: Path) -> None:
    """With one node no page is ever remote: no background scan (an idle daemon does not
    wake for it); with two the scanner runs."""
    scanner = h.svc.background()
    assert scanner is not None
    scanner.close()
    one = MachineMemory(mem_dir / "machine1", h.config.host_pages, 1, prefault=False)
    try:
        ctx = SimpleNamespace(**{**vars(h.svc.ctx), "machine": one})
        assert NumaMigrationService(ctx).background() is None  # type: ignore[arg-type]
    finally:
        one.close(unlink=True)


# ---- gaps a mutation sweep found: each test below fails if one line of the service changes --


@pytest.fixture
def at_rate(mem_dir: Path, short_tmp: Path) -> Iterator[Callable[..., Harness]]:
    """A harness with the given rates (pages/s; one per test: they share the machine file)."""
    made: list[Harness] = []

    def make(vm_rate: float, host_rate: float = 1e6) -> Harness:
        harness = Harness(mem_dir, short_tmp, vm_rate=vm_rate, host_rate=host_rate)
        made.append(harness)
        return harness

    try:
        yield make
    finally:
        for harness in made:
            harness.close()


def unmapped(g: Guest, bpns: list[int]) -> None:
    """The VMM no longer maps ``bpns``: they are the platform's (RESIDENT), moved without a
    batch."""
    idx = np.array(bpns, dtype=np.int64)
    g.exposure.invalidate(idx)
    g.vm.p2m.state[idx] = PageState.RESIDENT


def home_room(h: Harness, room: int) -> Guest:
    """Fill the home node (node 0) with a filler VM's pages until ``room`` frames are left
    above its reserve. Returns the filler."""
    filler = h.add_vm(guest_pages=2048)
    h.back(filler, list(range(h.machine.allocator.free_on(0) - h.svc.reserve(0) - room)), 0)
    assert h.svc.room(0) == room
    return filler


def moved_without_more_rate(h: Harness, g: Guest) -> int:
    """Select (and so move) the VM's RESIDENT candidates until the rates allow no more at this
    instant; returns how many selections there were."""
    selections = 0
    while h.svc.pending_work(g.vm, h.clock()) > 0:
        sel = h.svc.select_work(g.vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
        assert len(sel.bpns) == 0  # all RESIDENT: nothing for the VMM
        selections += 1
        assert selections < 10
    return selections


def test_a_quiet_spell_banks_at_most_a_burst(at_rate: Callable[..., Harness]) -> None:
    """After 10 s with nothing to move, a VM may move BURST_SECONDS of its rate at once, not
    10 s of it: migration does not flood the home node (and the memory bus) after a lull."""
    h = at_rate(vm_rate=100.0)
    g = h.add_vm()
    h.back(g, list(range(200)), node=1)
    h.clock.now += 10.0
    h.scan(g)
    burst = int(100 * BURST_SECONDS)

    assert h.svc.pending_work(g.vm, h.clock()) == burst
    h.rounds(g)
    assert h.svc.stats(g.vm).migrated == burst
    assert h.svc.pending_work(g.vm, h.clock()) == 0  # the burst is spent
    h.clock.now += 0.1
    assert h.svc.pending_work(g.vm, h.clock()) == 10  # then the rate, 100 pages/s
    h.rounds(g)
    assert h.svc.stats(g.vm).migrated == burst + 10
    h.content_intact(g)
    assert h.invariants() == []


def test_a_rate_below_four_pages_a_second_still_moves_a_page_at_a_time(
    at_rate: Callable[..., Harness],
) -> None:
    """At 2 pages/s a quarter second of the rate is half a page: the bucket still banks one
    whole page (its minimum burst), so migration moves a page every half second instead of
    never moving at all."""
    h = at_rate(vm_rate=2.0)
    g = h.add_vm()
    h.back(g, list(range(20)), node=1)
    h.scan(g)
    t0 = h.clock.now
    for step in range(13):  # every 0.25 s for 3 s
        h.clock.now = t0 + 0.25 * step
        assert h.svc.pending_work(g.vm, h.clock()) <= 1
        h.rounds(g)
    assert h.svc.stats(g.vm).migrated == 1 + 6  # the banked page, then one each 0.5 s
    h.content_intact(g)
    assert h.invariants() == []


def test_refused_pages_give_their_bandwidth_back(at_rate: Callable[..., Harness]) -> None:
    """Pages the VMM keeps (pinned) were charged when selected; nothing was copied, so the
    charge goes back to both buckets: at the same instant the next batch, of movable pages,
    gets the whole burst."""
    h = at_rate(vm_rate=100.0, host_rate=100.0)
    g = h.add_vm()
    burst = int(100 * BURST_SECONDS)
    pinned, movable = list(range(burst)), list(range(burst, 2 * burst))
    h.back(g, pinned + movable, node=1)
    g.exposure.pinned[pinned] = 1
    h.scan(g)
    assert h.svc.queued(g.vm) == 2 * burst

    h.rounds(g)  # no clock advance: only given-back tokens can pay for the movable pages

    st = h.svc.stats(g.vm)
    assert st.refused == burst and st.migrated == burst
    assert [h.node(g, b) for b in pinned] == [1] * burst
    assert [h.node(g, b) for b in movable] == [0] * burst
    assert (g.vm.p2m.state[pinned] == PageState.EXPOSED).all()
    h.content_intact(g)
    assert h.invariants() == [] and h.svc.promised == [0, 0]


def test_pages_moved_without_a_batch_use_up_the_rate_too(at_rate: Callable[..., Harness]) -> None:
    """RESIDENT pages move at once in the selection, without asking the VMM; the copy costs
    the same, so they are charged to the rate like batched ones: at one instant a VM moves
    one burst of them, the rest wait for the bucket to refill."""
    h = at_rate(vm_rate=100.0)
    g = h.add_vm()
    burst = int(100 * BURST_SECONDS)
    pages = list(range(40))
    h.back(g, pages, node=1)
    unmapped(g, pages)
    h.scan(g)

    moved_without_more_rate(h, g)

    assert h.svc.stats(g.vm).migrated == burst
    assert h.svc.queued(g.vm) == 40 - burst
    assert [h.node(g, b) for b in pages] == [0] * burst + [1] * (40 - burst)
    assert (g.vm.p2m.state[pages] == PageState.RESIDENT).all()
    h.clock.now += 0.15  # 15 more pages' worth
    moved_without_more_rate(h, g)
    assert h.svc.stats(g.vm).migrated == 40 and h.svc.promised == [0, 0]
    h.content_intact(g)
    assert h.invariants() == []


def test_home_frames_promised_to_a_batch_in_flight_are_not_offered_twice(h: Harness) -> None:
    """VM a's batch took the last room on the home node; before its copy runs, VM b (same
    home node) is offered nothing: counting a's promise, the node has no room. So a's copy
    finds its frames and moves every page (without the promise b would take them and a's
    pages would be given up at the reserve)."""
    home_room(h, 20)
    a, b = h.add_vm(), h.add_vm()
    h.back(a, list(range(20)), node=1)
    h.back(b, list(range(20)), node=1, seed=1)
    h.scan(a)
    h.scan(b)
    h.low_round(a, run_moves=False)
    assert (a.vm.p2m.state[:20] == PageState.IN_FLIGHT).all()

    assert h.svc.room(0) == 0 and h.svc.pending_work(b.vm, h.clock()) == 0
    assert h.rounds(b) == []
    h.run_spawned()

    sa, sb = h.svc.stats(a.vm), h.svc.stats(b.vm)
    assert (sa.migrated, sa.aborted, sb.migrated) == (20, 0, 0)
    assert h.machine.allocator.free_on(0) == h.svc.reserve(0)
    for g in (a, b):
        h.content_intact(g)
    assert h.invariants() == [] and h.svc.promised == [0, 0]


def test_pages_moved_without_a_batch_leave_the_batch_s_promise_standing(h: Harness) -> None:
    """One selection holds mapped pages (the batch, promised home frames until its copy
    runs) and unmapped ones (moved at once). The unmapped ones are promised and un-promised
    on their own: the batch's promise stands, so another VM is offered no room meanwhile and
    the batch's copy moves every page."""
    home_room(h, 20)
    a, b = h.add_vm(), h.add_vm()
    h.back(a, list(range(20)), node=1)
    unmapped(a, list(range(10, 20)))
    h.back(b, list(range(20)), node=1, seed=1)
    h.scan(a)
    h.scan(b)
    h.low_round(a, run_moves=False)
    p2m = a.vm.p2m
    assert (p2m.state[:10] == PageState.IN_FLIGHT).all()  # the batch, not copied yet
    assert [h.node(a, x) for x in range(10, 20)] == [0] * 10  # moved in the selection

    assert h.svc.promised == [10, 0] and h.svc.room(0) == 0
    assert h.rounds(b) == []
    h.run_spawned()

    sa, sb = h.svc.stats(a.vm), h.svc.stats(b.vm)
    assert (sa.migrated, sa.aborted, sb.migrated) == (20, 0, 0)
    for g in (a, b):
        h.content_intact(g)
    assert h.invariants() == [] and h.svc.promised == [0, 0]


def test_refused_pages_release_the_home_frames_promised_to_them(h: Harness) -> None:
    """The home node has room for 30 pages; the first 30 offered are pinned and refused.
    Their promise is dropped with them, so at once the next 30 take that room and move (a
    promise kept for ever would shrink the node's room for migration for good)."""
    home_room(h, 30)
    g = h.add_vm()
    pinned, movable = list(range(30)), list(range(30, 60))
    h.back(g, pinned + movable, node=1)
    g.exposure.pinned[pinned] = 1
    h.scan(g)

    h.rounds(g)

    st = h.svc.stats(g.vm)
    assert st.refused == 30 and st.migrated == 30 and st.aborted == 0
    assert [h.node(g, b) for b in movable] == [0] * 30
    assert h.svc.promised == [0, 0]
    assert h.machine.allocator.free_on(0) == h.svc.reserve(0)
    h.content_intact(g)
    assert h.invariants() == []


def test_migration_takes_no_more_frames_at_once_than_the_host_limit_leaves(h: Harness) -> None:
    """A move holds the new frame before it frees the old one, so each batch may take only
    the frames the host limit still allows (``machine.available()``), however much room the
    home node has: batches of at most 10 pages, none given up at the copy, all 40 moved."""
    g = h.add_vm()
    pages = list(range(40))
    h.back(g, pages, node=1)
    h.machine.limit_pages = h.machine.allocator.used + 10
    h.scan(g)
    assert h.svc.room(0) == 10

    batches = h.rounds(g)

    numa_batches = [b for s, b in batches if s == ServiceType.NUMA_MIGRATION]
    assert numa_batches and all(len(b) <= 10 for b in numa_batches)
    st = h.svc.stats(g.vm)
    assert (st.migrated, st.aborted) == (40, 0)
    assert [h.node(g, b) for b in pages] == [0] * 40
    assert h.machine.allocator.used <= h.machine.limit_pages
    h.content_intact(g)
    assert h.invariants() == [] and h.svc.promised == [0, 0]


def test_the_queue_is_capped_and_the_scan_pauses_until_rounds_drain_it(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan queues at most MAX_QUEUE pages; the VM is scanned again only once rounds took
    the queue below half of it, and the next scan tops the queue up without queueing a page
    twice (the queue is all NUMA migration keeps per VM: it must stay short)."""
    monkeypatch.setattr(numa, "MAX_QUEUE", 8)
    g = h.add_vm()
    pages = list(range(20))
    h.back(g, pages, node=1)
    unmapped(g, pages)  # selections move them at once: the queue drains a page at a time
    st = h.svc.vms[g.vm.vm_id]

    h.scan(g)
    assert st.queue == list(range(8))
    assert not h.svc._wants_scan(st, h.clock())
    h.svc.select_work(g.vm, 4, 4, h.clock())
    assert len(st.queue) == 4 and not h.svc._wants_scan(st, h.clock())  # half: not yet
    h.svc.select_work(g.vm, 1, 1, h.clock())
    assert len(st.queue) == 3 and h.svc._wants_scan(st, h.clock())
    h.scan(g)
    assert st.queue == list(range(5, 13))
    assert h.svc.stats(g.vm).migrated == 5
    h.content_intact(g)
    assert h.invariants() == []


def test_a_pass_that_finds_pages_resets_the_backoff(h: Harness) -> None:
    """Empty passes back the scan off (1, 2, 4 s); a pass that finds pages to move starts
    the backoff over, so the pass after it (all local again) waits 1 s, not 8."""
    g = h.add_vm()
    h.back(g, [0, 1], node=0)
    st = h.svc.vms[g.vm.vm_id]
    waits = []
    for _ in range(3):
        h.scan(g)
        waits.append(st.next_scan - h.clock())
        h.clock.now = st.next_scan
    assert waits == [1, 2, 4]
    h.back(g, [5, 6], node=1)

    h.scan(g)  # finds 5 and 6

    assert st.queue == [5, 6] and st.rescan == numa.RESCAN_SECONDS
    h.rounds(g)
    assert [h.node(g, b) for b in (5, 6)] == [0, 0]
    h.scan(g)  # all local again
    assert st.next_scan - h.clock() == 1
    h.content_intact(g)
    assert h.invariants() == []


def test_a_scan_budget_larger_than_the_vm_looks_at_each_page_once(h: Harness) -> None:
    """The scanner asks for SCAN_CHUNK entries of every VM, more than a small VM has: the
    scan looks at each of its pages once (the window does not wrap around onto itself) and
    queues each remote page once."""
    g = h.add_vm()
    h.back(g, [3, 100, 255], node=1)
    h.back(g, [4], node=0)
    assert numa.SCAN_CHUNK > GUEST_PAGES

    looked = h.svc.scan(g.vm, numa.SCAN_CHUNK, h.clock())

    assert looked == GUEST_PAGES
    assert h.svc.vms[g.vm.vm_id].queue == [3, 100, 255]
    assert h.svc.pending_work(g.vm, h.clock()) == 3
    h.rounds(g)
    assert h.svc.stats(g.vm).migrated == 3
    h.content_intact(g)
    assert h.invariants() == []


def test_a_fault_that_cancels_the_move_is_not_counted_as_a_completion(h: Harness) -> None:
    """fault_completions counts faults that moved their page home; a fault that found no room
    (CANCEL: the page keeps its old frame) is not one, a later one with room is."""
    g = h.add_vm()
    _released(h, g, [3, 4])
    filler = home_room(h, 0)
    filler_frames = filler.vm.p2m.frame[: h.svc.reserve(0)].copy()  # (to free them later)

    assert h.svc.on_fault(g.vm, 3, write=True).reason == FaultReason.CANCEL
    assert h.svc.stats(g.vm).fault_completions == 0

    h.machine.release_or_retire(filler_frames)  # room again (the reserve's worth)
    filler.vm.p2m.frame[: h.svc.reserve(0)] = -1
    filler.vm.p2m.state[: h.svc.reserve(0)] = PageState.ZERO
    for b in range(h.svc.reserve(0)):
        del filler.data[b]
    assert h.svc.on_fault(g.vm, 4, write=True).reason == FaultReason.COMPLETE
    st = h.svc.stats(g.vm)
    assert (st.fault_completions, st.migrated, st.aborted) == (1, 1, 1)
    assert h.node(g, 3) == 1 and h.node(g, 4) == 0
    h.run_spawned()  # the pending move finds neither page in flight any more
    assert h.svc.stats(g.vm).migrated == 1
    assert h.invariants() == [] and h.svc.promised == [0, 0]


def test_locality_counts_only_private_frames(h: Harness) -> None:
    """A shared frame (a node's zero frame, a merged frame) backs pages of several VMs whose
    home nodes differ: it is no VM's local or remote memory, and migration never moves it."""
    g = h.add_vm()
    h.back(g, [0, 1, 2], node=0)
    h.back(g, [3, 4], node=1)
    h.resolver.first_touch(g.vm, 20, write=False, around=0)  # node 0's zero frame, shared
    p2m = g.vm.p2m
    assert p2m.flags[20] & FLAG_SHARED
    p2m.frame[21], p2m.flags[21] = h.machine.zero_frame[1], FLAG_SHARED  # node 1's
    p2m.state[21] = PageState.EXPOSED

    assert locality(g.vm, h.machine.allocator) == (3, 2)
    h.scan(g)
    assert h.svc.vms[g.vm.vm_id].queue == [3, 4]


@pytest.mark.timeout(30)
def test_rate_zero_parks_the_scanner_and_a_new_rate_wakes_it(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rate 0 (per VM or for the host) stops migration: no VM is scanned and the idle scanner
    sleeps its longest, not polling a VM that is due (configure() is what changes that).
    Setting a rate again wakes the sleeping scanner at once, not after its long sleep."""
    monkeypatch.setattr(numa, "SCAN_IDLE_MAX_SECONDS", 60.0)
    g = h.add_vm()
    h.back(g, [0, 1, 2], node=1)
    st = h.svc.vms[g.vm.vm_id]
    for stop in ({"vm_rate": 0}, {"host_rate": 0}):
        h.svc.configure(**stop)
        assert not h.svc._wants_scan(st, h.clock())  # due (next_scan 0), with room: still no
        assert h.svc._idle_sleep(h.clock()) == 60.0
        h.svc.configure(vm_rate=1e6, host_rate=1e6)
        assert h.svc._wants_scan(st, h.clock())
    h.svc.configure(vm_rate=0)

    async def run() -> None:
        task = asyncio.create_task(h.svc.scanner())
        try:
            for _ in range(5):
                await asyncio.sleep(0)  # the scanner looks, scans nothing and sleeps
            assert h.svc.queued(g.vm) == 0
            h.svc.configure(vm_rate=1e6)
            while h.svc.queued(g.vm) == 0:
                await asyncio.sleep(0.005)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(run(), 3))
    assert h.svc.vms[g.vm.vm_id].queue == [0, 1, 2]
