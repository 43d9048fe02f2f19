"""One guest page's life, as a Hypothesis state machine, checked against a model of its bytes.

Real parts, no server and no socket: machine memory in a fresh file under /dev/shm, a real
swap file, the real services (``build_services``) behind a ``ServiceContext``, the real
``RoundEngine`` and ``FrameRetirement``, and on the agent side the real exposure table and
release filters (``vmm_agent``). The test plays the guest and the agent's fault path: a touch
of a page the exposure table does not map (or a write to a read-only one) is a fault,
resolved exactly as ``PlatformServer._resolve_now`` / ``_resolve_waiting`` do, and its reply
is installed in the exposure table. (One difference: a fault that would wait for reclaim under
the host limit gives up at once, and the guest's access does not happen.)

The page under test is BPN 0 of VM A; BPN 1 of VM A and BPN 0 of VM B are companions that
start with the same "corpus" content, so page sharing has something to merge (within a VM
and across VMs). Every rule may target any of the three; the spare pages are only touched
by fault-around.

The event loop is owned by the state machine and driven explicitly; its executor runs the
swap I/O inline, so every interleaving (a swap write gathered but not landed, a merge chunk
not run yet, a fault in between) is chosen by a rule and replays exactly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
import xxhash
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from prometheus_client import CollectorRegistry

from platform_daemon.allocator import FrameState
from platform_daemon.context import ServiceContext
from platform_daemon.faults import FaultResolver, NeedsAsync
from platform_daemon.hugepages import FLAG_LARGE
from platform_daemon.machine import HOST_OWNER, MachineMemory
from platform_daemon.metrics import PlatformMetrics
from platform_daemon.p2m import FLAG_MERGED, FLAG_SHARED, NO_OP, NO_SLOT, P2M
from platform_daemon.retire import FrameRetirement
from platform_daemon.rounds import RoundEngine, RoundState
from platform_daemon.services import build_services, page_sharing
from platform_daemon.services.base import PlatformService
from platform_daemon.services.p2m_update import P2MUpdateService
from platform_daemon.services.page_retire import PageRetireService
from platform_daemon.services.page_sharing import PageSharingService
from platform_daemon.services.swap import SwapService
from platform_daemon.services.validation import ValidationService
from platform_daemon.shared_frames import SHARED_OWNER, SharedFrames
from platform_daemon.swapfile import SwapFile
from platform_daemon.vm import VM
from platform_daemon.waits import FrameWaits
from shared.config import PlatformConfig
from shared.constants import (
    NO_FRAME,
    PAGE_SIZE,
    PAGES_PER_2M,
    FaultReason,
    PageState,
    Priority,
    ServiceType,
)
from shared.errors import ErrorCode, VMMemError
from shared.layout import ControlRegion, region_size
from shared.messages import (
    FAULT_FLAG_WRITABLE,
    GET_FLAG_NEW_ROUND,
    CompleteRequest,
    FaultReply,
    GetRequest,
    Message,
    Register,
    Request,
)
from vmm_agent.exposure import ExposureTable
from vmm_agent.services import FILTERS
from vmm_agent.services.base import AgentService
from vmm_agent.services.validation import ValidationFilter

HOST_PAGES = 64  # small, so freed frames come back soon (with whatever bytes they held)
SWAP_SLOTS = 4  # fewer than the pages that may be resident: a full swap file happens too
GUEST_PAGES = (3, 2)  # VM A, VM B
SLOT_COUNT, SLOT_CAPACITY = 4, 8
MAX_RETIRES = 12
MAX_FREE_RETIRES = 3
LOW_BUDGET_US = 10_000_000  # a low-priority bound nothing here comes close to
#: Bytes of a page that the colliding hash (``PrefixHash``) looks at.
PREFIX = 64

PAGE = (0, 0)  # the page whose life this is
COMPANIONS = ((0, 1), (1, 0))  # start with the corpus content: merge partners
TRACKED = (PAGE, *COMPANIONS)

_STATE = {int(s): s.name for s in PageState}
# Plain ints: comparing NumPy values with IntEnum members is slow (see faults.py).
_ZERO, _EXPOSED, _IN_FLIGHT, _SWAPPED = (
    int(s) for s in (PageState.ZERO, PageState.EXPOSED, PageState.IN_FLIGHT, PageState.SWAPPED)
)
_SWAP_OP, _SHARING_OP = int(ServiceType.SWAP), int(ServiceType.PAGE_SHARING)
#: A page a swap-in read ahead is held (``readahead.py``): IN_FLIGHT for VALIDATION, mapped
#: by the agent on its frame, its swap slot kept until the guest's touch or a drop decides.
_HELD_OP = int(ServiceType.VALIDATION)
_FREE, _USED, _RETIRED = (int(s) for s in FrameState)
Bytes = npt.NDArray[np.uint8]
S = TypeVar("S", bound=PlatformService)


def _content(*seed: int) -> Bytes:
    return np.random.default_rng(list(seed)).integers(0, 256, PAGE_SIZE, dtype=np.uint8)


ZERO = np.zeros(PAGE_SIZE, dtype=np.uint8)
CORPUS = _content(0xC0)


class PrefixHash:
    """A stand-in for ``xxhash`` in page sharing: xxh3 of the first PREFIX bytes, the rest
    read as zeros. Pages that agree on their first PREFIX bytes collide; a zero page keeps
    its real hash (``ZERO_HASH``), so a page that only starts with zeros collides with it."""

    @staticmethod
    def xxh3_64_intdigest(data: Any) -> int:
        head = bytes(memoryview(data)[:PREFIX])
        return int(xxhash.xxh3_64_intdigest(head + bytes(PAGE_SIZE - len(head))))


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs ``run_in_executor`` work at once on the loop's thread: the swap I/O is real, its
    interleaving with everything else deterministic (the result still lands one loop step
    later, like a thread's would)."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


class Targets:
    """memsched's swap targets, set by the test: pages each VM should still release."""

    def __init__(self) -> None:
        self.deficit: dict[int, int] = {}

    def swap_deficit(self, vm: VM, in_flight: int) -> int:
        return max(0, self.deficit.get(vm.vm_id, 0) - in_flight)

    def balloon_deficit(self, vm: VM) -> int:
        return 0  # the balloon is tested in test_services_balloon.py


class Link:
    """The daemon's link to an agent: kicks and replies are only recorded."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, message: Message, request_id: int = 0) -> None:
        self.sent.append(message)


#: Only share_scan_period and max_fault_around matter to the services; built once (pydantic).
CONFIG = PlatformConfig(host_memory=8 << 20, numa_nodes=1, metrics_port=-1)

pages = st.sampled_from(TRACKED)
#: What may happen while a batch is out (selected, not yet completed): a guest read or write
#: (offset of the bytes written), a frame retired, the scanner's pass, async work landing.
Between = tuple[str, tuple[int, int], int] | None
betweens = st.none() | st.tuples(
    st.sampled_from(["read", "write", "retire", "scan", "settle"]),
    pages,
    st.integers(0, PAGE_SIZE - 16),
)
contents = st.sampled_from(["patch", "corpus", "zero", "unique", "near_corpus", "near_zero"])
#: Milestones reached over a whole run (page states, fault reasons, service outcomes).
REACHED: Counter[str] = Counter()


class PageLife(RuleBasedStateMachine):
    """The life of one guest page (and its companions) against a dict of expected bytes."""

    #: The host and guests; ``tests/test_page_life_moves.py`` grows them (two nodes, a 2 MB
    #: region) for NUMA migration and 2M promotion.
    host_pages, nodes, guest_pages, slot_capacity = HOST_PAGES, 1, GUEST_PAGES, SLOT_CAPACITY
    config = CONFIG
    #: Services a page may be in flight for.
    flight_ops: tuple[int, ...] = (_SWAP_OP, _SHARING_OP, _HELD_OP)

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="vmmem-life-", dir="/dev/shm"))
        # Not on tmpfs: RWF_NOWAIT reads (the cached swap-in) are refused there.
        self.swap_dir = Path(tempfile.mkdtemp(prefix="vmmem-life-"))
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(InlineExecutor(max_workers=1))
        # Insertion-ordered (not a set): a failure replays with the same first error.
        self.tasks: dict[asyncio.Task[Any], None] = {}
        self.now = 1000.0
        self.machine = MachineMemory(
            self.tmp / "machine", self.host_pages, self.nodes, prefault=False
        )
        self.swap = SwapFile(self.swap_dir / "swap", SWAP_SLOTS * PAGE_SIZE)
        self.shared = SharedFrames(self.machine)
        self.mapper = FaultResolver(self.machine, self.shared, 16)
        self.metrics = PlatformMetrics(CollectorRegistry())
        self.targets = Targets()
        self.ctx = ServiceContext(
            machine=self.machine,
            mapper=self.mapper,
            shared=self.shared,
            metrics=self.metrics,
            config=self.config,
            clock=lambda: self.now,
            spawn=self.spawn,
            # A swap-in that finds no frame after its read gives up after one short wait.
            waits=FrameWaits(self.machine, 0.02, lambda: None, self.metrics.low_waits),
            swap=self.swap,
            targets=self.targets,
        )
        self.services = build_services(self.ctx)
        self.swap_svc = self.service(ServiceType.SWAP, SwapService)
        self.sharing = self.service(ServiceType.PAGE_SHARING, PageSharingService)
        self.retire_svc = self.service(ServiceType.PAGE_RETIRE, PageRetireService)
        self.p2m_update = self.service(ServiceType.P2M_UPDATE, P2MUpdateService)
        # Sampling's batches need the agent's sampler; its life is another test's subject.
        self.engine = RoundEngine(
            {s: svc for s, svc in self.services.items() if s != ServiceType.SAMPLING}
        )
        self.vms: dict[int, VM] = {}
        self.vm_list: list[VM] = []
        self.rounds: list[RoundState] = []
        self.exposure: list[ExposureTable] = []
        self.filters: list[dict[ServiceType, AgentService]] = []
        for i, n in enumerate(self.guest_pages):
            region = ControlRegion.initialize(
                bytearray(region_size(SLOT_COUNT, self.slot_capacity)),
                vm_id=i + 1,
                generation=i + 1,
                slot_count=SLOT_COUNT,
                capacity=self.slot_capacity,
                guest_pages=n,
            )
            info = Register(name=f"vm{i}", guest_pages=n, vcpus=1)
            vm = VM(i + 1, i + 1, info, 0, P2M(n), region, None, Link())  # type: ignore[arg-type]
            self.vms[vm.vm_id] = vm
            self.vm_list.append(vm)
            self.rounds.append(RoundState())
            exposure = ExposureTable(n)
            self.exposure.append(exposure)
            # The agent's filters, as ``vmm_agent.services.build_services`` makes them.
            filters = {stype: cls(exposure) for stype, cls in FILTERS.items()}
            filters[ServiceType.VALIDATION] = ValidationFilter(exposure)
            self.filters.append(filters)
        self.retirement = FrameRetirement(
            self.machine,
            self.shared,
            self.vms,
            self.retire_svc,
            self.p2m_update,
            lambda vm: None,
            self.metrics,
        )
        self.model: dict[tuple[int, int], Bytes] = {
            (v, b): ZERO for v, n in enumerate(self.guest_pages) for b in range(n)
        }
        self.version = 0
        self.retires = self.free_retires = 0
        for page in COMPANIONS:
            self.guest_write(page, "corpus", 0, 0)

    # ---- plumbing ----------------------------------------------------------------------------

    def service(self, stype: ServiceType, cls: type[S]) -> S:
        svc = self.services[stype]
        assert isinstance(svc, cls)
        return svc

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks[task] = None
        return task

    def pending(self) -> list[asyncio.Task[Any]]:
        """Spawned tasks not finished yet; a finished one that failed fails the test."""
        for task in [t for t in self.tasks if t.done()]:
            del self.tasks[task]
            task.result()
        return list(self.tasks)

    def run(self, coro: Any) -> Any:
        result = self.loop.run_until_complete(coro)
        self.pending()
        return result

    def teardown(self) -> None:
        try:
            for task in self.tasks:
                task.cancel()
            if self.tasks:
                self.loop.run_until_complete(asyncio.gather(*self.tasks, return_exceptions=True))
            for vm in self.vm_list:
                for name, value in vars(vm.stats).items():
                    REACHED[name] += value > 0
        finally:
            self.loop.close()
            self.sharing.view.release()
            self.machine.close()
            self.swap.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            shutil.rmtree(self.swap_dir, ignore_errors=True)

    def poison(self) -> None:
        """Fill every free frame with garbage, as a debugging allocator poisons freed memory:
        a frame handed out without being filled (a copy skipped) cannot pass for the page."""
        free = np.flatnonzero(self.machine.allocator.frame_state == _FREE)
        self.machine.frames[free] = 0xA5

    # ---- the agent's side ----------------------------------------------------------------------

    def resolve(
        self, vm: VM, bpn: int, write: bool, around: int, thread: bool
    ) -> FaultReply | None:
        """The daemon's answer to a fault, dispatched like ``PlatformServer`` does; None when
        it would wait for reclaim (under the host limit): the vCPU stays blocked."""
        state = int(vm.p2m.state[bpn])
        try:
            if state == _IN_FLIGHT:
                outcome = self.services[ServiceType(int(vm.p2m.op[bpn]))].on_fault(vm, bpn, write)
                if isinstance(outcome, FaultReply):
                    return outcome
                raise NeedsAsync
            if state == _SWAPPED:
                reply = None if thread else self.swap_svc.try_swap_in_now(vm, bpn, around)
                if reply is None:
                    raise NeedsAsync
                return reply
            return self.mapper.try_resolve(vm, bpn, write, around)
        except NeedsAsync:
            reply = self.run(self.resolve_waiting(vm, bpn, write, around))
            assert reply is None or isinstance(reply, FaultReply)
            return reply

    async def resolve_waiting(
        self, vm: VM, bpn: int, write: bool, around: int
    ) -> FaultReply | None:
        """``PlatformServer._resolve_waiting``, except that a fault that needs a frame when
        none is available gives up at once (None) instead of waiting for reclaim."""
        for _ in range(8):
            state = int(vm.p2m.state[bpn])
            if state == _SWAPPED:
                if self.machine.available() < 1:
                    return None
                try:
                    swapped_in = await self.swap_svc.swap_in(vm, bpn, around)
                except VMMemError as exc:  # another fault took the last frame meanwhile
                    assert exc.code == ErrorCode.OUT_OF_MEMORY, exc
                    REACHED["swap_in_out_of_memory"] += 1
                    return None
                if swapped_in is not None:
                    return swapped_in
                continue
            if state == _IN_FLIGHT:
                outcome = self.services[ServiceType(int(vm.p2m.op[bpn]))].on_fault(vm, bpn, write)
                if isinstance(outcome, FaultReply):
                    return outcome
                awaited: FaultReply = await outcome
                return awaited
            try:
                return self.mapper.try_resolve(vm, bpn, write, around)
            except NeedsAsync:
                REACHED["fault_waits_for_memory"] += 1
                return None
        raise AssertionError(f"fault on BPN {bpn} not resolved")

    def install(self, vmi: int, reply: FaultReply) -> None:
        """The agent's read callback: map every page of the reply as the daemon says."""
        REACHED[f"fault_{FaultReason(reply.reason).name.lower()}"] += 1
        writable = (reply.flags & FAULT_FLAG_WRITABLE) != 0
        self.exposure[vmi].install(reply.bpns, reply.mpns, writable)

    def mapped(self, page: tuple[int, int], write: bool, around: int, thread: bool) -> int | None:
        """The frame the guest touches: fault until the exposure table allows the access;
        None when the fault has to wait for memory (the access does not happen now)."""
        vmi, bpn = page
        ex = self.exposure[vmi]
        for _ in range(3):
            if ex.frame[bpn] >= 0 and (not write or ex.writable[bpn]):
                ex.accessed[bpn] = True
                return int(ex.frame[bpn])
            reply = self.resolve(self.vm_list[vmi], bpn, write, around, thread)
            if reply is None:
                return None
            assert int(reply.bpns[0]) == bpn, "the faulting page comes first in a reply"
            self.install(vmi, reply)
        raise AssertionError(f"{page}: still not {'writable' if write else 'mapped'}")

    def guest_write(self, page: tuple[int, int], kind: str, offset: int, around: int) -> None:
        """Write the page as the guest does: only the bytes written reach the frame."""
        self.version += 1
        new = self.model[page].copy()
        if kind == "patch":  # a few bytes: the rest of the page must survive a copy-on-write
            new[offset : offset + 16] = _content(1, self.version)[:16]
            frame = self.mapped(page, True, around, False)
            if frame is not None:
                self.machine.frames[frame][offset : offset + 16] = new[offset : offset + 16]
                self.model[page] = new
            return
        if kind == "zero":
            new[:] = 0
        elif kind == "corpus":
            new[:] = CORPUS
        elif kind == "unique":
            new[:] = _content(2, self.version)
        elif kind == "near_corpus":  # collides with the corpus under PrefixHash
            new[:] = _content(3, self.version)
            new[:PREFIX] = CORPUS[:PREFIX]
        else:  # near_zero: collides with the zero page under PrefixHash
            new[:] = _content(4, self.version)
            new[:PREFIX] = 0
        frame = self.mapped(page, True, around, False)
        if frame is not None:
            self.machine.frames[frame] = new
            self.model[page] = new

    def guest_read(self, page: tuple[int, int], around: int, thread: bool) -> None:
        frame = self.mapped(page, False, around, thread)
        if frame is not None:
            self.expect_content(page, self.machine.frames[frame], "guest read")

    def expect_content(self, page: tuple[int, int], got: Bytes, how: str) -> None:
        want = self.model[page]
        if not np.array_equal(got, want):
            vm = self.vm_list[page[0]]
            bad = np.flatnonzero(got != want)
            raise AssertionError(
                f"{how}: page {page} ({_STATE[int(vm.p2m.state[page[1]])]}) differs from the "
                f"model in {len(bad)} bytes, first at offset {bad[0]}"
            )

    def between(self, what: str, page: tuple[int, int], offset: int) -> None:
        """Something that happens while a batch is out (see ``betweens``)."""
        REACHED[f"between_{what}"] += 1
        if what == "write":
            self.guest_write(page, "patch", offset, 0)
        elif what == "read":
            self.guest_read(page, 0, False)
        elif what == "retire":
            mpn = int(self.vm_list[page[0]].p2m.frame[page[1]])
            if mpn >= 0 and self.retires < MAX_RETIRES:
                self.retires += 1
                self.retire_frame(mpn)
        elif what == "scan":
            self.sharing.scan(self.vm_list[page[0]], self.guest_pages[page[0]])
        else:
            self.settle()

    def process(self, vmi: int, req: Request) -> None:
        """The agent's BatchProcessor: filter, stop exposing accepted pages, complete."""
        vm = self.vm_list[vmi]
        slot = vm.region.slot(req.slot)
        stype, _, count, seq = slot.read_header()
        bpns, status, mpns = slot.batch(count)
        self.filters[vmi][stype].process(bpns, mpns, status)
        self.engine.complete(vm, self.rounds[vmi], CompleteRequest(req.slot, count, seq, 0))

    # ---- rules ---------------------------------------------------------------------------

    @initialize(kind=st.none() | st.sampled_from(["corpus", "unique", "patch"]))
    def first_write(self, kind: str | None) -> None:
        """The guest may start with the page untouched, or write it first."""
        self.poison()
        if kind is not None:
            self.guest_write(PAGE, kind, 0, 0)

    @rule(
        page=pages,
        kind=contents,
        offset=st.integers(0, PAGE_SIZE - 16),
        around=st.sampled_from([0, 2]),
    )
    def write(self, page: tuple[int, int], kind: str, offset: int, around: int) -> None:
        """The guest writes the page (a write fault first, when not mapped writable)."""
        self.poison()
        self.guest_write(page, kind, offset, around)

    @rule(page=pages, around=st.sampled_from([0, 2]), thread=st.booleans())
    def read(self, page: tuple[int, int], around: int, thread: bool) -> None:
        """The guest reads the page (a read fault first, when not mapped); fault-around maps
        the neighbours; a swapped page comes back from the page cache or through a thread."""
        self.poison()
        self.guest_read(page, around, thread)

    @rule(
        first=pages,
        second=pages,
        writes=st.tuples(st.booleans(), st.booleans()),
        around=st.sampled_from([0, 2]),
    )
    def fault_race(
        self,
        first: tuple[int, int],
        second: tuple[int, int],
        writes: tuple[bool, bool],
        around: int,
    ) -> None:
        """Two vCPUs fault at once on pages that need the slow path (a swap-in through a
        thread: a swapped page read ahead for the first fault is waited for by the second).
        Replies are installed in the order they are answered, then both vCPUs touch."""
        self.poison()
        if first[0] != second[0] or first == second:
            return  # the agent sends one fault per BPN; faults of two VMs do not race here
        ex = self.exposure[first[0]]
        for page, write in zip((first, second), writes, strict=True):
            if ex.frame[page[1]] >= 0 and (ex.writable[page[1]] or not write):
                return  # no fault: the vCPU touches its mapping
        vm = self.vm_list[first[0]]
        order: list[FaultReply | None] = []

        async def fault(bpn: int, write: bool, around: int) -> None:
            order.append(await self.resolve_waiting(vm, bpn, write, around))

        async def both() -> None:
            await asyncio.gather(fault(first[1], writes[0], around), fault(second[1], writes[1], 0))

        self.run(both())
        for reply in order:
            if reply is not None:
                self.install(first[0], reply)
        for page, write in zip((first, second), writes, strict=True):
            if write:
                self.guest_write(page, "patch", 128 * page[1], 0)
            else:
                self.guest_read(page, 0, False)

    @rule(
        scans=st.sampled_from([0, 1, 2]),
        budget=st.sampled_from([1, 8]),
        land=st.booleans(),
        between=betweens,
    )
    def merge(self, scans: int, budget: int, land: bool, between: Between) -> None:
        """Page sharing: the scanner passes over every VM ``scans`` times (a page pairs with
        another only if its hash held since its last scan), then a low-priority round per VM
        hands the queued candidates to the agent; accepted ones go in flight and are merged
        on the loop, now if ``land``, else later (``settle``/``step``) or by a fault. A scan
        hashes at most ``budget`` pages. ``between``: what happens after the first batch was
        selected, before the agent processes it."""
        self.poison()
        for _ in range(scans):
            for vm in self.vm_list:
                self.sharing.scan(vm, budget)
        for vmi, vm in enumerate(self.vm_list):
            state, flags = self.rounds[vmi], GET_FLAG_NEW_ROUND
            while True:
                get = GetRequest(Priority.LOW, LOW_BUDGET_US, flags)
                req = self.engine.get_request(vm, state, get)
                flags = 0
                if not req.has_work:
                    break
                if between is not None:
                    self.between(*between)
                    between = None
                self.process(vmi, req)
                if req.last:
                    break
        if land:
            self.settle()

    @rule(
        vmi=st.sampled_from([0, 1]),
        swap=st.sampled_from([0, 1, 64]),
        between=betweens,
        land=st.booleans(),
    )
    def high_round(self, vmi: int, swap: int, between: Between, land: bool) -> None:
        """A high-priority round: page-retire, p2mUpdate and (when memsched wants ``swap``
        pages) swap batches; swap writes land now if ``land``. ``between``: what happens
        after the first batch was selected and before the agent processes it (a fault of the
        guest reaches the daemon before the completion)."""
        self.poison()
        self.now += 1.0
        vm, state, flags = self.vm_list[vmi], self.rounds[vmi], GET_FLAG_NEW_ROUND
        self.targets.deficit[vm.vm_id] = swap
        try:
            while True:
                req = self.engine.get_request(vm, state, GetRequest(Priority.HIGH, 0, flags))
                flags = 0
                if not req.has_work:
                    break
                if between is not None:
                    self.between(*between)
                    between = None
                self.process(vmi, req)
        finally:
            self.targets.deficit[vm.vm_id] = 0
        if land:
            self.settle()

    def retire_frame(self, mpn: int) -> None:
        result = self.retirement.retire(mpn)
        REACHED[f"retire_{result['was']}"] += 1

    @precondition(lambda self: self.retires < MAX_RETIRES)
    @rule(page=pages, mapped=st.booleans())
    def retire(self, page: tuple[int, int], mapped: bool) -> None:
        """``vmmem-ctl retire`` of the page's frame (private, merged or a zero frame), or of
        the frame its VMM maps (maybe a stale one p2mUpdate has not dropped yet)."""
        self.poison()
        vmi, bpn = page
        mpn = self.exposure[vmi].frame[bpn] if mapped else self.vm_list[vmi].p2m.frame[bpn]
        if mpn >= 0:
            self.retires += 1
            self.retire_frame(int(mpn))

    @precondition(lambda self: self.free_retires < MAX_FREE_RETIRES)
    @rule()
    def retire_free(self) -> None:
        """``vmmem-ctl retire`` of the next free frame (it must never be handed out)."""
        self.poison()
        free = np.flatnonzero(self.machine.allocator.frame_state == _FREE)
        if len(free):
            self.free_retires += 1
            self.retire_frame(int(free[0]))

    @rule(err=st.sampled_from([errno.EIO, errno.ENOSPC]))
    def fail_next_swap_write(self, err: int) -> None:
        """The next swap write fails (the pages must stay resident, content intact)."""
        self.swap.fail_next_write = err

    @rule(headroom=st.sampled_from([None, 0, 1, 2]))
    def set_host_limit(self, headroom: int | None) -> None:
        """``vmmem-ctl set-host-limit``: only ``headroom`` more frames may be allocated (None:
        no limit). Faults that need a frame then wait (here: the access does not happen);
        swap-ins read ahead and retire moves do what fits."""
        self.poison()
        alloc = self.machine.allocator
        self.machine.limit_pages = self.host_pages if headroom is None else alloc.used + headroom

    @rule(on=st.booleans())
    def memory_pressure(self, on: bool) -> None:
        """memsched's word at a tick: the host needs frames (HARD or below, a fault waiting),
        so every read-ahead hold ends at once, the pages ordinary exposed ones with their slots
        freed, and none is made until it says otherwise (``readahead.py``)."""
        self.poison()
        readahead = self.service(ServiceType.VALIDATION, ValidationService).readahead
        REACHED["readahead_released_under_pressure"] += readahead.set_pressure(on) > 0

    @rule(page=pages, pinned=st.booleans())
    def pin(self, page: tuple[int, int], pinned: bool) -> None:
        """The agent pins the page in translation (or unpins it): swap and page sharing
        refuse it (BUSY) while pinned; page-retire and p2mUpdate take it anyway."""
        self.poison()
        self.exposure[page[0]].pinned[page[1]] = int(pinned)

    @rule()
    def settle(self) -> None:
        """Let the daemon's async work finish: swap writes land, merges run."""
        self.poison()
        while self.pending():
            self.run(asyncio.gather(*self.tasks))

    @rule()
    def step(self) -> None:
        """One turn of the event loop: async work advances by a step."""
        self.poison()
        self.run(asyncio.sleep(0))

    # ---- invariants --------------------------------------------------------------------------

    def held_frames(self) -> set[int]:
        """Frames in use that no page owns (a subclass's filler)."""
        return set()

    def peek(self, vmi: int, bpn: int) -> Bytes:
        """What the guest would read now, without changing anything: its mapping if it has
        one; otherwise what a fault would bring back (a swapped page from its slot)."""
        vm, ex = self.vm_list[vmi], self.exposure[vmi]
        frames: Bytes = self.machine.frames
        if ex.frame[bpn] >= 0:
            exposed: Bytes = frames[int(ex.frame[bpn])]
            return exposed
        state = int(vm.p2m.state[bpn])
        if state == _ZERO:
            return ZERO
        if state == _SWAPPED:
            data = self.swap.read_pages(np.array([vm.p2m.swap_slot[bpn]], dtype=np.int64))
            assert data is not None
            page: Bytes = data[0]
            return page
        assert vm.p2m.frame[bpn] >= 0, f"{_STATE[state]} page without a frame"
        mapped: Bytes = frames[int(vm.p2m.frame[bpn])]
        return mapped

    @invariant()
    def content_matches_model(self) -> None:
        """What ``peek`` says, for every page; the pages read from a frame all at once."""
        for vmi, (vm, ex) in enumerate(zip(self.vm_list, self.exposure, strict=True)):
            model = [self.model[(vmi, b)] for b in range(vm.guest_pages)]
            state = vm.p2m.state
            on_frame = (ex.frame >= 0) | ((state != _ZERO) & (state != _SWAPPED))
            src = np.where(ex.frame >= 0, ex.frame, vm.p2m.frame)
            bulk = np.flatnonzero(on_frame & (src >= 0)).tolist()
            want = np.stack([model[b] for b in bulk] or [ZERO])[: len(bulk)]
            bad = (self.machine.frames[src[bulk]] != want).any(axis=1)
            zero = np.flatnonzero(~on_frame & (state == _ZERO)).tolist()
            # One page at a time: swapped pages, a zero page the model says was written, and
            # the first mismatch (for its message).
            slow = [b for b in zero if model[b] is not ZERO and model[b].any()][:1]
            slow += np.flatnonzero((~on_frame & (state != _ZERO)) | (on_frame & (src < 0))).tolist()
            for bpn in [*np.array(bulk, dtype=np.int64)[bad][:1].tolist(), *slow]:
                self.expect_content((vmi, bpn), self.peek(vmi, bpn), "peek")
            assert not bad.any(), "a page differs from the model"

    def stale(self, vm: VM, bpn: int, frame: int) -> bool:
        """Whether p2mUpdate still has (vm, bpn) queued for dropping a mapping of ``frame``."""
        if self.p2m_update.old_of.get((vm.vm_id, bpn)) == frame:
            return True
        return any(
            e.old_mpn == frame and bpn in e.bpns.tolist()
            for e in self.p2m_update.queues.get(vm.vm_id, ())
        )

    @invariant()
    def views_agree(self) -> None:
        """What the agent maps is what the p2m says, or a stale read-only mapping p2mUpdate
        still has queued; a writable mapping is the page's own frame."""
        machine, shared = self.machine, self.shared
        frame_state = machine.allocator.frame_state
        for vm, ex in zip(self.vm_list, self.exposure, strict=True):
            p2m = vm.p2m
            for bpn in np.flatnonzero(ex.frame >= 0).tolist():
                f, state, where = int(ex.frame[bpn]), int(p2m.state[bpn]), (vm.vm_id - 1, bpn)
                held = state == _IN_FLIGHT and int(p2m.op[bpn]) == _HELD_OP
                assert state == _EXPOSED or held, (
                    f"{where}: mapped by the agent but {_STATE[state]}"
                )
                assert frame_state[f] == _USED, f"{where}: the agent maps frame {f}, not in use"
                if f != p2m.frame[bpn]:
                    assert not ex.writable[bpn], f"{where}: writable mapping of a stale frame"
                    assert self.stale(vm, bpn, f), f"{where}: stale frame {f} not queued"
                elif ex.writable[bpn]:
                    shared_flags = p2m.flags[bpn] & (FLAG_SHARED | FLAG_MERGED)
                    assert not shared_flags, f"{where}: writable but shared in the p2m"
                    assert not shared.is_shared(f), f"{where}: writable shared frame {f}"

    @invariant()
    def frames_accounted(self) -> None:
        """Every used frame backs exactly what the p2ms, the shared table and p2mUpdate say;
        allocator counters match the frame states; merged frames' refs count their pages."""
        machine, shared, alloc, upd = (
            self.machine,
            self.shared,
            self.machine.allocator,
            self.p2m_update,
        )
        counts = np.bincount(alloc.frame_state, minlength=3).tolist()
        assert (counts[_FREE], counts[_RETIRED]) == (alloc.free, alloc.retired), (
            f"allocator counters (free {alloc.free}, retired {alloc.retired}) disagree with "
            f"the frame states {counts}"
        )
        assert alloc.free + alloc.used + alloc.retired == self.host_pages
        assert sum(alloc.free_on(n) for n in range(alloc.nodes)) == alloc.free
        # The free stacks hold every free frame (entries retired or taken by a run linger,
        # counted stale and skipped later; a run's frame freed again may be there twice).
        for ns in alloc._nodes:
            stacked = ns.stack[: ns.top]
            live = np.unique(stacked[alloc.frame_state[stacked] == _FREE])
            node_free = np.flatnonzero(alloc.frame_state[ns.first : ns.last] == _FREE)
            assert np.array_equal(live, node_free + ns.first), "free stacks are off"
            assert ns.free == len(live) and ns.top == ns.free + ns.stale, "stack counts are off"
        # Free frames per 2 MiB run are what the frame states say.
        runs_of_free = np.flatnonzero(alloc.frame_state == _FREE) // PAGES_PER_2M
        by_run = np.bincount(runs_of_free, minlength=alloc.runs)
        assert np.array_equal(by_run, alloc.run_free), f"run_free {alloc.run_free} vs {by_run}"
        owner_vm, owner_bpn = machine.owner_vm.tolist(), machine.owner_bpn.tolist()
        zero_frames = machine.zero_frames
        used: set[int] = set(zero_frames) | set(upd.refs) | self.held_frames()
        private: list[int] = []
        sharers: Counter[int] = Counter()
        for vm in self.vm_list:
            p2m = vm.p2m
            rows = zip(
                p2m.state.tolist(),
                p2m.frame.tolist(),
                p2m.flags.tolist(),
                p2m.op.tolist(),
                p2m.swap_slot.tolist(),
                strict=True,
            )
            for bpn, (state, f, flags, op, slot) in enumerate(rows):
                where = (vm.vm_id - 1, bpn, _STATE[state])
                if state in (_ZERO, _SWAPPED):
                    assert f == NO_FRAME and flags == 0, f"{where}: frame {f}, flags {flags}"
                else:
                    assert f >= 0, f"{where}: no frame"
                    used.add(f)
                if state == _SWAPPED or (state == _IN_FLIGHT and op == _HELD_OP):
                    assert slot >= 0 and self.swap.in_use[slot], f"{where}: slot {slot}"
                else:
                    assert slot == NO_SLOT, f"{where}: keeps swap slot {slot}"
                if state == _IN_FLIGHT:
                    assert op in self.flight_ops, f"{where}: in flight for op {op}"
                else:
                    assert op == NO_OP, f"{where}: op {op}"
                if f < 0:
                    continue
                if flags & FLAG_MERGED:
                    assert flags & FLAG_SHARED, f"{where}: merged but not shared"
                if flags & FLAG_SHARED:
                    assert shared.is_shared(f), f"{where}: shared flag on private frame {f}"
                    if f not in zero_frames:
                        sharers[f] += 1
                else:
                    private.append(f)
                    assert (owner_vm[f], owner_bpn[f]) == (vm.vm_id, bpn), (
                        f"{where}: reverse map of frame {f} says ({owner_vm[f]}, {owner_bpn[f]})"
                    )
        assert len(private) == len(set(private)), f"two pages own one private frame: {private}"
        in_use = set(np.flatnonzero(alloc.frame_state == _USED).tolist())
        assert used == in_use, (
            f"frames in use but unaccounted: {sorted(in_use - used)}; "
            f"accounted but not in use: {sorted(used - in_use)}"
        )
        merged = set(np.flatnonzero(shared.refs > 0).tolist())
        assert merged == set(sharers), f"merged frames {merged} vs mapped shared {set(sharers)}"
        for f, n in sharers.items():
            assert shared.refs[f] == n, f"merged frame {f}: refs {shared.refs[f]}, {n} sharers"
            assert owner_vm[f] == SHARED_OWNER, f"merged frame {f}: owner {owner_vm[f]}"
        assert shared.frames == len(merged), f"{shared.frames} merged frames, {len(merged)} used"
        # The content table names only merged frames, each under its own hash.
        for content_hash, f in shared.by_hash.items():
            assert f in merged and shared.hash_of.get(f) == content_hash, f"by_hash -> {f}"
        assert set(shared.hash_of) <= merged, f"hash_of names unmerged {set(shared.hash_of)}"
        assert shared.hash_keys().tolist() == sorted(shared.by_hash), "stale sorted hash keys"
        assert not set(private) & (merged | zero_frames), "a private frame is shared"
        for z in machine.zero_frame:
            assert owner_vm[z] == HOST_OWNER and not machine.failing[z], f"zero frame {z}"
            assert not machine.frames[z].any(), f"zero frame {z} is not zero"
        # p2mUpdate holds each old frame for exactly the stale mappings it still has queued.
        held: Counter[int] = Counter()
        for q in upd.queues.values():
            for entry in q:
                held[entry.old_mpn] += len(entry.bpns)
        for old in upd.old_of.values():
            held[old] += 1
        assert dict(held) == upd.refs, f"p2mUpdate refs {upd.refs}, queued {dict(held)}"

    @invariant()
    def failing_frames_are_on_their_way_out(self) -> None:
        """A failing frame backs only a page page-retire will move (or whose swap-out will
        retire it), or is held by p2mUpdate alone until the last stale mapping is dropped."""
        for f in np.flatnonzero(self.machine.failing).tolist():
            assert self.machine.allocator.frame_state[f] == _USED, f"failing frame {f} not used"
            owners = [
                (vm, bpn)
                for vm in self.vm_list
                for bpn in np.flatnonzero(vm.p2m.frame == f).tolist()
            ]
            if f in self.p2m_update.refs:
                assert not owners, f"failing frame {f}, held for stale mappings, is mapped"
                continue
            assert len(owners) == 1, f"failing frame {f} backs {len(owners)} pages"
            vm, bpn = owners[0]
            swapping = int(vm.p2m.state[bpn]) == _IN_FLIGHT and int(vm.p2m.op[bpn]) == _SWAP_OP
            assert swapping or bpn in self.retire_svc.queue.get(vm.vm_id, set()), (
                f"failing frame {f} of vm{vm.vm_id - 1} BPN {bpn} is not queued for a move"
            )

    @invariant()
    def swap_accounted(self) -> None:
        """Slots in use are the swapped and held pages' (plus writes still in flight)."""
        swapped = sum(
            int(np.count_nonzero((v.p2m.state == _SWAPPED) | (v.p2m.swap_slot >= 0)))
            for v in self.vm_list
        )
        assert self.swap.used == int(np.count_nonzero(self.swap.in_use))
        if self.pending():
            assert self.swap.used >= swapped
        else:
            assert self.swap.used == swapped, f"{self.swap.used} slots in use, {swapped} swapped"
        for vm in self.vm_list:
            flying = (vm.p2m.state == _IN_FLIGHT) & (vm.p2m.op == _SWAP_OP)
            assert self.swap_svc.in_flight.get(vm.vm_id, 0) == int(np.count_nonzero(flying))

    @invariant()
    def large_regions_agree(self) -> None:
        """A region large in the p2m is large on all its 512 pages, private, each page on its
        place of one aligned run (page i on run + i); a region the agent maps large is large
        in the p2m and mapped on the p2m's frames (the agent may map a large region small)."""
        for vm, ex in zip(self.vm_list, self.exposure, strict=True):
            p2m, regions = vm.p2m, vm.guest_pages // PAGES_PER_2M
            if regions == 0:
                assert not (p2m.flags & FLAG_LARGE).any(), f"vm{vm.vm_id - 1}: large, no region"
                continue
            whole = regions * PAGES_PER_2M
            large = (p2m.flags[:whole] & FLAG_LARGE).reshape(regions, PAGES_PER_2M) != 0
            assert (large.all(axis=1) == large.any(axis=1)).all(), "a region partly large"
            assert not (p2m.flags[whole:] & FLAG_LARGE).any(), "large beyond the regions"
            for r in np.flatnonzero(large[:, 0]).tolist():
                pages = slice(r * PAGES_PER_2M, (r + 1) * PAGES_PER_2M)
                where, frames = f"vm{vm.vm_id - 1} region {r}", p2m.frame[pages]
                assert (p2m.flags[pages] == FLAG_LARGE).all(), f"{where}: large and shared"
                assert frames[0] >= 0 and frames[0] % PAGES_PER_2M == 0, f"{where}: unaligned"
                assert (np.diff(frames) == 1).all(), f"{where}: not one run in order"
            for r in np.flatnonzero(ex.large).tolist():
                pages = slice(r * PAGES_PER_2M, (r + 1) * PAGES_PER_2M)
                where = f"vm{vm.vm_id - 1} region {r}"
                mapped = ex.mapped_frame(np.arange(pages.start, pages.stop))
                assert (mapped == p2m.frame[pages]).all(), f"{where}: mapped off its run"
                assert large[r, 0], f"{where}: the agent maps it large, the p2m does not"

    @invariant()
    def record_milestones(self) -> None:
        vm, bpn = self.vm_list[PAGE[0]], PAGE[1]
        REACHED[f"page_{_STATE[int(vm.p2m.state[bpn])].lower()}"] += 1
        flags = int(vm.p2m.flags[bpn])
        if flags & FLAG_MERGED:
            zero = int(vm.p2m.frame[bpn]) in self.machine.zero_frames
            REACHED["page_merged_zero" if zero else "page_merged"] += 1


LIFE_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    # One bug, shrunk once, and no explain phase: a failure is reported in seconds.
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


def check_milestones() -> None:
    """The run was not vacuous: the page went through the main parts of its life (the rarer
    paths are walked on purpose by the scenarios below)."""
    wanted = [
        "page_swapped",
        "page_in_flight",
        "page_resident",
        "page_merged",
        "fault_first_touch",
        "fault_swap_in",
        "fault_cancel",
        "fault_cow",
        "fault_remap",
        "retire_used",
        "retired_moves",
        "cow_breaks",
        "swap_cancelled",
    ]
    missing = [m for m in wanted if REACHED[m] == 0]
    assert not missing, f"never reached: {missing} (reached: {dict(REACHED)})"


@pytest.mark.timeout(60)
def test_page_life() -> None:
    REACHED.clear()
    run_state_machine_as_test(PageLife, settings=LIFE_SETTINGS)
    check_milestones()


@pytest.mark.timeout(60)
def test_page_life_with_colliding_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Page sharing under a weak hash: merges must rest on the byte-for-byte compare."""
    monkeypatch.setattr(page_sharing, "xxhash", PrefixHash)
    REACHED.clear()
    run_state_machine_as_test(PageLife, settings=LIFE_SETTINGS)
    check_milestones()


def test_prefix_hash_collides_as_intended() -> None:
    page = CORPUS.copy()
    page[PREFIX:] = 7
    assert PrefixHash.xxh3_64_intdigest(page) == PrefixHash.xxh3_64_intdigest(CORPUS)
    assert PrefixHash.xxh3_64_intdigest(ZERO) == page_sharing.ZERO_HASH
    assert not np.array_equal(page, CORPUS)


# ---- scenarios: the rare paths of a page's life, walked on purpose ------------------------------


class Life:
    """Drives a PageLife step by step, checking every invariant after each step."""

    def __init__(self, machine: type[PageLife] = PageLife) -> None:
        self.m = machine()
        self.check()

    def check(self) -> None:
        m = self.m
        m.content_matches_model()
        m.views_agree()
        m.frames_accounted()
        m.failing_frames_are_on_their_way_out()
        m.swap_accounted()
        m.large_regions_agree()

    def __getattr__(self, rule: str) -> Callable[..., None]:
        step = getattr(self.m, rule)

        def run(*args: Any, **kwargs: Any) -> None:
            step(*args, **kwargs)
            self.check()

        return run

    def state(self, page: tuple[int, int]) -> str:
        return _STATE[int(self.m.vm_list[page[0]].p2m.state[page[1]])]

    def frame(self, page: tuple[int, int]) -> int:
        return int(self.m.vm_list[page[0]].p2m.frame[page[1]])

    def flags(self, page: tuple[int, int]) -> int:
        return int(self.m.vm_list[page[0]].p2m.flags[page[1]])

    def mapping(self, page: tuple[int, int]) -> tuple[int, bool]:
        ex = self.m.exposure[page[0]]
        return int(ex.frame[page[1]]), bool(ex.writable[page[1]])

    def stats(self, vmi: int = 0) -> Any:
        return self.m.vm_list[vmi].stats


@pytest.fixture
def life() -> Iterator[Life]:
    driver = Life()
    try:
        yield driver
    finally:
        driver.m.teardown()


C1, C2 = COMPANIONS
SWAP_OUT = {"swap": 64, "between": None}


@pytest.mark.timeout(30)
def test_swap_out_cancel_swap_in_and_failed_write(life: Life) -> None:
    life.write(PAGE, "unique", 0, 0)
    life.write(C1, "patch", 100, 0)  # C1's frame is free'd by its swap-out below
    life.high_round(0, **SWAP_OUT, land=False)  # referenced pages get a second chance
    assert life.state(PAGE) == "IN_FLIGHT"
    life.read(PAGE, 0, False)  # cancels the swap-out: same frame back, the write discarded
    assert life.state(PAGE) == "EXPOSED" and life.stats().swap_cancelled >= 1
    life.settle()
    life.high_round(0, **SWAP_OUT, land=True)
    assert life.state(PAGE) == life.state(C1) == "SWAPPED"
    life.write(C2, "unique", 0, 0)
    life.read(PAGE, 0, False)  # from the page cache, on the loop
    life.high_round(0, **SWAP_OUT, land=True)
    assert life.state(PAGE) == "SWAPPED"
    life.read(PAGE, 2, True)  # through a thread, reading C1 ahead
    assert life.state(C1) == "IN_FLIGHT" and life.stats().swapped_in >= 3  # held
    life.memory_pressure(True)  # the hold ends: C1 an ordinary page, its slot freed
    assert life.state(C1) == "EXPOSED"
    life.memory_pressure(False)
    life.write(PAGE, "patch", 4000, 0)
    life.fail_next_swap_write(errno.EIO)
    # The first batch takes C1 (the page was touched: second chance), and its write fails:
    # C1 stays resident on its frame. The next batch of the round takes the page.
    life.high_round(0, **SWAP_OUT, land=True)
    assert (life.state(C1), life.state(PAGE)) == ("RESIDENT", "SWAPPED")
    life.read(C1, 0, False)
    assert life.mapping(C1) == (life.frame(C1), True)
    life.read(PAGE, 0, False)


@pytest.mark.timeout(30)
def test_swap_in_raced_by_a_fault_on_a_page_read_ahead(life: Life) -> None:
    life.write(PAGE, "unique", 0, 0)
    life.high_round(0, **SWAP_OUT, land=True)
    assert life.state(PAGE) == life.state(C1) == "SWAPPED"
    life.fault_race(PAGE, C1, (True, False), 2)
    assert life.state(PAGE) == life.state(C1) == "EXPOSED"


@pytest.mark.timeout(30)
def test_merge_cow_and_retire_of_the_merged_frame(life: Life) -> None:
    life.first_write("corpus")
    life.merge(2, 8, True, None)  # the companions pair up; the page is the unstable entry
    life.merge(1, 8, True, None)  # the page joins their merged frame
    merged = life.frame(PAGE)
    assert life.frame(C1) == life.frame(C2) == merged
    assert life.flags(PAGE) == FLAG_SHARED | FLAG_MERGED
    assert life.m.shared.refs[merged] == 3
    life.read(PAGE, 0, False)
    life.read(C2, 0, False)
    assert life.mapping(PAGE) == (merged, False)
    life.retire(PAGE, False)  # a healthy copy replaces it in every p2m at once
    fresh = life.frame(PAGE)
    assert fresh != merged and life.m.shared.refs[fresh] == 3
    life.read(PAGE, 0, False)  # still through the stale read-only mapping
    assert life.mapping(PAGE) == (merged, False)
    life.high_round(0, swap=0, between=None, land=False)
    life.high_round(1, swap=0, between=None, land=False)
    assert life.m.machine.allocator.frame_state[merged] == FrameState.RETIRED
    assert life.stats(0).p2m_updates >= 1 and life.stats(1).p2m_updates == 1
    life.write(PAGE, "patch", 8, 0)  # a copy (two sharers left)
    life.write(C1, "patch", 8, 0)  # a copy (one left)
    life.write(C2, "patch", 8, 0)  # the last sharer keeps the frame
    assert life.frame(C2) == fresh and life.m.shared.refs[fresh] == 0
    assert life.stats(0).cow_breaks == 2 and life.stats(1).cow_breaks == 1


@pytest.mark.timeout(30)
def test_zero_frame_retired_under_a_mapped_page(life: Life) -> None:
    life.read(PAGE, 0, False)  # first touch by a read: the shared zero frame, read-only
    zero = life.frame(PAGE)
    assert zero in life.m.machine.zero_frames
    life.retire(PAGE, False)
    assert life.frame(PAGE) != zero and life.mapping(PAGE) == (zero, False)
    life.read(PAGE, 0, False)
    life.high_round(0, swap=0, between=None, land=False)
    assert life.state(PAGE) == "RESIDENT"
    assert life.m.machine.allocator.frame_state[zero] == FrameState.RETIRED
    life.read(PAGE, 0, False)
    life.write(PAGE, "patch", 2048, 0)  # a copy of the new zero frame
    assert life.flags(PAGE) == 0


@pytest.mark.timeout(30)
def test_fault_on_a_page_whose_merge_is_in_flight(life: Life) -> None:
    life.first_write("corpus")
    life.merge(2, 8, False, None)
    assert life.state(C1) == life.state(C2) == "IN_FLIGHT"
    life.read(C1, 0, False)  # completes C1's merge first
    assert life.flags(C1) == FLAG_SHARED | FLAG_MERGED
    life.write(C2, "patch", 0, 0)  # cancels C2's merge: its own frame, writable
    assert life.flags(C2) == 0 and life.stats(1).sharing_aborted == 1
    life.settle()
    life.merge(1, 8, True, None)  # the page joins C1, a merged frame of one until then
    assert life.frame(PAGE) == life.frame(C1)


@pytest.mark.timeout(30)
def test_retire_exposed_resident_and_swapping_pages(life: Life) -> None:
    life.write(PAGE, "unique", 0, 0)
    old = life.frame(PAGE)
    life.retire(PAGE, False)  # exposed: released through a page-retire batch, then moved
    life.high_round(0, swap=0, between=None, land=False)
    assert life.state(PAGE) == "RESIDENT" and life.frame(PAGE) != old
    assert life.m.machine.allocator.frame_state[old] == FrameState.RETIRED
    life.retire(PAGE, False)  # resident: moved at once
    assert life.stats().retired_moves == 2
    life.read(PAGE, 0, False)
    life.high_round(0, **SWAP_OUT, land=False)
    assert life.state(PAGE) == "IN_FLIGHT"
    swapping = life.frame(PAGE)
    life.retire(PAGE, False)  # retired instead of freed when the write lands
    life.settle()
    assert life.state(PAGE) == "SWAPPED"
    assert life.m.machine.allocator.frame_state[swapping] == FrameState.RETIRED
    life.read(PAGE, 0, True)
