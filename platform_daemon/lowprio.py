"""The low-priority scheduler: which service goes next, and how much of it fits the time left.

The talk's platform "prioritizes the queue of requests based on the time bound" and "selects
type and page-set, avoiding starvation". For each GetRequest of a low-priority round this
module picks, among the types pending when the round opened (the snapshot):

- by **class**, in the strawman order: sampling (0) > {NUMA migration, 2M defrag, page
  sharing} (1) > {validations} (2) > 2M promotion (3);
- with **aging**: a type that has waited ``aging_seconds`` since it was last served moves up
  one class per period waited, so a busy higher class can never starve a lower one; among
  equal classes the one waiting longest goes first;
- sized by its **cost**: each (VM, type) keeps a fitted cost of a batch's work (a fixed part
  and a part per unit: a page handed out), and each VM a moving average of a message's way
  between the processes, so the batch is the largest that fits the time left. A type whose
  smallest batch does not fit is passed over for one that does; when none fits the round is
  over;
- **never past the time left by design**: a type not yet measured (its cost a guess: per
  page, or per 512 pages for 2M promotion, whose unit is a region) is sized against half
  of the time left until a batch has measured it; a probe of a type whose estimate fits no
  batch (see ``PROBE_AGING_PERIODS``) only opens a round, with the whole bound ahead, never
  ends one whose time is mostly spent.

Pure code: no I/O, no clock of its own (every method takes ``now``), no knowledge of slots or
sockets; ``rounds.py`` drives it and unit tests run it on a virtual clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from shared.constants import ServiceType

#: Strawman classes (0 first): sampling > {migration, defrag, sharing} > {validations} > promotion.
STRAWMAN_CLASSES: dict[ServiceType, int] = {
    ServiceType.SAMPLING: 0,
    ServiceType.NUMA_MIGRATION: 1,
    ServiceType.DEFRAG_2M: 1,
    ServiceType.PAGE_SHARING: 1,
    ServiceType.VALIDATION: 2,
    ServiceType.PROMOTION_2M: 3,
}
#: First guesses, before a type has been measured: a batch's fixed work, a page's work, and a
#: message's way between the processes (half a cross-CPU round trip).
DEFAULT_FIXED = 100e-6
DEFAULT_PER_UNIT = 2e-6
DEFAULT_EXCHANGE = 100e-6
#: Pages in one unit of a type's work, for the first guess of its cost: 2M promotion hands
#: out whole 2 MiB regions; every other type counts pages (or candidates).
UNIT_PAGES: dict[ServiceType, int] = {ServiceType.PROMOTION_2M: 512}
#: The share of the time left that a type's batches may fill while its cost is a guess.
UNMEASURED_SHARE = 0.5
#: Weight of a new measurement in the exchange's moving average.
EXCHANGE_GAIN = 0.25
#: A batch's work counts for at most OUTLIER_FACTOR times the estimate, from the first
#: batch on (the guess then): on a busy host one batch's wall time can hold a long wait for
#: a CPU (a first promotion batch measured 75 ms for ~1 ms of work, and the type waited
#: seconds for probes), while a type that really costs more is learned within a few batches
#: (x4 each).
OUTLIER_FACTOR = 4.0
#: A type that fits no batch is still given one unit once it has waited this many aging
#: periods: its cost estimate may be stale (one slow batch), and only a batch measures it.
PROBE_AGING_PERIODS = 4


class RoundEnd(Enum):
    """Why a low-priority round ended."""

    DONE = "done"  # no pending type had work left
    BOUND = "bound"  # the time left fits no batch of any pending type
    PREEMPTED = "preempted"  # high-priority work became pending
    NO_SLOT = "no_slot"  # every PageList slot is out, or a low batch is (one at a time)
    LEFT = "left"  # the agent started a new round without finishing this one (its bound)


@dataclass
class CostModel:
    """What a batch of ``n`` units of one type costs in work: ``fixed + n * per_unit``.

    The work is the daemon's selection and completion and the agent's processing. ``fixed``
    and ``per_unit`` are a least-squares line through recent batches (exponential
    forgetting), so small batches do not make the per-unit cost look large. Until batches of
    different sizes have been seen, or when noise tilts the line the wrong way, all of the
    cost is taken as per unit: an estimate that only errs on the safe side for larger batches.
    """

    per_unit: float = DEFAULT_PER_UNIT
    fixed: float = DEFAULT_FIXED
    forget: float = 0.8
    samples: int = 0
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5, repr=False)

    def estimate(self, units: int) -> float:
        return self.fixed + units * self.per_unit

    @property
    def measured(self) -> bool:
        """Whether a batch has been measured: until then the cost is a guess."""
        return self.samples > 0

    def units_within(self, seconds: float) -> int:
        """The most units whose batch fits in ``seconds`` (0 when not even one does)."""
        spare = seconds - self.fixed
        if spare < self.per_unit:
            return 0
        return int(spare / self.per_unit + 1e-9)  # 89.99999 units is 90: float noise

    def record(self, units: int, processing: float) -> None:
        """A batch of ``units`` (at least one) took ``processing`` seconds of work."""
        if units <= 0:
            return
        # One batch held up (a pause, a wait for a CPU) moves the line only so far: a real
        # change of cost still gets through over a few batches.
        y = min(max(processing, 0.0), OUTLIER_FACTOR * self.estimate(units))
        self.samples += 1
        w, sn, snn, sy, sny = (x * self.forget for x in self._sums)
        n = float(units)
        w, sn, snn, sy, sny = w + 1, sn + n, snn + n * n, sy + y, sny + n * y
        self._sums = [w, sn, snn, sy, sny]
        spread = w * snn - sn * sn
        slope = (w * sny - sn * sy) / spread if spread > 1e-9 * w * snn else 0.0
        intercept = (sy - slope * sn) / w
        if slope > 0 and intercept >= 0:  # batches of different sizes: the line
            self.per_unit, self.fixed = slope, intercept
        else:  # one size so far, or noise: all of it per unit
            self.per_unit, self.fixed = max(sy / sn, 1e-9), 0.0


@dataclass(frozen=True)
class Choice:
    """The next batch: its type and the units of work it may cost."""

    service: ServiceType
    units: int


@dataclass
class _TypeState:
    waiting_since: float | None = None  # pending and not served since this time
    served_pages: int = 0
    deferred: int = 0


@dataclass
class VMSchedule:
    """One VM's low-priority state: the open round's snapshot, costs and waits per type.

    ``exchange`` is a moving average of a message's way between the agent and the daemon
    (half a Request-to-CompleteRequest time, less the agent's work), measured on batches after
    a round's first only: the first is asked for while the guest still runs.
    """

    snapshot: list[ServiceType] = field(default_factory=list)
    open: bool = False
    costs: dict[ServiceType, CostModel] = field(default_factory=dict)
    exchange: float = DEFAULT_EXCHANGE
    exchange_samples: int = 0
    types: dict[ServiceType, _TypeState] = field(default_factory=dict)
    rounds: dict[RoundEnd, int] = field(default_factory=dict)

    def cost(self, service: ServiceType) -> CostModel:
        model = self.costs.get(service)
        if model is None:
            guess = DEFAULT_PER_UNIT * UNIT_PAGES.get(service, 1)
            model = self.costs[service] = CostModel(per_unit=guess)
        return model

    def type_state(self, service: ServiceType) -> _TypeState:
        st = self.types.get(service)
        if st is None:
            st = self.types[service] = _TypeState()
        return st


class LowPriorityScheduler:
    """Chooses low-priority batches by class, aging and cost, within a round's time left."""

    def __init__(
        self, classes: Mapping[ServiceType, int] | None = None, aging_seconds: float = 1.0
    ) -> None:
        if aging_seconds <= 0:
            raise ValueError("aging_seconds must be positive")
        self.classes = dict(STRAWMAN_CLASSES if classes is None else classes)
        self.aging_seconds = aging_seconds

    def open_round(self, vm: VMSchedule, now: float, pending: Iterable[ServiceType]) -> None:
        """Snapshot the pending types; types that became pending start their wait now."""
        vm.snapshot = [s for s in pending if s in self.classes]
        vm.open = True
        for service in vm.snapshot:
            st = vm.type_state(service)
            if st.waiting_since is None:
                st.waiting_since = now

    def effective_class(self, vm: VMSchedule, service: ServiceType, now: float) -> float:
        """The type's class, lifted one step per ``aging_seconds`` it has waited."""
        since = vm.type_state(service).waiting_since
        waited = 0.0 if since is None else max(0.0, now - since)
        return self.classes[service] - math.floor(waited / self.aging_seconds)

    def order(
        self, vm: VMSchedule, now: float, work: Mapping[ServiceType, int]
    ) -> list[ServiceType]:
        """Snapshot types with work, best first: lowest effective class, then longest wait."""
        ready = [s for s in vm.snapshot if work.get(s, 0) > 0]

        def key(s: ServiceType) -> tuple[float, float, int]:
            since = vm.type_state(s).waiting_since
            return (self.effective_class(vm, s, now), now if since is None else since, int(s))

        return sorted(ready, key=key)

    def choose(
        self,
        vm: VMSchedule,
        now: float,
        time_left: float,
        work: Mapping[ServiceType, int],
        probe: bool = True,
    ) -> Choice | RoundEnd:
        """The next batch, or why the round is over. ``work``: units waiting per type;
        ``time_left``: the time the batch's work may take (its messages' ways deducted);
        ``probe``: whether a type that fits no batch may be probed (a round's first batch)."""
        ordered = self.order(vm, now, work)
        if not ordered:
            return RoundEnd.DONE
        for service in ordered:
            model = vm.cost(service)
            # A guessed cost may be far off: until a batch measured it, half the time left.
            usable = time_left if model.measured else UNMEASURED_SHARE * time_left
            units = min(work[service], model.units_within(usable))
            if units >= 1:
                return Choice(service, units)
        if probe and time_left > 0:
            for service in ordered:
                since = vm.type_state(service).waiting_since
                if since is not None and now - since >= PROBE_AGING_PERIODS * self.aging_seconds:
                    return Choice(service, 1)  # a probe: re-measure a cost that may be stale
        return RoundEnd.BOUND

    def served(self, vm: VMSchedule, service: ServiceType, pages: int, now: float) -> None:
        """A batch of ``service`` was handed out: its wait starts again."""
        st = vm.type_state(service)
        st.served_pages += pages
        st.waiting_since = now

    def record(
        self,
        vm: VMSchedule,
        service: ServiceType,
        units: int,
        processing: float,
        exchange: float | None,
    ) -> None:
        """Feed one measured batch into the type's cost model, and its way (None for a
        round's first batch) into the VM's exchange."""
        vm.cost(service).record(units, processing)
        if exchange is not None:
            a = EXCHANGE_GAIN if vm.exchange_samples else 1.0  # the first replaces the guess
            vm.exchange += a * (max(exchange, 0.0) - vm.exchange)
            vm.exchange_samples += 1

    def close_round(
        self, vm: VMSchedule, end: RoundEnd, work: Mapping[ServiceType, int]
    ) -> dict[ServiceType, int]:
        """End the round; work left when the bound ended it (the daemon's sizing, or the
        agent leaving at its own end of the bound) is counted as deferred."""
        deferred: dict[ServiceType, int] = {}
        if end in (RoundEnd.BOUND, RoundEnd.LEFT):
            for service in vm.snapshot:
                left = work.get(service, 0)
                if left > 0:
                    vm.type_state(service).deferred += left
                    deferred[service] = left
        for service in vm.snapshot:
            if work.get(service, 0) <= 0:
                vm.type_state(service).waiting_since = None  # nothing waits any more
        vm.rounds[end] = vm.rounds.get(end, 0) + 1
        vm.snapshot = []
        vm.open = False
        return deferred
