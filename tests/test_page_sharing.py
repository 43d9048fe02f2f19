"""Page sharing on its own: the service, the shared-frame table, COW and retiring merged frames.

No server and no socket: the service sees only a ``ServiceContext`` built here from real parts
(machine memory in a /dev/shm file, its allocator, ``SharedFrames``, ``FaultResolver``,
metrics on a private registry) plus a fake clock and a ``spawn`` that keeps the coroutines so
each test decides when an asynchronous merge runs. Guest pages are backed the way the daemon
backs them (frames from the allocator, real bytes written into them, ``map_private``), and the
VMM's side of a PAGE_SHARING batch is played either through the real ``RoundEngine`` (a LOW
GetRequest, statuses written into the slot, CompleteRequest) or by the engine's own hand-over
steps (``mark_in_flight`` then ``complete``). Every outcome is checked on real bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
import xxhash
from prometheus_client import CollectorRegistry

from platform_daemon.allocator import FrameState
from platform_daemon.context import ServiceContext
from platform_daemon.faults import FaultResolver
from platform_daemon.machine import MachineMemory
from platform_daemon.metrics import PlatformMetrics
from platform_daemon.p2m import FLAG_MERGED, FLAG_SHARED, NO_OP, P2M
from platform_daemon.retire import FrameRetirement
from platform_daemon.rounds import RoundEngine, RoundState
from platform_daemon.services import page_sharing
from platform_daemon.services.base import PlatformService
from platform_daemon.services.p2m_update import P2MUpdateService
from platform_daemon.services.page_retire import PageRetireService
from platform_daemon.services.page_sharing import (
    BURST_SECONDS,
    SCAN_CHUNK,
    ZERO_HASH,
    PageSharingService,
)
from platform_daemon.shared_frames import SHARED_OWNER, SharedFrames, frames_saved, merged_pages
from platform_daemon.vm import VM
from platform_daemon.waits import FrameWaits
from shared.config import PlatformConfig
from shared.constants import (
    NO_FRAME,
    PAGE_SIZE,
    FaultReason,
    PageState,
    PageStatus,
    Priority,
    ServiceType,
)
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

MiB = 1 << 20
HOST_MIB = 16
NODES = 2
GUEST_PAGES = 64
SLOT_COUNT = 4
SLOT_CAPACITY = 64
SHARED_MERGED = FLAG_SHARED | FLAG_MERGED
_SHARING = int(ServiceType.PAGE_SHARING)

Page = npt.NDArray[np.uint8]


def content(seed: int) -> Page:
    """4 KiB of deterministic, non-zero, seed-specific bytes."""
    page = np.random.default_rng([0x5EED, seed]).integers(1, 256, PAGE_SIZE, dtype=np.uint8)
    page[:8] = np.frombuffer(np.uint64(seed).tobytes(), np.uint8) | 1
    return page


ZERO: Page = np.zeros(PAGE_SIZE, dtype=np.uint8)


# ---- the harness -------------------------------------------------------------------------------


@dataclass
class FakeClock:
    """The context's clock: moves only when a test says so; counts its readings."""

    now: float = 1000.0
    calls: int = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


@dataclass
class Link:
    """The VM's connection: records what the daemon would send to the agent."""

    sent: list[Message] = field(default_factory=list)

    def send(self, message: Message, request_id: int = 0) -> None:
        self.sent.append(message)


class NoSwapTargets:
    def swap_deficit(self, vm: VM, in_flight: int) -> int:
        return 0

    def balloon_deficit(self, vm: VM) -> int:
        return 0


class Harness:
    """Real machine memory, shared frames, fault resolver and page-sharing service."""

    def __init__(self, mem_dir: Path, tmp: Path) -> None:
        self.config = PlatformConfig(
            socket=tmp / "p.sock",
            mem_dir=mem_dir,
            host_memory=HOST_MIB * MiB,
            numa_nodes=NODES,
            metrics_port=-1,
            prefault=False,
        )
        self.machine = MachineMemory(
            mem_dir / "machine", self.config.host_pages, NODES, prefault=False
        )
        self.shared = SharedFrames(self.machine)
        self.resolver = FaultResolver(self.machine, self.shared, max_around=16)
        self.metrics = PlatformMetrics(CollectorRegistry())
        self.clock = FakeClock()
        self.spawned: list[Coroutine[Any, Any, Any]] = []
        self.waits = FrameWaits(self.machine, 1.0, lambda: None, self.metrics.low_waits)
        self.ctx = ServiceContext(
            machine=self.machine,
            mapper=self.resolver,
            shared=self.shared,
            metrics=self.metrics,
            config=self.config,
            clock=self.clock,
            spawn=self._spawn,
            waits=self.waits,
            swap=None,
            targets=NoSwapTargets(),
        )
        self.svc = PageSharingService(self.ctx)
        self.vms: dict[int, VM] = {}
        self.engine = RoundEngine({ServiceType.PAGE_SHARING: self.svc})
        self.rounds: dict[int, RoundState] = {}
        self._next_id = 1

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        self.spawned.append(coro)
        return cast("asyncio.Future[Any]", None)

    def close(self) -> None:
        for coro in self.spawned:  # never run: close it so it does not warn
            coro.close()
        self.spawned.clear()
        self.svc.view.release()
        self.machine.close()

    # ---- VMs and their pages ----------------------------------------------------------------

    def add_vm(self, guest_pages: int = GUEST_PAGES, home_node: int = 0) -> VM:
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
        self.vms[vm_id] = vm
        self.rounds[vm_id] = RoundState()
        self.svc.pending_work(vm, self.clock())  # the scanner starts on this VM
        return vm

    def back(self, vm: VM, pages: dict[int, Page]) -> npt.NDArray[np.int64]:
        """Back ``pages`` (BPN -> bytes) with private frames holding those bytes, EXPOSED."""
        bpns = np.array(sorted(pages), dtype=np.int64)
        frames = self.machine.allocator.allocate(len(bpns), vm.home_node)
        for bpn, mpn in zip(bpns.tolist(), frames.tolist(), strict=True):
            self.machine.frames[mpn] = pages[bpn]
        self.resolver.map_private(vm, bpns, frames)
        return frames

    def write(self, vm: VM, bpn: int, data: Page) -> None:
        """The guest writes its page in place (it must be privately mapped, writable)."""
        assert vm.p2m.flags[bpn] == 0, "a write to a shared frame must go through COW"
        self.machine.frames[int(vm.p2m.frame[bpn])] = data

    def read(self, vm: VM, bpn: int) -> bytes:
        """The bytes the guest sees at ``bpn``, through the p2m."""
        return bytes(self.machine.frames[int(vm.p2m.frame[bpn])])

    # ---- the scanner and the VMM's side of a batch -------------------------------------------

    def scan_all(self, vm: VM) -> int:
        """One full pass of the hand over ``vm`` (the budget covers every page)."""
        return self.svc.scan(vm, vm.guest_pages)

    def candidates(self, vm: VM) -> list[int]:
        return list(self.svc.scans[vm.vm_id].candidates)

    def hand_over(self, vm: VM, bpns: npt.NDArray[np.int64]) -> None:
        """What ``RoundEngine._hand_over`` does when the VMM accepted every page: the pages
        go in flight to the service, whose ``complete`` spawns the merge (not run yet)."""
        vm.p2m.state[bpns] = PageState.SELECTED
        self.svc.mark_in_flight(vm, bpns)
        self.svc.complete(vm, bpns, PlatformService.ok_status(len(bpns)))

    def run_spawned(self) -> int:
        """Run the merges spawned so far (and any they spawn); returns how many ran."""
        ran = 0
        while self.spawned:
            asyncio.run(self.spawned.pop(0))
            ran += 1
        return ran

    def release_candidates(self, vm: VM) -> list[int]:
        """Hand every queued candidate to the VMM, which releases them all; merge them."""
        sel = self.svc.select_work(vm, 1 << 20, 1 << 20, self.clock())
        if len(sel.bpns):
            self.hand_over(vm, sel.bpns)
        self.run_spawned()
        handed: list[int] = sel.bpns.tolist()
        return handed

    def low_round(self, vm: VM) -> list[int]:
        """One low-priority round through the real RoundEngine; the VMM accepts every page.

        Returns the BPNs of the PAGE_SHARING batches, after their merges ran.
        """
        state = self.rounds[vm.vm_id]
        handed: list[int] = []
        flags = GET_FLAG_NEW_ROUND
        while True:
            req = self.engine.get_request(vm, state, GetRequest(Priority.LOW, 1_000_000, flags))
            flags = 0
            if not req.has_work:
                break
            assert req.service == ServiceType.PAGE_SHARING
            slot = vm.region.slot(req.slot)
            bpns, status, _ = slot.batch(req.count)
            mpns = slot.mpn[: req.count]
            # The VMM's check: the batch names the frames it maps.
            assert (mpns == vm.p2m.frame[bpns]).all()
            handed.extend(bpns.tolist())
            status[:] = PageStatus.OK
            self.engine.complete(vm, state, CompleteRequest(req.slot, req.count, req.seq))
        self.run_spawned()
        return handed

    def vm_gone(self, vm: VM) -> None:
        """What ``Registry.unregister`` and ``PlatformServer.on_vm_gone`` do for a VM's
        frames: private frames are released, merged frames lose a sharer."""
        vm.alive = False
        self.vms.pop(vm.vm_id, None)
        self.svc.on_vm_gone(vm)
        p2m = vm.p2m
        private = (p2m.frame != NO_FRAME) & (p2m.flags == 0)
        self.machine.release_or_retire(p2m.frame[private])
        shared = p2m.frame[(p2m.flags & FLAG_SHARED) != 0]
        self.shared.unref(shared[self.shared.refs[shared] > 0])
        p2m.frame[:] = NO_FRAME

    # ---- frames ---------------------------------------------------------------------------

    def frame_bytes(self, mpn: int) -> bytes:
        return bytes(self.machine.frames[mpn])

    def frame_state(self, mpns: Any) -> list[FrameState]:
        return [FrameState(s) for s in self.machine.allocator.frame_state[np.asarray(mpns)]]

    def merges(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "vmmem_sharing_merged_pages_total", {"outcome": outcome}
        )
        return 0.0 if value is None else value


@pytest.fixture
def h(mem_dir: Path, short_tmp: Path) -> Iterator[Harness]:
    harness = Harness(mem_dir, short_tmp)
    try:
        yield harness
    finally:
        harness.close()


def full_passes(h: Harness, vms: list[VM], passes: int, engine: bool = False) -> None:
    """``passes`` times: for each VM in turn, one full scan, then its candidates are released
    (through the real RoundEngine when ``engine``) and merged."""
    for _ in range(passes):
        for vm in vms:
            h.scan_all(vm)
            if engine:
                h.low_round(vm)
            else:
                h.release_candidates(vm)


def merged_frame(h: Harness, vm: VM, bpns: list[int], data: Page) -> int:
    """Back ``bpns`` (three or more pages of ``vm``) with ``data`` and merge them into one
    frame; returns its MPN."""
    assert len(bpns) >= 3
    h.back(vm, dict.fromkeys(bpns, data))
    full_passes(h, [vm], 3)
    mpn = int(vm.p2m.frame[bpns[0]])
    assert (vm.p2m.frame[bpns] == mpn).all()
    assert h.shared.refs[mpn] == len(bpns)
    assert h.frame_bytes(mpn) == data.tobytes()
    return mpn


def three_sharers(h: Harness, data: Page) -> tuple[VM, VM, int]:
    """vm1 pages 3 and 10 and vm2 page 5 hold ``data`` (among unique pages) and end up on
    one merged frame; returns the VMs and its MPN."""
    vm1, vm2 = h.add_vm(), h.add_vm()
    h.back(vm1, {3: data, 10: data} | {b: content(1000 + b) for b in range(20, 28)})
    h.back(vm2, {5: data} | {b: content(2000 + b) for b in range(20, 28)})
    full_passes(h, [vm1, vm2], 3)
    mpn = int(vm1.p2m.frame[3])
    assert vm1.p2m.frame[10] == mpn and vm2.p2m.frame[5] == mpn
    assert h.shared.refs[mpn] == 3
    return vm1, vm2, mpn


def writable(reply: FaultReply) -> list[bool]:
    return [(int(f) & FAULT_FLAG_WRITABLE) != 0 for f in reply.flags]


def fault_in_flight(h: Harness, vm: VM, bpn: int, write: bool) -> FaultReply:
    """A fault on an in-flight page goes to the service that owns its op (as the server's
    dispatch does)."""
    assert vm.p2m.state[bpn] == PageState.IN_FLIGHT
    assert vm.p2m.op[bpn] == _SHARING
    reply = h.svc.on_fault(vm, bpn, write)
    assert int(reply.bpns[0]) == bpn
    return reply


# ---- merging -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_zero_pages_merge_into_the_home_nodes_zero_frame(h: Harness) -> None:
    """Pages of all zeros are candidates at their first scan; once the VMM releases them (a
    PAGE_SHARING batch of a low-priority round of the real RoundEngine) they map the zero
    frame of the VM's home node with FLAG_SHARED|FLAG_MERGED, RESIDENT, and their own frames
    go back to the allocator. Pages with other content are not touched. The zero frame stays
    zero and uncounted: a read remaps it read-only, a write copies it to a private frame."""
    vm = h.add_vm(home_node=1)
    zeros, others = np.arange(0, 16, 2), np.arange(1, 16, 2)
    pages = dict.fromkeys(zeros.tolist(), ZERO) | {b: content(100 + b) for b in others.tolist()}
    own = dict(zip(sorted(pages), h.back(vm, pages).tolist(), strict=True))
    alloc, p2m = h.machine.allocator, vm.p2m
    free_before = alloc.free

    assert h.scan_all(vm) == 16
    assert sorted(h.candidates(vm)) == zeros.tolist()
    assert h.svc.pending_work(vm, h.clock()) == len(zeros)
    assert sorted(h.low_round(vm)) == zeros.tolist()

    zero = h.machine.zero_frame[1]
    assert zero != h.machine.zero_frame[0]
    assert p2m.frame[zeros].tolist() == [zero] * len(zeros)
    assert (p2m.flags[zeros] == SHARED_MERGED).all()
    assert (p2m.state[zeros] == PageState.RESIDENT).all()
    assert (p2m.op[zeros] == NO_OP).all()
    assert alloc.free == free_before + len(zeros)
    assert h.frame_state([own[b] for b in zeros.tolist()]) == [FrameState.FREE] * len(zeros)
    for b in others.tolist():
        assert p2m.frame[b] == own[b] and p2m.flags[b] == 0
        assert p2m.state[b] == PageState.EXPOSED
        assert h.read(vm, b) == content(100 + b).tobytes()
    assert h.frame_bytes(zero) == bytes(PAGE_SIZE)
    assert h.shared.refs[zero] == 0 and h.shared.frames == 0
    assert h.shared.lookup(ZERO_HASH) is None  # the zero frame is not in the table
    assert merged_pages(p2m) == len(zeros)
    assert frames_saved([p2m], h.shared) == len(zeros)
    assert vm.stats.pages_merged == len(zeros)
    assert h.merges("zero") == len(zeros)
    assert h.svc.pending_work(vm, h.clock()) == 0

    # Later passes leave merged zero pages alone (the zero frame is never a "singleton").
    full_passes(h, [vm], 2)
    assert p2m.frame[zeros].tolist() == [zero] * len(zeros)
    assert (p2m.flags[zeros] == SHARED_MERGED).all()

    # A read maps the zero frame read-only.
    reply = h.resolver.try_resolve(vm, 0, write=False, around=0)
    assert reply.reason == FaultReason.REMAP
    assert reply.mpns.tolist() == [zero] and writable(reply) == [False]
    assert p2m.state[0] == PageState.EXPOSED
    # A write gets a private zeroed copy on the home node; the zero frame stays zero.
    reply = h.resolver.try_resolve(vm, 2, write=True, around=0)
    assert reply.reason == FaultReason.COW and writable(reply) == [True]
    copy = int(reply.mpns[0])
    assert copy != zero and p2m.frame[2] == copy and p2m.flags[2] == 0
    assert int(alloc.node_of(np.array([copy]))[0]) == 1
    assert h.frame_bytes(copy) == bytes(PAGE_SIZE)
    assert vm.stats.cow_breaks == 1
    h.write(vm, 2, content(7))
    assert h.frame_bytes(zero) == bytes(PAGE_SIZE)
    assert h.read(vm, 0) == bytes(PAGE_SIZE)
    assert h.shared.refs[zero] == 0
    assert merged_pages(p2m) == len(zeros) - 1


@pytest.mark.timeout(30)
def test_identical_pages_of_two_vms_share_one_frame(h: Harness) -> None:
    """Identical non-zero pages across two VMs end up on one merged frame whose reference
    count is the number of sharers and whose bytes are the original content; the duplicates'
    own frames are freed. Pages of a second content form a second merged frame. The frames
    saved and merged pages reported by ``shared_frames`` match, and later passes change
    nothing (no candidate, no refcount drift)."""
    x, y = content(1), content(2)
    vm1, vm2 = h.add_vm(), h.add_vm(home_node=1)
    unique1 = {b: content(1000 + b) for b in range(20, 28)}
    unique2 = {b: content(2000 + b) for b in range(20, 28)}
    f1 = h.back(vm1, {3: x, 10: x, 11: y} | unique1)
    f2 = h.back(vm2, {5: x, 12: y} | unique2)
    originals = set(f1.tolist()) | set(f2.tolist())
    alloc = h.machine.allocator
    free_before = alloc.free

    full_passes(h, [vm1, vm2], 3, engine=True)

    mx = int(vm1.p2m.frame[3])
    my = int(vm1.p2m.frame[11])
    assert mx in originals and my in originals and mx != my
    assert vm1.p2m.frame[10] == mx and vm2.p2m.frame[5] == mx
    assert vm2.p2m.frame[12] == my
    assert h.shared.refs[mx] == 3 and h.shared.refs[my] == 2
    assert h.frame_bytes(mx) == x.tobytes() and h.frame_bytes(my) == y.tobytes()
    for vm, bpns in ((vm1, [3, 10, 11]), (vm2, [5, 12])):
        assert (vm.p2m.flags[bpns] == SHARED_MERGED).all()
        assert (vm.p2m.state[bpns] == PageState.RESIDENT).all()
    # Five pages on two frames: three frames freed, and only those.
    freed = originals - {mx, my} - set(vm1.p2m.frame.tolist()) - set(vm2.p2m.frame.tolist())
    assert len(freed) == 3
    assert h.frame_state(sorted(freed)) == [FrameState.FREE] * 3
    assert alloc.free == free_before + 3
    assert h.machine.owner_vm[mx] == SHARED_OWNER and h.machine.owner_vm[my] == SHARED_OWNER
    assert h.shared.lookup(xxhash.xxh3_64_intdigest(x.tobytes())) == mx
    assert h.shared.lookup(xxhash.xxh3_64_intdigest(y.tobytes())) == my
    assert h.shared.frames == 2
    assert merged_pages(vm1.p2m) == 3 and merged_pages(vm2.p2m) == 2
    assert frames_saved([vm1.p2m, vm2.p2m], h.shared) == 3
    assert h.merges("new") == 2 and h.merges("shared") == 3
    # Unique pages untouched.
    for vm, unique in ((vm1, unique1), (vm2, unique2)):
        for b, data in unique.items():
            assert vm.p2m.flags[b] == 0 and h.read(vm, b) == data.tobytes()

    full_passes(h, [vm1, vm2], 3, engine=True)
    assert h.shared.refs[mx] == 3 and h.shared.refs[my] == 2
    assert frames_saved([vm1.p2m, vm2.p2m], h.shared) == 3
    assert alloc.free == free_before + 3
    assert h.svc.pending_work(vm1, h.clock()) == h.svc.pending_work(vm2, h.clock()) == 0


@pytest.mark.timeout(30)
def test_three_identical_pages_of_one_vm_share_one_frame(h: Harness) -> None:
    """Three identical pages of one VM merge into one frame with three references (two of
    them as the first batch, the third when the hand comes back); the content is intact and
    two frames are freed."""
    vm = h.add_vm()
    x = content(3)
    frames = h.back(vm, {0: x, 7: x, 30: x, 31: content(4)})
    free_before = h.machine.allocator.free
    full_passes(h, [vm], 4)
    mpn = int(vm.p2m.frame[0])
    assert vm.p2m.frame[[0, 7, 30]].tolist() == [mpn] * 3
    assert h.shared.refs[mpn] == 3 and h.frame_bytes(mpn) == x.tobytes()
    assert h.machine.allocator.free == free_before + 2
    assert mpn in frames.tolist()
    assert merged_pages(vm.p2m) == 3 and frames_saved([vm.p2m], h.shared) == 2
    assert vm.p2m.flags[31] == 0 and h.read(vm, 31) == content(4).tobytes()


@pytest.mark.timeout(30)
def test_a_pair_of_identical_pages_in_one_vm_shares_one_frame(h: Harness) -> None:
    """Two identical pages of one VM (and no third) end up sharing one frame, like a pair
    across two VMs does: the second page creates a merged frame, the first joins it."""
    vm = h.add_vm()
    x = content(5)
    h.back(vm, {0: x, 1: x} | {b: content(500 + b) for b in range(2, 10)})
    full_passes(h, [vm], 6)
    assert vm.p2m.frame[0] == vm.p2m.frame[1]
    assert h.shared.refs[int(vm.p2m.frame[0])] == 2
    assert merged_pages(vm.p2m) == 2


@pytest.mark.timeout(30)
def test_new_merged_frame_whose_partner_never_joins_goes_private_again(h: Harness) -> None:
    """A pair is found, but the partner is written before it joins: the first page is left a
    merged frame of one. It waits a whole pass of the hand for company (its partner joins
    when its own round comes), then the hand makes it private again, bytes intact, so swap
    may take it."""
    vm = h.add_vm()
    x = content(21)
    h.back(vm, {0: x, 1: x} | {b: content(700 + b) for b in range(2, 8)})
    h.scan_all(vm)  # first hints
    h.scan_all(vm)  # 1 pairs with 0: both queued
    h.write(vm, 0, content(22))  # the partner changes before the round
    h.release_candidates(vm)
    alone = int(vm.p2m.frame[1])
    assert h.shared.refs[alone] == 1 and vm.p2m.flags[1] == FLAG_SHARED | FLAG_MERGED
    h.scan_all(vm)  # one pass later it still waits
    assert vm.p2m.flags[1] == FLAG_SHARED | FLAG_MERGED
    h.scan_all(vm)
    h.scan_all(vm)
    assert vm.p2m.flags[1] == 0 and h.shared.refs[alone] == 0 and h.shared.frames == 0
    assert vm.p2m.frame[1] == alone and h.read(vm, 1) == x.tobytes()


@pytest.mark.timeout(30)
def test_unique_pages_are_never_candidates(h: Harness) -> None:
    """Pages whose content no other page has are hashed on every pass but never queued,
    never handed to the VMM (no PAGE_SHARING batch, no epoch bump) and never merged, however
    many passes the hand makes."""
    vm1, vm2 = h.add_vm(), h.add_vm()
    f1 = h.back(vm1, {b: content(b) for b in range(GUEST_PAGES)})
    f2 = h.back(vm2, {b: content(10_000 + b) for b in range(GUEST_PAGES)})
    for _ in range(10):
        for vm in (vm1, vm2):
            assert h.scan_all(vm) == GUEST_PAGES
            assert h.candidates(vm) == []
            assert h.svc.pending_work(vm, h.clock()) == 0
            assert h.low_round(vm) == []
    for vm, frames, base in ((vm1, f1, 0), (vm2, f2, 10_000)):
        p2m = vm.p2m
        assert (p2m.frame == frames).all()
        assert (p2m.flags == 0).all()
        assert (p2m.state == PageState.EXPOSED).all()
        assert (p2m.epoch == 0).all(), "a unique page was handed to the VMM"
        assert vm.stats.sharing_scanned == 10 * GUEST_PAGES
        assert vm.stats.pages_merged == 0
        for b in range(GUEST_PAGES):
            assert h.read(vm, b) == content(base + b).tobytes()
    assert h.shared.frames == 0 and not h.shared.by_hash
    assert all(h.merges(k) == 0 for k in ("zero", "shared", "new", "unchanged"))


@pytest.mark.timeout(30)
def test_page_whose_content_changes_every_pass_is_never_a_candidate(h: Harness) -> None:
    """KSM's volatility check: a page pairs through the unstable table only if its hash was
    the same at its previous scan. A page rewritten before every pass is never queued, not
    even at the passes where its new content equals that of a stable page."""
    vm = h.add_vm()
    x, u = content(40), content(41)
    h.back(vm, {0: x, 2: u} | {b: content(400 + b) for b in range(3, 8)})
    full_passes(h, [vm], 2)  # pages 0 and 2 are stable: unstable-table entries for x and u
    h.back(vm, {1: content(42)})
    versions = [x, u, content(43), u, x, content(44)]
    handed: list[int] = []
    for data in versions:
        h.write(vm, 1, data)
        h.scan_all(vm)
        handed += h.candidates(vm)
        h.release_candidates(vm)
    assert handed == []
    assert vm.p2m.flags[1] == 0 and vm.p2m.epoch[1] == 0
    assert h.read(vm, 1) == content(44).tobytes()
    assert (vm.p2m.flags[[0, 2]] == 0).all()
    assert h.read(vm, 0) == x.tobytes() and h.read(vm, 2) == u.tobytes()


@pytest.mark.timeout(30)
def test_the_unstable_table_holds_an_entry_per_unchanged_page_and_no_more(h: Harness) -> None:
    """Entries of pages whose content changed, and of VMs gone, leave the table: it holds at
    most one entry per page scanned unchanged, however long pages keep changing (it grew
    without bound in the soak)."""
    vm1, vm2 = h.add_vm(), h.add_vm()
    h.back(vm1, {b: content(700 + b) for b in range(8)})
    h.back(vm2, {b: content(800 + b) for b in range(8)})
    full_passes(h, [vm1, vm2], 2)
    assert len(h.svc.unstable) == 16
    for version in range(5):  # vm1's pages change every pass
        for b in range(8):
            h.write(vm1, b, content(1000 + 100 * version + b))
        full_passes(h, [vm1, vm2], 1)
        assert len(h.svc.unstable) == 8, version  # only vm2's steady pages
    full_passes(h, [vm1], 1)  # vm1 unchanged since its last pass: its pages register again
    assert len(h.svc.unstable) == 16
    h.vm_gone(vm2)
    assert sorted(k >> 32 for k in h.svc.unstable.values()) == [vm1.vm_id] * 8


@pytest.mark.timeout(30)
def test_unique_page_whose_content_comes_back_is_not_paired_with_itself(h: Harness) -> None:
    """A unique page whose content changes and then changes back (A, B, A) is still unique:
    it never becomes a candidate, however many passes follow."""
    vm = h.add_vm()
    a = content(6)
    h.back(vm, {0: a} | {b: content(600 + b) for b in range(1, 8)})
    full_passes(h, [vm], 2)  # page 0 is now the unstable table's entry for content A
    h.write(vm, 0, content(7))
    full_passes(h, [vm], 1)
    h.write(vm, 0, a)
    handed: list[int] = []
    for _ in range(6):
        h.scan_all(vm)
        handed += h.candidates(vm)
        h.release_candidates(vm)
    assert handed == []
    assert vm.p2m.flags[0] == 0 and vm.stats.pages_merged == 0


@pytest.mark.timeout(30)
def test_page_changed_between_scan_and_merge_stays_private(h: Harness) -> None:
    """A candidate whose content changes after the scan queued it (the guest writes it
    before the VMM releases it) is not merged: a zero page that is no longer zero, a page
    that no longer matches a merged frame, and a page that no longer matches its unstable
    partner all keep their own frame, flags 0, with the new bytes; the merged frame's
    references do not move."""
    vm = h.add_vm()
    x, y = content(8), content(9)
    m = merged_frame(h, vm, [40, 41, 42], y)
    own = dict(zip([0, 1, 2, 3], h.back(vm, {0: ZERO, 1: x, 2: x, 3: y}).tolist(), strict=True))
    h.scan_all(vm)  # 0 (zero) and 3 (matches m) are candidates
    h.scan_all(vm)  # 2 pairs with 1 in the unstable table, and 1 is queued to join it
    sel = h.svc.select_work(vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    assert sel.bpns.tolist() == [0, 1, 2, 3]
    new = {b: content(900 + b) for b in (0, 2, 3)}
    for b, data in new.items():
        h.write(vm, b, data)  # the guest still maps the pages: it writes them
    h.hand_over(vm, sel.bpns)
    assert h.run_spawned() == 1

    for b, data in new.items():
        assert vm.p2m.frame[b] == own[b] and vm.p2m.flags[b] == 0
        assert vm.p2m.state[b] == PageState.RESIDENT
        assert h.read(vm, b) == data.tobytes()
    assert h.frame_state(list(own.values())) == [FrameState.USED] * 4
    assert h.shared.refs[m] == 3
    assert h.frame_bytes(m) == y.tobytes()
    assert h.frame_bytes(h.machine.zero_frame[0]) == bytes(PAGE_SIZE)
    assert h.merges("unchanged") == 3
    # Page 1, unchanged, became a new merged frame of its own, waiting for its partner; its
    # bytes are still x, and it owns the same frame.
    assert vm.p2m.frame[1] == own[1] and h.read(vm, 1) == x.tobytes()
    assert h.shared.refs[own[1]] == 1 and h.shared.frames == 2
    assert merged_pages(vm.p2m) == 4
    # The next touch maps the page's own frame writable again.
    reply = h.resolver.try_resolve(vm, 2, write=True, around=0)
    assert reply.reason == FaultReason.REMAP
    assert reply.mpns.tolist() == [own[2]] and writable(reply) == [True]


@pytest.mark.timeout(30)
def test_hash_collision_never_merges_different_content(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page whose hash equals a merged frame's but whose bytes differ is compared byte for
    byte and stays private, on both paths: a page matching the merged-frame table, and a
    page whose unstable partner (in another VM) collided with it and became a merged frame.
    Neither the page nor the merged frame changes."""
    x, y, z, w = content(10), content(11), content(12), content(13)
    vm1, vm2 = h.add_vm(), h.add_vm()
    m = merged_frame(h, vm1, [0, 1, 2], x)
    hx = xxhash.xxh3_64_intdigest(x.tobytes())
    hc = 0x0123_4567_89AB_CDEF
    forced = {y.tobytes(): hx, z.tobytes(): hc, w.tobytes(): hc}

    def colliding(buf: Any) -> int:
        data = bytes(buf)
        return forced.get(data, xxhash.xxh3_64_intdigest(data))

    monkeypatch.setattr(page_sharing, "xxhash", SimpleNamespace(xxh3_64_intdigest=colliding))

    # 1. y "hashes" like the merged frame x: a candidate at once, refused by the compare.
    own_y = int(h.back(vm1, {3: y})[0])
    h.scan_all(vm1)
    assert h.candidates(vm1) == [3]
    assert h.release_candidates(vm1) == [3]
    assert vm1.p2m.frame[3] == own_y and vm1.p2m.flags[3] == 0
    assert h.read(vm1, 3) == y.tobytes()
    assert h.shared.refs[m] == 3 and h.frame_bytes(m) == x.tobytes()
    assert h.merges("unchanged") == 1

    # 2. z (vm1) and w (vm2) collide in the unstable table: w becomes a merged frame of its
    # own content; z then "matches" it by hash and is refused by the compare.
    own_z = int(h.back(vm1, {4: z})[0])
    own_w = int(h.back(vm2, {4: w})[0])
    full_passes(h, [vm1, vm2], 3)
    assert vm2.p2m.frame[4] == own_w and h.frame_bytes(own_w) == w.tobytes()
    assert vm1.p2m.frame[4] == own_z and vm1.p2m.flags[4] == 0
    assert h.read(vm1, 4) == z.tobytes()
    assert h.shared.refs[own_z] == 0
    assert vm1.p2m.frame[3] == own_y and h.read(vm1, 3) == y.tobytes()
    assert h.shared.refs[m] == 3 and h.frame_bytes(m) == x.tobytes()


# ---- copy-on-write, faults while in flight, singletons ----------------------------------------


@pytest.mark.timeout(30)
def test_copy_on_write_of_a_merged_page(h: Harness) -> None:
    """A write to a merged page gives the writer a private frame with the same bytes and
    takes one reference off the merged frame, leaving the other sharers on it untouched
    (``cow_breaks`` counts it). The last sharer takes the merged frame itself, without a
    copy: same MPN, now private and owned by that page, out of the hash table."""
    x = content(14)
    vm1, vm2, m = three_sharers(h, x)
    alloc = h.machine.allocator
    hx = xxhash.xxh3_64_intdigest(x.tobytes())

    free = alloc.free
    reply = h.resolver.try_resolve(vm2, 5, write=True, around=0)
    assert reply.reason == FaultReason.COW and writable(reply) == [True]
    copy = int(reply.mpns[0])
    assert copy != m and vm2.p2m.frame[5] == copy
    assert h.frame_bytes(copy) == x.tobytes()
    assert alloc.free == free - 1
    assert h.shared.refs[m] == 2
    assert vm2.p2m.flags[5] == 0 and vm2.p2m.state[5] == PageState.EXPOSED
    assert (h.machine.owner_vm[copy], h.machine.owner_bpn[copy]) == (vm2.vm_id, 5)
    assert vm2.stats.cow_breaks == 1 and vm1.stats.cow_breaks == 0
    h.write(vm2, 5, content(15))
    assert h.frame_bytes(m) == x.tobytes()
    assert vm1.p2m.frame[[3, 10]].tolist() == [m, m]
    assert (vm1.p2m.flags[[3, 10]] == SHARED_MERGED).all()
    assert frames_saved([vm1.p2m, vm2.p2m], h.shared) == 1

    reply = h.resolver.copy_on_write(vm1, 10)
    assert reply.reason == FaultReason.COW and int(reply.mpns[0]) != m
    assert h.read(vm1, 10) == x.tobytes()
    assert h.shared.refs[m] == 1 and vm1.stats.cow_breaks == 1
    assert alloc.free == free - 2

    # The last sharer keeps the frame: no copy, no allocation.
    reply = h.resolver.try_resolve(vm1, 3, write=True, around=0)
    assert reply.reason == FaultReason.COW
    assert reply.mpns.tolist() == [m] and writable(reply) == [True]
    assert alloc.free == free - 2
    assert vm1.p2m.frame[3] == m and vm1.p2m.flags[3] == 0
    assert vm1.p2m.state[3] == PageState.EXPOSED
    assert h.shared.refs[m] == 0 and h.shared.frames == 0
    assert h.shared.lookup(hx) is None and not h.shared.in_table(np.array([hx], np.uint64))[0]
    assert (h.machine.owner_vm[m], h.machine.owner_bpn[m]) == (vm1.vm_id, 3)
    assert h.frame_state([m]) == [FrameState.USED]
    assert h.frame_bytes(m) == x.tobytes()
    assert vm1.stats.cow_breaks == 2
    assert merged_pages(vm1.p2m) == merged_pages(vm2.p2m) == 0
    assert frames_saved([vm1.p2m, vm2.p2m], h.shared) == 0


def _in_flight_setup(h: Harness) -> tuple[VM, int, dict[int, int]]:
    """A merged frame of content x (pages 40-42) and four candidates handed to the VMM and
    released, their merge spawned but not run: 3 and 4 hold x, 5 and 6 are zero."""
    vm = h.add_vm()
    x = content(16)
    m = merged_frame(h, vm, [40, 41, 42], x)
    pages = {3: x, 4: x, 5: ZERO, 6: ZERO}
    own = dict(zip(sorted(pages), h.back(vm, pages).tolist(), strict=True))
    h.scan_all(vm)
    assert sorted(h.candidates(vm)) == [3, 4, 5, 6]
    sel = h.svc.select_work(vm, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    h.hand_over(vm, sel.bpns)
    assert len(h.spawned) == 1
    assert (vm.p2m.state[[3, 4, 5, 6]] == PageState.IN_FLIGHT).all()
    return vm, m, own


@pytest.mark.timeout(30)
def test_write_fault_cancels_an_in_flight_merge(h: Harness) -> None:
    """A write fault on a page whose merge is in flight cancels that page's merge: it gets
    its own frame back at once, writable (reason CANCEL), and the merge that runs later skips
    it, while the other pages of the batch merge."""
    vm, m, own = _in_flight_setup(h)
    p2m = vm.p2m
    epoch = int(p2m.epoch[3])
    for bpn in (3, 5):
        reply = fault_in_flight(h, vm, bpn, write=True)
        assert reply.reason == FaultReason.CANCEL
        assert reply.mpns.tolist() == [own[bpn]] and writable(reply) == [True]
        assert p2m.state[bpn] == PageState.EXPOSED and p2m.op[bpn] == NO_OP
        assert p2m.flags[bpn] == 0
    assert int(p2m.epoch[3]) == epoch + 1
    assert vm.stats.sharing_aborted == 2
    assert h.shared.refs[m] == 3
    h.write(vm, 3, content(17))
    h.write(vm, 5, content(18))

    assert h.run_spawned() == 1
    for bpn, seed in ((3, 17), (5, 18)):
        assert p2m.frame[bpn] == own[bpn] and p2m.flags[bpn] == 0
        assert p2m.state[bpn] == PageState.EXPOSED
        assert h.read(vm, bpn) == content(seed).tobytes()
    assert p2m.frame[4] == m and p2m.flags[4] == SHARED_MERGED
    assert p2m.frame[6] == h.machine.zero_frame[0]
    assert h.shared.refs[m] == 4 and h.frame_bytes(m) == content(16).tobytes()
    assert h.frame_state([own[3], own[5]]) == [FrameState.USED] * 2
    assert h.frame_state([own[4], own[6]]) == [FrameState.FREE] * 2


@pytest.mark.timeout(30)
def test_read_fault_completes_an_in_flight_merge(h: Harness) -> None:
    """A read fault on a page whose merge is in flight completes that page's merge first and
    maps the shared frame read-only (reason COMPLETE); the merge that runs later does not
    merge it again (one reference, not two), and merges the rest of the batch."""
    vm, m, own = _in_flight_setup(h)
    p2m = vm.p2m
    reply = fault_in_flight(h, vm, 4, write=False)
    assert reply.reason == FaultReason.COMPLETE
    assert reply.mpns.tolist() == [m] and writable(reply) == [False]
    assert p2m.frame[4] == m and p2m.flags[4] == SHARED_MERGED
    assert p2m.state[4] == PageState.EXPOSED and p2m.op[4] == NO_OP
    assert h.shared.refs[m] == 4
    assert h.frame_state([own[4]]) == [FrameState.FREE]
    zero = h.machine.zero_frame[0]
    reply = fault_in_flight(h, vm, 6, write=False)
    assert reply.reason == FaultReason.COMPLETE
    assert reply.mpns.tolist() == [zero] and writable(reply) == [False]
    assert vm.stats.sharing_aborted == 0

    assert h.run_spawned() == 1
    assert h.shared.refs[m] == 5  # 40-42, 4 and 3: page 4 counted once
    assert p2m.frame[3] == m and p2m.state[3] == PageState.RESIDENT
    assert p2m.frame[5] == zero and p2m.state[5] == PageState.RESIDENT
    assert p2m.state[4] == PageState.EXPOSED and p2m.state[6] == PageState.EXPOSED
    assert h.frame_state(list(own.values())) == [FrameState.FREE] * 4
    assert h.read(vm, 4) == content(16).tobytes()
    assert merged_pages(p2m) == 7
    assert frames_saved([p2m], h.shared) == 6


@pytest.mark.timeout(30)
def test_last_sharer_becomes_private_again_when_the_hand_passes(h: Harness) -> None:
    """When every sharer but one wrote to its copy, the next scan over the last one turns
    the merged frame back into that page's private frame (no copy): references 0, flags 0,
    owned by the page, out of the hash table, content intact; a write then needs no COW."""
    x = content(19)
    vm1, vm2, m = three_sharers(h, x)
    for vm, bpn, seed in ((vm2, 5, 20), (vm1, 10, 21)):
        h.resolver.copy_on_write(vm, bpn)
        h.write(vm, bpn, content(seed))
    assert h.shared.refs[m] == 1 and vm1.p2m.flags[3] == SHARED_MERGED
    assert vm1.p2m.state[3] == PageState.RESIDENT

    h.scan_all(vm1)
    assert vm1.p2m.frame[3] == m and vm1.p2m.flags[3] == 0
    assert vm1.p2m.state[3] == PageState.RESIDENT
    assert h.shared.refs[m] == 0 and h.shared.frames == 0
    assert h.shared.lookup(xxhash.xxh3_64_intdigest(x.tobytes())) is None
    assert (h.machine.owner_vm[m], h.machine.owner_bpn[m]) == (vm1.vm_id, 3)
    assert h.frame_state([m]) == [FrameState.USED] and h.frame_bytes(m) == x.tobytes()
    assert merged_pages(vm1.p2m) == 0 and frames_saved([vm1.p2m, vm2.p2m], h.shared) == 0
    breaks = vm1.stats.cow_breaks
    reply = h.resolver.try_resolve(vm1, 3, write=True, around=0)
    assert reply.reason == FaultReason.REMAP
    assert reply.mpns.tolist() == [m] and writable(reply) == [True]
    assert vm1.stats.cow_breaks == breaks
    # Passes after that leave it private.
    full_passes(h, [vm1, vm2], 2)
    assert vm1.p2m.frame[3] == m and vm1.p2m.flags[3] == 0


@pytest.mark.timeout(30)
def test_resident_candidate_is_merged_by_the_scan_without_a_batch(h: Harness) -> None:
    """A candidate no VMM maps (RESIDENT) is merged by the scan itself, at once: no batch,
    nothing queued."""
    vm = h.add_vm()
    own = h.back(vm, {0: ZERO, 1: content(22)})
    vm.p2m.state[[0, 1]] = PageState.RESIDENT
    h.scan_all(vm)
    assert h.candidates(vm) == [] and h.spawned == []
    assert vm.p2m.frame[0] == h.machine.zero_frame[0]
    assert vm.p2m.flags[0] == SHARED_MERGED and vm.p2m.state[0] == PageState.RESIDENT
    assert h.frame_state([own[0]]) == [FrameState.FREE]
    assert vm.p2m.frame[1] == own[1] and vm.p2m.flags[1] == 0
    assert vm.p2m.epoch[0] == 0


# ---- VM teardown and frame retirement --------------------------------------------------------


@pytest.mark.timeout(30)
def test_merged_frames_live_as_long_as_a_vm_maps_them(h: Harness) -> None:
    """When a VM goes (its private frames released, one reference dropped per merged page),
    a merged frame another VM still maps is kept with its bytes; it is freed with its last
    sharer. A merge still pending for a gone VM does nothing; the gone VM's unstable-table
    entries pair with nobody. In the end every frame is free again."""
    x, y, u = content(23), content(24), content(25)
    alloc = h.machine.allocator
    free_initial = alloc.free
    vm1, vm2 = h.add_vm(), h.add_vm()
    h.back(vm1, {3: x, 10: x, 20: ZERO, 21: u, 30: y})
    h.back(vm2, {5: x, 6: ZERO, 7: content(26), 8: y})
    full_passes(h, [vm1, vm2], 3)
    mx, my = int(vm1.p2m.frame[3]), int(vm1.p2m.frame[30])
    assert h.shared.refs[mx] == 3 and h.shared.refs[my] == 2
    assert vm2.p2m.frame[5] == mx and vm2.p2m.frame[8] == my

    h.vm_gone(vm1)
    assert vm1.vm_id not in h.svc.scans
    assert h.shared.refs[mx] == 1 and h.shared.refs[my] == 1 and h.shared.frames == 2
    assert h.frame_state([mx, my]) == [FrameState.USED] * 2
    assert h.read(vm2, 5) == x.tobytes() and h.read(vm2, 8) == y.tobytes()
    assert h.frame_bytes(h.machine.zero_frame[0]) == bytes(PAGE_SIZE)

    # u was vm1's unstable-table entry: vm3's copy of it finds no partner.
    vm3 = h.add_vm()
    own_u = int(h.back(vm3, {0: u})[0])
    full_passes(h, [vm3], 3)
    assert vm3.p2m.frame[0] == own_u and vm3.p2m.flags[0] == 0
    assert vm3.p2m.epoch[0] == 0

    # vm2 goes with a merge in flight (page 7 was written to zero and handed over).
    h.write(vm2, 7, ZERO)
    h.scan_all(vm2)
    sel = h.svc.select_work(vm2, SLOT_CAPACITY, SLOT_CAPACITY, h.clock())
    assert sel.bpns.tolist() == [7]
    h.hand_over(vm2, sel.bpns)
    h.vm_gone(vm2)
    assert h.run_spawned() == 1
    assert h.shared.frames == 0 and not h.shared.by_hash
    assert h.frame_state([mx, my]) == [FrameState.FREE] * 2
    h.vm_gone(vm3)
    assert alloc.free == free_initial
    assert (h.shared.refs == 0).all()
    assert h.svc.scans == {}


@pytest.mark.timeout(30)
def test_retiring_a_merged_frame_moves_every_sharer(h: Harness) -> None:
    """Retiring a merged frame points every sharer (of every VM) at a new frame on the same
    node holding identical bytes, with the references and the hash-table entry moved; the
    old frame is marked failing and held while a VMM may still map it read-only, and is
    retired (never handed out again) once p2mUpdate drained those mappings."""
    x = content(27)
    vm1, vm2, m = three_sharers(h, x)
    reply = h.resolver.try_resolve(vm1, 3, write=False, around=0)  # vm1 maps m read-only
    assert reply.reason == FaultReason.REMAP and reply.mpns.tolist() == [m]
    p2m_update, page_retire = P2MUpdateService(h.ctx), PageRetireService(h.ctx)
    kicked: list[VM] = []
    retirement = FrameRetirement(
        h.machine, h.shared, h.vms, page_retire, p2m_update, kicked.append, h.metrics
    )
    alloc = h.machine.allocator
    hx = xxhash.xxh3_64_intdigest(x.tobytes())

    result = retirement.retire(m)
    assert result["was"] == "shared_frame" and result["stale_pages"] == 3
    new = int(result["new_mpn"])
    assert new != m
    assert alloc.node_of(np.array([new]))[0] == alloc.node_of(np.array([m]))[0]
    assert h.frame_bytes(new) == x.tobytes()
    assert vm1.p2m.frame[[3, 10]].tolist() == [new, new] and vm2.p2m.frame[5] == new
    assert h.shared.refs[new] == 3 and h.shared.refs[m] == 0 and h.shared.frames == 1
    assert h.shared.lookup(hx) == new
    assert h.machine.owner_vm[new] == SHARED_OWNER
    assert h.machine.failing[m] and h.frame_state([m]) == [FrameState.USED]
    assert {vm.vm_id for vm in kicked} == {vm1.vm_id, vm2.vm_id}

    # vm2's sharer is not mapped by its VMM: drained at selection, nothing to hand out.
    assert p2m_update.has_work(vm2)
    bpns, _ = p2m_update.select(vm2, SLOT_CAPACITY)
    assert bpns.tolist() == [] and not p2m_update.has_work(vm2)
    # vm1's page 3 is mapped: a batch names the old frame; m is held until it completes.
    bpns, mpns = p2m_update.select(vm1, SLOT_CAPACITY)
    assert bpns.tolist() == [3] and mpns.tolist() == [m]
    assert not p2m_update.has_work(vm1)
    assert h.machine.failing[m] and h.frame_state([m]) == [FrameState.USED]
    p2m_update.mark_in_flight(vm1, bpns)
    p2m_update.complete(vm1, bpns, PlatformService.ok_status(len(bpns)))
    assert h.frame_state([m]) == [FrameState.RETIRED] and not h.machine.failing[m]
    assert p2m_update.stale_frames() == 0
    assert vm1.p2m.state[3] == PageState.RESIDENT and vm1.p2m.frame[3] == new

    # The sharers go on with the new frame: a read remaps it, a write copies from it, and a
    # new page of the same content merges into it.
    reply = h.resolver.try_resolve(vm1, 3, write=False, around=0)
    assert reply.mpns.tolist() == [new] and writable(reply) == [False]
    h.resolver.copy_on_write(vm2, 5)
    assert h.read(vm2, 5) == x.tobytes() and h.shared.refs[new] == 2
    h.write(vm2, 5, content(28))
    h.back(vm2, {40: x})
    h.scan_all(vm2)
    h.release_candidates(vm2)
    assert vm2.p2m.frame[40] == new and h.shared.refs[new] == 3
    # The old frame is never handed out again.
    taken = alloc.allocate(alloc.free, 0)
    try:
        assert m not in taken.tolist()
    finally:
        alloc.release(taken)


# ---- the scanner's allowance and the queue ----------------------------------------------------


@pytest.mark.timeout(30)
async def test_scanner_allowance_accrues_with_time_up_to_a_burst(h: Harness) -> None:
    """The scan allowance accrues at guest_pages / scan_period pages per second of the
    context's clock and never beyond BURST_SECONDS worth of it (or one scanner step, if that
    is more), however long the gap; a scan hashes no more than its budget. The background
    scanner spends exactly that allowance, a whole step at a time."""
    guest = 1024
    vm = h.add_vm(guest_pages=guest)
    h.back(vm, {b: content(3000 + b) for b in range(guest)})
    h.svc.configure(scan_period=2.0)
    rate = guest / 2.0
    st = h.svc.scans[vm.vm_id]

    h.svc._accrue(vm, st, 10.0)
    assert st.tokens == 0.0 and st.last == 10.0
    h.svc._accrue(vm, st, 10.1)
    assert st.tokens == pytest.approx(rate * 0.1)
    h.svc._accrue(vm, st, 10.05)  # the clock never runs backwards in the allowance
    assert st.tokens == pytest.approx(rate * 0.1)
    h.svc._accrue(vm, st, 10.05 + 3600.0)
    step = min(SCAN_CHUNK, guest)
    assert step > rate * BURST_SECONDS  # this rate banks one step, not BURST_SECONDS' worth
    assert st.tokens == pytest.approx(step)
    assert h.svc._seconds_to_step(st) == 0.0

    # A scan hashes at most its budget, moves the hand past them and spends the tokens.
    tokens, hand = st.tokens, st.hand
    assert h.svc.scan(vm, 10) == 10
    assert st.hand == (hand + 10) % guest
    assert st.tokens == pytest.approx(tokens - 10)
    assert vm.stats.sharing_scanned == 10
    assert h.svc.pending_work(vm, h.clock()) == 0

    # The background scanner, on the fake clock.
    st.tokens, st.last = 0.0, None
    scanned = vm.stats.sharing_scanned
    task = asyncio.get_running_loop().create_task(h.svc.scanner())

    async def loops(n: int) -> None:
        """Let the scanner read the clock ``n`` more times (one reading per loop)."""
        target = h.clock.calls + n
        deadline = time.monotonic() + 10.0
        while h.clock.calls < target:
            assert time.monotonic() < deadline, "the scanner stopped"
            assert not task.done()
            await asyncio.sleep(0.001)

    try:
        await loops(3)
        assert vm.stats.sharing_scanned == scanned  # no time passed: nothing to spend
        h.clock.now += 3600.0  # a long stall: only one step is banked
        await loops(4)
        assert vm.stats.sharing_scanned == scanned + step
        assert st.tokens < 1
        h.clock.now += 0.1  # a fifth of a step earned: the scanner waits for the rest
        await loops(3)
        assert vm.stats.sharing_scanned == scanned + step
        assert h.svc._seconds_to_step(st) == pytest.approx((step - rate * 0.1) / rate)
        h.clock.now += (step - rate * 0.1) / rate
        await loops(3)
        assert vm.stats.sharing_scanned == scanned + 2 * step
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.timeout(30)
def test_a_window_with_nothing_to_hash_still_costs_allowance(h: Harness) -> None:
    """Memory the guest never touched costs allowance as the pages it could hold (one per
    SCAN_FACTOR entries looked at): an idle VM's scanner earns a step and sleeps, instead of
    sweeping window after window for one token each."""
    from platform_daemon.services.page_sharing import SCAN_FACTOR

    guest = 4096
    vm = h.add_vm(guest_pages=guest)
    h.back(vm, {b: content(5000 + b) for b in range(4)})  # the rest never touched
    st = h.svc.scans[vm.vm_id]
    st.tokens = 256.0
    assert h.svc.scan(vm, 256) == 4
    assert st.tokens == pytest.approx(0.0)  # 2048 entries looked at: 256 pages charged
    assert st.hand == 256 * SCAN_FACTOR
    st.tokens = 256.0
    assert h.svc.scan(vm, 256) == 0  # a window of untouched pages only
    assert st.tokens == pytest.approx(0.0)


@pytest.mark.timeout(30)
def test_select_work_hands_out_only_pages_still_exposed_and_private(h: Harness) -> None:
    """Candidates are handed out in queue order, at most ``capacity`` and ``units`` of them,
    each once (a page queued by two passes is in one batch once), with the MPNs the VMM
    maps; a candidate that meanwhile left the VMM (swap took it, it was merged, swapped out)
    is dropped, though its place in the queue still counts as work."""
    vm = h.add_vm()
    own = h.back(vm, dict.fromkeys(range(8), ZERO))
    h.scan_all(vm)
    h.scan_all(vm)
    assert h.candidates(vm) == list(range(8)) * 2
    p2m = vm.p2m
    p2m.state[1] = PageState.IN_FLIGHT  # swap took it
    p2m.op[1] = int(ServiceType.SWAP)
    h.svc.merge(vm, np.array([2]))  # merged without a batch
    assert p2m.flags[2] == SHARED_MERGED
    p2m.state[3] = PageState.SWAPPED

    sel = h.svc.select_work(vm, 4, 100, h.clock())
    assert sel.bpns.tolist() == [0] and sel.mpns.tolist() == [own[0]]
    assert sel.work == 4
    sel = h.svc.select_work(vm, 100, 2, h.clock())
    assert sel.bpns.tolist() == [4, 5] and sel.mpns.tolist() == own[[4, 5]].tolist()
    sel = h.svc.select_work(vm, 100, 100, h.clock())
    assert sel.bpns.tolist() == [0, 4, 5, 6, 7]
    assert sel.mpns.tolist() == own[[0, 4, 5, 6, 7]].tolist()
    assert sel.work == 10
    assert h.svc.pending_work(vm, h.clock()) == 0
    assert len(h.svc.select_work(vm, 100, 100, h.clock()).bpns) == 0
