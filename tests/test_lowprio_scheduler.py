"""The low-priority scheduler and the engine's low-priority rounds, on a virtual clock.

``LowPriorityScheduler`` is pure: every method takes ``now``. The engine's low-priority path
(``RoundEngine._get_low``) takes its clock as an argument, so here time is a counter the
test advances, and the services are scripted ``LowPriorityService`` subclasses whose work
and cost the test controls. No socket, no server, no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from platform_daemon.lowprio import (
    OUTLIER_FACTOR,
    STRAWMAN_CLASSES,
    Choice,
    CostModel,
    LowPriorityScheduler,
    RoundEnd,
    VMSchedule,
)
from platform_daemon.p2m import P2M
from platform_daemon.rounds import LowRoundClosed, RoundEngine, RoundState
from platform_daemon.services.base import LowPriorityService, PlatformService, Selection
from shared.constants import PageState, PageStatus, Priority, ServiceType
from shared.layout import ControlRegion, SlotState, region_size
from shared.messages import GET_FLAG_NEW_ROUND, CompleteRequest, GetRequest, Request

S = ServiceType
GUEST_PAGES = 4096
CAPACITY = 64


class Clock:
    """Virtual time: it moves only when the test (or a scripted service) says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---- the scheduler alone ---------------------------------------------------------------------


def cost(per_unit: float, fixed: float) -> CostModel:
    """A cost model that already learned ``per_unit`` and ``fixed``."""
    model = CostModel(per_unit=per_unit, fixed=fixed, samples=1)
    model._sums = [1.0, 1.0, 1.0, fixed + per_unit, fixed + per_unit]  # one sample on the line
    return model


def sched_with_costs(
    per_unit: float = 1e-6, fixed: float = 1e-4
) -> tuple[LowPriorityScheduler, VMSchedule]:
    sched, vm = LowPriorityScheduler(aging_seconds=1.0), VMSchedule()
    for service in STRAWMAN_CLASSES:
        vm.costs[service] = cost(per_unit, fixed)
    return sched, vm


@pytest.mark.timeout(10)
def test_strawman_order_sampling_first_promotion_last() -> None:
    """With every type pending and nothing waited for, the order is the talk's strawman:
    sampling > {migration, defrag, sharing} > validation > 2M promotion."""
    sched, vm = sched_with_costs()
    now = 0.0
    sched.open_round(vm, now, list(STRAWMAN_CLASSES))
    order = sched.order(vm, now, {s: 10 for s in STRAWMAN_CLASSES})
    assert order[0] == S.SAMPLING
    assert set(order[1:4]) == {S.NUMA_MIGRATION, S.DEFRAG_2M, S.PAGE_SHARING}
    assert order[4:] == [S.VALIDATION, S.PROMOTION_2M]


@pytest.mark.timeout(10)
def test_batch_is_sized_to_fit_the_time_left() -> None:
    """The batch is the largest whose estimated cost (fixed + units x per unit) fits the
    time left; when not even one unit fits, the round is over because of the bound."""
    sched, vm = sched_with_costs(per_unit=10e-6, fixed=100e-6)
    sched.open_round(vm, 0.0, [S.PAGE_SHARING])
    work = {S.PAGE_SHARING: 10_000}
    choice = sched.choose(vm, 0.0, 1e-3, work)  # 1 ms: (1000 - 100) / 10 = 90 units
    assert choice == Choice(S.PAGE_SHARING, 90)
    assert vm.cost(S.PAGE_SHARING).estimate(90) <= 1e-3
    assert vm.cost(S.PAGE_SHARING).estimate(91) > 1e-3
    # Less work than fits: all of it.
    assert sched.choose(vm, 0.0, 1e-3, {S.PAGE_SHARING: 7}) == Choice(S.PAGE_SHARING, 7)
    # Not even one unit after the fixed cost.
    assert sched.choose(vm, 0.0, 105e-6, work) is RoundEnd.BOUND
    assert sched.choose(vm, 0.0, 1e-3, {S.PAGE_SHARING: 0}) is RoundEnd.DONE


@pytest.mark.timeout(10)
def test_a_type_that_does_not_fit_gives_way_to_one_that_does() -> None:
    """When the best type's smallest batch does not fit but a cheaper type's does, the cheaper
    one goes (the bound is filled, nothing is wasted); the skipped one keeps waiting."""
    sched, vm = sched_with_costs()
    vm.costs[S.SAMPLING] = cost(per_unit=1e-3, fixed=1e-4)  # expensive
    sched.open_round(vm, 0.0, [S.SAMPLING, S.PAGE_SHARING])
    choice = sched.choose(vm, 0.0, 5e-4, {S.SAMPLING: 5, S.PAGE_SHARING: 5})
    assert choice == Choice(S.PAGE_SHARING, 5)


@pytest.mark.timeout(10)
def test_aging_lifts_a_waiting_type_so_nothing_starves() -> None:
    """2M promotion (class 3) waits while page sharing (class 1) always has work; after it has
    waited ``aging_seconds`` per class step it is chosen, and once served it waits anew."""
    sched, vm = sched_with_costs()
    pending = [S.PAGE_SHARING, S.PROMOTION_2M]
    work = {S.PAGE_SHARING: 100, S.PROMOTION_2M: 100}
    now, served = 0.0, []
    for _ in range(60):  # 60 rounds, 0.1 s apart
        sched.open_round(vm, now, pending)
        choice = sched.choose(vm, now, 1.0, work)
        assert isinstance(choice, Choice)
        served.append((now, choice.service))
        sched.served(vm, choice.service, choice.units, now)
        sched.close_round(vm, RoundEnd.BOUND, work)
        now += 0.1
    promoted = [t for t, s in served if s == S.PROMOTION_2M]
    assert promoted, "promotion starved"
    # Two class steps behind sharing: it needs a little over 2 s of waiting.
    assert 2.0 <= promoted[0] <= 2.2
    # After being served it waits again: not served two rounds in a row forever.
    assert len(promoted) < len(served) / 2
    gaps = np.diff(promoted)
    assert (gaps >= 2.0 - 1e-9).all()


@pytest.mark.timeout(10)
def test_cost_model_fits_fixed_and_per_unit_work() -> None:
    """Batches of different sizes give a line through their work: a fixed part and a part per
    unit, so small batches do not inflate the per-unit cost; recent batches weigh more."""
    model = CostModel()
    for n in (10, 100, 500, 50, 300):
        model.record(n, 80e-6 + n * 3e-6)
    assert model.per_unit == pytest.approx(3e-6)
    assert model.fixed == pytest.approx(80e-6)
    assert model.estimate(200) == pytest.approx(80e-6 + 600e-6)
    # The work got dearer: the line follows it.
    for n in (10, 100, 500, 50, 300) * 6:
        model.record(n, 80e-6 + n * 6e-6)
    assert model.per_unit == pytest.approx(6e-6, rel=0.01)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "samples",
    [
        [(100, 40e-6)] * 5,  # one size only
        [(10, 300e-6), (500, 200e-6)],  # noise: the bigger batch was cheaper
    ],
    ids=["one_size", "falling"],
)
def test_cost_model_never_collapses(samples: list[tuple[int, float]]) -> None:
    """Without batches of different sizes on a rising line, all of the cost is taken per
    unit: a fit that could not say what a batch costs must not promise millions of units for
    free (per unit never near zero, never a batch bigger than the work seen allows)."""
    model = CostModel()
    for n, seconds in samples:
        model.record(n, seconds)
    total = sum(t for _, t in samples)
    units = sum(n for n, _ in samples)
    assert model.fixed == 0.0
    assert model.per_unit == pytest.approx(total / units, rel=0.3)
    assert model.units_within(8e-3) < 8e-3 / (0.5 * total / units)
    model.record(0, 1.0)  # no unit, no information
    assert model.fixed == 0.0 and model.per_unit < 1.0


@pytest.mark.timeout(10)
def test_one_slow_batch_cannot_price_a_type_out_for_good() -> None:
    """A batch held up once (a pause) counts for at most a few times the estimate; and a type
    whose estimate fits nothing still gets a one-unit probe after waiting several aging
    periods, so a stale estimate is measured again instead of starving the type."""
    model = CostModel()
    for _ in range(5):
        model.record(100, 200e-6)
    model.record(100, 50e-3)  # 250 times the usual
    assert model.estimate(100) < 5 * 200e-6
    sched, vm = sched_with_costs()
    vm.costs[S.PAGE_SHARING] = cost(per_unit=10e-3, fixed=0.0)  # priced out of a 1 ms bound
    sched.open_round(vm, 0.0, [S.PAGE_SHARING])
    work = {S.PAGE_SHARING: 100}
    assert sched.choose(vm, 1.0, 1e-3, work) is RoundEnd.BOUND  # waited 1 s: no probe yet
    assert sched.choose(vm, 4.0, 1e-3, work) == Choice(S.PAGE_SHARING, 1)
    assert sched.choose(vm, 4.0, 0.0, work) is RoundEnd.BOUND  # no time at all: no probe


@pytest.mark.timeout(10)
def test_a_slow_first_batch_does_not_price_its_type_out() -> None:
    """The first batch of a type counts for at most OUTLIER_FACTOR times the guess (one
    promotion batch measured 75 ms of wall time on a busy host for ~1 ms of work, and the
    type then waited seconds between probes); a type that really costs more is learned
    within a few batches, OUTLIER_FACTOR at a time."""
    sched, vm = LowPriorityScheduler(aging_seconds=1.0), VMSchedule()
    guess = vm.cost(S.PROMOTION_2M).estimate(1)  # the daemon's guess for one region
    sched.record(vm, S.PROMOTION_2M, 1, 75e-3, None)
    model = vm.cost(S.PROMOTION_2M)
    assert model.estimate(1) == pytest.approx(OUTLIER_FACTOR * guess)
    assert model.estimate(1) < 8e-3  # still fits a default bound
    for _ in range(15):  # it really costs 75 ms: learned (x4 a batch, then the average)
        sched.record(vm, S.PROMOTION_2M, 1, 75e-3, None)
    assert model.estimate(1) == pytest.approx(75e-3, rel=0.05)


@pytest.mark.timeout(10)
def test_exchange_is_learned_after_the_first_batch_only() -> None:
    """The VM's exchange (a message's way between the processes) is a moving average of what
    later batches measured; a round's first batch, asked for ahead, does not measure it."""
    sched, vm = sched_with_costs()
    sched.record(vm, S.PAGE_SHARING, 10, 10e-6, 400e-6)  # the first replaces the guess
    assert vm.exchange == pytest.approx(400e-6)
    sched.record(vm, S.PAGE_SHARING, 10, 10e-6, None)  # a first batch
    assert vm.exchange == pytest.approx(400e-6) and vm.exchange_samples == 1
    sched.record(vm, S.SAMPLING, 10, 10e-6, 800e-6)  # any type: the way is the VM's
    assert vm.exchange == pytest.approx(400e-6 + 0.25 * 400e-6)


@pytest.mark.timeout(10)
def test_work_left_when_the_bound_ends_the_round_is_deferred() -> None:
    """Closing a round because of the bound counts each type's remaining work as deferred;
    a round that ended with no work left defers nothing and ends the types' wait."""
    sched, vm = sched_with_costs()
    sched.open_round(vm, 0.0, [S.SAMPLING, S.PAGE_SHARING])
    deferred = sched.close_round(vm, RoundEnd.BOUND, {S.SAMPLING: 0, S.PAGE_SHARING: 300})
    assert deferred == {S.PAGE_SHARING: 300}
    assert vm.types[S.PAGE_SHARING].deferred == 300
    assert vm.types[S.SAMPLING].waiting_since is None
    assert vm.types[S.PAGE_SHARING].waiting_since == 0.0
    sched.open_round(vm, 1.0, [S.PAGE_SHARING])
    assert sched.close_round(vm, RoundEnd.DONE, {S.PAGE_SHARING: 0}) == {}
    assert vm.rounds == {RoundEnd.BOUND: 1, RoundEnd.DONE: 1}


# ---- the engine's low-priority rounds ------------------------------------------------------


@dataclass
class FakeVM:
    region: ControlRegion
    p2m: P2M
    guest_pages: int = GUEST_PAGES
    vm_id: int = 1


def make_vm() -> FakeVM:
    buf = bytearray(region_size(4, CAPACITY))
    region = ControlRegion.initialize(
        buf, vm_id=1, generation=1, slot_count=4, capacity=CAPACITY, guest_pages=GUEST_PAGES
    )
    p2m = P2M(GUEST_PAGES)
    p2m.state[:] = PageState.EXPOSED
    p2m.frame[:] = 5000 + np.arange(GUEST_PAGES)
    return FakeVM(region, p2m)


class ScriptedLow(LowPriorityService):
    """A low-priority service with ``work`` units waiting; each unit costs ``unit_seconds`` of
    the engine's (virtual) clock when selected; ``scan_only`` selects without a batch."""

    def __init__(self, service: ServiceType, clock: Clock, work: int, unit_seconds: float):
        self.ctx = type("Ctx", (), {"clock": clock})()  # only the clock is used
        self.service = service
        self.clock = clock
        self.work = work
        self.unit_seconds = unit_seconds
        self.stale_batches = 0  # selections whose candidates were all stale
        self.next_bpn = 0
        self.selected: list[int] = []
        self.completed: list[list[int]] = []

    def pending_work(self, vm: Any, now: float) -> int:
        return self.work

    def select_work(self, vm: Any, capacity: int, units: int, now: float) -> Selection:
        n = min(capacity, units, self.work)
        self.clock.advance(n * self.unit_seconds)
        self.work -= n
        self.selected.append(n)
        if self.stale_batches:
            self.stale_batches -= 1
            return Selection.empty(n)
        bpns = np.arange(self.next_bpn, self.next_bpn + n, dtype=np.int64)
        self.next_bpn += n
        return Selection(bpns, vm.p2m.frame[bpns].copy(), n)

    def complete(self, vm: Any, accepted: Any, status: npt.NDArray[np.uint8]) -> None:
        self.completed.append(accepted.tolist())
        vm.p2m.state[accepted] = PageState.RESIDENT


class ScriptedHigh(PlatformService):
    service = S.SWAP

    def __init__(self) -> None:
        self.busy = False

    def has_work(self, vm: Any) -> bool:
        return self.busy

    def select(self, vm: Any, capacity: int) -> Any:
        return np.empty(0, np.int64), np.empty(0, np.int64)

    def complete(self, vm: Any, accepted: Any, status: Any) -> None:  # pragma: no cover
        raise AssertionError("not used")


@dataclass
class Harness:
    clock: Clock
    vm: FakeVM
    engine: RoundEngine
    state: RoundState
    services: dict[ServiceType, PlatformService]
    closed: list[LowRoundClosed] = field(default_factory=list)

    def get(self, budget_us: int, new_round: bool = False) -> Request:
        msg = GetRequest(Priority.LOW, budget_us, GET_FLAG_NEW_ROUND if new_round else 0)
        return self.engine.get_request(self.vm, self.state, msg)  # type: ignore[arg-type]

    def complete(self, req: Request, agent_seconds: float = 0.0) -> None:
        slot = self.vm.region.slot(req.slot)
        assert slot.read_header()[1] == SlotState.ISSUED
        _, status, _ = slot.batch(req.count)
        status[:] = PageStatus.OK
        self.clock.advance(agent_seconds)
        msg = CompleteRequest(req.slot, req.count, req.seq, int(agent_seconds * 1e6))
        self.engine.complete(self.vm, self.state, msg)  # type: ignore[arg-type]


def harness(*specs: tuple[ServiceType, int, float]) -> Harness:
    clock = Clock()
    services: dict[ServiceType, PlatformService] = {
        s: ScriptedLow(s, clock, work, unit) for s, work, unit in specs
    }
    services[S.SWAP] = ScriptedHigh()
    engine = RoundEngine(services, clock=clock, scheduler=LowPriorityScheduler())
    h = Harness(clock, make_vm(), engine, RoundState(), services)
    engine.on_low_round_closed = lambda vm, closed: h.closed.append(closed)
    for service in services:
        if service != S.SWAP:
            h.state.low.costs[service] = cost(per_unit=10e-6, fixed=50e-6)
    h.state.low.exchange = 25e-6
    engine.refresh_pending(h.vm)  # type: ignore[arg-type]
    return h


@pytest.mark.timeout(10)
def test_low_round_serves_by_class_within_the_budget() -> None:
    """Each GetRequest(LOW) gets a batch sized to the time it carries, sampling first; the
    daemon never hands out a batch whose estimate exceeds the time left."""
    h = harness((S.SAMPLING, 20, 10e-6), (S.PAGE_SHARING, 1000, 10e-6))
    first = h.get(2000, new_round=True)  # 2 ms
    assert first.service == S.SAMPLING and first.count == 20
    h.complete(first)
    # A later request: its way here and its batch's way back (25 µs each) come off the
    # 700 µs it carries; 650 µs for the work: (650 - 50) / 10 = 60 pages.
    req = h.get(700)
    assert req.service == S.PAGE_SHARING and req.count == 60
    assert h.state.low.cost(S.PAGE_SHARING).estimate(req.count) + 2 * 25e-6 <= 700e-6 + 1e-12


@pytest.mark.timeout(10)
def test_type_pending_after_the_snapshot_waits_for_the_next_round() -> None:
    """The pending word is snapshotted when a low round opens: sampling work that appears
    during the round is not served in it, but first in the next one."""
    h = harness((S.SAMPLING, 0, 10e-6), (S.PAGE_SHARING, 1000, 10e-6))
    sharing, sampling = h.services[S.PAGE_SHARING], h.services[S.SAMPLING]
    assert isinstance(sampling, ScriptedLow) and isinstance(sharing, ScriptedLow)
    req = h.get(50_000, new_round=True)
    assert req.service == S.PAGE_SHARING
    sampling.work = 30  # a new sample is due, mid-round
    h.complete(req)
    req = h.get(40_000)
    assert req.service == S.PAGE_SHARING, "work pending after the snapshot was served"
    h.complete(req)
    req = h.get(30_000, new_round=True)
    assert req.service == S.SAMPLING


@pytest.mark.timeout(10)
def test_high_priority_pending_preempts_a_low_round() -> None:
    """A low GetRequest while a high-priority type has work ends the low round at once
    (PREEMPTED), whatever the budget; the next round, once high is quiet, goes on."""
    h = harness((S.PAGE_SHARING, 1000, 10e-6))
    high = h.services[S.SWAP]
    assert isinstance(high, ScriptedHigh)
    req = h.get(50_000, new_round=True)
    assert req.has_work
    h.complete(req)
    high.busy = True
    req = h.get(40_000)
    assert not req.has_work
    assert h.closed[-1].end is RoundEnd.PREEMPTED
    assert not h.get(40_000, new_round=True).has_work  # still pending: still pre-empted
    high.busy = False
    assert h.get(40_000, new_round=True).has_work


@pytest.mark.timeout(10)
def test_high_work_a_high_round_could_not_finish_does_not_starve_low() -> None:
    """Pre-emption is for high-priority work no high round has been offered yet. Once a high
    round closed with the work still pending (it could not make progress: every page refused,
    a target out of reach), low rounds go on; a new high-priority type pre-empts again."""
    h = harness((S.PAGE_SHARING, 1000, 10e-6))
    high = h.services[S.SWAP]
    assert isinstance(high, ScriptedHigh)
    high.busy = True  # swap has work it will never select
    assert not h.get(40_000, new_round=True).has_work
    assert h.closed[-1].end is RoundEnd.PREEMPTED
    end = h.engine.get_request(h.vm, h.state, GetRequest(Priority.HIGH))  # type: ignore[arg-type]
    assert not end.has_work and h.state.high_attended == S.SWAP.bit
    req = h.get(40_000, new_round=True)
    assert req.has_work, "low-priority work starved behind high work that cannot progress"
    h.complete(req)
    retire = ScriptedHigh()
    retire.service = S.PAGE_RETIRE
    retire.busy = True
    h.engine.services[S.PAGE_RETIRE] = retire
    assert not h.get(40_000, new_round=True).has_work


@pytest.mark.timeout(10)
def test_last_batch_is_flagged_and_closes_the_round() -> None:
    """When nothing could follow a batch in the time left (or no work is left), the Request
    says LAST and the daemon has closed the round: no further GetRequest is needed."""
    h = harness((S.PAGE_SHARING, 10, 10e-6))
    req = h.get(50_000, new_round=True)
    assert req.has_work and req.count == 10 and req.last
    assert h.closed[-1].end is RoundEnd.DONE
    h.complete(req)
    # A first batch of 64 (the slot's capacity) costs 50 + 640 µs of 760; a later batch would
    # need its two ways (50 µs) and at least 60 µs of work: it does not fit.
    h2 = harness((S.PAGE_SHARING, 10_000, 10e-6))
    req = h2.get(760, new_round=True)
    assert req.count == 64 and req.last and h2.closed[-1].end is RoundEnd.BOUND
    assert h2.closed[-1].deferred == {S.PAGE_SHARING: 10_000 - req.count}
    h3 = harness((S.PAGE_SHARING, 10_000, 10e-6))
    assert not h3.get(860, new_round=True).last  # 860 µs: one more page would fit


@pytest.mark.timeout(10)
def test_stale_candidates_are_skipped_within_the_same_request() -> None:
    """A selection whose every candidate was stale (the guest changed or released the pages
    since they were queued) hands out nothing; the engine takes the next ones within the same
    GetRequest, so the agent pays no round trip for them. When nothing is left, the answer
    says "round over" with the daemon's own time on the request in ``count`` (µs)."""
    h = harness((S.PAGE_SHARING, 200, 10e-6))
    sharing = h.services[S.PAGE_SHARING]
    assert isinstance(sharing, ScriptedLow)
    sharing.stale_batches = 2
    req = h.get(50_000, new_round=True)
    assert req.has_work and req.count == CAPACITY and req.seq == 1
    assert sharing.selected == [CAPACITY] * 3
    h.complete(req)
    sharing.work, sharing.stale_batches = 10, 1
    start = h.clock.now
    end = h.get(50_000, new_round=True)
    assert not end.has_work and h.closed[-1].end is RoundEnd.DONE
    assert end.count == round((h.clock.now - start) * 1e6) == 100


@pytest.mark.timeout(10)
def test_new_round_closes_a_round_the_agent_left() -> None:
    """A GetRequest flagged NEW_ROUND while the daemon's low round is still open (the agent
    ended it itself) closes that one as LEFT and opens a fresh snapshot."""
    h = harness((S.PAGE_SHARING, 100_000, 10e-6))
    req = h.get(5000, new_round=True)
    assert req.has_work and not req.last
    h.complete(req)
    h.get(5000, new_round=True)
    assert RoundEnd.LEFT in [c.end for c in h.closed]


@pytest.mark.timeout(10)
def test_completed_low_batch_feeds_the_cost_model() -> None:
    """Completing a low batch records its work (the daemon's select and completion plus the
    agent's elapsed time) in the type's cost and, for a batch after the round's first, half
    its round trip as the VM's exchange; the first batch was asked for while the guest ran:
    no exchange is measured from it."""
    h = harness((S.PAGE_SHARING, 128, 20e-6))
    # An estimate within OUTLIER_FACTOR of the work: what is recorded is the work itself.
    h.state.low.costs[S.PAGE_SHARING] = CostModel(per_unit=10e-6, fixed=0.0, samples=1)
    h.state.low.exchange = 1e-6
    work = 64 * 20e-6 + 64e-6  # selecting 64 pages, then the agent's 64 µs
    first = h.get(50_000, new_round=True)
    assert first.count == 64 and not first.last
    h.clock.advance(5e-3)  # the guest ran meanwhile: not an exchange
    h.complete(first, agent_seconds=64e-6)
    model = h.state.low.cost(S.PAGE_SHARING)
    assert h.state.low.exchange == pytest.approx(1e-6) and h.state.low.exchange_samples == 0
    assert model.estimate(64) == pytest.approx(work)
    second = h.get(40_000)
    h.clock.advance(300e-6)  # Request on its way, the agent waking up
    h.complete(second, agent_seconds=64e-6)
    assert h.state.low.exchange == pytest.approx(150e-6) and h.state.low.exchange_samples == 1
    assert model.estimate(64) == pytest.approx(work)


@pytest.mark.timeout(10)
def test_served_types_wait_anew_through_the_engine() -> None:
    """Each batch the engine hands out restarts its type's wait (what aging measures) and
    adds to its served pages; a type with nothing left stops waiting when the round closes."""
    h = harness((S.SAMPLING, 10, 1e-6), (S.PAGE_SHARING, 100, 1e-6))
    h.clock.advance(5.0)
    req = h.get(50_000, new_round=True)
    types = h.state.low.types
    assert req.service == S.SAMPLING
    assert types[S.SAMPLING].served_pages == 10
    assert types[S.SAMPLING].waiting_since == pytest.approx(h.clock.now, abs=1e-3)
    h.complete(req)
    req = h.get(40_000)
    assert req.service == S.PAGE_SHARING and types[S.PAGE_SHARING].served_pages == 64
    h.complete(req)
    h.get(40_000)  # the rest, then nothing: closed
    h.get(40_000)
    assert types[S.SAMPLING].waiting_since is None


@pytest.mark.timeout(10)
def test_sampling_batches_do_not_take_pages_from_the_vmm() -> None:
    """A service with takes_pages False (sampling) hands out pages without marking them
    SELECTED, and its completion leaves the p2m as it was."""
    h = harness((S.SAMPLING, 8, 1e-6))
    sampling = h.services[S.SAMPLING]
    assert isinstance(sampling, ScriptedLow)
    sampling.takes_pages = False
    sampling.complete = lambda vm, accepted, status: None  # type: ignore[method-assign]
    req = h.get(50_000, new_round=True)
    assert req.count == 8
    assert (h.vm.p2m.state[:8] == PageState.EXPOSED).all()
    h.complete(req)
    assert (h.vm.p2m.state[:8] == PageState.EXPOSED).all()


@pytest.mark.timeout(10)
def test_a_type_never_measured_is_guessed_per_page_and_given_half_the_time() -> None:
    """A type whose cost is still a guess is guessed per page (2M promotion's unit is a
    2 MiB region: 512 pages' guess) and sized against half of the time left; once a batch
    measured it, against all of it."""
    sched, vm = LowPriorityScheduler(), VMSchedule()
    sched.open_round(vm, 0.0, [S.PROMOTION_2M])
    work = {S.PROMOTION_2M: 50}
    # Guess: 100 µs fixed + 512 x 2 µs a region; half of 8 ms: (4000 - 100) / 1024 = 3.
    assert sched.choose(vm, 0.0, 8e-3, work) == Choice(S.PROMOTION_2M, 3)
    sched.record(vm, S.PROMOTION_2M, 3, 3e-3, None)  # three regions took 3 ms
    assert sched.choose(vm, 0.0, 8e-3, work) == Choice(S.PROMOTION_2M, 8)


@pytest.mark.timeout(10)
def test_an_unmeasured_type_through_the_engine_gets_half_the_time() -> None:
    """Through the engine: a round's first batch of a type with no measured cost is sized
    against half the time the GetRequest carries."""
    h = harness((S.PAGE_SHARING, 100, 1e-6))
    del h.state.low.costs[S.PAGE_SHARING]
    req = h.get(300, new_round=True)  # (150 - 100 fixed) / 2 µs a page, not (300 - 100) / 2
    assert req.service == S.PAGE_SHARING and req.count == 25


@pytest.mark.timeout(10)
def test_a_probe_opens_a_round_and_never_ends_one() -> None:
    """A type priced out of every batch is probed with one unit after waiting several aging
    periods, but only as a round's first batch (the whole bound ahead): after another type's
    batch the round ends (flagged LAST) rather than start a unit the estimate says does not
    fit the time left."""
    h = harness((S.SAMPLING, 1, 1e-6), (S.PROMOTION_2M, 10, 1e-6))
    h.state.low.costs[S.PROMOTION_2M] = cost(per_unit=10e-3, fixed=0.0)  # 10 ms a unit
    sched = h.engine.scheduler
    sched.open_round(h.state.low, h.clock.now, [S.PROMOTION_2M])  # promotion starts waiting
    sched.close_round(h.state.low, RoundEnd.BOUND, {S.PROMOTION_2M: 10})
    h.clock.advance(10.0)  # far past PROBE_AGING_PERIODS
    first = h.get(2000, new_round=True)  # 2 ms
    assert first.service == S.SAMPLING and first.last
    assert h.closed[-1].end is RoundEnd.BOUND
    h.complete(first)
    probe = h.get(2000, new_round=True)  # the next round opens with the probe
    assert probe.service == S.PROMOTION_2M and probe.count == 1


@pytest.mark.timeout(10)
def test_each_low_batch_is_traced_with_its_prediction_and_its_measured_work() -> None:
    """The daemon's trace of a low batch (read by ``lowprio_trace``, joined with the agent's
    round by ``benchmarks/overrun_split.py``): the time left it was sized for, its predicted
    work, whether its cost was measured yet, and at completion the work measured (select,
    completion and the agent's elapsed time), all on the engine's clock."""
    h = harness((S.PAGE_SHARING, 1000, 10e-6))
    req = h.get(2000, new_round=True)  # 2 ms: (2000 - 50) / 10 µs a page, slot capacity 64
    entry = h.state.low_trace[-1]
    model = h.state.low.cost(S.PAGE_SHARING)
    assert entry["seq"] == req.seq and entry["service"] == "page_sharing"
    assert entry["units"] == req.count == CAPACITY and entry["first"] is True
    assert entry["time_left"] == pytest.approx(2e-3)
    assert entry["predicted"] == pytest.approx(model.estimate(CAPACITY))
    assert entry["cost_samples"] == 1
    assert entry["get_end"] - entry["get_start"] == pytest.approx(CAPACITY * 10e-6)
    h.complete(req, agent_seconds=300e-6)
    assert entry["agent_seconds"] == pytest.approx(300e-6)
    assert entry["processing"] == pytest.approx(CAPACITY * 10e-6 + 300e-6)
    assert entry["complete_start"] >= entry["get_end"] + 300e-6
    later = h.get(1500)  # a later request: its two ways (2 x 25 µs) come off its time
    second = h.state.low_trace[-1]
    assert second["seq"] == later.seq and second["first"] is False
    assert second["time_left"] == pytest.approx(1.5e-3 - 2 * 25e-6)
    assert second["exchange"] == pytest.approx(25e-6)
