"""The platform's RoundEngine on its own: no sockets, fake services, a fake VM.

The engine only needs ``vm.region`` (a ControlRegion, here over a bytearray) and ``vm.p2m``;
the services are PlatformService subclasses whose queues the tests script. The agent's side
is played by writing statuses into the slot, exactly as a VMM would through shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from platform_daemon.faults import FaultResolver
from platform_daemon.p2m import NO_OP, P2M
from platform_daemon.rounds import RoundEngine, RoundState
from platform_daemon.services.base import PlatformService
from shared.constants import FaultReason, PageState, PageStatus, Priority, ServiceType
from shared.errors import ErrorCode, RemoteProtocolError
from shared.layout import ControlRegion, SlotState, region_size
from shared.messages import CompleteRequest, GetRequest, Request

GUEST_PAGES = 256
SLOT_COUNT = 4
CAPACITY = 8


@dataclass
class FakeVM:
    """What RoundEngine and FaultResolver.try_resolve touch of a VM."""

    region: ControlRegion
    p2m: P2M
    guest_pages: int = GUEST_PAGES
    vm_id: int = 1


def make_vm() -> FakeVM:
    buf = bytearray(region_size(SLOT_COUNT, CAPACITY))
    region = ControlRegion.initialize(
        buf,
        vm_id=1,
        generation=1,
        slot_count=SLOT_COUNT,
        capacity=CAPACITY,
        guest_pages=GUEST_PAGES,
    )
    p2m = P2M(GUEST_PAGES)
    # Every page is exposed on its own frame (frame = 1000 + bpn): a service may take any.
    p2m.state[:] = PageState.EXPOSED
    p2m.frame[:] = 1000 + np.arange(GUEST_PAGES)
    return FakeVM(region, p2m)


@dataclass
class Call:
    kind: str
    bpns: list[int]
    status: list[int] = field(default_factory=list)


class ScriptedService(PlatformService):
    """A release service whose work is a scripted queue of batches.

    ``batches`` is a list of BPN lists; each select pops one. With ``rearm`` set, the service
    queues the same amount of new work again every time it hands a batch out (a type that
    keeps re-arming itself, like migration or logging traffic).
    """

    def __init__(self, service: ServiceType, batches: list[list[int]], rearm: bool = False):
        super().__init__(None)  # type: ignore[arg-type]  # no server: the engine needs none
        self.service = service
        self.batches = [list(b) for b in batches]
        self.rearm = rearm
        self.calls: list[Call] = []
        self.selected = 0
        self._next_rearm = 200

    def has_work(self, vm: Any) -> bool:
        return bool(self.batches)

    def select(self, vm: Any, capacity: int) -> tuple[npt.NDArray[np.int64], Any]:
        if not self.batches:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        bpns = np.array(self.batches.pop(0)[:capacity], dtype=np.int64)
        self.selected += 1
        if self.rearm:
            self.batches.append([self._next_rearm])
            self._next_rearm += 1
        return bpns, vm.p2m.frame[bpns].copy()

    def complete(self, vm: Any, accepted: Any, status: npt.NDArray[np.uint8]) -> None:
        self.calls.append(Call("complete", accepted.tolist(), status.tolist()))
        assert (vm.p2m.state[accepted] == PageState.IN_FLIGHT).all()
        assert (vm.p2m.op[accepted] == self.service).all()
        # The work is done at once: the page is resident again, owned by nobody.
        vm.p2m.state[accepted] = PageState.RESIDENT
        vm.p2m.op[accepted] = NO_OP

    def on_refused(self, vm: Any, refused: Any, status: npt.NDArray[np.uint8]) -> None:
        self.calls.append(Call("refused", refused.tolist(), status.tolist()))


def engine_with(*services: ScriptedService, max_batches: int = 8) -> RoundEngine:
    return RoundEngine({s.service: s for s in services}, max_batches=max_batches)


def get(engine: RoundEngine, vm: FakeVM, state: RoundState) -> Request:
    return engine.get_request(vm, state, GetRequest(Priority.HIGH))  # type: ignore[arg-type]


def answer(
    engine: RoundEngine,
    vm: FakeVM,
    state: RoundState,
    req: Request,
    verdicts: dict[int, PageStatus] | None = None,
) -> None:
    """Play the VMM: accept every page except those in ``verdicts``, then complete."""
    slot = vm.region.slot(req.slot)
    stype, sstate, count, seq = slot.read_header()
    assert (stype, sstate, count, seq) == (req.service, SlotState.ISSUED, req.count, req.seq)
    bpns, status, _ = slot.batch(count)
    status[:] = PageStatus.OK
    for bpn, verdict in (verdicts or {}).items():
        status[np.flatnonzero(bpns == bpn)] = verdict
    engine.complete(vm, state, CompleteRequest(req.slot, req.count, req.seq))  # type: ignore[arg-type]


def run_round(engine: RoundEngine, vm: FakeVM, state: RoundState) -> list[ServiceType]:
    """One whole round, every page accepted; the types of its batches in order."""
    served = []
    while (req := get(engine, vm, state)).has_work:
        served.append(ServiceType(req.service))
        answer(engine, vm, state, req)
    return served


@pytest.mark.timeout(10)
def test_types_pending_after_the_snapshot_wait_for_the_next_round() -> None:
    """The pending word is snapshotted at the first GetRequest of a round: a type whose work
    arrives during the round is not served in it, but first thing in the next round."""
    vm = make_vm()
    swap = ScriptedService(ServiceType.SWAP, [[1, 2], [3, 4], [5, 6]])
    p2m_update = ScriptedService(ServiceType.P2M_UPDATE, [])
    engine, state = engine_with(swap, p2m_update), RoundState()

    first = get(engine, vm, state)
    assert first.service == ServiceType.SWAP and first.has_work
    assert vm.region.pending == ServiceType.SWAP.bit
    # Work for p2mUpdate shows up in the middle of the round (higher priority than swap).
    p2m_update.batches = [[100, 101], [102]]
    answer(engine, vm, state, first)
    rest = run_round(engine, vm, state)
    assert rest == [ServiceType.SWAP, ServiceType.SWAP]
    assert p2m_update.selected == 0, "deferred work was served in the round it arrived in"
    # The round's end refreshes the pending word: the deferred type is announced...
    assert vm.region.pending == ServiceType.P2M_UPDATE.bit
    # ...and served by the next round.
    assert run_round(engine, vm, state) == [ServiceType.P2M_UPDATE, ServiceType.P2M_UPDATE]
    assert vm.region.pending == 0
    assert state.rounds == 2
    assert [c.bpns for c in p2m_update.calls] == [[100, 101], [102]]


@pytest.mark.timeout(10)
def test_a_type_that_keeps_rearming_cannot_starve_the_others() -> None:
    """Types take turns, one batch each; a type that re-arms itself after every batch is cut
    off at ``max_batches`` so the round ends, and the others are served within the round."""
    vm = make_vm()
    hog = ScriptedService(ServiceType.SWAP, [[1]], rearm=True)
    retire = ScriptedService(ServiceType.PAGE_RETIRE, [[10], [11], [12]])
    p2m_update = ScriptedService(ServiceType.P2M_UPDATE, [[20], [21]])
    engine, state = engine_with(hog, retire, p2m_update, max_batches=5), RoundState()

    served = run_round(engine, vm, state)
    assert served.count(ServiceType.SWAP) == 5  # cut off at max_batches, though it has work
    assert served.count(ServiceType.PAGE_RETIRE) == 3
    assert served.count(ServiceType.P2M_UPDATE) == 2
    # Turn-taking: the first three batches are one of each type, and no type is served
    # twice in a row while another still has work in this round.
    assert set(served[:3]) == {ServiceType.SWAP, ServiceType.PAGE_RETIRE, ServiceType.P2M_UPDATE}
    others_done = max(i for i, s in enumerate(served) if s != ServiceType.SWAP)
    for i in range(1, others_done + 1):
        assert not (served[i] == served[i - 1] == ServiceType.SWAP), served
    assert len(served) == 10
    assert not state.open
    # The hog still has work: it is pending again and gets the next round.
    assert hog.has_work(vm) and vm.region.pending & ServiceType.SWAP.bit
    assert run_round(engine, vm, state) == [ServiceType.SWAP] * 5


@pytest.mark.timeout(10)
def test_round_ends_when_no_slot_is_free_and_low_priority_gets_nothing() -> None:
    """A VMM holding every slot gets "round over" (NO_SLOT) instead of a batch; a
    low-priority GetRequest gets no work in this version."""
    vm = make_vm()
    swap = ScriptedService(ServiceType.SWAP, [[i] for i in range(10)])
    engine, state = engine_with(swap), RoundState()
    reqs = [get(engine, vm, state) for _ in range(SLOT_COUNT)]
    assert sorted(r.slot for r in reqs) == list(range(SLOT_COUNT))
    assert not get(engine, vm, state).has_work
    for r in reqs:
        answer(engine, vm, state, r)
    low = engine.get_request(vm, state, GetRequest(Priority.LOW, 1000))  # type: ignore[arg-type]
    assert not low.has_work


def _issue_one(bpns: list[int]) -> tuple[FakeVM, RoundEngine, RoundState, ScriptedService, Request]:
    vm = make_vm()
    swap = ScriptedService(ServiceType.SWAP, [bpns])
    engine, state = engine_with(swap), RoundState()
    req = get(engine, vm, state)
    assert req.has_work and req.count == len(bpns)
    return vm, engine, state, swap, req


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("slot_not_issued", ErrorCode.SLOT_NOT_ISSUED),
        ("wrong_seq", ErrorCode.SLOT_NOT_ISSUED),
        ("wrong_count", ErrorCode.SLOT_NOT_ISSUED),
        ("twice", ErrorCode.SLOT_NOT_ISSUED),
        ("tampered_bpn", ErrorCode.BAD_BODY),
        ("corrupt_status", ErrorCode.BAD_BODY),
    ],
)
def test_bad_complete_request_is_a_protocol_error(change: str, code: ErrorCode) -> None:
    """CompleteRequest must name an issued slot with its seq and count, and the VMM may only
    write statuses: anything else is a RemoteProtocolError with the matching code, and no
    page of the batch is handed to the service."""
    vm, engine, state, swap, req = _issue_one([5, 6, 7])
    slot = vm.region.slot(req.slot)
    msg = CompleteRequest(req.slot, req.count, req.seq)
    if change == "slot_not_issued":
        msg = CompleteRequest((req.slot + 1) % SLOT_COUNT, req.count, req.seq)
    elif change == "wrong_seq":
        msg = CompleteRequest(req.slot, req.count, req.seq + 1)
    elif change == "wrong_count":
        msg = CompleteRequest(req.slot, req.count - 1, req.seq)
    elif change == "twice":
        engine.complete(vm, state, msg)  # type: ignore[arg-type]
        swap.calls.clear()
    elif change == "tampered_bpn":
        slot.bpn[1] = 200  # a page the daemon did not offer
    elif change == "corrupt_status":
        slot.status[0] = 250
    with pytest.raises(RemoteProtocolError) as info:
        engine.complete(vm, state, msg)  # type: ignore[arg-type]
    assert info.value.code == code
    assert swap.calls == []
    if change != "twice":
        assert (vm.p2m.state[[5, 6, 7]] == PageState.SELECTED).all()
    assert vm.p2m.state[200] == PageState.EXPOSED


@pytest.mark.timeout(10)
def test_refused_pages_go_back_to_exposed() -> None:
    """Pages the VMM refuses (any status but OK) are EXPOSED again and reported to the
    service's on_refused with their statuses; only the accepted ones reach complete()."""
    vm, engine, state, swap, req = _issue_one([10, 11, 12, 13, 14])
    assert (vm.p2m.state[[10, 11, 12, 13, 14]] == PageState.SELECTED).all()
    answer(
        engine,
        vm,
        state,
        req,
        {11: PageStatus.BUSY, 13: PageStatus.REFERENCED, 14: PageStatus.STALE_FRAME},
    )
    assert swap.calls[0] == Call(
        "refused",
        [11, 13, 14],
        [PageStatus.BUSY, PageStatus.REFERENCED, PageStatus.STALE_FRAME],
    )
    assert swap.calls[1] == Call("complete", [10, 12], [PageStatus.OK, PageStatus.OK])
    assert (vm.p2m.state[[11, 13, 14]] == PageState.EXPOSED).all()
    assert (vm.p2m.op[[11, 13, 14]] == NO_OP).all()
    assert (vm.p2m.state[[10, 12]] == PageState.RESIDENT).all()
    # The slot is free again and carries the final statuses.
    stype, sstate, count, _ = vm.region.slot(req.slot).read_header()
    assert (stype, sstate, count) == (ServiceType.SWAP, SlotState.FREE, 5)
    assert vm.region.slot(req.slot).status[:5].tolist() == [
        PageStatus.OK,
        PageStatus.BUSY,
        PageStatus.OK,
        PageStatus.REFERENCED,
        PageStatus.STALE_FRAME,
    ]
    assert state.issued == {}


@pytest.mark.timeout(10)
def test_a_page_the_vmm_does_not_map_becomes_the_platforms() -> None:
    """The VMM refuses a page as NOT_EXPOSED: it maps it no more (a takeover after a crash
    that cut its release short leaves such pages EXPOSED in the p2m). The page becomes
    RESIDENT, which the platform reclaims on its own (swap takes RESIDENT pages without
    asking the VMM), instead of EXPOSED, which would be offered and refused for ever."""
    vm, engine, state, swap, req = _issue_one([50, 51, 52])
    answer(engine, vm, state, req, {51: PageStatus.NOT_EXPOSED, 52: PageStatus.BUSY})
    assert vm.p2m.state[[51, 52]].tolist() == [PageState.RESIDENT, PageState.EXPOSED]
    assert swap.calls[0] == Call("refused", [51, 52], [PageStatus.NOT_EXPOSED, PageStatus.BUSY])
    assert vm.p2m.frame[51] == 1051  # the frame stays with the page: nothing lost


@pytest.mark.timeout(10)
def test_page_that_faulted_while_selected_is_not_handed_to_the_service() -> None:
    """A fault on a SELECTED page keeps it exposed (the VMM still maps it); even if the VMM
    then says OK for it, completion reports NOT_EXPOSED and the service's complete() never
    gets it: it is reported to on_refused (so per-page bookkeeping can be dropped)."""
    vm, engine, state, swap, req = _issue_one([30, 31, 32])
    faults = FaultResolver(None, None, max_around=0)  # type: ignore[arg-type]  # no frame needed
    reply = faults.try_resolve(vm, 31, False, 0)  # type: ignore[arg-type]
    assert reply.reason == FaultReason.MAPPED
    assert reply.bpns.tolist() == [31] and reply.mpns.tolist() == [1031]
    assert vm.p2m.state[31] == PageState.EXPOSED

    answer(engine, vm, state, req)  # the VMM accepts all three
    assert swap.calls == [
        Call("refused", [31], [PageStatus.NOT_EXPOSED]),
        Call("complete", [30, 32], [PageStatus.OK, PageStatus.OK]),
    ]
    assert vm.p2m.state[31] == PageState.EXPOSED
    assert vm.p2m.op[31] == NO_OP
    assert vm.region.slot(req.slot).status[:3].tolist() == [
        PageStatus.OK,
        PageStatus.NOT_EXPOSED,
        PageStatus.OK,
    ]


@pytest.mark.timeout(10)
def test_batch_done_hook_sees_final_statuses() -> None:
    """The per-batch hook (metrics in the daemon) gets the service, a duration and the final
    status of every page, including the platform's NOT_EXPOSED for a page that faulted."""
    vm, engine, state, _swap, req = _issue_one([40, 41])
    seen: list[tuple[ServiceType, float, list[int]]] = []
    engine.on_batch_done = lambda service, seconds, status: seen.append(
        (service, seconds, status.tolist())
    )
    vm.p2m.state[41] = PageState.EXPOSED  # faulted meanwhile
    answer(engine, vm, state, req)
    assert len(seen) == 1
    service, seconds, status = seen[0]
    assert service == ServiceType.SWAP and seconds >= 0
    assert status == [PageStatus.OK, PageStatus.NOT_EXPOSED]
